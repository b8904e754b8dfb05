//! The FIFO over the data area. The header's `read` and `write` positions only grow:
//! `write - read` is the fill level and `pos % capacity` the place in the data area. New
//! bytes are published (the write position stored) only once they are in place, so a crash
//! never exposes garbage, and taking bytes off the front is one atomic add to the read
//! position.

use std::sync::atomic::Ordering;

use super::Spool;

impl Spool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testing::contents;

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
}
