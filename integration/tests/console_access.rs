//! Who can reach a vhost-user-console's sockets and files, and what they can make it do: the
//! log a stream of clients leaves, a TCP endpoint reachable from beyond the host, the modes
//! and groups of each kind of socket, and paths that collide.
//!
//! The backend is the real process; in stream mode the test plays QEMU on the `--vm` socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use devshare_integration::console_backend::{spawn_with_env, WAIT};
use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::ScratchDir;

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Lines of `log` that say something about one client.
fn client_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("client")
                || l.contains("attached")
                || l.contains("detached")
                || l.contains("port busy")
        })
        .count()
}

/// A backend with one stream VM (`v.sock`) whose serial port is a Unix endpoint (`c.sock`),
/// logging at info level (what an operator sees), once both sockets exist.
fn stream_vm(dir: &ScratchDir) -> BackendProcess {
    let mut p = spawn_with_env(
        dir,
        &[
            "--vm",
            "v={dir}/v.sock,stream",
            "-p",
            "v/serial=unix:{dir}/c.sock",
        ],
        &[("RUST_LOG", "info")],
        "backend.log",
    );
    p.wait_for_path(&dir.path().join("v.sock"), WAIT).unwrap();
    p.wait_for_path(&dir.path().join("c.sock"), WAIT).unwrap();
    p
}

#[test]
fn clients_that_connect_and_close_in_a_loop_leave_a_bounded_log() {
    let dir = ScratchDir::new("con-access-flood").unwrap();
    let mut p = stream_vm(&dir);
    let c = dir.path().join("c.sock");
    const CYCLES: usize = 300;
    for _ in 0..CYCLES {
        drop(UnixStream::connect(&c).unwrap());
    }
    // Readiness: a client after the flood gets the guest's output, so the backend took
    // every connection before it.
    let mut qemu = connect(&dir.path().join("v.sock"));
    qemu.write_all(b"ping\n").unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let mut client = connect(&c);
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        if &got == b"ping\n" {
            break;
        }
        assert!(Instant::now() < deadline, "never served; log:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = p.log();
    let lines = client_lines(&log);
    assert!(
        lines < 40,
        "{CYCLES} clients made {lines} log lines; log:\n{log}"
    );
    assert!(p.is_running());
}

#[test]
fn connections_to_a_stream_socket_in_a_loop_leave_a_bounded_log() {
    let dir = ScratchDir::new("con-access-qemu-flood").unwrap();
    let p = stream_vm(&dir);
    let v = dir.path().join("v.sock");
    const CYCLES: usize = 300;
    for _ in 0..CYCLES {
        drop(UnixStream::connect(&v).unwrap());
    }
    // Readiness: a QEMU after the flood reaches the client, so the backend took every
    // connection before it.
    let mut client = connect(&c_path(&dir));
    let deadline = Instant::now() + WAIT;
    loop {
        let mut qemu = connect(&v);
        if qemu.write_all(b"ping\n").is_ok() {
            let mut got = [0u8; 5];
            client
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            if client.read_exact(&mut got).is_ok() {
                assert_eq!(&got, b"ping\n");
                break;
            }
        }
        assert!(Instant::now() < deadline, "never served; log:\n{}", p.log());
    }
    let log = p.log();
    let lines = log.lines().filter(|l| l.contains("QEMU")).count();
    assert!(
        lines < 40,
        "{CYCLES} connections made {lines} log lines; log:\n{log}"
    );
}

fn c_path(dir: &ScratchDir) -> std::path::PathBuf {
    dir.path().join("c.sock")
}

#[test]
fn a_tcp_endpoint_beyond_loopback_is_warned_about_at_start() {
    let dir = ScratchDir::new("con-access-tcp").unwrap();
    let mut p = spawn_with_env(
        &dir,
        &[
            "--vm",
            "v={dir}/v.sock,stream",
            "-p",
            "v/serial=tcp:127.0.0.1:0",
            "--vm",
            "w={dir}/w.sock,stream",
            "-p",
            "w/serial=tcp:0.0.0.0:0",
        ],
        &[("RUST_LOG", "info")],
        "backend.log",
    );
    p.wait_for_socket(&dir.path().join("stats.sock"), WAIT)
        .unwrap();
    let log = p.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no access control"))
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "one warning, for 0.0.0.0 only; log:\n{log}"
    );
    assert!(warned[0].contains("0.0.0.0:"), "{}", warned[0]);
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
}

