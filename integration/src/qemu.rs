//! Runs real QEMU guests for end-to-end tests.
//!
//! The guest is the Debian cloud kernel and busybox initramfs that `scripts/setup.sh` prepares.
//! A test hands the guest a shell script; it is packed into a small cpio archive appended to the
//! shared base initramfs, and the base `/init` runs it as `/test.sh`, prints
//! `DEVSHARE-TEST-EXIT=<code>` on the serial console and powers the guest off.
//!
//! ```no_run
//! use devshare_integration::qemu::{Guest, DEFAULT_TIMEOUT};
//!
//! let mut guest = Guest::builder().name("hello").script("echo hi; exit 3").spawn()?;
//! let run = guest.wait_exit(DEFAULT_TIMEOUT)?;
//! assert_eq!(run.exit_code, 3);
//! assert!(run.console.lines().any(|l| l == "hi"));
//! # Ok::<(), devshare_integration::qemu::QemuError>(())
//! ```
//!
//! Paths come from the environment (`DEVSHARE_QEMU`, `DEVSHARE_KERNEL`, `DEVSHARE_INITRD`) or,
//! for any of them not set, from the env file setup.sh writes (`$DEVSHARE_CACHE/env`, by default
//! `/var/cache/devshare/env`). The accelerator is TCG unless `DEVSHARE_ACCEL` or the builder
//! says otherwise.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// What the guest's `/init` prints, followed by the exit code of `/test.sh`.
pub const EXIT_SENTINEL: &str = "DEVSHARE-TEST-EXIT=";

/// A timeout generous enough for a TCG boot plus a short script while other tests run in
/// parallel on a 2-core machine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Default guest RAM in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// Kernel command line every guest gets; tests add to it with [`GuestBuilder::cmdline`].
/// `no_timer_check`: a TCG guest starved of CPU on a busy host can miss the ticks the kernel
/// counts at boot to check the IO-APIC timer, and then panics ("IO-APIC + timer doesn't
/// work"); the check tells nothing about the devices under test.
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet no_timer_check";

/// How many console lines an error message shows.
const ERROR_CONSOLE_LINES: usize = 60;

/// Errors of the QEMU runner. `Debug` prints the same text as `Display`, so a test's
/// `unwrap()`/`expect()` shows the console tail readably instead of one escaped string.
#[derive(thiserror::Error)]
pub enum QemuError {
    /// Neither the environment nor setup.sh's env file says where a piece of the test bed is.
    #[error("QEMU not found: run scripts/setup.sh ({0} is not set and {1} does not exist)")]
    NotSetUp(&'static str, PathBuf),
    /// The env file names a path that is not there (any more).
    #[error("{what} not found at {path}: run scripts/setup.sh")]
    MissingFile {
        /// Which piece: QEMU, kernel or initrd.
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
    },
    /// A file of the test bed could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    File {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A path given for a file inside the guest is not absolute and clean.
    #[error("guest path {0:?} must be absolute, without empty, '.' or '..' components")]
    BadGuestPath(String),
    /// QEMU could not be started.
    #[error("cannot start QEMU ({path}): {source}")]
    Spawn {
        /// The QEMU executable.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Waiting for or killing the QEMU process failed.
    #[error("cannot {action} QEMU (pid {pid}): {source}")]
    Process {
        /// What was attempted.
        action: &'static str,
        /// QEMU's process id.
        pid: u32,
        /// The underlying error.
        source: io::Error,
    },
    /// The guest did not finish in time; QEMU was killed.
    #[error("guest {name} did not power off within {timeout:?} (QEMU killed)\n{report}")]
    Timeout {
        /// The guest's name.
        name: String,
        /// How long we waited.
        timeout: Duration,
        /// Console tail and QEMU's stderr.
        report: String,
    },
    /// QEMU ended without the guest printing its exit sentinel (crash, panic, bad arguments).
    #[error(
        "guest {name}: QEMU exited ({status}) without the guest reporting an exit code\n{report}"
    )]
    NoExitCode {
        /// The guest's name.
        name: String,
        /// QEMU's exit status.
        status: ExitStatus,
        /// Console tail and QEMU's stderr.
        report: String,
    },
    /// No console line matched within the timeout.
    #[error("guest {name}: no console line containing {pattern:?} within {timeout:?}\n{report}")]
    LineTimeout {
        /// The guest's name.
        name: String,
        /// What was looked for.
        pattern: String,
        /// How long we waited.
        timeout: Duration,
        /// Console tail and QEMU's stderr.
        report: String,
    },
    /// QEMU's console closed (QEMU exited) before a matching line appeared.
    #[error(
        "guest {name}: console closed before a line containing {pattern:?} appeared\n{report}"
    )]
    ConsoleClosed {
        /// The guest's name.
        name: String,
        /// What was looked for.
        pattern: String,
        /// Console tail and QEMU's stderr.
        report: String,
    },
}

