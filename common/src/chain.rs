//! Descriptor-chain access: turns a guest's descriptor chain into validated slices of guest
//! memory and moves bytes between them and host file descriptors without staging copies.
//!
//! The checks a hostile or buggy driver can trip live in two places, one job each:
//! [`crate::ring::Ring::walk`] follows the chain (links, loops, indirect tables, a chain no
//! longer than the queue) and hands each buffer to [`GuestBuffers::push_buffer`], which checks
//! the buffer itself (inside guest memory, not empty, no device-readable buffer after a
//! device-writable one, the chain's total size). [`crate::ring::Ring::chain_into`] runs both;
//! there is no other way a backend turns descriptors into buffers, except
//! [`GuestBuffers::parse`], kept for code that still walks with virtio-queue's iterator: it
//! applies the same buffer checks but not the ring's bounds on chain length.

use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, VolatileSlice,
};

/// Guest memory as every backend maps it (no dirty-page bitmap: live migration is not offered).
pub type Memory = GuestMemoryMmap<()>;
/// Guest memory that the vhost-user front-end may replace at run time.
pub type MemoryAtomic = GuestMemoryAtomic<Memory>;
/// One region of [`Memory`].
pub type Region = GuestRegionMmap<()>;

/// Largest chain accepted, in bytes. Far above any real virtio-console or virtio-net buffer.
pub const MAX_CHAIN_BYTES: usize = 1 << 30;
/// Most segments one chain may be split into (descriptors, or regions they straddle).
pub const MAX_CHAIN_SEGMENTS: usize = 1024;

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The head or a `next` link points at nothing readable: a loop, an index past the table,
    /// a descriptor table outside memory or a broken indirect table.
    #[error(
        "descriptor chain from head {head} is broken (loop, bad next index or bad indirect table)"
    )]
    Broken {
        /// Head index of the chain.
        head: u16,
    },
    /// A buffer is not (entirely) inside guest memory.
    #[error("descriptor {addr:#x}+{len} of chain {head} lies outside guest memory")]
    OutsideMemory {
        /// Head index of the chain.
        head: u16,
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one (virtio 1.2, 2.7.4.2).
    #[error("chain {head} has a device-readable descriptor after a device-writable one")]
    ReadableAfterWritable {
        /// Head index of the chain.
        head: u16,
    },
    /// The chain is larger than [`MAX_CHAIN_BYTES`] or has more than [`MAX_CHAIN_SEGMENTS`] parts.
    #[error("chain {head} is too large")]
    TooLarge {
        /// Head index of the chain.
        head: u16,
    },
    /// The chain has more buffers than the queue size, which a driver must not build
    /// (virtio 1.2, 2.7.13.1).
    #[error("chain {head} has more than {max} buffers (the queue size)")]
    TooLong {
        /// Head index of the chain.
        head: u16,
        /// The queue size.
        max: u16,
    },
    /// A buffer of length zero. No driver needs one and QEMU refuses them too ("zero sized
    /// buffers are not allowed"); accepting them would let a chain cost work without bytes.
    #[error("chain {head} has an empty buffer at {addr:#x}")]
    ZeroLength {
        /// Head index of the chain.
        head: u16,
        /// Guest physical address of the empty buffer.
        addr: u64,
    },
}

/// Segments one chain keeps without allocating; nearly every chain has one or two. Kept small
/// because a chain is built and moved for every packet: 2 instead of 4 made 64-byte
/// guest-to-guest forwarding about 8% cheaper.
const INLINE_SEGMENTS: usize = 2;

