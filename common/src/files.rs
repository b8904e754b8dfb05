//! Files and directories a backend creates for itself (state directory, spools, logs): private
//! by default, never reached through a planted symlink, and never shared by two instances.
//!
//! A backend runs as root more often than not, in directories other users may write to. So:
//!
//! - [`ensure_private_dir`] makes a directory 0700, or accepts an existing one only if it is a
//!   real directory (not a symlink) owned by this user and not group- or world-writable.
//! - [`StateDirLock::acquire`] takes an exclusive `flock` on a directory, so two instances
//!   pointed at one `--state-dir` cannot corrupt each other's files.
//! - [`open_private`] opens or creates a file with `O_NOFOLLOW | O_CLOEXEC` and mode 0600, and
//!   refuses anything but a regular file with a single link owned by this user (a hard link or
//!   another user's file planted in a shared directory would otherwise receive what is
//!   written); an existing file of ours is made 0600.
//! - [`open_state_file`] opens a file a backend keeps its state in (read and write, never
//!   truncated): [`open_private`]'s checks, and
//!   locked for as long as it is open, so no two users of one file exist at a time.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{flock, FlockArg};

/// Mode of files a backend creates: the owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of directories a backend creates: the owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Why a private file or directory could not be used. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A system call failed.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The path is not what it must be (a symlink where a directory or file belongs, a file
    /// with several links, a directory others may write to...).
    #[error("{path}: {reason}; refusing to use it")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another process holds the directory's lock.
    #[error("{path} is in use by another running instance (it holds the directory's lock); give each instance its own directory")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// Another open of the file (in this process or another) holds its lock.
    #[error("{path} is in use (another user of it holds its lock)")]
    InUse {
        /// The file.
        path: PathBuf,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Makes `dir` (and any missing parents, with the default mode) with mode 0700, or checks an
/// existing `dir`: it must be a directory, not a symlink to one, owned by the effective user,
/// and neither group- nor world-writable (others must not be able to plant or swap files in it).
///
/// # Errors
/// [`FileError::Unsafe`] when an existing `dir` fails a check, [`FileError::Io`] otherwise.
pub fn ensure_private_dir(dir: &Path) -> Result<(), FileError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io_err(parent, "create directory"))?;
            }
            match DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir) {
                Ok(()) => {}
                // Made by someone else meanwhile: check it like any existing one.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(dir, "create directory")(e)),
            }
            check_private_dir(dir)
        }
        Err(e) => Err(io_err(dir, "stat")(e)),
        Ok(_) => check_private_dir(dir),
    }
}

fn check_private_dir(dir: &Path) -> Result<(), FileError> {
    let unsafe_dir = |reason: String| FileError::Unsafe {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io_err(dir, "stat"))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("is a symlink, not a directory".into()));
    }
    if std::fs::canonicalize(dir).is_ok_and(|d| d == Path::new("/")) {
        return Err(unsafe_dir(
            "is the root directory; give the state files a directory of their own \
             (e.g. /var/lib/devshare, created 0700 if absent)"
                .into(),
        ));
    }
    if let Some(fs) = pseudo_file_system(dir) {
        return Err(unsafe_dir(format!("is on {fs}, a kernel file system")));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by this process's user (uid {euid}); use a directory of \
             this user's (chown {euid} {} if it is meant to be)",
            meta.uid(),
            dir.display()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "is writable by its group or by everyone (mode {:o}); run: chmod go-w {}",
            meta.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

/// An exclusive lock on a directory, held until dropped (or the process ends, however it
/// ends: the kernel releases `flock` locks with the descriptor, so a killed instance never
/// leaves a stale lock behind).
#[derive(Debug)]
pub struct StateDirLock {
    _dir: File,
}

impl StateDirLock {
    /// Locks `dir` (which must exist) without waiting.
    ///
    /// # Errors
    /// [`FileError::Locked`] when another process (or another lock in this one) holds it;
    /// [`FileError::Io`] when it cannot be opened.
    pub fn acquire(dir: &Path) -> Result<StateDirLock, FileError> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io_err(dir, "open directory"))?;
        match flock(f.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
            Ok(()) => Ok(StateDirLock { _dir: f }),
            Err(nix::errno::Errno::EWOULDBLOCK) => Err(FileError::Locked {
                path: dir.to_path_buf(),
            }),
            Err(e) => Err(io_err(dir, "lock directory")(e.into())),
        }
    }
}