impl std::fmt::Debug for QemuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, QemuError>;

/// Where the test bed's QEMU, guest kernel and base initramfs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBed {
    /// The QEMU executable (possibly setup.sh's launcher script).
    pub qemu: PathBuf,
    /// The guest kernel (bzImage).
    pub kernel: PathBuf,
    /// The base initramfs (gzip'ed newc cpio).
    pub initrd: PathBuf,
}

impl TestBed {
    /// The env file setup.sh writes: `$DEVSHARE_CACHE/env`, by default under /var/cache/devshare.
    pub fn env_file() -> PathBuf {
        let cache = std::env::var_os("DEVSHARE_CACHE")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| OsString::from("/var/cache/devshare"));
        PathBuf::from(cache).join("env")
    }

    /// A setting of the test bed: the environment variable `key`, else the line `key=...` of
    /// [`TestBed::env_file`]; `None` when neither has it.
    pub fn setting(key: &str) -> Result<Option<String>> {
        if let Some(value) = std::env::var(key).ok().filter(|v| !v.is_empty()) {
            return Ok(Some(value));
        }
        let env_file = Self::env_file();
        let file_vars = match fs::read_to_string(&env_file) {
            Ok(text) => parse_env_file(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(QemuError::File {
                    action: "read",
                    path: env_file,
                    source,
                })
            }
        };
        Ok(file_vars
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v))
    }

    /// Finds the test bed: each of `DEVSHARE_QEMU`, `DEVSHARE_KERNEL` and `DEVSHARE_INITRD` from
    /// the environment, else from [`TestBed::env_file`]; every path must exist.
    pub fn locate() -> Result<TestBed> {
        Ok(TestBed {
            qemu: Self::existing("DEVSHARE_QEMU", "QEMU")?,
            kernel: Self::existing("DEVSHARE_KERNEL", "guest kernel")?,
            initrd: Self::existing("DEVSHARE_INITRD", "guest initrd")?,
        })
    }

    /// The path setting `key` names ([`TestBed::setting`]), which must exist.
    pub fn existing(key: &'static str, what: &'static str) -> Result<PathBuf> {
        let path = PathBuf::from(
            Self::setting(key)?.ok_or_else(|| QemuError::NotSetUp(key, Self::env_file()))?,
        );
        if path.exists() {
            Ok(path)
        } else {
            Err(QemuError::MissingFile { what, path })
        }
    }

    /// The same test bed with another QEMU binary (e.g. one QEMU of the version matrix).
    pub fn with_qemu(mut self, qemu: PathBuf) -> TestBed {
        self.qemu = qemu;
        self
    }
}

/// Parses `KEY=VALUE` lines (comments and blank lines skipped, no quoting).
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A file the per-test archive puts into the guest.
#[derive(Debug, Clone)]
struct GuestFile {
    path: String,
    mode: u32,
    contents: FileContents,
}

#[derive(Debug, Clone)]
enum FileContents {
    Bytes(Vec<u8>),
    Host(PathBuf),
}

