//! The spool file. It holds guest output, and the process that maps it usually runs as
//! root: it is opened through [`files::open_state_file`] (0600, never through a symlink,
//! never a FIFO, a device, a file with other hard links or another user's file; made 0600 if
//! an older version left it wider) and stays locked (`flock`) for as long as it is mapped, so
//! two ports (or two processes) never share one. A file that is not a spool is never
//! truncated.
//!
//! Its blocks are allocated when it is opened (`fallocate`, or zeroes written where the file
//! system lacks it), so a full file system is an error at start, never a SIGBUS. A spool kept
//! with another buffer size is carried over into a new file (`PATH.resize`) renamed over the
//! old one once complete.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use devshare_common::files::{self, FileError};

use super::record::CHAIN_ACTIVE;
use super::{Flight, Header, Spool, SpoolError, HEADER, MAGIC};

impl Spool {
    /// A spool kept in `path`. Existing content of the same capacity is kept (that is the
    /// output an earlier process accepted but had not delivered); a spool of another
    /// capacity is carried over into one of `capacity` (see [`Spool::resize_dropped`]). The
    /// file's blocks are allocated here, so a full file system is [`SpoolError::NoRoom`] now
    /// rather than a SIGBUS later. See the module docs for what `path` must be.
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
        if stamp == MAGIC && old_len != map_len as u64 {
            return Self::resize(path, &file, old_len, capacity);
        }
        if old_len != map_len as u64 {
            file.set_len(0).map_err(err)?;
            file.set_len(map_len as u64).map_err(err)?;
        }
        // Every open, not only a creation: a file an older version sized sparse gets its
        // blocks too.
        if let Err(e) = allocate(&file, map_len as u64) {
            if is_no_room(&e) {
                if stamp != MAGIC {
                    // Nothing of ours in it: give back what was allocated.
                    let _ = file.set_len(0);
                }
                return Err(SpoolError::NoRoom {
                    path: path.to_owned(),
                    size: map_len as u64,
                });
            }
            return Err(err(e));
        }
        let spool = Self::map_file(path, file, capacity)?;
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

    /// Maps `file`, sized to and allocated for `capacity` bytes of data.
    fn map_file(path: &Path, file: File, capacity: usize) -> Result<Spool, SpoolError> {
        let map_len = HEADER + capacity;
        // SAFETY: a shared mapping of a file sized to `map_len` whose blocks are allocated
        // (see `allocate`); the result is checked by `from_map`.
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
        Self::from_map(p, map_len, capacity, Some(file)).map_err(|source| SpoolError::File {
            path: path.to_owned(),
            source,
        })
    }

