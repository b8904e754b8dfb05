//! Listening Unix sockets, made the one way every socket of every backend is made: vhost-user
//! sockets, stream sockets, endpoint sockets and stats sockets alike.
//!
//! [`listen`] guarantees, for the path it is given:
//!
//! - **No takeover.** When a live process answers on the path (a connect probe succeeds, or
//!   its backlog is full), it refuses with [`ListenError::InUse`]; the other process keeps its
//!   socket.
//! - **Only stale sockets are replaced.** A socket nobody answers on (left by a process that
//!   was killed) is replaced. A regular file, a directory, a symlink (and so its target) or
//!   anything else at the path is left alone: [`ListenError::NotASocket`].
//! - **Never wider than asked.** The socket is bound inside a fresh 0700 directory beside the
//!   path, given its mode and group ([`SocketOptions`], default 0600) there, where nobody else
//!   can reach it, and only then moved to the path with `renameat2`. So the path never names a
//!   socket with wider permissions than asked, whatever the umask, and no other thread's umask
//!   is touched (umask is per process).
//! - **Atomic replacement.** A stale socket is swapped out with `RENAME_EXCHANGE` and the
//!   swapped-out inode is checked to be the one probed, so a file or a live socket that appeared
//!   meanwhile is put back, never removed. With nothing there, `RENAME_NOREPLACE` never
//!   overwrites what may have appeared since the check. (File systems without `renameat2`
//!   flags fall back to `link(2)`, which never overwrites either.)
//! - **Cleanup of our own sockets only.** The [`SocketFile`] returned removes the path when
//!   dropped, and [`remove_created_sockets`] (called on SIGTERM/SIGINT) removes every socket
//!   this process created, each only if the path still names the inode it created.
//!
//! Errors name the path. Adopting it where a socket is made today by `UnixListener::bind`:
//!
//! ```no_run
//! use devshare_common::listen::{listen, SocketOptions};
//! # fn main() -> Result<(), devshare_common::listen::ListenError> {
//! let (listener, file) = listen("/run/vm1-data.sock".as_ref(), &SocketOptions::default())?;
//! listener.set_nonblocking(true).ok();
//! // Keep `file` as long as `listener`: dropping it removes the path.
//! # drop((listener, file));
//! # Ok(())
//! # }
//! ```
//!
//! `getsockname` on the listener reports the private name it was bound under, not the final
//! path: nothing in the backends relies on it.

use std::ffi::OsString;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags};
use nix::unistd::{Gid, Group};

/// Mode of sockets when nothing else is asked: the owner (the user this process runs as) only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Longest path a `sockaddr_un` holds (108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Who may connect to the sockets a process creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    /// Permission bits (at most 0o777), e.g. 0o600 or 0o660. Connecting needs write permission.
    pub mode: u32,
    /// Group to give the socket (e.g. the group QEMU or libvirt runs as); `None` keeps the
    /// process's group.
    pub group: Option<u32>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            mode: DEFAULT_SOCKET_MODE,
            group: None,
        }
    }
}

impl SocketOptions {
    /// Options from the `--socket-mode` / `--socket-group` texts (either may be absent).
    /// A mode that lets every local user connect is accepted with a warning.
    ///
    /// # Errors
    /// [`ListenError::Mode`] or [`ListenError::Group`] when a text does not parse, the mode
    /// is refused or the group does not exist (see [`parse_mode`], [`parse_group`]).
    pub fn parse(mode: Option<&str>, group: Option<&str>) -> Result<SocketOptions, ListenError> {
        let opts = SocketOptions {
            mode: mode
                .map(parse_mode)
                .transpose()?
                .unwrap_or(DEFAULT_SOCKET_MODE),
            group: group.map(parse_group).transpose()?,
        };
        if let Some(w) = opts.world_access() {
            log::warn!("{w}");
        }
        Ok(opts)
    }

    /// A warning when the mode lets every local user connect (write permission for others):
    /// whoever connects to a vhost-user socket drives a guest's device, and to a console
    /// endpoint gets the guest's console.
    pub fn world_access(&self) -> Option<String> {
        (self.mode & 0o002 != 0).then(|| {
            format!(
                "socket mode {:04o} lets every local user connect; give the sockets a group \
                 (mode 0660 with a group) instead",
                self.mode
            )
        })
    }
}