/// Describes a guest before it starts; see [`Guest::builder`].
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    name: String,
    memory_mib: u64,
    cpus: u32,
    accel: Option<String>,
    script: Option<String>,
    files: Vec<GuestFile>,
    cmdline: Vec<String>,
    args: Vec<OsString>,
    bed: Option<TestBed>,
}

impl GuestBuilder {
    fn new() -> Self {
        GuestBuilder {
            name: "guest".to_string(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 1,
            accel: None,
            script: None,
            files: Vec::new(),
            cmdline: Vec::new(),
            args: Vec::new(),
            bed: None,
        }
    }

    /// A name for logs, error messages and the scratch directory (e.g. the test's name).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Guest RAM in MiB (default [`DEFAULT_MEMORY_MIB`]); it is a shared memfd so vhost-user
    /// backends can map it.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs (default 1).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// The `-accel` value; without it `DEVSHARE_ACCEL` decides, else `tcg`.
    pub fn accel(mut self, accel: &str) -> Self {
        self.accel = Some(accel.to_string());
        self
    }

    /// The shell script the guest runs as `/test.sh`; its exit code is the run's exit code.
    /// Without a script the guest starts a shell on its console.
    pub fn script(mut self, script: &str) -> Self {
        self.script = Some(script.to_string());
        self
    }

    /// Puts a file with these contents and permission bits at `guest_path` in the guest.
    pub fn file(mut self, guest_path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files.push(GuestFile {
            path: guest_path.to_string(),
            mode,
            contents: FileContents::Bytes(contents.into()),
        });
        self
    }

    /// Copies a host file (read at spawn time) to `guest_path` in the guest, with `mode`.
    pub fn host_file(mut self, guest_path: &str, host_path: impl Into<PathBuf>, mode: u32) -> Self {
        self.files.push(GuestFile {
            path: guest_path.to_string(),
            mode,
            contents: FileContents::Host(host_path.into()),
        });
        self
    }

    /// Appends to the kernel command line (after `console=ttyS0 panic=-1 quiet no_timer_check`).
    pub fn cmdline(mut self, extra: &str) -> Self {
        self.cmdline.push(extra.to_string());
        self
    }

    /// Adds one QEMU argument (a `-chardev`, `-device`, `-netdev` ... or its value).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// Adds several QEMU arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Uses these paths instead of [`TestBed::locate`].
    pub fn test_bed(mut self, bed: TestBed) -> Self {
        self.bed = Some(bed);
        self
    }

    /// The full QEMU argument list for a guest booting `initrd`.
    fn qemu_args(&self, bed: &TestBed, initrd: &Path) -> Vec<OsString> {
        let accel = self
            .accel
            .clone()
            .or_else(|| {
                std::env::var("DEVSHARE_ACCEL")
                    .ok()
                    .filter(|a| !a.is_empty())
            })
            .unwrap_or_else(|| "tcg".to_string());
        let mut append = BASE_CMDLINE.to_string();
        for extra in &self.cmdline {
            append.push(' ');
            append.push_str(extra);
        }
        let mem = format!("{}M", self.memory_mib);
        let mut args: Vec<OsString> = [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            &accel,
            "-machine",
            "q35,memory-backend=mem",
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-m",
            &mem,
            "-smp",
            &self.cpus.to_string(),
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-append",
            &append,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push("-kernel".into());
        args.push(bed.kernel.clone().into());
        args.push("-initrd".into());
        args.push(initrd.into());
        args.extend(self.args.iter().cloned());
        args
    }

    /// Builds the initrd (base + per-test archive) and starts QEMU.
    ///
    /// QEMU is killed when the thread that called `spawn` exits (so a crashed test leaves no
    /// guest behind): spawn a guest in the thread that owns it, not in a short-lived helper.
    pub fn spawn(self) -> Result<Guest> {
        let bed = match &self.bed {
            Some(bed) => bed.clone(),
            None => TestBed::locate()?,
        };
        let scratch = ScratchDir::new(&self.name).map_err(|source| QemuError::File {
            action: "create a scratch directory in",
            path: std::env::temp_dir(),
            source,
        })?;
        let initrd = scratch.path().join("initrd");
        self.write_initrd(&bed.initrd, &initrd)?;

        let args = self.qemu_args(&bed, &initrd);
        log::info!("guest {}: {} {:?}", self.name, bed.qemu.display(), args);
        let mut command = Command::new(&bed.qemu);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                // QEMU must not outlive a test process that dies without running destructors.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| QemuError::Spawn {
            path: bed.qemu.clone(),
            source,
        })?;

        let console = Arc::new(Console::default());
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            let console = Arc::clone(&console);
            let name = self.name.clone();
            thread::spawn(move || console.collect(out, &name));
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = Arc::clone(&stderr);
            let name = self.name.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]);
                    log::warn!("guest {name}: qemu stderr: {}", text.trim_end());
                    lock(&stderr).push_str(&text);
                }
            });
        }
        Ok(Guest {
            name: self.name,
            child,
            console,
            stderr,
            cursor: 0,
            status: None,
            _scratch: scratch,
        })
    }

    /// Writes `base` + zero padding to a 4-byte boundary + a newc archive of the test's files.
    fn write_initrd(&self, base: &Path, out: &Path) -> Result<()> {
        let mut image = fs::read(base).map_err(|source| QemuError::File {
            action: "read",
            path: base.to_path_buf(),
            source,
        })?;
        // The kernel only recognises an uncompressed archive at a 4-byte aligned offset.
        image.resize(image.len().next_multiple_of(4), 0);

        let mut archive = NewcArchive::default();
        let mut dirs = BTreeSet::new();
        let mut files = self.files.clone();
        if let Some(script) = &self.script {
            files.push(GuestFile {
                path: "/test.sh".to_string(),
                mode: 0o755,
                contents: FileContents::Bytes(script.as_bytes().to_vec()),
            });
        }
        for file in &files {
            let rel = clean_guest_path(&file.path)?;
            // Parent directories first: the kernel does not create them on its own.
            let mut parent = String::new();
            let components: Vec<&str> = rel.split('/').collect();
            for comp in &components[..components.len() - 1] {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(comp);
                if dirs.insert(parent.clone()) {
                    archive.directory(&parent, 0o755);
                }
            }
            let data = match &file.contents {
                FileContents::Bytes(bytes) => bytes.clone(),
                FileContents::Host(path) => fs::read(path).map_err(|source| QemuError::File {
                    action: "read",
                    path: path.clone(),
                    source,
                })?,
            };
            archive.file(&rel, file.mode, &data);
        }
        image.extend_from_slice(&archive.finish());
        fs::write(out, &image).map_err(|source| QemuError::File {
            action: "write",
            path: out.to_path_buf(),
            source,
        })
    }
}