/// Kernel file systems whose entries look like regular files, by `statfs` magic
/// (linux/magic.h). devtmpfs reports tmpfs's magic and is told apart by its mount
/// ([`on_devtmpfs`]).
const PSEUDO_FILE_SYSTEMS: &[(i64, &str)] = &[
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x6265_6570, "configfs"),
    (0x1cd1, "devpts"),
    (0xcafe_4a11, "bpf"),
    (0xde5e_81e4, "efivarfs"),
    (0x6165_676c, "pstore"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x6573_5543, "fusectl"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x1980_0202, "mqueue"),
];

/// The name of the kernel file system `dir` is on, if it is one (proc, sysfs, debugfs, tracefs,
/// securityfs, cgroup, configfs, devpts, devtmpfs, bpf, efivarfs, pstore, selinuxfs, fusectl,
/// binfmt_misc, mqueue); `None` for a real one or when it cannot be told (the open that follows reports
/// that).
pub fn pseudo_file_system(dir: &Path) -> Option<&'static str> {
    let st = nix::sys::statfs::statfs(dir).ok()?;
    #[allow(clippy::unnecessary_cast)] // the type of f_type differs between targets
    let magic = st.filesystem_type().0 as i64;
    if magic == TMPFS_MAGIC && on_devtmpfs(dir) {
        return Some("devtmpfs");
    }
    PSEUDO_FILE_SYSTEMS
        .iter()
        .find(|&&(m, _)| m == magic)
        .map(|&(_, name)| name)
}

/// tmpfs's `statfs` magic, which devtmpfs (`/dev`) reports too.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `dir` is on a devtmpfs mount: the device number of `dir` is that of a mount whose
/// type is `devtmpfs` in `/proc/self/mountinfo` (where `statfs` cannot tell it from tmpfs).
/// `false` when either cannot be read.
fn on_devtmpfs(dir: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(dir) else {
        return false;
    };
    let dev = meta.dev();
    // glibc's encoding of dev_t (gnu_dev_major / gnu_dev_minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let want = format!("{major}:{minor}");
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // "ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
    mountinfo.lines().any(|line| {
        let dev_field = line.split(' ').nth(2);
        let fstype = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next());
        dev_field == Some(want.as_str()) && fstype == Some("devtmpfs")
    })
}

