//! The console's listening sockets and signals, as an operator meets them, with the real
//! backend process:
//!
//! - a second instance on the same `unix:` endpoint path or stream socket is refused with the
//!   path named, and the first keeps serving; a regular file there is kept; a TCP port in use
//!   gives a clear error;
//! - SIGTERM and SIGINT shut down cleanly with a stream VM and a virtio VM (front-end
//!   connected) running: exit status 0, the sockets and PTY links this process made are gone
//!   (a link that is no longer ours stays), and what the guests sent and the backend accepted
//!   is replayed by the next process from `--state-dir`;
//! - SIGHUP does not terminate and keeps every client;
//! - the same with 64 VMs in one process: nothing is left behind.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use devshare_integration::console_backend::{spawn, Console, WAIT};
use devshare_integration::console_guest::{ConsoleGuest, GuestOptions};
use devshare_integration::qemu::ScratchDir;

fn unix_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn read_n(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).unwrap();
    v
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Starts a second instance in `dir` with `args`, expects it to fail, and returns its log.
fn refused(dir: &ScratchDir, args: &[&str], log: &str) -> String {
    let mut p = spawn(dir, args, log);
    let status = p.wait_exit(WAIT).unwrap();
    assert!(!status.success(), "second instance started: {}", p.log());
    p.log()
}

#[test]
fn a_second_instance_on_a_served_endpoint_or_stream_socket_is_refused() {
    let c = Console::start(
        "sock-endpoint-takeover",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
        ],
        &["s.sock", "c.sock"],
    );
    let served = "is served by another running process";
    // The same unix: endpoint path, everything else its own.
    let log = refused(
        &c.dir,
        &[
            "--vm",
            "t={dir}/t.sock,stream",
            "-p",
            "t/serial=unix:{dir}/c.sock",
            "--stats-socket",
            "{dir}/stats2.sock",
        ],
        "second-endpoint.log",
    );
    let c_sock = c.path("c.sock").display().to_string();
    assert!(log.contains(&c_sock) && log.contains(served), "{log}");
    // Nothing of the second instance is left behind either.
    assert!(
        !exists(&c.path("t.sock")),
        "the refused instance left its socket"
    );
    // The same stream socket.
    let log = refused(
        &c.dir,
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/other.sock",
            "--stats-socket",
            "{dir}/stats3.sock",
        ],
        "second-stream.log",
    );
    let s_sock = c.path("s.sock").display().to_string();
    assert!(log.contains(&s_sock) && log.contains(served), "{log}");

    // The first keeps serving on both.
    let mut client = unix_client(&c.path("c.sock"));
    c.wait_stat("s", "serial", "attached", 1);
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(b"still mine\n").unwrap();
    assert_eq!(read_n(&mut client, 11), b"still mine\n");
}

#[test]
fn files_in_the_way_of_endpoint_sockets_are_kept_and_busy_tcp_ports_named() {
    let dir = ScratchDir::new("sock-endpoint-files").unwrap();
    std::fs::write(dir.path().join("c.sock"), b"precious").unwrap();
    let log = refused(
        &dir,
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
        ],
        "file.log",
    );
    assert!(
        log.contains(&dir.path().join("c.sock").display().to_string())
            && log.contains("not a socket"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("c.sock")).unwrap(),
        b"precious"
    );

    // A TCP port another process listens on.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let spec = format!("s/serial=tcp:{addr}");
    let log = refused(
        &dir,
        &["--vm", "s={dir}/s.sock,stream", "-p", &spec],
        "tcp.log",
    );
    assert!(
        log.contains(&format!(
            "cannot listen on tcp {addr}: the address is in use by another process"
        )),
        "{log}"
    );

    // A stale endpoint socket (nobody answers on it) is replaced.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("stale.sock")).unwrap());
    let c = Console::start_in(
        dir,
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/stale.sock",
        ],
        &["s.sock"],
    );
    let _client = unix_client(&c.path("stale.sock"));
    c.wait_stat("s", "serial", "attached", 1);
}

