//! What the kvm-pit-policy tests share: the /dev/kvm gate, locating QEMU, and a QEMU
//! process with its HMP monitor on stdio.

#![allow(dead_code)] // each test binary uses part of this

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Guards against hangs only; no test asserts on time.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the KVM tests can run. Where `/dev/kvm` is not usable the test says so by name
/// and returns, unless `DEVSHARE_REQUIRE_KVM=1` (set it on machines where KVM must work).
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_pit_policy::lab::probe_kvm() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("DEVSHARE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: DEVSHARE_REQUIRE_KVM=1 but /dev/kvm cannot run the lab: {e}");
            }
            // Straight to fd 2: the test harness captures eprintln! of passing tests, and a
            // skip must be visible.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no usable /dev/kvm here ({e})"
            );
            false
        }
    }
}

fn env_file_value(key: &str) -> Option<String> {
    let cache = std::env::var("DEVSHARE_CACHE").unwrap_or_else(|_| "/var/cache/devshare".into());
    let text = std::fs::read_to_string(Path::new(&cache).join("env")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
}

/// The QEMU to run: `$DEVSHARE_QEMU`, else the one in setup.sh's env file, else the
/// workspace's `scripts/qemu` wrapper.
pub fn qemu_binary() -> PathBuf {
    if let Ok(q) = std::env::var("DEVSHARE_QEMU") {
        return q.into();
    }
    if let Some(q) = env_file_value("DEVSHARE_QEMU") {
        return q.into();
    }
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/qemu");
    assert!(
        wrapper.exists(),
        "no QEMU: set DEVSHARE_QEMU or run scripts/setup.sh"
    );
    wrapper
}

/// The tool's own binary.
pub fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvm-pit-policy"))
}

/// A QEMU started with `-S` (no guest code runs) and its human monitor on stdio.
pub struct Qemu {
    child: Child,
    stdin: ChildStdin,
    output: Arc<Mutex<String>>,
    seen: usize,
}

const PROMPT: &str = "(qemu) ";

impl Qemu {
    /// Starts QEMU with `args` plus the idle/monitor options, and waits for its monitor, by
    /// which time the machine (and any in-kernel PIT) exists.
    pub fn start(args: &[&str]) -> Qemu {
        let mut child = Command::new(qemu_binary())
            .args(args)
            .args(["-S", "-display", "none", "-nodefaults", "-monitor", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start QEMU");
        let stdin = child.stdin.take().expect("QEMU stdin");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("QEMU stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("QEMU stderr")),
        ] {
            let output = output.clone();
            thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut qemu = Qemu {
            child,
            stdin,
            output,
            seen: 0,
        };
        qemu.until_prompt();
        qemu
    }

    /// The process id (QEMU itself: the wrappers `exec` it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn until_prompt(&mut self) -> String {
        let deadline = Instant::now() + MONITOR_TIMEOUT;
        loop {
            {
                let out = self.output.lock().unwrap();
                if let Some(pos) = out[self.seen..].find(PROMPT) {
                    let text = out[self.seen..self.seen + pos].to_owned();
                    self.seen += pos + PROMPT.len();
                    return text;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({status}) before its monitor answered:\n{}",
                    self.output.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "QEMU monitor silent for {MONITOR_TIMEOUT:?}:\n{}",
                self.output.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a human-monitor command and returns its output.
    pub fn monitor(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to QEMU monitor");
        self.until_prompt()
    }

    /// The PIT device QEMU created and its `lost_tick_policy` property, from `info qtree`.
    pub fn pit_device(&mut self) -> (String, Option<String>) {
        let tree = self.monitor("info qtree");
        let mut lines = tree.lines();
        while let Some(line) = lines.next() {
            let line = line.trim();
            if let Some(dev) = line.strip_prefix("dev: ") {
                let name = dev.split(',').next().unwrap_or("").to_owned();
                if name == "kvm-pit" || name == "isa-pit" {
                    // Properties follow, indented, until the next device.
                    let policy = lines
                        .by_ref()
                        .map(str::trim)
                        .take_while(|l| !l.starts_with("dev: "))
                        .find_map(|l| l.strip_prefix("lost_tick_policy = "))
                        .map(|v| v.trim_matches('"').to_owned());
                    return (name, policy);
                }
            }
        }
        panic!("no PIT device in info qtree:\n{tree}");
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
