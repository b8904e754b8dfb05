//! What a writer on a Unix stream socket can know about its peer: how much of what it wrote
//! the peer has read.
//!
//! On Linux an AF_UNIX stream socket charges every message it sends to the sender's write
//! memory until the receiver has read all of it; `SIOCOUTQ` (`TIOCOUTQ`) returns that charge.
//! Each message is charged at least its length (its truesize), so `written - SIOCOUTQ` is a
//! lower bound of the bytes the peer has read out of the socket, exact when the queue is empty.
//! That is the writer's acknowledgement: a byte the backend read is a byte it accepted.
//!
//! One trap: when the peer dies its receive queue is purged, which also uncharges everything
//! and would make the bound claim bytes nobody read. The kernel marks our socket shut down
//! (`POLLHUP`) before that purge (`unix_release_sock`), so a reading followed by a check that
//! shows no hang-up was taken before the purge, and holds.

use std::io;
use std::os::fd::RawFd;

/// Bytes of `fd`'s sent data the peer has not read yet (an upper bound; see the module
/// docs), or None when the peer has hung up (the reading would not be trustworthy).
///
/// # Errors
/// The ioctl or poll failed.
pub fn unread_by_peer(fd: RawFd) -> io::Result<Option<u64>> {
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int to the pointer, which points at a live c_int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if peer_gone(fd)? {
        return Ok(None);
    }
    Ok(Some(u64::try_from(outq).unwrap_or(0)))
}

/// Whether the peer of `fd` has hung up (or the socket is in error).
///
/// # Errors
/// poll failed.
pub fn peer_gone(fd: RawFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: pfd is one valid pollfd; a zero timeout returns at once.
    if unsafe { libc::poll(&mut pfd, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0)
}

/// Waits up to `ms` milliseconds for `fd` to become writable or hung up.
///
/// # Errors
/// poll failed.
pub fn wait_writable(fd: RawFd, ms: i32) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: pfd is one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn unread_bytes_fall_as_the_peer_reads_and_the_reading_stops_when_it_dies() {
        let (mut w, mut r) = UnixStream::pair().unwrap();
        let fd = w.as_raw_fd();
        assert_eq!(unread_by_peer(fd).unwrap(), Some(0));
        for _ in 0..4 {
            w.write_all(&[7u8; 4096]).unwrap();
        }
        let unread = unread_by_peer(fd).unwrap().unwrap();
        assert!(unread >= 4 * 4096, "{unread}");
        // Reading one whole message uncharges at least its length.
        let mut buf = [0u8; 4096];
        r.read_exact(&mut buf).unwrap();
        let after = unread_by_peer(fd).unwrap().unwrap();
        assert!(
            after < unread && after >= 3 * 4096,
            "{after} after {unread}"
        );
        let mut rest = [0u8; 3 * 4096];
        r.read_exact(&mut rest).unwrap();
        assert_eq!(unread_by_peer(fd).unwrap(), Some(0));
        // The peer dies with unread data: no reading is given.
        w.write_all(&[7u8; 4096]).unwrap();
        drop(r);
        assert!(peer_gone(fd).unwrap());
        assert_eq!(unread_by_peer(fd).unwrap(), None);
    }
}
