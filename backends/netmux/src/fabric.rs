//! The running switch: guest ports, the uplink and the table that decides between them. Guest
//! TX workers call [`Fabric::forward_from_guest`] for each frame they take; one thread runs
//! [`Fabric::run_uplink_rx`] for frames arriving from the host side.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use devshare_common::chain::GuestBuffers;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::config::MacAddr;
use crate::port::{Frame, Payload, Port};
use crate::switch::{DropReason, Ingress, SwitchTable, Verdict};
use crate::uplink::{RxBatch, SendOutcome, TxBatch, Uplink, UplinkStats};
use crate::virtio_net::{NetHdr, F_NEEDS_CSUM, GSO_NONE, HDR_LEN_LEGACY};

/// Ethernet header: two MACs and the type.
const ETH_HLEN: usize = 14;
const ETH_P_8021Q: u16 = 0x8100;
/// Largest frame a guest may send: a 64 KiB segment plus Ethernet and VLAN headers.
pub const MAX_GUEST_FRAME: usize = 65536 + ETH_HLEN + 4;

/// RX queues to interrupt once a batch is done: (port, queue), without repeats.
#[derive(Default)]
pub struct Signals(Vec<(usize, usize)>);

impl Signals {
    /// Remembers that `port`'s RX queue `q` got frames.
    pub fn add(&mut self, port: usize, q: usize) {
        if !self.0.contains(&(port, q)) {
            self.0.push((port, q));
        }
    }

    /// Interrupts every remembered queue that asked for it, and forgets them.
    pub fn flush(&mut self, ports: &[Arc<Port>]) {
        for (p, q) in self.0.drain(..) {
            if let Some(port) = ports.get(p) {
                port.signal(q);
            }
        }
    }
}

/// Frames of one TX batch bound for guest ports: (receiving port, frame).
#[derive(Default)]
pub struct LocalBatch<'a, 'm>(pub Vec<(usize, Frame<'a, 'm>)>);

/// Who sent each frame of an uplink batch, for counting the outcome.
struct PendingUplink {
    port: usize,
    len: usize,
}

/// What a TX worker accumulates over one batch: frames for the uplink and RX queues to
/// interrupt.
#[derive(Default)]
pub struct Outbox {
    uplink: TxBatch,
    pending: Vec<PendingUplink>,
    /// RX queues that received frames.
    pub signals: Signals,
}

/// Ports, uplink and switch table.
pub struct Fabric {
    /// Switching policy and MAC table.
    pub table: SwitchTable,
    /// Guest ports, by index.
    pub ports: Vec<Arc<Port>>,
    /// The shared host link.
    pub uplink: Box<dyn Uplink>,
    /// Uplink counters.
    pub uplink_stats: UplinkStats,
}

impl Fabric {
    /// Forwards one frame from guest port `from`: adds it to `local` for each guest it goes to
    /// (see [`Fabric::deliver_local`]) and to `outbox` if it must leave through the uplink.
    /// `hdr_len` is the sender's virtio-net header length.
    pub fn forward_from_guest<'a, 'm>(
        &self,
        from: usize,
        bufs: &'a GuestBuffers<'m>,
        hdr_len: usize,
        outbox: &mut Outbox,
        local: &mut LocalBatch<'a, 'm>,
    ) {
        let Some(port) = self.ports.get(from) else {
            return;
        };
        let stats = &port.stats;
        let mut head = [0u8; 12 + ETH_HLEN];
        let frame_len = bufs.readable_len().saturating_sub(hdr_len);
        if bufs.readable_len() < hdr_len + ETH_HLEN
            || frame_len > MAX_GUEST_FRAME
            || bufs.read_at(0, &mut head[..hdr_len + ETH_HLEN]) != hdr_len + ETH_HLEN
        {
            stats.drop_bad_frame.inc();
            return;
        }
        let hdr = NetHdr::from_bytes(&head[..hdr_len]);
        if !hdr.csum_in_bounds(frame_len)
            || (hdr.gso_type != GSO_NONE && (hdr.gso_size == 0 || hdr.flags & F_NEEDS_CSUM == 0))
        {
            stats.drop_bad_frame.inc();
            return;
        }
        let eth = &head[hdr_len..hdr_len + ETH_HLEN];
        let (Some(dst), Some(src)) = (MacAddr::from_slice(eth), MacAddr::from_slice(&eth[6..]))
        else {
            stats.drop_bad_frame.inc();
            return;
        };
        let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
        stats.tx_packets.inc();
        stats.tx_bytes.add(frame_len as u64);

        let frame = Frame {
            hdr,
            ethertype,
            payload: Payload::Guest {
                bufs,
                offset: hdr_len,
            },
        };
        let ingress = Ingress::Port(from);
        match self.table.route(ingress, src, dst) {
            Verdict::Port(to) => local.0.push((to, frame)),
            Verdict::Uplink => self.queue_uplink(from, bufs, hdr_len, &hdr, outbox),
            Verdict::Flood => {
                for to in 0..self.ports.len() {
                    if self.table.floods_to(ingress, to) {
                        local.0.push((to, frame));
                    }
                }
                self.queue_uplink(from, bufs, hdr_len, &hdr, outbox);
            }
            Verdict::Drop(reason) => match reason {
                DropReason::Spoofed => stats.drop_spoofed.inc(),
                DropReason::Private => stats.drop_private.inc(),
                DropReason::Hairpin => stats.drop_hairpin.inc(),
                DropReason::NotForUs | DropReason::LocalSource => {}
            },
        }
    }

