//! A bounded FIFO of guest output waiting for its endpoint.
//!
//! Backed by a shared mapping of a file when the port has a state directory, so bytes the
//! device has accepted from the guest (and marked used) survive a crash or restart of the
//! backend and are replayed by the next process; otherwise by anonymous memory.
//!
//! A spool file holds guest output, and the process that maps it usually runs as root: it is
//! opened through [`files::open_state_file`] (0600, never through a symlink, never a FIFO, a
//! device, a file with other hard links or another user's file; made 0600 if an older version
//! left it wider) and stays locked (`flock`) for as long as it is mapped, so two ports (or two
//! processes) never share one. A file that is not a spool is never truncated.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use devshare_common::files::{self, FileError};

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
/// fill level and `pos % capacity` the place in the data area.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    capacity: AtomicU64,
    read: AtomicU64,
    write: AtomicU64,
}

/// A bounded byte FIFO (see the module docs).
pub struct Spool {
    base: NonNull<u8>,
    map_len: usize,
    capacity: usize,
    /// The backing file, kept open for its lock.
    _file: Option<File>,
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

    /// A spool kept in `path`. Existing content of the same capacity is kept (that is the
    /// output an earlier process accepted but had not delivered); a spool of another
    /// capacity starts empty. See the module docs for what `path` must be.
    pub fn open(path: &Path, capacity: usize) -> Result<Spool, SpoolError> {
        let capacity = capacity.max(1);
        let err = |source| SpoolError::File {
            path: path.to_owned(),
            source,
        };
        let file = open_spool_file(path)?;
        let map_len = HEADER + capacity;
        let old_len = file.metadata().map_err(err)?.len();
        // Only an empty file, a spool, or a file this code sized but did not get to stamp
        // (zeroes, of the size it gave) is ours to size and initialise.
        let mut magic = [0u8; 8];
        let stamp = match file.read_exact_at(&mut magic, 0) {
            Ok(()) => u64::from_ne_bytes(magic),
            Err(_) => 0,
        };
        let blank = old_len == 0 || (stamp == 0 && old_len == map_len as u64);
        if stamp != MAGIC && !blank {
            return Err(SpoolError::NotASpool {
                path: path.to_owned(),
            });
        }
        if old_len != map_len as u64 {
            if stamp == MAGIC {
                log::info!(
                    "{}: the buffer size changed; output kept by an earlier run is dropped",
                    path.display()
                );
            }
            file.set_len(0).map_err(err)?;
            file.set_len(map_len as u64).map_err(err)?;
        }
        // SAFETY: a shared mapping of a file we just sized to `map_len`; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        let spool = Self::from_map(p, map_len, capacity, Some(file)).map_err(err)?;
        let h = spool.header();
        let consistent = h.magic.load(Ordering::Acquire) == MAGIC
            && h.capacity.load(Ordering::Acquire) == capacity as u64
            && h.write.load(Ordering::Acquire) >= h.read.load(Ordering::Acquire)
            && h.write.load(Ordering::Acquire) - h.read.load(Ordering::Acquire) <= capacity as u64;
        if consistent {
            if !spool.is_empty() {
                log::info!(
                    "{}: replaying {} bytes kept by an earlier run",
                    path.display(),
                    spool.len()
                );
            }
        } else {
            spool.init();
        }
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
        })
    }

    fn init(&self) {
        let h = self.header();
        h.read.store(0, Ordering::Release);
        h.write.store(0, Ordering::Release);
        h.capacity.store(self.capacity as u64, Ordering::Release);
        h.magic.store(MAGIC, Ordering::Release);
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER bytes, page aligned, and Header is four
        // AtomicU64s which accept any bit pattern.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn data(&mut self) -> &mut [u8] {
        // SAFETY: the data area is `capacity` bytes after the header inside our mapping, and
        // `&mut self` makes this the only live reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(HEADER), self.capacity) }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        let h = self.header();
        (h.write.load(Ordering::Acquire) - h.read.load(Ordering::Acquire)) as usize
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.capacity - self.len()
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends bytes produced by `fill`, which is handed up to two regions of free space in
    /// order and returns how many bytes it wrote into them. At most `max` bytes are added.
    pub fn push_with(&mut self, max: usize, mut fill: impl FnMut(&mut [u8]) -> usize) -> usize {
        let want = max.min(self.free());
        let mut done = 0;
        while done < want {
            let write = self.header().write.load(Ordering::Acquire);
            let at = (write % self.capacity as u64) as usize;
            let n = (self.capacity - at).min(want - done);
            let wrote = fill(&mut self.data()[at..at + n]).min(n);
            // Publish only after the bytes are in place, so a crash never exposes garbage.
            self.header()
                .write
                .store(write + wrote as u64, Ordering::Release);
            done += wrote;
            if wrote < n {
                break;
            }
        }
        done
    }

    /// Appends as much of `bytes` as fits; returns how much did.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let mut off = 0;
        self.push_with(bytes.len(), |dst| {
            let n = dst.len();
            dst.copy_from_slice(&bytes[off..off + n]);
            off += n;
            n
        })
    }

    /// Drops the oldest `n` bytes (or all there are); returns how many were dropped.
    pub fn discard(&mut self, n: usize) -> usize {
        let n = n.min(self.len());
        self.header().read.fetch_add(n as u64, Ordering::AcqRel);
        n
    }

    /// Writes a file-backed spool's pages to disk and waits for it (`msync(MS_SYNC)`), so what
    /// it holds survives even a crash of the host; a no-op for a spool in memory. The mapping
    /// is shared, so the bytes are in the page cache (and survive this process) already.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our own mapping, which stays mapped for the call.
        let rc = unsafe { libc::msync(self.base.as_ptr().cast(), self.map_len, libc::MS_SYNC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The waiting bytes, oldest first, in at most two slices.
    pub fn front(&mut self) -> (&[u8], &[u8]) {
        let len = self.len();
        let at = (self.header().read.load(Ordering::Acquire) % self.capacity as u64) as usize;
        let cap = self.capacity;
        let data: &[u8] = self.data();
        let first = (cap - at).min(len);
        (&data[at..at + first], &data[..len - first])
    }
}

/// Opens (or creates) the spool file at `path` (see the module docs for what is refused).
fn open_spool_file(path: &Path) -> Result<File, SpoolError> {
    files::open_state_file(path).map_err(|e| match e {
        FileError::InUse { path } => SpoolError::InUse { path },
        e => SpoolError::Unsafe(e),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(s: &mut Spool) -> Vec<u8> {
        let (a, b) = s.front();
        [a, b].concat()
    }

    #[test]
    fn fifo_wraps_and_bounds() {
        let mut s = Spool::anonymous(8).unwrap();
        assert_eq!(s.push(b"abcdef"), 6);
        assert_eq!(s.discard(4), 4);
        assert_eq!(s.push(b"ghijklmn"), 6);
        assert_eq!(contents(&mut s), b"efghijkl");
        assert_eq!(s.free(), 0);
        assert_eq!(s.push(b"x"), 0);
        s.discard(100);
        assert!(s.is_empty());
    }

    #[test]
    fn file_spool_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("spool-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.spool");
        {
            let mut s = Spool::open(&path, 16).unwrap();
            s.push(b"hello world");
            s.discard(6);
        }
        let mut s = Spool::open(&path, 16).unwrap();
        assert_eq!(contents(&mut s), b"world");
        drop(s);
        // A different capacity starts afresh.
        let s = Spool::open(&path, 32).unwrap();
        assert!(s.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_that_is_not_a_spool_is_never_truncated() {
        let dir = scratch("foreign");
        let path = dir.join("p.spool");
        std::fs::write(&path, b"someone's notes, not a spool").unwrap();
        let e = Spool::open(&path, 16).err().unwrap();
        assert!(matches!(e, SpoolError::NotASpool { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"someone's notes, not a spool"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_spool_file_cannot_back_two_spools() {
        let dir = scratch("twice");
        let path = dir.join("p.spool");
        let mut first = Spool::open(&path, 16).unwrap();
        first.push(b"mine");
        let e = Spool::open(&path, 16).err().unwrap();
        assert!(matches!(e, SpoolError::InUse { .. }), "{e}");
        assert_eq!(contents(&mut first), b"mine");
        drop(first);
        let mut again = Spool::open(&path, 16).unwrap();
        assert_eq!(contents(&mut again), b"mine");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_planted_symlink_is_refused_and_its_target_kept() {
        let dir = scratch("symlink");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.join("p.spool");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = Spool::open(&path, 16).err().unwrap();
        assert!(matches!(e, SpoolError::Unsafe(_)), "{e}");
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
