//! Checks a front-end's guest memory regions against the files that back them, before the
//! backend maps them.
//!
//! vhost-user `SET_MEM_TABLE` (and `ADD_MEM_REG`) give, for each region, a file descriptor, a
//! size and an offset into the file (vhost-user spec, "Memory region description"). The
//! backend maps `memory_size` bytes at `mmap_offset`; `mmap` accepts a range past the end of
//! the file, and the first access to a page past it raises SIGBUS, which kills the whole
//! process and every VM it serves. [`check_message`] refuses such a table up front, so only
//! the connection that sent it ends. The other areas a front-end hands over as files to map
//! (`SET_LOG_BASE`'s dirty log, `SET_INFLIGHT_FD`'s in-flight area) are checked the same way,
//! so the check still holds when those features are offered.
//!
//! What is checked, per fd kind (`fstat`):
//! - regular files, which include memfds (QEMU's `memory-backend-memfd`), files on tmpfs or
//!   `/dev/shm` and hugetlbfs files (`memory-backend-file` on hugetlbfs: its `st_size` is the
//!   size QEMU gave it with `ftruncate` or its own `mmap`): `mmap_offset + memory_size` must
//!   not exceed `st_size` and must not overflow;
//! - anything else (a DAX character device, a block device), where `st_size` does not say how
//!   much can be mapped: accepted as it is, as QEMU legitimately sends such fds.
//!
//! A file shrunk after the check would still raise SIGBUS on access, so a regular file that
//! can still shrink is refused too (see [`shrink_sealed`]): a memfd without `F_SEAL_SHRINK`
//! (QEMU's `memory-backend-memfd` with `seal=off`) and any file that cannot be sealed (a file
//! on tmpfs, `/dev/shm` or hugetlbfs: QEMU's `memory-backend-file`). The operator can accept
//! those with [`UnsealedMemory::Allow`] (`--allow-unsealed-memory`), at the risk that a
//! front-end which shrinks its file crashes the process.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// `VHOST_USER_SET_MEM_TABLE`.
pub const REQ_SET_MEM_TABLE: u32 = 5;
/// `VHOST_USER_ADD_MEM_REG`.
pub const REQ_ADD_MEM_REG: u32 = 37;
/// `VHOST_USER_SET_LOG_BASE` (the dirty-page log of live migration, a shared file too).
pub const REQ_SET_LOG_BASE: u32 = 6;
/// `VHOST_USER_SET_INFLIGHT_FD` (the in-flight descriptor area, a shared file too).
pub const REQ_SET_INFLIGHT_FD: u32 = 32;
/// Size of one region description: guest address, size, user address, mmap offset (u64 each).
const REGION_SIZE: usize = 32;

/// One memory region as a front-end described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical start address.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Offset into the backing file where the region starts, in bytes.
    pub mmap_offset: u64,
}

/// What to do with a region whose file can still shrink.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnsealedMemory {
    /// Refuse it (the default): a front-end could truncate the file and crash the process.
    #[default]
    Refuse,
    /// Accept it (`--allow-unsealed-memory`): for `memory-backend-file` guests whose
    /// front-ends are trusted not to shrink the file.
    Allow,
}

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemTableError {
    /// The message body does not hold the regions it announces, or the descriptor count does
    /// not match.
    #[error("malformed memory table: {0}")]
    Malformed(String),
    /// A region ends past the end of its backing file: touching it would raise SIGBUS.
    #[error("memory region {index} (guest address {:#x}, {:#x} bytes at file offset {:#x}) ends past the end of its {file_size}-byte file", region.guest_phys_addr, region.memory_size, region.mmap_offset)]
    PastEndOfFile {
        /// Index of the region in the message.
        index: usize,
        /// The region.
        region: Region,
        /// Size of the backing file in bytes.
        file_size: u64,
    },
    /// The backing file can still shrink (not sealed with `F_SEAL_SHRINK`): a front-end that
    /// truncates it would make the next access raise SIGBUS.
    #[error("memory region {index} (guest address {:#x}, {:#x} bytes) is backed by a file that can still shrink (a memfd without F_SEAL_SHRINK, or a file on tmpfs or hugetlbfs), so its front-end could truncate it and crash this process with every VM it serves; give QEMU -object memory-backend-memfd,...,share=on (sealed by default, seal=on), or start this backend with --allow-unsealed-memory to accept the risk", region.guest_phys_addr, region.memory_size)]
    Unsealed {
        /// Index of the region in the message.
        index: usize,
        /// The region.
        region: Region,
    },
    /// The backing file could not be examined.
    #[error("memory region {index}: cannot fstat its file: {errno}")]
    Stat {
        /// Index of the region in the message.
        index: usize,
        /// The errno.
        errno: i32,
    },
}

