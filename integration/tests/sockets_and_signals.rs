//! Both backends' sockets and signals, as an operator meets them: a second instance on a
//! served socket is refused and the first keeps serving; files in the way are never removed; a
//! stale socket left by a killed process is replaced; sockets are 0600 unless told otherwise;
//! SIGHUP keeps the process serving and is counted; SIGTERM and SIGINT exit 0 and leave no
//! socket behind; nothing but the public sockets can be connected to (the relay's end is
//! private). Real processes, real sockets, real signals. netmux needs root (a TAP uplink).

use std::fs::File;
use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::frontend::{
    Connection, VhostUserProtocolFeatures, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use devshare_integration::qemu::ScratchDir;
use devshare_integration::workspace::binary;

const WAIT: Duration = Duration::from_secs(20);

/// A backend process whose exit status the test reads (killed on drop if still running).
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &str, args: &[String], log: &Path) -> Proc {
        let err = File::options().create(true).append(true).open(log).unwrap();
        let child = Command::new(binary(bin).unwrap())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(err.try_clone().unwrap())
            .stderr(err)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_owned(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for the process to exit (the readiness signal here is its exit).
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "process still running after {WAIT:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `path` accepts connections.
    fn wait_socket(&mut self, path: &Path) {
        let deadline = Instant::now() + WAIT;
        while UnixStream::connect(path).is_err() {
            assert!(
                self.running(),
                "exited before {} appeared; log:\n{}",
                path.display(),
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "{} never appeared; log:\n{}",
                path.display(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stats(path: &Path) -> serde_json::Value {
    let mut s = UnixStream::connect(path).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn wait_signal_count(p: &mut Proc, stats_path: &Path, key: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let doc = stats(stats_path);
        let got = doc["process"]["signals"][key].as_u64();
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline && p.running(),
            "signals.{key} is {got:?}, expected {want}; stats {doc}; log:\n{}",
            p.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A vhost-user front-end gets an answer on `path` (the backend serves it).
fn vhost_user_answers(path: &Path) {
    let mut c = Connection::connect(path).unwrap();
    let features = c.get_features().unwrap();
    assert!(features & (1 << VIRTIO_F_VERSION_1) != 0);
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// One backend binary serving one socket, in a scratch directory of its own.
struct Backend {
    dir: ScratchDir,
    kind: Kind,
}

enum Kind {
    Console,
    /// netmux with a TAP uplink named after `tap` and each instance's tag.
    Netmux {
        tap: String,
    },
}

impl Backend {
    fn console(label: &str) -> Backend {
        Backend {
            dir: ScratchDir::new(label).unwrap(),
            kind: Kind::Console,
        }
    }

    fn netmux(label: &str) -> Backend {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        Backend {
            dir: ScratchDir::new(label).unwrap(),
            kind: Kind::Netmux {
                tap: format!(
                    "dss{}x{}",
                    std::process::id() % 100_000,
                    SEQ.fetch_add(1, Ordering::Relaxed)
                ),
            },
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts an instance on `sock` with a stats socket; `tag` keeps the paths (and netmux's
    /// TAP) of two instances apart. The console serves one virtio VM with a console port on a
    /// Unix endpoint, netmux one port.
    fn spawn(&self, sock: &str, tag: &str, extra: &[&str]) -> Proc {
        let (bin, mut args) = match &self.kind {
            Kind::Console => (
                "vhost-user-console",
                vec![
                    "--socket".into(),
                    s(&self.p(sock)),
                    "-p".into(),
                    format!("console=unix:{}", s(&self.p(&format!("{tag}-con.sock")))),
                ],
            ),
            Kind::Netmux { tap } => (
                "vhost-user-netmux",
                vec![
                    "--uplink".into(),
                    format!("tap:{tap}{tag}"),
                    "--port".into(),
                    format!("name=g0,socket={},mac=52:54:00:78:00:01", s(&self.p(sock))),
                ],
            ),
        };
        args.push("--stats-socket".into());
        args.push(s(&self.p(&format!("{tag}-stats.sock"))));
        args.extend(extra.iter().map(|a| a.to_string()));
        Proc::spawn(bin, &args, &self.p(&format!("{tag}.log")))
    }

    fn start(&self, sock: &str, tag: &str, extra: &[&str]) -> Proc {
        let mut p = self.spawn(sock, tag, extra);
        p.wait_socket(&self.p(&format!("{tag}-stats.sock")));
        p.wait_socket(&self.p(sock));
        p
    }
}

/// A second instance on the socket `b` serves is refused, saying why, and the first keeps
/// serving.
fn second_instance_is_refused(b: &Backend, sock: &str) {
    let mut first = b.start(sock, "a", &[]);
    let mut second = b.spawn(sock, "b", &[]);
    let status = second.wait_exit();
    assert!(!status.success(), "second instance started");
    let log = second.log();
    assert!(
        log.contains(&s(&b.p(sock))) && log.contains("served by another running process"),
        "unclear refusal: {log}"
    );
    assert!(first.running());
    vhost_user_answers(&b.p(sock));
}

/// SIGTERM and SIGINT, with a front-end connected, end a backend `new` makes with status 0,
/// and neither `sock` nor the stats socket is left behind.
fn sigterm_and_sigint_exit_0_and_leave_no_socket(new: impl Fn() -> Backend, sock: &str) {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let b = new();
        let mut p = b.start(sock, "a", &[]);
        // A front-end is connected while the signal arrives.
        let mut fe = Connection::connect(b.p(sock)).unwrap();
        fe.get_features().unwrap();
        p.signal(sig);
        let status = p.wait_exit();
        assert_eq!(
            status.code(),
            Some(0),
            "signal {sig}: {status}; log:\n{}",
            p.log()
        );
        for sock in [sock, "a-stats.sock"] {
            assert!(
                std::fs::symlink_metadata(b.p(sock)).is_err(),
                "signal {sig}: {sock} left behind"
            );
        }
    }
}

/// `b`'s sockets are 0600 by default, and its front-end sockets take `mode` (spelled as
/// given) and group 1 (`daemon` on Debian: a group that exists) from the command line; the
/// stats socket stays 0600.
fn sockets_are_0600_by_default_and_take_mode_and_group(b: &Backend, mode: &str) {
    let _a = b.start("a.sock", "a", &[]);
    assert_eq!(mode_and_gid(&b.p("a.sock")).0, 0o600);
    assert_eq!(mode_and_gid(&b.p("a-stats.sock")).0, 0o600);

    let _b = b.start(
        "b.sock",
        "b",
        &["--socket-mode", mode, "--socket-group", "1"],
    );
    assert_eq!(mode_and_gid(&b.p("b.sock")), (0o660, 1));
    // The counters are the operator's: the stats socket stays 0600.
    assert_eq!(mode_and_gid(&b.p("b-stats.sock")).0, 0o600);
}

// ---- vhost-user-console ----

#[test]
fn console_second_instance_on_a_served_socket_is_refused_and_the_first_keeps_serving() {
    second_instance_is_refused(&Backend::console("sock-console-takeover"), "vm.sock");
}

#[test]
fn console_files_in_the_way_are_never_removed() {
    let c = Backend::console("sock-console-files");
    // At the stats socket path.
    std::fs::write(c.p("a-stats.sock"), b"not a socket").unwrap();
    let mut p = c.spawn("vm.sock", "a", &[]);
    assert!(!p.wait_exit().success());
    assert!(p.log().contains(&s(&c.p("a-stats.sock"))), "{}", p.log());
    assert_eq!(std::fs::read(c.p("a-stats.sock")).unwrap(), b"not a socket");

    // At a stream VM's socket path.
    std::fs::write(c.p("serial.sock"), b"precious").unwrap();
    let args = vec![
        "--vm".to_string(),
        format!("s={},stream", s(&c.p("serial.sock"))),
        "-p".into(),
        format!("s/serial=unix:{}", s(&c.p("serial-client.sock"))),
    ];
    let mut p = Proc::spawn("vhost-user-console", &args, &c.p("stream.log"));
    assert!(!p.wait_exit().success());
    assert!(p.log().contains("not a socket"), "{}", p.log());
    assert_eq!(std::fs::read(c.p("serial.sock")).unwrap(), b"precious");
}

#[test]
fn console_stale_socket_of_a_killed_instance_is_replaced() {
    let c = Backend::console("sock-console-stale");
    let mut first = c.start("vm.sock", "a", &[]);
    first.signal(libc::SIGKILL);
    first.wait_exit();
    assert!(std::fs::symlink_metadata(c.p("vm.sock"))
        .unwrap()
        .file_type()
        .is_socket());
    let _second = c.start("vm.sock", "a", &[]);
    vhost_user_answers(&c.p("vm.sock"));
}

fn mode_and_gid(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    assert!(m.file_type().is_socket());
    (m.mode() & 0o7777, m.gid())
}

#[test]
fn console_sockets_are_0600_by_default_and_take_mode_and_group() {
    let c = Backend::console("sock-console-mode");
    sockets_are_0600_by_default_and_take_mode_and_group(&c, "0660");

    // The same from the config file.
    std::fs::write(
        c.p("c.toml"),
        "socket_mode = \"0640\"\nsocket_group = \"2\"\n",
    )
    .unwrap();
    let _c = c.start("c.sock", "c", &["--config", &s(&c.p("c.toml"))]);
    assert_eq!(mode_and_gid(&c.p("c.sock")), (0o640, 2));
}

#[test]
fn console_sighup_keeps_serving_and_is_counted() {
    let c = Backend::console("sig-console-hup");
    let mut p = c.start("vm.sock", "a", &[]);
    p.signal(libc::SIGHUP);
    wait_signal_count(&mut p, &c.p("a-stats.sock"), "hup", 1);
    p.signal(libc::SIGHUP);
    wait_signal_count(&mut p, &c.p("a-stats.sock"), "hup", 2);
    assert!(p.running());
    vhost_user_answers(&c.p("vm.sock"));
}

#[test]
fn console_sigterm_and_sigint_exit_0_and_leave_no_socket() {
    sigterm_and_sigint_exit_0_and_leave_no_socket(
        || Backend::console("sig-console-term"),
        "vm.sock",
    );
}

/// Every listening Unix socket of process `pid`, by the name the kernel has for it (`@...` for
/// abstract names; empty for none).
fn listening_sockets(pid: i32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(ino.to_string());
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode [Path]
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let listening = flags & 0x1_0000 != 0; // __SO_ACCEPTCON
            (listening && inodes.contains(*f.get(6)?))
                .then(|| f.get(7).map(|p| p.to_string()).unwrap_or_default())
        })
        .collect()
}

fn reachable(name: &str) -> bool {
    match name.strip_prefix('@') {
        Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| UnixStream::connect_addr(&a))
            .is_ok(),
        None if name.is_empty() => false,
        None => UnixStream::connect(name).is_ok(),
    }
}

#[test]
fn only_the_public_sockets_can_be_reached_while_a_front_end_is_connected() {
    let c = Backend::console("sock-console-relay");
    let p = c.start("vm.sock", "a", &[]);
    let mut fe = Connection::connect(c.p("vm.sock")).unwrap();
    fe.handshake(
        1 << VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    fe.get_features().unwrap(); // the library serves this connection now
    let public = [
        s(&c.p("vm.sock")),
        s(&c.p("a-con.sock")),
        s(&c.p("a-stats.sock")),
    ];
    let names = listening_sockets(p.pid());
    assert!(!names.is_empty(), "no listening socket found at all");
    for name in &names {
        if public.contains(name) {
            continue;
        }
        assert!(
            !reachable(name),
            "another process can connect to the backend's socket {name:?} (all: {names:?})"
        );
    }
}

// ---- vhost-user-netmux ----

#[test]
fn netmux_second_instance_on_a_served_port_socket_is_refused_and_the_first_keeps_serving() {
    second_instance_is_refused(&Backend::netmux("sock-netmux-takeover"), "g0.sock");
}

#[test]
fn netmux_file_at_the_stats_path_is_never_removed() {
    let n = Backend::netmux("sock-netmux-files");
    std::fs::write(n.p("a-stats.sock"), b"not a socket").unwrap();
    let mut p = n.spawn("g0.sock", "a", &[]);
    assert!(!p.wait_exit().success());
    assert!(p.log().contains(&s(&n.p("a-stats.sock"))), "{}", p.log());
    assert_eq!(std::fs::read(n.p("a-stats.sock")).unwrap(), b"not a socket");
}

#[test]
fn netmux_sockets_are_0600_by_default_and_take_mode_and_group() {
    let n = Backend::netmux("sock-netmux-mode");
    sockets_are_0600_by_default_and_take_mode_and_group(&n, "660");
}

#[test]
fn netmux_sighup_keeps_serving_and_is_counted() {
    let n = Backend::netmux("sig-netmux-hup");
    let mut p = n.start("g0.sock", "a", &[]);
    p.signal(libc::SIGHUP);
    wait_signal_count(&mut p, &n.p("a-stats.sock"), "hup", 1);
    assert!(p.running());
    vhost_user_answers(&n.p("g0.sock"));
    let doc = stats(&n.p("a-stats.sock"));
    assert!(doc["ports"].is_array(), "existing fields kept: {doc}");
    assert_eq!(doc["process"]["signals"]["term"], 0);
}

#[test]
fn netmux_sigterm_and_sigint_exit_0_and_leave_no_socket() {
    sigterm_and_sigint_exit_0_and_leave_no_socket(|| Backend::netmux("sig-netmux-term"), "g0.sock");
}
