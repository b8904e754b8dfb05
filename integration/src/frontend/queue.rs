//! A split-virtqueue driver: what a guest's virtio driver does with one queue.
//!
//! The rings live in [`GuestRam`]; the device (the backend under test) reads the descriptor
//! table and avail ring and writes the used ring. All ring accesses go through raw pointers into
//! the shared mapping (volatile for entries, atomic for the indices), so the data path does no
//! region lookups and no allocation.

use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::memory::{GuestBuffer, GuestRam};
use super::Error;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is a table of descriptors (VIRTIO_RING_F_INDIRECT_DESC).
pub const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Largest split queue the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const DESC_SIZE: u64 = 16;

/// One part of a descriptor chain, as [`DriverQueue::add_chain`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True if the device writes it (driver receives), false if the device reads it.
    pub device_writable: bool,
}

impl Segment {
    /// A buffer the device reads (driver to device, e.g. a transmit buffer).
    pub fn readable(buf: GuestBuffer) -> Segment {
        Segment {
            addr: buf.addr,
            len: buf.len,
            device_writable: false,
        }
    }

    /// A buffer the device writes (device to driver, e.g. a receive buffer).
    pub fn writable(buf: GuestBuffer) -> Segment {
        Segment {
            addr: buf.addr,
            len: buf.len,
            device_writable: true,
        }
    }
}

/// A raw split-ring descriptor, exactly as it sits in guest memory (for the raw interface).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor index when `flags` has [`DESC_F_NEXT`].
    pub next: u16,
}

impl Descriptor {
    /// The 16 bytes of this descriptor in guest (little-endian) layout.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn from_words(lo: u64, hi: u64) -> Descriptor {
        Descriptor {
            addr: u64::from_le(lo),
            len: (u64::from_le(hi) & 0xffff_ffff) as u32,
            flags: ((u64::from_le(hi) >> 32) & 0xffff) as u16,
            next: (u64::from_le(hi) >> 48) as u16,
        }
    }

    fn to_words(self) -> (u64, u64) {
        let hi = u64::from(self.len) | (u64::from(self.flags) << 32) | (u64::from(self.next) << 48);
        (self.addr.to_le(), hi.to_le())
    }
}

/// A buffer the device returned through the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the chain (what `add_chain` returned).
    pub head: u16,
    /// Bytes the device says it wrote into the chain's device-writable part.
    pub len: u32,
}

/// How to build a queue. [`super::Connection::start_queue`] fills this from the negotiated
/// features; build one yourself to drive a queue differently from what was negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue index on the device.
    pub index: u16,
    /// Ring size: a power of two, 1..=32768.
    pub size: u16,
    /// Use used_event/avail_event (VIRTIO_RING_F_EVENT_IDX).
    pub event_idx: bool,
    /// Entries per indirect table, 0 for no indirect chains. One table per descriptor slot is
    /// allocated up front, so this costs `size * indirect_max * 16` bytes of guest RAM.
    pub indirect_max: u16,
}

impl QueueConfig {
    /// A queue without EVENT_IDX or indirect tables; set the fields to change that.
    pub fn new(index: u16, size: u16) -> QueueConfig {
        QueueConfig {
            index,
            size,
            event_idx: false,
            indirect_max: 0,
        }
    }
}

/// Guest-physical addresses of a queue's three areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table.
    pub desc: u64,
    /// Avail (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// The driver side of one split virtqueue.
///
/// Normal use: [`add_chain`](Self::add_chain) / [`add_indirect_chain`](Self::add_indirect_chain),
/// then [`kick`](Self::kick), then [`wait_used`](Self::wait_used) or
/// [`poll_used`](Self::poll_used). Descriptors are recycled when their chain comes back used.
///
/// The `raw_*` methods write whatever the test asks for, for feeding a backend what a real
/// driver never would; they leave the normal bookkeeping alone, so a test can mix both.
pub struct DriverQueue {
    ram: GuestRam,
    index: u16,
    size: u16,
    event_idx: bool,
    layout: RingLayout,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    /// Indirect tables: guest address, host pointer, entries per table.
    indirect: Option<(u64, *mut u8, u16)>,
    /// Free descriptor indices, used as a stack.
    free: Vec<u16>,
    /// Host copy of each descriptor's `next`, so recycling never trusts guest memory.
    shadow_next: Vec<u16>,
    /// Per head: descriptors in its chain, 0 when not in flight.
    chain_len: Vec<u16>,
    /// Per head: total device-writable bytes, to check the used length.
    writable_len: Vec<u64>,
    /// Per head: outstanding raw publishes of that index.
    raw_outstanding: Vec<u32>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    calls_enabled: bool,
    /// Avail index the device reported with GET_VRING_BASE when last stopped.
    stopped_base: Option<u16>,
    kick: EventFd,
    call: EventFd,
}

