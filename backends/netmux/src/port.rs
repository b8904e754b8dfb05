//! A guest port: what outlives a guest's connection (configuration, counters) and the receive
//! side of its current connection, which other ports' workers and the uplink thread write
//! frames into.
//!
//! Frames are written straight into the guest's RX buffers under that RX ring's lock, by
//! whichever thread holds the frame. A full ring costs a drop counted on the receiving port;
//! nobody ever waits for a guest to post buffers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use devshare_common::chain::{GuestBuffers, MemoryAtomic};
use devshare_common::stats::Counter;
use serde_json::{json, Value};
use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use crate::config::PortConfig;
use crate::virtio_net::{csum_add, csum_finish, Negotiated, NetHdr, RxFixup, F_NEEDS_CSUM};
use devshare_common::ring::Ring;

/// The vring type every port uses.
pub type Vring = VringMutex<MemoryAtomic>;

/// Most RX buffers one frame may be spread over (a 64 KiB frame in 1 KiB buffers needs 65).
const MAX_RX_CHAINS: usize = 256;

/// Per-port counters, readable while running.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames taken from the guest's TX rings.
    pub tx_packets: Counter,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: Counter,
    /// Frames written into the guest's RX rings.
    pub rx_packets: Counter,
    /// Bytes of those frames.
    pub rx_bytes: Counter,
    /// TX frames whose source MAC was not the port's.
    pub drop_spoofed: Counter,
    /// TX frames to another guest in private mode.
    pub drop_private: Counter,
    /// TX frames addressed to the sender itself.
    pub drop_hairpin: Counter,
    /// TX descriptor chains refused (outside memory, broken links, writable parts, too large).
    pub drop_bad_chain: Counter,
    /// TX frames with a short or inconsistent header or length.
    pub drop_bad_frame: Counter,
    /// TX frames the uplink could not take right now (its queue was full).
    pub drop_uplink_busy: Counter,
    /// TX frames the uplink refused (e.g. a bad offload request).
    pub drop_uplink_refused: Counter,
    /// TX frames for the host port that its TAP could not take right now.
    pub drop_host_busy: Counter,
    /// TX frames the host port's TAP refused.
    pub drop_host_refused: Counter,
    /// Frames for this guest dropped because its RX ring had no (or not enough) buffers.
    pub drop_rx_no_buffer: Counter,
    /// Frames for this guest larger than one RX buffer while it did not accept MRG_RXBUF.
    pub drop_rx_too_big: Counter,
    /// Large segments for this guest while it did not accept the matching offload.
    pub drop_rx_offload: Counter,
    /// Frames for this guest while it was not connected or its ring was not running.
    pub drop_rx_down: Counter,
    /// RX descriptor chains refused.
    pub drop_rx_bad_chain: Counter,
    /// Times a front-end connected.
    pub connects: Counter,
    /// Times a front-end went away.
    pub disconnects: Counter,
}

/// The receive side of a port's current connection.
pub struct RxPath {
    /// RX vrings, one per queue pair (virtqueues 0, 2, 4, ...).
    vrings: Vec<Vring>,
    mem: MemoryAtomic,
    features: Arc<AtomicU64>,
}

impl RxPath {
    /// Builds the RX side from a connection's RX vrings, queue pair 0 first.
    pub fn new(rx_vrings: Vec<Vring>, mem: MemoryAtomic, features: Arc<AtomicU64>) -> RxPath {
        RxPath {
            vrings: rx_vrings,
            mem,
            features,
        }
    }
}

/// A frame to be received: where its bytes are and what its header says.
#[derive(Clone, Copy)]
pub struct Frame<'a, 'm> {
    /// The virtio-net header that came with it (checksum and segmentation requests).
    pub hdr: NetHdr,
    /// The Ethernet type (for offload decisions).
    pub ethertype: u16,
    /// The bytes of the frame.
    pub payload: Payload<'a, 'm>,
}

