//! vhost-user-console against what a hostile guest, a careless operator or another local user
//! can do (issue 10): the largest VM the configuration accepts, state files that cannot be
//! turned against their targets, guest-caused warnings at a bounded rate, and a guest that
//! floods its rings with the worst chains the spec allows while the other ports and the
//! linked VM keep moving.
//!
//! The backend is the real process; the guest is the frontend harness playing the driver.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::console_guest::*;
use devshare_integration::frontend::{
    Descriptor, DriverQueue, QueueConfig, DESC_F_INDIRECT, DESC_F_NEXT,
};
use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::ScratchDir;
use devshare_integration::testdata::pattern;

const WAIT: Duration = Duration::from_secs(10);
/// For conditions that need many round trips on a machine busy with other builds.
const LONG_WAIT: Duration = Duration::from_secs(60);

/// A running vhost-user-console and its scratch directory.
struct Backend {
    dir: PathBuf,
    process: BackendProcess,
}

impl Backend {
    /// Starts the backend with `args` and waits for the vhost-user sockets `vms` (names of
    /// `<vm>.sock` in `dir`) and the stats socket.
    fn start(dir: &Path, args: Vec<String>, vms: &[&str]) -> Backend {
        let mut args = args;
        args.push("--stats-socket".into());
        args.push(dir.join("stats.sock").display().to_string());
        let mut process =
            BackendProcess::spawn("vhost-user-console", &args, &dir.join("backend.log")).unwrap();
        for vm in vms {
            process
                .wait_for_socket(&dir.join(format!("{vm}.sock")), WAIT)
                .unwrap();
        }
        process.wait_for_path(&dir.join("stats.sock"), WAIT).unwrap();
        Backend {
            dir: dir.to_path_buf(),
            process,
        }
    }

    fn socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.sock"))
    }

    /// A client of the Unix endpoint `name` (`<name>.sock` in the scratch directory).
    fn client(&self, name: &str) -> UnixStream {
        let s = UnixStream::connect(self.dir.join(format!("{name}.sock"))).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    fn stat(&self, vm: &str, port: &str, key: &str) -> u64 {
        let mut s = UnixStream::connect(self.dir.join("stats.sock")).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        doc["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["vm"] == vm && p["port"] == port)
            .unwrap_or_else(|| panic!("no stats for {vm}/{port} in {text}"))[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} for {vm}/{port} in {text}"))
    }

    fn wait_stat(&self, vm: &str, port: &str, key: &str, want: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.stat(vm, port, key);
            if got >= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}/{port} {key} is {got}, expected {want}; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.process.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "backend never logged {needle:?}; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines of the log that contain `needle`.
    fn lines(&self, needle: &str) -> Vec<String> {
        self.process
            .log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    fn assert_running(&mut self) {
        assert!(
            self.process.is_running(),
            "backend died; log:\n{}",
            self.process.log()
        );
    }
}

fn arg(s: impl Into<String>) -> String {
    s.into()
}

/// `-p NAME=unix:DIR/ENDPOINT.sock` (with `vm/` before NAME when given).
fn unix_port(dir: &Path, vm: Option<&str>, name: &str, endpoint: &str) -> [String; 2] {
    let lhs = match vm {
        Some(vm) => format!("{vm}/{name}"),
        None => name.to_string(),
    };
    [
        arg("-p"),
        format!("{lhs}=unix:{}", dir.join(format!("{endpoint}.sock")).display()),
    ]
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// Waits until the backend process has exited (it refused to start), failing with its log if
/// it serves instead (`socket` appears) or neither happens in time.
fn wait_for_refusal(process: &mut BackendProcess, socket: &Path) {
    let deadline = Instant::now() + WAIT;
    while process.is_running() {
        assert!(
            !socket.exists(),
            "the backend started serving although it should have refused; log:\n{}",
            process.log()
        );
        assert!(
            Instant::now() < deadline,
            "the backend neither refused nor served; log:\n{}",
            process.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

// ---- hole 7: the largest VM the configuration accepts ----

#[test]
fn a_vm_with_31_ports_negotiates_and_every_port_carries_data_both_ways() {
    const PORTS: usize = 31;
    let scratch = ScratchDir::new("con-31-ports").unwrap();
    let d = scratch.path();
    let mut args = vec![arg("--socket"), d.join("vm.sock").display().to_string()];
    for p in 0..PORTS {
        let name = if p == 0 {
            "console".to_string()
        } else {
            format!("port{p}")
        };
        args.extend(unix_port(d, None, &name, &format!("p{p}")));
    }
    let mut b = Backend::start(d, args, &["vm"]);
    // 4 + 2 * 30 queues: the most one vhost-user worker can serve (a 64-bit queue mask).
    let opts = GuestOptions {
        ram: 128 << 20,
        ..GuestOptions::default()
    };
    let mut g = ConsoleGuest::connect(b.socket("vm"), opts).unwrap();
    assert_eq!(g.agreed.queue_num, Some(64));
    let cfg = g.conn.get_config(0, 12).unwrap();
    assert_eq!(
        u32::from_le_bytes([cfg[4], cfg[5], cfg[6], cfg[7]]),
        PORTS as u32
    );
    let seen = g.bring_up(PORTS).unwrap();
    let named = seen.iter().filter(|m| m.event == PORT_NAME).count();
    assert_eq!(named, PORTS);

    let mut clients: Vec<UnixStream> = (0..PORTS).map(|p| b.client(&format!("p{p}"))).collect();
    for (p, client) in clients.iter_mut().enumerate() {
        let out = format!("guest to host on port {p}\n");
        g.send(p, out.as_bytes(), 2).unwrap();
        assert_eq!(read_n(client, out.len()), out.as_bytes(), "port {p} out");
    }
    for (p, client) in clients.iter_mut().enumerate() {
        g.post_rx(p, 2, 128, 1).unwrap();
        let input = format!("host to guest on port {p}\n");
        client.write_all(input.as_bytes()).unwrap();
        let got = g.recv_exact(p, input.len(), WAIT).unwrap();
        assert_eq!(got, input.as_bytes(), "port {p} in");
    }
    // Each port's counters saw its own bytes, the last one (queues 62 and 63) included.
    for p in 0..PORTS {
        let name = if p == 0 {
            "console".to_string()
        } else {
            format!("port{p}")
        };
        let out = format!("guest to host on port {p}\n").len() as u64;
        let input = format!("host to guest on port {p}\n").len() as u64;
        b.wait_stat("vm0", &name, "to_host_bytes", out);
        assert_eq!(b.stat("vm0", &name, "to_host_bytes"), out, "{name}");
        assert_eq!(b.stat("vm0", &name, "to_guest_bytes"), input, "{name}");
    }
    b.assert_running();
}