/// Parses an octal permission mode such as `0660`, `660` or `0o660`: permission bits only
/// (setuid, setgid and sticky bits mean nothing on a socket), and the owner must be able to
/// read and write (connect): a mode such as `0` or `0066` only locks out the user the backend
/// runs as and its tools.
///
/// # Errors
/// [`ListenError::Mode`] naming the text and the reason.
pub fn parse_mode(text: &str) -> Result<u32, ListenError> {
    let t = text.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    let refuse = |reason: &str| ListenError::Mode {
        text: text.to_owned(),
        reason: reason.to_owned(),
    };
    // from_str_radix alone would take a leading '+'.
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(refuse("not an octal permission mode such as 0600 or 0660"));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => {
            if m & 0o600 != 0o600 {
                return Err(refuse(
                    "the owner must keep read and write permission (0600)",
                ));
            }
            Ok(m)
        }
        _ => Err(refuse(
            "only permission bits (at most 0777) mean something on a socket",
        )),
    }
}

/// Parses a group given by name or by numeric id; either must exist in the group database
/// (a group nobody is in opens the socket to nobody, and is most likely a typo).
///
/// # Errors
/// [`ListenError::Group`] when no such group exists.
pub fn parse_group(text: &str) -> Result<u32, ListenError> {
    let t = text.trim();
    let found = match crate::config::parse_decimal::<u32>(t) {
        Some(gid) => Group::from_gid(Gid::from_raw(gid)),
        None => Group::from_name(t),
    };
    match found {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(ListenError::Group(text.to_owned())),
    }
}

/// Why a socket could not be made to listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A live process answers on the path.
    #[error("{path} is served by another running process; stop it first or choose another path")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path; it is never removed.
    #[error("{path} exists and is {kind}, not a socket; not removing it")]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What it is ("a regular file", "a directory", "a symlink", ...).
        kind: &'static str,
    },
    /// A system call failed.
    #[error("cannot listen on {path}: {op}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A socket mode that is refused.
    #[error("socket mode '{text}': {reason}")]
    Mode {
        /// The text given.
        text: String,
        /// Why it is refused.
        reason: String,
    },
    /// A socket group that names no group of this host.
    #[error("socket group '{0}' is neither the name nor the numeric id of a group of this host (see /etc/group)")]
    Group(String),
}

/// A socket path this process created and still owns: dropping it removes the path, if the
/// path still names the same inode (another process may have replaced it meanwhile).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        forget_created(&self.path, self.dev_ino);
        remove_if_ours(&self.path, self.dev_ino);
    }
}

/// Every socket path created by [`listen`] and not yet dropped, with its inode.
static CREATED: Mutex<Vec<(PathBuf, (u64, u64))>> = Mutex::new(Vec::new());

fn created() -> std::sync::MutexGuard<'static, Vec<(PathBuf, (u64, u64))>> {
    // The list stays consistent even if a holder panicked: entries are pushed or removed whole.
    CREATED.lock().unwrap_or_else(|p| p.into_inner())
}

fn forget_created(path: &Path, dev_ino: (u64, u64)) {
    created().retain(|(p, d)| !(p == path && *d == dev_ino));
}

fn remove_if_ours(path: &Path, dev_ino: (u64, u64)) -> bool {
    let ours = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == dev_ino);
    if ours {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("cannot remove socket {}: {e}", path.display());
            return false;
        }
    }
    ours
}

/// Removes every socket path this process created with [`listen`] that still names the socket
/// it created, and returns those paths. New connections to them are no longer possible; the
/// listening descriptors themselves stay open. For a process that exits without running
/// destructors; on SIGTERM/SIGINT, [`close_and_remove_created_sockets`].
pub fn remove_created_sockets() -> Vec<PathBuf> {
    remove_registered(&mut created())
}

/// [`remove_created_sockets`] for a process that is shutting down: from then on [`listen`]
/// creates no socket (a thread that calls it waits for the exit instead), so a thread still starting up cannot leave a socket behind a
/// shutdown that has already cleaned up. Used on SIGTERM/SIGINT.
pub fn close_and_remove_created_sockets() -> Vec<PathBuf> {
    let mut registry = created();
    SOCKETS_CLOSED.store(true, std::sync::atomic::Ordering::SeqCst);
    remove_registered(&mut registry)
}

fn remove_registered(registry: &mut Vec<(PathBuf, (u64, u64))>) -> Vec<PathBuf> {
    std::mem::take(registry)
        .into_iter()
        .filter(|(path, dev_ino)| remove_if_ours(path, *dev_ino))
        .map(|(path, _)| path)
        .collect()
}