/// Where a frame's bytes are.
#[derive(Clone, Copy)]
pub enum Payload<'a, 'm> {
    /// In a sending guest's TX buffers, from `offset` to the end of the readable part.
    Guest {
        /// The sender's chain.
        bufs: &'a GuestBuffers<'m>,
        /// Where the Ethernet frame starts (after the sender's virtio-net header).
        offset: usize,
    },
    /// In host memory (read from the uplink).
    Host(&'a [u8]),
}

impl Payload<'_, '_> {
    /// Frame length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Guest { bufs, offset } => bufs.readable_len().saturating_sub(*offset),
            Payload::Host(d) => d.len(),
        }
    }

    /// True for an empty frame.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies frame bytes from `from` on into `dst`'s writable part at `dst_offset`.
    fn copy_into(&self, from: usize, dst: &GuestBuffers<'_>, dst_offset: usize) -> usize {
        match self {
            Payload::Guest { bufs, offset } => bufs.copy_to(offset + from, dst, dst_offset),
            Payload::Host(d) => d
                .get(from..)
                .map(|rest| dst.write_at(dst_offset, rest))
                .unwrap_or(0),
        }
    }

    /// Reads frame bytes from `from` on into `out`.
    pub fn read(&self, from: usize, out: &mut [u8]) -> usize {
        match self {
            Payload::Guest { bufs, offset } => bufs.read_at(offset + from, out),
            Payload::Host(d) => {
                let rest = d.get(from..).unwrap_or(&[]);
                let n = rest.len().min(out.len());
                out[..n].copy_from_slice(&rest[..n]);
                n
            }
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
    pub stats: PortStats,
    rx: RwLock<Option<Arc<RxPath>>>,
    connected: AtomicBool,
}

impl Port {
    /// A port with no guest yet.
    pub fn new(index: usize, config: PortConfig) -> Port {
        Port {
            index,
            config,
            stats: PortStats::default(),
            rx: RwLock::new(None),
            connected: AtomicBool::new(false),
        }
    }

    /// Makes `make()` the receive side unless one is attached already (cheap when it is: `make`
    /// is not called). `make` returns `None` while the parts of a receive side are not all
    /// known yet.
    pub fn ensure_attached(&self, make: impl FnOnce() -> Option<RxPath>) {
        if self
            .rx
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return;
        }
        let mut rx = self.rx.write().unwrap_or_else(PoisonError::into_inner);
        if rx.is_none() {
            *rx = make().map(Arc::new);
        }
    }

    /// Marks the front-end connected (counted once per connection).
    pub fn mark_connected(&self) {
        if !self.connected.swap(true, Ordering::AcqRel) {
            self.stats.connects.inc();
        }
    }

    /// Marks the front-end gone and forgets its rings.
    pub fn mark_disconnected(&self) {
        if self.connected.swap(false, Ordering::AcqRel) {
            self.stats.disconnects.inc();
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
        let mut ring = match Ring::open(state.get_queue(), &mem) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("{}: RX queue {q} unusable: {e}", self.config.name);
                return drop_all(RxDrop::BadChain);
            }
        };
        let (mut packets, mut bytes) = (0u64, 0u64);
        // One list of RX chains for the whole batch: no allocation per frame.
        let mut chains = Vec::new();
        for frame in frames {
            let res = match neg.rx_fixup(&frame.hdr, frame.ethertype) {
                RxFixup::Refuse => Err(RxDrop::Offload),
                fixup => write_frame(&mut ring, &mut chains, neg, fixup, frame),
            };
            match res {
                Ok(()) => {
                    packets += 1;
                    bytes += frame.payload.len() as u64;
                }
                Err(reason) => self.count_drop(reason),
            }
        }
        // One used-index store for the whole batch, then one look at whether the guest wants
        // to be interrupted for it.
        ring.publish_used();
        let interrupt = ring.needs_interrupt();
        ring.finish(state.get_queue_mut());
        self.stats.rx_packets.add(packets);
        self.stats.rx_bytes.add(bytes);
        interrupt.then_some(q)
    }

    fn count_drop(&self, reason: RxDrop) {
        match reason {
            RxDrop::Down => self.stats.drop_rx_down.inc(),
            RxDrop::NoBuffer => self.stats.drop_rx_no_buffer.inc(),
            RxDrop::TooBig => self.stats.drop_rx_too_big.inc(),
            RxDrop::Offload => self.stats.drop_rx_offload.inc(),
            RxDrop::BadChain => self.stats.drop_rx_bad_chain.inc(),
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

    /// A JSON object with the port's configuration and counters.
    pub fn snapshot(&self) -> Value {
        let s = &self.stats;
        json!({
            "name": self.config.name,
            "mac": self.config.mac.to_string(),
            "vlan": self.config.vlan,
            "queue_pairs": self.config.queue_pairs,
            "connected": self.connected.load(Ordering::Relaxed),
            "tx_packets": s.tx_packets.get(),
            "tx_bytes": s.tx_bytes.get(),
            "rx_packets": s.rx_packets.get(),
            "rx_bytes": s.rx_bytes.get(),
            "connects": s.connects.get(),
            "disconnects": s.disconnects.get(),
            "drops": {
                "spoofed": s.drop_spoofed.get(),
                "private": s.drop_private.get(),
                "hairpin": s.drop_hairpin.get(),
                "bad_chain": s.drop_bad_chain.get(),
                "bad_frame": s.drop_bad_frame.get(),
                "uplink_busy": s.drop_uplink_busy.get(),
                "uplink_refused": s.drop_uplink_refused.get(),
                "host_busy": s.drop_host_busy.get(),
                "host_refused": s.drop_host_refused.get(),
                "rx_no_buffer": s.drop_rx_no_buffer.get(),
                "rx_too_big": s.drop_rx_too_big.get(),
                "rx_offload": s.drop_rx_offload.get(),
                "rx_down": s.drop_rx_down.get(),
                "rx_bad_chain": s.drop_rx_bad_chain.get(),
            },
        })
    }
}

fn running(state: &VringState<MemoryAtomic>) -> bool {
    state.is_enabled() && state.get_queue().ready()
}

/// Takes enough RX buffers for `frame`, fills them and returns them used (published by the
/// caller, once per batch).
fn write_frame<'m>(
    ring: &mut Ring<'m>,
    chains: &mut Vec<GuestBuffers<'m>>,
    neg: Negotiated,
    fixup: RxFixup,
    frame: &Frame<'_, '_>,
) -> Result<(), RxDrop> {
    let hdr_len = neg.hdr_len();
    let frame_len = frame.payload.len();
    let total = hdr_len + frame_len;
    let mergeable = neg.mergeable_rx();
    let start = ring.next_avail();

    chains.clear();
    let mut bad_heads: Vec<u16> = Vec::new();
    let mut space = 0usize;
    while space < total && chains.len() < MAX_RX_CHAINS {
        let head = match ring.pop() {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(e) => {
                // A corrupt avail index: leave the ring as it was.
                log::debug!("RX ring unusable: {e}");
                ring.rewind(start);
                return Err(RxDrop::BadChain);
            }
        };
        // The first buffer must hold the whole header; later ones any bytes.
        let min = if chains.is_empty() { hdr_len } else { 1 };
        match ring.chain_into(head, chains) {
            Ok(()) => match chains.last() {
                Some(b) if b.readable_len() == 0 && b.writable_len() >= min => {
                    space += b.writable_len();
                }
                _ => {
                    chains.pop();
                    bad_heads.push(head);
                }
            },
            Err(_) => bad_heads.push(head),
        }
        if !mergeable {
            break;
        }
    }
    if !bad_heads.is_empty() {
        // A guest that posts unusable buffers gets everything taken back, empty.
        for head in bad_heads
            .into_iter()
            .chain(chains.iter().map(GuestBuffers::head))
        {
            ring.push_used(head, 0);
        }
        return Err(RxDrop::BadChain);
    }
    if space < total {
        // Leave the buffers to the guest for a frame that fits.
        ring.rewind(start);
        return Err(if chains.is_empty() || mergeable {
            RxDrop::NoBuffer
        } else {
            RxDrop::TooBig
        });
    }

    // Each chain goes back with what it holds: the header (first chain only) and its share of
    // the frame. Nothing is visible to the guest before the caller publishes the batch, so the
    // header may still be written below.
    let mut copied = 0usize;
    for (k, b) in chains.iter().enumerate() {
        let off = if k == 0 { hdr_len } else { 0 };
        let n = frame.payload.copy_into(copied, b, off);
        copied += n;
        ring.push_used(b.head(), (off + n) as u32);
    }

    let mut hdr = frame.hdr;
    match fixup {
        RxFixup::AsIs | RxFixup::Refuse => {}
        RxFixup::ClearFlags => clear_offload(&mut hdr),
        RxFixup::CompleteChecksum => {
            complete_checksum(&hdr, frame, chains, hdr_len);
            clear_offload(&mut hdr);
        }
    }
    hdr.num_buffers = chains.len() as u16;
    if let Some(first) = chains.first() {
        first.write_at(0, &hdr.to_bytes()[..hdr_len]);
    }
    Ok(())
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
