//! What a careless or hostile local user can give the three binaries on the command line or in
//! a config file: every such input ends in a clear error or a clean exit, never a hang, a
//! panic, or a write through a planted link.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use devshare_integration::workspace::binary;

/// A scratch directory of this test process.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cli-hard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What a finished run left: its status and its output.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Waits for `child` to exit; a child still running after `limit` is killed and the test
/// fails (the limit is a bound on a hang, far above what the run needs).
fn finish(mut child: Child, limit: Duration, what: &str) -> Finished {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {limit:?} (hangs); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn spawn(bin: &str, args: &[&str]) -> Child {
    Command::new(binary(bin).unwrap())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

const BACKENDS: [&str; 2] = ["vhost-user-console", "vhost-user-netmux"];

#[test]
fn config_files_that_never_end_or_never_open_are_refused() {
    let d = scratch("config");
    let fifo = d.join("fifo.toml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = d.join("big.toml");
    // Valid TOML (a comment) of 2 MiB: refused for its size, not its syntax.
    let mut text = String::from("# padding\n");
    while text.len() < 2 << 20 {
        text.push_str("# ................................................................\n");
    }
    std::fs::write(&big, text).unwrap();
    for bin in BACKENDS {
        for path in [
            PathBuf::from("/dev/zero"),
            fifo.clone(),
            big.clone(),
            d.clone(),
        ] {
            let p = path.display().to_string();
            let out = finish(
                spawn(bin, &["--config", &p]),
                Duration::from_secs(60),
                &format!("{bin} --config {p}"),
            );
            assert!(
                !out.status.success() && out.status.code() != Some(101),
                "{bin} {p}: {:?} {}",
                out.status,
                out.stderr
            );
            assert!(out.stderr.contains(&p), "{bin} {p}: {}", out.stderr);
            assert!(
                !out.stderr.contains("panicked"),
                "{bin} {p}: {}",
                out.stderr
            );
            assert!(out.stdout.is_empty(), "{bin} {p}: {}", out.stdout);
        }
    }
}

/// Any local client that may connect to a stream-mode socket can be "a second QEMU": the
/// refusals are logged at a bounded rate, not one line each.
#[test]
fn refused_second_stream_clients_are_logged_at_a_bounded_rate() {
    use devshare_integration::console_backend::{Console, WAIT};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let c = Console::start(
        "hard-second-qemu",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
        ],
        &["s.sock", "c.sock"],
    );
    let mut client = UnixStream::connect(c.path("c.sock")).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    c.wait_stat("s", "serial", "attached", 1);
    let mut qemu = UnixStream::connect(c.path("s.sock")).unwrap();
    qemu.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    client.read_exact(&mut b).unwrap();
    const TRIES: usize = 60;
    for _ in 0..TRIES {
        let mut second = UnixStream::connect(c.path("s.sock")).unwrap();
        second.set_read_timeout(Some(WAIT)).unwrap();
        // Refused: closed by the backend (after it logged, or held back, the line).
        assert_eq!(second.read(&mut b).unwrap_or(0), 0);
    }
    // At the levels an operator reads (warn): the held-back ones go to debug, which the
    // harness turns on for other tests' readiness signals.
    let logged = c
        .process
        .log()
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("a second QEMU connected"))
        .count();
    assert!(
        (1..TRIES / 3).contains(&logged),
        "{logged} lines for {TRIES} refusals"
    );
}

/// A local client that connects to a vhost-user socket and says nothing is disconnected after
/// the handshake timeout (`DEVSHARE_HANDSHAKE_TIMEOUT_MS`, 300 ms here), and the real
/// front-end (the harness, as QEMU) that connected behind it is then served.
#[test]
fn a_silent_client_cannot_keep_qemu_from_a_vhost_user_socket() {
    use devshare_integration::frontend::Connection;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    let d = scratch("silent");
    let sock = d.join("v.sock");
    let log = std::fs::File::create(d.join("backend.log")).unwrap();
    let mut child = Command::new(binary("vhost-user-console").unwrap())
        .args(["--vm", &format!("v={}", sock.display())])
        .args(["-p", &format!("v/c=unix:{}", d.join("c.sock").display())])
        .env("RUST_LOG", "warn")
        .env("DEVSHARE_HANDSHAKE_TIMEOUT_MS", "300")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // The silent client: Connection::connect waits for the socket the same way.
    let mut silent = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if child.try_wait().unwrap().is_none() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("backend gone: {e}"),
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let s = sock.clone();
    std::thread::spawn(move || {
        let r = Connection::connect(&s).and_then(|mut c| c.get_features());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    // The bound only turns a hang (the fault) into a failure.
    let features = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the front-end behind a silent client was never served");
    assert!(features.is_ok(), "{features:?}");
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(
        silent.read(&mut [0u8; 1]).unwrap(),
        0,
        "silent client still connected"
    );
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(d.join("backend.log")).unwrap();
    assert!(log.contains("sent no message within"), "{log}");
}

/// stdout of a child: the write end of a pipe whose read end is already closed, as with
/// `... | head -1` once head has exited.
fn closed_pipe() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

#[test]
fn a_closed_stdout_pipe_is_a_quiet_clean_exit_in_every_printing_command() {
    let d = scratch("epipe");
    let stats = d.join("stats.sock");
    // A stats socket that answers with a document, as a running backend's does.
    let listener = std::os::unix::net::UnixListener::bind(&stats).unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        for s in listener.incoming() {
            let _ = s.unwrap().write_all(b"{\"ports\": []}");
        }
    });
    let stats = stats.display().to_string();
    let runs: Vec<(&str, Vec<&str>)> = vec![
        (
            "vhost-user-netmux",
            vec![
                "--uplink",
                "tap:epipe0",
                "--port",
                "socket=/tmp/epipe-g.sock,mac=52:54:00:00:00:01",
                "--print-qemu-args",
            ],
        ),
        ("vhost-user-netmux", vec!["stats", "--socket", &stats]),
        (
            "vhost-user-console",
            vec![
                "--socket",
                "/tmp/epipe-a.sock",
                "-p",
                "console=pty",
                "--print-qemu-args",
            ],
        ),
        ("kvm-pit-policy", vec!["qemu-args", "--policy", "delay"]),
        ("kvm-pit-policy", vec!["inspect"]),
    ];
    for (bin, args) in runs {
        let child = Command::new(binary(bin).unwrap())
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = finish(child, Duration::from_secs(60), bin);
        assert!(
            out.status.success(),
            "{bin} {args:?}: {:?}\n{}",
            out.status,
            out.stderr
        );
        assert!(
            !out.stderr.contains("panicked"),
            "{bin} {args:?}: {}",
            out.stderr
        );
    }
}

/// `stats --socket` against a socket that accepts and never answers ends with an error that
/// says so, instead of waiting forever.
#[test]
fn stats_of_a_socket_that_never_answers_ends_with_an_error() {
    let d = scratch("stats-silent");
    let path = d.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s.unwrap());
        }
    });
    let p = path.display().to_string();
    let out = finish(
        spawn("vhost-user-netmux", &["stats", "--socket", &p]),
        Duration::from_secs(60),
        "netmux stats",
    );
    assert!(!out.status.success(), "{:?}", out.status);
    assert!(
        out.stderr.contains(&p) && out.stderr.contains("no complete answer"),
        "{}",
        out.stderr
    );
}