/// A chain's segments: inline while few, on the heap beyond [`INLINE_SEGMENTS`]. Parsing a
/// chain is on every packet's path, and an allocation per chain cost about a fifth of it.
enum Segments<'a> {
    Empty,
    Inline(usize, [VolatileSlice<'a, ()>; INLINE_SEGMENTS]),
    Heap(Vec<VolatileSlice<'a, ()>>),
}

impl<'a> Segments<'a> {
    fn new() -> Self {
        Segments::Empty
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn push(&mut self, s: VolatileSlice<'a, ()>) {
        match self {
            // The unused places hold copies of the first slice; only `..n` is ever read.
            Segments::Empty => {
                *self = Segments::Inline(1, [s; INLINE_SEGMENTS]);
            }
            Segments::Inline(n, a) if *n < INLINE_SEGMENTS => {
                a[*n] = s;
                *n += 1;
            }
            Segments::Inline(_, a) => {
                let mut v = Vec::with_capacity(4 * INLINE_SEGMENTS);
                v.extend_from_slice(&a[..]);
                v.push(s);
                *self = Segments::Heap(v);
            }
            Segments::Heap(v) => v.push(s),
        }
    }

    fn as_slice(&self) -> &[VolatileSlice<'a, ()>] {
        match self {
            Segments::Empty => &[],
            Segments::Inline(n, a) => &a[..*n],
            Segments::Heap(v) => v,
        }
    }
}

/// The validated buffers of one descriptor chain: first the device-readable part (what the
/// guest sends), then the device-writable part (where the device answers).
pub struct GuestBuffers<'a> {
    head: u16,
    /// Readable segments first, then writable ones.
    segments: Segments<'a>,
    /// How many of `segments` are readable.
    readable_segments: usize,
    readable_len: usize,
    writable_len: usize,
    /// A device-writable descriptor was added (an empty one maps no segment, so the segments
    /// alone cannot tell).
    writable_seen: bool,
}

impl<'a> GuestBuffers<'a> {
    /// Walks `chain` (following indirect tables) and maps every buffer into `mem`.
    pub fn parse<M>(chain: &DescriptorChain<M>, mem: &'a Memory) -> Result<Self, ChainError>
    where
        M: Deref + Clone,
        M::Target: vm_memory::GuestMemory,
    {
        let head = chain.head_index();
        let mut bufs = GuestBuffers::empty(head);
        let mut last: Option<Descriptor> = None;
        for desc in chain.clone() {
            bufs.push_buffer(mem, desc.addr().0, desc.len(), desc.is_write_only())?;
            last = Some(desc);
        }
        match last {
            // The iterator stops early, without an error, on a loop or a bad link; a last
            // descriptor that still says "next" is how that shows.
            Some(d) if !d.has_next() => Ok(bufs),
            _ => Err(ChainError::Broken { head }),
        }
    }

    fn readable(&self) -> &[VolatileSlice<'a, ()>] {
        &self.segments.as_slice()[..self.readable_segments]
    }

    fn writable(&self) -> &[VolatileSlice<'a, ()>] {
        &self.segments.as_slice()[self.readable_segments..]
    }

    /// A chain with no buffers yet, for ring code that walks descriptors itself and adds them
    /// with [`GuestBuffers::push_buffer`]. Walking (links, loops, indirect tables) is then that
    /// code's job; the checks on each buffer stay here.
    pub fn empty(head: u16) -> Self {
        GuestBuffers {
            head,
            segments: Segments::new(),
            readable_segments: 0,
            readable_len: 0,
            writable_len: 0,
            writable_seen: false,
        }
    }

    /// Adds the buffer of one descriptor (`len` bytes at guest address `addr`, device-writable
    /// if `write`), mapped into `mem`. Refuses, in this order, a readable buffer after a
    /// writable one, chains beyond [`MAX_CHAIN_BYTES`], empty buffers, buffers outside memory
    /// and chains beyond [`MAX_CHAIN_SEGMENTS`].
    pub fn push_buffer(
        &mut self,
        mem: &'a Memory,
        addr: u64,
        len: u32,
        write: bool,
    ) -> Result<(), ChainError> {
        self.push_buffer_in(mem, None, addr, len, write)
    }

    /// [`GuestBuffers::push_buffer`], looking in `region` first: ring code whose buffers
    /// nearly all lie in one region saves finding it for each (a lookup on every packet's
    /// path). Same checks, same result.
    pub fn push_buffer_in(
        &mut self,
        mem: &'a Memory,
        region: Option<&'a Region>,
        addr: u64,
        len: u32,
        write: bool,
    ) -> Result<(), ChainError> {
        let head = self.head;
        let desc_len = len;
        let len = len as usize;
        let outside = || ChainError::OutsideMemory {
            head,
            addr,
            len: desc_len,
        };
        if write {
            self.writable_seen = true;
            self.writable_len += len;
        } else {
            if self.writable_seen {
                return Err(ChainError::ReadableAfterWritable { head });
            }
            self.readable_len += len;
        }
        if self.readable_len + self.writable_len > MAX_CHAIN_BYTES {
            return Err(ChainError::TooLarge { head });
        }
        if len == 0 {
            return Err(ChainError::ZeroLength { head, addr });
        }
        addr.checked_add(len as u64).ok_or_else(outside)?;
        // Counted per part, as the limit always was.
        let in_part = |segments: usize, readable: usize| {
            if write {
                segments - readable
            } else {
                segments
            }
        };
        if in_part(self.segments.len(), self.readable_segments) >= MAX_CHAIN_SEGMENTS {
            return Err(ChainError::TooLarge { head });
        }
        // Nearly every buffer lies inside one region: one lookup (none with the right hint)
        // instead of the general iterator, which costs several times more per descriptor on
        // the packet path.
        let one = match region {
            Some(r)
                if addr >= r.start_addr().0 && addr - r.start_addr().0 + len as u64 <= r.len() =>
            {
                r.get_slice(MemoryRegionAddress(addr - r.start_addr().0), len)
            }
            _ => mem.get_slice(GuestAddress(addr), len),
        };
        if let Ok(slice) = one {
            self.segments.push(slice);
            if !write {
                self.readable_segments += 1;
            }
            return Ok(());
        }
        let mut mapped = 0usize;
        for slice in mem.get_slices(GuestAddress(addr), len) {
            let slice = slice.map_err(|_| outside())?;
            mapped += slice.len();
            if in_part(self.segments.len(), self.readable_segments) >= MAX_CHAIN_SEGMENTS {
                return Err(ChainError::TooLarge { head });
            }
            self.segments.push(slice);
            if !write {
                self.readable_segments += 1;
            }
        }
        if mapped != len {
            return Err(outside());
        }
        Ok(())
    }

    /// Guest memory segments the chain maps to (one per buffer, more where a buffer straddles
    /// memory regions): a measure of the work the chain costs.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Head index of the chain, to hand back with `add_used`.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Bytes the guest offered to the device.
    pub fn readable_len(&self) -> usize {
        self.readable_len
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    /// Copies readable bytes starting at `offset` into `out`; returns how many were copied.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> usize {
        let mut done = 0;
        for_each_range(self.readable(), offset, out.len(), |s| {
            done += s.copy_to(&mut out[done..]);
        });
        done
    }

    /// Copies `data` into the writable part starting at `offset`; returns how many bytes fit.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        // Headers written per packet nearly always fall in the first buffer: one slice, no
        // walk.
        if let Some(first) = self.writable().first() {
            if offset + data.len() <= first.len() {
                if let Ok(s) = first.subslice(offset, data.len()) {
                    s.copy_from(data);
                    return data.len();
                }
            }
        }
        let mut done = 0;
        for_each_range(self.writable(), offset, data.len(), |s| {
            let n = s.len().min(data.len() - done);
            s.copy_from(&data[done..done + n]);
            done += n;
        });
        done
    }

    /// The readable bytes from `offset` on as I/O slices over guest memory, for a `writev`
    /// done elsewhere.
    pub fn readable_io_slices(&self, offset: usize) -> Vec<io::IoSlice<'_>> {
        let mut v = Vec::with_capacity(self.readable_segments);
        for_each_range(self.readable(), offset, usize::MAX, |s| {
            // SAFETY: the slice lies in guest memory mapped for the lifetime of the borrowed
            // `Memory`; bytes are plain data, so a guest changing them concurrently can at
            // worst change what is sent, never break memory safety.
            let bytes = unsafe { std::slice::from_raw_parts(s.ptr_guard().as_ptr(), s.len()) };
            v.push(io::IoSlice::new(bytes));
        });
        v
    }

    /// Writes readable bytes from `offset` on straight from guest memory to `fd` (one
    /// `writev`). Returns what the kernel took; may be short for non-blocking descriptors.
    pub fn write_readable_to(&self, fd: &impl AsRawFd, offset: usize) -> io::Result<usize> {
        let iov = iovecs(self.readable(), offset, usize::MAX, false);
        if iov.is_empty() {
            return Ok(0);
        }
        writev(fd.as_raw_fd(), &iov)
    }

    /// Reads from `fd` straight into the writable part from `offset` on (one `readv`), at most
    /// `max` bytes. Returns the byte count; 0 means end of file.
    pub fn read_writable_from(
        &self,
        fd: &impl AsRawFd,
        offset: usize,
        max: usize,
    ) -> io::Result<usize> {
        let iov = iovecs(self.writable(), offset, max, true);
        if iov.is_empty() {
            return Ok(0);
        }
        readv(fd.as_raw_fd(), &iov)
    }

    /// The readable bytes from `offset` on (at most `max`) as `iovec`s pointing into guest
    /// memory, for batched system calls such as `sendmmsg`. The pointers stay valid while the
    /// `Memory` this chain was parsed against is borrowed.
    pub fn readable_iovecs(&self, offset: usize, max: usize) -> Vec<libc::iovec> {
        iovecs(self.readable(), offset, max, false)
    }

    /// Copies readable bytes of `self` (from `src_offset`) into the writable part of `dst`
    /// (from `dst_offset`), guest memory to guest memory, possibly of two different guests.
    /// Returns the number of bytes copied.
    pub fn copy_to(&self, src_offset: usize, dst: &GuestBuffers<'_>, dst_offset: usize) -> usize {
        let want = self
            .readable_len
            .saturating_sub(src_offset)
            .min(dst.writable_len.saturating_sub(dst_offset));
        // Walk both segment lists side by side, no staging lists: this runs once per frame.
        let (src, dst) = (self.readable(), dst.writable());
        let (mut si, mut so) = skip_to(src, src_offset);
        let (mut di, mut doff) = skip_to(dst, dst_offset);
        let mut done = 0;
        while done < want && si < src.len() && di < dst.len() {
            let (s, d) = (&src[si], &dst[di]);
            let n = (s.len() - so).min(d.len() - doff).min(want - done);
            // Both offsets are in range: n never exceeds the remaining length of either slice.
            if let (Ok(s2), Ok(d2)) = (s.subslice(so, n), d.subslice(doff, n)) {
                s2.copy_to_volatile_slice(d2);
            }
            so += n;
            doff += n;
            done += n;
            if so == s.len() {
                si += 1;
                so = 0;
            }
            if doff == d.len() {
                di += 1;
                doff = 0;
            }
        }
        done
    }
}

/// The segment index and offset in it where byte `offset` of `list` lies.
fn skip_to(list: &[VolatileSlice<'_, ()>], mut offset: usize) -> (usize, usize) {
    for (i, s) in list.iter().enumerate() {
        if offset < s.len() {
            return (i, offset);
        }
        offset -= s.len();
    }
    (list.len(), 0)
}

/// Calls `f` with the sub-slices of `list` covering `len` bytes from `offset`.
fn for_each_range<'a>(
    list: &[VolatileSlice<'a, ()>],
    mut offset: usize,
    mut len: usize,
    mut f: impl FnMut(VolatileSlice<'a, ()>),
) {
    for s in list {
        if len == 0 {
            break;
        }
        if offset >= s.len() {
            offset -= s.len();
            continue;
        }
        let n = (s.len() - offset).min(len);
        if let Ok(part) = s.subslice(offset, n) {
            f(part);
        }
        offset = 0;
        len -= n;
    }
}

fn iovecs(
    list: &[VolatileSlice<'_, ()>],
    offset: usize,
    max: usize,
    _for_write: bool,
) -> Vec<libc::iovec> {
    let mut iov = Vec::with_capacity(list.len());
    for_each_range(list, offset, max, |s| {
        iov.push(libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
    });
    iov.truncate(libc::UIO_MAXIOV as usize);
    iov
}

fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: every iovec points into guest memory mapped for the lifetime of the borrowed
    // `Memory` that produced the slices, and the kernel only reads from them.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: every iovec points into device-writable guest memory mapped for the lifetime of
    // the borrowed `Memory`; the kernel writes at most `iov_len` bytes into each.
    let n = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn mem() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
    }

    #[test]
    fn readable_then_writable_chain_maps_and_copies() {
        let m = mem();
        m.write_slice(b"hello ", GuestAddress(0x10_0000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x10_1000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[
                raw(0x10_0000, 6, 0, 0),
                raw(0x10_1000, 5, 0, 0),
                raw(0x10_2000, 8, W, 0),
            ])
            .unwrap();
        let b = GuestBuffers::parse(&chain, &m).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (11, 8));
        let mut out = [0u8; 11];
        assert_eq!(b.read_at(0, &mut out), 11);
        assert_eq!(&out, b"hello world");
        let mut tail = [0u8; 4];
        assert_eq!(b.read_at(7, &mut tail), 4);
        assert_eq!(&tail, b"orld");
        assert_eq!(b.write_at(0, b"0123456789"), 8);
        let mut back = [0u8; 8];
        m.read_slice(&mut back, GuestAddress(0x10_2000)).unwrap();
        assert_eq!(&back, b"01234567");
        let io = b.readable_io_slices(3);
        let joined: Vec<u8> = io.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(joined, b"lo world");
    }

    #[test]
    fn guest_to_guest_copy_spans_segments() {
        let m = mem();
        m.write_slice(b"abcdefgh", GuestAddress(0x10_0000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let src = q
            .build_desc_chain(&[raw(0x10_0000, 3, 0, 0), raw(0x10_0003, 5, 0, 0)])
            .unwrap();
        let src = GuestBuffers::parse(&src, &m).unwrap();
        let q2 = MockSplitQueue::create(&m, GuestAddress(0x1_0000), 16);
        let dst = q2
            .build_desc_chain(&[raw(0x18_0000, 4, W, 0), raw(0x18_1000, 4, W, 0)])
            .unwrap();
        let dst = GuestBuffers::parse(&dst, &m).unwrap();
        assert_eq!(src.copy_to(1, &dst, 0), 7);
        let mut a = [0u8; 4];
        let mut b = [0u8; 3];
        m.read_slice(&mut a, GuestAddress(0x18_0000)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x18_1000)).unwrap();
        assert_eq!((&a, &b), (b"bcde", b"fgh"));
    }

    #[test]
    fn chains_longer_than_the_inline_segments_keep_every_byte() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let mut descs = Vec::new();
        for i in 0..6u64 {
            m.write_slice(&[b'a' + i as u8; 3], GuestAddress(0x10_0000 + i * 0x100))
                .unwrap();
            descs.push(raw(0x10_0000 + i * 0x100, 3, 0, 0));
        }
        for i in 0..5u64 {
            descs.push(raw(0x18_0000 + i * 0x100, 4, W, 0));
        }
        let chain = q.build_desc_chain(&descs).unwrap();
        let b = GuestBuffers::parse(&chain, &m).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (18, 20));
        let mut out = [0u8; 18];
        assert_eq!(b.read_at(0, &mut out), 18);
        assert_eq!(&out, b"aaabbbcccdddeeefff");
        assert_eq!(b.copy_to(2, &b, 1), 16);
        let mut back = [0u8; 20];
        for i in 0..5u64 {
            m.read_slice(
                &mut back[i as usize * 4..][..4],
                GuestAddress(0x18_0000 + i * 0x100),
            )
            .unwrap();
        }
        assert_eq!(&back[1..17], b"abbbcccdddeeefff");
        assert_eq!(b.readable_iovecs(0, usize::MAX).len(), 6);
    }

    #[test]
    fn refuses_buffers_outside_memory() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(&[raw(0x1f_ff00, 0x200, 0, 0)]).unwrap();
        assert!(matches!(
            GuestBuffers::parse(&chain, &m),
            Err(ChainError::OutsideMemory { .. })
        ));
        let chain = q.build_desc_chain(&[raw(u64::MAX - 4, 16, W, 0)]).unwrap();
        assert!(matches!(
            GuestBuffers::parse(&chain, &m),
            Err(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn refuses_readable_after_writable() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[raw(0x10_0000, 8, W, 0), raw(0x10_1000, 8, 0, 0)])
            .unwrap();
        assert!(matches!(
            GuestBuffers::parse(&chain, &m),
            Err(ChainError::ReadableAfterWritable { .. })
        ));
    }

    // Found by the ring fuzz target: an empty device-writable buffer mapped no segment, so a
    // device-readable buffer after it passed the order check.
    #[test]
    fn refuses_readable_after_an_empty_writable_buffer() {
        let m = mem();
        let mut b = GuestBuffers::empty(3);
        b.push_buffer(&m, 0x10_0000, 0, true).ok();
        assert_eq!(
            b.push_buffer(&m, 0x10_1000, 8, false),
            Err(ChainError::ReadableAfterWritable { head: 3 })
        );
    }

    #[test]
    fn refuses_a_next_loop() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        // Two descriptors pointing at each other: the walk runs out of its budget while the
        // last descriptor still says NEXT.
        q.add_desc_chains(&[raw(0x10_0000, 8, N, 1), raw(0x10_1000, 8, N, 0)], 0)
            .unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &m).unwrap();
        assert_eq!(
            GuestBuffers::parse(&chain, &m).err(),
            Some(ChainError::Broken { head: 0 })
        );
    }
}
