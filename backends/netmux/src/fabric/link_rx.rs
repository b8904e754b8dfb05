//! Frames arriving from a host-side link (the uplink or the host port): one thread per link
//! reads them in batches into host memory and writes each into the guests it is for.

use std::io;
use std::os::fd::AsRawFd;

use devshare_common::warn_limited;
use vmm_sys_util::eventfd::EventFd;

use super::{Fabric, Link, Signals};
use crate::config::MacAddr;
use crate::frame::{Frame, Payload, ETH_HLEN, ETH_P_8021Q, VLAN_TPIDS};
use crate::switch::{DropReason, Ingress, Verdict};
use crate::uplink::{RxBatch, VlanTag, RX_BATCH};
use crate::virtio_net::{NetHdr, F_NEEDS_CSUM};

impl Fabric {
    /// Reads frames from `link` and delivers them until `stop` is signalled. Sleeps in `poll`
    /// while there is nothing to read. Returns at once if `link` is not configured.
    pub fn run_link_rx(&self, link: Link, stop: &EventFd) -> io::Result<()> {
        let Some(l) = self.link(link) else {
            return Ok(());
        };
        let mut batch = RxBatch::new();
        let mut signals = Signals::default();
        let mut fds = [
            libc::pollfd {
                fd: l.io.raw_fd(),
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
                let n = match l.io.recv(&mut batch) {
                    Ok(n) => n,
                    Err(e) => {
                        l.counters.rx_errors.inc();
                        warn_limited!(l.warn, "{}: receive error: {e}", l.io.describe());
                        0
                    }
                };
                for i in 0..n {
                    if let Some(f) = batch.frame(i) {
                        self.forward_from_link(link, f.hdr, f.tag, f.data, &mut signals);
                    } else {
                        l.counters.rx_bad_frame.inc();
                    }
                }
                signals.flush(&self.ports);
                if n < RX_BATCH {
                    break;
                }
            }
        }
    }

    /// Switches one frame that arrived on a host-side link: `tag` is the tag the kernel took
    /// off (an inline tag is taken off here), `data` the Ethernet frame.
    ///
    /// Guest ports are access ports: a frame reaches one only with at most one tag, an 802.1Q
    /// C-tag naming the port's VLAN (or none for an untagged port), and leaves it untagged.
    /// Exactly that tag is taken off. A frame whose outer tag is an S-tag (802.1ad, QinQ) or
    /// that still carries a tag once the C-tag is off is dropped and counted (`rx_s_tagged`,
    /// `rx_double_tagged`): delivered, the guest would get a tagged frame it never asked for,
    /// and an untagged guest would see another customer's service VLAN.
    pub(super) fn forward_from_link(
        &self,
        link: Link,
        mut hdr: NetHdr,
        tag: Option<VlanTag>,
        data: &mut [u8],
        signals: &mut Signals,
    ) {
        let Some(l) = self.link(link) else {
            return;
        };
        let st = &l.counters;
        if data.len() < ETH_HLEN {
            st.rx_bad_frame.inc();
            return;
        }
        let mut data: &mut [u8] = data;
        let outer_tpid = |data: &[u8]| u16::from_be_bytes([data[12], data[13]]);
        let mut tag = tag;
        if tag.is_none() && outer_tpid(data) == ETH_P_8021Q {
            if data.len() < ETH_HLEN + 4 {
                st.rx_bad_frame.inc();
                return;
            }
            tag = Some(VlanTag {
                tpid: ETH_P_8021Q,
                vid: u16::from_be_bytes([data[14], data[15]]) & 0x0fff,
            });
            // Guests see untagged frames: move the MACs over the tag.
            data.copy_within(0..12, 4);
            data = &mut data[4..];
            if hdr.flags & F_NEEDS_CSUM != 0 {
                hdr.csum_start = hdr.csum_start.saturating_sub(4);
            }
            hdr.hdr_len = hdr.hdr_len.saturating_sub(4);
        }
        if tag.is_some_and(|t| t.tpid != ETH_P_8021Q)
            || (tag.is_none() && VLAN_TPIDS.contains(&outer_tpid(data)))
        {
            st.rx_s_tagged.inc();
            return;
        }
        if VLAN_TPIDS.contains(&outer_tpid(data)) {
            st.rx_double_tagged.inc();
            return;
        }
        // VLAN id 0 is a priority tag: the frame is in no VLAN.
        let vlan = tag.map(|t| t.vid).filter(|&v| v != 0);
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
        let verdict = self.table.route(ingress, src, dst, ethertype);
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
}

/// Picks an RX queue for a frame from a link so one flow stays on one queue: IPv4 and IPv6
/// addresses plus the first four bytes after the IP header (the ports for TCP and UDP).
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