const NETMUX_PRINT: &[&str] = &[
    "--uplink",
    "tap:clihard0",
    "--port",
    "socket=/tmp/cli-hard-g.sock,mac=52:54:00:00:00:01",
    "--print-qemu-args",
];

fn netmux_print(more: &[&str]) -> Finished {
    let args: Vec<&str> = NETMUX_PRINT.iter().chain(more).copied().collect();
    finish(
        spawn("vhost-user-netmux", &args),
        Duration::from_secs(60),
        "netmux --print-qemu-args",
    )
}

/// The deprecated `--guest-mem MIB` is checked as `--memory` is.
#[test]
fn guest_mem_is_checked_like_memory() {
    for bad in ["0", "18446744073709551615", "17592186044416"] {
        let out = netmux_print(&["--guest-mem", bad]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--guest-mem {bad}: {}",
            out.stdout
        );
        assert!(out.stderr.contains(bad), "{}", out.stderr);
    }
    let out = netmux_print(&["--guest-mem", "256"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("size=256M,share=on"), "{}", out.stdout);
}

fn kill(child: &Child, sig: i32) {
    // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Starts a backend whose sockets go to `d`, with SIGHUP and SIGTERM blocked across the exec
/// (as a supervisor hands over a signal sent while the program starts): a signal sent at once
/// stays pending until the backend takes it. The backend must install its handling and then
/// take the signal, however early it came.
fn start_backend(bin: &str, d: &std::path::Path, tap: &str) -> Child {
    use std::os::unix::process::CommandExt;
    let p = |n: &str| d.join(n).display().to_string();
    let args: Vec<String> = if bin == "vhost-user-console" {
        vec![
            "--vm".into(),
            format!("v={}", p("v.sock")),
            "-p".into(),
            format!("v/c=unix:{}", p("c.sock")),
            "--stats-socket".into(),
            p("stats.sock"),
        ]
    } else {
        vec![
            "--uplink".into(),
            format!("tap:{tap}"),
            "--port".into(),
            format!("socket={},mac=52:54:00:00:00:01", p("v.sock")),
            "--stats-socket".into(),
            p("stats.sock"),
        ]
    };
    let mut cmd = Command::new(binary(bin).unwrap());
    cmd.args(&args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs between fork and exec and calls only async-signal-safe functions on a
    // sigset_t on its own stack.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::sigaddset(&mut set, libc::SIGTERM);
            match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e)),
            }
        });
    }
    cmd.spawn().unwrap()
}