#[test]
fn stream_sockets_take_the_socket_mode_and_group_and_endpoints_only_their_own() {
    use std::os::unix::fs::MetadataExt;
    let mode_gid = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert!(m.file_type().is_socket(), "{}", p.display());
        (m.mode() & 0o777, m.gid())
    };
    let args = [
        "--vm",
        "s={dir}/s.sock,stream",
        "-p",
        "s/serial=unix:{dir}/c.sock",
    ];
    let c = Console::start("sock-endpoint-mode", &args, &["s.sock", "c.sock"]);
    assert_eq!(mode_gid(&c.path("s.sock")).0, 0o600);
    assert_eq!(mode_gid(&c.path("c.sock")).0, 0o600);
    // --socket-mode/--socket-group open QEMU's socket, never a guest's console endpoint (nor
    // the stats socket); an endpoint is opened by its own options. (gid 1 is `daemon` on
    // Debian: a group that exists.)
    let mut with_group = args.to_vec();
    with_group.extend([
        "--vm",
        "o={dir}/o-vm.sock,stream",
        "-p",
        "o/serial=unix:{dir}/o.sock,mode=0640,group=1",
        "--socket-mode",
        "0660",
        "--socket-group",
        "1",
    ]);
    let c = Console::start(
        "sock-endpoint-group",
        &with_group,
        &["s.sock", "c.sock", "o.sock"],
    );
    assert_eq!(mode_gid(&c.path("s.sock")), (0o660, 1));
    assert_eq!(mode_gid(&c.path("c.sock")).0, 0o600);
    assert_ne!(mode_gid(&c.path("c.sock")).1, 1);
    assert_eq!(mode_gid(&c.path("stats.sock")).0, 0o600);
    assert_eq!(mode_gid(&c.path("o.sock")), (0o640, 1));
}

/// The arguments of the signal test: a stream VM `s` and a virtio VM `v` whose data port has
/// nobody attached (so their output stays in the buffers), and VMs with PTY links.
const SIGNAL_ARGS: &[&str] = &[
    "--vm",
    "s={dir}/s.sock,stream",
    "-p",
    "s/serial=unix:{dir}/s-client.sock",
    "--vm",
    "v={dir}/v.sock",
    "-p",
    "v/console=pty:{dir}/v-console",
    "-p",
    "v/data=unix:{dir}/v-data.sock",
    "--vm",
    "w={dir}/w.sock,stream",
    "-p",
    "w/serial=pty:{dir}/w-console",
    "--state-dir",
    "{dir}/state",
];

