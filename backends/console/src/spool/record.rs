//! What a process that dies leaves unfinished, kept in the spool's header. SIGKILL takes
//! effect when a system call returns, before the process can record what the call did; each
//! part is changed by single stores so that any moment is a consistent state:
//! - the write to the host side in flight ([`Flight`]): the next process sends those bytes
//!   again, because it cannot know how many arrived, and counts them;
//! - the transmit chain being taken (virtio mode, [`ChainId`]): how many of its bytes are
//!   taken (delivered, or here, or dropped by the console's rule), so that a chain the dead
//!   process had not yet marked used, which the front-end hands to the next one again, is
//!   continued where it stopped instead of taken twice.

use std::sync::atomic::Ordering;

use super::Spool;

/// Marks [`super::Header::chain`] as set.
pub(super) const CHAIN_ACTIVE: u64 = 1 << 32;

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
    pub(super) const FRONT: u64 = 1;
    pub(super) const CHAIN: u64 = 2;

    /// One word: kind << 56 | (low 32 bits of `from`) << 24 | `len` (below 16 MiB, the
    /// callers write at most [`crate::port::WRITE_CAP`]). A position's low 32 bits tell it
    /// from the next one: a single write moves it by at most `len`.
    pub(super) fn encode(self) -> u64 {
        let (kind, from, len) = match self {
            Flight::Front { from, len } => (Self::FRONT, from, len),
            Flight::Chain { from, len } => (Self::CHAIN, from as u64, len),
        };
        kind << 56 | (from & 0xffff_ffff) << 24 | (len as u64 & 0xff_ffff)
    }

    /// (kind, low 32 bits of from, len).
    pub(super) fn decode(word: u64) -> (u64, u64, usize) {
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

/// What the process before this one left unfinished in a spool file (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leftover {
    /// Bytes at the front it was writing to the host side when it died: they go out again.
    pub front_replay: usize,
    /// Whether it was taking a chain it had not marked used.
    pub chain: bool,
}

impl Spool {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testing::{contents, scratch};

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
}
