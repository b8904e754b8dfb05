//! Serial device endpoints (`serial:DEV,...`): the device opened with the asked line settings,
//! which are read back from termios so a driver that silently refused some is reported.
//!
//! A device that hangs up or fails (a USB adapter unplugged: EIO, end of file, EPOLLHUP) is
//! closed and opened again by path, first after `reopen=` (default 1 s), then at doubling
//! delays up to 30 s, so an adapter plugged back in (behind the same name or udev symlink)
//! carries data again without a restart. Meanwhile output waits in the port's buffer.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Instant;

use serialport::{DataBits, FlowControl, Parity, StopBits};

use super::fd::{set_nonblocking, write_vectored};
use super::reopen::Reopen;
use super::{EndpointError, Readiness, SerialSettings, Side, Watch, WatchRole};

#[derive(Debug)]
pub(super) struct Serial {
    /// None once the device went away (hang-up, unplug), until it is opened again.
    fd: Option<OwnedFd>,
    settings: SerialSettings,
    /// While closed: when to try again.
    retry: Option<Reopen>,
    /// Device fds dropped but maybe still in the event loop's epoll set.
    retired: Vec<OwnedFd>,
}

impl Drop for Serial {
    fn drop(&mut self) {
        if let Some(fd) = &self.fd {
            release(fd);
        }
    }
}

/// Undoes TIOCEXCL and the exclusive `flock` (which serialport takes): a tty that outlives our
/// use of it (a PTY standing in) would otherwise refuse the next opener, and so would the
/// device node our own reopen goes through while the old fd waits to be closed. (On a tty
/// that was hung up the ioctl fails; the lock, kept by the file, is released anyway.)
fn release(fd: &OwnedFd) {
    // SAFETY: TIOCNXCL takes no argument; the fd is open for the call.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCNXCL) };
    // SAFETY: flock on an open fd; failure only means there was no lock.
    unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_UN) };
}

impl Side for Serial {
    fn describe(&self) -> String {
        format!(
            "serial {} {}{}",
            self.settings.device.display(),
            self.settings.line(),
            if self.fd.is_none() { " (closed)" } else { "" }
        )
    }

    fn watch_fds(&self) -> [Option<Watch>; 2] {
        [
            self.fd.as_ref().map(|fd| Watch {
                fd: fd.as_raw_fd(),
                role: WatchRole::Data {
                    read_hang_up: false,
                },
            }),
            None,
        ]
    }

    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd())
    }

    fn is_attached(&self) -> bool {
        self.fd.is_some()
    }

    fn write(&mut self, bufs: &[IoSlice<'_>], _total: usize) -> Option<io::Result<usize>> {
        let fd = self.fd.as_ref()?;
        Some(write_vectored(fd.as_fd(), bufs))
    }

    fn has_peers(&self) -> bool {
        true
    }

    /// The device went away: close it and try to open it again after the configured interval,
    /// then at growing delays. Logged once here and once when it is back.
    fn lose(&mut self, why: &str) -> bool {
        let Some(fd) = self.fd.take() else {
            return false;
        };
        release(&fd);
        self.retired.push(fd);
        let retry = Reopen::after(self.settings.reopen, Instant::now());
        log::warn!(
            "serial {}: device gone ({why}); reopening it every {} at first, less often while it stays away",
            self.settings.device.display(),
            humantime::format_duration(retry.interval())
        );
        self.retry = Some(retry);
        true
    }

    fn needs_tick(&self) -> bool {
        self.fd.is_none()
    }

    fn tick(&mut self, now: Instant) -> Readiness {
        if self.fd.is_some() || !self.retry.is_some_and(|r| r.due(now)) {
            return Readiness::Nothing;
        }
        match open_device(&self.settings) {
            Ok(fd) => {
                self.fd = Some(fd);
                self.retry = None;
                log::info!(
                    "serial {}: device back; reopened",
                    self.settings.device.display()
                );
                Readiness::Reopened
            }
            Err(e) => {
                // Once per change of state, not per attempt: this is a debug line.
                log::debug!("serial {}: still away: {e}", self.settings.device.display());
                if let Some(r) = &mut self.retry {
                    r.failed(now);
                }
                Readiness::Nothing
            }
        }
    }

    fn reopen(&mut self) -> Result<bool, EndpointError> {
        if self.fd.is_some() {
            return Ok(false);
        }
        self.fd = Some(open_device(&self.settings)?);
        self.retry = None;
        Ok(true)
    }

    fn close_retired(&mut self) {
        self.retired.clear();
    }

    fn serial_line(&self) -> Option<Result<SerialSettings, EndpointError>> {
        let fd = self.fd.as_ref()?;
        Some(
            read_line_settings(fd.as_fd(), &self.settings).map_err(|source| {
                EndpointError::SerialConfig {
                    device: self.settings.device.clone(),
                    source,
                }
            }),
        )
    }
}