/// Set by [`close_and_remove_created_sockets`]: the process is shutting down.
static SOCKETS_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Listens on the Unix socket `path` with the permissions of `opts`: see the module
/// documentation for what is refused and how the socket is put in place. The listener is in
/// blocking mode with the standard backlog.
///
/// # Errors
/// [`ListenError::InUse`] when a live process serves `path`; [`ListenError::NotASocket`] when
/// something other than a socket is there; [`ListenError::Io`] (naming the step) otherwise.
pub fn listen(
    path: &Path,
    opts: &SocketOptions,
) -> Result<(UnixListener, SocketFile), ListenError> {
    let io_err = |op: &'static str| {
        let path = path.to_path_buf();
        move |source: io::Error| ListenError::Io { path, op, source }
    };
    if path.file_name().is_none() {
        return Err(io_err("the path names no file")(
            io::ErrorKind::InvalidInput.into(),
        ));
    }
    if path.as_os_str().len() > SUN_PATH_MAX {
        return Err(io_err(
            "path longer than a Unix socket address holds (107 bytes)",
        )(io::ErrorKind::InvalidInput.into()));
    }
    // Held from making the private directory to recording the socket: a shutdown
    // (close_and_remove_created_sockets) either finds the socket recorded or has closed
    // creation before anything was made.
    let mut registry = created();
    if SOCKETS_CLOSED.load(std::sync::atomic::Ordering::SeqCst) {
        // The signal thread is shutting the process down and exits it (status 0) when done:
        // this start-up thread has nothing left to do, and an error returned here would race
        // that exit with a failure status.
        drop(registry);
        loop {
            std::thread::park();
        }
    }
    let stale = probe(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(io_err("its directory does not exist")(
            io::Error::from_raw_os_error(libc::ENOENT),
        ));
    }
    let mut private = PrivateDir::create(&parent).map_err(io_err("create a private directory"))?;
    let tmp = private.socket_path();
    // The private name is a few bytes longer than the final one; when that is too long for a
    // socket address, bind through the directory's descriptor (a short /proc/self/fd path).
    let tmp_addr = private
        .socket_addr()
        .map_err(io_err("open the private directory"))?;
    let listener = UnixListener::bind(&tmp_addr).map_err(io_err("bind"))?;
    if let Some(gid) = opts.group {
        nix::unistd::chown(&tmp, None, Some(Gid::from_raw(gid)))
            .map_err(|e| io_err("set the socket's group")(e.into()))?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(opts.mode & 0o777))
        .map_err(io_err("set the socket's mode"))?;
    let meta = std::fs::symlink_metadata(&tmp).map_err(io_err("stat the new socket"))?;
    let dev_ino = (meta.dev(), meta.ino());
    move_into_place(&tmp, path, stale).map_err(|e| match e {
        Placement::Io(op, source) => io_err(op)(source),
        Placement::Refused(err) => err,
    })?;
    drop(private);
    registry.push((path.to_path_buf(), dev_ino));
    drop(registry);
    log::debug!(
        "listening on {} (mode {:o}{})",
        path.display(),
        opts.mode,
        opts.group
            .map(|g| format!(", group {g}"))
            .unwrap_or_default()
    );
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            dev_ino,
        },
    ))
}

/// Checks, without creating anything, that [`listen`] could use `path`: nothing is there, or
/// a stale socket is. For code that still binds its sockets itself, to refuse a live socket or
/// a file in the way before it would remove it.
///
/// # Errors
/// [`ListenError::InUse`] or [`ListenError::NotASocket`] as [`listen`] would give them.
pub fn check_free(path: &Path) -> Result<(), ListenError> {
    probe(path).map(|_| ())
}

/// What is at `path` now: `None` for nothing, the inode of a stale socket, or an error when a
/// live socket or something that is not a socket is there.
fn probe(path: &Path) -> Result<Option<(u64, u64)>, ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ListenError::Io {
                path: path.to_path_buf(),
                op: "stat",
                source,
            })
        }
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let kind = if ft.is_file() {
            "a regular file"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symlink"
        } else if ft.is_fifo() {
            "a FIFO"
        } else {
            "a device"
        };
        return Err(ListenError::NotASocket {
            path: path.to_path_buf(),
            kind,
        });
    }
    if is_live(path).map_err(|source| ListenError::Io {
        path: path.to_path_buf(),
        op: "probe the existing socket",
        source,
    })? {
        return Err(ListenError::InUse {
            path: path.to_path_buf(),
        });
    }
    Ok(Some((meta.dev(), meta.ino())))
}

