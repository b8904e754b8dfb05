//! A bounded FIFO of guest output waiting for its endpoint.
//!
//! Backed by a shared mapping of a file when the port has a state directory, so bytes the
//! device has accepted from the guest (and marked used) survive a crash or restart of the
//! backend and are replayed by the next process; otherwise by anonymous memory.
//!
//! The header also keeps what a process that dies (SIGKILL takes effect when a system call
//! returns, before the process can record what the call did) leaves unfinished, each part
//! changed by single stores so that any moment is a consistent state:
//! - the write to the host side in flight ([`Flight`]): the next process sends those bytes
//!   again, because it cannot know how many arrived, and counts them;
//! - the transmit chain being taken (virtio mode, [`ChainId`]): how many of its bytes are
//!   taken (delivered, or here, or dropped by the console's rule), so that a chain the dead
//!   process had not yet marked used, which the front-end hands to the next one again, is
//!   continued where it stopped instead of taken twice.
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
    /// The transmit chain being taken: [`CHAIN_ACTIVE`] | position << 16 | head; 0: none.
    /// Set last when a chain begins and cleared first, so the fields below are whole
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

/// Marks [`Header::chain`] as set.
const CHAIN_ACTIVE: u64 = 1 << 32;

/// A transmit chain as the ring shows it: where it stands in the avail ring, its head
/// descriptor and its readable length. A driver never changes a chain it made available
/// until the device used it (virtio 1.2, 2.7.13), so while it is not used this names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainId {
    /// Its place in the avail ring (the free-running index, not reduced to the ring size).
    pub pos: u16,
    /// Its head descriptor.
    pub head: u16,
    /// Its readable bytes.
    pub len: usize,
}

/// A write of buffered or chain bytes to the host side whose outcome the process might not
/// live to record: the kernel may have taken any part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flight {
    /// `len` bytes from the spool's front, which was at read position `from`.
    Front {
        /// The read position when the write began.
        from: u64,
        /// Bytes offered.
        len: usize,
    },
    /// `len` bytes of the chain being taken, from its byte `from` on.
    Chain {
        /// The chain offset of the first byte offered.
        from: usize,
        /// Bytes offered.
        len: usize,
    },
}

impl Flight {
    const FRONT: u64 = 1;
    const CHAIN: u64 = 2;

    /// One word: kind << 56 | (low 32 bits of `from`) << 24 | `len` (below 16 MiB, the
    /// callers write at most [`crate::port::WRITE_CAP`]). A position's low 32 bits tell it
    /// from the next one: a single write moves it by at most `len`.
    fn encode(self) -> u64 {
        let (kind, from, len) = match self {
            Flight::Front { from, len } => (Self::FRONT, from, len),
            Flight::Chain { from, len } => (Self::CHAIN, from as u64, len),
        };
        kind << 56 | (from & 0xffff_ffff) << 24 | (len as u64 & 0xff_ffff)
    }

    /// (kind, low 32 bits of from, len).
    fn decode(word: u64) -> (u64, u64, usize) {
        (
            word >> 56,
            word >> 24 & 0xffff_ffff,
            (word & 0xff_ffff) as usize,
        )
    }
}

/// The fingerprint a durable spool keeps of a chain: its length and first 256 bytes, mixed
/// 8 at a time. It tells the chain an earlier process left half-taken from one a guest that
/// rebooted meanwhile put at the same place of its new rings.
pub fn chain_fingerprint(len: usize, first: &[u8]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64 ^ len as u64;
    for word in first.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 32;
    }
    h
}

/// Bytes of a chain [`chain_fingerprint`] covers.
pub const FINGERPRINT_BYTES: usize = 256;

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

