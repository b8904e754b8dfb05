//! One guest port: its buffer of guest output (the [`Spool`]), its host side (an endpoint or
//! a port of a linked guest), its counters and what the guest told us about it.
//!
//! How guest output travels to the host side, and what a crash of the process may cost on
//! the way, is `output.rs`'s job; host input into the guest's receive buffers is here.

mod output;

pub use output::{PeekSource, Pieces, Source, TxChain, WRITE_CAP};

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use devshare_common::ratelimit::RateLimit;
use devshare_common::warn_limited;

use crate::endpoint::{Endpoint, EndpointError};
use crate::queue::{Batch, Budget, Dir};
use crate::reactor::Interest;
use crate::spool::Spool;
use crate::stats::PortStats;

/// Where a port's host-side data goes.
pub enum Host {
    /// An endpoint on this host.
    Endpoint(Endpoint),
    /// Port `port` of VM `dev` (indices in the same group): a guest-to-guest link.
    Link {
        /// The peer VM.
        dev: usize,
        /// The peer port.
        port: usize,
    },
}

/// What [`Port::fill_from_endpoint`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Everything there was went in (or nothing could be read).
    Done,
    /// The guest had no receive buffer left.
    Starved,
}

/// One guest port (see the module docs).
pub struct Port {
    /// `vm/port`, for logs.
    pub label: String,
    /// Name the guest sees.
    pub name: String,
    /// The console port: never holds the guest back, keeps the newest output.
    pub console: bool,
    /// Where the data goes.
    pub host: Host,
    spool: Spool,
    /// Counters.
    pub stats: Arc<PortStats>,
    /// A data port's transmit chain is taken in part and waits in the ring for room
    /// (back-pressure); the spool's header says how much of it is taken.
    tx_partial: bool,
    /// The spool's header names a chain taken in part and not marked used on rings that are
    /// gone (the process before this one died, or the front-end went away while the chain
    /// waited for room): the first chain the front-end hands over is checked against it.
    chain_from_earlier: bool,
    /// The guest opened the port (or it is the console).
    pub guest_open: bool,
    /// No receive buffer was available last time host input was due.
    pub rx_starved: bool,
    /// The terminal size last told to the guest (console on a PTY).
    pub winsize: Option<(u16, u16)>,
    /// The endpoint fds registered with the VM's event loop, and for what.
    pub interest: Interest,
    /// Limits the warnings the guest can cause on this port.
    warnings: RateLimit,
}

impl Port {
    /// A port named `name` of VM `vm` whose output waits in `spool`.
    pub fn new(vm: &str, name: &str, console: bool, host: Host, spool: Spool) -> Port {
        let endpoint = match &host {
            Host::Endpoint(ep) => ep.counters(),
            Host::Link { .. } => Arc::default(),
        };
        let stats = Arc::new(PortStats::new(endpoint));
        stats.set_buffered(spool.len());
        let label = format!("{vm}/{name}");
        let resize_dropped = spool.resize_dropped();
        if resize_dropped > 0 {
            stats.dropped_bytes.add(resize_dropped as u64);
        }
        let leftover = spool.leftover();
        if leftover.front_replay > 0 {
            log::info!(
                "{label}: the process before this one died while writing {} bytes to the host \
                 side; they are sent again (counted in replayed_after_restart_bytes)",
                leftover.front_replay
            );
            stats
                .replayed_after_restart_bytes
                .add(leftover.front_replay as u64);
        }
        Port {
            warnings: RateLimit::standard(label.clone()),
            label,
            name: name.to_string(),
            console,
            host,
            spool,
            stats,
            tx_partial: false,
            chain_from_earlier: leftover.chain,
            guest_open: false,
            rx_starved: false,
            winsize: None,
            interest: Interest::default(),
        }
    }

    /// Whether guest output is waiting for the host side (in the spool, or a chain begun).
    pub fn has_pending_output(&self) -> bool {
        !self.spool.is_empty() || self.tx_partial
    }

