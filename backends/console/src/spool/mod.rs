//! A bounded FIFO of guest output waiting for its endpoint.
//!
//! Backed by a shared mapping of a file when the port has a state directory, so bytes the
//! device has accepted from the guest (and marked used) survive a crash or restart of the
//! backend and are replayed by the next process; otherwise by anonymous memory.
//!
//! The mapping is a page of header followed by the data area. One file per job:
//! - `ring.rs`: the FIFO over the data area (append, look at the front, discard);
//! - `record.rs`: what the header keeps of what a process that dies leaves unfinished (the
//!   write to the host side in flight, [`Flight`], and the transmit chain being taken,
//!   [`ChainId`]);
//! - `file.rs`: the spool file: opened safely and locked, its blocks allocated, the bytes it
//!   keeps carried over when the buffer size changes ([`Spool::open`]).
//!
//! This file holds what they share: the header's layout, the mapping and its lifetime.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use devshare_common::files::FileError;

mod file;
mod record;
mod ring;

pub use record::{chain_fingerprint, ChainId, Flight, Leftover, FINGERPRINT_BYTES};

const MAGIC: u64 = 0x6465_7673_7370_6f31; // "devsspo1"
const HEADER: usize = 4096;

/// Why a spool could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The backing file could not be created or mapped.
    #[error("spool file {path}: {source}")]
    File {
        /// Backing file.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The path is not a file this process may use as a spool (a symlink, a hard link, a
    /// FIFO, another user's file...); it is left as it is.
    #[error("spool file {0}")]
    Unsafe(#[from] FileError),
    /// Another port of this configuration, or another process, has the file.
    #[error("spool file {path} is in use by another port or another process (two ports whose VM and port names join to the same file name, or another instance on the same state directory); rename one")]
    InUse {
        /// Backing file.
        path: PathBuf,
    },
    /// The file has content but is not a spool: it is not ours to truncate.
    #[error("{path} is not a spool file (it is not empty and does not start like one); move it away or remove it")]
    NotASpool {
        /// Backing file.
        path: PathBuf,
    },
    /// The state directory's file system has no room for the whole file. Its blocks are
    /// allocated when it is opened because a shared mapping of a file whose pages have no
    /// blocks behind them kills the process (SIGBUS) at the first store the file system
    /// cannot back, and with it every VM it serves.
    #[error("spool file {path}: no room for its {size} bytes on the state directory's file system; free some space there, move --state-dir, or give this port a smaller --buffer-size")]
    NoRoom {
        /// Backing file.
        path: PathBuf,
        /// Bytes the file needs (buffer size plus a page of header).
        size: u64,
    },
    /// Anonymous memory could not be mapped.
    #[error("cannot allocate a {size}-byte buffer: {source}")]
    Memory {
        /// Requested size.
        size: usize,
        /// Underlying error.
        source: io::Error,
    },
}

/// Header at the start of the mapping. `read` and `write` only grow; `write - read` is the
/// fill level and `pos % capacity` the place in the data area. Files written before the
/// fields after `write` existed hold zeroes there: nothing in flight, no chain.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    capacity: AtomicU64,
    read: AtomicU64,
    write: AtomicU64,
    /// The write to the host side in flight, [`Flight::encode`]d; 0: none.
    flight: AtomicU64,
    /// The transmit chain being taken: [`record::CHAIN_ACTIVE`] | position << 16 | head;
    /// 0: none. Set last when a chain begins and cleared first, so the fields below are whole
    /// whenever it is set.
    chain: AtomicU64,
    /// Its readable length.
    chain_len: AtomicU64,
    /// A fingerprint of its first bytes (durable spools only, see [`chain_fingerprint`]).
    chain_sum: AtomicU64,
    /// The write position its byte 0 has, or would have had, in this spool: its first
    /// `write - chain_base` bytes are taken. Appending its bytes moves `write`; bytes that go
    /// elsewhere (straight to the host side, or dropped by the console's rule) lower it.
    chain_base: AtomicU64,
}

// The header must fit the page before the data area.
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER);

/// A bounded byte FIFO (see the module docs).
pub struct Spool {
    base: NonNull<u8>,
    map_len: usize,
    capacity: usize,
    /// The backing file, kept open for its lock.
    _file: Option<File>,
    /// See [`Spool::resize_dropped`].
    resize_dropped: usize,
}

// SAFETY: the mapping is owned by this value alone and only reached through `&self`/`&mut self`.
unsafe impl Send for Spool {}

impl Spool {
    /// A spool in anonymous memory.
    pub fn anonymous(capacity: usize) -> Result<Spool, SpoolError> {
        let capacity = capacity.max(1);
        let map_len = HEADER + capacity;
        // SAFETY: a fresh private anonymous mapping; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let spool =
            Self::from_map(p, map_len, capacity, None).map_err(|source| SpoolError::Memory {
                size: capacity,
                source,
            })?;
        spool.init();
        Ok(spool)
    }

    fn from_map(
        p: *mut libc::c_void,
        map_len: usize,
        capacity: usize,
        file: Option<File>,
    ) -> io::Result<Spool> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(Spool {
            base,
            map_len,
            capacity,
            _file: file,
            resize_dropped: 0,
        })
    }

    fn init(&self) {
        let h = self.header();
        h.chain.store(0, Ordering::Release);
        h.flight.store(0, Ordering::Release);
        h.read.store(0, Ordering::Release);
        h.write.store(0, Ordering::Release);
        h.capacity.store(self.capacity as u64, Ordering::Release);
        h.magic.store(MAGIC, Ordering::Release);
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER bytes, page aligned, and Header is nine
        // AtomicU64s (72 bytes, below HEADER) which accept any bit pattern.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn data(&mut self) -> &mut [u8] {
        // SAFETY: the data area is `capacity` bytes after the header inside our mapping, and
        // `&mut self` makes this the only live reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(HEADER), self.capacity) }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in the constructor; no references to
        // it outlive `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

/// What the unit tests of the spool's files share.
#[cfg(test)]
mod testing {
    use std::path::PathBuf;

    use super::Spool;

    /// The waiting bytes, oldest first, in one piece.
    pub(super) fn contents(s: &mut Spool) -> Vec<u8> {
        let (a, b) = s.front();
        [a, b].concat()
    }

    /// A fresh directory of this test process.
    pub(super) fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