impl Serial {
    pub(super) fn open(settings: &SerialSettings) -> Result<Serial, EndpointError> {
        Ok(Serial {
            fd: Some(open_device(settings)?),
            settings: settings.clone(),
            retry: None,
            retired: Vec::new(),
        })
    }
}

/// Opens the device with `settings`, non-blocking.
fn open_device(settings: &SerialSettings) -> Result<OwnedFd, EndpointError> {
    let device = settings.device.to_string_lossy();
    let port = serialport::new(device, settings.baud)
        .data_bits(settings.data_bits)
        .parity(settings.parity)
        .stop_bits(settings.stop_bits)
        .flow_control(settings.flow)
        .open_native()
        .map_err(|source| EndpointError::SerialOpen {
            device: settings.device.clone(),
            source,
        })?;
    // SAFETY: into_raw_fd hands over the open fd; nothing else owns it afterwards.
    let fd = unsafe { OwnedFd::from_raw_fd(port.into_raw_fd()) };
    let config_err = |source| EndpointError::SerialConfig {
        device: settings.device.clone(),
        source,
    };
    // serialport clears O_NONBLOCK after open; the event loop needs it back.
    set_nonblocking(fd.as_fd()).map_err(config_err)?;
    use_standard_baud(fd.as_fd(), settings.baud).map_err(config_err)?;
    // Drivers may refuse parts of a setting silently (a PTY always runs 8 data bits without
    // parity); say so rather than let the user debug garbled bytes.
    let applied = read_line_settings(fd.as_fd(), settings).map_err(config_err)?;
    if applied != *settings {
        log::warn!(
            "serial {}: asked for {}, the driver applied {}",
            settings.device.display(),
            settings.line(),
            applied.line()
        );
    }
    Ok(fd)
}

/// Standard baud rates and their termios codes.
const BAUD_CODES: &[(u32, libc::speed_t)] = &[
    (50, libc::B50),
    (75, libc::B75),
    (110, libc::B110),
    (134, libc::B134),
    (150, libc::B150),
    (200, libc::B200),
    (300, libc::B300),
    (600, libc::B600),
    (1200, libc::B1200),
    (1800, libc::B1800),
    (2400, libc::B2400),
    (4800, libc::B4800),
    (9600, libc::B9600),
    (19_200, libc::B19200),
    (38_400, libc::B38400),
    (57_600, libc::B57600),
    (115_200, libc::B115200),
    (230_400, libc::B230400),
    (460_800, libc::B460800),
    (500_000, libc::B500000),
    (576_000, libc::B576000),
    (921_600, libc::B921600),
    (1_000_000, libc::B1000000),
    (1_152_000, libc::B1152000),
    (1_500_000, libc::B1500000),
    (2_000_000, libc::B2000000),
    (2_500_000, libc::B2500000),
    (3_000_000, libc::B3000000),
    (3_500_000, libc::B3500000),
    (4_000_000, libc::B4000000),
]; // keep in step with the kernel's baud table

/// serialport always sets the rate as BOTHER + a number; a standard rate is rewritten as
/// its Bnnn code so every termios reader (stty, cfgetospeed) sees it. Odd rates stay BOTHER.
fn use_standard_baud(fd: BorrowedFd<'_>, baud: u32) -> io::Result<()> {
    let Some(&(_, code)) = BAUD_CODES.iter().find(|(rate, _)| *rate == baud) else {
        return Ok(());
    };
    // SAFETY: termios is plain data; zeroed is a valid value and tcgetattr overwrites it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into; fd is open.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfsetspeed only edits the struct it is given; `code` is a valid Bnnn.
    if unsafe { libc::cfsetspeed(&mut t, code) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `t` is a valid termios; fd is open.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the line settings back from the device's termios (the device path and the reopen
/// interval are taken from `asked`).
fn read_line_settings(fd: BorrowedFd<'_>, asked: &SerialSettings) -> io::Result<SerialSettings> {
    // SAFETY: termios2 is plain data; zeroed is a valid value and TCGETS2 overwrites it.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one termios2 into the pointer, which is valid; fd is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let data_bits = match t.c_cflag & libc::CSIZE {
        libc::CS5 => DataBits::Five,
        libc::CS6 => DataBits::Six,
        libc::CS7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match (t.c_cflag & libc::PARENB != 0, t.c_cflag & libc::PARODD != 0) {
        (false, _) => Parity::None,
        (true, true) => Parity::Odd,
        (true, false) => Parity::Even,
    };
    let stop_bits = if t.c_cflag & libc::CSTOPB != 0 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let flow = if t.c_cflag & libc::CRTSCTS != 0 {
        FlowControl::Hardware
    } else if t.c_iflag & libc::IXON != 0 {
        FlowControl::Software
    } else {
        FlowControl::None
    };
    Ok(SerialSettings {
        device: asked.device.clone(),
        baud: t.c_ospeed,
        data_bits,
        parity,
        stop_bits,
        flow,
        reopen: asked.reopen,
    })
}
