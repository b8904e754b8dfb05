//! Split-virtqueue access for every backend: one pass over a ring per batch.
//!
//! virtio-queue reads the avail index again for every chain, reads every descriptor through
//! vm-memory's generic region iterator and stores the used index after every chain. At millions
//! of small frames a second those costs dominated the profile (see docs/netmux.md), and the
//! index stores bounced a cache line the guest polls. A [`Ring`] maps the descriptor table and
//! the avail and used rings once per batch, reads the avail index only when the entries it
//! announced are used up, writes used elements directly and publishes the used index once.
//!
//! The [`Queue`] stays the owner of the ring's state (addresses, indices, EVENT_IDX):
//! [`Ring::open`] starts from its indices and [`Ring::finish`] hands them back, under the same
//! vring lock, so vhost-user-backend (GET_VRING_BASE, resets) always sees what was done.
//! Do not mix in virtio-queue's own `add_used` / `needs_notification` on these rings: the
//! interrupt decision here keeps its own record of what was published, which those calls
//! neither see nor update.
//!
//! Guest memory may change under us at any time: it is only ever read and written through
//! volatile accesses of plain integers, never through Rust references, and every value read is
//! checked before it is used (indices against the ring size, buffers against guest memory).
//!
//! The work one chain can cost is bounded by the queue size, as the spec bounds what a driver
//! may build (virtio 1.2, 2.7.13.1: no chain longer than the queue size): [`Ring::walk`]
//! refuses chains of more buffers than that, indirect tables of more entries, nested indirect
//! tables and loops. [`Ring::chain_into`] adds [`GuestBuffers::push_buffer`]'s checks on each
//! buffer; together they are every check a descriptor chain gets (see [`crate::chain`]).

use std::cell::Cell;
use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicBool, Ordering};

use crate::chain::{ChainError, GuestBuffers, Memory, Region};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes per descriptor.
const DESC_SIZE: usize = 16;
/// Descriptor flags (virtio 1.2, 2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// The device asks not to be kicked (used ring flags, without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;
/// The driver asks not to be interrupted (avail ring flags, without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why a ring cannot be used as it stands.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// The front-end has not (or no longer) set the ring up.
    #[error("the ring is not ready")]
    NotReady,
    /// A part of the ring is not inside guest memory (or not aligned as the spec demands).
    #[error("the ring's {0} is not inside guest memory")]
    OutsideMemory(&'static str),
    /// The guest's avail index claims more new entries than the ring holds.
    #[error("avail index {avail} is more than the ring size ({size}) ahead of {next}")]
    AvailIndex {
        /// Avail index the guest published.
        avail: u16,
        /// Next entry we would take.
        next: u16,
        /// Ring size.
        size: u16,
    },
}

/// Where a part of the ring (or an indirect table) is.
#[derive(Clone, Copy)]
enum Area {
    /// Mapped in one piece at this host address, suitably aligned: checked once, then read and
    /// written directly. Real rings nearly always are.
    Host(*mut u8),
    /// Spread over more than one memory region: every access goes through vm-memory.
    Guest(GuestAddress),
}

/// One buffer of a descriptor chain as [`Ring::walk`] found it: a descriptor that is not an
/// indirect-table pointer. Not yet checked against guest memory; [`GuestBuffers::push_buffer`]
/// does that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`); otherwise device-readable.
    pub write: bool,
}

/// One descriptor as read from guest memory.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split virtqueue opened for one batch. Nothing is visible to the guest until
/// [`Ring::publish_used`] or [`Ring::finish`].
pub struct Ring<'m> {
    mem: &'m Memory,
    /// The region holding the descriptor table, where a guest's buffers nearly always are
    /// too: tried first for each buffer.
    region: Option<&'m Region>,
    size: u16,
    desc: Area,
    avail: Area,
    used: Area,
    event_idx: bool,
    next_avail: Wrapping<u16>,
    /// The avail index as last read; entries before it need no new read.
    avail_idx: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The used index as last stored in the guest's ring.
    published_used: Wrapping<u16>,
    /// The used index when the guest was last considered for an interrupt.
    signalled_used: Wrapping<u16>,
    /// Whether `signalled_used` at open was decided by this process in this ring's life.
    signalled: &'m Signalled,
    /// Descriptors read by walks since the ring was opened, for work budgets.
    descriptors_read: Cell<usize>,
}