/// Checks a guest path and returns it without the leading '/'.
fn clean_guest_path(path: &str) -> Result<String> {
    let rel = path
        .strip_prefix('/')
        .ok_or_else(|| QemuError::BadGuestPath(path.to_string()))?;
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(QemuError::BadGuestPath(path.to_string()));
    }
    Ok(rel.to_string())
}

/// A newc ("070701") cpio archive, the format the kernel unpacks into its rootfs.
#[derive(Default)]
struct NewcArchive {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl NewcArchive {
    const S_IFREG: u32 = 0o100000;
    const S_IFDIR: u32 = 0o040000;

    fn directory(&mut self, name: &str, perm: u32) {
        self.entry(name, Self::S_IFDIR | (perm & 0o7777), 2, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, Self::S_IFREG | (perm & 0o7777), 1, data);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) {
        self.next_inode += 1;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        // namesize check; the name size counts its NUL.
        let fields = [
            self.next_inode,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let len = self.bytes.len().next_multiple_of(4);
        self.bytes.resize(len, 0);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, &[]);
        self.bytes
    }
}

/// The guest's serial console as QEMU printed it, line by line.
#[derive(Default)]
struct Console {
    state: Mutex<ConsoleState>,
    changed: Condvar,
}

#[derive(Default)]
struct ConsoleState {
    lines: Vec<String>,
    partial: Vec<u8>,
    closed: bool,
}

impl Console {
    /// Reads QEMU's stdout until it closes, splitting it into lines.
    fn collect(&self, mut out: impl Read, name: &str) {
        let mut buf = [0u8; 4096];
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut state = lock(&self.state);
            for &byte in &buf[..n] {
                match byte {
                    b'\n' => {
                        let line = String::from_utf8_lossy(&state.partial).into_owned();
                        state.partial.clear();
                        log::debug!("guest {name}: {line}");
                        state.lines.push(line);
                    }
                    b'\r' => {}
                    _ => state.partial.push(byte),
                }
            }
            drop(state);
            self.changed.notify_all();
        }
        let mut state = lock(&self.state);
        if !state.partial.is_empty() {
            let line = String::from_utf8_lossy(&state.partial).into_owned();
            state.partial.clear();
            state.lines.push(line);
        }
        state.closed = true;
        drop(state);
        self.changed.notify_all();
    }