#[test]
fn sigterm_and_sigint_shut_down_cleanly_and_the_next_process_replays_what_was_accepted() {
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let c = Console::start(
            "sig-console-clean",
            SIGNAL_ARGS,
            &["s.sock", "v.sock", "w.sock", "v-console", "w-console"],
        );
        // Output nobody took yet, in both VMs.
        let mut qemu = unix_client(&c.path("s.sock"));
        qemu.write_all(b"stream kept\n").unwrap();
        c.wait_stat("s", "serial", "buffered_bytes", 12);
        let mut g = ConsoleGuest::connect(c.path("v.sock"), GuestOptions::default()).unwrap();
        g.bring_up(2).unwrap();
        g.send(1, b"virtio kept\n", 1).unwrap();
        c.wait_stat("v", "data", "buffered_bytes", 12);
        // SIGHUP first: the process goes on, the clients stay.
        let mut client = unix_client(&c.path("s-client.sock"));
        assert_eq!(read_n(&mut client, 12), b"stream kept\n");
        c.process.signal(libc::SIGHUP).unwrap();
        c.wait_log("SIGHUP: 0 log files reopened");
        assert!(c.stats()["process"]["signals"]["hup"] == 1);
        qemu.write_all(b"after hup\n").unwrap();
        assert_eq!(read_n(&mut client, 10), b"after hup\n");
        drop(client);
        c.wait_stat("s", "serial", "attached", 0);
        qemu.write_all(b"stream kept\n").unwrap();
        c.wait_stat("s", "serial", "buffered_bytes", 12);
        // Someone else took over w's PTY link: it is not ours any more and must stay.
        std::fs::remove_file(c.path("w-console")).unwrap();
        std::os::unix::fs::symlink("/dev/null", c.path("w-console")).unwrap();

        let Console { dir, mut process } = c;
        process.signal(sig).unwrap();
        let status = process.wait_exit(WAIT).unwrap();
        let log = process.log();
        assert_eq!(status.code(), Some(0), "{name}: {status}; log:\n{log}");
        assert!(log.contains("shut down cleanly"), "{log}");
        for gone in [
            "s.sock",
            "v.sock",
            "w.sock",
            "s-client.sock",
            "v-data.sock",
            "stats.sock",
            "v-console",
        ] {
            assert!(
                !exists(&dir.path().join(gone)),
                "{name}: {gone} left behind; log:\n{log}"
            );
        }
        assert_eq!(
            std::fs::read_link(dir.path().join("w-console")).unwrap(),
            Path::new("/dev/null"),
            "{name}: a link that was no longer ours was removed"
        );
        std::fs::remove_file(dir.path().join("w-console")).unwrap();
        drop((qemu, g));

        // The next process replays what the first had accepted.
        let c = Console::start_in(dir, SIGNAL_ARGS, &["s.sock", "v.sock", "v-console"]);
        let mut client = unix_client(&c.path("s-client.sock"));
        assert_eq!(read_n(&mut client, 12), b"stream kept\n", "{name}");
        let mut data = unix_client(&c.path("v-data.sock"));
        assert_eq!(read_n(&mut data, 12), b"virtio kept\n", "{name}");
        assert_eq!(c.stat("s", "serial", "dropped_bytes"), 0);
    }
}

#[test]
fn sigterm_with_64_vms_leaves_nothing_behind() {
    const VMS: usize = 64;
    let mut args: Vec<String> = Vec::new();
    for i in 0..VMS {
        args.push("--vm".into());
        if i % 2 == 0 {
            args.push(format!("v{i}={{dir}}/v{i}.sock"));
            args.push("-p".into());
            args.push(format!("v{i}/console=pty:{{dir}}/v{i}-console"));
            args.push("-p".into());
            args.push(format!("v{i}/data=unix:{{dir}}/v{i}-data.sock"));
        } else {
            args.push(format!("v{i}={{dir}}/v{i}.sock,stream"));
            args.push("-p".into());
            args.push(format!("v{i}/serial=pty:{{dir}}/v{i}-console"));
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let socks: Vec<String> = (0..VMS).map(|i| format!("v{i}.sock")).collect();
    let ready: Vec<&str> = socks.iter().map(String::as_str).collect();
    let c = Console::start("sig-console-64", &args, &ready);
    // Some VMs in use while the signal arrives.
    let mut g = ConsoleGuest::connect(c.path("v0.sock"), GuestOptions::default()).unwrap();
    g.bring_up(2).unwrap();
    let _client = unix_client(&c.path("v2-data.sock"));
    let _qemu = unix_client(&c.path("v1.sock"));
    c.wait_stat("v2", "data", "attached", 1);
    let before: Vec<String> = std::fs::read_dir(c.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        before.len() >= VMS * 2 + 2,
        "not everything was there: {before:?}"
    );

    let Console { dir, mut process } = c;
    process.signal(libc::SIGTERM).unwrap();
    let status = process.wait_exit(WAIT).unwrap();
    assert_eq!(status.code(), Some(0), "{status}; log:\n{}", process.log());
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "backend.log")
        .map(|e| {
            let kind = match e.file_type() {
                Ok(t) if t.is_socket() => "socket",
                Ok(t) if t.is_symlink() => "link",
                _ => "file",
            };
            format!("{} ({kind})", e.file_name().to_string_lossy())
        })
        .collect();
    assert!(
        left.is_empty(),
        "left behind after SIGTERM: {left:?}; log:\n{}",
        process.log()
    );
}
