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
//! Seeing every message with its descriptors, the relay is also where a memory table that
//! would crash the process (a region past the end of its file, or a file that can still
//! shrink: SIGBUS on first access) is refused, before the library maps it ([`crate::mem_table`]). Only that connection ends.
//!
//! Replies go back through `relay_backend_replies`, which can put a device's own answer to
//! GET_QUEUE_NUM in place of the library's (the number of virtqueues): virtio-net counts
//! queue pairs there.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use crate::listen::PrivateDir;
use crate::mem_table;

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
/// Most descriptors one message may carry: as many as the library accepts with one message
/// (SET_MEM_TABLE carries one per region; QEMU sends at most 8). A message with more is
/// refused rather than passed on without some of them.
const MAX_FDS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
/// Control buffer for [`MAX_FDS`] descriptors: CMSG_SPACE(MAX_FDS * 4), in u64s.
const CTL_WORDS: usize = (mem::size_of::<libc::cmsghdr>() + MAX_FDS * 4).div_ceil(8);

/// The library's end of the relay: a listening socket inside a fresh 0700 directory under
/// the temporary directory, so no other user can connect to it, not even in the moment between
/// `listen` and the relay's own connect. (`VhostUserDaemon` of vhost-user-backend 0.24 only
/// starts from a listener it accepts on, or by connecting to a path; it has no way to take an
/// already connected stream such as one end of a socketpair.) The caller connects to
/// [`PrivateListener::path`], lets the library accept, then drops the [`PrivateListener`]:
/// the path and the directory go away and the socket can no longer be reached at all.
pub(crate) struct PrivateListener {
    /// The listening socket, for the library.
    pub(crate) listener: UnixListener,
    addr: std::path::PathBuf,
    _dir: PrivateDir,
}

impl PrivateListener {
    /// Binds in a new private directory.
    pub(crate) fn new() -> io::Result<PrivateListener> {
        let mut dir = PrivateDir::create(&std::env::temp_dir())?;
        let addr = dir.socket_addr()?;
        let listener = UnixListener::bind(&addr)?;
        Ok(PrivateListener {
            listener,
            addr,
            _dir: dir,
        })
    }

    /// The address to connect to (valid while `self` lives).
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.addr
    }
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The front-end sent something this backend refuses; the connection was ended.
    #[error("refused the front-end's {what}: {reason}")]
    Refused {
        /// Which message.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Forwards front-end messages to the library, inserting the feature bit fix-up and checking
/// memory tables against their files ([`crate::mem_table`]; `unsealed` says whether a file
/// that can still shrink is refused). Returns `Ok` when the front-end
/// hangs up, [`RelayError::Refused`] when it sent a table that would crash the process.
/// Public for the fuzz target (`fuzz/fuzz_targets/relay.rs`); backends reach it through
/// [`crate::daemon::serve`].
pub fn relay_frontend_messages(
    name: &str,
    from: &UnixStream,
    to: &UnixStream,
    unsealed: mem_table::UnsealedMemory,
) -> Result<(), RelayError> {
    let mut features_seen = false;
    let mut shrink_noted = false;
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
            return Err(RelayError::Refused {
                what: "message",
                reason: format!("request {request} has a {size}-byte body (at most {MAX_BODY})"),
            });
        }
        (&*from).read_exact(&mut body[..size])?;
        if let Err(e) = mem_table::check_message(request, &body[..size], &fds, unsealed) {
            return Err(RelayError::Refused {
                what: match request {
                    mem_table::REQ_ADD_MEM_REG => "ADD_MEM_REG",
                    mem_table::REQ_SET_LOG_BASE => "SET_LOG_BASE",
                    mem_table::REQ_SET_INFLIGHT_FD => "SET_INFLIGHT_FD",
                    _ => "SET_MEM_TABLE",
                },
                reason: e.to_string(),
            });
        }
        if !shrink_noted
            && (request == mem_table::REQ_SET_MEM_TABLE || request == mem_table::REQ_ADD_MEM_REG)
            && fds.iter().any(|f| !mem_table::shrink_sealed(f))
        {
            shrink_noted = true;
            // Only reached with --allow-unsealed-memory: the operator took the risk.
            log::warn!(
                "{name}: guest memory is not sealed against shrinking (memfd seal=off or a \
                 file backend), accepted by --allow-unsealed-memory: a front-end that \
                 truncates it while mapped would crash this process"
            );
        }
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
/// before any byte. More than [`MAX_FDS`] descriptors (the kernel then closes the ones that
/// do not fit) are [`RelayError::Refused`]: the message could not be passed on as it was sent.
fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> Result<Option<Vec<OwnedFd>>, RelayError> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        let mut ctl = [0u64; CTL_WORDS];
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
            return Err(e.into());
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
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(RelayError::Refused {
                what: "message",
                reason: format!(
                    "it carries more than {MAX_FDS} file descriptors ({} arrived)",
                    fds.len()
                ),
            });
        }
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn dev_nulls(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect()
    }

    /// Relays `fds` sent with one GET_FEATURES message; returns how the relay ended and the
    /// descriptors the library received.
    fn relay_one_message(fds: &[OwnedFd]) -> (Result<(), RelayError>, usize) {
        let (frontend, from) = UnixStream::pair().unwrap();
        let (to, library) = UnixStream::pair().unwrap();
        let mut hdr = [0u8; HDR_SIZE];
        hdr[0] = 1;
        hdr[4] = FLAG_VERSION_1 as u8;
        send_with_fds(&frontend, &hdr, fds).unwrap();
        drop(frontend);
        let r = relay_frontend_messages("test", &from, &to, mem_table::UnsealedMemory::Refuse);
        drop(to);
        let mut buf = [0u8; HDR_SIZE];
        let got = match recv_with_fds(&library, &mut buf) {
            Ok(Some(fds)) => fds.len(),
            _ => 0,
        };
        (r, got)
    }

    // Found by the relay fuzz target: with more descriptors than its control buffer held, the
    // kernel closed the rest and the relay passed the message on without them.
    #[test]
    fn a_message_with_more_descriptors_than_the_library_takes_is_refused() {
        let (r, got) = relay_one_message(&dev_nulls(MAX_FDS));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(got, MAX_FDS, "every descriptor must be passed on");
        let (r, got) = relay_one_message(&dev_nulls(MAX_FDS + 1));
        assert!(
            matches!(r, Err(RelayError::Refused { .. })),
            "a message that lost descriptors was passed on: {r:?}, {got} descriptors"
        );
        assert_eq!(got, 0);
    }

    #[test]
    fn the_library_end_lives_in_a_private_directory_and_vanishes_once_connected() {
        let l = PrivateListener::new().unwrap();
        let path = l.path().to_path_buf();
        let dir = path.parent().unwrap().to_path_buf();
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o777, 0o700, "others could reach the socket");
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        // No abstract name: nothing outside the directory leads to it.
        assert!(std::os::linux::net::SocketAddrExt::as_abstract_name(
            &l.listener.local_addr().unwrap()
        )
        .is_none());
        let _inner = UnixStream::connect(&path).unwrap();
        let _accepted = l.listener.accept().unwrap();
        drop(l);
        assert!(
            !dir.exists(),
            "the private directory outlived the connection"
        );
    }
}
