//! The front-end message relay every connection goes through.
//!
//! QEMU sends `SET_VRING_ENABLE` as soon as it connects (vhost-user-net when the NIC attaches
//! its queue pairs, the generic vhost-user device while it initialises), before
//! `SET_FEATURES`. The vhost crate refuses that message until `VHOST_USER_F_PROTOCOL_FEATURES`
//! has been acknowledged and drops the connection, so QEMU would fail to start or reconnect
//! forever. The relay inserts a `SET_FEATURES` carrying only that bit in front of such an early
//! message; the real `SET_FEATURES` follows later and replaces it. Everything else, file
//! descriptors included, passes unchanged. Only control messages take this path, never data.
//!
//! Replies go back through `relay_backend_replies`, which can put a device's own answer to
//! GET_QUEUE_NUM in place of the library's (the number of virtqueues): virtio-net counts
//! queue pairs there.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixListener, UnixStream};

const REQ_SET_FEATURES: u32 = 2;
const REQ_GET_QUEUE_NUM: u32 = 17;
const REQ_SET_VRING_ENABLE: u32 = 18;
const HDR_SIZE: usize = 12;
/// Version 1 in the flags of every message.
const FLAG_VERSION_1: u32 = 0x1;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// Largest message body accepted from a front-end (SET_MEM_TABLE with 8 regions is 328 bytes;
/// configuration space messages are at most 256 + 12).
const MAX_BODY: usize = 4096;
/// Most descriptors one message carries (SET_MEM_TABLE: one per region, at most 8).
const MAX_FDS: usize = 16;

/// A listening socket with a kernel-chosen abstract name, for the library's end of the relay.
pub(crate) fn autobound_listener() -> io::Result<UnixListener> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut sa: libc::sockaddr_un = unsafe { mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Binding with only the family asks the kernel for a unique abstract name (autobind).
    // SAFETY: `sa` is valid for the length given.
    let r = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our own bound socket.
    if unsafe { libc::listen(owned.as_raw_fd(), 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let l = UnixListener::from(owned);
    // Sanity: the name must be abstract, or connect_addr above would not find it.
    if l.local_addr()?.as_abstract_name().is_none() {
        return Err(io::Error::other("autobind gave no abstract name"));
    }
    Ok(l)
}

/// Forwards front-end messages to the library, inserting the feature bit fix-up.
pub(crate) fn relay_frontend_messages(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut features_seen = false;
    let mut body = vec![0u8; MAX_BODY];
    loop {
        let mut hdr = [0u8; HDR_SIZE];
        let fds = match recv_with_fds(from, &mut hdr)? {
            Some(fds) => fds,
            None => return Ok(()),
        };
        let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        if size > MAX_BODY {
            return Err(io::Error::other(format!(
                "front-end message {request} has a {size}-byte body"
            )));
        }
        (&*from).read_exact(&mut body[..size])?;
        if request == REQ_SET_FEATURES {
            features_seen = true;
        } else if request == REQ_SET_VRING_ENABLE && !features_seen {
            let mut fix = [0u8; HDR_SIZE + 8];
            fix[0..4].copy_from_slice(&REQ_SET_FEATURES.to_le_bytes());
            fix[4..8].copy_from_slice(&FLAG_VERSION_1.to_le_bytes());
            fix[8..12].copy_from_slice(&8u32.to_le_bytes());
            fix[12..20].copy_from_slice(&PROTOCOL_FEATURES_BIT.to_le_bytes());
            (&*to).write_all(&fix)?;
            features_seen = true;
        }
        let mut msg = Vec::with_capacity(HDR_SIZE + size);
        msg.extend_from_slice(&hdr);
        msg.extend_from_slice(&body[..size]);
        send_with_fds(to, &msg, &fds)?;
    }
}

/// Forwards the library's replies to the front-end until either side closes. With
/// `queue_num` set, the answer to GET_QUEUE_NUM is replaced by it; otherwise bytes pass as
/// they are.
pub(crate) fn relay_backend_replies(
    from: &UnixStream,
    to: &UnixStream,
    queue_num: Option<u64>,
) -> io::Result<()> {
    let Some(queue_num) = queue_num else {
        io::copy(&mut &*from, &mut &*to)?;
        return Ok(());
    };
    let mut body = vec![0u8; MAX_BODY];
    loop {
        let mut hdr = [0u8; HDR_SIZE];
        if let Err(e) = (&*from).read_exact(&mut hdr) {
            return match e.kind() {
                io::ErrorKind::UnexpectedEof => Ok(()),
                _ => Err(e),
            };
        }
        let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        if size > MAX_BODY {
            return Err(io::Error::other(format!(
                "reply to message {request} has a {size}-byte body"
            )));
        }
        (&*from).read_exact(&mut body[..size])?;
        if request == REQ_GET_QUEUE_NUM && size == 8 {
            body[..8].copy_from_slice(&queue_num.to_le_bytes());
        }
        let mut msg = Vec::with_capacity(HDR_SIZE + size);
        msg.extend_from_slice(&hdr);
        msg.extend_from_slice(&body[..size]);
        (&*to).write_all(&msg)?;
    }
}

/// Reads exactly `buf.len()` bytes; descriptors arrive with the first byte. `None` on EOF
/// before any byte.
fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<Option<Vec<OwnedFd>>> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        let mut ctl = [0u64; (MAX_FDS * 4 + 64) / 8];
        // SAFETY: msghdr is plain data; zeroed is valid.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&ctl);
        // SAFETY: `msg` points at live buffers of the given sizes.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: the kernel filled `msg`; the CMSG macros stay inside `msg_controllen`.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !c.is_null() {
            // SAFETY: `c` points at a complete cmsghdr inside `ctl`.
            let cm = unsafe { &*c };
            if cm.cmsg_level == libc::SOL_SOCKET && cm.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is the header size; the rest are ints.
                let data_len = cm.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
                let count = data_len / mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at `count` ints written by the kernel.
                let p = unsafe { libc::CMSG_DATA(c) } as *const RawFd;
                for i in 0..count {
                    // SAFETY: each is a descriptor the kernel just installed for us.
                    let fd = unsafe { std::ptr::read_unaligned(p.add(i)) };
                    // SAFETY: we own every descriptor received with SCM_RIGHTS.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            // SAFETY: as above; returns null past the end.
            c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
        }
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n as usize;
    }
    Ok(Some(fds))
}

fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if fds.is_empty() {
        return (&*s).write_all(data);
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut ctl = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer has room for one cmsghdr with `raw.len()` ints.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, raw.len());
    }
    // SAFETY: `msg` points at live buffers; the descriptors stay open during the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < data.len() {
        (&*s).write_all(&data[n..])?;
    }
    Ok(())
}
