//! QEMU versions and the command-line spellings that change between them, so that every
//! backend's `--print-qemu-args` prints options the operator's own QEMU accepts.
//!
//! What differs between the versions the README's compatibility table names, each checked
//! against the real binary by the version-matrix tests (Debian's 7.2 from bookworm, 10.0 from
//! bookworm-backports, 11.1 from trixie-backports):
//!
//! - the reconnect delay of a client `-chardev socket`: `reconnect=SECONDS` up to 9.1,
//!   `reconnect-ms=MILLISECONDS` from 9.2 (7.2 refuses `reconnect-ms`, 11.1 refuses
//!   `reconnect`) -- [`QemuVersion::chardev_reconnect`];
//! - the generic vhost-user device that carries a vhost-user virtio-console:
//!   `vhost-user-test-device-pci`, user-creatable from 10.2. 10.0 has `vhost-user-device-pci`
//!   but refuses to create it ("expects a pluggable device type"), 7.2 has neither -- a virtio
//!   console on those needs stream mode -- [`QemuVersion::generic_vhost_user_device`];
//! - vhost-user-net without KVM: QEMU before 8.0 dereferences a NULL pointer when the guest
//!   driver starts a vhost-user NIC whose MSI-X vectors are unmasked and no irqfd exists (TCG),
//!   and dies with SIGSEGV; `vectors=0` on the NIC (legacy INTx interrupts) avoids it --
//!   [`QemuVersion::vhost_user_net_msix_crashes_under_tcg`].
//!
//! The PIT lost-tick policy is spelled `-global kvm-pit.lost_tick_policy=` on every one of
//! them: the old `-no-kvm-pit-reinjection` flag was removed in QEMU 3.0 and 7.2, 10.0 and 11.1
//! all refuse it, so [`crate::pit::qemu_args`] needs no version.
//!
//! ```
//! use devshare_common::qemu::QemuVersion;
//!
//! let debian12: QemuVersion = "7.2".parse().unwrap();
//! assert_eq!(debian12.chardev_reconnect(), "reconnect=1");
//! assert_eq!(debian12.generic_vhost_user_device(), None);
//! let v = QemuVersion::from_version_output("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)");
//! assert_eq!(v, Some(QemuVersion::new(11, 1, 3)));
//! assert_eq!(v.unwrap().chardev_reconnect(), "reconnect-ms=1000");
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// What `qemu-system-* --version` prints before the version number; the same literal is
/// compiled into the binary.
pub const VERSION_BANNER: &str = "QEMU emulator version ";

/// How much of `--version`'s output is read: QEMU prints two short lines.
pub const VERSION_OUTPUT_LIMIT: usize = 4096;

/// How long `--version` may take before it is killed.
pub const VERSION_TIME_LIMIT: Duration = Duration::from_secs(5);

/// A QEMU release, `major.minor.micro` (Debian's package suffixes are not part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QemuVersion {
    /// Major version (11 in 11.1.3).
    pub major: u32,
    /// Minor version (1 in 11.1.3).
    pub minor: u32,
    /// Micro (stable) version (3 in 11.1.3); 0 when only `major.minor` was given.
    pub micro: u32,
}

/// Why a QEMU version could not be had.
#[derive(Debug, thiserror::Error)]
pub enum QemuVersionError {
    /// The text is not `MAJOR.MINOR` or `MAJOR.MINOR.MICRO`.
    #[error("'{0}' is not a QEMU version (write MAJOR.MINOR, e.g. 7.2 or 11.1)")]
    Parse(String),
    /// The binary could not be run.
    #[error("cannot run {path} --version: {source}")]
    Run {
        /// The QEMU binary (or launcher script).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The binary did not finish within the time limit; it was killed.
    #[error("{path} --version did not finish within {seconds} s (killed)")]
    TimedOut {
        /// The QEMU binary (or launcher script).
        path: PathBuf,
        /// The time limit.
        seconds: u64,
    },
    /// The binary ran but printed no `QEMU emulator version X.Y.Z` line.
    #[error("{path} --version printed no \"QEMU emulator version\" line: {output}")]
    NoVersion {
        /// The QEMU binary (or launcher script).
        path: PathBuf,
        /// The first line it printed, and its exit status if it failed.
        output: String,
    },
}

impl QemuVersion {
    /// The oldest QEMU the version matrix tests (Debian 12's).
    pub const OLDEST_TESTED: QemuVersion = QemuVersion::new(7, 2, 0);
    /// The newest QEMU the version matrix tests (what `scripts/setup.sh` installs by default).
    /// Its rules apply when the operator names no version.
    pub const NEWEST_TESTED: QemuVersion = QemuVersion::new(11, 1, 0);