fn u64_at(body: &[u8], at: usize) -> Option<u64> {
    body.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

fn region_at(body: &[u8], at: usize) -> Option<Region> {
    Some(Region {
        guest_phys_addr: u64_at(body, at)?,
        memory_size: u64_at(body, at + 8)?,
        mmap_offset: u64_at(body, at + 24)?,
    })
}

/// The file areas a message asks the backend to map: the regions of `SET_MEM_TABLE` and
/// `ADD_MEM_REG`, the log area of `SET_LOG_BASE`, the in-flight area of `SET_INFLIGHT_FD`
/// (the last two as a region at guest address 0); `None` for other requests.
///
/// # Errors
/// [`MemTableError::Malformed`] when the body is too short for what it announces.
pub fn regions(request: u32, body: &[u8]) -> Result<Option<Vec<Region>>, MemTableError> {
    let short = || MemTableError::Malformed(format!("{}-byte body is too short", body.len()));
    match request {
        REQ_SET_MEM_TABLE => {
            let n = body
                .get(0..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(short)? as usize;
            (0..n)
                .map(|i| region_at(body, 8 + i * REGION_SIZE).ok_or_else(short))
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
        // A u64 of padding, then one region.
        REQ_ADD_MEM_REG => Ok(Some(vec![region_at(body, 8).ok_or_else(short)?])),
        // mmap_size, mmap_offset (then, for SET_INFLIGHT_FD, queue counts).
        REQ_SET_LOG_BASE | REQ_SET_INFLIGHT_FD => Ok(Some(vec![Region {
            guest_phys_addr: 0,
            memory_size: u64_at(body, 0).ok_or_else(short)?,
            mmap_offset: u64_at(body, 8).ok_or_else(short)?,
        }])),
        _ => Ok(None),
    }
}

/// Checks every region of a memory-table message against its file descriptor (one per region,
/// in order), as described in the module documentation; `unsealed` says whether a file that
/// can still shrink is refused. Other requests pass unchecked.
///
/// # Errors
/// [`MemTableError`] naming the first bad region.
pub fn check_message(
    request: u32,
    body: &[u8],
    fds: &[OwnedFd],
    unsealed: UnsealedMemory,
) -> Result<(), MemTableError> {
    let Some(regions) = regions(request, body)? else {
        return Ok(());
    };
    if regions.len() != fds.len() {
        return Err(MemTableError::Malformed(format!(
            "{} regions but {} file descriptors",
            regions.len(),
            fds.len()
        )));
    }
    for (index, (region, fd)) in regions.iter().zip(fds).enumerate() {
        check_region(index, region, fd, unsealed)?;
    }
    Ok(())
}

fn check_region(
    index: usize,
    region: &Region,
    fd: &OwnedFd,
    unsealed: UnsealedMemory,
) -> Result<(), MemTableError> {
    // SAFETY: `stat` is plain data; zeroed is valid and fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call and `st` is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(MemTableError::Stat {
            index,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(());
    }
    let file_size = st.st_size.max(0) as u64;
    match region.mmap_offset.checked_add(region.memory_size) {
        Some(end) if end <= file_size => {}
        _ => {
            return Err(MemTableError::PastEndOfFile {
                index,
                region: *region,
                file_size,
            })
        }
    }
    if unsealed == UnsealedMemory::Refuse && !shrink_sealed(fd) {
        return Err(MemTableError::Unsealed {
            index,
            region: *region,
        });
    }
    Ok(())
}

/// Whether the file behind `fd` can no longer shrink: a memfd sealed with `F_SEAL_SHRINK`
/// (QEMU's `memory-backend-memfd` seals by default, `seal=on`). A file that can shrink (a
/// memfd with `seal=off`, a file on tmpfs or hugetlbfs) could still be cut by its owner after
/// the check; a page past the new end then raises SIGBUS in this process. Catching that SIGBUS
/// and turning it into a refused connection would mean unwinding out of arbitrary Rust code in
/// a signal handler, which Rust cannot do soundly, and a backend cannot add the seal itself
/// (QEMU's memfds either carry it already or were created without `MFD_ALLOW_SEALING`). So
/// [`check_message`] refuses such a file unless the operator allows it.
/// A file that does not support seals at all (`F_GET_SEALS` fails) counts as not sealed.
pub fn shrink_sealed(fd: impl AsFd) -> bool {
    let f = fd.as_fd();
    // SAFETY: F_GET_SEALS takes no argument; `f` is open for the call.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    const A: UnsealedMemory = UnsealedMemory::Refuse;

    fn memfd(size: u64, seal: bool) -> OwnedFd {
        let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
        // SAFETY: valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        if seal {
            // SAFETY: F_ADD_SEALS takes an int; `f` is open.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(r, 0);
        }
        f.into()
    }

    fn table(regions: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(gpa, size, off) in regions {
            for v in [gpa, size, 0x7f00_0000_0000 + gpa, off] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn regions_within_their_files_pass() {
        let fds = vec![memfd(1 << 20, true), memfd(2 << 20, true)];
        let body = table(&[(0, 1 << 20, 0), (1 << 32, 1 << 20, 1 << 20)]);
        check_message(REQ_SET_MEM_TABLE, &body, &fds, A).unwrap();
    }

    #[test]
    fn oversized_region_or_offset_past_the_end_is_refused_by_index() {
        let fds = vec![memfd(1 << 20, true), memfd(1 << 20, true)];
        let body = table(&[(0, 1 << 20, 0), (1 << 32, 2 << 20, 0)]);
        let e = check_message(REQ_SET_MEM_TABLE, &body, &fds, A).unwrap_err();
        assert!(
            matches!(e, MemTableError::PastEndOfFile { index: 1, file_size, .. } if file_size == 1 << 20)
        );
        assert!(e.to_string().contains("memory region 1"), "{e}");

        let fds = vec![memfd(1 << 20, true)];
        let body = table(&[(0, 4096, 1 << 20)]);
        assert!(check_message(REQ_SET_MEM_TABLE, &body, &fds, A).is_err());

        let body = table(&[(0, 4096, u64::MAX - 100)]);
        assert!(check_message(REQ_SET_MEM_TABLE, &body, &fds, A).is_err());
    }

    #[test]
    fn add_mem_reg_is_checked_too() {
        let fds = vec![memfd(1 << 20, true)];
        let mut body = vec![0u8; 8];
        body.extend_from_slice(&table(&[(0, 2 << 20, 0)])[8..]);
        assert!(check_message(REQ_ADD_MEM_REG, &body, &fds, A).is_err());
    }

    #[test]
    fn log_and_inflight_areas_are_checked_too() {
        for req in [REQ_SET_LOG_BASE, REQ_SET_INFLIGHT_FD] {
            let mut body = Vec::new();
            body.extend_from_slice(&(8192u64).to_le_bytes());
            body.extend_from_slice(&0u64.to_le_bytes());
            body.extend_from_slice(&[1, 0, 0, 1]);
            check_message(req, &body, &[memfd(8192, true)], A).unwrap();
            assert!(check_message(req, &body, &[memfd(4096, true)], A).is_err());
        }
    }

    #[test]
    fn malformed_tables_are_refused() {
        let fds = vec![memfd(4096, false)];
        let mut body = table(&[(0, 4096, 0)]);
        body[0] = 2; // announces two regions, holds one
        assert!(matches!(
            check_message(REQ_SET_MEM_TABLE, &body, &fds, A),
            Err(MemTableError::Malformed(_))
        ));
        let body = table(&[(0, 4096, 0)]);
        assert!(matches!(
            check_message(REQ_SET_MEM_TABLE, &body, &[], A),
            Err(MemTableError::Malformed(_))
        ));
    }

    #[test]
    fn non_regular_fds_are_not_judged_by_size() {
        // A character device has st_size 0 but may be mappable (DAX): not refused here.
        let dev: OwnedFd = File::open("/dev/zero").unwrap().into();
        let body = table(&[(0, 1 << 20, 0)]);
        check_message(REQ_SET_MEM_TABLE, &body, &[dev], A).unwrap();
    }

    #[test]
    fn other_requests_pass() {
        check_message(1, &[], &[], A).unwrap();
    }

    #[test]
    fn files_that_can_shrink_are_refused_unless_allowed() {
        let body = table(&[(0, 4096, 0)]);
        let e = check_message(REQ_SET_MEM_TABLE, &body, &[memfd(4096, false)], A).unwrap_err();
        assert!(matches!(e, MemTableError::Unsealed { index: 0, .. }), "{e}");
        assert!(e.to_string().contains("memory-backend-memfd"), "{e}");
        assert!(e.to_string().contains("--allow-unsealed-memory"), "{e}");
        // A file on tmpfs cannot be sealed at all.
        let dir = std::env::temp_dir().join(format!("devshare-memtable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = File::create(dir.join("ram")).unwrap();
        f.set_len(4096).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let fds = [OwnedFd::from(f)];
        assert!(check_message(REQ_SET_MEM_TABLE, &body, &fds, A).is_err());
        check_message(REQ_SET_MEM_TABLE, &body, &fds, UnsealedMemory::Allow).unwrap();
        check_message(
            REQ_SET_MEM_TABLE,
            &body,
            &[memfd(4096, false)],
            UnsealedMemory::Allow,
        )
        .unwrap();
        // The log and in-flight areas too.
        let mut area = Vec::new();
        area.extend_from_slice(&4096u64.to_le_bytes());
        area.extend_from_slice(&0u64.to_le_bytes());
        for req in [REQ_SET_LOG_BASE, REQ_SET_INFLIGHT_FD, REQ_ADD_MEM_REG] {
            let b = if req == REQ_ADD_MEM_REG {
                let mut b = vec![0u8; 8];
                b.extend_from_slice(&body[8..]);
                b
            } else {
                area.clone()
            };
            assert!(check_message(req, &b, &[memfd(4096, false)], A).is_err());
            check_message(req, &b, &[memfd(4096, true)], A).unwrap();
        }
    }

    #[test]
    fn shrink_seal_is_seen() {
        assert!(shrink_sealed(memfd(4096, true)));
        assert!(!shrink_sealed(memfd(4096, false)));
    }
}
