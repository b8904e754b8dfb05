//! The test bed itself: real QEMU boots the real guest kernel and busybox initramfs that
//! scripts/setup.sh prepared. If these fail, every other end-to-end test would too.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use devshare_integration::qemu::{Guest, ScratchDir, DEFAULT_TIMEOUT};

fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Connects to a Unix socket QEMU listens on, retrying while QEMU is still creating it.
fn connect_when_listening(path: &Path, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return stream,
            Err(e)
                if Instant::now() < deadline
                    && matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

#[test]
fn guest_runs_script_and_reports_its_exit_code() {
    init_logging();
    let mut guest = Guest::builder()
        .name("boot-exit-code")
        // A file in a directory the base initramfs does not have: the per-test archive must
        // create the parents too.
        .file("/opt/devshare/greeting", "payload-from-host\n", 0o644)
        .script(
            "echo \"kernel=$(uname -r)\"\n\
             echo \"greeting=$(cat /opt/devshare/greeting)\"\n\
             ip -o link show lo | grep -q 'UP' && echo lo-is-up\n\
             for m in virtio_pci virtio_console virtio_net; do\n\
                 grep -q \"^$m \" /proc/modules && echo \"loaded=$m\"\n\
             done\n\
             exit 7\n",
        )
        .spawn()
        .expect("spawn QEMU");
    let run = guest.wait_exit(DEFAULT_TIMEOUT).expect("guest run");

    assert_eq!(run.exit_code, 7, "console:\n{}", run.console);
    let lines: Vec<&str> = run.console.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("kernel=6.1.0-")),
        "no kernel release line in console:\n{}",
        run.console
    );
    assert!(
        lines.contains(&"greeting=payload-from-host"),
        "file from the per-test archive missing:\n{}",
        run.console
    );
    assert!(lines.contains(&"lo-is-up"), "lo not up:\n{}", run.console);
    for module in ["virtio_pci", "virtio_console", "virtio_net"] {
        assert!(
            lines.contains(&format!("loaded={module}").as_str()),
            "module {module} not loaded:\n{}",
            run.console
        );
    }
}

#[test]
fn virtio_serial_port_is_named_and_carries_bytes_both_ways() {
    init_logging();
    let scratch = ScratchDir::new("boot-vport").expect("scratch dir");
    let sock = scratch.path().join("port.sock");
    let mut guest = Guest::builder()
        .name("boot-vport")
        .arg("-device")
        .arg("virtio-serial-pci,id=vser0")
        .arg("-chardev")
        .arg(format!(
            "socket,id=port0,path={},server=on,wait=off",
            sock.display()
        ))
        .arg("-device")
        .arg("virtserialport,bus=vser0.0,chardev=port0,name=org.test.0")
        .script(
            "set -e\n\
             virtio-port-links --wait org.test.0 60\n\
             echo \"link=$(readlink /dev/virtio-ports/org.test.0)\"\n\
             echo port-ready\n\
             # The host sends 'ping' once it is connected; answer on the same port. Until\n\
             # QEMU's socket has a client the port reads end-of-file: read again then.\n\
             req=\n\
             while [ -z \"$req\" ]; do req=$(head -c 4 /dev/virtio-ports/org.test.0) || true; [ -n \"$req\" ] || sleep 0.05; done\n\
             echo \"got=$req\"\n\
             printf 'pong-from-guest' >/dev/virtio-ports/org.test.0\n",
        )
        .spawn()
        .expect("spawn QEMU");

    let link = guest
        .wait_for_line("link=", DEFAULT_TIMEOUT)
        .expect("guest names its port");
    assert!(
        link.starts_with("link=/dev/vport"),
        "symlink points at the wrong node: {link}"
    );
    guest
        .wait_for_line("port-ready", DEFAULT_TIMEOUT)
        .expect("guest ready");

    let mut stream = connect_when_listening(&sock, DEFAULT_TIMEOUT);
    stream.write_all(b"ping").expect("write to the port");
    stream
        .set_read_timeout(Some(DEFAULT_TIMEOUT))
        .expect("set read timeout");
    let expected = b"pong-from-guest";
    let mut received = Vec::new();
    let mut buf = [0u8; 64];
    while received.len() < expected.len() {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the port failed after {:?}: {e}\nconsole:\n{}",
                String::from_utf8_lossy(&received),
                guest.console_output()
            ),
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&received),
        "pong-from-guest",
        "console:\n{}",
        guest.console_output()
    );

    let run = guest.wait_exit(DEFAULT_TIMEOUT).expect("guest run");
    assert_eq!(run.exit_code, 0, "console:\n{}", run.console);
    assert!(
        run.console.lines().any(|l| l == "got=ping"),
        "guest did not receive the host's bytes:\n{}",
        run.console
    );
}

#[test]
fn guest_without_script_offers_a_shell() {
    init_logging();
    let mut guest = Guest::builder()
        .name("boot-shell")
        .spawn()
        .expect("spawn QEMU");
    let line = guest
        .wait_for_line("devshare guest ready", DEFAULT_TIMEOUT)
        .expect("shell banner");
    assert!(line.contains("no /test.sh"), "unexpected banner: {line}");
    guest.kill().expect("kill QEMU");
    assert!(
        guest.wait_exit(Duration::from_secs(1)).is_err(),
        "a killed shell guest cannot report an exit code"
    );
}

#[test]
fn guest_that_dies_before_its_script_ends_is_an_error() {
    init_logging();
    // The script powers the guest off itself, so /init never reports an exit code: the runner
    // must say so rather than invent one.
    let mut guest = Guest::builder()
        .name("boot-no-exit-code")
        .script("echo about-to-vanish\npoweroff -f\nsleep 60\n")
        .spawn()
        .expect("spawn QEMU");
    let err = guest
        .wait_exit(DEFAULT_TIMEOUT)
        .expect_err("a guest without an exit code must not pass");
    let message = err.to_string();
    assert!(
        message.contains("without the guest reporting an exit code"),
        "wrong error: {message}"
    );
    assert!(
        message.contains("about-to-vanish"),
        "error lacks the console tail: {message}"
    );
}