/// One ring's interrupt record across batches: whether the used index the guest was last
/// considered at (where each batch starts) is one this process decided on. Not after the ring
/// (re)started: see [`crate::vring`], which forgets it then. While it is not known, the next
/// decision that has something published interrupts whatever used_event says (Linux's vhost
/// `signalled_used_valid`), and from then on it is known.
#[derive(Debug, Default)]
pub struct Signalled {
    known: AtomicBool,
}

impl Signalled {
    /// Forgets: the next interrupt decision on the ring says yes.
    pub fn forget(&self) {
        self.known.store(false, Ordering::Release);
    }

    /// Trusts the ring's current used index: the state of a ring in the middle of its life
    /// (for tests and fuzzing; the ring code itself sets it by deciding).
    pub fn set_known(&self) {
        self.known.store(true, Ordering::Release);
    }

    /// Whether the ring's last interrupt decision was this process's.
    pub fn is_known(&self) -> bool {
        self.known.load(Ordering::Acquire)
    }

    /// Marks it known; returns whether it was. Runs at every interrupt decision: a plain load
    /// while the record is known (nearly always), the read-modify-write only after a restart.
    fn take(&self) -> bool {
        self.known.load(Ordering::Acquire) || self.known.swap(true, Ordering::AcqRel)
    }
}