/// Whether a process accepts connections on the socket at `path`. A non-blocking connect never
/// waits: a listener with a full backlog answers EAGAIN, which also means alive.
fn is_live(path: &Path) -> io::Result<bool> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= sa.sun_path.len() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (dst, src) in sa.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sa` is a valid sockaddr_un of the length given; `sock` is open.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            (&sa as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(true),
        Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

enum Placement {
    Io(&'static str, io::Error),
    Refused(ListenError),
}

/// Moves the prepared socket `tmp` to `path`: only into an empty place, or in exchange for the
/// stale socket `stale` and nothing else.
fn move_into_place(tmp: &Path, path: &Path, stale: Option<(u64, u64)>) -> Result<(), Placement> {
    let changed = || {
        Placement::Refused(ListenError::Io {
            path: path.to_path_buf(),
            op: "the path changed while the socket was being set up",
            source: io::ErrorKind::AlreadyExists.into(),
        })
    };
    match stale {
        None => match renameat2(None, tmp, None, path, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => Err(changed()),
            Err(Errno::EINVAL) | Err(Errno::ENOSYS) => link_into_place(tmp, path, changed),
            Err(e) => Err(Placement::Io("move the socket into place", e.into())),
        },
        Some(old) => match renameat2(None, tmp, None, path, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => {
                // `tmp` now names whatever was at `path`.
                let out = std::fs::symlink_metadata(tmp).map(|m| (m.dev(), m.ino()));
                if out.as_ref().is_ok_and(|d| *d == old) {
                    let _ = std::fs::remove_file(tmp);
                    Ok(())
                } else {
                    // Something else took the place meanwhile: give it back untouched.
                    let _ = renameat2(None, tmp, None, path, RenameFlags::RENAME_EXCHANGE);
                    Err(changed())
                }
            }
            Err(Errno::ENOENT) => move_into_place(tmp, path, None),
            Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {
                let now = std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()));
                if now.as_ref().is_ok_and(|d| *d == old) {
                    std::fs::remove_file(path)
                        .map_err(|e| Placement::Io("remove the stale socket", e))?;
                }
                link_into_place(tmp, path, changed)
            }
            Err(e) => Err(Placement::Io("move the socket into place", e.into())),
        },
    }
}

/// `link(2)` never replaces an existing name, on every file system.
fn link_into_place(
    tmp: &Path,
    path: &Path,
    changed: impl Fn() -> Placement,
) -> Result<(), Placement> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => {
            let _ = std::fs::remove_file(tmp);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(changed()),
        Err(e) => Err(Placement::Io("move the socket into place", e)),
    }
}

/// A fresh directory only this user can enter (0700, made by `mkdir`, so never pre-existing);
/// removed, with the socket `s` in it, when dropped.
pub(crate) struct PrivateDir {
    path: PathBuf,
    dir: Option<std::fs::File>,
}

impl PrivateDir {
    /// Makes the directory inside `parent`.
    pub(crate) fn create(parent: &Path) -> io::Result<PrivateDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for _ in 0..16 {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let mut name = OsString::from(".ds");
            name.push(format!(
                "{:x}{:x}{:x}",
                std::process::id(),
                n,
                nanos & 0xfff
            ));
            let path = parent.join(name);
            // mkdir applies the umask on top of 0700: never wider.
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path, dir: None }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::ErrorKind::AlreadyExists.into())
    }

    /// Where the socket inside goes: `DIR/s`.
    pub(crate) fn socket_path(&self) -> PathBuf {
        self.path.join("s")
    }

    /// An address for [`Self::socket_path`] short enough for `sockaddr_un`: the path itself,
    /// or `/proc/self/fd/N/s` through an open descriptor of the directory when it is too long.
    pub(crate) fn socket_addr(&mut self) -> io::Result<PathBuf> {
        let p = self.socket_path();
        if p.as_os_str().len() <= SUN_PATH_MAX {
            Ok(p)
        } else {
            self.short_path()
        }
    }

    /// `/proc/self/fd/N/s`, naming the socket through an open descriptor of this directory.
    fn short_path(&mut self) -> io::Result<PathBuf> {
        let dir = std::fs::File::open(&self.path)?;
        let p = PathBuf::from(format!(
            "/proc/self/fd/{}/s",
            std::os::fd::AsRawFd::as_raw_fd(&dir)
        ));
        self.dir = Some(dir);
        Ok(p)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path.join("s"));
        if let Err(e) = std::fs::remove_dir(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ds-listen-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn modes_and_groups_parse() {
        let _serial = crate::process_state_lock();
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert_eq!(parse_mode("0o640").unwrap(), 0o640);
        assert!(parse_mode("4755").is_err());
        assert!(parse_mode("rw").is_err());
        assert!(parse_mode("").is_err());
        assert_eq!(parse_group("0").unwrap(), 0);
        assert_eq!(parse_group("root").unwrap(), 0);
        assert!(parse_group("no-such-group-here").is_err());
    }

    #[test]
    fn modes_and_group_ids_are_digits_only() {
        let _serial = crate::process_state_lock();
        // u32::from_str_radix and str::parse take a leading '+': "+660" is not a mode.
        for bad in ["+660", "0o+660", "-0", "6 60"] {
            assert!(parse_mode(bad).is_err(), "mode {bad:?} accepted");
        }
        assert!(parse_group("+0").is_err(), "group '+0' accepted");
    }

    #[test]
    fn modes_that_lock_the_owner_out_and_groups_that_do_not_exist_are_refused() {
        for m in ["0", "000", "0066", "0400", "0200", "0070"] {
            let e = parse_mode(m).unwrap_err().to_string();
            assert!(e.contains("owner"), "{m}: {e}");
        }
        let e = parse_mode("10777").unwrap_err().to_string();
        assert!(e.contains("0777"), "{e}");
        // A numeric id must name a group too.
        let e = parse_group("99999").unwrap_err().to_string();
        assert!(e.contains("99999"), "{e}");
        // World-accessible modes are accepted, with a warning.
        for (m, warned) in [
            ("0777", true),
            ("0606", true),
            ("0660", false),
            ("0644", false),
        ] {
            let o = SocketOptions::parse(Some(m), None).unwrap();
            assert_eq!(o.world_access().is_some(), warned, "{m}");
        }
    }

    #[test]
    fn default_mode_is_0600_whatever_the_umask() {
        let _serial = crate::process_state_lock();
        let d = scratch("mode");
        let p = d.join("a.sock");
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let r = listen(&p, &SocketOptions::default());
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(old) };
        let (_l, _f) = r.unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o7777, 0o600);
        // Only the socket is left beside it: the private directory is gone.
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("a.sock")]);
    }

    #[test]
    fn mode_and_group_are_applied() {
        let _serial = crate::process_state_lock();
        let d = scratch("group");
        let p = d.join("g.sock");
        let opts = SocketOptions {
            mode: 0o660,
            group: Some(parse_group("daemon").unwrap_or(1)),
        };
        let (_l, _f) = listen(&p, &opts).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o660);
        assert_eq!(m.gid(), opts.group.unwrap());
    }

    #[test]
    fn live_socket_is_refused_and_keeps_serving() {
        let _serial = crate::process_state_lock();
        let d = scratch("live");
        let p = d.join("l.sock");
        let (first, _f) = listen(&p, &SocketOptions::default()).unwrap();
        match listen(&p, &SocketOptions::default()) {
            Err(ListenError::InUse { path }) => assert_eq!(path, p),
            other => panic!("expected InUse, got {other:?}"),
        }
        let _c = UnixStream::connect(&p).unwrap();
        first.accept().unwrap();
    }

    #[test]
    fn other_kinds_of_file_are_never_removed() {
        let _serial = crate::process_state_lock();
        let d = scratch("kinds");
        let file = d.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let dir = d.join("dir");
        std::fs::create_dir(&dir).unwrap();
        let target = d.join("target");
        std::fs::write(&target, b"target").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for p in [&file, &dir, &link] {
            let e = listen(p, &SocketOptions::default()).unwrap_err();
            assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        assert!(dir.is_dir());
        assert_eq!(std::fs::read(&target).unwrap(), b"target");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn stale_socket_is_replaced_and_removed_on_drop() {
        let _serial = crate::process_state_lock();
        let d = scratch("stale");
        let p = d.join("s.sock");
        drop(UnixListener::bind(&p).unwrap()); // a socket file nobody serves
        let (l, f) = listen(&p, &SocketOptions::default()).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
        drop(f);
        assert!(!p.exists());
    }

    #[test]
    fn created_sockets_are_removed_on_request_and_no_others() {
        let _serial = crate::process_state_lock();
        let d = scratch("created");
        let ours = d.join("ours.sock");
        let (_l, f) = listen(&ours, &SocketOptions::default()).unwrap();
        let removed = remove_created_sockets();
        assert!(removed.contains(&ours));
        assert!(!ours.exists());
        // A socket another process put at the path later is not ours to remove.
        let _other = UnixListener::bind(&ours).unwrap();
        drop(f);
        assert!(ours.exists());
    }

    #[test]
    fn long_paths_still_bind() {
        let _serial = crate::process_state_lock();
        let d = scratch("long");
        let mut name = "x".repeat(SUN_PATH_MAX - d.as_os_str().len() - 1);
        name.truncate(SUN_PATH_MAX - d.as_os_str().len() - 1);
        let p = d.join(name);
        assert_eq!(p.as_os_str().len(), SUN_PATH_MAX);
        let (_l, _f) = listen(&p, &SocketOptions::default()).unwrap();
        UnixStream::connect(&p).unwrap();
    }
}