/// Opens `path` as `options` says (read, write, append, create...), adding
/// `O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK` (a FIFO planted at the path must not block the open)
/// and mode 0600 for a file it creates. After opening, refuses anything but a regular file
/// with exactly one link owned by this process's effective user, and makes an existing file
/// 0600 if it was wider. (Do not pass `truncate`: the open would cut another user's file
/// before it is refused.) `O_NONBLOCK` has no effect on regular files. A path whose directory
/// is on a kernel file system (proc, sysfs...: [`pseudo_file_system`]) is refused before
/// anything is opened.
///
/// `O_NOFOLLOW` covers the last component; the directories above are the caller's to trust
/// (use [`ensure_private_dir`] on them).
///
/// # Errors
/// [`FileError::Unsafe`] for a symlink (ELOOP), a non-regular file, a hard-linked file or
/// another user's file; [`FileError::Io`] for anything else.
pub fn open_private(path: &Path, options: &OpenOptions) -> Result<File, FileError> {
    // Before anything is opened: opening some kernel files has effects of its own.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Some(fs) = pseudo_file_system(parent) {
        return Err(FileError::Unsafe {
            path: path.to_path_buf(),
            reason: format!(
                "is on {fs}, a kernel file system whose entries look like files but are not \
                 (writing to them changes the kernel's state); give a path on a real file system"
            ),
        });
    }
    let existed = std::fs::symlink_metadata(path).is_ok();
    let mut options = options.clone();
    options
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
    let file = match options.open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(FileError::Unsafe {
                path: path.to_path_buf(),
                reason: "is a symlink".into(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && !parent_exists(path) => {
            return Err(io_err(path, "open (its directory does not exist)")(e))
        }
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    if !meta.is_file() {
        return Err(FileError::Unsafe {
            path: path.to_path_buf(),
            reason: "is not a regular file".into(),
        });
    }
    if meta.nlink() != 1 {
        return Err(FileError::Unsafe {
            path: path.to_path_buf(),
            reason: format!("has {} hard links", meta.nlink()),
        });
    }
    // Another user's file (planted in a shared directory such as a 1777 one) would receive
    // what this process writes, and its owner could read or truncate it.
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(FileError::Unsafe {
            path: path.to_path_buf(),
            reason: format!(
                "belongs to uid {}, not to this process's user (uid {euid}), who would be \
                 writing into it",
                meta.uid()
            ),
        });
    }
    if meta.mode() & 0o7777 != PRIVATE_FILE_MODE {
        log::info!(
            "{}: mode {:o} made {PRIVATE_FILE_MODE:o}",
            path.display(),
            meta.mode() & 0o7777
        );
        file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
            .map_err(io_err(path, "chmod"))?;
    }
    if !existed {
        note_created(path, &meta);
    }
    Ok(file)
}

/// Files [`open_private`] created during start-up, with their device and inode, until
/// [`start_up_done`]: what [`remove_created_files`] takes away again when start-up fails.
static CREATED: std::sync::Mutex<Vec<(PathBuf, (u64, u64))>> = std::sync::Mutex::new(Vec::new());
/// Cleared by [`start_up_done`]: from then on nothing is recorded (the list stays bounded).
static RECORDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn created() -> std::sync::MutexGuard<'static, Vec<(PathBuf, (u64, u64))>> {
    CREATED.lock().unwrap_or_else(|e| e.into_inner())
}

fn note_created(path: &Path, meta: &std::fs::Metadata) {
    if RECORDING.load(std::sync::atomic::Ordering::SeqCst) {
        created().push((path.to_path_buf(), (meta.dev(), meta.ino())));
    }
}

/// Start-up succeeded: the files created so far stay, and no more are recorded.
pub fn start_up_done() {
    RECORDING.store(false, std::sync::atomic::Ordering::SeqCst);
    created().clear();
}

/// Start-up failed: removes every file [`open_private`] created since the process started
/// (logs, spools) whose path still names the file it created (same device and inode, looked
/// at without following links), and returns those paths. Files that existed before are
/// never removed.
pub fn remove_created_files() -> Vec<PathBuf> {
    std::mem::take(&mut *created())
        .into_iter()
        .filter(|(path, (dev, ino))| match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() && m.dev() == *dev && m.ino() == *ino => {
                std::fs::remove_file(path).is_ok()
            }
            _ => false,
        })
        .map(|(path, _)| path)
        .collect()
}

/// Whether the directory `path` would be created in exists.
fn parent_exists(path: &Path) -> bool {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.is_dir(),
        _ => true,
    }
}

