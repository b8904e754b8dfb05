//! A guest's TX pass: chains from its TX ring, frames checked and switched, delivered to the
//! other guests and sent out of the host-side links, chains returned, interrupts given.
//!
//! Per batch the ring is read in one pass, guest-to-guest frames are written into each
//! receiver's RX ring under one lock per receiver, each link gets one `sendmmsg`, and each
//! ring at most one interrupt. A pass has a work budget (chains and descriptors): a guest
//! that keeps its ring full, or fills it with the longest chains the ring allows, gets its
//! worker back to the event loop regularly (the pass then ends with [`TxEnd::Yielded`] and
//! the caller kicks the queue itself, so nothing is lost).

use devshare_common::chain::{GuestBuffers, Memory};
use devshare_common::ring::{Ring, Signalled};
use devshare_common::warn_limited;
use virtio_queue::Queue;

use super::{Fabric, Link, Signals};
use crate::frame::{Frame, GuestFrame};
use crate::port::Port;
use crate::switch::{DropReason, Ingress, Verdict};
use crate::uplink::{SendOutcome, TxBatch, TX_HEAD_MAX};
use crate::virtio_net::{F_NEEDS_CSUM, HDR_LEN_LEGACY};

/// Frames taken from a TX ring before they are switched and sent.
const TX_BATCH: usize = 64;
/// Chains one pass takes at most before it yields: four rings of the largest size offered
/// (about half a millisecond of 64-byte frames here). Each yield costs a round through the
/// event loop; at 1024 that was about 4% more CPU per frame on a ring kept full.
const PASS_CHAINS: usize = 4096;
/// Descriptors one pass reads at most before it yields (refused chains count too): four per
/// chain of a full budget, more than real drivers use, while a ring of chains as long as the
/// queue allows yields after a few dozen of them.
const PASS_DESCRIPTORS: usize = 16 * 1024;

/// A guest's TX virtqueue as [`Fabric::transmit`] drives it: the queue's state, and the way
/// to interrupt the guest. The vhost-user layer implements it for its vring; tests for a
/// plain queue.
pub trait TxQueue {
    /// The queue (addresses, indices, EVENT_IDX); [`Fabric::transmit`] hands the indices back.
    fn queue_mut(&mut self) -> &mut Queue;
    /// Interrupts the guest: used buffers were returned and it asked to be told.
    fn interrupt(&mut self);
}

/// How a TX pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxEnd {
    /// The ring is drained and the guest's kicks are on again (or the ring is unusable until
    /// the guest resets it).
    Idle,
    /// The pass used its budget and chains may be left: the caller must make sure
    /// [`Fabric::transmit`] runs again soon (kick the queue itself) and meanwhile serve
    /// whatever else waits. Kicks are still off.
    Yielded,
}

/// Who sent each frame of a link batch, for counting the outcome.
struct Pending {
    port: usize,
    len: usize,
}

/// Frames bound for one host-side link, and who sent each.
#[derive(Default)]
struct LinkBatch {
    frames: TxBatch,
    pending: Vec<Pending>,
}

/// What one batch accumulates: frames for the links, and RX queues to interrupt.
#[derive(Default)]
struct Outbox {
    uplink: LinkBatch,
    host: LinkBatch,
    signals: Signals,
}

impl Outbox {
    fn batch(&mut self, link: Link) -> &mut LinkBatch {
        match link {
            Link::Uplink => &mut self.uplink,
            Link::Host => &mut self.host,
        }
    }
}

/// Frames of one batch bound for guest ports: (receiving port, frame).
type LocalBatch<'a, 'm> = Vec<(usize, Frame<'a, 'm>)>;