/// What the process before this one left unfinished in a spool file (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leftover {
    /// Bytes at the front it was writing to the host side when it died: they go out again.
    pub front_replay: usize,
    /// Whether it was taking a chain it had not marked used.
    pub chain: bool,
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

    /// Whether the spool is a file that outlives the process.
    pub fn durable(&self) -> bool {
        self._file.is_some()
    }

    /// What the process before this one left unfinished (nothing for a fresh spool).
    pub fn leftover(&self) -> Leftover {
        let h = self.header();
        let (kind, from, len) = Flight::decode(h.flight.load(Ordering::Acquire));
        let read = h.read.load(Ordering::Acquire);
        let front_replay = if kind == Flight::FRONT && from == read & 0xffff_ffff {
            len.min(self.len())
        } else {
            0
        };
        Leftover {
            front_replay,
            chain: h.chain.load(Ordering::Acquire) & CHAIN_ACTIVE != 0,
        }
    }

    /// A write to the host side begins: `f` is in flight until [`Spool::land`].
    pub fn launch(&self, f: Flight) {
        self.header().flight.store(f.encode(), Ordering::Release);
    }

    /// The write in flight returned (its outcome is recorded: the front discarded, the
    /// chain's bytes marked taken).
    pub fn land(&self) {
        self.header().flight.store(0, Ordering::Release);
    }

    /// Chain `id` begins to be taken; `sum` is its [`chain_fingerprint`] (durable spools).
    pub fn begin_chain(&self, id: ChainId, sum: u64) {
        let h = self.header();
        h.chain.store(0, Ordering::Release);
        h.chain_len.store(id.len as u64, Ordering::Release);
        h.chain_sum.store(sum, Ordering::Release);
        h.chain_base
            .store(h.write.load(Ordering::Acquire), Ordering::Release);
        h.chain.store(
            CHAIN_ACTIVE | u64::from(id.pos) << 16 | u64::from(id.head),
            Ordering::Release,
        );
    }

    /// How many bytes of chain `id` are taken, if it is the chain being taken.
    pub fn chain_taken(&self, id: ChainId) -> Option<usize> {
        let h = self.header();
        let want = CHAIN_ACTIVE | u64::from(id.pos) << 16 | u64::from(id.head);
        if h.chain.load(Ordering::Acquire) != want
            || h.chain_len.load(Ordering::Acquire) != id.len as u64
        {
            return None;
        }
        // Modulo 2^64: bytes that went elsewhere lower the base, below 0 when the spool's
        // write position is still smaller than they are (a port whose client always keeps
        // up never buffers anything).
        let taken = h
            .write
            .load(Ordering::Acquire)
            .wrapping_sub(h.chain_base.load(Ordering::Acquire));
        usize::try_from(taken).ok().filter(|&t| t <= id.len)
    }

    /// Keeps `sum` as the [`chain_fingerprint`] of the chain being taken (a spool that is not
    /// durable takes it only when the chain has to wait for room).
    pub fn set_chain_sum(&self, sum: u64) {
        self.header().chain_sum.store(sum, Ordering::Release);
    }

    /// The fingerprint kept of the chain being taken.
    pub fn chain_sum(&self) -> u64 {
        self.header().chain_sum.load(Ordering::Acquire)
    }

    /// Bytes of the chain being taken that were in flight from its byte `taken` on when the
    /// process before this one died (they go out again).
    pub fn chain_replay(&self, taken: usize) -> usize {
        let (kind, from, len) = Flight::decode(self.header().flight.load(Ordering::Acquire));
        if kind == Flight::CHAIN && from == taken as u64 & 0xffff_ffff {
            len
        } else {
            0
        }
    }

    /// `n` more bytes of the chain being taken went elsewhere than into this spool
    /// (delivered straight to the host side, or dropped by the console's rule). Nothing when
    /// no chain is being taken.
    pub fn chain_passed(&self, n: usize) {
        let h = self.header();
        if n == 0 || h.chain.load(Ordering::Acquire) & CHAIN_ACTIVE == 0 {
            return;
        }
        let base = h.chain_base.load(Ordering::Acquire);
        h.chain_base
            .store(base.wrapping_sub(n as u64), Ordering::Release);
    }

    /// The chain being taken is marked used (or let go of): nothing to continue.
    pub fn end_chain(&self) {
        self.header().chain.store(0, Ordering::Release);
    }

    /// The read position (bytes ever taken off the front), for a [`Flight::Front`].
    pub fn read_position(&self) -> u64 {
        self.header().read.load(Ordering::Acquire)
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

    /// Appends bytes that `fill` copies into the free space, handed over as two regions in
    /// order (the second empty unless the free space wraps), at most `max` bytes in all; they
    /// are published once `fill` returned how many it copied. Returns that count.
    pub fn append_with(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8], &mut [u8]) -> usize,
    ) -> usize {
        let want = max.min(self.free());
        if want == 0 {
            return 0;
        }
        let write = self.header().write.load(Ordering::Acquire);
        let at = (write % self.capacity as u64) as usize;
        let first = (self.capacity - at).min(want);
        let (head, tail) = self.data().split_at_mut(at);
        let wrote = fill(&mut tail[..first], &mut head[..want - first]).min(want);
        // Publish only after the bytes are in place, so a crash never exposes garbage.
        self.header()
            .write
            .store(write + wrote as u64, Ordering::Release);
        wrote
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

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_write_in_flight_is_replayed_by_the_next_process_only_until_recorded() {
        let dir = scratch("flight");
        let path = dir.join("p.spool");
        let mut s = Spool::open(&path, 64).unwrap();
        s.push(b"0123456789");
        // Died after the write returned, before the front was discarded: replay it.
        s.launch(Flight::Front {
            from: s.read_position(),
            len: 8,
        });
        drop(s);
        let mut s = Spool::open(&path, 64).unwrap();
        assert_eq!(s.leftover().front_replay, 8);
        // Died after the discard, before the record was cleared: nothing to replay.
        s.discard(8);
        drop(s);
        let mut s = Spool::open(&path, 64).unwrap();
        assert_eq!(s.leftover().front_replay, 0);
        assert_eq!(contents(&mut s), b"89");
        s.land();
        drop(s);
        assert_eq!(
            Spool::open(&path, 64).unwrap().leftover(),
            Leftover::default()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_chain_begun_is_known_by_place_and_length_with_its_taken_bytes() {
        let dir = scratch("chain");
        let path = dir.join("p.spool");
        let id = ChainId {
            pos: 7,
            head: 3,
            len: 20,
        };
        let mut s = Spool::open(&path, 64).unwrap();
        s.begin_chain(id, 42);
        s.chain_passed(5); // delivered straight to the host side
        s.push(b"abcd"); // buffered
        s.launch(Flight::Chain { from: 9, len: 6 });
        drop(s);
        let s = Spool::open(&path, 64).unwrap();
        assert!(s.leftover().chain);
        assert_eq!(s.chain_taken(id), Some(9));
        assert_eq!(s.chain_sum(), 42);
        assert_eq!(s.chain_replay(9), 6);
        assert_eq!(s.chain_replay(3), 0, "a write of another part");
        assert_eq!(s.chain_taken(ChainId { len: 21, ..id }), None);
        assert_eq!(s.chain_taken(ChainId { pos: 8, ..id }), None);
        s.end_chain();
        assert_eq!(s.chain_taken(id), None);
        assert!(!s.leftover().chain);
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
