//! A guest port: what outlives a guest's connection (configuration, counters) and the receive
//! side of its current connection, which other ports' workers and the uplink thread write
//! frames into.
//!
//! Frames are written straight into the guest's RX buffers under that RX ring's lock, by
//! whichever thread holds the frame. A full ring costs a drop counted on the receiving port;
//! nobody ever waits for a guest to post buffers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use devshare_common::chain::{GuestBuffers, MemoryAtomic};
use devshare_common::ratelimit::RateLimit;
use devshare_common::ring::{Ring, RingError};
use devshare_common::warn_limited;
use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use crate::config::PortConfig;
use crate::frame::{Frame, ETH_HLEN};
use crate::stats::{PortCounters, PortDoc};
use crate::virtio_net::{
    csum_add, csum_finish, Negotiated, NetHdr, RxFixup, F_NEEDS_CSUM, HDR_LEN,
};

/// The vring type every port uses.
pub type Vring = devshare_common::vring::Vring<VringMutex<MemoryAtomic>>;

/// Most RX buffers one frame may be spread over (a 64 KiB frame in 1 KiB buffers needs 65).
const MAX_RX_CHAINS: usize = 256;

/// Guest-caused warnings logged per port and interval; the rest are counted and summed up.
const WARN_BURST: u32 = 5;
/// The interval of [`WARN_BURST`].
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// What an RX ring was found to hold when a frame did not fit: the first `chains` chains
/// from `next_avail` on, `space` device-writable bytes together. The next frame starts from
/// there instead of walking the same buffers again, so a guest that posts too little (or too
/// small) cannot make every frame for it cost a scan of its ring. Valid while the ring's next
/// chain is still `next_avail`; chains the guest adds later are walked once, when a frame
/// comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shortfall {
    next_avail: u16,
    chains: u16,
    space: u32,
}

impl Shortfall {
    /// Packed: `next_avail` in bits 48..64, this flag in bit 47, `chains` in 32..47 (at most
    /// [`MAX_RX_CHAINS`]), `space` in 0..32.
    const VALID: u64 = 1 << 47;

    fn pack(self) -> u64 {
        Self::VALID
            | u64::from(self.next_avail) << 48
            | u64::from(self.chains & 0x7fff) << 32
            | u64::from(self.space)
    }

    fn unpack(v: u64) -> Option<Shortfall> {
        (v & Self::VALID != 0).then_some(Shortfall {
            next_avail: (v >> 48) as u16,
            chains: (v >> 32) as u16 & 0x7fff,
            space: v as u32,
        })
    }
}

/// The receive side of a port's current connection.
pub struct RxPath {
    /// RX vrings, one per queue pair (virtqueues 0, 2, 4, ...).
    vrings: Vec<Vring>,
    mem: MemoryAtomic,
    features: Arc<AtomicU64>,
    /// Per RX queue, a packed [`Shortfall`] (0: none). Read and written under that queue's
    /// vring lock.
    shortfall: Vec<AtomicU64>,
}

impl RxPath {
    /// Builds the RX side from a connection's RX vrings, queue pair 0 first.
    pub fn new(rx_vrings: Vec<Vring>, mem: MemoryAtomic, features: Arc<AtomicU64>) -> RxPath {
        let shortfall = rx_vrings.iter().map(|_| AtomicU64::new(0)).collect();
        RxPath {
            vrings: rx_vrings,
            mem,
            features,
            shortfall,
        }
    }
}

/// Why a frame did not reach a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxDrop {
    /// Not connected, or the ring is stopped or disabled.
    Down,
    /// Not enough RX buffers.
    NoBuffer,
    /// Larger than a buffer and no MRG_RXBUF.
    TooBig,
    /// A large segment the guest did not accept.
    Offload,
    /// The guest's RX ring is corrupt.
    BadChain,
}

/// A guest port.
pub struct Port {
    /// Index in the switch table.
    pub index: usize,
    /// As configured.
    pub config: PortConfig,
    /// Counters.
    pub counters: PortCounters,
    /// Limits the warnings this port's guest can cause.
    pub warn: RateLimit,
    rx: RwLock<Option<Arc<RxPath>>>,
    connected: AtomicBool,
}

impl Port {
    /// A port with no guest yet.
    pub fn new(index: usize, config: PortConfig) -> Port {
        let warn = RateLimit::new(format!("port {}", config.name), WARN_BURST, WARN_INTERVAL);
        Port {
            index,
            config,
            counters: PortCounters::default(),
            warn,
            rx: RwLock::new(None),
            connected: AtomicBool::new(false),
        }
    }