    /// The spool at `path` (`old`, `old_len` bytes long, stamped) was kept with another
    /// buffer size: what it holds moves into a new file of `capacity`, the newest bytes when
    /// they do not all fit (the console's rule; a data port cannot hold back what an earlier
    /// run accepted), and the rest is counted ([`Spool::resize_dropped`]). The new file is
    /// built beside the old one (`PATH.resize`) and renamed over it once complete, so a crash
    /// or a full file system meanwhile leaves the old spool as it was.
    fn resize(path: &Path, old: &File, old_len: u64, capacity: usize) -> Result<Spool, SpoolError> {
        let err = |source| SpoolError::File {
            path: path.to_owned(),
            source,
        };
        let mut words = [0u8; std::mem::size_of::<Header>()];
        old.read_exact_at(&mut words, 0).map_err(err)?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&words[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        let (old_cap, read, write) = (word(1), word(2), word(3));
        let (flight, chain, chain_len, chain_sum, chain_base) =
            (word(4), word(5), word(6), word(7), word(8));
        let consistent =
            old_len == HEADER as u64 + old_cap && write >= read && write - read <= old_cap;
        let held = if consistent { write - read } else { 0 };
        let kept = held.min(capacity as u64);
        let dropped = held - kept;
        if !consistent {
            log::warn!(
                "{}: the spool's header is inconsistent; its content cannot be carried over to the new buffer size",
                path.display()
            );
        }

        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".resize");
        let tmp = PathBuf::from(tmp);
        let file = open_spool_file(&tmp)?;
        let tmp_err = |source| SpoolError::File {
            path: tmp.clone(),
            source,
        };
        let map_len = (HEADER + capacity) as u64;
        // Only an empty file or one a resize left behind (stamped, or sized and still zero)
        // is ours to cut: anything else at that name is someone's data.
        let tmp_len = file.metadata().map_err(tmp_err)?.len();
        let mut magic = [0u8; 8];
        let stamp = match file.read_exact_at(&mut magic, 0) {
            Ok(()) => u64::from_ne_bytes(magic),
            Err(_) => 0,
        };
        if tmp_len != 0 && stamp != MAGIC && !(stamp == 0 && tmp_len == map_len) {
            return Err(SpoolError::NotASpool { path: tmp });
        }
        file.set_len(0).map_err(tmp_err)?;
        file.set_len(map_len).map_err(tmp_err)?;
        if let Err(e) = allocate(&file, map_len) {
            let _ = std::fs::remove_file(&tmp);
            if is_no_room(&e) {
                return Err(SpoolError::NoRoom {
                    path: path.to_owned(),
                    size: map_len,
                });
            }
            return Err(tmp_err(e));
        }
        let mut spool = Self::map_file(&tmp, file, capacity)?;
        spool.init();
        // The newest `kept` bytes, from read position `write - kept` on, in at most two runs
        // of the old data area.
        let mut at = write - kept;
        let mut failed = None;
        spool.push_with(kept as usize, |dst| {
            let mut done = 0;
            while done < dst.len() {
                let off = at % old_cap;
                let n = ((old_cap - off) as usize).min(dst.len() - done);
                if let Err(e) = old.read_exact_at(&mut dst[done..done + n], HEADER as u64 + off) {
                    failed = Some(e);
                    return done;
                }
                done += n;
                at += n as u64;
            }
            done
        });
        if let Some(e) = failed {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        let h = spool.header();
        let new_write = h.write.load(Ordering::Acquire);
        // What the process before left unfinished moves along: a write of the front still in
        // flight (when the front is kept), and the chain being taken with its taken bytes.
        let (kind, from, len) = Flight::decode(flight);
        if kind == Flight::FRONT && dropped == 0 && from == read & 0xffff_ffff {
            h.flight
                .store(Flight::Front { from: 0, len }.encode(), Ordering::Release);
        } else if kind == Flight::CHAIN {
            h.flight.store(flight, Ordering::Release);
        }
        if consistent && chain & CHAIN_ACTIVE != 0 {
            let taken = write.wrapping_sub(chain_base);
            h.chain_len.store(chain_len, Ordering::Release);
            h.chain_sum.store(chain_sum, Ordering::Release);
            h.chain_base
                .store(new_write.wrapping_sub(taken), Ordering::Release);
            h.chain.store(chain, Ordering::Release);
        }
        spool.sync().map_err(tmp_err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        spool.resize_dropped = dropped as usize;
        if dropped > 0 {
            log::warn!(
                "{}: the buffer size changed from {old_cap} to {capacity} bytes; the newest {kept} bytes kept by an earlier run are replayed, the oldest {dropped} are dropped (counted in dropped_bytes)",
                path.display()
            );
        } else {
            log::info!(
                "{}: the buffer size changed from {old_cap} to {capacity} bytes; the {kept} bytes kept by an earlier run are replayed",
                path.display()
            );
        }
        Ok(spool)
    }

    /// Bytes an earlier run kept that did not fit this spool's new buffer size (0 unless the
    /// size changed): they are lost, and the port counts them as dropped.
    pub fn resize_dropped(&self) -> usize {
        self.resize_dropped
    }

    /// Whether the spool is a file that outlives the process.
    pub fn durable(&self) -> bool {
        self._file.is_some()
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
}

/// Whether `e` says the file system (or the user's quota) is full.
fn is_no_room(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Gives the first `len` bytes of `file` their blocks (the file is at least that long), so
/// that stores through a shared mapping never meet a full file system. A file system without
/// `fallocate` gets a zero byte written into every block that reads as zero (a block holding
/// data is left alone), which allocates it just the same.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate on a descriptor we own, mode 0 (allocate, keep the size); no memory
    // is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    allocate_by_writing(file, len)
}

/// [`allocate`] on a file system without `fallocate`: a zero byte written into every block
/// of the first `len` bytes that reads as zero (a block holding data keeps it), then synced,
/// so that a full file system says so here.
fn allocate_by_writing(file: &File, len: u64) -> io::Result<()> {
    // One byte per block of the file system's preferred size (a block holds at least that).
    let block = std::os::unix::fs::MetadataExt::blksize(&file.metadata()?).max(512);
    let mut at = 0;
    while at < len {
        let mut b = [0u8; 1];
        let n = file.read_at(&mut b, at)?;
        if n == 0 || b[0] == 0 {
            file.write_all_at(&[0], at)?;
        }
        at += block;
    }
    file.sync_data()
}

/// Opens (or creates) the spool file at `path` (see the module docs for what is refused).
fn open_spool_file(path: &Path) -> Result<File, SpoolError> {
    files::open_state_file(path).map_err(|e| match e {
        FileError::InUse { path } => SpoolError::InUse { path },
        e => SpoolError::Unsafe(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testing::{contents, scratch};
    use crate::spool::ChainId;

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
        assert_eq!(s.resize_dropped(), 0);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn writing_zeroes_allocates_a_sparse_file_and_keeps_its_data() {
        use std::os::unix::fs::MetadataExt;
        let dir = scratch("zeroes");
        let path = dir.join("f");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"data", 300_000).unwrap();
        let sparse = f.metadata().unwrap().blocks();
        allocate_by_writing(&f, 1 << 20).unwrap();
        let blocks = f.metadata().unwrap().blocks();
        assert!(blocks * 512 >= 1 << 20, "{sparse} -> {blocks} blocks");
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 300_000).unwrap();
        assert_eq!(&b, b"data");
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_new_buffer_size_carries_over_what_fits_and_counts_the_rest() {
        let dir = scratch("resize");
        let path = dir.join("p.spool");
        {
            let mut s = Spool::open(&path, 16).unwrap();
            s.push(b"0123456789abcdef");
            s.discard(10);
            s.push(b"ghijklmn"); // wraps: "abcdefghijklmn"
        }
        // Larger: everything, in order, and room for more.
        let mut s = Spool::open(&path, 64).unwrap();
        assert_eq!(contents(&mut s), b"abcdefghijklmn");
        assert_eq!(s.resize_dropped(), 0);
        assert_eq!(s.capacity(), 64);
        s.push(b"o");
        drop(s);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (HEADER + 64) as u64
        );
        // Smaller: the newest bytes, the rest counted.
        let mut s = Spool::open(&path, 4).unwrap();
        assert_eq!(contents(&mut s), b"lmno");
        assert_eq!(s.resize_dropped(), 11);
        drop(s);
        // And the result is a spool like any other.
        let mut s = Spool::open(&path, 4).unwrap();
        assert_eq!(contents(&mut s), b"lmno");
        assert_eq!(s.resize_dropped(), 0);
        drop(s);
        assert!(!dir.join("p.spool.resize").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_chain_being_taken_keeps_its_taken_bytes_across_a_resize() {
        let dir = scratch("resize-chain");
        let path = dir.join("p.spool");
        let id = ChainId {
            pos: 1,
            head: 2,
            len: 10,
        };
        {
            let mut s = Spool::open(&path, 16).unwrap();
            s.push(b"xyz");
            s.begin_chain(id, 7);
            s.chain_passed(2);
            s.push(b"abc");
        }
        let s = Spool::open(&path, 32).unwrap();
        assert_eq!(s.chain_taken(id), Some(5));
        assert_eq!(s.chain_sum(), 7);
        std::fs::remove_dir_all(dir).unwrap();
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
    fn a_file_that_is_not_a_spool_at_the_resize_name_is_never_truncated() {
        let dir = scratch("foreign-resize");
        let path = dir.join("p.spool");
        drop(Spool::open(&path, 16).unwrap());
        let resize = dir.join("p.spool.resize");
        std::fs::write(&resize, b"a log, not a spool").unwrap();
        let e = Spool::open(&path, 32).err().unwrap();
        assert!(matches!(e, SpoolError::NotASpool { .. }), "{e}");
        assert!(e.to_string().contains("p.spool.resize"), "{e}");
        assert_eq!(std::fs::read(&resize).unwrap(), b"a log, not a spool");
        // A resize left behind by a crash (stamped) is ours and rebuilt.
        std::fs::remove_file(&resize).unwrap();
        std::fs::copy(&path, &resize).unwrap();
        drop(Spool::open(&path, 32).unwrap());
        assert!(!resize.exists());
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