impl Fabric {
    /// One TX pass over guest port `from`'s TX queue of pair `pair`: takes the frames the guest
    /// queued (each starting with a virtio-net header of `hdr_len` bytes) from `queue`, whose
    /// rings are in `mem` and whose interrupt record is `signalled`, switches and delivers
    /// them, and returns the chains used. Bad input
    /// (malformed chains or frames, forged or tagged frames...) is dropped, counted on the port
    /// and logged at a bounded rate.
    pub fn transmit(
        &self,
        from: usize,
        pair: usize,
        hdr_len: usize,
        mem: &Memory,
        signalled: &Signalled,
        queue: &mut impl TxQueue,
    ) -> TxEnd {
        let Some(port) = self.ports.get(from) else {
            return TxEnd::Idle;
        };
        let name = &port.config.name;
        let mut ring = match Ring::open(queue.queue_mut(), mem, signalled) {
            Ok(r) => r,
            Err(e) => {
                port.counters.drops.bad_chain.inc();
                warn_limited!(port.warn, "{name}: TX ring unusable: {e}");
                return TxEnd::Idle;
            }
        };
        // Kicks off while draining; re-armed below, then re-checked for frames that raced in.
        ring.disable_kicks();
        let mut outbox = Outbox::default();
        // Parsed chains borrow `mem`; kept until their batch is forwarded, then completed.
        let mut parsed: Vec<GuestBuffers<'_>> = Vec::with_capacity(TX_BATCH);
        let mut heads = [0u16; TX_BATCH];
        let mut chains_left = PASS_CHAINS;
        let mut broken = None;
        let end = loop {
            let mut n = 0;
            while n < TX_BATCH && chains_left > 0 && ring.descriptors_read() < PASS_DESCRIPTORS {
                let head = match ring.pop() {
                    Ok(Some(head)) => head,
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                };
                heads[n] = head;
                n += 1;
                chains_left -= 1;
                let refused = match ring.chain_into(head, &mut parsed) {
                    Ok(()) if parsed.last().is_some_and(|b| b.writable_len() == 0) => None,
                    Ok(()) => {
                        parsed.pop();
                        Some("a device-writable buffer on a transmit chain".to_string())
                    }
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = refused {
                    port.counters.drops.bad_chain.inc();
                    warn_limited!(port.warn, "{name}: TX chain refused: {why}");
                }
            }
            if n > 0 {
                self.forward_batch(port, pair, hdr_len, &parsed, &mut outbox);
                parsed.clear();
                for &head in &heads[..n] {
                    // A head past the ring, which the guest invented and which was counted as
                    // a bad chain above, is not returned.
                    ring.push_used(head, 0);
                }
                ring.publish_used();
                outbox.signals.flush(&self.ports);
                if ring.needs_interrupt() {
                    queue.interrupt();
                }
            }
            if broken.is_some() {
                break TxEnd::Idle;
            }
            if chains_left == 0 || ring.descriptors_read() >= PASS_DESCRIPTORS {
                break TxEnd::Yielded;
            }
            if n == TX_BATCH {
                continue;
            }
            match ring.enable_kicks() {
                Ok(true) => ring.disable_kicks(),
                Ok(false) => break TxEnd::Idle,
                Err(e) => {
                    broken = Some(e);
                    break TxEnd::Idle;
                }
            }
        };
        if let Some(e) = broken {
            // A corrupt avail index: nothing sensible can be taken from this ring until the
            // guest resets it.
            port.counters.drops.bad_chain.inc();
            warn_limited!(port.warn, "{name}: TX ring unusable: {e}");
        }
        ring.finish(queue.queue_mut());
        end
    }

    /// Switches the frames of one batch and delivers them: to guests, then to the links.
    fn forward_batch(
        &self,
        port: &Port,
        pair: usize,
        hdr_len: usize,
        parsed: &[GuestBuffers<'_>],
        outbox: &mut Outbox,
    ) {
        // Room for every frame going to one or two guests without growing.
        let mut local = LocalBatch::with_capacity(2 * TX_BATCH);
        let (mut packets, mut bytes) = (0, 0);
        for bufs in parsed {
            if let Some(len) = self.forward_from_guest(port, bufs, hdr_len, outbox, &mut local) {
                packets += 1;
                bytes += len as u64;
            }
        }
        // Once per batch: these shared counters cost an atomic add each.
        port.counters.tx_packets.add(packets);
        port.counters.tx_bytes.add(bytes);
        self.deliver_local(pair, &mut local, &mut outbox.signals);
        drop(local);
        self.flush_link(Link::Uplink, &mut outbox.uplink);
        self.flush_link(Link::Host, &mut outbox.host);
    }

    /// Switches one frame from guest `port`: adds it to `local` for each guest it goes to and
    /// to the link batches it must leave through. Every decision reads the host copy of the
    /// frame's headers, and that copy is what goes out (see [`crate::frame`]). Returns the
    /// frame's length if it was a frame at all (counted as sent by the guest, whatever became
    /// of it).
    fn forward_from_guest<'a, 'm>(
        &self,
        port: &Port,
        bufs: &'a GuestBuffers<'m>,
        hdr_len: usize,
        outbox: &mut Outbox,
        local: &mut LocalBatch<'a, 'm>,
    ) -> Option<usize> {
        let (c, name) = (&port.counters, &port.config.name);
        let frame = match GuestFrame::parse(bufs, hdr_len) {
            Ok(f) => f,
            Err(_) => {
                c.drops.bad_frame.inc();
                warn_limited!(
                    port.warn,
                    "{name}: malformed frame ({} bytes with the header) dropped",
                    bufs.readable_len()
                );
                return None;
            }
        };
        if !frame.fits_mtu(self.mtu) {
            c.drops.oversize.inc();
            warn_limited!(
                port.warn,
                "{name}: frame of {} bytes (segments of {}) dropped: longer than the MTU {} \
                 allows",
                frame.len(),
                frame.hdr.gso_size,
                self.mtu
            );
            return Some(frame.len());
        }
        let ingress = Ingress::Port(port.index);
        let eth = frame.eth;
        match self
            .table
            .route(ingress, eth.src(), eth.dst(), eth.ethertype())
        {
            Verdict::Port(to) => local.push((to, frame.as_frame())),
            Verdict::Uplink => self.queue_link(Link::Uplink, port, &frame, outbox),
            Verdict::Host => self.queue_link(Link::Host, port, &frame, outbox),
            Verdict::Flood => {
                for to in 0..self.ports.len() {
                    if self.table.floods_to(ingress, to) {
                        local.push((to, frame.as_frame()));
                    }
                }
                self.queue_link(Link::Uplink, port, &frame, outbox);
                if self.table.floods_to_host(ingress) {
                    self.queue_link(Link::Host, port, &frame, outbox);
                }
            }
            Verdict::Drop(DropReason::Spoofed) => {
                c.drops.spoofed.inc();
                warn_limited!(
                    port.warn,
                    "{name}: frame from {} dropped: not the port's MAC {}",
                    eth.src(),
                    port.config.mac
                );
            }
            Verdict::Drop(DropReason::Tagged) => {
                c.drops.tagged.inc();
                warn_limited!(
                    port.warn,
                    "{name}: frame with its own VLAN tag (type {:#06x}) dropped: guests are on \
                     access ports",
                    eth.ethertype()
                );
            }
            Verdict::Drop(DropReason::LinkLocal) => {
                c.drops.link_local.inc();
                warn_limited!(
                    port.warn,
                    "{name}: frame to link-local group address {} dropped (STP, LACP, 802.1X \
                     and the like stay off the switch)",
                    eth.dst()
                );
            }
            Verdict::Drop(DropReason::Private) => c.drops.private.inc(),
            Verdict::Drop(DropReason::Hairpin) => c.drops.hairpin.inc(),
            Verdict::Drop(DropReason::NotForUs | DropReason::LocalSource) => {}
        }
        Some(frame.len())
    }

    /// Delivers the guest-to-guest frames of one batch: each receiving port's frames in one
    /// go, in the order they were sent.
    fn deliver_local(&self, pair: usize, local: &mut LocalBatch<'_, '_>, signals: &mut Signals) {
        // Stable: frames keep their order per receiver.
        local.sort_by_key(|(to, _)| *to);
        let mut group: Vec<Frame<'_, '_>> = Vec::with_capacity(local.len().min(TX_BATCH));
        let mut rest = &local[..];
        while let Some(&(to, _)) = rest.first() {
            let n = rest.iter().take_while(|(t, _)| *t == to).count();
            group.clear();
            group.extend(rest[..n].iter().map(|(_, f)| *f));
            if let Some(q) = self
                .ports
                .get(to)
                .and_then(|p| p.receive_batch(pair, &group))
            {
                signals.add(to, q);
            }
            rest = &rest[n..];
        }
        local.clear();
    }

    /// Adds a guest frame to `link`'s batch: the host copy of the virtio-net header and the
    /// Ethernet header (tagged with the sender's VLAN on the uplink, if it has one), then the
    /// rest of the frame where it is in guest memory.
    fn queue_link(&self, link: Link, port: &Port, frame: &GuestFrame<'_, '_>, outbox: &mut Outbox) {
        let vlan = match link {
            Link::Uplink => self.table.vlan_of(port.index),
            Link::Host => None,
        };
        let mut h = frame.hdr;
        h.num_buffers = 0;
        if vlan.is_some() {
            // Offsets in the header count from the frame start; the tag shifts them.
            if h.flags & F_NEEDS_CSUM != 0 {
                h.csum_start = h.csum_start.saturating_add(4);
            }
            if h.hdr_len != 0 {
                h.hdr_len = h.hdr_len.saturating_add(4);
            }
        }
        let eth = &frame.eth.0;
        let mut head = [0u8; TX_HEAD_MAX];
        head[..HDR_LEN_LEGACY].copy_from_slice(&h.to_bytes()[..HDR_LEN_LEGACY]);
        let mut n = HDR_LEN_LEGACY;
        head[n..n + 12].copy_from_slice(&eth[..12]);
        n += 12;
        if let Some(vid) = vlan {
            head[n..n + 4].copy_from_slice(&[0x81, 0x00, (vid >> 8) as u8, vid as u8]);
            n += 4;
        }
        head[n..n + 2].copy_from_slice(&eth[12..]);
        n += 2;
        let batch = outbox.batch(link);
        let body = frame.bufs.readable_iovecs(frame.body, usize::MAX);
        if !batch.frames.push(&head[..n], body) {
            port.counters.drops.bad_frame.inc();
            warn_limited!(
                port.warn,
                "{}: frame in too many pieces for the host to send dropped",
                port.config.name
            );
            return;
        }
        batch.pending.push(Pending {
            port: port.index,
            len: frame.len(),
        });
    }

    /// Sends a link's batch and counts the outcome on each sending port and on the link.
    /// Runs while the guest memory the batch points into is still borrowed.
    fn flush_link(&self, link: Link, batch: &mut LinkBatch) {
        if batch.frames.is_empty() {
            return;
        }
        let Some(l) = self.link(link) else {
            batch.pending.clear();
            batch.frames = TxBatch::new();
            return;
        };
        l.io.send(&mut batch.frames);
        for (p, outcome) in batch.pending.iter().zip(batch.frames.outcomes()) {
            let Some(port) = self.ports.get(p.port) else {
                continue;
            };
            let d = &port.counters.drops;
            match (outcome, link) {
                (SendOutcome::Sent, _) => {
                    l.counters.tx_packets.inc();
                    l.counters.tx_bytes.add(p.len as u64);
                }
                (SendOutcome::Busy, Link::Uplink) => d.uplink_busy.inc(),
                (SendOutcome::Busy, Link::Host) => d.host_busy.inc(),
                (SendOutcome::Refused, _) => {
                    match link {
                        Link::Uplink => d.uplink_refused.inc(),
                        Link::Host => d.host_refused.inc(),
                    }
                    warn_limited!(
                        port.warn,
                        "{}: {} refused a frame (e.g. a bad offload request)",
                        port.config.name,
                        l.io.describe()
                    );
                }
            }
        }
        batch.pending.clear();
        batch.frames = TxBatch::new();
    }
}
