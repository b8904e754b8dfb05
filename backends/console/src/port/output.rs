//! Guest output on its way to the host side, and what a crash of the process costs on it.
//!
//! Output goes to the host side directly when nothing is waiting before it, else into the
//! spool. A full spool holds a data port's guest back (the chain stays in the ring) and
//! makes the console keep the newest bytes ([`Port::keep_newest`], the one place that rule
//! lives), so a guest kernel printing to `hvc0` never stalls.
//!
//! A SIGKILL takes effect when a system call returns: after the kernel did the work, before
//! the process recorded it. So every step that moves output is arranged for that moment
//! (with `--state-dir`, where the spool outlives the process):
//! - **Nothing accepted is lost.** Stream mode copies QEMU's output into the spool with
//!   `MSG_PEEK`, publishes it, and only then takes it out of the socket ([`Port::take_peeked`]):
//!   a byte leaves the socket (is accepted) only once it is in the spool. Virtio mode marks a
//!   chain used (accepts it) only after its bytes are delivered or in the spool, and marks
//!   each chain used as soon as it is taken, not at the end of the pass.
//! - **Nothing is taken twice.** A chain the dead process did not mark used is handed to the
//!   next one again (the front-end resumes the ring at the used index). The spool's header
//!   says how much of it was taken ([`crate::spool::ChainId`]): the next process continues it
//!   there, or only marks it used. Bytes peeked but not taken out of QEMU's socket die with
//!   the socket.
//! - **At most one write is repeated.** The kernel may have taken any part of a write to
//!   the host side when the process died. Every write offers at most [`WRITE_CAP`] bytes and
//!   is recorded in the header as in flight ([`crate::spool::Flight`]) until its result is
//!   recorded; the next process sends those bytes again and counts them in
//!   `replayed_after_restart_bytes`.

use std::io::IoSlice;

use devshare_common::chain::GuestBuffers;

use super::{Host, Port};
use crate::failpoint;
use crate::link::PeerPort;
use crate::spool::{chain_fingerprint, ChainId, Flight, FINGERPRINT_BYTES};

/// Most bytes one write to the host side offers: what a crash can make the next process send
/// a second time (README, "Nothing silently lost").
pub const WRITE_CAP: usize = 64 * 1024;

/// Bytes that can be read from an offset on: a guest chain's readable part or host memory.
pub trait Source {
    /// Total bytes.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies bytes from `off` into `out`; returns how many.
    fn read_at(&self, off: usize, out: &mut [u8]) -> usize;
    /// The bytes from `off` on, for one `writev`.
    fn io_slices(&self, off: usize) -> Vec<IoSlice<'_>>;
    /// Copies bytes from `off` into the writable part of a guest chain; returns how many.
    fn copy_into(&self, off: usize, dst: &GuestBuffers<'_>) -> usize;
}

impl Source for GuestBuffers<'_> {
    fn len(&self) -> usize {
        self.readable_len()
    }
    fn read_at(&self, off: usize, out: &mut [u8]) -> usize {
        GuestBuffers::read_at(self, off, out)
    }
    fn io_slices(&self, off: usize) -> Vec<IoSlice<'_>> {
        self.readable_io_slices(off)
    }
    fn copy_into(&self, off: usize, dst: &GuestBuffers<'_>) -> usize {
        self.copy_to(off, dst, 0)
    }
}

/// Host bytes in up to two pieces (a spool's front, or one slice).
pub struct Pieces<'a>(pub [&'a [u8]; 2]);

impl Pieces<'_> {
    /// Where byte `off` lies: (piece, offset in it).
    fn locate(&self, off: usize) -> (usize, usize) {
        let first = self.0[0].len();
        if off < first {
            (0, off)
        } else {
            (1, (off - first).min(self.0[1].len()))
        }
    }
}

