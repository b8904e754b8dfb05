//! The running switch: guest ports, the uplink, the optional host port and the table that
//! decides between them. Guest TX workers call [`Fabric::forward_from_guest`] for each frame
//! they take; one thread per host-side link runs [`Fabric::run_link_rx`] for frames arriving
//! from it.

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

/// Frames bound for one host-side link, and who sent each.
#[derive(Default)]
struct LinkBatch {
    frames: TxBatch,
    pending: Vec<PendingUplink>,
}

/// What a TX worker accumulates over one batch: frames for the uplink and the host port, and
/// RX queues to interrupt.
#[derive(Default)]
pub struct Outbox {
    uplink: LinkBatch,
    host: LinkBatch,
    /// RX queues that received frames.
    pub signals: Signals,
}

/// The two host-side links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The shared NIC (or TAP) towards the outside.
    Uplink,
    /// The TAP through which the host itself reaches the guests.
    Host,
}

/// The host port: a TAP whose other end is the host's own network stack.
pub struct HostPort {
    /// The TAP device.
    pub tap: Box<dyn Uplink>,
    /// Its counters (tx: towards the host, rx: from the host).
    pub stats: UplinkStats,
}

/// Ports, uplink, host port and switch table.
pub struct Fabric {
    /// Switching policy and MAC table.
    pub table: SwitchTable,
    /// Guest ports, by index.
    pub ports: Vec<Arc<Port>>,
    /// The shared host link.
    pub uplink: Box<dyn Uplink>,
    /// Uplink counters.
    pub uplink_stats: UplinkStats,
    /// The host port, if configured.
    pub host: Option<HostPort>,
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
            Verdict::Host => queue_link(from, bufs, hdr_len, &hdr, None, &mut outbox.host),
            Verdict::Flood => {
                for to in 0..self.ports.len() {
                    if self.table.floods_to(ingress, to) {
                        local.0.push((to, frame));
                    }
                }
                self.queue_uplink(from, bufs, hdr_len, &hdr, outbox);
                if self.table.floods_to_host(ingress) {
                    queue_link(from, bufs, hdr_len, &hdr, None, &mut outbox.host);
                }
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

    /// Adds a guest frame to the uplink batch, tagged with the sender's VLAN if it has one.
    fn queue_uplink(
        &self,
        from: usize,
        bufs: &GuestBuffers<'_>,
        hdr_len: usize,
        hdr: &NetHdr,
        outbox: &mut Outbox,
    ) {
        let vlan = self.table.vlan_of(from);
        queue_link(from, bufs, hdr_len, hdr, vlan, &mut outbox.uplink);
    }

    /// Sends the batches built by [`Fabric::forward_from_guest`] and counts the outcome on
    /// each sending port and on the link.
    /// Must run while the guest memory the batches point into is still borrowed.
    pub fn flush_links(&self, outbox: &mut Outbox) {
        self.flush_link(Link::Uplink, &mut outbox.uplink);
        self.flush_link(Link::Host, &mut outbox.host);
    }

    fn flush_link(&self, link: Link, batch: &mut LinkBatch) {
        if batch.frames.is_empty() {
            return;
        }
        let Some((io, stats)) = self.link(link) else {
            batch.pending.clear();
            batch.frames = TxBatch::new();
            return;
        };
        io.send(&mut batch.frames);
        for (p, outcome) in batch.pending.iter().zip(batch.frames.outcomes()) {
            let Some(port) = self.ports.get(p.port) else {
                continue;
            };
            match (outcome, link) {
                (SendOutcome::Sent, _) => {
                    stats.tx_packets.inc();
                    stats.tx_bytes.add(p.len as u64);
                }
                (SendOutcome::Busy, Link::Uplink) => port.stats.drop_uplink_busy.inc(),
                (SendOutcome::Refused, Link::Uplink) => port.stats.drop_uplink_refused.inc(),
                (SendOutcome::Busy, Link::Host) => port.stats.drop_host_busy.inc(),
                (SendOutcome::Refused, Link::Host) => port.stats.drop_host_refused.inc(),
            }
        }
        batch.pending.clear();
        batch.frames = TxBatch::new();
    }

    /// The device and counters of a host-side link (`None`: no host port configured).
    fn link(&self, link: Link) -> Option<(&dyn Uplink, &UplinkStats)> {
        match link {
            Link::Uplink => Some((&*self.uplink, &self.uplink_stats)),
            Link::Host => self.host.as_ref().map(|h| (&*h.tap, &h.stats)),
        }
    }

    /// Reads frames from `link` and delivers them until `stop` is signalled. Sleeps in `poll`
    /// while there is nothing to read. Returns at once if `link` is not configured.
    pub fn run_link_rx(&self, link: Link, stop: &EventFd) -> io::Result<()> {
        let Some((io, stats)) = self.link(link) else {
            return Ok(());
        };
        let mut batch = RxBatch::new();
        let mut signals = Signals::default();
        let mut fds = [
            libc::pollfd {
                fd: io.raw_fd(),
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
                let n = match io.recv(&mut batch) {
                    Ok(n) => n,
                    Err(e) => {
                        stats.rx_errors.inc();
                        log::warn!("{}: receive error: {e}", io.describe());
                        0
                    }
                };
                for i in 0..n {
                    if let Some(f) = batch.frame(i) {
                        self.forward_from_link(link, f.hdr, f.vlan, f.data, &mut signals);
                    } else {
                        stats.rx_bad_frame.inc();
                    }
                }
                signals.flush(&self.ports);
                if n < crate::uplink::RX_BATCH {
                    break;
                }
            }
        }
    }

    /// Switches one frame that arrived on a host-side link.
    pub fn forward_from_link(
        &self,
        link: Link,
        mut hdr: NetHdr,
        vlan: Option<u16>,
        data: &mut [u8],
        signals: &mut Signals,
    ) {
        let Some((_, st)) = self.link(link) else {
            return;
        };
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
        let ingress = match link {
            Link::Uplink => Ingress::Uplink { vlan },
            // The host port is untagged; a tagged frame from the host is for no guest.
            Link::Host if vlan.is_some() => {
                st.rx_not_for_us.inc();
                return;
            }
            Link::Host => Ingress::Host,
        };
        let verdict = self.table.route(ingress, src, dst);
        if link == Link::Host
            && verdict != Verdict::Drop(DropReason::LocalSource)
            && self.table.follow_host_mac(src)
        {
            log::info!("host port now carries MAC {src}");
        }
        match verdict {
            Verdict::Port(to) => self.deliver(to, hint, &frame, signals),
            Verdict::Flood => {
                for to in 0..self.ports.len() {
                    if self.table.floods_to(ingress, to) {
                        self.deliver(to, hint, &frame, signals);
                    }
                }
            }
            Verdict::Uplink | Verdict::Host => {}
            Verdict::Drop(DropReason::LocalSource) => st.rx_local_source.inc(),
            Verdict::Drop(_) => st.rx_not_for_us.inc(),
        }
    }

    /// All counters as one JSON document.
    pub fn snapshot(&self) -> Value {
        let mut doc = json!({
            "uplink": link_snapshot(&*self.uplink, &self.uplink_stats),
            "ports": self.ports.iter().map(|p| p.snapshot()).collect::<Vec<_>>(),
        });
        if let Some(h) = &self.host {
            let mut host = link_snapshot(&*h.tap, &h.stats);
            if let Some(mac) = self.table.host_mac() {
                host["mac"] = json!(mac.to_string());
            }
            doc["host"] = host;
        }
        doc
    }
}

fn link_snapshot(io: &dyn Uplink, u: &UplinkStats) -> Value {
    json!({
        "name": io.describe(),
        "tx_packets": u.tx_packets.get(),
        "tx_bytes": u.tx_bytes.get(),
        "rx_packets": u.rx_packets.get(),
        "rx_bytes": u.rx_bytes.get(),
        "rx_not_for_us": u.rx_not_for_us.get(),
        "rx_local_source": u.rx_local_source.get(),
        "rx_bad_frame": u.rx_bad_frame.get(),
        "rx_errors": u.rx_errors.get(),
    })
}

/// Adds a guest frame to a link's batch: our header first (with a VLAN tag inserted after the
/// MAC addresses if `vlan` is set), then the guest's bytes where they are.
fn queue_link(
    from: usize,
    bufs: &GuestBuffers<'_>,
    hdr_len: usize,
    hdr: &NetHdr,
    vlan: Option<u16>,
    batch: &mut LinkBatch,
) {
    let frame_len = bufs.readable_len() - hdr_len;
    let mut h = *hdr;
    h.num_buffers = 0;
    let mut head = [0u8; HDR_LEN_LEGACY + 12 + 4];
    let (head_len, guest_from) = match vlan {
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
    batch.frames.push(
        &head[..head_len],
        bufs.readable_iovecs(guest_from, usize::MAX),
    );
    batch.pending.push(PendingUplink {
        port: from,
        len: frame_len,
    });
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
