//! Descriptors for the fuzz targets: passing them over Unix sockets (SCM_RIGHTS), naming the
//! file behind one, and counting the process's open descriptors to catch leaks.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Open descriptors of this process (entries of `/proc/self/fd`, the directory's own
/// descriptor not counted).
pub fn fd_count() -> usize {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d.count().saturating_sub(1),
        Err(e) => panic!("cannot list /proc/self/fd: {e}"),
    }
}

/// The file a descriptor refers to: (device, inode).
pub type FileId = (u64, u64);

/// The (device, inode) of the file behind `fd`.
pub fn file_id(fd: impl AsFd) -> Option<FileId> {
    // SAFETY: `stat` is plain data; zeroed is valid and fstat overwrites it.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: the descriptor is open for the call and `st` is a valid out pointer.
    let r = unsafe { libc::fstat(fd.as_fd().as_raw_fd(), &mut st) };
    (r == 0).then_some((st.st_dev, st.st_ino))
}

/// Sends `data` with `fds` attached to its first byte (one `sendmsg`, the rest with plain
/// writes if the socket took only part). Never raises SIGPIPE.
pub fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let bytes = mem::size_of_val(fds);
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
    if !fds.is_empty() {
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one cmsghdr with `fds.len()` ints.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    let mut sent = loop {
        // SAFETY: `msg` points at live buffers; the descriptors are open during the call.
        let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    while sent < data.len() {
        // SAFETY: the pointer and length describe the unsent rest of `data`.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                data[sent..].as_ptr().cast(),
                data.len() - sent,
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes and every descriptor that arrives with them. `None` on
/// end of stream before the first byte; an error on end of stream after it.
pub fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<Option<Vec<OwnedFd>>> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        // Room for the most descriptors one message can carry (SCM_MAX_FD, 253).
        let mut ctl = [0u64; 160];
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
                // SAFETY: CMSG_LEN(0) only computes the header size.
                let head = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = (cm.cmsg_len as usize - head) / mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at `count` ints written by the kernel.
                let p = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: each is a descriptor the kernel just installed for us, owned by
                    // nobody else.
                    fds.push(unsafe { OwnedFd::from_raw_fd(p.add(i).read_unaligned()) });
                }
            }
            // SAFETY: as above; null past the end.
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
