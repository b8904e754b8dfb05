//! A console port on a PTY follows the host terminal's size: the guest's `stty size` on
//! /dev/hvc0 shows the PTY's rows and columns, at boot and after a resize (virtio-console
//! RESIZE control messages, real QEMU and Linux guest).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::{Guest, ScratchDir, DEFAULT_TIMEOUT};
use devshare_integration::testdata::printed_qemu_args;

/// Sets the window size of the terminal at `path` (the PTY the backend made).
fn set_size(path: &Path, rows: u16, cols: u16) {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer; the fd is an open terminal.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0, "TIOCSWINSZ on {}", path.display());
}

#[test]
fn guest_console_follows_the_pty_size() {
    let dir = ScratchDir::new("console-resize").unwrap();
    let sock = dir.path().join("vm.sock");
    let pty = dir.path().join("console");
    let args = vec![
        "--socket".to_string(),
        sock.display().to_string(),
        "-p".into(),
        format!("console=pty:{}", pty.display()),
        "-p".into(),
        format!("org.devshare.log=file:{}", dir.path().join("log").display()),
    ];
    let mut backend =
        BackendProcess::spawn("vhost-user-console", &args, &dir.path().join("backend.log"))
            .unwrap();
    backend
        .wait_for_path(&pty, Duration::from_secs(20))
        .unwrap();
    set_size(&pty, 37, 123);

    let qemu = printed_qemu_args("vhost-user-console", &args, |_| true);
    let mut guest = Guest::builder()
        .name("console-resize")
        .args(qemu)
        .script(
            r#"
echo "SIZE-AT-BOOT: $(stty -F /dev/hvc0 size)"
first=$(stty -F /dev/hvc0 size)
echo "WAITING-FOR-RESIZE"
i=0
while [ "$(stty -F /dev/hvc0 size)" = "$first" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
echo "SIZE-AFTER: $(stty -F /dev/hvc0 size)"
"#,
        )
        .spawn()
        .unwrap();
    let boot = guest
        .wait_for_line("SIZE-AT-BOOT:", DEFAULT_TIMEOUT)
        .unwrap();
    assert!(
        boot.ends_with("SIZE-AT-BOOT: 37 123"),
        "{boot}\n{}",
        backend.log()
    );
    guest
        .wait_for_line("WAITING-FOR-RESIZE", DEFAULT_TIMEOUT)
        .unwrap();
    set_size(&pty, 50, 200);
    let run = guest.wait_exit(DEFAULT_TIMEOUT).unwrap();
    assert!(
        run.console.contains("SIZE-AFTER: 50 200"),
        "{}\nbackend:\n{}",
        run.console,
        backend.log()
    );
}