    fn deliver(&self, to: usize, hint: usize, frame: &Frame<'_, '_>, signals: &mut Signals) {
        if let Some(p) = self.ports.get(to) {
            if let Some(q) = p.receive_batch(hint, std::slice::from_ref(frame)) {
                signals.add(to, q);
            }
        }
    }

    /// Delivers the guest-to-guest frames of one TX batch: each receiving port's frames in
    /// one go, in the order they were sent.
    pub fn deliver_local(
        &self,
        pair: usize,
        local: &mut LocalBatch<'_, '_>,
        signals: &mut Signals,
    ) {
        let frames = &mut local.0;
        // Stable: frames keep their order per receiver.
        frames.sort_by_key(|(to, _)| *to);
        let mut group: Vec<Frame<'_, '_>> = Vec::with_capacity(frames.len());
        let mut rest = &frames[..];
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
        frames.clear();
    }

    /// Adds a guest frame to the uplink batch: our header first (with a VLAN tag inserted after
    /// the MAC addresses if the port has one), then the guest's bytes where they are.
    fn queue_uplink(
        &self,
        from: usize,
        bufs: &GuestBuffers<'_>,
        hdr_len: usize,
        hdr: &NetHdr,
        outbox: &mut Outbox,
    ) {
        let frame_len = bufs.readable_len() - hdr_len;
        let mut h = *hdr;
        h.num_buffers = 0;
        let mut head = [0u8; HDR_LEN_LEGACY + 12 + 4];
        let (head_len, guest_from) = match self.table.vlan_of(from) {
            None => {
                head[..HDR_LEN_LEGACY].copy_from_slice(&h.to_bytes()[..HDR_LEN_LEGACY]);
                (HDR_LEN_LEGACY, hdr_len)
            }
            Some(vid) => {
                // Offsets in the header count from the frame start; the tag shifts them.
                if h.flags & F_NEEDS_CSUM != 0 {
                    h.csum_start = h.csum_start.saturating_add(4);
                }
                if h.hdr_len != 0 {
                    h.hdr_len = h.hdr_len.saturating_add(4);
                }
                head[..HDR_LEN_LEGACY].copy_from_slice(&h.to_bytes()[..HDR_LEN_LEGACY]);
                let macs = &mut head[HDR_LEN_LEGACY..HDR_LEN_LEGACY + 12];
                bufs.read_at(hdr_len, macs);
                head[HDR_LEN_LEGACY + 12..].copy_from_slice(&[
                    (ETH_P_8021Q >> 8) as u8,
                    ETH_P_8021Q as u8,
                    (vid >> 8) as u8,
                    vid as u8,
                ]);
                (head.len(), hdr_len + 12)
            }
        };
        outbox.uplink.push(
            &head[..head_len],
            bufs.readable_iovecs(guest_from, usize::MAX),
        );
        outbox.pending.push(PendingUplink {
            port: from,
            len: frame_len,
        });
    }

    /// Sends a batch built by [`Fabric::forward_from_guest`] and counts the outcome on each
    /// sending port and on the uplink.
    /// Must run while the guest memory the batch points into is still borrowed.
    pub fn flush_uplink(&self, outbox: &mut Outbox) {
        if outbox.uplink.is_empty() {
            return;
        }
        self.uplink.send(&mut outbox.uplink);
        for (p, outcome) in outbox.pending.iter().zip(outbox.uplink.outcomes()) {
            let Some(port) = self.ports.get(p.port) else {
                continue;
            };
            match outcome {
                SendOutcome::Sent => {
                    self.uplink_stats.tx_packets.inc();
                    self.uplink_stats.tx_bytes.add(p.len as u64);
                }
                SendOutcome::Busy => port.stats.drop_uplink_busy.inc(),
                SendOutcome::Refused => port.stats.drop_uplink_refused.inc(),
            }
        }
        outbox.pending.clear();
        outbox.uplink = TxBatch::new();
    }

