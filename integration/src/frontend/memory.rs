//! Guest RAM for the harness: memfd-backed regions the backend maps too, plus a bump allocator.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use super::queue::Descriptor;
use super::Error;

/// Alignment of buffers from [`GuestRam::alloc`]: one cache line, so buffers never share one.
pub const DEFAULT_ALIGN: u64 = 64;

/// Guest addresses below this are never handed out by the allocator.
const NULL_GUARD: u64 = 4096;

/// A buffer in guest memory: a guest-physical address and a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    /// Guest-physical address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

impl GuestBuffer {
    /// The first `len` bytes of this buffer (clamped to its length).
    pub fn prefix(&self, len: u32) -> GuestBuffer {
        GuestBuffer {
            addr: self.addr,
            len: len.min(self.len),
        }
    }

    /// The part of this buffer starting `offset` bytes in (empty if past the end).
    pub fn offset(&self, offset: u32) -> GuestBuffer {
        let offset = offset.min(self.len);
        GuestBuffer {
            addr: self.addr + u64::from(offset),
            len: self.len - offset,
        }
    }
}

/// Guest RAM as a VMM would set it up for vhost-user: one memfd per region, mapped shared here
/// and handed to the backend with SET_MEM_TABLE. Sealed against shrinking and growing, as QEMU's
/// `memory-backend-memfd` is (`seal=on`, its default): the backends refuse memory that a
/// front-end could still shrink under them.
///
/// Cloning is cheap (the mappings are shared); all clones allocate from the same bump allocator.
#[derive(Clone)]
pub struct GuestRam {
    inner: Arc<RamInner>,
}

struct RamInner {
    mem: GuestMemoryMmap,
    /// Next free guest-physical address, one per region (same order as `mem`'s regions).
    cursors: Mutex<Vec<u64>>,
}

impl GuestRam {
    /// One region of `size` bytes at guest-physical address 0.
    pub fn new(size: u64) -> Result<GuestRam, Error> {
        GuestRam::with_regions(&[(0, size)])
    }

    /// Several regions, each `(guest-physical base, size)`, like QEMU's split around the PCI
    /// hole. Sizes are rounded up to whole pages; regions must not overlap.
    pub fn with_regions(layout: &[(u64, u64)]) -> Result<GuestRam, Error> {
        GuestRam::build(layout, true)
    }

    /// One region of `size` bytes at guest address 0 in a memfd that is NOT sealed against
    /// shrinking (QEMU's `memory-backend-memfd,seal=off`): the backends refuse it unless
    /// started with `--allow-unsealed-memory`.
    pub fn unsealed(size: u64) -> Result<GuestRam, Error> {
        GuestRam::build(&[(0, size)], false)
    }