impl<'m> Ring<'m> {
    /// Maps `queue`'s rings in `mem` and starts from its indices; `signalled` is the ring's
    /// record (the vring's [`crate::vring::Vring::signalled`]).
    pub fn open(
        queue: &Queue,
        mem: &'m Memory,
        signalled: &'m Signalled,
    ) -> Result<Ring<'m>, RingError> {
        let size = queue.size();
        if !queue.ready() || size == 0 {
            return Err(RingError::NotReady);
        }
        let n = usize::from(size);
        // Sizes from the spec (virtio 1.2, 2.7): flags, idx, ring, and the event word.
        let desc = area(mem, queue.desc_table(), DESC_SIZE * n, 8)
            .ok_or(RingError::OutsideMemory("descriptor table"))?;
        let avail = area(mem, queue.avail_ring(), 6 + 2 * n, 2)
            .ok_or(RingError::OutsideMemory("avail ring"))?;
        let used = area(mem, queue.used_ring(), 6 + 8 * n, 4)
            .ok_or(RingError::OutsideMemory("used ring"))?;
        let next_avail = Wrapping(queue.next_avail());
        let next_used = Wrapping(queue.next_used());
        Ok(Ring {
            mem,
            region: mem.find_region(GuestAddress(queue.desc_table())),
            size,
            desc,
            avail,
            used,
            event_idx: queue.event_idx_enabled(),
            next_avail,
            avail_idx: next_avail,
            next_used,
            published_used: next_used,
            signalled_used: next_used,
            signalled,
            descriptors_read: Cell::new(0),
        })
    }

    /// Takes the next chain head the guest made available, if any. Reads the avail index only
    /// when the entries it last announced have all been taken.
    pub fn pop(&mut self) -> Result<Option<u16>, RingError> {
        if self.next_avail == self.avail_idx {
            self.refresh_avail()?;
            if self.next_avail == self.avail_idx {
                return Ok(None);
            }
        }
        let slot = usize::from(self.next_avail.0 % self.size);
        let head = self.load_u16(self.avail, 4 + 2 * slot, Ordering::Relaxed, "avail ring")?;
        self.next_avail += 1;
        Ok(Some(head))
    }

    /// Where the next [`Ring::pop`] starts, for [`Ring::rewind`].
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// The ring's size (entries, and descriptors in its table).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors read by [`Ring::walk`] (and so by [`Ring::chain`] and
    /// [`Ring::chain_into`]) since the ring was opened, refused chains included: the work the
    /// guest's chains cost, for callers that bound it.
    pub fn descriptors_read(&self) -> usize {
        self.descriptors_read.get()
    }

    /// How many chains the guest has made available that were not taken yet. Reads the avail
    /// index (which must not be more than the ring size ahead).
    pub fn pending(&mut self) -> Result<u16, RingError> {
        self.refresh_avail()?;
        Ok((self.avail_idx - self.next_avail).0)
    }

    /// Takes up to `n` chains without looking at them (a caller that has seen them before and
    /// knows what they hold); returns how many were taken. [`Ring::rewind`] gives them back.
    pub fn skip(&mut self, n: u16) -> Result<u16, RingError> {
        let k = n.min(self.pending()?);
        self.next_avail += Wrapping(k);
        Ok(k)
    }

    /// Gives back every chain taken since `next_avail` returned `to`: the guest keeps them.
    pub fn rewind(&mut self, to: u16) {
        self.next_avail = Wrapping(to);
    }

    /// Reads the avail index (acquire: the entries and descriptors it announces are read after
    /// it) and checks it against the ring size.
    fn refresh_avail(&mut self) -> Result<(), RingError> {
        let idx = Wrapping(self.load_u16(self.avail, 2, Ordering::Acquire, "avail ring")?);
        if (idx - self.next_avail).0 > self.size {
            return Err(RingError::AvailIndex {
                avail: idx.0,
                next: self.next_avail.0,
                size: self.size,
            });
        }
        self.avail_idx = idx;
        Ok(())
    }

    /// Walks the chain starting at descriptor `head` (following one level of indirect table)
    /// and maps its buffers, returning them (see [`Ring::chain_into`] for the checks).
    pub fn chain(&self, head: u16) -> Result<GuestBuffers<'m>, ChainError> {
        let mut bufs = GuestBuffers::empty(head);
        self.walk(head, |b| {
            bufs.push_buffer_in(self.mem, self.region, b.addr, b.len, b.write)
        })?;
        Ok(bufs)
    }

    /// Walks the chain starting at descriptor `head` and maps its buffers, appending them to
    /// `out`, where the chain is built (a chain is moved once less per packet). Refuses what
    /// [`Ring::walk`] refuses and whatever [`GuestBuffers::push_buffer`] refuses (buffers
    /// outside memory, empty buffers, readable after writable, oversize chains); nothing is
    /// appended then.
    pub fn chain_into(&self, head: u16, out: &mut Vec<GuestBuffers<'m>>) -> Result<(), ChainError> {
        out.push(GuestBuffers::empty(head));
        let res = match out.last_mut() {
            Some(bufs) => self.walk(head, |b| {
                bufs.push_buffer_in(self.mem, self.region, b.addr, b.len, b.write)
            }),
            None => Err(ChainError::Broken { head }),
        };
        if res.is_err() {
            out.pop();
        }
        res
    }

    /// Walks the chain starting at descriptor `head`, following one level of indirect table,
    /// and hands each buffer to `visit` in chain order; stops at the first error `visit`
    /// returns. Refuses (with [`ChainError::Broken`]) heads and links past their table, loops
    /// (a table walked for more descriptors than it holds), nested indirect tables, indirect
    /// tables that are empty, not a whole number of descriptors, larger than the queue or
    /// outside guest memory; and (with [`ChainError::TooLong`]) chains of more buffers than
    /// the queue size. The walk reads at most queue-size descriptors plus one indirect pointer.
    pub fn walk(
        &self,
        head: u16,
        visit: impl FnMut(Buffer) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let mut read = 0;
        let res = self.walk_counting(head, visit, &mut read);
        // Once per chain, not per descriptor: this runs for every packet.
        self.descriptors_read
            .set(self.descriptors_read.get() + read);
        res
    }

    /// [`Ring::walk`], adding the descriptors it reads to `read`.
    fn walk_counting(
        &self,
        head: u16,
        mut visit: impl FnMut(Buffer) -> Result<(), ChainError>,
        read: &mut usize,
    ) -> Result<(), ChainError> {
        let broken = || ChainError::Broken { head };
        let (mut table, mut table_len) = (self.desc, self.size);
        let mut indirect = false;
        let mut index = head;
        // Descriptors left before the walk of this table must have ended: a chain never holds
        // more than its table, so running out means a loop.
        let mut ttl = table_len;
        // Buffers left for the whole chain, direct and indirect together.
        let mut left = self.size;
        let mut total = 0u32;
        loop {
            if ttl == 0 || index >= table_len {
                return Err(broken());
            }
            let d = self.desc(table, index).ok_or_else(broken)?;
            *read += 1;
            if d.flags & DESC_F_INDIRECT != 0 {
                let entries = d.len as usize / DESC_SIZE;
                if indirect
                    || d.len as usize % DESC_SIZE != 0
                    || entries == 0
                    || entries > usize::from(self.size)
                {
                    return Err(broken());
                }
                table = area(self.mem, d.addr, d.len as usize, 8).ok_or_else(broken)?;
                table_len = entries as u16;
                ttl = table_len;
                index = 0;
                indirect = true;
                continue;
            }
            if left == 0 {
                return Err(ChainError::TooLong {
                    head,
                    max: self.size,
                });
            }
            left -= 1;
            total = total.checked_add(d.len).ok_or_else(broken)?;
            visit(Buffer {
                addr: d.addr,
                len: d.len,
                write: d.flags & DESC_F_WRITE != 0,
            })?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = d.next;
            ttl -= 1;
        }
    }

    /// Returns chain `head` to the guest with `len` bytes written. Heads past the ring (which
    /// the guest invented) are dropped: there is no slot they could name. Not visible to the
    /// guest before [`Ring::publish_used`].
    pub fn push_used(&mut self, head: u16, len: u32) {
        if head >= self.size {
            return;
        }
        let slot = usize::from(self.next_used.0 % self.size);
        let off = 4 + 8 * slot;
        match self.used {
            Area::Host(p) => {
                // SAFETY: `open` checked that the used ring (6 + 8 * size bytes) is mapped at
                // `p` and 4-aligned; `off + 8 <= 4 + 8 * size`, so both 4-byte stores are in
                // bounds and aligned. Volatile stores of plain integers: the guest may read or
                // write the same bytes concurrently, which cannot make these stores unsound.
                unsafe {
                    p.add(off)
                        .cast::<u32>()
                        .write_volatile(u32::from(head).to_le());
                    p.add(off + 4).cast::<u32>().write_volatile(len.to_le());
                }
            }
            Area::Guest(base) => {
                let addr = base.unchecked_add(off as u64);
                let _ = self.mem.write_obj(u32::from(head).to_le(), addr);
                let _ = self.mem.write_obj(len.to_le(), addr.unchecked_add(4));
            }
        }
        self.next_used += 1;
    }

    /// Makes the used elements pushed so far visible to the guest: one store of the used index,
    /// after them (release).
    pub fn publish_used(&mut self) {
        if self.next_used == self.published_used {
            return;
        }
        fence(Ordering::Release);
        self.store_u16(self.used, 2, self.next_used.0);
        self.published_used = self.next_used;
    }

    /// Whether the guest wants an interrupt for what was published since the last time this
    /// was asked: with EVENT_IDX when its used_event index was passed, otherwise unless it set
    /// NO_INTERRUPT. On an unreadable field, yes; and yes the first time after the ring
    /// started ([`Signalled`]).
    pub fn needs_interrupt(&mut self) -> bool {
        let (old, new) = (self.signalled_used, self.published_used);
        self.signalled_used = new;
        if old == new {
            return false;
        }
        if !self.signalled.take() {
            return true;
        }
        // The used index store must be visible before the guest's request is read, or both
        // sides could each decide the other will act (the guest re-arms, then checks used).
        fence(Ordering::SeqCst);
        let n = usize::from(self.size);
        if self.event_idx {
            match self.load_u16(self.avail, 4 + 2 * n, Ordering::Relaxed, "avail ring") {
                // Interrupt if used_event lies in (old, new]: the same test as Linux's
                // vring_need_event, in wrapping arithmetic.
                Ok(event) => new - Wrapping(event) - Wrapping(1) < new - old,
                Err(_) => true,
            }
        } else {
            match self.load_u16(self.avail, 0, Ordering::Relaxed, "avail ring") {
                Ok(flags) => flags & AVAIL_F_NO_INTERRUPT == 0,
                Err(_) => true,
            }
        }
    }

    /// Asks the guest not to kick while we drain the ring. With EVENT_IDX nothing needs doing:
    /// the guest kicks only when it passes the avail_event index we last set.
    pub fn disable_kicks(&mut self) {
        if !self.event_idx {
            self.store_u16(self.used, 0, USED_F_NO_NOTIFY);
        }
    }

    /// Asks the guest to kick for the next chain it makes available, then looks again: returns
    /// whether chains arrived meanwhile (the caller should go on draining).
    pub fn enable_kicks(&mut self) -> Result<bool, RingError> {
        if self.event_idx {
            let at = 4 + 8 * usize::from(self.size);
            self.store_u16(self.used, at, self.next_avail.0);
        } else {
            self.store_u16(self.used, 0, 0);
        }
        // Our request must be visible before we read the avail index again, or a chain added
        // in between would go unnoticed by both sides.
        fence(Ordering::SeqCst);
        self.refresh_avail()?;
        Ok(self.avail_idx != self.next_avail)
    }

    /// Publishes what is pending and hands the indices back to `queue`.
    pub fn finish(mut self, queue: &mut Queue) {
        self.publish_used();
        queue.set_next_avail(self.next_avail.0);
        queue.set_next_used(self.next_used.0);
    }

    /// Reads descriptor `index` of `table` (the caller checked the index).
    fn desc(&self, table: Area, index: u16) -> Option<Desc> {
        let off = DESC_SIZE * usize::from(index);
        let (lo, hi) = match table {
            Area::Host(p) => {
                // SAFETY: the table was mapped in one piece at `p`, 8-aligned, for as many
                // descriptors as the index was checked against; `off + 16` is within it.
                // Volatile reads of plain integers: a guest changing the descriptor meanwhile
                // can only give us values we then check.
                unsafe {
                    (
                        p.add(off).cast::<u64>().read_volatile(),
                        p.add(off + 8).cast::<u64>().read_volatile(),
                    )
                }
            }
            Area::Guest(base) => {
                let addr = base.checked_add(off as u64)?;
                let lo: u64 = self.mem.read_obj(addr).ok()?;
                let hi: u64 = self.mem.read_obj(addr.checked_add(8)?).ok()?;
                (lo, hi)
            }
        };
        let hi = u64::from_le(hi);
        Some(Desc {
            addr: u64::from_le(lo),
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        })
    }

    /// Reads a little-endian u16 at `off` in `at`; `order` is Acquire for an index whose
    /// announced entries are read next.
    fn load_u16(
        &self,
        at: Area,
        off: usize,
        order: Ordering,
        what: &'static str,
    ) -> Result<u16, RingError> {
        let v = match at {
            Area::Host(p) => {
                // SAFETY: every caller passes an offset of a field inside the area `open`
                // mapped (and checked 2-aligned) for this ring's size; all fields are 2-aligned.
                // A volatile read of a plain integer the guest may be writing concurrently.
                let v = unsafe { p.add(off).cast::<u16>().read_volatile() };
                if order != Ordering::Relaxed {
                    // Orders the reads that follow after this one, as an acquire load would.
                    fence(Ordering::Acquire);
                }
                v
            }
            Area::Guest(base) => self
                .mem
                .load(base.unchecked_add(off as u64), order)
                .map_err(|_| RingError::OutsideMemory(what))?,
        };
        Ok(u16::from_le(v))
    }

    /// Stores a little-endian u16 at `off` in `at` (a used ring field).
    fn store_u16(&self, at: Area, off: usize, v: u16) {
        match at {
            Area::Host(p) => {
                // SAFETY: callers pass the offset of a 2-aligned field (flags, idx, avail_event)
                // inside the used ring `open` mapped and checked 4-aligned. A volatile store of
                // a plain integer; the guest only reads these fields.
                unsafe { p.add(off).cast::<u16>().write_volatile(v.to_le()) }
            }
            Area::Guest(base) => {
                let _ =
                    self.mem
                        .store(v.to_le(), base.unchecked_add(off as u64), Ordering::Relaxed);
            }
        }
    }
}