/// Opens the state file at `path` for reading and writing, creating it (0600) if missing and
/// never truncating it: [`open_private`]'s checks (owner and mode included), then an exclusive
/// `flock` (held until the file is closed).
///
/// # Errors
/// What [`open_private`] refuses; [`FileError::InUse`] when the lock is held elsewhere (a
/// second open in this process counts); [`FileError::Unsafe`] for a file of another user.
pub fn open_state_file(path: &Path) -> Result<File, FileError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    let file = open_private(path, &options)?;
    match flock(file.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
        Ok(()) => {}
        Err(nix::errno::Errno::EWOULDBLOCK) => {
            return Err(FileError::InUse {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(path, "lock")(e.into())),
    }
    Ok(file)
}

/// Whether [`replace_file`] could put a file at `path`, checked before the work that makes
/// its bytes (a measurement that takes a while should not end in "cannot write"): `path`
/// names a file, its directory exists and is a directory, and what is at `path`, if
/// anything, is a regular file, not a symlink.
///
/// # Errors
/// [`FileError::Unsafe`] for a symlink or non-regular file at `path` or a path that names no
/// file; [`FileError::Io`] when the directory is missing or not a directory.
pub fn check_replaceable(path: &Path) -> Result<(), FileError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(FileError::Unsafe {
                path: path.to_path_buf(),
                reason: "is a symlink".into(),
            })
        }
        Ok(meta) if !meta.is_file() => {
            return Err(FileError::Unsafe {
                path: path.to_path_buf(),
                reason: "exists and is not a regular file".into(),
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, "stat")(e)),
    }
    if path.file_name().is_none() {
        return Err(FileError::Unsafe {
            path: path.to_path_buf(),
            reason: "names no file".into(),
        });
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(FileError::Io {
            path: dir.to_path_buf(),
            op: "use as the directory of a new file (it is not a directory)",
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(FileError::Io {
            path: dir.to_path_buf(),
            op: "create a file in the directory (it does not exist)",
            source: e,
        }),
        Err(e) => Err(FileError::Io {
            path: dir.to_path_buf(),
            op: "use as the directory of a new file",
            source: e,
        }),
    }
}

/// Writes `bytes` to `path` as a new file with `mode` (a report, a plot: output a user asked
/// for, not state), replacing what is there without ever writing through it: the bytes go to
/// a fresh temporary file in the same directory (`O_CREAT | O_EXCL | O_NOFOLLOW`), which is then
/// renamed over `path`. A rename replaces the directory entry itself, so a symlink swapped in
/// at `path` meanwhile is replaced, never followed, and no other file is truncated in place.
///
/// An existing `path` that is a symlink or not a regular file is refused up front (a user who
/// points `--plot` at a link or a device most likely made a mistake).
///
/// # Errors
/// [`FileError::Unsafe`] for a symlink or non-regular file at `path`; [`FileError::Io`] when the
/// temporary file cannot be created, written or renamed (it is removed then).
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);

    check_replaceable(path)?;
    let name = path.file_name().ok_or_else(|| FileError::Unsafe {
        path: path.to_path_buf(),
        reason: "names no file".into(),
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join(temp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                FileError::Io {
                    path: dir.to_path_buf(),
                    op: "create a file in the directory (it does not exist)",
                    source: e,
                }
            } else {
                io_err(&temp, "create")(e)
            }
        })?;
    let written = file
        .write_all(bytes)
        .map_err(io_err(&temp, "write"))
        .and_then(|()| {
            // Mode as asked, whatever the umask made of it.
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io_err(&temp, "chmod"))
        })
        .and_then(|()| std::fs::rename(&temp, path).map_err(io_err(path, "replace")));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// `path` as an absolute path (relative to the current directory) without `.` and `..`