impl Source for Pieces<'_> {
    fn len(&self) -> usize {
        self.0[0].len() + self.0[1].len()
    }
    fn read_at(&self, off: usize, out: &mut [u8]) -> usize {
        let (i, o) = self.locate(off);
        let mut done = 0;
        for (k, piece) in self.0.iter().enumerate().skip(i) {
            let from = if k == i { o } else { 0 };
            let n = (piece.len() - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&piece[from..from + n]);
            done += n;
        }
        done
    }
    fn io_slices(&self, off: usize) -> Vec<IoSlice<'_>> {
        let (i, o) = self.locate(off);
        let mut v = vec![IoSlice::new(&self.0[i][o..])];
        if i == 0 {
            v.push(IoSlice::new(self.0[1]));
        }
        v
    }
    fn copy_into(&self, off: usize, dst: &GuestBuffers<'_>) -> usize {
        let (i, o) = self.locate(off);
        let mut done = dst.write_at(0, &self.0[i][o..]);
        if i == 0 && done == self.0[0].len() - o {
            done += dst.write_at(done, self.0[1]);
        }
        done
    }
}

/// `slices` cut to at most `max` bytes.
fn capped<'b>(slices: &'b [IoSlice<'_>], max: usize) -> Vec<IoSlice<'b>> {
    let mut left = max;
    let mut out = Vec::with_capacity(slices.len());
    for s in slices {
        if left == 0 {
            break;
        }
        let n = s.len().min(left);
        out.push(IoSlice::new(&s[..n]));
        left -= n;
    }
    out
}

/// A transmit chain as popped from the ring: where it stands, its head, its buffers.
pub struct TxChain<'a, 'm> {
    /// Its place in the avail ring (free-running index).
    pub pos: u16,
    /// Its head descriptor.
    pub head: u16,
    /// Its buffers.
    pub bufs: &'a GuestBuffers<'m>,
}

impl TxChain<'_, '_> {
    fn id(&self) -> ChainId {
        ChainId {
            pos: self.pos,
            head: self.head,
            len: self.bufs.readable_len(),
        }
    }

    fn fingerprint(&self) -> u64 {
        let mut first = [0u8; FINGERPRINT_BYTES];
        let n = self.bufs.read_at(0, &mut first);
        chain_fingerprint(self.bufs.readable_len(), &first[..n])
    }
}

/// Guest output that can be looked at before it is taken (QEMU's stream socket): see
/// [`Port::take_peeked`].
pub trait PeekSource {
    /// Bytes waiting now (0 when unknown).
    fn waiting(&self) -> usize;
    /// Copies waiting bytes into `a`, then `b`, leaving them waiting; returns how many (0:
    /// none now, or the source ended).
    fn peek(&mut self, a: &mut [u8], b: &mut [u8]) -> usize;
    /// Takes the `n` bytes the last [`peek`](Self::peek) copied.
    fn consume(&mut self, n: usize);
}

impl Port {
    /// Buffers `src` from `from` on, keeping the newest bytes: the oldest buffered bytes (and
    /// the oldest of `src`, beyond the capacity) make room, and are counted as dropped. What
    /// the host side takes now goes there first (`peer` for a link): only bytes it cannot
    /// take are ever dropped.
    pub fn keep_newest(
        &mut self,
        src: &dyn Source,
        from: usize,
        mut peer: Option<&mut PeerPort<'_>>,
    ) {
        let mut from = from.min(src.len());
        if src.len() - from > self.spool.free() {
            // Room the host side can make before anything is dropped.
            self.flush(peer.as_deref_mut());
            if self.spool.is_empty() {
                from += self.deliver(src, from, peer);
            }
        }
        let cap = self.spool.capacity();
        let n = src.len() - from;
        if n > cap {
            self.stats.dropped_bytes.add((n - cap) as u64);
            // Taken, by the rule: a chain is not taken again for them after a crash.
            self.spool.chain_passed(n - cap);
            from += n - cap;
        }
        let rest = src.len() - from;
        let dropped = self.spool.discard(rest.saturating_sub(self.spool.free()));
        self.stats.dropped_bytes.add(dropped as u64);
        self.push(src, from, rest);
    }

    /// Appends up to `max` bytes of `src` from `from` on to the spool; returns how many fit.
    fn push(&mut self, src: &dyn Source, from: usize, max: usize) -> usize {
        let mut pos = from;
        let n = self.spool.push_with(max, |dst| {
            let n = src.read_at(pos, dst);
            pos += n;
            n
        });
        self.stats.set_buffered(self.spool.len());
        n
    }

    /// Takes one transmit chain: to the host side directly when nothing is queued before it,
    /// else into the spool. Returns true when all of it is taken: the caller marks it used at
    /// once, then calls [`Port::chain_used`]. Returns false when a data port's spool is full:
    /// the chain stays with the guest, and the spool's header remembers how much of it was
    /// taken.
    pub fn take_output(
        &mut self,
        chain: &TxChain<'_, '_>,
        mut peer: Option<&mut PeerPort<'_>>,
    ) -> bool {
        let bufs = chain.bufs;
        let len = bufs.readable_len();
        let mut off = self.chain_offset(chain);
        if off < len && self.spool.is_empty() {
            off += self.deliver(bufs, off, peer.as_deref_mut());
        }
        if off < len {
            if self.console {
                self.keep_newest(bufs, off, peer);
                off = len;
            } else {
                let pushed = self.push(bufs, off, len - off);
                if pushed > 0 {
                    failpoint::reached("chain-buffered");
                }
                off += pushed;
            }
        }
        self.tx_partial = off < len;
        if self.tx_partial && !self.spool.durable() {
            // A durable spool has it from the start (a crash can come at any time); here it
            // is only needed should the front-end go away while the chain waits for room.
            self.spool.set_chain_sum(chain.fingerprint());
        }
        off == len
    }

    /// Where to continue `chain`: where the spool's header says it stopped if it is the chain
    /// being taken, else 0 (and it becomes the chain being taken).
    fn chain_offset(&mut self, chain: &TxChain<'_, '_>) -> usize {
        let id = chain.id();
        let earlier = std::mem::take(&mut self.chain_from_earlier);
        if let Some(taken) = self.spool.chain_taken(id) {
            if !earlier {
                // Ours, taken again after back-pressure: the ring cannot have changed it.
                return taken;
            }
            // A chain of rings that are gone, handed over again; unless the guest rebooted
            // meanwhile and put another chain where it stood.
            if self.spool.chain_sum() == chain.fingerprint() {
                let replay = self.spool.chain_replay(taken).min(id.len - taken);
                log::info!(
                    "{}: continuing a chain taken up to byte {taken} of {} before the \
                     front-end came back{}",
                    self.label,
                    id.len,
                    if replay > 0 {
                        format!(
                            "; the process before this one died while writing {replay} bytes of \
                             it, which are sent again (counted in \
                             replayed_after_restart_bytes)"
                        )
                    } else {
                        String::new()
                    }
                );
                self.stats.replayed_after_restart_bytes.add(replay as u64);
                return taken;
            }
        }
        let sum = if self.spool.durable() {
            chain.fingerprint()
        } else {
            0
        };
        self.spool.begin_chain(id, sum);
        0
    }

    /// The chain [`Port::take_output`] took whole is marked used (and published).
    pub fn chain_used(&mut self) {
        self.spool.end_chain();
        self.tx_partial = false;
    }

    /// Delivers `src` from `off` on straight to the host side, [`WRITE_CAP`] bytes per write
    /// at most; returns how much it took. Each write is in flight in the spool's header until
    /// its result is recorded (the chain's bytes marked taken).
    fn deliver(
        &mut self,
        src: &dyn Source,
        off: usize,
        mut peer: Option<&mut PeerPort<'_>>,
    ) -> usize {
        let mut done = 0;
        loop {
            let at = off + done;
            let k = src.len().saturating_sub(at).min(WRITE_CAP);
            if k == 0 {
                break;
            }
            self.spool.launch(Flight::Chain { from: at, len: k });
            let n = self.write_host(src, at, k, peer.as_deref_mut());
            if n > 0 {
                failpoint::reached("host-write");
            }
            self.spool.chain_passed(n);
            self.spool.land();
            done += n;
            if n < k {
                break;
            }
        }
        self.stats.to_host_bytes.add(done as u64);
        done
    }

    /// One write of `src[at..at + k]` to the host side; returns what it took.
    fn write_host(
        &mut self,
        src: &dyn Source,
        at: usize,
        k: usize,
        peer: Option<&mut PeerPort<'_>>,
    ) -> usize {
        match &mut self.host {
            Host::Endpoint(ep) => {
                if !ep.is_attached() {
                    return 0;
                }
                let all = src.io_slices(at);
                match ep.write_output(&capped(&all, k)) {
                    Ok(n) => n,
                    Err(e) => {
                        self.output_failed(&e);
                        0
                    }
                }
            }
            Host::Link { .. } => match peer {
                Some(peer) => peer.write(src, at, k),
                None => 0,
            },
        }
    }

    /// Sends what the spool holds to the host side, as far as it takes it, [`WRITE_CAP`]
    /// bytes per write at most, each in flight in the spool's header until the front is
    /// discarded.
    pub fn flush(&mut self, mut peer: Option<&mut PeerPort<'_>>) {
        while !self.spool.is_empty() {
            if let Host::Endpoint(ep) = &self.host {
                if !ep.is_attached() {
                    break;
                }
            }
            let k = self.spool.len().min(WRITE_CAP);
            self.spool.launch(Flight::Front {
                from: self.spool.read_position(),
                len: k,
            });
            let (a, b) = self.spool.front();
            let front = Pieces([a, b]);
            let n = match &mut self.host {
                Host::Endpoint(ep) => match ep.write_output(&capped(&front.io_slices(0), k)) {
                    Ok(n) => n,
                    Err(e) => {
                        self.output_failed(&e);
                        0
                    }
                },
                Host::Link { .. } => match peer.as_deref_mut() {
                    Some(peer) => peer.write(&front, 0, k),
                    None => 0,
                },
            };
            if n > 0 {
                failpoint::reached("host-write");
            }
            self.spool.discard(n);
            self.spool.land();
            self.stats.to_host_bytes.add(n as u64);
            if n < k {
                break;
            }
        }
        // Set once the writes are done: stream output passes through the spool on its way,
        // and bytes the host side took at once were never waiting for it.
        self.stats.set_buffered(self.spool.len());
    }

    /// Stream mode: takes up to `max` bytes of guest output from `src` into the spool, keeping
    /// the newest bytes (what the host side does not take first is dropped, and counted, to
    /// make room). The bytes are copied with a peek, published, and only then taken from
    /// `src`: a crash never loses a byte `src` gave up. Returns the bytes taken (0: none
    /// waiting). The caller flushes (which also updates `buffered_bytes`).
    pub fn take_peeked(&mut self, max: usize, src: &mut dyn PeekSource) -> usize {
        let want = max.min(self.spool.capacity());
        if want > self.spool.free() {
            // Room the host side can make before anything is dropped.
            self.flush(None);
            let short = src.waiting().min(want).saturating_sub(self.spool.free());
            let dropped = self.spool.discard(short);
            self.stats.dropped_bytes.add(dropped as u64);
        }
        let n = self.spool.append_with(want, |a, b| {
            let n = src.peek(a, b);
            if n > 0 {
                failpoint::reached("stream-peeked");
            }
            n
        });
        if n > 0 {
            failpoint::reached("stream-buffered");
            src.consume(n);
            failpoint::reached("guest-output-read");
        }
        // `buffered_bytes` is left to the flush that follows.
        n
    }
}