    fn build(layout: &[(u64, u64)], seal: bool) -> Result<GuestRam, Error> {
        let mut regions = Vec::with_capacity(layout.len());
        for &(base, size) in layout {
            if size == 0 {
                return Err(Error::MemoryLayout(format!(
                    "region at {base:#x} has size 0"
                )));
            }
            let size = size.div_ceil(4096) * 4096;
            let file = memfd(size, seal)?;
            let len = usize::try_from(size)
                .map_err(|_| Error::MemoryLayout(format!("region size {size:#x} too large")))?;
            let mmap = MmapRegion::from_file(FileOffset::new(file, 0), len)
                .map_err(|e| Error::MemoryLayout(format!("mapping region at {base:#x}: {e}")))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(base)).ok_or_else(|| {
                Error::MemoryLayout(format!("region at {base:#x} wraps the address space"))
            })?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| Error::MemoryLayout(e.to_string()))?;
        // Page 0 stays unused: real guests never put rings there, and some device code treats a
        // ring at guest address 0 as "not configured".
        let cursors = mem
            .iter()
            .map(|r| r.start_addr().raw_value().max(NULL_GUARD))
            .collect();
        Ok(GuestRam {
            inner: Arc::new(RamInner {
                mem,
                cursors: Mutex::new(cursors),
            }),
        })
    }

    /// The vm-memory view of this RAM, for anything the helpers here do not cover.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.inner.mem
    }

    /// Allocate `len` bytes aligned to [`DEFAULT_ALIGN`]. Memory is never freed: size the RAM for
    /// the whole test. The first page of guest memory is never handed out.
    pub fn alloc(&self, len: u32) -> Result<GuestBuffer, Error> {
        self.alloc_aligned(len, DEFAULT_ALIGN)
    }

    /// Allocate `len` bytes aligned to `align` (a power of two), from the first region with room.
    pub fn alloc_aligned(&self, len: u32, align: u64) -> Result<GuestBuffer, Error> {
        let align = align.max(1);
        if !align.is_power_of_two() {
            return Err(Error::MemoryLayout(format!(
                "alignment {align} is not a power of two"
            )));
        }
        // A poisoned lock only means another test thread panicked mid-allocation; the cursors
        // are plain numbers and still consistent.
        let mut cursors = self
            .inner
            .cursors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (region, cursor) in self.inner.mem.iter().zip(cursors.iter_mut()) {
            let start = cursor.next_multiple_of(align);
            let end = region.start_addr().raw_value() + region.len();
            if start + u64::from(len) <= end {
                *cursor = start + u64::from(len);
                return Ok(GuestBuffer { addr: start, len });
            }
        }
        Err(Error::OutOfGuestMemory {
            requested: u64::from(len),
            align,
        })
    }

    /// Copy `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.inner
            .mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|source| Error::GuestAccess { addr, source })
    }

    /// Copy guest memory at `addr` into `out`.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), Error> {
        self.inner
            .mem
            .read_slice(out, GuestAddress(addr))
            .map_err(|source| Error::GuestAccess { addr, source })
    }

    /// Read `len` bytes at `addr` into a new vector.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut out = vec![0; len];
        self.read(addr, &mut out)?;
        Ok(out)
    }

    /// Fill `buf` from the start with `data`; errors if `data` is longer than the buffer.
    pub fn fill(&self, buf: GuestBuffer, data: &[u8]) -> Result<(), Error> {
        if data.len() > buf.len as usize {
            return Err(Error::BufferTooSmall {
                addr: buf.addr,
                len: buf.len,
                needed: data.len(),
            });
        }
        self.write(buf.addr, data)
    }

    /// Write descriptors as a table at `addr` (e.g. a hand-made indirect table for a malicious
    /// test). Nothing is checked: the descriptors are written as given.
    pub fn write_descriptors(&self, addr: u64, descs: &[Descriptor]) -> Result<(), Error> {
        for (i, d) in descs.iter().enumerate() {
            self.write(addr + 16 * i as u64, &d.to_bytes())?;
        }
        Ok(())
    }

    /// Whether `[addr, addr + len)` lies inside a single region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.host_ptr(addr, len).is_ok()
    }

    /// Host pointer to `[addr, addr + len)`, which must lie in one region. The pointer stays valid
    /// as long as any clone of this `GuestRam` lives.
    pub(crate) fn host_ptr(&self, addr: u64, len: u64) -> Result<*mut u8, Error> {
        let bad = || Error::BadGuestRange { addr, len };
        let region = self
            .inner
            .mem
            .find_region(GuestAddress(addr))
            .ok_or_else(bad)?;
        let offset = addr - region.start_addr().raw_value();
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(bad());
        }
        self.inner
            .mem
            .get_host_address(GuestAddress(addr))
            .map_err(|_| bad())
    }

    /// The regions as SET_MEM_TABLE describes them (fds stay owned by the mappings).
    pub(crate) fn region_infos(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, Error> {
        self.inner
            .mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| Error::MemoryLayout(format!("describing region: {e}")))
            })
            .collect()
    }
}

fn memfd(size: u64, seal: bool) -> Result<File, Error> {
    const NAME: &CStr = c"devshare-guest-ram";
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: NAME is a valid NUL-terminated string and the flags are valid; the call has no
    // other memory effects.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::MemoryCreate(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(Error::MemoryCreate)?;
    if seal {
        // SAFETY: F_ADD_SEALS takes an int of seal bits; `file` is open for the call.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        if r < 0 {
            return Err(Error::MemoryCreate(std::io::Error::last_os_error()));
        }
    }
    Ok(file)
}