/// components, with the symlinks of its parent directory resolved when that exists: the form
/// in which two spellings of one path (`f.log`, `./f.log`, `DIR/f.log`) compare equal, for
/// checking that the paths a process will create are distinct. The last component is kept as
/// it is (it may not exist yet, or be a symlink the caller will refuse).
pub fn normalize(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    match (out.parent(), out.file_name()) {
        (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
            Ok(real) => real.join(name),
            Err(_) => out,
        },
        _ => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_files_and_the_root_directory_are_refused() {
        for p in [
            "/proc/self/status",
            "/sys/kernel/uevent_helper",
            "/proc/sys/kernel/a",
        ] {
            let e = open_private(Path::new(p), OpenOptions::new().append(true).create(true))
                .unwrap_err()
                .to_string();
            assert!(e.contains("kernel file system"), "{p}: {e}");
        }
        let e = ensure_private_dir(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("root directory"), "{e}");
        // devtmpfs has tmpfs's magic: told apart by its mount, where this machine has one
        // at /dev (read here by mount point, not by device number as the check does).
        let dev_is_devtmpfs = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/dev") && l.contains(" - devtmpfs "));
        if dev_is_devtmpfs {
            let e = ensure_private_dir(Path::new("/dev"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("devtmpfs"), "{e}");
            assert_eq!(pseudo_file_system(Path::new("/dev")), Some("devtmpfs"));
            let e = open_private(
                Path::new("/dev/devshare-test.log"),
                OpenOptions::new().append(true).create(true),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("devtmpfs"), "{e}");
            assert!(!Path::new("/dev/devshare-test.log").exists());
        }
        assert_eq!(pseudo_file_system(&std::env::temp_dir()), None);
        let e = ensure_private_dir(Path::new("/proc/self/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("proc") || e.contains("owned"), "{e}");
        // A world-writable directory: the error says the command to run.
        let dir = std::env::temp_dir().join(format!("files-ww-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("chmod go-w {}", dir.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_path_spelled_several_ways_normalizes_to_one() {
        let cwd = std::fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
        assert_eq!(normalize(Path::new("f.log")), cwd.join("f.log"));
        assert_eq!(normalize(Path::new("./f.log")), cwd.join("f.log"));
        assert_eq!(normalize(Path::new("x/../f.log")), cwd.join("f.log"));
        assert_eq!(
            normalize(Path::new("/nonexistent/./a/../b.sock")),
            PathBuf::from("/nonexistent/b.sock")
        );
    }
    use std::io::{Read, Write};

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ds-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn append() -> OpenOptions {
        let mut o = OpenOptions::new();
        o.append(true).create(true);
        o
    }

    #[test]
    fn private_dir_is_created_0700_whatever_the_umask() {
        let _serial = crate::process_state_lock();
        let d = scratch("mkdir").join("a/b/state");
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let r = ensure_private_dir(&d);
        // SAFETY: restores the previous mask.
        unsafe { libc::umask(old) };
        r.unwrap();
        let m = std::fs::symlink_metadata(&d).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        // Existing and fine: accepted again.
        ensure_private_dir(&d).unwrap();
    }

    #[test]
    fn writable_or_symlinked_dirs_are_refused() {
        let _serial = crate::process_state_lock();
        let base = scratch("baddir");
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&open).unwrap_err();
        assert!(matches!(e, FileError::Unsafe { .. }), "{e}");
        assert!(e.to_string().contains("open"), "{e}");

        let real = base.join("real");
        std::fs::create_dir(&real).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            ensure_private_dir(&link),
            Err(FileError::Unsafe { .. })
        ));

        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            ensure_private_dir(&file),
            Err(FileError::Unsafe { .. })
        ));
    }

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let _serial = crate::process_state_lock();
        let d = scratch("lock");
        let first = StateDirLock::acquire(&d).unwrap();
        let e = StateDirLock::acquire(&d).unwrap_err();
        assert!(matches!(e, FileError::Locked { .. }), "{e}");
        assert!(e.to_string().contains(&d.display().to_string()));
        drop(first);
        StateDirLock::acquire(&d).unwrap();
    }

    #[test]
    fn lock_is_held_against_another_process() {
        let _serial = crate::process_state_lock();
        let d = scratch("lockproc");
        let _held = StateDirLock::acquire(&d).unwrap();
        // flock(1) in another process must fail to take it without waiting.
        let status = std::process::Command::new("flock")
            .args(["-n", "-x"])
            .arg(&d)
            .arg("true")
            .status();
        if let Ok(status) = status {
            assert!(!status.success(), "another process took the lock");
        }
    }

    #[test]
    fn new_files_are_0600_whatever_the_umask() {
        let _serial = crate::process_state_lock();
        let d = scratch("mode");
        let p = d.join("log");
        // SAFETY: as above.
        let old = unsafe { libc::umask(0) };
        let r = open_private(&p, &append());
        // SAFETY: restores the previous mask.
        unsafe { libc::umask(old) };
        r.unwrap().write_all(b"x").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn another_users_file_is_refused_and_ours_made_0600() {
        let _serial = crate::process_state_lock();
        let d = scratch("owner");
        let theirs = d.join("theirs");
        std::fs::write(&theirs, b"").unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let e = open_private(&theirs, &append()).unwrap_err();
        assert!(
            matches!(e, FileError::Unsafe { .. }) && e.to_string().contains("uid 65534"),
            "{e}"
        );
        assert!(open_state_file(&theirs).is_err());
        let ours = d.join("ours");
        std::fs::write(&ours, b"").unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o644)).unwrap();
        open_private(&ours, &append()).unwrap();
        assert_eq!(std::fs::metadata(&ours).unwrap().mode() & 0o7777, 0o600);
    }

    #[test]
    fn planted_symlink_is_not_followed() {
        let _serial = crate::process_state_lock();
        let d = scratch("symlink");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let log = d.join("log");
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        let mut trunc = OpenOptions::new();
        trunc.write(true).create(true).truncate(true);
        for o in [append(), trunc] {
            let e = open_private(&log, &o).unwrap_err();
            assert!(matches!(e, FileError::Unsafe { .. }), "{e}");
        }
        let mut s = String::new();
        File::open(&victim).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "precious");
    }

    #[test]
    fn hard_links_and_fifos_are_refused() {
        let _serial = crate::process_state_lock();
        let d = scratch("links");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let log = d.join("log");
        std::fs::hard_link(&victim, &log).unwrap();
        assert!(matches!(
            open_private(&log, &append()),
            Err(FileError::Unsafe { .. })
        ));
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut rd = OpenOptions::new();
        rd.read(true);
        assert!(matches!(
            open_private(&fifo, &rd),
            Err(FileError::Unsafe { .. })
        ));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn state_files_are_private_locked_and_never_truncated() {
        let _serial = crate::process_state_lock();
        let d = scratch("state");
        let p = d.join("spool");
        // SAFETY: as above.
        let old = unsafe { libc::umask(0) };
        let r = open_state_file(&p);
        // SAFETY: restores the previous mask.
        unsafe { libc::umask(old) };
        let mut f = r.unwrap();
        f.write_all(b"state").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // A second open, even in this process, finds it locked.
        let e = open_state_file(&p).unwrap_err();
        assert!(matches!(e, FileError::InUse { .. }), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        drop(f);
        // Reopened: not truncated; a mode left wider is made private again.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut s = String::new();
        open_state_file(&p).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "state");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn state_files_are_not_opened_through_symlinks_or_hard_links() {
        let _serial = crate::process_state_lock();
        let d = scratch("state-planted");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.join("symlink");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let hard = d.join("hardlink");
        std::fs::hard_link(&victim, &hard).unwrap();
        for p in [&link, &hard] {
            let e = open_state_file(p).unwrap_err();
            assert!(matches!(e, FileError::Unsafe { .. }), "{e}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn replaced_files_never_write_through_a_planted_symlink() {
        let d = scratch("replace");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.join("plot.png");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = replace_file(&link, b"plot", 0o644).unwrap_err();
        assert!(matches!(e, FileError::Unsafe { .. }), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A dangling link (the target would be created through it) is refused too.
        let dangling = d.join("dangling.png");
        std::os::unix::fs::symlink(d.join("would-be-created"), &dangling).unwrap();
        assert!(replace_file(&dangling, b"plot", 0o644).is_err());
        assert!(!d.join("would-be-created").exists());
        // A hard link to another file: the entry is replaced, the other file keeps its bytes.
        let hard = d.join("hard.png");
        std::fs::hard_link(&victim, &hard).unwrap();
        replace_file(&hard, b"plot", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&hard).unwrap(), b"plot");
        // A plain new file gets the mode asked for; no temporary file is left behind.
        let fresh = d.join("fresh.png");
        replace_file(&fresh, b"x", 0o644).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")),
            "{names:?}"
        );
        // Not a regular file: refused.
        assert!(matches!(
            replace_file(&d, b"x", 0o644),
            Err(FileError::Unsafe { .. })
        ));
        // A missing directory is named as such.
        let e = replace_file(&d.join("missing/plot.png"), b"x", 0o644).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        // The same answers before anything is written, for checking ahead of long work.
        assert!(check_replaceable(&d.join("missing/plot.png")).is_err());
        assert!(matches!(
            check_replaceable(&d),
            Err(FileError::Unsafe { .. })
        ));
        assert!(check_replaceable(&d.join("not-yet.png")).is_ok());
        assert!(!d.join("not-yet.png").exists());
    }
}