/// Finds `len` bytes at guest address `addr`: mapped in one piece when it is (and the host
/// address is `align`-aligned), else reached through vm-memory if the whole range is guest
/// memory. None if it is not.
fn area(mem: &Memory, addr: u64, len: usize, align: usize) -> Option<Area> {
    let start = GuestAddress(addr);
    addr.checked_add(len as u64)?;
    if let Ok(slice) = mem.get_slice(start, len) {
        let p = slice.ptr_guard_mut().as_ptr();
        if p as usize % align == 0 {
            return Some(Area::Host(p));
        }
    }
    GuestMemoryBackend::check_range(mem, start, len).then_some(Area::Guest(start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    /// The record of a ring whose last decision was ours (the state in the middle of a ring's
    /// life, where most tests are). Shared by tests running in parallel: never forgotten.
    static KNOWN: Signalled = Signalled {
        known: AtomicBool::new(true),
    };

    fn memory() -> Memory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
    }

    /// The mock lays its used ring over the end of its avail ring (used_event included); ours
    /// goes where nothing else is.
    const USED: GuestAddress = GuestAddress(0x4000);

    fn queue(mq: &MockSplitQueue<'_, Memory>) -> Queue {
        let mut q: Queue = mq.create_queue().unwrap();
        q.set_used_ring_address(Some(USED.0 as u32), Some(0));
        q
    }

    fn put_u16(mem: &Memory, at: GuestAddress, v: u16) {
        mem.write_obj(v.to_le(), at).unwrap();
    }

    fn get_u16(mem: &Memory, at: GuestAddress) -> u16 {
        u16::from_le(mem.read_obj(at).unwrap())
    }

    #[test]
    fn pops_chains_and_publishes_used_once() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        let descs = [
            desc(0x8000, 100, DESC_F_NEXT, 1),
            desc(0x9000, 200, 0, 0),
            desc(0xa000, 300, DESC_F_WRITE, 0),
        ];
        mq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = queue(&mq);
        let mut ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        let h0 = ring.pop().unwrap().unwrap();
        let b0 = ring.chain(h0).unwrap();
        assert_eq!((b0.readable_len(), b0.writable_len()), (300, 0));
        let h1 = ring.pop().unwrap().unwrap();
        let b1 = ring.chain(h1).unwrap();
        assert_eq!((b1.readable_len(), b1.writable_len()), (0, 300));
        assert_eq!(ring.pop().unwrap(), None);
        ring.push_used(h0, 0);
        ring.push_used(h1, 42);
        // A head past the ring names no slot: dropped.
        ring.push_used(16, 1);
        let used = USED;
        // Nothing visible before publishing.
        assert_eq!(get_u16(&mem, used.unchecked_add(2)), 0);
        ring.finish(&mut q);
        assert_eq!(get_u16(&mem, used.unchecked_add(2)), 2);
        assert_eq!((q.next_avail(), q.next_used()), (2, 2));
        let id: u32 = mem.read_obj(used.unchecked_add(4 + 8)).unwrap();
        let len: u32 = mem.read_obj(used.unchecked_add(4 + 8 + 4)).unwrap();
        assert_eq!((id, len), (u32::from(h1), 42));
    }

    #[test]
    fn rewind_gives_chains_back() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        mq.add_desc_chains(&[desc(0x8000, 64, DESC_F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = queue(&mq);
        let mut ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        let start = ring.next_avail();
        assert_eq!(ring.pop().unwrap(), Some(0));
        ring.rewind(start);
        ring.finish(&mut q);
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn refuses_loops_bad_links_and_bad_heads() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        // 0 -> 1 -> 0: a loop; 2 -> 9: a link past the table.
        let table = [
            desc(0x8000, 10, DESC_F_NEXT, 1),
            desc(0x8000, 10, DESC_F_NEXT, 0),
            desc(0x8000, 10, DESC_F_NEXT, 9),
            desc(0x8000, 10, 0, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mq.desc_table().store(i as u16, *d).unwrap();
        }
        let q: Queue = queue(&mq);
        let ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        assert_eq!(ring.chain(0).err(), Some(ChainError::Broken { head: 0 }));
        assert_eq!(ring.chain(2).err(), Some(ChainError::Broken { head: 2 }));
        assert_eq!(ring.chain(4).err(), Some(ChainError::Broken { head: 4 }));
        assert!(ring.chain(3).is_ok());
        // In place: nothing is left behind by a refused chain.
        let mut out = Vec::new();
        assert!(ring.chain_into(0, &mut out).is_err());
        assert!(out.is_empty());
        ring.chain_into(3, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].head(), 3);
    }

    #[test]
    fn refuses_buffers_outside_memory_and_readable_after_writable() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        let table = [
            desc(0xf_ff00, 0x200, 0, 0),
            desc(0x8000, 10, DESC_F_WRITE | DESC_F_NEXT, 2),
            desc(0x9000, 10, 0, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mq.desc_table().store(i as u16, *d).unwrap();
        }
        let q: Queue = queue(&mq);
        let ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        assert!(matches!(
            ring.chain(0),
            Err(ChainError::OutsideMemory { head: 0, .. })
        ));
        assert_eq!(
            ring.chain(1).err(),
            Some(ChainError::ReadableAfterWritable { head: 1 })
        );
    }

    // Found by the ring fuzz target (minimized): an empty device-writable descriptor, then a
    // device-readable one, was accepted.
    #[test]
    fn refuses_readable_after_an_empty_writable_descriptor() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        let table = [
            desc(0x8000, 0, DESC_F_WRITE | DESC_F_NEXT, 1),
            desc(0x9000, 16, 0, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mq.desc_table().store(i as u16, *d).unwrap();
        }
        let q: Queue = queue(&mq);
        let ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        let r = ring.chain(0);
        assert!(
            r.is_err(),
            "a readable buffer after a writable one was accepted"
        );
    }

    #[test]
    fn follows_one_indirect_table_only() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        let ind = 0x2_0000u64;
        // The indirect table: two buffers, then (as a table of its own) a nested one.
        let entries = [
            desc(0x8000, 12, DESC_F_NEXT, 1),
            desc(0x9000, 1500, DESC_F_WRITE, 0),
            desc(0x3_0000, 32, DESC_F_INDIRECT, 0),
        ];
        for (i, d) in entries.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(ind + 16 * i as u64))
                .unwrap();
        }
        let table = [
            desc(ind, 32, DESC_F_INDIRECT, 0),
            desc(ind + 32, 16, DESC_F_INDIRECT, 0),
            desc(ind, 24, DESC_F_INDIRECT, 0),
            desc(0xf_fff0, 32, DESC_F_INDIRECT, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mq.desc_table().store(i as u16, *d).unwrap();
        }
        let q: Queue = queue(&mq);
        let ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        let b = ring.chain(0).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (12, 1500));
        // Nested indirect, a table length not a multiple of 16, a table outside memory.
        for head in 1..4 {
            assert_eq!(ring.chain(head).err(), Some(ChainError::Broken { head }));
        }
    }

    #[test]
    fn chains_are_bounded_by_the_queue_size() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        let ind = 0x2_0000u64;
        // Four entries (the queue size) in a table: fine alone, too long after a direct buffer.
        for i in 0..4u16 {
            let flags = if i < 3 { DESC_F_NEXT } else { 0 };
            let d = desc(0x8000 + 0x100 * u64::from(i), 8, flags, i + 1);
            mem.write_obj(d, GuestAddress(ind + 16 * u64::from(i)))
                .unwrap();
        }
        let table = [
            desc(ind, 64, DESC_F_INDIRECT, 0),
            desc(0x9000, 8, DESC_F_NEXT, 2),
            desc(ind, 64, DESC_F_INDIRECT, 0),
            // Five entries: more than the queue holds.
            desc(ind, 80, DESC_F_INDIRECT, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mq.desc_table().store(i as u16, *d).unwrap();
        }
        let q: Queue = queue(&mq);
        let ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        assert_eq!(ring.chain(0).unwrap().readable_len(), 32);
        assert_eq!(
            ring.chain(1).err(),
            Some(ChainError::TooLong { head: 1, max: 4 })
        );
        assert_eq!(ring.chain(3).err(), Some(ChainError::Broken { head: 3 }));
    }

    #[test]
    fn empty_buffers_are_refused() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        mq.desc_table()
            .store(0, desc(0x8000, 0, DESC_F_WRITE, 0))
            .unwrap();
        let q: Queue = queue(&mq);
        let ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        assert_eq!(
            ring.chain(0).err(),
            Some(ChainError::ZeroLength {
                head: 0,
                addr: 0x8000
            })
        );
    }

    #[test]
    fn pending_and_skip_count_what_the_guest_made_available() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 8);
        let descs: Vec<_> = (0..3)
            .map(|i| desc(0x8000 + 0x100 * i, 64, DESC_F_WRITE, 0))
            .collect();
        mq.add_desc_chains(&descs, 0).unwrap();
        let q: Queue = queue(&mq);
        let mut ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        assert_eq!(ring.pending().unwrap(), 3);
        assert_eq!(ring.skip(2).unwrap(), 2);
        assert_eq!(ring.pending().unwrap(), 1);
        assert_eq!(ring.skip(5).unwrap(), 1);
        assert_eq!(ring.pop().unwrap(), None);
        ring.rewind(0);
        assert_eq!(ring.pop().unwrap(), Some(0));
    }

    #[test]
    fn ring_outside_memory_is_refused() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        let mut q: Queue = queue(&mq);
        q.set_used_ring_address(Some(0xf_fffc), Some(0));
        assert_eq!(
            Ring::open(&q, &mem, &KNOWN).err(),
            Some(RingError::OutsideMemory("used ring"))
        );
        q.set_ready(false);
        assert_eq!(
            Ring::open(&q, &mem, &KNOWN).err(),
            Some(RingError::NotReady)
        );
    }

    #[test]
    fn avail_index_too_far_ahead_is_an_error() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        let q: Queue = queue(&mq);
        put_u16(&mem, mq.avail_addr().unchecked_add(2), 5);
        let mut ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        assert!(matches!(
            ring.pop(),
            Err(RingError::AvailIndex { avail: 5, .. })
        ));
    }

    /// A 16-entry ring with EVENT_IDX holding four device-writable chains of 64 bytes, the
    /// guest's used_event at `used_event`.
    fn four_receive_chains(mem: &Memory, used_event: u16) -> (MockSplitQueue<'_, Memory>, Queue) {
        let mq = MockSplitQueue::new(mem, 16);
        let descs: Vec<_> = (0..4)
            .map(|i| desc(0x8000 + 0x100 * i, 64, DESC_F_WRITE, 0))
            .collect();
        mq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = queue(&mq);
        q.set_event_idx(true);
        put_u16(mem, mq.avail_addr().unchecked_add(4 + 2 * 16), used_event);
        (mq, q)
    }

    #[test]
    fn event_idx_interrupts_only_when_used_event_is_passed() {
        let mem = memory();
        // used_event = 2: the guest wants an interrupt once the used index passes 2.
        let (_mq, mut q) = four_receive_chains(&mem, 2);
        let mut ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        for _ in 0..2 {
            let h = ring.pop().unwrap().unwrap();
            ring.push_used(h, 64);
        }
        ring.publish_used();
        assert!(!ring.needs_interrupt());
        let h = ring.pop().unwrap().unwrap();
        ring.push_used(h, 64);
        ring.publish_used();
        assert!(ring.needs_interrupt());
        // Nothing new: no interrupt.
        assert!(!ring.needs_interrupt());
        // Re-arming kicks stores avail_event = next_avail and sees the fourth chain.
        assert!(ring.enable_kicks().unwrap());
        assert_eq!(get_u16(&mem, USED.unchecked_add(4 + 8 * 16)), 3);
        ring.finish(&mut q);
    }

    #[test]
    fn without_event_idx_no_interrupt_flag_is_honoured() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(&[desc(0x8000, 64, DESC_F_WRITE, 0)], 0)
            .unwrap();
        let q: Queue = queue(&mq);
        put_u16(&mem, mq.avail_addr(), AVAIL_F_NO_INTERRUPT);
        let mut ring = Ring::open(&q, &mem, &KNOWN).unwrap();
        let h = ring.pop().unwrap().unwrap();
        ring.push_used(h, 64);
        ring.publish_used();
        assert!(!ring.needs_interrupt());
        ring.disable_kicks();
        assert_eq!(get_u16(&mem, USED), USED_F_NO_NOTIFY);
        assert!(!ring.enable_kicks().unwrap());
        assert_eq!(get_u16(&mem, USED), 0);
        // Without the flag, every publication interrupts.
        put_u16(&mem, mq.avail_addr(), 0);
        ring.push_used(h, 64);
        ring.publish_used();
        assert!(ring.needs_interrupt());
    }

    /// A backend killed between publishing used entries and interrupting leaves the guest
    /// waiting with used_event already passed: the next process's first entry must interrupt
    /// anyway, or no later entry ever does (each one only "passes" used_event if it lies
    /// between the old and the new used index).
    #[test]
    fn the_first_decision_after_a_ring_start_interrupts_past_used_event() {
        let mem = memory();
        // used_event = 0: the guest asked to hear of the first entry. The dead process used
        // chain 0 (used index 1) and never interrupted.
        let (_mq, mut q) = four_receive_chains(&mem, 0);
        put_u16(&mem, USED.unchecked_add(2), 1);
        q.set_next_avail(1);
        q.set_next_used(1);
        for (known, expect) in [(true, false), (false, true)] {
            let signalled = Signalled::default();
            if known {
                signalled.set_known();
            }
            let mut ring = Ring::open(&q, &mem, &signalled).unwrap();
            let h = ring.pop().unwrap().unwrap();
            ring.push_used(h, 64);
            ring.publish_used();
            assert_eq!(ring.needs_interrupt(), expect, "record known: {known}");
            assert!(signalled.is_known());
            // Once decided, the usual rule again: nothing passes used_event 0 now.
            let h = ring.pop().unwrap().unwrap();
            ring.push_used(h, 64);
            ring.publish_used();
            assert!(!ring.needs_interrupt());
            put_u16(&mem, USED.unchecked_add(2), 1);
        }
    }

    /// A batch that publishes nothing decides nothing: the record stays forgotten for the
    /// batch that does.
    #[test]
    fn an_empty_batch_keeps_the_record_forgotten() {
        let mem = memory();
        let (_mq, mut q) = four_receive_chains(&mem, 7);
        let signalled = Signalled::default();
        let mut ring = Ring::open(&q, &mem, &signalled).unwrap();
        assert!(!ring.needs_interrupt());
        assert!(!signalled.is_known());
        ring.finish(&mut q);
        let mut ring = Ring::open(&q, &mem, &signalled).unwrap();
        let h = ring.pop().unwrap().unwrap();
        ring.push_used(h, 64);
        ring.publish_used();
        assert!(ring.needs_interrupt());
        ring.finish(&mut q);
    }
}
