//! A `vhost-user-console` process for the console's end-to-end tests: started in a scratch
//! directory with a stats socket, and watched through what an operator sees: its counters,
//! its log, its sockets, and the CPU time it burns.
//!
//! Everything here waits for a readiness signal (a counter, a log line, a socket), never for
//! a fixed time. [`Console::assert_quiet`] is the one measure of "no busy loop": a window
//! defined by work this thread does, not by the clock.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::BackendProcess;
use crate::qemu::ScratchDir;

/// How long a test waits for a readiness signal before it fails (with the backend's log).
pub const WAIT: Duration = Duration::from_secs(20);

/// CPU time this thread spends on busy work during [`Console::assert_quiet`].
pub const QUIET_WORK: Duration = Duration::from_millis(300);
/// Most CPU ticks (1/100 s) the backend may use meanwhile: a quiet process uses none or one;
/// one in a busy loop gets about as much CPU as the test thread (30 ticks or more).
pub const QUIET_TICKS: u64 = 8;

/// A running backend with a stats socket at `DIR/stats.sock`.
pub struct Console {
    /// The scratch directory (sockets, logs, links go here).
    pub dir: ScratchDir,
    /// The process.
    pub process: BackendProcess,
}

impl Console {
    /// Starts `vhost-user-console ARGS --stats-socket DIR/stats.sock` in a fresh scratch
    /// directory, where `args` may name paths as `{dir}/...`, and waits until the stats
    /// socket answers and every path of `ready` (relative to the directory) exists. Sockets
    /// are not probed by connecting: a probe would be a client (or a QEMU) of its own. A
    /// socket path exists only once it listens (it is renamed into place).
    pub fn start(label: &str, args: &[&str], ready: &[&str]) -> Console {
        let dir = ScratchDir::new(label).unwrap_or_else(|e| panic!("scratch dir: {e}"));
        Console::start_in(dir, args, ready)
    }

    /// As [`start`](Self::start), in an existing directory (a second process on the same
    /// files).
    pub fn start_in(dir: ScratchDir, args: &[&str], ready: &[&str]) -> Console {
        Console::start_in_with_env(dir, args, ready, &[])
    }

    /// As [`start_in`](Self::start_in), with `env` in the backend's environment (e.g. a crash
    /// point of a debug build, `DEVSHARE_CONSOLE_CRASH_AT`).
    pub fn start_in_with_env(
        dir: ScratchDir,
        args: &[&str],
        ready: &[&str],
        env: &[(&str, &str)],
    ) -> Console {
        let mut process = spawn_with_env(&dir, args, env, "backend.log");
        let stats = dir.path().join("stats.sock");
        process
            .wait_for_socket(&stats, WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
        for r in ready {
            process
                .wait_for_path(&dir.path().join(r), WAIT)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        Console { dir, process }
    }

    /// `DIR/name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The stats document.
    pub fn stats(&self) -> serde_json::Value {
        stats_of(&self.path("stats.sock")).unwrap_or_else(|e| {
            panic!(
                "stats socket does not answer: {e}; log:\n{}",
                self.process.log()
            )
        })
    }

    /// The entry of port `vm/port` in one stats document.
    pub fn port_stats(&self, vm: &str, port: &str) -> serde_json::Value {
        let doc = self.stats();
        doc["ports"]
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["vm"] == vm && p["port"] == port))
            .cloned()
            .unwrap_or_else(|| panic!("no port {vm}/{port} in {doc}"))
    }

    /// Counter `key` of port `vm/port`.
    pub fn stat(&self, vm: &str, port: &str, key: &str) -> u64 {
        let p = self.port_stats(vm, port);
        p[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} for {vm}/{port} in {p}"))
    }

    /// Waits until one snapshot of port `vm/port`'s counters satisfies `ok` (`what`
    /// describes it), and returns that snapshot.
    pub fn wait_port(
        &self,
        vm: &str,
        port: &str,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let p = self.port_stats(vm, port);
            if ok(&p) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}/{port}: {p} never showed {what}; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until counter `key` of `vm/port` is `want`.
    pub fn wait_stat(&self, vm: &str, port: &str, key: &str, want: u64) {
        self.wait_stat_by(vm, port, key, &format!("= {want}"), |v| v == want);
    }