    fn text(&self) -> String {
        let state = lock(&self.state);
        let mut text = state.lines.join("\n");
        if !state.lines.is_empty() {
            text.push('\n');
        }
        text.push_str(&String::from_utf8_lossy(&state.partial));
        text
    }

    /// Waits until the console has closed (QEMU exited) or `deadline` passes.
    fn wait_closed(&self, deadline: Instant) -> bool {
        let mut state = lock(&self.state);
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// Locks a mutex, still usable if a reader thread panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a finished guest left behind.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The exit code of the guest's `/test.sh`.
    pub exit_code: i32,
    /// Everything the guest printed on its serial console (kernel and script), `\r` removed.
    pub console: String,
    /// QEMU's own exit status.
    pub qemu_status: ExitStatus,
}

/// A running QEMU guest. Dropping it kills QEMU, reaps it and removes its scratch files.
pub struct Guest {
    name: String,
    child: Child,
    console: Arc<Console>,
    stderr: Arc<Mutex<String>>,
    /// Console lines before this index were consumed by [`Guest::wait_for_line`].
    cursor: usize,
    status: Option<ExitStatus>,
    _scratch: ScratchDir,
}

impl Guest {
    /// Starts describing a guest.
    pub fn builder() -> GuestBuilder {
        GuestBuilder::new()
    }

    /// The guest's name as given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the console printed so far.
    pub fn console_output(&self) -> String {
        self.console.text()
    }

