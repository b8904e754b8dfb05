//! The AF_PACKET uplink: a raw socket on an existing interface, promiscuous, with virtio-net
//! headers and the kernel's VLAN metadata, batched with `sendmmsg`/`recvmmsg`.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::sys::{cvt, is_would_block, setsockopt, setup_err};
use super::{RxBatch, SendOutcome, TxBatch, Uplink, UplinkError, VlanTag};
use crate::frame::ETH_P_8021Q;

/// An AF_PACKET raw socket bound to one interface, promiscuous, with virtio-net headers,
/// batched with `sendmmsg`/`recvmmsg`.
pub struct AfPacket {
    name: String,
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl AfPacket {
    /// Opens the socket on interface `name`.
    pub fn open(name: &str) -> Result<AfPacket, UplinkError> {
        let cname = CString::new(name).map_err(|_| UplinkError::NoSuchInterface(name.into()))?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(UplinkError::NoSuchInterface(name.into()));
        }
        // SAFETY: plain socket creation; the result is checked before use.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        })
        .map_err(setup_err(name, "socket(AF_PACKET)"))?;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // The header must be enabled before binding; it tells us about (and lets us hand
        // over) checksum and segmentation offloads.
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)
            .map_err(setup_err(name, "PACKET_VNET_HDR"))?;
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_AUXDATA, &one)
            .map_err(setup_err(name, "PACKET_AUXDATA"))?;
        // Our own transmissions must not come back as received frames.
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)
            .map_err(setup_err(name, "PACKET_IGNORE_OUTGOING"))?;
        // Skipping the qdisc makes a full device queue show up as EAGAIN right away.
        if let Err(e) = setsockopt(raw, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one) {
            log::debug!("{name}: PACKET_QDISC_BYPASS unavailable: {e}");
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and its size is passed.
        cvt(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(setup_err(name, "bind"))?;
        // SAFETY: packet_mreq is plain data; all-zero is a valid starting value.
        let mut mreq: libc::packet_mreq = unsafe { mem::zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .map_err(setup_err(name, "promiscuous mode"))?;
        Ok(AfPacket {
            name: name.into(),
            fd,
        })
    }
}

impl Uplink for AfPacket {
    fn describe(&self) -> String {
        format!("af-packet:{}", self.name)
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn send(&self, batch: &mut TxBatch) {
        let n = batch.len();
        batch.outcomes.clear();
        batch.outcomes.resize(n, SendOutcome::Busy);
        if n == 0 {
            return;
        }
        let mut iovs = batch.frame_iovecs();
        // SAFETY: mmsghdr is plain data; all-zero is valid (no name, no control).
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = v.as_mut_ptr();
            m.msg_hdr.msg_iovlen = v.len();
        }
        let mut i = 0;
        while i < n {
            let rest = &mut msgs[i..];
            // SAFETY: every message points at iovecs that live in `iovs` for this call and
            // cover host header bytes in `batch` and guest memory the caller keeps mapped.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                for o in &mut batch.outcomes[i..i + r as usize] {
                    *o = SendOutcome::Sent;
                }
                i += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if r == 0 || is_would_block(&e) {
                // The rest stay `Busy`.
                break;
            }
            // sendmmsg reports an error only for the first message it could not send.
            log::debug!("{}: frame refused: {e}", self.name);
            batch.outcomes[i] = SendOutcome::Refused;
            i += 1;
        }
    }

    fn recv(&self, batch: &mut RxBatch) -> io::Result<usize> {
        const CMSG_SPACE: usize = 64;
        let n = batch.bufs.len();
        let mut iovs: Vec<libc::iovec> = batch
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut ctl = vec![[0u64; CMSG_SPACE / 8]; n];
        // SAFETY: mmsghdr is plain data; all-zero is valid.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
        for ((m, v), c) in msgs.iter_mut().zip(iovs.iter_mut()).zip(ctl.iter_mut()) {
            m.msg_hdr.msg_iov = v as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = c.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = CMSG_SPACE;
        }
        // SAFETY: each message describes one host buffer of `batch` and one control buffer
        // of `ctl`, both alive and exclusively borrowed for the call.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        batch.count = 0;
        if r < 0 {
            let e = io::Error::last_os_error();
            return if is_would_block(&e) { Ok(0) } else { Err(e) };
        }
        let got = r as usize;
        for (i, m) in msgs.iter().enumerate().take(got) {
            let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            batch.lens[i] = if truncated { 0 } else { m.msg_len as usize };
            batch.tags[i] = tag_from_cmsg(&m.msg_hdr);
        }
        batch.count = got;
        Ok(got)
    }
}

/// Reads the VLAN tag the kernel moved out of the frame from a PACKET_AUXDATA message.
fn tag_from_cmsg(hdr: &libc::msghdr) -> Option<VlanTag> {
    // SAFETY: `hdr` is a msghdr the kernel just filled; CMSG_FIRSTHDR/NXTHDR stay within
    // `msg_controllen` of the control buffer it points at.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a complete cmsghdr inside the buffer.
        let cm = unsafe { &*c };
        if cm.cmsg_level == libc::SOL_PACKET && cm.cmsg_type == libc::PACKET_AUXDATA {
            // SAFETY: the kernel writes a whole tpacket_auxdata after a PACKET_AUXDATA header;
            // read_unaligned because control data has only cmsg alignment.
            let aux: libc::tpacket_auxdata =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
                return None;
            }
            // Kernels before 4.0 report no TPID: they only took C-tags off.
            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                aux.tp_vlan_tpid
            } else {
                ETH_P_8021Q
            };
            return Some(VlanTag {
                tpid,
                vid: aux.tp_vlan_tci & 0x0fff,
            });
        }
        // SAFETY: as above, NXTHDR returns null past the end.
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
    None
}