    /// A front-end connected or went away: its rings are new (or gone). A chain taken in part
    /// (back-pressure), or left by the process before this one, is not used: a front-end
    /// that comes back with the same guest (QEMU reconnecting, resuming the ring where
    /// GET_VRING_BASE said) hands it over again, and the first chain it hands over is checked
    /// against the spool's header (place, length, fingerprint) so that it is continued, not
    /// taken twice. Any other chain begins anew.
    pub fn new_connection(&mut self) {
        if self.tx_partial {
            self.chain_from_earlier = true;
        } else if !self.chain_from_earlier {
            self.spool.end_chain();
        }
        self.tx_partial = false;
    }

    /// The endpoint, if the host side is one.
    pub fn endpoint(&mut self) -> Option<&mut Endpoint> {
        match &mut self.host {
            Host::Endpoint(ep) => Some(ep),
            Host::Link { .. } => None,
        }
    }

    /// Room left in the buffer, in bytes.
    pub fn buffer_free(&self) -> usize {
        self.spool.free()
    }

    /// The buffer's capacity, in bytes.
    pub fn buffer_capacity(&self) -> usize {
        self.spool.capacity()
    }

    /// Whether the host side is attached and can be slower than the guest (a socket client,
    /// a PTY, a serial device; not a log file, which takes everything, nor a link).
    pub fn host_can_wait(&self) -> bool {
        match &self.host {
            Host::Endpoint(ep) => ep.is_attached() && ep.output_fd().is_some(),
            Host::Link { .. } => false,
        }
    }

    /// Writing output to the endpoint failed. A peer that left was logged by the endpoint as
    /// it dropped it; anything else (a full disk under a log file) is logged within limits:
    /// the guest can make it happen on every chain.
    fn output_failed(&mut self, e: &EndpointError) {
        if !matches!(e, EndpointError::Detached { .. }) {
            warn_limited!(self.warnings, "{}: {e}", self.label);
        }
    }

    /// Refuses a malformed chain: counted, and logged within limits (the caller returns it
    /// used, length 0).
    pub fn refuse(&mut self, why: &dyn std::fmt::Display) {
        warn_limited!(
            self.warnings,
            "{}: refused descriptor chain: {why}",
            self.label
        );
        self.stats.bad_chains.inc();
    }

    /// Fills the guest's receive buffers in `rx` from the endpoint's input, until the input
    /// or the buffers run out, or the event's `budget` is spent (the input is still ready
    /// then, and the event loop comes back for it).
    ///
    /// Kicks for new receive buffers are asked for only when input is waiting and no buffer
    /// is left (then the port is starved and its input no longer watched). A guest that posts
    /// buffers ahead of the input, as drivers do, is never woken up for that, and the input fd
    /// stays watched: one thread wake-up and two `epoll_ctl` less per message.
    pub fn fill_from_endpoint(&mut self, rx: &mut Batch<'_, '_>, budget: &Budget) -> Input {
        // Whether the last read left the input drained (a short read).
        let mut drained = false;
        loop {
            if budget.spent() {
                return Input::Done;
            }
            let Host::Endpoint(ep) = &mut self.host else {
                return Input::Done;
            };
            let Some(fd) = ep.input_fd().map(|f| f.as_raw_fd()) else {
                return Input::Done;
            };
            let start = rx.next_avail();
            let head = match rx.pop_quiet() {
                Ok(Some(head)) => head,
                Ok(None) if drained => {
                    rx.no_kicks();
                    return Input::Done;
                }
                Ok(None) => match rx.want_kicks() {
                    Ok(true) => continue,
                    Ok(false) => return Input::Starved,
                    Err(_) => return Input::Done,
                },
                Err(_) => return Input::Done,
            };
            let dst = match rx.chain_for(head, Dir::Receive) {
                Ok(dst) => dst,
                Err(why) => {
                    rx.charge(budget, 0);
                    self.refuse(&why);
                    rx.push_used(head, 0);
                    continue;
                }
            };
            let read = dst.read_writable_from(&RawFdRef(fd), 0, usize::MAX);
            rx.charge(budget, *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => {
                    rx.rewind(start);
                    // A client that finished sending stays for output; a device hung up.
                    ep.end_of_input();
                    return Input::Done;
                }
                Ok(n) => {
                    rx.push_used(head, n as u32);
                    self.stats.to_guest_bytes.add(n as u64);
                    drained = n < dst.writable_len();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A buffer is left over: no kick needed until input finds none.
                    rx.rewind(start);
                    rx.no_kicks();
                    return Input::Done;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    rx.rewind(start);
                }
                Err(e) => {
                    rx.rewind(start);
                    // Logged by the endpoint as it lets the client or device go.
                    let _ = ep.input_failed(&e);
                    return Input::Done;
                }
            }
        }
    }