/// Whatever is left in `d`: sockets, the private directories sockets are made in.
fn leftovers(d: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The SIGHUP count in a backend's stats, once its stats socket answers.
fn hups(stats: &std::path::Path) -> Option<u64> {
    let doc = devshare_integration::console_backend::stats_of(stats).ok()?;
    doc.pointer("/process/signals/hup").and_then(|v| v.as_u64())
}

const SIGNAL_ROUNDS: usize = 50;

/// SIGHUP sent the moment the process exists, before it has done anything: the backend lives
/// on, serves, and counts the SIGHUP as handled.
#[test]
fn sighup_during_start_up_is_handled_and_does_not_kill_a_backend() {
    let tap = format!("sghup{}", std::process::id() % 100_000);
    for bin in BACKENDS {
        for round in 0..SIGNAL_ROUNDS {
            let d = scratch(&format!("hup-{round}"));
            let mut child = start_backend(bin, &d, &tap);
            kill(&child, libc::SIGHUP);
            // Readiness: the stats socket answers and counts the SIGHUP.
            let deadline = Instant::now() + Duration::from_secs(60);
            while hups(&d.join("stats.sock")) != Some(1) {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("{bin} round {round}: SIGHUP during start-up ended it: {status}");
                }
                assert!(
                    Instant::now() < deadline,
                    "{bin} round {round}: SIGHUP never handled"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            terminate_cleanly(child, &d, bin, round);
        }
    }
}

/// SIGTERM to `child` (started by `start_backend` in `d`): it exits with status 0, leaving
/// nothing in `d`, which is then removed.
fn terminate_cleanly(child: Child, d: &std::path::Path, bin: &str, round: usize) {
    kill(&child, libc::SIGTERM);
    let out = finish(child, Duration::from_secs(60), bin);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{bin} round {round}: {:?}",
        out.status
    );
    assert!(
        leftovers(d).is_empty(),
        "{bin} round {round}: {:?}",
        leftovers(d)
    );
    std::fs::remove_dir(d).unwrap();
}

/// SIGTERM sent the moment the process exists: a clean exit (status 0) that leaves none of
/// the sockets start-up created behind.
#[test]
fn sigterm_during_start_up_leaves_no_socket_behind() {
    let tap = format!("sgterm{}", std::process::id() % 100_000);
    for bin in BACKENDS {
        for round in 0..SIGNAL_ROUNDS {
            let d = scratch(&format!("term-{round}"));
            let child = start_backend(bin, &d, &tap);
            terminate_cleanly(child, &d, bin, round);
        }
    }
}

/// A NUL (or other control character) in a VM or port name from a config file: no thread
/// name built from it may panic, at start-up or when a front-end connects. The backend either
/// refuses the name with an error or serves it.
#[test]
fn control_characters_in_names_never_panic() {
    use devshare_integration::frontend::Connection;
    let d = scratch("nul-names");
    let tap = format!("nulnm{}", std::process::id() % 100_000);
    let console = d.join("console.toml");
    std::fs::write(
        &console,
        format!(
            "[[vm]]\nname = \"a\\u0000b\\u001b\"\nsocket = \"{}\"\nport = [ {{ name = \"c\", endpoint = \"unix:{}\" }} ]\n",
            d.join("c-vm.sock").display(),
            d.join("c-port.sock").display()
        ),
    )
    .unwrap();
    let netmux = d.join("netmux.toml");
    std::fs::write(
        &netmux,
        format!(
            "uplink = \"tap:{tap}\"\n[[port]]\nname = \"p\\u0000q\"\nsocket = \"{}\"\nmac = \"52:54:00:00:00:01\"\n",
            d.join("n-vm.sock").display()
        ),
    )
    .unwrap();
    for (bin, config, sock) in [
        ("vhost-user-console", &console, d.join("c-vm.sock")),
        ("vhost-user-netmux", &netmux, d.join("n-vm.sock")),
    ] {
        let log = d.join(format!("{bin}.log"));
        let mut child = Command::new(binary(bin).unwrap())
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let served = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Err(status);
            }
            if sock.exists() {
                break Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "{bin}: neither served nor refused"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        match served {
            Err(status) => {
                let text = std::fs::read_to_string(&log).unwrap();
                assert!(
                    status.code().is_some_and(|c| c != 101) && !text.contains("panicked"),
                    "{bin}: {status}: {text}"
                );
            }
            Ok(()) => {
                // A front-end connecting makes the per-connection threads.
                let mut c = Connection::connect(&sock).unwrap();
                c.get_features().unwrap();
                drop(c);
                kill(&child, libc::SIGTERM);
                let out = finish(child, Duration::from_secs(60), bin);
                let text = std::fs::read_to_string(&log).unwrap();
                assert_eq!(out.status.code(), Some(0), "{bin}: {text}");
                assert!(!text.contains("panicked"), "{bin}: {text}");
            }
        }
    }
}

/// `qemu-args -- ... -machine`: the appended -global must not become the machine type.
#[test]
fn a_qemu_option_missing_its_value_is_an_error() {
    for tail in [
        &["-machine"][..],
        &["-enable-kvm", "-m"][..],
        &["--global"][..],
    ] {
        let mut args = vec!["qemu-args", "--policy", "delay", "--"];
        args.extend(tail);
        let out = finish(
            spawn("kvm-pit-policy", &args),
            Duration::from_secs(60),
            "qemu-args",
        );
        assert_eq!(out.status.code(), Some(2), "{tail:?}: {}", out.stdout);
        let last = tail[tail.len() - 1];
        assert!(
            out.stderr
                .contains(&format!("{last}, which is missing its value")),
            "{}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}

/// A veth pair, removed on drop.
struct Veth(String);

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// `--host-mac` equal to the uplink interface's own MAC is refused.
#[test]
fn the_host_port_cannot_take_the_uplinks_own_mac() {
    let id = std::process::id() % 100_000;
    let (a, b) = (format!("chma{id}"), format!("chmb{id}"));
    let mac = "02:5e:00:12:34:56";
    let ok = Command::new("ip")
        .args([
            "link", "add", &a, "address", mac, "type", "veth", "peer", "name", &b,
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let _veth = Veth(a.clone());
    assert!(Command::new("ip")
        .args(["link", "set", &a, "up"])
        .status()
        .unwrap()
        .success());
    let d = scratch("host-mac");
    let sock = d.join("g.sock").display().to_string();
    let host = format!("chmh{id}");
    let out = finish(
        spawn(
            "vhost-user-netmux",
            &[
                "--uplink",
                &format!("af-packet:{a}"),
                "--host-port",
                &host,
                "--host-mac",
                mac,
                "--port",
                &format!("socket={sock},mac=52:54:00:00:00:01"),
            ],
        ),
        Duration::from_secs(60),
        "netmux with the uplink's MAC on the host port",
    );
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains(&a) && out.stderr.contains("own"),
        "{}",
        out.stderr
    );
}

/// Errors a user can act on: a missing directory is named as such, a log path is said once,
/// and an interface that exists but is not a TAP is called that (not "TUNSETIFF: Invalid
/// argument").
#[test]
fn start_up_errors_say_what_is_wrong() {
    let id = std::process::id();
    let missing = format!("/nonexistent-{id}");
    let run = |bin: &str, args: &[&str]| {
        let out = finish(spawn(bin, args), Duration::from_secs(60), bin);
        assert!(!out.status.success(), "{bin} {args:?}");
        out.stderr
    };
    let sock = format!("{missing}/v.sock");
    let err = run(
        "vhost-user-console",
        &["--vm", &format!("v={sock}"), "-p", "v/c=pty"],
    );
    assert!(
        err.contains(&sock) && err.contains("directory does not exist"),
        "{err}"
    );

    let d = scratch("errors");
    let vm = d.join("v.sock").display().to_string();
    let log = format!("{missing}/x.log");
    let err = run(
        "vhost-user-console",
        &["--vm", &format!("v={vm}"), "-p", &format!("v/c=file:{log}")],
    );
    assert_eq!(err.matches(&log).count(), 1, "{err}");
    assert!(err.contains("directory does not exist"), "{err}");

    let (a, b) = (
        format!("chea{}", id % 100_000),
        format!("cheb{}", id % 100_000),
    );
    assert!(Command::new("ip")
        .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
        .status()
        .unwrap()
        .success());
    let _veth = Veth(a.clone());
    let port = format!(
        "socket={},mac=52:54:00:00:00:01",
        d.join("g.sock").display()
    );
    let err = run(
        "vhost-user-netmux",
        &["--uplink", &format!("tap:{a}"), "--port", &port],
    );
    assert!(err.contains(&a) && err.contains("not a TAP"), "{err}");
    let err = run(
        "vhost-user-netmux",
        &[
            "--uplink",
            &format!("tap:cheu{}", id % 100_000),
            "--host-port",
            &a,
            "--port",
            &port,
        ],
    );
    assert!(err.contains(&a) && err.contains("not a TAP"), "{err}");
}

/// `--print-qemu-args` output pastes into a shell and QEMU reads it as meant: a comma in a
/// path is doubled, an odd path is quoted, a VM name becomes a valid QEMU id, QEMU before 8.0
/// gets `vectors=0` on the NIC itself, and both backends print one shape (shell continuations).
#[test]
fn printed_qemu_args_are_escaped_and_shaped_alike() {
    let d = scratch("print-escape");
    let config = d.join("c.toml");
    let odd = d.join("a,b c.sock");
    std::fs::write(
        &config,
        format!(
            "[[vm]]\nname = \"v'{{x}}\"\nsocket = \"{}\"\nkind = \"stream\"\nport = [ {{ name = \"p\", endpoint = \"pty\" }} ]\n",
            odd.display()
        ),
    )
    .unwrap();
    let c = config.display().to_string();
    let out = finish(
        spawn(
            "vhost-user-console",
            &[
                "--config",
                &c,
                "--print-qemu-args",
                "--qemu-version",
                "11.1",
            ],
        ),
        Duration::from_secs(60),
        "console --print-qemu-args",
    );
    assert!(out.status.success(), "{}", out.stderr);
    let doubled = format!("path={}", odd.display().to_string().replace(',', ",,"));
    assert!(
        out.stdout.contains(&format!("-chardev 'socket,id=console-v__x_,{doubled},reconnect-ms=1000' \\\n  -serial chardev:console-v__x_\n")),
        "{}",
        out.stdout
    );

    let out = netmux_print(&["--qemu-version", "7.2"]);
    assert!(out.status.success(), "{}", out.stderr);
    let device = out
        .stdout
        .lines()
        .find(|l| l.contains("-device virtio-net-pci"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(device.contains(",vectors=0"), "{device}");
    assert!(out.stdout.contains(" \\\n  -device"), "{}", out.stdout);
}

/// Ctrl-C during `stats` ends it at once (its signal handling is installed at start, and
/// must not hold the signal until the query gives up).
#[test]
fn sigint_ends_a_waiting_stats_query() {
    let d = scratch("stats-int");
    let path = d.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (held, _) = listener.accept().unwrap();
        tx.send(()).unwrap();
        std::thread::park();
        drop(held);
    });
    let p = path.display().to_string();
    let child = spawn("vhost-user-netmux", &["stats", "--socket", &p]);
    rx.recv().unwrap();
    kill(&child, libc::SIGINT);
    let out = finish(child, Duration::from_secs(60), "netmux stats");
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(!out.stderr.contains("no complete answer"), "{}", out.stderr);
}

/// A fake `--qemu` script in `d` whose body is `body` (a shell script).
fn fake_qemu(d: &std::path::Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = d.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

/// The three commands that run `--qemu PATH --version`, each with `qemu` as PATH.
fn qemu_asking_commands(d: &std::path::Path, qemu: &str) -> Vec<(&'static str, Vec<String>)> {
    let config = d.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[[vm]]\nname = \"v\"\nsocket = \"{}\"\nkind = \"stream\"\nport = [ {{ name = \"p\", endpoint = \"pty\" }} ]\n",
            d.join("s.sock").display()
        ),
    )
    .unwrap();
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut netmux = own(NETMUX_PRINT);
    netmux.extend(own(&["--qemu", qemu]));
    vec![
        (
            "vhost-user-console",
            own(&[
                "--config",
                &config.display().to_string(),
                "--print-qemu-args",
                "--qemu",
                qemu,
            ]),
        ),
        ("vhost-user-netmux", netmux),
        (
            "kvm-pit-policy",
            own(&["qemu-args", "--policy", "delay", "--qemu", qemu]),
        ),
    ]
}

/// Resident memory of `pid` in KiB, or `None` once it is gone.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A `--qemu` that floods its stdout: the backend reads a bounded prefix (its memory stays
/// small; 9.6 GB before the bound) and finishes with the version it found.
#[test]
fn a_flooding_qemu_binary_is_read_only_in_part() {
    let d = scratch("qemu-flood");
    let qemu = fake_qemu(&d, "flood", "exec yes 'QEMU emulator version 11.1.0'");
    for (bin, args) in qemu_asking_commands(&d, &qemu) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = spawn(bin, &args);
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            let rss = rss_kib(child.id()).unwrap_or(0);
            if rss > 200 * 1024 || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{bin}: still reading a flooding --qemu (RSS {rss} KiB)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = finish(child, Duration::from_secs(1), bin);
        assert!(out.status.success(), "{bin}: {}", out.stderr);
    }
}

/// Whether `pid` is gone (or only a zombie waiting for its reaper).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A `--qemu` that never finishes (and leaves a helper of its own running): the backend gives
/// it a time limit, says so, and kills its whole process group.
#[test]
fn a_hanging_qemu_binary_is_timed_out_and_killed_with_its_helpers() {
    let d = scratch("qemu-hang");
    let pids = d.join("pids");
    let qemu = fake_qemu(
        &d,
        "hang",
        &format!("sleep 1000 &\necho $! >> {}\nwait", pids.display()),
    );
    for (bin, args) in qemu_asking_commands(&d, &qemu) {
        let _ = std::fs::remove_file(&pids);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = finish(spawn(bin, &args), Duration::from_secs(60), bin);
        assert!(!out.status.success(), "{bin}");
        assert!(
            out.stderr.contains("did not finish within 5 s"),
            "{bin}: {}",
            out.stderr
        );
        let helper = std::fs::read_to_string(&pids).unwrap();
        let helper = helper.trim();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gone(helper) {
            assert!(
                Instant::now() < deadline,
                "{bin}: helper {helper} still runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A second SIGTERM while start-up waits (here on a slow `--qemu --version`) ends the process
/// at once with status 1, as the README says, rather than after the wait.
#[test]
fn a_second_sigterm_during_start_up_exits_at_once() {
    let d = scratch("qemu-term2");
    let ready = d.join("ready");
    let qemu = fake_qemu(
        &d,
        "slow",
        &format!("echo $$ > {}\nexec sleep 1000", ready.display()),
    );
    for (bin, args) in qemu_asking_commands(&d, &qemu) {
        let _ = std::fs::remove_file(&ready);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = spawn(bin, &args);
        while !ready.exists() {
            assert!(child_running(&child), "{bin} exited before asking --qemu");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Two signals sent back to back may merge into one pending signal: send until the
        // process is gone; every one after the first must end it.
        let pid = child.id();
        let out = {
            let mut child = child;
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{bin}: SIGTERMs did not end start-up");
                }
                // SAFETY: kill has no memory effects; the pid is our child, not yet reaped.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                std::thread::sleep(Duration::from_millis(50));
            }
            finish(child, Duration::from_secs(1), bin)
        };
        // kvm-pit-policy's qemu-args handles no signals: SIGTERM's default ends it at once.
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.code() == Some(1) || out.status.signal() == Some(libc::SIGTERM),
            "{bin}: {:?} {}",
            out.status,
            out.stderr
        );
        assert!(
            !out.stderr.contains("did not finish"),
            "{bin} waited for the time limit: {}",
            out.stderr
        );
        // An exit at once leaves the slow binary behind (it is in a process group of its
        // own); end it here.
        let slow: i32 = std::fs::read_to_string(&ready)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill has no memory effects; the pid is the fake binary this test wrote.
        unsafe { libc::kill(slow, libc::SIGKILL) };
    }
}

fn child_running(child: &Child) -> bool {
    !gone(&child.id().to_string())
}

/// A child killed and reaped when dropped, also when the test fails.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sleep` with `argv0` as its argv[0] (what any local user can do), and waits until
/// its command line shows it.
fn disguised_sleep(argv0: &str) -> Reaped {
    use std::os::unix::process::CommandExt;
    let child = Reaped(
        Command::new("sleep")
            .arg0(argv0)
            .arg("1000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let path = format!("/proc/{}/cmdline", child.0.id());
    while !std::fs::read(&path).unwrap().starts_with(argv0.as_bytes()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// A process named with terminal escape sequences: neither `inspect` (listing it as a QEMU)
/// nor `inspect --pid` (refusing it) writes a control character to the terminal.
#[test]
fn inspect_escapes_what_other_users_put_in_command_lines() {
    let qemu = disguised_sleep("/x/qemu-system-x86_64\x1b]0;owned\x07\x1b[2J");
    let other = disguised_sleep("evil\x1b[2J\r\nroot# ");
    let runs = [
        vec!["inspect".to_string()],
        vec!["inspect".into(), "--pid".into(), qemu.0.id().to_string()],
        vec!["inspect".into(), "--pid".into(), other.0.id().to_string()],
    ];
    for args in runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = finish(
            spawn("kvm-pit-policy", &args),
            Duration::from_secs(60),
            "inspect",
        );
        let both = format!("{}{}", out.stdout, out.stderr);
        assert!(both.contains("\\u{1b}[2J"), "{args:?}: {both:?}");
        assert!(
            !both.contains(['\x1b', '\x07', '\r']),
            "{args:?} printed control characters: {both:?}"
        );
    }
    drop((qemu, other));
}

/// `stats --socket S` prints only JSON: a socket that answers with escape sequences is
/// refused with a clear error, nothing of its answer printed.
#[test]
fn stats_refuses_an_answer_that_is_not_json() {
    use std::io::Write;
    let d = scratch("stats-escape");
    let path = d.join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"\x1b]0;owned\x07\x1b[2Jhello\n");
        }
    });
    let p = path.display().to_string();
    let out = finish(
        spawn("vhost-user-netmux", &["stats", "--socket", &p]),
        Duration::from_secs(60),
        "netmux stats",
    );
    assert!(!out.status.success(), "{:?}", out.status);
    assert!(out.stderr.contains("not JSON"), "{}", out.stderr);
    let both = format!("{}{}", out.stdout, out.stderr);
    assert!(!both.contains(['\x1b', '\x07']), "{both:?}");
}