    /// Reads frames from the uplink and delivers them until `stop` is signalled. Sleeps in
    /// `poll` while there is nothing to read.
    pub fn run_uplink_rx(&self, stop: &EventFd) -> io::Result<()> {
        let mut batch = RxBatch::new();
        let mut signals = Signals::default();
        let mut fds = [
            libc::pollfd {
                fd: self.uplink.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            // Drain what is there, batch by batch, then go back to sleep.
            loop {
                let n = match self.uplink.recv(&mut batch) {
                    Ok(n) => n,
                    Err(e) => {
                        self.uplink_stats.rx_errors.inc();
                        log::warn!("{}: receive error: {e}", self.uplink.describe());
                        0
                    }
                };
                for i in 0..n {
                    if let Some(f) = batch.frame(i) {
                        self.forward_from_uplink(f.hdr, f.vlan, f.data, &mut signals);
                    } else {
                        self.uplink_stats.rx_bad_frame.inc();
                    }
                }
                signals.flush(&self.ports);
                if n < crate::uplink::RX_BATCH {
                    break;
                }
            }
        }
    }

    /// Switches one frame that arrived on the uplink.
    pub fn forward_from_uplink(
        &self,
        mut hdr: NetHdr,
        vlan: Option<u16>,
        data: &mut [u8],
        signals: &mut Signals,
    ) {
        let st = &self.uplink_stats;
        if data.len() < ETH_HLEN {
            st.rx_bad_frame.inc();
            return;
        }
        let mut vlan = vlan;
        let mut data: &mut [u8] = data;
        if vlan.is_none() && u16::from_be_bytes([data[12], data[13]]) == ETH_P_8021Q {
            if data.len() < ETH_HLEN + 4 {
                st.rx_bad_frame.inc();
                return;
            }
            let vid = u16::from_be_bytes([data[14], data[15]]) & 0x0fff;
            vlan = (vid != 0).then_some(vid);
            // Guests see untagged frames: move the MACs over the tag.
            data.copy_within(0..12, 4);
            data = &mut data[4..];
            if hdr.flags & F_NEEDS_CSUM != 0 {
                hdr.csum_start = hdr.csum_start.saturating_sub(4);
            }
            hdr.hdr_len = hdr.hdr_len.saturating_sub(4);
        }
        st.rx_packets.inc();
        st.rx_bytes.add(data.len() as u64);
        let (Some(dst), Some(src)) = (MacAddr::from_slice(data), MacAddr::from_slice(&data[6..]))
        else {
            st.rx_bad_frame.inc();
            return;
        };
        if !hdr.csum_in_bounds(data.len()) {
            st.rx_bad_frame.inc();
            return;
        }
        let ethertype = u16::from_be_bytes([data[12], data[13]]);
        let hint = flow_hash(data);
        let frame = Frame {
            hdr,
            ethertype,
            payload: Payload::Host(data),
        };
        let ingress = Ingress::Uplink { vlan };
        match self.table.route(ingress, src, dst) {
            Verdict::Port(to) => self.deliver(to, hint, &frame, signals),
            Verdict::Flood => {
                for to in 0..self.ports.len() {
                    if self.table.floods_to(ingress, to) {
                        self.deliver(to, hint, &frame, signals);
                    }
                }
            }
            Verdict::Uplink => {}
            Verdict::Drop(DropReason::LocalSource) => st.rx_local_source.inc(),
            Verdict::Drop(_) => st.rx_not_for_us.inc(),
        }
    }

    /// All counters as one JSON document.
    pub fn snapshot(&self) -> Value {
        let u = &self.uplink_stats;
        json!({
            "uplink": {
                "name": self.uplink.describe(),
                "tx_packets": u.tx_packets.get(),
                "tx_bytes": u.tx_bytes.get(),
                "rx_packets": u.rx_packets.get(),
                "rx_bytes": u.rx_bytes.get(),
                "rx_not_for_us": u.rx_not_for_us.get(),
                "rx_local_source": u.rx_local_source.get(),
                "rx_bad_frame": u.rx_bad_frame.get(),
                "rx_errors": u.rx_errors.get(),
            },
            "ports": self.ports.iter().map(|p| p.snapshot()).collect::<Vec<_>>(),
        })
    }
}

/// Picks an RX queue for a frame from the uplink so one flow stays on one queue: IPv4 and
/// IPv6 addresses plus the first four bytes after the IP header (the ports for TCP and UDP).
fn flow_hash(frame: &[u8]) -> usize {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let key: &[u8] = match ethertype {
        0x0800 if frame.len() >= 34 => {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let end = (14 + ihl + 4).min(frame.len());
            let mut k = [0u8; 12];
            k[..8].copy_from_slice(&frame[26..34]);
            if 14 + ihl + 4 <= end {
                k[8..].copy_from_slice(&frame[14 + ihl..end]);
            }
            return fnv(&k);
        }
        0x86dd if frame.len() >= 58 => &frame[22..58],
        _ => &frame[..12],
    };
    fnv(key)
}

fn fnv(data: &[u8]) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h as usize
}