#[test]
fn socket_modes_that_lock_the_owner_out_and_groups_that_do_not_exist_are_refused() {
    let refused: [(&[&str], &str); 5] = [
        (&["--socket-mode", "0"], "owner"),
        (&["--socket-mode", "0066"], "owner"),
        (&["--socket-mode", "10777"], "0777"),
        (&["--socket-group", "99999"], "99999"),
        (&["-p", "v/data=unix:{dir}/d.sock,mode=0"], "owner"),
    ];
    for (extra, why) in refused {
        let dir = ScratchDir::new("con-access-mode").unwrap();
        let mut args = vec![
            "--vm",
            "v={dir}/v.sock",
            "-p",
            "v/console=unix:{dir}/c.sock",
        ];
        args.extend_from_slice(extra);
        let mut p = spawn_with_env(&dir, &args, &[], "backend.log");
        let status = p.wait_exit(WAIT).unwrap();
        assert!(!status.success(), "{extra:?} accepted; log:\n{}", p.log());
        assert!(p.log().contains(why), "{extra:?}: {}", p.log());
        assert!(!dir.path().join("v.sock").exists(), "{extra:?}");
    }
    // A mode that lets everyone connect is served, with a warning.
    let dir = ScratchDir::new("con-access-world").unwrap();
    let mut p = spawn_with_env(
        &dir,
        &[
            "--vm",
            "v={dir}/v.sock",
            "-p",
            "v/console=unix:{dir}/c.sock",
            "--socket-mode",
            "0606",
        ],
        &[],
        "backend.log",
    );
    p.wait_for_path(&dir.path().join("v.sock"), WAIT).unwrap();
    let log = p.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("0606") && l.contains("every local user")),
        "{log}"
    );
}