    /// Waits until counter `key` of `vm/port` satisfies `ok` (`what` describes it).
    pub fn wait_stat_by(
        &self,
        vm: &str,
        port: &str,
        key: &str,
        what: &str,
        ok: impl Fn(u64) -> bool,
    ) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.stat(vm, port, key);
            if ok(got) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}/{port} {key} is {got}, expected {what}; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many times `needle` occurs in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.process.log().matches(needle).count()
    }

    /// Waits until `needle` occurs `n` times in the log.
    pub fn wait_log_n(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.log_count(needle) < n {
            assert!(
                Instant::now() < deadline,
                "backend never logged {needle:?} {n} times; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until one of `needles` occurs more often than `before` says it did (counts
    /// from [`log_count`](Self::log_count)); returns which one did.
    pub fn wait_log_change(&self, needles: &[&str], before: &[usize]) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = (0..needles.len()).find(|&i| self.log_count(needles[i]) > before[i]) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "backend never logged any of {needles:?} again; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `needle` is in the log.
    pub fn wait_log(&self, needle: &str) {
        self.wait_log_n(needle, 1);
    }

    /// The TCP port of endpoint `tcp:ADDR:0` as the backend logged it (`tcp ADDR:PORT`).
    pub fn tcp_port(&self, addr: &str) -> u16 {
        self.wait_log(&format!("console endpoint ready: tcp {addr}:"));
        let log = self.process.log();
        let needle = format!("console endpoint ready: tcp {addr}:");
        let at = log.find(&needle).unwrap_or_default() + needle.len();
        log[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port logged after {needle:?}"))
    }

    /// CPU time the backend used so far (user + system), in ticks of 1/100 s.
    pub fn cpu_ticks(&self) -> u64 {
        let pid = self
            .process
            .pid()
            .unwrap_or_else(|| panic!("backend not running"));
        cpu_ticks(pid).unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"))
    }

    /// Asserts that the backend burns (next to) no CPU now. The window is this thread's own
    /// work: it spends [`QUIET_WORK`] of CPU time on busy work, during which a backend in a
    /// busy loop gets a comparable share of the machine however loaded it is; a quiet one
    /// uses none. `what` says which state is checked.
    pub fn assert_quiet(&mut self, what: &str) {
        let before = self.cpu_ticks();
        busy_work(QUIET_WORK);
        let used = self.cpu_ticks() - before;
        assert!(
            self.process.is_running(),
            "backend died ({what}); log:\n{}",
            self.process.log()
        );
        assert!(
            used <= QUIET_TICKS,
            "{what}: the backend used {used} ticks of CPU while this thread did {} ms of work \
             (at most {QUIET_TICKS} expected: is it spinning on an fd?); log:\n{}",
            QUIET_WORK.as_millis(),
            self.process.log()
        );
    }
}

/// Spawns the backend in `dir` with `args` (`{dir}` replaced) and, unless `args` name one,
/// its stats socket at `DIR/stats.sock`; the log goes to `DIR/log`.
pub fn spawn(dir: &ScratchDir, args: &[&str], log: &str) -> BackendProcess {
    spawn_with_env(dir, args, &[], log)
}

/// As [`spawn`], with `env` added to the backend's environment.
pub fn spawn_with_env(
    dir: &ScratchDir,
    args: &[&str],
    env: &[(&str, &str)],
    log: &str,
) -> BackendProcess {
    let d = dir.path().display().to_string();
    let mut full: Vec<String> = args.iter().map(|a| a.replace("{dir}", &d)).collect();
    if !args.contains(&"--stats-socket") {
        full.push("--stats-socket".into());
        full.push(format!("{d}/stats.sock"));
    }
    BackendProcess::spawn_with_env("vhost-user-console", &full, env, &dir.path().join(log))
        .unwrap_or_else(|e| panic!("cannot start vhost-user-console: {e}"))
}

/// The stats document served at `path`.
pub fn stats_of(path: &Path) -> io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(WAIT))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(io::Error::other)
}

/// utime + stime of process `pid`, in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("no ')' in stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let num = |i: usize| -> io::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other(format!("field {i} of /proc/{pid}/stat")))
    };
    Ok(num(14)? + num(15)?)
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Spends `work` of this thread's CPU time on arithmetic.
fn busy_work(work: Duration) {
    let start = thread_cpu();
    let mut x: u64 = 1;
    while thread_cpu() - start < work {
        for _ in 0..10_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
        std::hint::black_box(x);
    }
}