    /// Makes `make()` the receive side unless one is attached already (cheap when it is: `make`
    /// is not called). `make` returns `None` while the parts of a receive side are not all
    /// known yet.
    pub fn ensure_attached(&self, make: impl FnOnce() -> Option<RxPath>) {
        if self.is_attached() {
            return;
        }
        let mut rx = self.rx.write().unwrap_or_else(PoisonError::into_inner);
        if rx.is_none() {
            *rx = make().map(Arc::new);
        }
    }

    /// Whether a receive side is attached (frames for this guest can land).
    pub fn is_attached(&self) -> bool {
        self.rx
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Marks the front-end connected (counted once per connection).
    pub fn mark_connected(&self) {
        if !self.connected.swap(true, Ordering::AcqRel) {
            self.counters.connects.inc();
        }
    }

    /// Marks the front-end gone and forgets its rings.
    pub fn mark_disconnected(&self) {
        if self.connected.swap(false, Ordering::AcqRel) {
            self.counters.disconnects.inc();
        }
        *self.rx.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Forgets the receive side (device reset); the connection stays.
    pub fn detach(&self) {
        *self.rx.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn rx_path(&self) -> Option<Arc<RxPath>> {
        self.rx
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Writes `frames` into this guest's RX queue `hint % queues`, in order, taking the ring's
    /// lock and the memory map once for all of them. Returns the queue used if the guest wants
    /// an interrupt for what landed, to be passed to [`Port::signal`] once the caller's batch
    /// is done. Drops are counted here.
    pub fn receive_batch(&self, hint: usize, frames: &[Frame<'_, '_>]) -> Option<usize> {
        let drop_all = |reason: RxDrop| {
            for _ in frames {
                self.count_drop(reason);
            }
            None
        };
        let Some(rx) = self.rx_path() else {
            return drop_all(RxDrop::Down);
        };
        let n = rx.vrings.len();
        if n == 0 {
            return drop_all(RxDrop::Down);
        }
        let neg = Negotiated(rx.features.load(Ordering::Acquire));
        // The guest may run fewer queue pairs than offered: fall back to pair 0.
        let mut q = hint % n;
        let mut state = rx.vrings[q].get_mut();
        if !running(&state) && q != 0 {
            drop(state);
            q = 0;
            state = rx.vrings[0].get_mut();
        }
        if !running(&state) {
            return drop_all(RxDrop::Down);
        }
        let mem = rx.mem.memory();
        let mut ring = match Ring::open(state.get_queue(), &mem, rx.vrings[q].signalled()) {
            Ok(r) => r,
            Err(e) => {
                warn_limited!(
                    self.warn,
                    "{}: RX queue {q} unusable: {e}",
                    self.config.name
                );
                return drop_all(RxDrop::BadChain);
            }
        };
        let (mut packets, mut bytes) = (0u64, 0u64);
        // One list of RX chains for the whole batch: no allocation per frame.
        let mut chains = Vec::new();
        let shortfall = &rx.shortfall[q];
        for frame in frames {
            let res = match neg.rx_fixup(&frame.hdr, frame.ethertype) {
                RxFixup::Refuse => Err(RxDrop::Offload),
                fixup => write_frame(&mut ring, &mut chains, shortfall, neg, fixup, frame),
            };
            match res {
                Ok(()) => {
                    packets += 1;
                    bytes += frame.payload.len() as u64;
                }
                Err(RxDrop::BadChain) => {
                    self.count_drop(RxDrop::BadChain);
                    warn_limited!(
                        self.warn,
                        "{}: RX queue {q}: malformed receive buffers, taken back empty",
                        self.config.name
                    );
                }
                Err(reason) => self.count_drop(reason),
            }
        }
        // One used-index store for the whole batch, then one look at whether the guest wants
        // to be interrupted for it.
        ring.publish_used();
        let interrupt = ring.needs_interrupt();
        ring.finish(state.get_queue_mut());
        self.counters.rx_packets.add(packets);
        self.counters.rx_bytes.add(bytes);
        interrupt.then_some(q)
    }

    fn count_drop(&self, reason: RxDrop) {
        let d = &self.counters.drops;
        match reason {
            RxDrop::Down => d.rx_down.inc(),
            RxDrop::NoBuffer => d.rx_no_buffer.inc(),
            RxDrop::TooBig => d.rx_too_big.inc(),
            RxDrop::Offload => d.rx_offload.inc(),
            RxDrop::BadChain => d.rx_bad_chain.inc(),
        }
    }

    /// Interrupts the guest for RX queue `q` ([`Port::receive_batch`] found that it asked to
    /// be told).
    pub fn signal(&self, q: usize) {
        let Some(rx) = self.rx_path() else { return };
        let Some(vring) = rx.vrings.get(q) else {
            return;
        };
        let res = vring.get_ref().signal_used_queue();
        if let Err(e) = res {
            log::debug!("{}: cannot signal RX queue {q}: {e}", self.config.name);
        }
    }

    /// The port's configuration, state and counters for the stats document.
    pub fn doc(&self) -> PortDoc<'_> {
        PortDoc {
            name: &self.config.name,
            mac: self.config.mac.to_string(),
            vlan: self.config.vlan,
            queue_pairs: self.config.queue_pairs,
            connected: self.connected.load(Ordering::Relaxed),
            counters: &self.counters,
        }
    }
}

fn running(state: &VringState<MemoryAtomic>) -> bool {
    state.is_enabled() && state.get_queue().ready()
}

/// Takes enough RX buffers for `frame`, fills them and returns them used (published by the
/// caller, once per batch). `shortfall` is this ring's [`Shortfall`] record.
fn write_frame<'m>(
    ring: &mut Ring<'m>,
    chains: &mut Vec<GuestBuffers<'m>>,
    shortfall: &AtomicU64,
    neg: Negotiated,
    fixup: RxFixup,
    frame: &Frame<'_, '_>,
) -> Result<(), RxDrop> {
    let hdr_len = neg.hdr_len();
    let total = hdr_len + frame.payload.len();
    let mergeable = neg.mergeable_rx();
    let start = ring.next_avail();
    let ring_err = |e: RingError| {
        // A corrupt avail index: nothing sensible can be taken from this ring.
        log::debug!("RX ring unusable: {e}");
        RxDrop::BadChain
    };
    chains.clear();

    // Chains an earlier frame already walked and found too small (still the next ones):
    // skipped, with what they hold, instead of walked again.
    let mut skipped = 0u16;
    let mut space = 0usize;
    if let Some(s) = Shortfall::unpack(shortfall.load(Ordering::Relaxed)) {
        if s.next_avail == start && (s.space as usize) < total {
            if !mergeable && s.chains > 0 {
                // The first buffer alone must hold the frame, and it is still the first.
                return Err(RxDrop::TooBig);
            }
            skipped = ring.skip(s.chains).map_err(ring_err)?;
            if skipped == s.chains {
                space = s.space as usize;
            } else {
                ring.rewind(start);
                skipped = 0;
            }
        }
    }

    // Chains taken from `start` on, skipped ones included.
    let mut taken = skipped;
    let mut bad = false;
    while space < total && usize::from(taken) < MAX_RX_CHAINS {
        let head = match ring.pop() {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(e) => {
                ring.rewind(start);
                return Err(ring_err(e));
            }
        };
        taken += 1;
        // The first buffer must hold the whole header; later ones any bytes.
        let min = if taken == 1 { hdr_len } else { 1 };
        match ring.chain_into(head, chains) {
            Ok(()) => match chains.last() {
                Some(b) if b.readable_len() == 0 && b.writable_len() >= min => {
                    space += b.writable_len();
                }
                _ => bad = true,
            },
            Err(_) => bad = true,
        }
        if bad || !mergeable {
            break;
        }
    }
    if bad {
        // A guest that posts unusable buffers gets them back empty, with every chain taken
        // before them for this frame.
        give_back_empty(ring, start, taken);
        shortfall.store(0, Ordering::Relaxed);
        return Err(RxDrop::BadChain);
    }
    if space < total {
        // Leave the buffers to the guest for a frame that fits, and remember what they hold.
        ring.rewind(start);
        let s = Shortfall {
            next_avail: start,
            chains: taken,
            space: u32::try_from(space).unwrap_or(u32::MAX),
        };
        shortfall.store(s.pack(), Ordering::Relaxed);
        return Err(if taken == 0 || mergeable {
            RxDrop::NoBuffer
        } else {
            RxDrop::TooBig
        });
    }
    shortfall.store(0, Ordering::Relaxed);
    if skipped > 0 {
        // The skipped chains were only remembered: map them, and the others again, to fill
        // them.
        ring.rewind(start);
        chains.clear();
        for _ in 0..taken {
            let mapped = match ring.pop() {
                Ok(Some(head)) => ring.chain_into(head, chains).is_ok(),
                _ => false,
            };
            if !mapped {
                // The guest changed buffers it had made available.
                give_back_empty(ring, start, taken);
                return Err(RxDrop::BadChain);
            }
        }
    }

    // The virtio-net header and, when it is in host memory apart from the rest, the start of
    // the frame (a guest frame's Ethernet header) are written together, in one copy, when the
    // first chain has room for both; the rest comes straight from where the frame is.
    let prefix = frame.payload.host_prefix();
    let together = chains
        .first()
        .is_some_and(|b| b.writable_len() >= hdr_len + prefix.len());
    let skip = if together { prefix.len() } else { 0 };
    // Each chain goes back with what it holds: the headers (first chain only) and its share
    // of the frame. Nothing is visible to the guest before the caller publishes the batch, so
    // the headers may still be written below.
    let mut copied = skip;
    for (k, b) in chains.iter().enumerate() {
        let off = if k == 0 { hdr_len + skip } else { 0 };
        let n = frame.payload.copy_into(copied, b, off);
        copied += n;
        ring.push_used(b.head(), (off + n) as u32);
    }

    let mut hdr = frame.hdr;
    if matches!(fixup, RxFixup::ClearFlags | RxFixup::CompleteChecksum) {
        clear_offload(&mut hdr);
    }
    hdr.num_buffers = chains.len() as u16;
    if let Some(first) = chains.first() {
        // Fixed-size copies only (the compiler makes them moves, not memcpy calls): this
        // runs for every frame. A 10-byte header has its last two bytes overwritten.
        let mut head = [0u8; HDR_LEN + ETH_HLEN];
        head[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
        if let Ok(eth) = <&[u8; ETH_HLEN]>::try_from(&prefix[..skip]) {
            head[hdr_len..hdr_len + ETH_HLEN].copy_from_slice(eth);
        }
        first.write_at(0, &head[..hdr_len + skip]);
    }
    // Last: the checksum may lie anywhere in the frame, the copied headers included.
    if fixup == RxFixup::CompleteChecksum {
        complete_checksum(&frame.hdr, frame, chains, hdr_len);
    }
    Ok(())
}

/// Returns the `count` chains from `start` on to the guest used, with nothing written.
fn give_back_empty(ring: &mut Ring<'_>, start: u16, count: u16) {
    ring.rewind(start);
    for _ in 0..count {
        match ring.pop() {
            Ok(Some(head)) => ring.push_used(head, 0),
            _ => break,
        }
    }
}

fn clear_offload(hdr: &mut NetHdr) {
    *hdr = NetHdr {
        num_buffers: hdr.num_buffers,
        ..NetHdr::default()
    };
}

/// Computes the checksum the sender left pending and stores it in the receiver's copy.
fn complete_checksum(
    hdr: &NetHdr,
    frame: &Frame<'_, '_>,
    chains: &[GuestBuffers<'_>],
    hdr_len: usize,
) {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return;
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    let len = frame.payload.len();
    if at + 2 > len {
        return;
    }
    let mut sum = 0u64;
    let mut odd = false;
    let mut buf = [0u8; 2048];
    let mut pos = start;
    while pos < len {
        let n = frame.payload.read(pos, &mut buf);
        if n == 0 {
            break;
        }
        sum = csum_add(sum, &buf[..n], &mut odd);
        pos += n;
    }
    let value = csum_finish(sum).to_be_bytes();
    // Frame offset `at` sits after the header in the first buffer, then buffer after buffer.
    for (i, b) in value.iter().enumerate() {
        let mut target = at + hdr_len + i;
        for c in chains {
            if target < c.writable_len() {
                c.write_at(target, &[*b]);
                break;
            }
            target -= c.writable_len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Payload;
    use crate::testing::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    use vm_memory::GuestMemoryAtomic;

    const MERGEABLE: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF;

    fn host_frame(bytes: &[u8]) -> Frame<'_, '_> {
        Frame {
            hdr: NetHdr::default(),
            ethertype: 0x0800,
            payload: Payload::Host(bytes),
        }
    }

    /// Buffers too small for a frame are walked once: the next frame does not walk them
    /// again while the guest has posted nothing new (shown by rewriting them behind the
    /// device's back, which a fresh walk would see), and a buffer posted later is added to
    /// what was remembered.
    #[test]
    fn rx_buffers_that_fell_short_are_not_walked_again() {
        let mem = memory();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut g = Guest::new(&mem, &atomic, 0);
        let port = Port::new(
            0,
            config(&[None], crate::config::Mode::Bridge).ports[0].clone(),
        );
        port.ensure_attached(|| Some(g.rx_path(&atomic, MERGEABLE)));
        // Three buffers of 20 bytes: 60 < 12 + 100.
        g.post_rx(3, 20);
        let data: Vec<u8> = (0..100u8).collect();
        let f = host_frame(&data);
        assert_eq!(port.receive_batch(0, &[f]), None);
        assert_eq!(port.counters.drops.rx_no_buffer.get(), 1);
        // The guest makes them large without telling the device (no new avail entry).
        for i in 0..3 {
            let big = g.buffer(2048, &[]);
            g.rewrite_rx_desc(i, desc(big, 2048, WRITE, 0));
        }
        port.receive_batch(0, &[f]);
        assert_eq!(
            port.counters.drops.rx_no_buffer.get(),
            2,
            "walked again: {:?}",
            serde_json::to_string(&port.counters).unwrap()
        );
        assert!(g.rx_frames().is_empty());
        // A new buffer: walked once, added to the three remembered ones; the frame lands.
        g.post_rx(1, 64);
        port.receive_batch(0, &[f]);
        assert_eq!(port.counters.rx_packets.get(), 1);
        let got = g.rx_frames();
        assert_eq!(got.len(), 4);
        let bytes: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(&bytes[HDR..], &data[..]);
        // The memory is forgotten once the frame went in.
        assert_eq!(Shortfall::unpack(g_shortfall(&port)), None);
    }

    /// A guest without GUEST_CSUM gets a guest frame's pending checksum completed, behind
    /// the headers as they were copied.
    #[test]
    fn a_pending_checksum_is_completed_for_a_guest_without_csum_offload() {
        let mem = memory();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut rx = Guest::new(&mem, &atomic, 1);
        let mut tx = Guest::new(&mem, &atomic, 0);
        let port = Port::new(
            1,
            config(&[None, None], crate::config::Mode::Bridge).ports[1].clone(),
        );
        port.ensure_attached(|| Some(rx.rx_path(&atomic, 1 << VIRTIO_F_VERSION_1)));
        rx.post_rx(1, 2048);
        let mut bytes = frame(mac(1), mac(0), 0x0800, 100);
        let (start, offset) = (34usize, 6usize);
        bytes[0] = F_NEEDS_CSUM;
        bytes[6..8].copy_from_slice(&(start as u16).to_le_bytes());
        bytes[8..10].copy_from_slice(&(offset as u16).to_le_bytes());
        bytes[HDR + start + offset..HDR + start + offset + 2].copy_from_slice(&[0x12, 0x34]);
        let addr = tx.buffer(bytes.len(), &bytes);
        let mut bufs = GuestBuffers::empty(0);
        bufs.push_buffer(&mem, addr, bytes.len() as u32, false)
            .unwrap();
        let f = crate::frame::GuestFrame::parse(&bufs, HDR).unwrap();
        port.receive_batch(0, &[f.as_frame()]);
        let got = rx.rx_frames();
        assert_eq!(got.len(), 1);
        let out = &got[0].1;
        let mut odd = false;
        let want = csum_finish(csum_add(0, &bytes[HDR + start..], &mut odd)).to_be_bytes();
        assert_eq!(&out[HDR + start + offset..HDR + start + offset + 2], &want);
        // Everything else as sent; the header's offload flags cleared, one buffer.
        assert_eq!(
            &out[HDR..HDR + start + offset],
            &bytes[HDR..HDR + start + offset]
        );
        assert_eq!(
            &out[HDR + start + offset + 2..],
            &bytes[HDR + start + offset + 2..]
        );
        assert_eq!(&out[..10], &[0; 10]);
        assert_eq!(u16::from_le_bytes([out[10], out[11]]), 1);
    }

    fn g_shortfall(port: &Port) -> u64 {
        port.rx_path().unwrap().shortfall[0].load(Ordering::Relaxed)
    }

    #[test]
    fn shortfall_packs_and_unpacks() {
        let s = Shortfall {
            next_avail: 0xfffe,
            chains: 256,
            space: u32::MAX,
        };
        assert_eq!(Shortfall::unpack(s.pack()), Some(s));
        assert_eq!(Shortfall::unpack(0), None);
    }
}