#[test]
fn a_path_used_twice_is_refused_naming_both_uses_and_nothing_is_left_behind() {
    let cases: [(&[&str], &str, &str); 7] = [
        // A PTY link at the VM's own socket.
        (
            &["--vm", "a={dir}/a.sock", "-p", "a/console=pty:{dir}/a.sock"],
            "VM 'a''s socket",
            "a/console's pty: link",
        ),
        // An endpoint socket at the stats socket.
        (
            &[
                "--vm",
                "a={dir}/a.sock",
                "-p",
                "a/console=unix:{dir}/stats.sock",
            ],
            "stats socket",
            "a/console's unix: socket",
        ),
        // An endpoint socket at another VM's socket.
        (
            &[
                "--vm",
                "a={dir}/a.sock",
                "-p",
                "a/console=pty",
                "--vm",
                "b={dir}/b.sock,stream",
                "-p",
                "b/serial=unix:{dir}/a.sock",
            ],
            "VM 'a''s socket",
            "b/serial's unix: socket",
        ),
        // Two logs on one file, spelled two ways.
        (
            &[
                "--vm",
                "a={dir}/a.sock",
                "-p",
                "a/console=file:{dir}/f.log",
                "-p",
                "a/data=file:{dir}/./f.log",
            ],
            "a/console's file: log",
            "a/data's file: log",
        ),
        // A log at another's rotated name.
        (
            &[
                "--vm",
                "a={dir}/a.sock",
                "-p",
                "a/console=file:{dir}/f.log,keep=2",
                "-p",
                "a/data=file:{dir}/f.log.2",
            ],
            "a/console's file: log rotated",
            "a/data's file: log",
        ),
        // A log at a buffer file.
        (
            &[
                "--vm",
                "a={dir}/a.sock",
                "-p",
                "a/console=file:{dir}/st/a.data.spool",
                "-p",
                "a/data=pty",
                "--state-dir",
                "{dir}/st",
            ],
            "a/console's file: log",
            "a/data's buffer file",
        ),
        // A log at the name a buffer file is resized through.
        (
            &[
                "--vm",
                "a={dir}/a.sock",
                "-p",
                "a/console=file:{dir}/st/a.data.spool.resize",
                "-p",
                "a/data=pty",
                "--state-dir",
                "{dir}/st",
            ],
            "a/console's file: log",
            "a/data's buffer file resized",
        ),
    ];
    for (args, first, second) in cases {
        let dir = ScratchDir::new("con-access-twice").unwrap();
        let mut p = spawn_with_env(&dir, args, &[], "backend.log");
        let status = p.wait_exit(WAIT).unwrap();
        let log = p.log();
        assert_eq!(status.code(), Some(2), "{args:?}: {status}; log:\n{log}");
        assert!(
            log.contains("is used twice") && log.contains(first) && log.contains(second),
            "{args:?}: the error names both uses; log:\n{log}"
        );
        // Refused before anything was created: the directory holds the log only.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "backend.log")
            .collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
}

#[test]
fn a_start_that_fails_midway_removes_what_it_created() {
    // A directory that does not exist is found only when the socket is made, after the VMs'
    // endpoints (and stream sockets) were set up: for the stats socket, and for a vhost-user
    // socket, made last.
    for late in [
        [
            "--stats-socket",
            "{dir}/nodir/stats.sock",
            "--vm",
            "b={dir}/b.sock",
        ],
        [
            "--stats-socket",
            "{dir}/stats.sock",
            "--vm",
            "b={dir}/nodir/b.sock",
        ],
    ] {
        let dir = ScratchDir::new("con-access-midway").unwrap();
        let mut args = vec![
            "--vm",
            "a={dir}/a.sock,stream",
            "-p",
            "a/serial=unix:{dir}/c.sock",
            "-p",
            "b/console=pty:{dir}/b.pty",
        ];
        args.splice(0..0, late);
        let mut p = spawn_with_env(&dir, &args, &[], "backend.log");
        let status = p.wait_exit(WAIT).unwrap();
        assert!(!status.success(), "{}", p.log());
        assert!(p.log().contains("nodir"), "{}", p.log());
        for name in ["a.sock", "c.sock", "b.pty", "stats.sock"] {
            assert!(
                std::fs::symlink_metadata(dir.path().join(name)).is_err(),
                "{late:?}: {name} left behind; log:\n{}",
                p.log()
            );
        }
    }
}

#[test]
fn a_failed_start_removes_the_logs_and_buffer_files_it_created_and_only_those() {
    // Late (the stats socket's directory is missing) and during the endpoints' set-up (a
    // unix: endpoint in a missing directory, after the logs were opened).
    for late in [
        [
            "--stats-socket",
            "{dir}/nodir/stats.sock",
            "-p",
            "z/serial=unix:{dir}/z.sock",
        ],
        [
            "--stats-socket",
            "{dir}/stats.sock",
            "-p",
            "z/serial=unix:{dir}/nodir/z.sock",
        ],
    ] {
        let dir = ScratchDir::new("con-access-files").unwrap();
        std::fs::write(dir.path().join("old.log"), b"kept\n").unwrap();
        let mut args = vec![
            "--state-dir",
            "{dir}/st",
            "--vm",
            "a={dir}/a.sock,stream",
            "-p",
            "a/serial=file:{dir}/new.log",
            "--vm",
            "b={dir}/b.sock,stream",
            "-p",
            "b/serial=file:{dir}/old.log",
            "--vm",
            "z={dir}/z-vm.sock,stream",
        ];
        args.extend(late);
        let mut p = spawn_with_env(&dir, &args, &[], "backend.log");
        let status = p.wait_exit(WAIT).unwrap();
        assert!(!status.success(), "{}", p.log());
        assert!(p.log().contains("nodir"), "{}", p.log());
        assert!(
            std::fs::symlink_metadata(dir.path().join("new.log")).is_err(),
            "{late:?}: the log it created was left behind; log:\n{}",
            p.log()
        );
        let spools: Vec<_> = std::fs::read_dir(dir.path().join("st"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| n.contains("spool"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(spools.is_empty(), "{late:?}: buffer files left: {spools:?}");
        assert_eq!(
            std::fs::read(dir.path().join("old.log")).unwrap(),
            b"kept\n",
            "a file that was there before was touched"
        );
    }
}