    /// A version from its parts.
    pub const fn new(major: u32, minor: u32, micro: u32) -> QemuVersion {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    /// Whether this is `major.minor` or later.
    pub fn at_least(self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// Finds the version in what `qemu-system-* --version` printed (its first line is
    /// `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`).
    pub fn from_version_output(text: &str) -> Option<QemuVersion> {
        text.lines().find_map(|line| {
            let rest = &line[line.find(VERSION_BANNER)? + VERSION_BANNER.len()..];
            let number: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            number.trim_end_matches('.').parse().ok()
        })
    }

    /// Runs `path --version` (a QEMU binary or a launcher script that passes its arguments on)
    /// and reads the version it prints.
    ///
    /// The binary is the operator's, but it may be anything: it runs in its own process
    /// group with stdin and stderr on `/dev/null`, at most [`VERSION_OUTPUT_LIMIT`] bytes of
    /// its stdout are read, and it has [`VERSION_TIME_LIMIT`] to finish; then the whole group
    /// is killed and reaped, so a binary that floods or hangs neither grows nor blocks the
    /// backend.
    ///
    /// # Errors
    /// [`QemuVersionError::Run`] when it cannot be started, [`QemuVersionError::TimedOut`]
    /// when it does not finish in time, [`QemuVersionError::NoVersion`] when it prints no
    /// version line.
    pub fn of_binary(path: &Path) -> Result<QemuVersion, QemuVersionError> {
        use std::os::unix::process::CommandExt;
        let run_error = |source| QemuVersionError::Run {
            path: path.to_owned(),
            source,
        };
        let mut child = Command::new(path)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(run_error)?;
        let stdout = child.stdout.take();
        let read = stdout.map(|out| read_bounded(out, VERSION_OUTPUT_LIMIT, VERSION_TIME_LIMIT));
        // Whatever it did, nothing of its group outlives this call.
        kill_group(&mut child);
        let status = child.wait().map_err(run_error)?;
        let (bytes, finished) = match read {
            Some(r) => r.map_err(run_error)?,
            None => (Vec::new(), true),
        };
        if !finished {
            return Err(QemuVersionError::TimedOut {
                path: path.to_owned(),
                seconds: VERSION_TIME_LIMIT.as_secs(),
            });
        }
        let stdout = String::from_utf8_lossy(&bytes);
        QemuVersion::from_version_output(&stdout).ok_or_else(|| {
            let first = stdout.lines().map(str::trim).find(|l| !l.is_empty());
            let mut output = crate::output::escape_text(
                &first
                    .unwrap_or("nothing")
                    .chars()
                    .take(200)
                    .collect::<String>(),
            );
            if !status.success() {
                output.push_str(&format!(" ({status})"));
            }
            QemuVersionError::NoVersion {
                path: path.to_owned(),
                output,
            }
        })
    }

    /// The version whose rules `--print-qemu-args` follows: the one given with
    /// `--qemu-version`, else the one `--qemu PATH` reports, else [`Self::NEWEST_TESTED`].
    pub fn chosen(
        version: Option<QemuVersion>,
        binary: Option<&Path>,
    ) -> Result<QemuVersion, QemuVersionError> {
        match (version, binary) {
            (Some(v), _) => Ok(v),
            (None, Some(path)) => QemuVersion::of_binary(path),
            (None, None) => Ok(QemuVersion::NEWEST_TESTED),
        }
    }

    /// A warning for versions outside the tested range, or `None`.
    pub fn untested_warning(self) -> Option<String> {
        if (self.major, self.minor) < (Self::OLDEST_TESTED.major, Self::OLDEST_TESTED.minor) {
            Some(format!(
                "QEMU {self} is older than the oldest QEMU this project is tested with ({}): the \
                 options follow QEMU's documented changes but were not tried on it",
                Self::OLDEST_TESTED
            ))
        } else if (self.major, self.minor) > (Self::NEWEST_TESTED.major, Self::NEWEST_TESTED.minor)
        {
            Some(format!(
                "QEMU {self} is newer than the newest QEMU this project is tested with ({}): the \
                 options are that version's",
                Self::NEWEST_TESTED
            ))
        } else {
            None
        }
    }

    /// The option of a client `-chardev socket` that makes QEMU dial again one second after
    /// the backend went away: `reconnect=1` before 9.2, `reconnect-ms=1000` from 9.2 on (9.2
    /// deprecated `reconnect`, 11 refuses it).
    pub fn chardev_reconnect(self) -> &'static str {
        if self.at_least(9, 2) {
            "reconnect-ms=1000"
        } else {
            "reconnect=1"
        }
    }

    /// The generic vhost-user PCI device an operator can create with `-device`, which a
    /// vhost-user virtio-console needs: `vhost-user-test-device-pci` from QEMU 10.2 on, none
    /// before (10.0's `vhost-user-device-pci` is not user-creatable).
    pub fn generic_vhost_user_device(self) -> Option<&'static str> {
        self.at_least(10, 2).then_some("vhost-user-test-device-pci")
    }

