//! What the kvm-pit-policy tests share: the /dev/kvm gate and a QEMU process with its HMP
//! monitor on stdio. The QEMUs come from the version matrix (`devshare_integration::matrix`).

#![allow(dead_code)] // each test binary uses part of this

use std::io::{Read, Write};
use std::path::Path;
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
    /// Starts QEMU `binary` with `args` plus the idle/monitor options, and waits until its
    /// monitor answers, by which time the machine (and any in-kernel PIT) exists.
    pub fn start(binary: &Path, args: &[&str]) -> Qemu {
        Qemu::try_start(binary, args).unwrap_or_else(|output| {
            panic!("QEMU refused {args:?} before its monitor answered:\n{output}")
        })
    }

    /// Like [`Qemu::start`], but a QEMU that exits before its monitor answers (it refused the
    /// command line) is `Err` with everything it printed.
    pub fn try_start(binary: &Path, args: &[&str]) -> Result<Qemu, String> {
        let mut child = Command::new(binary)
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
        qemu.until_prompt()?;
        // Some QEMUs (7.2) print the first prompt before they build the machine, and only then
        // refuse a bad -global: an answered command proves the machine exists.
        writeln!(qemu.stdin, "info status").map_err(|e| format!("QEMU monitor: {e}"))?;
        qemu.until_prompt()?;
        Ok(qemu)
    }

    /// The process id (QEMU itself: the wrappers `exec` it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the monitor prompt and returns what came before it; `Err` with QEMU's output
    /// when QEMU exits first.
    fn until_prompt(&mut self) -> Result<String, String> {
        let deadline = Instant::now() + MONITOR_TIMEOUT;
        loop {
            {
                let out = self.output.lock().unwrap();
                if let Some(pos) = out[self.seen..].find(PROMPT) {
                    let text = out[self.seen..self.seen + pos].to_owned();
                    self.seen += pos + PROMPT.len();
                    return Ok(text);
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its stderr may still be in the pipe: let the readers drain it.
                thread::sleep(Duration::from_millis(200));
                return Err(format!(
                    "QEMU exited ({status}):\n{}",
                    self.output.lock().unwrap()
                ));
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
            .unwrap_or_else(|output| panic!("QEMU died during `{command}`: {output}"))
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