// SAFETY: the raw pointers point into mappings owned by `ram` (an Arc shared by all clones), which
// lives as long as this queue; nothing about them is tied to the creating thread.
unsafe impl Send for DriverQueue {}

impl DriverQueue {
    /// Build a queue in `ram`: allocates the rings (and indirect tables), zeroes them, and makes
    /// the kick and call eventfds. Does not talk to any backend; see
    /// [`super::Connection::attach_queue`].
    pub fn new(ram: &GuestRam, cfg: QueueConfig) -> Result<DriverQueue, Error> {
        let size = cfg.size;
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(Error::BadQueueSize(size));
        }
        let n = u64::from(size);
        let desc_len = DESC_SIZE * n;
        let avail_len = 6 + 2 * n;
        let used_len = 6 + 8 * n;
        // Whole pages each: the driver-written and device-written areas never share a cache
        // line, and no test buffer shares a page with a ring.
        let page = |len: u64| len32(len.next_multiple_of(4096));
        let desc = ram.alloc_aligned(page(desc_len)?, 4096)?;
        let avail = ram.alloc_aligned(page(avail_len)?, 4096)?;
        let used = ram.alloc_aligned(page(used_len)?, 4096)?;
        for b in [desc, avail, used] {
            zero(ram, b)?;
        }
        let indirect = if cfg.indirect_max > 0 {
            let table =
                ram.alloc_aligned(len32(n * u64::from(cfg.indirect_max) * DESC_SIZE)?, 4096)?;
            let ptr = ram.host_ptr(table.addr, u64::from(table.len))?;
            Some((table.addr, ptr, cfg.indirect_max))
        } else {
            None
        };
        Ok(DriverQueue {
            index: cfg.index,
            size,
            event_idx: cfg.event_idx,
            layout: RingLayout {
                desc: desc.addr,
                avail: avail.addr,
                used: used.addr,
            },
            desc: ram.host_ptr(desc.addr, desc_len)?,
            avail: ram.host_ptr(avail.addr, avail_len)?,
            used: ram.host_ptr(used.addr, used_len)?,
            indirect,
            // Reversed so the first chains use descriptors 0, 1, 2, ... (easier to read in logs).
            free: (0..size).rev().collect(),
            shadow_next: vec![0; usize::from(size)],
            chain_len: vec![0; usize::from(size)],
            writable_len: vec![0; usize::from(size)],
            raw_outstanding: vec![0; usize::from(size)],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            calls_enabled: true,
            stopped_base: None,
            // Close-on-exec: a backend this process starts later must not inherit them.
            kick: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?,
            call: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?,
            ram: ram.clone(),
        })
    }

    /// Queue index on the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether this queue uses EVENT_IDX suppression.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Guest-physical addresses of the rings.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The guest RAM this queue lives in.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Descriptors currently free for [`add_chain`](Self::add_chain).
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains made available and not yet returned used.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// The avail index this driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used-ring index this driver will consume.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }

    /// The used index the device has published.
    pub fn used_idx(&self) -> u16 {
        self.used_idx_atomic().load(Ordering::Acquire)
    }

    /// avail_event as the device last wrote it (meaningful with EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        // SAFETY: the used area is 6 + 8 * size bytes, so offset 4 + 8 * size is in bounds and
        // 2-aligned (the area is page-aligned).
        unsafe {
            u16::from_le(ptr::read_volatile(
                self.used.add(4 + 8 * usize::from(self.size)) as *const u16,
            ))
        }
    }

    /// The device's used-ring flags (e.g. VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        // SAFETY: offset 0 of the used area, 2-aligned.
        unsafe { u16::from_le(ptr::read_volatile(self.used as *const u16)) }
    }

    /// Avail index given with SET_VRING_BASE when (re)attaching: the device's answer to the
    /// last GET_VRING_BASE, or the used index if it was never stopped cleanly (what QEMU does
    /// after a backend vanished).
    pub fn resume_base(&self) -> u16 {
        self.stopped_base.unwrap_or_else(|| self.used_idx())
    }

    pub(crate) fn set_stopped_base(&mut self, base: Option<u16>) {
        self.stopped_base = base;
    }

    /// Before the queue is first attached: act as if `idx` buffers had already gone through it,
    /// so the avail and used indices start at `idx` (e.g. 65530, to cross the 16-bit wrap
    /// early). Errors if chains are in flight.
    pub fn start_at(&mut self, idx: u16) -> Result<(), Error> {
        if self.in_flight() != 0 {
            return Err(Error::InFlight {
                queue: self.index,
                count: self.in_flight(),
            });
        }
        self.avail_idx = idx;
        self.kicked_idx = idx;
        self.last_used = idx;
        self.avail_idx_atomic()
            .store(idx.to_le(), Ordering::Release);
        self.used_idx_atomic().store(idx.to_le(), Ordering::Release);
        if self.event_idx {
            self.store_used_event(idx);
        }
        Ok(())
    }

    /// The eventfd the driver writes to notify the device.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device writes to interrupt the driver.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Add a chain of segments: device-readable ones first, then device-writable ones (the
    /// order the spec demands). Publishes it in the avail ring; call [`kick`](Self::kick) to
    /// tell the device. Returns the head descriptor index, which comes back in [`UsedElem`].
    pub fn add_chain(&mut self, segs: &[Segment]) -> Result<u16, Error> {
        check_order(segs)?;
        let n = segs.len();
        if n > self.free.len() {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: n,
                free: self.free.len(),
            });
        }
        let start = self.free.len() - n;
        let mut writable = 0u64;
        for (k, seg) in segs.iter().enumerate() {
            let id = self.free[self.free.len() - 1 - k];
            let last = k + 1 == n;
            let next = if last {
                0
            } else {
                self.free[self.free.len() - 2 - k]
            };
            let mut flags = if last { 0 } else { DESC_F_NEXT };
            if seg.device_writable {
                flags |= DESC_F_WRITE;
                writable += u64::from(seg.len);
            }
            self.store_desc(
                id,
                Descriptor {
                    addr: seg.addr,
                    len: seg.len,
                    flags,
                    next,
                },
            );
            self.shadow_next[usize::from(id)] = next;
        }
        let head = self.free[self.free.len() - 1];
        self.free.truncate(start);
        self.chain_len[usize::from(head)] = n as u16;
        self.writable_len[usize::from(head)] = writable;
        self.publish(head);
        Ok(head)
    }

    /// Add a chain as one INDIRECT descriptor pointing at a table of the segments. Needs
    /// `indirect_max > 0` in the [`QueueConfig`] (set when INDIRECT_DESC was negotiated).
    pub fn add_indirect_chain(&mut self, segs: &[Segment]) -> Result<u16, Error> {
        check_order(segs)?;
        let (table_base, table_ptr, max) = self
            .indirect
            .ok_or(Error::IndirectDisabled { queue: self.index })?;
        if segs.len() > usize::from(max) {
            return Err(Error::IndirectTooLong {
                len: segs.len(),
                max,
            });
        }
        let head = self.free.pop().ok_or(Error::QueueFull {
            queue: self.index,
            needed: 1,
            free: 0,
        })?;
        let slot = usize::from(head) * usize::from(max);
        let mut writable = 0u64;
        for (k, seg) in segs.iter().enumerate() {
            let last = k + 1 == segs.len();
            let mut flags = if last { 0 } else { DESC_F_NEXT };
            if seg.device_writable {
                flags |= DESC_F_WRITE;
                writable += u64::from(seg.len);
            }
            let d = Descriptor {
                addr: seg.addr,
                len: seg.len,
                flags,
                next: if last { 0 } else { k as u16 + 1 },
            };
            // SAFETY: the table area holds size * max descriptors; head < size and k < max, so
            // slot + k is in bounds, and the area is page-aligned so each entry is 8-aligned.
            unsafe { write_desc_at(table_ptr.add((slot + k) * DESC_SIZE as usize), d) };
        }
        self.store_desc(
            head,
            Descriptor {
                addr: table_base + slot as u64 * DESC_SIZE,
                len: segs.len() as u32 * DESC_SIZE as u32,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
        );
        self.chain_len[usize::from(head)] = 1;
        self.writable_len[usize::from(head)] = writable;
        self.publish(head);
        Ok(head)
    }

    /// Notify the device if it asked to be notified (avail_event with EVENT_IDX, otherwise the
    /// used ring's NO_NOTIFY flag), like Linux's `virtqueue_kick`. Returns whether it kicked.
    pub fn kick(&mut self) -> Result<bool, Error> {
        // The avail idx store must be visible before we read the device's suppression state,
        // or both sides could decide the other will act.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kicked_idx;
        self.kicked_idx = new;
        let needed = if self.event_idx {
            need_event(self.avail_event(), new, old)
        } else {
            self.used_flags() & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if needed {
            self.notify()?;
        }
        Ok(needed)
    }

    /// Write the kick eventfd regardless of suppression.
    pub fn notify(&self) -> Result<(), Error> {
        self.kick.write(1).map_err(|source| Error::Kick {
            queue: self.index,
            source,
        })
    }

    /// Take one used buffer if the device has returned any, recycling its descriptors.
    ///
    /// Errors (after consuming the entry) if the device returned an id it was never given or a
    /// length beyond the chain's writable capacity.
    pub fn poll_used(&mut self) -> Result<Option<UsedElem>, Error> {
        let used_idx = self.used_idx();
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.size {
            return Err(Error::UsedIdxAhead {
                queue: self.index,
                used: used_idx,
                last_used: self.last_used,
            });
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: slot < size, so the 8-byte element at 4 + 8 * slot is inside the used area,
        // and 4-aligned.
        let (id, len) = unsafe {
            let elem = self.used.add(4 + 8 * slot);
            (
                u32::from_le(ptr::read_volatile(elem as *const u32)),
                u32::from_le(ptr::read_volatile(elem.add(4) as *const u32)),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx && self.calls_enabled {
            self.store_used_event(self.last_used);
        }
        let unexpected = Error::UnexpectedUsedId {
            queue: self.index,
            id,
        };
        let Ok(head) = u16::try_from(id) else {
            return Err(unexpected);
        };
        if head >= self.size {
            return Err(unexpected);
        }
        let h = usize::from(head);
        if self.chain_len[h] > 0 {
            let capacity = self.writable_len[h];
            self.recycle(head);
            if u64::from(len) > capacity {
                return Err(Error::UsedLenTooLong {
                    queue: self.index,
                    head,
                    len,
                    capacity,
                });
            }
        } else if self.raw_outstanding[h] > 0 {
            self.raw_outstanding[h] -= 1;
        } else {
            return Err(unexpected);
        }
        Ok(Some(UsedElem { head, len }))
    }

    /// Wait up to `timeout` for one used buffer, sleeping on the call eventfd.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<UsedElem, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(elem) = self.poll_used()? {
                return Ok(elem);
            }
            // Ask for a call, then look again: the device may have used a buffer before it
            // could see the request.
            self.request_call();
            fence(Ordering::SeqCst);
            if self.used_idx() != self.last_used {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    queue: self.index,
                    timeout,
                });
            }
            self.wait_call(deadline - now)?;
        }
    }

    /// Wait for `count` used buffers (up to `timeout` in total), in the order the device used them.
    pub fn wait_used_n(&mut self, count: usize, timeout: Duration) -> Result<Vec<UsedElem>, Error> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_used(left) {
                Ok(e) => out.push(e),
                Err(Error::Timeout { queue, .. }) => {
                    return Err(Error::TimeoutN {
                        queue,
                        timeout,
                        wanted: count,
                        got: out.len(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Ask the device not to send calls (a polling driver). [`wait_used`](Self::wait_used)
    /// re-enables them while it sleeps.
    pub fn disable_calls(&mut self) {
        self.calls_enabled = false;
        self.store_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
    }

    /// Ask the device to send a call for every used buffer again.
    pub fn enable_calls(&mut self) {
        self.request_call();
    }

    fn request_call(&mut self) {
        self.calls_enabled = true;
        if self.event_idx {
            self.store_used_event(self.last_used);
        } else {
            self.store_avail_flags(0);
        }
    }

    /// Waits up to `timeout` for a call (an interrupt) from the device and takes it; false if
    /// none came. Used buffers are left where they are: a driver that misses an interrupt.
    pub fn wait_call(&self, timeout: Duration) -> Result<bool, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted && !left.is_zero() {
                    continue;
                }
                return Err(Error::Wait {
                    queue: self.index,
                    source: e,
                });
            }
            // Non-blocking: a spurious wakeup just finds it empty.
            if r > 0 && self.call.read().is_ok() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    fn recycle(&mut self, head: u16) {
        let mut id = head;
        let n = self.chain_len[usize::from(head)];
        for _ in 0..n {
            self.free.push(id);
            id = self.shadow_next[usize::from(id)];
        }
        self.chain_len[usize::from(head)] = 0;
        self.writable_len[usize::from(head)] = 0;
    }

    fn publish(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: slot < size, so 4 + 2 * slot is inside the avail area (6 + 2 * size bytes),
        // 2-aligned.
        unsafe { ptr::write_volatile(self.avail.add(4 + 2 * slot) as *mut u16, head.to_le()) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors and ring entry above are visible before the new index.
        self.avail_idx_atomic()
            .store(self.avail_idx.to_le(), Ordering::Release);
    }

    fn store_desc(&self, index: u16, d: Descriptor) {
        debug_assert!(index < self.size);
        // SAFETY: index < size (callers take indices from the free list or check them), so
        // the entry is inside the 16 * size byte table, which is page-aligned.
        unsafe { write_desc_at(self.desc.add(usize::from(index) * DESC_SIZE as usize), d) }
    }

    fn store_avail_flags(&self, flags: u16) {
        // SAFETY: offset 0 of the avail area, 2-aligned.
        unsafe { ptr::write_volatile(self.avail as *mut u16, flags.to_le()) };
    }

    fn store_used_event(&self, v: u16) {
        // SAFETY: used_event sits at 4 + 2 * size, the last 2 bytes of the avail area.
        unsafe {
            ptr::write_volatile(
                self.avail.add(4 + 2 * usize::from(self.size)) as *mut u16,
                v.to_le(),
            )
        };
    }

    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: avail idx is at offset 2 of the page-aligned avail area, so aligned for u16;
        // the mapping lives as long as self (through `ram`); the device only reads it, and all
        // our own accesses to it are atomic.
        unsafe { AtomicU16::from_ptr(self.avail.add(2) as *mut u16) }
    }

    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: used idx is at offset 2 of the page-aligned used area; the device writes it
        // atomically, the mapping lives as long as self.
        unsafe { AtomicU16::from_ptr(self.used.add(2) as *mut u16) }
    }

    // ----- raw interface: for tests that feed the device what no real driver would -----

    /// Take `n` descriptors off the free list for the test to fill with
    /// [`raw_write_desc`](Self::raw_write_desc). They are never recycled.
    pub fn raw_reserve(&mut self, n: usize) -> Result<Vec<u16>, Error> {
        if n > self.free.len() {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut ids = self.free.split_off(at);
        ids.reverse();
        Ok(ids)
    }

    /// Write any descriptor into table slot `index` (addr, len, flags and next as given).
    pub fn raw_write_desc(&mut self, index: u16, d: Descriptor) -> Result<(), Error> {
        self.check_index(index)?;
        self.store_desc(index, d);
        Ok(())
    }

    /// Read table slot `index` back.
    pub fn raw_read_desc(&self, index: u16) -> Result<Descriptor, Error> {
        self.check_index(index)?;
        // SAFETY: index < size was checked; the table is page-aligned, so entries are 8-aligned.
        let (lo, hi) = unsafe {
            let p = self.desc.add(usize::from(index) * DESC_SIZE as usize);
            (
                ptr::read_volatile(p as *const u64),
                ptr::read_volatile(p.add(8) as *const u64),
            )
        };
        Ok(Descriptor::from_words(lo, hi))
    }

    /// Publish `head` in the avail ring (any value, even one outside the table) and bump the
    /// avail index. A head below the ring size may legitimately come back used.
    pub fn raw_publish(&mut self, head: u16) {
        if let Some(n) = self.raw_outstanding.get_mut(usize::from(head)) {
            *n += 1;
        }
        self.publish(head);
    }

    /// Write avail ring slot `slot` without touching the index.
    pub fn raw_write_avail_slot(&mut self, slot: u16, head: u16) -> Result<(), Error> {
        self.check_index(slot)?;
        // SAFETY: slot < size was checked, so the entry is inside the avail area, 2-aligned.
        unsafe {
            ptr::write_volatile(
                self.avail.add(4 + 2 * usize::from(slot)) as *mut u16,
                head.to_le(),
            )
        };
        Ok(())
    }

    /// Set the published avail index to anything (e.g. far beyond the ring size).
    pub fn raw_set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.avail_idx_atomic()
            .store(idx.to_le(), Ordering::Release);
    }

    /// Set the avail ring flags.
    pub fn raw_set_avail_flags(&mut self, flags: u16) {
        self.store_avail_flags(flags);
    }

    /// Set used_event (EVENT_IDX) to anything.
    pub fn raw_set_used_event(&mut self, v: u16) {
        self.store_used_event(v);
    }

    /// Write avail_event as if the device had: for checking kick suppression without a device.
    pub fn raw_set_avail_event(&mut self, v: u16) {
        // SAFETY: avail_event sits at 4 + 8 * size, the last 2 bytes of the used area.
        unsafe {
            ptr::write_volatile(
                self.used.add(4 + 8 * usize::from(self.size)) as *mut u16,
                v.to_le(),
            )
        };
    }

    /// Read used ring element `slot` as the device wrote it, without consuming it: `(id, len)`.
    /// A driver that marks the slots it has read (with
    /// [`raw_write_used_elem`](Self::raw_write_used_elem)) sees the device's progress
    /// element by element, before the device publishes its used index.
    pub fn raw_read_used_elem(&self, slot: u16) -> Result<(u32, u32), Error> {
        self.check_index(slot)?;
        // SAFETY: slot < size was checked, so the 8-byte element at 4 + 8 * slot is inside
        // the used area, 4-aligned.
        Ok(unsafe {
            let elem = self.used.add(4 + 8 * usize::from(slot));
            (
                u32::from_le(ptr::read_volatile(elem as *const u32)),
                u32::from_le(ptr::read_volatile(elem.add(4) as *const u32)),
            )
        })
    }

    /// Overwrite used ring element `slot` (a mark for
    /// [`raw_read_used_elem`](Self::raw_read_used_elem)).
    pub fn raw_write_used_elem(&mut self, slot: u16, id: u32, len: u32) -> Result<(), Error> {
        self.check_index(slot)?;
        // SAFETY: as in raw_read_used_elem.
        unsafe {
            let elem = self.used.add(4 + 8 * usize::from(slot));
            ptr::write_volatile(elem as *mut u32, id.to_le());
            ptr::write_volatile(elem.add(4) as *mut u32, len.to_le());
        }
        Ok(())
    }

    /// Write the used ring's flags as if the device had (e.g. VRING_USED_F_NO_NOTIFY).
    pub fn raw_set_used_flags(&mut self, flags: u16) {
        // SAFETY: offset 0 of the used area, 2-aligned.
        unsafe { ptr::write_volatile(self.used as *mut u16, flags.to_le()) };
    }

    fn check_index(&self, index: u16) -> Result<(), Error> {
        if index >= self.size {
            return Err(Error::BadDescriptorIndex {
                index,
                size: self.size,
            });
        }
        Ok(())
    }
}

/// The spec's `vring_need_event`: has `new` passed `event` since `old`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn check_order(segs: &[Segment]) -> Result<(), Error> {
    if segs.is_empty() {
        return Err(Error::EmptyChain);
    }
    let mut seen_writable = false;
    for (i, s) in segs.iter().enumerate() {
        if s.device_writable {
            seen_writable = true;
        } else if seen_writable {
            return Err(Error::ReadableAfterWritable { index: i });
        }
    }
    Ok(())
}

/// # Safety
/// `p` must point to 16 writable bytes of guest memory, 8-aligned.
unsafe fn write_desc_at(p: *mut u8, d: Descriptor) {
    let (lo, hi) = d.to_words();
    // SAFETY: guaranteed by the caller.
    unsafe {
        ptr::write_volatile(p as *mut u64, lo);
        ptr::write_volatile(p.add(8) as *mut u64, hi);
    }
}

fn len32(len: u64) -> Result<u32, Error> {
    u32::try_from(len).map_err(|_| Error::OutOfGuestMemory {
        requested: len,
        align: 4096,
    })
}

fn zero(ram: &GuestRam, b: GuestBuffer) -> Result<(), Error> {
    // Rings are small (at most a few hundred KiB), so a temporary zero buffer is fine here.
    ram.write(b.addr, &vec![0u8; b.len as usize])
}