    /// Whether this QEMU dies with SIGSEGV when a guest starts a vhost-user NIC with MSI-X
    /// under TCG (no KVM irqfd). Before 8.0 `virtio_pci_set_guest_notifiers()` installs MSI-X
    /// vector notifiers although vhost-user turned off guest-notifier masking, and the unmask
    /// notifier then reads the irqfd table that only KVM allocates (`vector_irqfd`, NULL under
    /// TCG). 8.0 installs them only when masking is in use. `vectors=0` on the NIC avoids it.
    pub fn vhost_user_net_msix_crashes_under_tcg(self) -> bool {
        !self.at_least(8, 0)
    }
}

impl fmt::Display for QemuVersion {
    /// `7.2` when no micro version is known, `7.2.22` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.micro == 0 {
            write!(f, "{}.{}", self.major, self.minor)
        } else {
            write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
        }
    }
}

impl FromStr for QemuVersion {
    type Err = QemuVersionError;

    /// Parses `MAJOR.MINOR` or `MAJOR.MINOR.MICRO`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || QemuVersionError::Parse(s.to_owned());
        let parts: Vec<&str> = s.trim().split('.').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(err());
        }
        let mut numbers = [0u32; 3];
        for (slot, part) in numbers.iter_mut().zip(&parts) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            *slot = part.parse().map_err(|_| err())?;
        }
        Ok(QemuVersion::new(numbers[0], numbers[1], numbers[2]))
    }
}

/// `value` as one value of a QEMU `key=value,...` option: QEMU splits at every single comma
/// and reads `,,` as a literal one, so a path with a comma (`/tmp/a,b.sock`) must be written
/// `/tmp/a,,b.sock`.
pub fn option_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// A QEMU id (QEMU accepts `[A-Za-z][A-Za-z0-9_.-]*`) made of `prefix` (which must start with
/// a letter) and a user's `name` (a VM or port name may hold anything else): every other
/// character becomes `_`.
pub fn qemu_id(prefix: &str, name: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + name.len());
    for c in prefix.chars().chain(name.chars()) {
        id.push(
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            },
        );
    }
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        id.insert(0, 'x');
    }
    id
}

/// One printed QEMU option, `-option value`, with `value` shell-quoted when a shell would
/// otherwise split or expand it (spaces, quotes, `$`, `*`, braces...), so the line pastes into
/// a shell as is. Commas and `=` need no quoting and are left bare, so the usual
/// `socket,id=x,path=/run/x.sock` reads as it always did.
pub fn option_line(option: &str, value: &str) -> String {
    let bare = value.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(c, '+' | '-' | '.' | '/' | ':' | '@' | '_' | ',' | '=' | '%')
    });
    if bare {
        return format!("{option} {value}");
    }
    // try_quote refuses only a NUL, which no path or name from a config can hold.
    match shlex::try_quote(value) {
        Ok(q) => format!("{option} {q}"),
        Err(_) => format!("{option} {value}"),
    }
}

