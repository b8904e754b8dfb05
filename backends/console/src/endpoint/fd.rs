//! Plain fd helpers shared by the endpoint kinds: non-blocking mode and vectored writes that
//! retry on EINTR (and, on sockets, never raise SIGPIPE).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Upper bound of iovecs handed to one `writev`/`sendmsg` (Linux `IOV_MAX`); the rest is a
/// short write the caller retries.
const IOV_MAX: usize = 1024;

/// Sets O_NONBLOCK on `fd`.
pub(super) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument; fd is open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int of flags; fd is open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn iov_count(bufs: &[IoSlice<'_>]) -> usize {
    bufs.len().min(IOV_MAX)
}

/// One `writev`, retried on EINTR.
pub(super) fn write_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        // SAFETY: IoSlice is guaranteed ABI-compatible with iovec on Unix; the slices stay
        // borrowed for the call and the kernel only reads them; count <= bufs.len().
        let n = unsafe {
            libc::writev(
                fd.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                iov_count(bufs) as libc::c_int,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `sendmsg` with MSG_NOSIGNAL (a vanished peer gives EPIPE, not SIGPIPE), retried on
/// EINTR.
pub(super) fn send_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; all-zero is "no name, no control data".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr().cast::<libc::iovec>().cast_mut();
    msg.msg_iovlen = iov_count(bufs);
    loop {
        // SAFETY: msg points at `bufs` (IoSlice is ABI-compatible with iovec), which stays
        // borrowed for the call; sendmsg only reads the iovecs and the buffers.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes all of `bufs` to a blocking fd (a regular file).
pub(super) fn write_all_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<()> {
    let mut owned: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
    let mut rest = owned.as_mut_slice();
    while !rest.is_empty() {
        let n = write_vectored(fd, rest)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "file took no bytes",
            ));
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Bytes waiting to be read on a socket or terminal `fd` (FIONREAD); 0 when unknown.
pub(crate) fn unread_bytes(fd: BorrowedFd<'_>) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into the valid pointer; the fd is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 && n > 0 {
        n as usize
    } else {
        0
    }
}
