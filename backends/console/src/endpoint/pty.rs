//! PTY endpoints: a new PTY pair in raw mode; the master is ours, the slave is what a terminal
//! program opens (optionally through a symlink).

use std::ffi::{CStr, OsStr};
use std::fs::OpenOptions;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::time::Instant;

use devshare_common::log_limited_or_debug;
use devshare_common::ratelimit::RateLimit;

use super::fd::{set_nonblocking, write_vectored};
use super::reopen::{Reopen, DEFAULT_INTERVAL};
use super::{EndpointError, Readiness, Side, Watch, WatchRole};

#[derive(Debug)]
pub(super) struct Pty {
    master: OwnedFd,
    /// Held open so the master never reads EIO while no program has the slave open, and
    /// watched: a hang-up of the terminal (`vhangup()`, as a getty does) hangs this fd up and
    /// resets the terminal to cooked mode, with echo, which would send guest output back to
    /// the guest. It is then opened again and set raw. None while that failed (retried on
    /// ticks); the master is not watched meanwhile.
    slave: Option<OwnedFd>,
    slave_path: PathBuf,
    link: Option<PtyLink>,
    /// When to try the slave again after a failed reopen.
    retry: Option<Reopen>,
    /// Slave fds replaced but maybe still in the event loop's epoll set.
    retired: Vec<OwnedFd>,
    /// Limits the lines about hang-ups and settings restored: whoever may open the terminal
    /// decides how often they happen.
    terminal_events: RateLimit,
}