    /// The process shuts down: the buffer goes to the endpoint as far as it takes it without
    /// waiting, the endpoint cleans up (a PTY link, a log file synced), and a buffer kept in
    /// `--state-dir` is synced to disk for the next process to replay.
    pub fn shut_down(&mut self) {
        if matches!(self.host, Host::Endpoint(_)) {
            self.flush(None);
        }
        if let Host::Endpoint(ep) = &mut self.host {
            ep.shutdown();
        }
        if let Err(e) = self.spool.sync() {
            log::warn!("{}: cannot sync the buffer to disk: {e}", self.label);
        }
    }

    /// Bytes waiting in the spool.
    pub fn buffered(&self) -> usize {
        self.spool.len()
    }
}

/// A borrowed raw fd for `GuestBuffers::read_writable_from`.
struct RawFdRef(RawFd);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use crate::testing::Rig;
    use crate::virtio_console as vc;

    const MULTIPORT: u64 = vc::F_MULTIPORT;

    fn read_n(s: &mut std::os::unix::net::UnixStream, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        s.read_exact(&mut v).unwrap();
        v
    }

    /// Opens port `p` as the driver would (PORT_OPEN is the control module's business; here
    /// only its outcome matters).
    fn open(rig: &Rig, p: usize) {
        rig.vms().devices[0].ports[p].guest_open = true;
    }

    #[test]
    fn full_data_buffer_leaves_the_chain_in_the_ring_until_a_client_drains_it() {
        let mut rig = Rig::new("backpressure", "8", MULTIPORT);
        open(&rig, 1);
        let (_, txq) = vc::port_queues(1);
        let head = rig.post(txq, b"0123456789abcdefghij", 0);
        rig.vms().on_queue_event(0, txq);
        // Nobody listens: 8 bytes fit the buffer, the chain stays with the guest.
        assert_eq!(rig.used(txq), vec![]);
        assert_eq!(rig.next_avail(txq), 0, "the chain was not left in the ring");
        let stats = rig.vms().devices[0].ports[1].stats.clone();
        assert_eq!(
            stats
                .buffered_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            8
        );
        // Kicking again changes nothing while the buffer is full.
        rig.vms().on_queue_event(0, txq);
        assert_eq!(rig.used(txq), vec![]);
        // A client attaches: the buffer is replayed, then the rest of the chain follows.
        let mut client = rig.client("data");
        rig.vms().serve_events(0);
        assert_eq!(read_n(&mut client, 20), b"0123456789abcdefghij");
        assert_eq!(rig.used(txq), vec![(head, 0)]);
        assert_eq!(rig.next_avail(txq), 1);
        assert_eq!(stats.to_host_bytes.get(), 20);
        assert_eq!(stats.dropped_bytes.get(), 0);
    }

    #[test]
    fn console_keeps_the_newest_bytes_and_counts_what_it_drops() {
        let mut rig = Rig::new("newest", "8", MULTIPORT);
        open(&rig, 0);
        let (_, txq) = vc::port_queues(0);
        let h1 = rig.post(txq, b"0123456789", 0);
        let h2 = rig.post(txq, b"abc", 0);
        rig.vms().on_queue_event(0, txq);
        // The console never holds the guest back.
        assert_eq!(rig.used(txq), vec![(h1, 0), (h2, 0)]);
        // An emergency write is kept the same way.
        assert!(rig.vms().write_config(0, vc::CONFIG_EMERG_WR, b"!"));
        let stats = rig.vms().devices[0].ports[0].stats.clone();
        assert_eq!(stats.dropped_bytes.get(), 6);
        let mut client = rig.client("console");
        rig.vms().serve_events(0);
        assert_eq!(read_n(&mut client, 8), b"6789abc!");
    }

    #[test]
    fn console_output_goes_to_a_client_that_made_room_before_anything_is_dropped() {
        let mut rig = Rig::new("flush-first", "4096", MULTIPORT);
        open(&rig, 0);
        let (_, txq) = vc::port_queues(0);
        let mut client = rig.client("console");
        rig.vms().serve_events(0);
        let stats = rig.vms().devices[0].ports[0].stats.clone();
        // The client reads nothing: its socket fills up, then the buffer keeps the newest.
        let data: Vec<u8> = (0..512 * 1024u32)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        for chunk in data.chunks(64 * 1024) {
            let head = rig.post(txq, chunk, 0);
            rig.vms().on_queue_event(0, txq);
            assert_eq!(rig.used(txq), vec![(head, 0)], "a console chain was held");
        }
        let dropped = stats.dropped_bytes.get();
        assert!(dropped > 0, "the socket took half a MiB");
        // The client drains its socket; the backend is not told (no event is served).
        client.set_nonblocking(true).unwrap();
        let mut early = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf) {
                Ok(n) if n > 0 => early.extend_from_slice(&buf[..n]),
                Ok(_) => panic!("the backend closed the client"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(early, data[..early.len()]);
        // More output through the path that takes it without a flush before it (an
        // emergency write): the buffer goes to the client first, and nothing is dropped.
        assert!(rig.vms().write_config(0, vc::CONFIG_EMERG_WR, b"!"));
        assert_eq!(
            stats.dropped_bytes.get(),
            dropped,
            "dropped what the client could take"
        );
        // And a chain after it.
        rig.post(txq, b"after", 0);
        rig.vms().on_queue_event(0, txq);
        assert_eq!(stats.dropped_bytes.get(), dropped);
        client.set_nonblocking(false).unwrap();
        let rest = read_n(&mut client, 4096 + 6);
        assert_eq!(rest[..4096], data[data.len() - 4096..]);
        assert_eq!(&rest[4096..], b"!after");
        assert_eq!(
            stats.to_host_bytes.get() + dropped,
            data.len() as u64 + 6,
            "every byte is delivered or counted as dropped"
        );
    }

    #[test]
    fn malformed_transmit_chains_are_refused_counted_and_returned() {
        let mut rig = Rig::new("refuse", "64", MULTIPORT);
        open(&rig, 1);
        let (_, txq) = vc::port_queues(1);
        let outside = rig.post_raw(txq, &[(0x1000_0000, 64, 0)]);
        let writable = rig.post(txq, b"", 16);
        let good = rig.post(txq, b"ok", 0);
        rig.vms().on_queue_event(0, txq);
        assert_eq!(rig.used(txq), vec![(outside, 0), (writable, 0), (good, 0)]);
        let stats = rig.vms().devices[0].ports[1].stats.clone();
        assert_eq!(stats.bad_chains.get(), 2);
        assert_eq!(
            stats
                .buffered_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn host_input_fills_receive_buffers_only_when_the_guest_opened_the_port() {
        let mut rig = Rig::new("input", "64", MULTIPORT);
        let (rxq, _) = vc::port_queues(1);
        let mut client = rig.client("data");
        rig.vms().serve_events(0);
        std::io::Write::write_all(&mut client, b"hello").unwrap();
        let head = rig.post(rxq, b"", 64);
        rig.vms().serve_events(0);
        rig.vms().on_queue_event(0, rxq);
        assert_eq!(
            rig.used(rxq),
            vec![],
            "input for a port the guest never opened"
        );
        open(&rig, 1);
        rig.vms().on_queue_event(0, rxq);
        assert_eq!(rig.used(rxq), vec![(head, 5)]);
        assert_eq!(rig.written(rxq, head, 5), b"hello");
    }
}
