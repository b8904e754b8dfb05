//! System-call helpers both kinds of uplink use: interface ioctls and socket options.

use std::io;
use std::mem;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::UplinkError;

/// An interface name as `struct ifreq` holds it: NUL-padded, cut to IFNAMSIZ - 1 bytes.
pub(super) fn ifreq_name(name: &str) -> [u8; libc::IFNAMSIZ] {
    let mut out = [0; libc::IFNAMSIZ];
    let n = name.len().min(libc::IFNAMSIZ - 1);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// A plain datagram socket, used only as the handle for interface ioctls.
pub(super) fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// Maps an I/O error of setting up interface `name` (`what` was being done) to an
/// [`UplinkError::Setup`].
pub(super) fn setup_err<'a>(
    name: &'a str,
    what: &'static str,
) -> impl FnOnce(io::Error) -> UplinkError + 'a {
    move |source| UplinkError::Setup {
        name: name.to_string(),
        what,
        source,
    }
}

/// A libc return value: negative means `errno`.
pub(super) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `setsockopt` with a value of type `T`.
pub(super) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: `val` points at a live `T` and its exact size is passed; the kernel only reads.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (val as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Whether a send or receive error means "try again later" rather than a broken link.
pub(super) fn is_would_block(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR)
    )
}