/// Reads `out` until end of file, `limit` bytes or `time` has passed. Returns what was read
/// and whether the output ended (end of file or the limit) in time.
fn read_bounded(
    mut out: std::process::ChildStdout,
    limit: usize,
    time: Duration,
) -> io::Result<(Vec<u8>, bool)> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + time;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    while bytes.len() < limit {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if ms == 0 {
            return Ok((bytes, false));
        }
        let mut fd = libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fd` is one valid pollfd for a descriptor `out` owns for this whole call.
        let rc = unsafe { libc::poll(&mut fd, 1, i32::from(ms)) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            continue;
        }
        let want = (limit - bytes.len()).min(buf.len());
        match out.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((bytes, true))
}

/// Kills the child's whole process group (it was started as its leader), so helpers a
/// launcher script started go too.
fn kill_group(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The group may be gone already (ESRCH): nothing left to kill.
        // SAFETY: killpg only sends a signal; the group is the child's own (process_group(0)),
        // and the child is not reaped yet, so its id cannot name another group.
        let _ = unsafe { libc::killpg(pid, libc::SIGKILL) };
    }
    let _ = child.kill();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> QemuVersion {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_versions() {
        assert_eq!(v("7.2"), QemuVersion::new(7, 2, 0));
        assert_eq!(v("10.0.2"), QemuVersion::new(10, 0, 2));
        assert_eq!(v("7.2").to_string(), "7.2");
        assert_eq!(v("7.2.22").to_string(), "7.2.22");
        for bad in [
            "", "7", "7.", ".2", "7.2.1.1", "v7.2", "7.x", "7.2-rc1", " 7 . 2",
        ] {
            assert!(bad.parse::<QemuVersion>().is_err(), "{bad:?} accepted");
        }
        assert!(v("10.0") > v("7.2.22") && v("9.2") > v("9.1.3"));
    }

    #[test]
    fn reads_what_version_prints() {
        let out = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                   Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(
            QemuVersion::from_version_output(out),
            Some(QemuVersion::new(7, 2, 22))
        );
        assert_eq!(
            QemuVersion::from_version_output("QEMU emulator version 9.2.0\n"),
            Some(v("9.2"))
        );
        assert_eq!(
            QemuVersion::from_version_output("qemu-img version 7.2.0"),
            None
        );
        assert_eq!(QemuVersion::from_version_output(""), None);
    }

    #[test]
    fn reconnect_spelling_changes_at_9_2() {
        assert_eq!(v("7.2").chardev_reconnect(), "reconnect=1");
        assert_eq!(v("9.1.3").chardev_reconnect(), "reconnect=1");
        assert_eq!(v("9.2").chardev_reconnect(), "reconnect-ms=1000");
        assert_eq!(v("11.1").chardev_reconnect(), "reconnect-ms=1000");
    }

    #[test]
    fn generic_device_from_10_2() {
        assert_eq!(v("7.2").generic_vhost_user_device(), None);
        assert_eq!(v("10.0.2").generic_vhost_user_device(), None);
        assert_eq!(v("10.1.9").generic_vhost_user_device(), None);
        assert_eq!(
            v("10.2").generic_vhost_user_device(),
            Some("vhost-user-test-device-pci")
        );
    }

    #[test]
    fn msix_tcg_crash_before_8_0() {
        assert!(v("7.2.22").vhost_user_net_msix_crashes_under_tcg());
        assert!(!v("8.0").vhost_user_net_msix_crashes_under_tcg());
        assert!(!v("11.1").vhost_user_net_msix_crashes_under_tcg());
    }

    #[test]
    fn chosen_version_and_warnings() {
        assert_eq!(
            QemuVersion::chosen(None, None).unwrap(),
            QemuVersion::NEWEST_TESTED
        );
        assert_eq!(
            QemuVersion::chosen(Some(v("7.2")), Some(Path::new("/nonexistent"))).unwrap(),
            v("7.2")
        );
        let err = QemuVersion::chosen(None, Some(Path::new("/nonexistent/qemu"))).unwrap_err();
        assert!(matches!(err, QemuVersionError::Run { .. }), "{err}");
        // A binary that prints something else.
        let err = QemuVersion::of_binary(Path::new("/bin/true")).unwrap_err();
        assert!(matches!(err, QemuVersionError::NoVersion { .. }), "{err}");
        assert!(v("6.2").untested_warning().is_some());
        assert!(v("12.0").untested_warning().is_some());
        assert!(v("7.2.22").untested_warning().is_none());
        assert!(v("11.1.3").untested_warning().is_none());
    }

    #[test]
    fn printed_values_survive_qemu_and_the_shell() {
        assert_eq!(option_value("/tmp/a,b.sock"), "/tmp/a,,b.sock");
        assert_eq!(qemu_id("console-", "a\"b{c} d"), "console-a_b_c__d");
        assert_eq!(qemu_id("nm", "0"), "nm0");
        assert_eq!(
            option_line("-chardev", "socket,id=x,path=/run/x.sock"),
            "-chardev socket,id=x,path=/run/x.sock"
        );
        let line = option_line("-chardev", "socket,id=x,path=/tmp/my vm's.sock");
        let words = shlex::split(&line).unwrap();
        assert_eq!(words, ["-chardev", "socket,id=x,path=/tmp/my vm's.sock"]);
    }
}