impl Pty {
    pub(super) fn open(link: Option<&Path>) -> Result<Pty, EndpointError> {
        let (master, slave, slave_path) = open_pty_pair().map_err(EndpointError::PtyCreate)?;
        set_nonblocking(master.as_fd()).map_err(EndpointError::PtyCreate)?;
        set_nonblocking(slave.as_fd()).map_err(EndpointError::PtyCreate)?;
        // Raw mode: bytes pass unchanged, and no echo sends guest output back to the guest.
        make_raw(slave.as_fd()).map_err(EndpointError::PtyCreate)?;
        let link = match link {
            Some(link) => {
                Some(
                    make_link(link, &slave_path).map_err(|source| EndpointError::PtyLink {
                        link: link.to_path_buf(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Ok(Pty {
            master,
            slave: Some(slave),
            terminal_events: RateLimit::standard(format!("pty {}", slave_path.display())),
            slave_path,
            link,
            retry: None,
            retired: Vec::new(),
        })
    }

    /// Our slave fd was hung up, or the master reports the slave side closed: open the slave
    /// again (which also clears the master's hang-up) and make it raw again.
    fn reopen_slave(&mut self, why: &str) -> Readiness {
        if let Some(old) = self.slave.take() {
            self.retired.push(old);
        }
        match open_slave(&self.slave_path) {
            Ok(slave) => {
                self.slave = Some(slave);
                let again = self.retry.take().is_some();
                log_limited_or_debug!(
                    log::Level::Info,
                    self.terminal_events,
                    "{}: {why}; opened again in raw mode{}",
                    self.describe(),
                    if again { " after failed attempts" } else { "" }
                );
                Readiness::Reopened
            }
            Err(e) => {
                if self.retry.is_none() {
                    log::warn!(
                        "{}: {why}; cannot open the slave again ({e}); retrying",
                        self.describe()
                    );
                    self.retry = Some(Reopen::after(DEFAULT_INTERVAL, Instant::now()));
                } else if let Some(r) = &mut self.retry {
                    r.failed(Instant::now());
                }
                Readiness::Nothing
            }
        }
    }
}

/// Opens the slave side of our PTY, non-blocking and raw.
fn open_slave(path: &Path) -> io::Result<OwnedFd> {
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    let slave = OwnedFd::from(slave);
    make_raw(slave.as_fd())?;
    Ok(slave)
}

impl Side for Pty {
    fn describe(&self) -> String {
        match &self.link {
            Some(link) => format!(
                "pty {} (link {})",
                self.slave_path.display(),
                link.link.display()
            ),
            None => format!("pty {}", self.slave_path.display()),
        }
    }

    fn watch_fds(&self) -> [Option<Watch>; 2] {
        // Without our slave the master reports a hang-up as soon as the last program
        // closes the terminal: it is watched again once the slave is back.
        let slave = self.slave.as_ref().map(|s| Watch {
            fd: s.as_raw_fd(),
            role: WatchRole::HangUp,
        });
        let master = slave.map(|_| Watch {
            fd: self.master.as_raw_fd(),
            role: WatchRole::Data {
                read_hang_up: false,
            },
        });
        [master, slave]
    }

    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.master.as_fd())
    }

    fn is_attached(&self) -> bool {
        true
    }

    fn write(&mut self, bufs: &[IoSlice<'_>], _total: usize) -> Option<io::Result<usize>> {
        // Guest output written here is the terminal's input: with echo (or canonical mode,
        // signals, CR/NL translation) switched on by a program on the slave (`stty -F LINK
        // echo icanon`), it would come back to the guest as input, or changed. The backend
        // owns the line discipline: raw mode is checked (one ioctl) before every write and
        // restored if someone changed it.
        match restore_raw(self.master.as_fd()) {
            Ok(false) => {}
            Ok(true) => log_limited_or_debug!(
                log::Level::Warn,
                self.terminal_events,
                "{}: someone changed the terminal's settings; raw mode restored (the backend \
                 owns them: echo would send guest output back to the guest)",
                self.describe()
            ),
            Err(e) => log_limited_or_debug!(
                log::Level::Warn,
                self.terminal_events,
                "{}: cannot check the terminal's settings: {e}",
                self.describe()
            ),
        }
        Some(write_vectored(self.master.as_fd(), bufs))
    }

    fn has_peers(&self) -> bool {
        true
    }

    /// The master failed (EIO: the slave side is closed): get the slave back.
    fn lose(&mut self, why: &str) -> bool {
        self.reopen_slave(why) == Readiness::Reopened
    }

    fn end_of_input(&mut self) -> Readiness {
        self.reopen_slave("end of file on the master")
    }

    fn hang_up(&mut self, fd: RawFd) -> Readiness {
        if self.slave.as_ref().map(|s| s.as_raw_fd()) == Some(fd) {
            self.reopen_slave("the terminal was hung up")
        } else if fd == self.master.as_raw_fd() {
            self.reopen_slave("the slave side was closed")
        } else {
            Readiness::Nothing
        }
    }

    fn needs_tick(&self) -> bool {
        self.retry.is_some()
    }

    fn tick(&mut self, now: Instant) -> Readiness {
        match &self.retry {
            Some(r) if r.due(now) => self.reopen_slave("retrying"),
            _ => Readiness::Nothing,
        }
    }

    fn shutdown(&mut self) {
        if let Some(link) = self.link.take() {
            link.remove_if_ours();
        }
    }

    fn close_retired(&mut self) {
        self.retired.clear();
    }

    fn window_size(&self) -> Option<(u16, u16)> {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, which is valid.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        if rc != 0 || (ws.ws_col == 0 && ws.ws_row == 0) {
            return None;
        }
        Some((ws.ws_col, ws.ws_row))
    }

    fn pty_path(&self) -> Option<&Path> {
        Some(&self.slave_path)
    }
}

/// A symlink to a PTY slave, removed on drop if it still points there.
#[derive(Debug)]
struct PtyLink {
    link: PathBuf,
    target: PathBuf,
}

impl PtyLink {
    /// Removes the link if it still points at our PTY (another process may have made its own
    /// link there since: that one stays).
    fn remove_if_ours(&self) {
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            if let Err(e) = std::fs::remove_file(&self.link) {
                log::warn!("cannot remove PTY link {}: {e}", self.link.display());
            }
        }
    }
}

impl Drop for PtyLink {
    fn drop(&mut self) {
        self.remove_if_ours();
    }
}

/// Opens a new PTY pair: (master, slave, slave path).
fn open_pty_pair() -> io::Result<(OwnedFd, OwnedFd, PathBuf)> {
    // SAFETY: posix_openpt takes flags only; the result is checked before use.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt/unlockpt only take the master fd, which is open.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
        // SAFETY: as above.
        || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most `name.len()` bytes, NUL-terminated, into `name`.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) };
    let slave_path = PathBuf::from(OsStr::from_bytes(name.to_bytes()));
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)?;
    Ok((master, OwnedFd::from(slave), slave_path))
}

/// Puts the terminal of `fd` (the master reaches the slave's settings) back in raw mode if it
/// is not; returns whether it had to.
fn restore_raw(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: termios is plain data; zeroed is a valid value and tcgetattr overwrites it.
    let mut now: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is a valid termios to write into; fd is open.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = now;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    if (raw.c_iflag, raw.c_oflag, raw.c_lflag, raw.c_cflag)
        == (now.c_iflag, now.c_oflag, now.c_lflag, now.c_cflag)
    {
        return Ok(false);
    }
    // SAFETY: `raw` is a valid termios; fd is open.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

fn make_raw(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: termios is plain data; zeroed is a valid value and tcgetattr overwrites it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into; fd is open.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is a valid termios; fd is open.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Points `link` at `target`, replacing a stale symlink but never another kind of file.
fn make_link(link: &Path, target: &Path) -> io::Result<PtyLink> {
    // Only a symlink of ours (one an earlier run left) is replaced: in a shared directory
    // anything else at the name is another user's, and stays.
    let ours = |meta: &std::fs::Metadata| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        meta.file_type().is_symlink() && meta.uid() == unsafe { libc::geteuid() }
    };
    if let Ok(meta) = std::fs::symlink_metadata(link) {
        if !meta.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a symlink; not replacing it",
            ));
        }
        if !ours(&meta) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "is another user's symlink; not replacing it",
            ));
        }
    }
    // Make the new link beside it and rename over: the old one is replaced atomically.
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(".new-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| ours(&m)) {
        let _ = std::fs::remove_file(&tmp);
    }
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(PtyLink {
        link: link.to_path_buf(),
        target: target.to_path_buf(),
    })
}