    /// What QEMU printed on its stderr so far.
    pub fn qemu_stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Waits for the guest to power off and returns its script's exit code and console.
    /// On timeout QEMU is killed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<GuestRun> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill()?;
                return Err(QemuError::Timeout {
                    name: self.name.clone(),
                    timeout,
                    report: self.report(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        };
        // QEMU has exited, so the console pipe closes promptly; wait for the reader to drain it.
        self.console
            .wait_closed(Instant::now() + Duration::from_secs(5));
        let console = self.console.text();
        match parse_exit_code(&console) {
            Some(exit_code) => Ok(GuestRun {
                exit_code,
                console,
                qemu_status: status,
            }),
            None => Err(QemuError::NoExitCode {
                name: self.name.clone(),
                status,
                report: self.report(),
            }),
        }
    }

    /// Waits for a console line containing `pattern` that comes after the line matched by the
    /// previous call (like `expect`), and returns it.
    pub fn wait_for_line(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.console.state);
        loop {
            if let Some(offset) = state.lines[self.cursor..]
                .iter()
                .position(|l| l.contains(pattern))
            {
                let index = self.cursor + offset;
                self.cursor = index + 1;
                return Ok(state.lines[index].clone());
            }
            if state.closed {
                drop(state);
                return Err(QemuError::ConsoleClosed {
                    name: self.name.clone(),
                    pattern: pattern.to_string(),
                    report: self.report(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                return Err(QemuError::LineTimeout {
                    name: self.name.clone(),
                    pattern: pattern.to_string(),
                    timeout,
                    report: self.report(),
                });
            }
            state = match self.console.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Kills QEMU (if still running) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let pid = self.child.id();
        match self.child.kill() {
            Ok(()) => {}
            // Already exited and reaped by the kernel's view: wait() below collects it.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
            Err(source) => {
                return Err(QemuError::Process {
                    action: "kill",
                    pid,
                    source,
                })
            }
        }
        let status = self.child.wait().map_err(|source| QemuError::Process {
            action: "wait for",
            pid,
            source,
        })?;
        self.status = Some(status);
        Ok(())
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let pid = self.child.id();
        let status = self.child.try_wait().map_err(|source| QemuError::Process {
            action: "wait for",
            pid,
            source,
        })?;
        self.status = status;
        Ok(status)
    }

    /// The console's last lines and QEMU's stderr, for error messages.
    fn report(&self) -> String {
        let console = self.console.text();
        let lines: Vec<&str> = console.lines().collect();
        let skip = lines.len().saturating_sub(ERROR_CONSOLE_LINES);
        let mut report = format!(
            "--- console (last {} of {} lines) ---\n",
            lines.len() - skip,
            lines.len()
        );
        for line in &lines[skip..] {
            report.push_str(line);
            report.push('\n');
        }
        let stderr = self.qemu_stderr();
        if !stderr.trim().is_empty() {
            report.push_str("--- qemu stderr ---\n");
            report.push_str(stderr.trim_end());
            report.push('\n');
        }
        report
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            log::warn!("guest {}: {e}", self.name);
        }
    }
}

/// Finds the exit code the guest's `/init` printed (the last sentinel on the console).
fn parse_exit_code(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|line| {
        let start = line.find(EXIT_SENTINEL)? + EXIT_SENTINEL.len();
        let digits: String = line[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '-')
            .collect();
        digits.parse().ok()
    })
}

/// A private temporary directory, removed with everything in it when dropped. Tests use it for
/// sockets and other per-test files.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh directory `devshare-<label>-<pid>-<n>` under the system temp dir.
    pub fn new(label: &str) -> io::Result<ScratchDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("devshare-{label}-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir { path }),
                // Left over from an earlier process with the same pid: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines_are_parsed() {
        let vars = parse_env_file("# c\nDEVSHARE_QEMU=/a/b\n\n DEVSHARE_KERNEL = /k \nnoise\n");
        assert_eq!(
            vars,
            vec![
                ("DEVSHARE_QEMU".to_string(), "/a/b".to_string()),
                ("DEVSHARE_KERNEL".to_string(), "/k".to_string()),
            ]
        );
    }

    #[test]
    fn exit_code_is_the_last_sentinel() {
        let console = "boot\nDEVSHARE-TEST-EXIT=1\nx\n[  1.0] DEVSHARE-TEST-EXIT=42\n";
        assert_eq!(parse_exit_code(console), Some(42));
        assert_eq!(parse_exit_code("no sentinel here"), None);
    }

    #[test]
    fn guest_paths_must_be_absolute_and_clean() {
        assert_eq!(
            clean_guest_path("/usr/bin/x").ok(),
            Some("usr/bin/x".into())
        );
        for bad in ["", "/", "rel", "/a//b", "/a/../b", "/a/./b", "/a/"] {
            assert!(clean_guest_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn newc_archive_layout() {
        let mut archive = NewcArchive::default();
        archive.file("test.sh", 0o755, b"echo\n");
        let bytes = archive.finish();
        // Header (110) + "test.sh\0" (8) = 118 -> padded to 120; data 5 -> padded to 8.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[14..22], b"000081ED");
        assert_eq!(&bytes[54..62], b"00000005");
        assert_eq!(&bytes[110..118], b"test.sh\0");
        assert_eq!(&bytes[120..125], b"echo\n");
        assert_eq!(&bytes[128..134], b"070701");
        assert_eq!(bytes.len() % 4, 0);
        let trailer = &bytes[128 + 110..128 + 110 + 11];
        assert_eq!(trailer, b"TRAILER!!!\0");
    }
}
