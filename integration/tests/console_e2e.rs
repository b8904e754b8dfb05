//! vhost-user-console end to end: a real QEMU 11 (TCG), a real Linux guest, real sockets,
//! PTYs and serial lines, and the backend binary as users run it.
//!
//! Every test takes its QEMU options from the backend's own `--print-qemu-args`, so those
//! printed options are proven to plug a guest in. Every host-side read has a timeout, and a
//! failure prints the guest console, QEMU's stderr and the backend log.
//!
//! The tests at the end of this file run once per QEMU of the version matrix (`qemu_7_2::...`,
//! `qemu_10_0::...`, `qemu_11_1::...`, see `devshare_integration::matrix`): stream mode on
//! every version, the vhost-user virtio-console where the QEMU can plug it, and proof that it
//! cannot where the README says so.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use devshare_integration::matrix::MatrixQemu;
use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::{Guest, GuestRun, ScratchDir};
use devshare_integration::qemu_matrix;
use devshare_integration::testdata::{pattern, printed_qemu_args};
use sha2::{Digest, Sha256};

/// How long the backend may take to create its sockets and PTY links.
const UP: Duration = Duration::from_secs(30);
/// Longest wait for any single read from the host side; generous because TCG guests share
/// two cores with other tests and builds.
const READ_TIMEOUT: Duration = Duration::from_secs(180);
/// A guest's whole run (boot and script) for the short tests.
const SHORT_RUN: Duration = Duration::from_secs(300);
/// A guest's whole run for the 16 MiB transfers.
const BULK_RUN: Duration = Duration::from_secs(900);
/// The bulk transfer size.
const BULK: usize = 16 << 20;
/// Guest RAM for the bulk tests: the 16 MiB file lives in the initramfs' tmpfs.
const BULK_MEMORY_MIB: u64 = 512;

/// The QEMU options the backend prints for VM `vm` (minus the memory options, which the runner
/// sets itself).
fn qemu_device_args(backend_args: &[String], vm: &str) -> Vec<String> {
    printed_qemu_args("vhost-user-console", backend_args, |h| h == vm)
}

/// [`qemu_device_args`] spelled for the matrix QEMU `qemu` (`--print-qemu-args --qemu PATH`).
fn qemu_device_args_for(backend_args: &[String], vm: &str, qemu: &MatrixQemu) -> Vec<String> {
    let mut args = backend_args.to_vec();
    args.extend(qemu.print_args());
    qemu_device_args(&args, vm)
}

fn start_backend(dir: &Path, args: &[String], wait_for: &Path) -> BackendProcess {
    let mut b =
        BackendProcess::spawn("vhost-user-console", args, &dir.join("backend.log")).unwrap();
    b.wait_for_path(wait_for, UP).unwrap();
    b
}

/// Everything worth seeing when a test fails.
fn report(guests: &[&Guest], backend: &BackendProcess) -> String {
    let mut r = String::new();
    for g in guests {
        r.push_str(&format!(
            "--- guest {} console ---\n{}\n--- guest {} qemu stderr ---\n{}\n",
            g.name(),
            g.console_output(),
            g.name(),
            g.qemu_stderr()
        ));
    }
    r.push_str(&format!("--- backend log ---\n{}", backend.log()));
    r
}

/// Connects to a Unix endpoint of the backend, with a read timeout.
fn connect(path: &Path) -> UnixStream {
    for _ in 0..1500 {
        if let Ok(s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
            return s;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot connect to {}", path.display());
}

/// A tty or PTY read with a timeout (`File` has no `set_read_timeout`): each read waits at
/// most `timeout` for data and fails with `TimedOut` otherwise.
struct TimedTty {
    file: File,
    timeout: Duration,
}

impl TimedTty {
    fn open(path: &Path) -> TimedTty {
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        TimedTty {
            file,
            timeout: READ_TIMEOUT,
        }
    }

    fn from_fd(fd: OwnedFd) -> TimedTty {
        TimedTty {
            file: File::from(fd),
            timeout: READ_TIMEOUT,
        }
    }
}

impl Read for TimedTty {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd and the fd is open for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, self.timeout.as_millis() as libc::c_int) };
        match n {
            0 => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no data from the tty",
            )),
            n if n < 0 => Err(io::Error::last_os_error()),
            _ => self.file.read(buf),
        }
    }
}

impl Write for TimedTty {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Reads one line (without its line ending, `\r` included).
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "end of stream",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads exactly `len` bytes and returns their SHA-256 (hex).
fn read_hashed(r: &mut impl Read, len: usize) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len());
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended after {} of {len} bytes", len - left),
            ));
        }
        hasher.update(&buf[..n]);
        left -= n;
    }
    Ok(hex(&hasher.finalize()))
}

/// The value of a `KEY=value` line the guest printed on its console.
fn console_value(guest: &mut Guest, key: &str, timeout: Duration) -> Result<String, String> {
    let line = guest
        .wait_for_line(&format!("{key}="), timeout)
        .map_err(|e| e.to_string())?;
    let start = line.find(&format!("{key}=")).unwrap_or(0) + key.len() + 1;
    Ok(line[start..].trim().to_string())
}

/// Waits for the guest to power off; panics with the full report unless its script
/// exited 0.
fn expect_clean_exit(guest: &mut Guest, backend: &BackendProcess, timeout: Duration) -> GuestRun {
    let run = guest
        .wait_exit(timeout)
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&[guest], backend)));
    assert_eq!(
        run.exit_code,
        0,
        "guest script failed\n{}",
        report(&[guest], backend)
    );
    run
}

/// Guest writes reach a PTY endpoint (console, hvc0) and a Unix endpoint (named port), and
/// host writes on both reach the guest. Runs on every QEMU of the matrix that can plug a
/// vhost-user virtio-console (>= 10.2).
fn console_on_pty_and_named_port_on_unix_socket_carry_both_ways(qemu: &MatrixQemu) {
    let dir = ScratchDir::new("console-basic").unwrap();
    let sock = dir.path().join("vm.sock");
    let pty_link = dir.path().join("console.pty");
    let data = dir.path().join("data.sock");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("a={}", s(&sock)),
        "-p".into(),
        format!("a/console=pty:{}", s(&pty_link)),
        "-p".into(),
        format!("a/org.devshare.data=unix:{}", s(&data)),
    ];
    let mut backend = start_backend(dir.path(), &args, &sock);
    backend.wait_for_path(&pty_link, UP).unwrap();
    // The link points at the slave of the PTY the backend created (a real /dev/pts entry).
    let slave = std::fs::read_link(&pty_link).unwrap();
    assert!(slave.starts_with("/dev/pts/"), "{}", slave.display());
    let mut pty = BufReader::new(TimedTty::open(&pty_link));
    let mut data_client = connect(&data);
    // Both ports stay open in the guest (fds 3 and 4): Linux drops what arrived for a port
    // when its last opener closes it, so an echo-then-reopen script would race the host.
    let mut guest = Guest::builder()
        .name("console-basic")
        .test_bed(qemu.bed())
        .args(qemu_device_args_for(&args, "a", qemu))
        .script(
            r#"
set -e
ls /dev/virtio-ports/
exec 3<>/dev/virtio-ports/org.devshare.data
exec 4<>/dev/hvc0
echo hello-console >&4
echo hello-data >&3
read -r line <&3
echo "GOT-DATA:$line"
read -r line <&4
echo "GOT-CONSOLE:$line"
"#,
        )
        .spawn()
        .unwrap();

    let got = read_line(&mut pty);
    assert!(
        matches!(&got, Ok(l) if l == "hello-console"),
        "console on the PTY: {got:?}\n{}",
        report(&[&guest], &backend)
    );
    let mut data_lines = BufReader::new(data_client.try_clone().unwrap());
    let got = read_line(&mut data_lines);
    assert!(
        matches!(&got, Ok(l) if l == "hello-data"),
        "named port on the Unix socket: {got:?}\n{}",
        report(&[&guest], &backend)
    );
    data_client.write_all(b"from-unix\n").unwrap();
    pty.get_mut().write_all(b"from-pty\n").unwrap();

    let run = expect_clean_exit(&mut guest, &backend, SHORT_RUN);
    assert!(run.console.contains("org.devshare.data"), "{}", run.console);
    assert!(
        run.console.contains("GOT-DATA:from-unix"),
        "{}",
        report(&[&guest], &backend)
    );
    assert!(
        run.console.contains("GOT-CONSOLE:from-pty"),
        "{}",
        report(&[&guest], &backend)
    );
}

/// 16 MiB each way through a named port: random data from the guest arrives on the Unix
/// endpoint with the checksum the guest computed, and 16 MiB of host data arrives in the
/// guest with the host's checksum.
#[test]
fn sixteen_mib_each_way_through_a_named_port() {
    let dir = ScratchDir::new("console-bulk").unwrap();
    let sock = dir.path().join("vm.sock");
    let bulk = dir.path().join("bulk.sock");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("a={}", s(&sock)),
        "-p".into(),
        format!("a/console=file:{}", s(&dir.path().join("console.log"))),
        "-p".into(),
        format!("a/org.devshare.bulk=unix:{}", s(&bulk)),
    ];
    let backend = start_backend(dir.path(), &args, &sock);
    let mut client = connect(&bulk);
    let to_guest = pattern(BULK, 7);
    let to_guest_sha = sha256_hex(&to_guest);
    let mut guest = Guest::builder()
        .name("console-bulk")
        .memory_mib(BULK_MEMORY_MIB)
        .args(qemu_device_args(&args, "a"))
        .script(&format!(
            r#"
set -e
dd if=/dev/urandom of=/tmp/out bs=1M count=16 2>/dev/null
echo "TX-SHA=$(sha256sum /tmp/out | cut -d' ' -f1)"
exec 3<>/dev/virtio-ports/org.devshare.bulk
cat /tmp/out >&3
rm /tmp/out
echo "RX-SHA=$(head -c {BULK} <&3 | sha256sum | cut -d' ' -f1)"
"#
        ))
        .spawn()
        .unwrap();

    // The host sends while it receives: the guest reads only after its own send, and the
    // backend must hold the host's bytes back until the guest has room.
    let mut writer = client.try_clone().unwrap();
    let sender = thread::spawn(move || writer.write_all(&to_guest));
    let from_guest = read_hashed(&mut client, BULK)
        .unwrap_or_else(|e| panic!("reading 16 MiB: {e}\n{}", report(&[&guest], &backend)));
    let tx_sha = console_value(&mut guest, "TX-SHA", READ_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&[&guest], &backend)));
    assert_eq!(
        from_guest,
        tx_sha,
        "guest -> host data differs\n{}",
        report(&[&guest], &backend)
    );
    sender.join().unwrap().unwrap();
    let rx_sha = console_value(&mut guest, "RX-SHA", BULK_RUN)
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&[&guest], &backend)));
    assert_eq!(
        rx_sha,
        to_guest_sha,
        "host -> guest data differs\n{}",
        report(&[&guest], &backend)
    );
    expect_clean_exit(&mut guest, &backend, SHORT_RUN);
}

/// Two guests in two QEMU processes, one backend process: 16 MiB each way over a
/// guest-to-guest link, at the same time, checksums equal on both ends.
#[test]
fn two_guests_exchange_sixteen_mib_over_a_link() {
    let dir = ScratchDir::new("console-link").unwrap();
    let sock_a = dir.path().join("a.sock");
    let sock_b = dir.path().join("b.sock");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("a={}", s(&sock_a)),
        "--vm".into(),
        format!("b={}", s(&sock_b)),
        "-p".into(),
        format!("a/console=file:{}", s(&dir.path().join("a.log"))),
        "-p".into(),
        "a/link=vm:b/link".into(),
        "-p".into(),
        format!("b/console=file:{}", s(&dir.path().join("b.log"))),
        "-p".into(),
        "b/link=vm:a/link".into(),
    ];
    let mut backend = start_backend(dir.path(), &args, &sock_a);
    backend.wait_for_path(&sock_b, UP).unwrap();
    // Each guest sends in the background while it receives. It does not power off by itself:
    // its last bytes may still sit in its ring when it has received everything, so the test
    // stops both guests only after both have reported what they received.
    let script = format!(
        r#"
set -e
dd if=/dev/urandom of=/tmp/out bs=1M count=16 2>/dev/null
echo "TX-SHA=$(sha256sum /tmp/out | cut -d' ' -f1)"
exec 3<>/dev/virtio-ports/link
cat /tmp/out >&3 &
echo "RX-SHA=$(head -c {BULK} <&3 | sha256sum | cut -d' ' -f1)"
wait
echo SENT-ALL
sleep 100000
"#
    );
    let mut a = Guest::builder()
        .name("console-link-a")
        .memory_mib(BULK_MEMORY_MIB)
        .args(qemu_device_args(&args, "a"))
        .script(&script)
        .spawn()
        .unwrap();
    let mut b = Guest::builder()
        .name("console-link-b")
        .memory_mib(BULK_MEMORY_MIB)
        .args(qemu_device_args(&args, "b"))
        .script(&script)
        .spawn()
        .unwrap();
    // On failure the report shows both guests, so the value is read first and the guests
    // are borrowed again only for the message.
    let mut values = Vec::new();
    for (which, key) in [(0, "TX-SHA"), (1, "TX-SHA"), (0, "RX-SHA"), (1, "RX-SHA")] {
        let g = if which == 0 { &mut a } else { &mut b };
        match console_value(g, key, BULK_RUN) {
            Ok(v) => values.push(v),
            Err(e) => panic!("{e}\n{}", report(&[&a, &b], &backend)),
        }
    }
    let [a_tx, b_tx, a_rx, b_rx] = <[String; 4]>::try_from(values).unwrap();
    assert_ne!(a_tx, b_tx, "both guests made the same random data?");
    assert_eq!(
        a_tx,
        b_rx,
        "a -> b differs\n{}",
        report(&[&a, &b], &backend)
    );
    assert_eq!(
        b_tx,
        a_rx,
        "b -> a differs\n{}",
        report(&[&a, &b], &backend)
    );
    for which in 0..2 {
        let g = if which == 0 { &mut a } else { &mut b };
        if let Err(e) = g.wait_for_line("SENT-ALL", READ_TIMEOUT) {
            panic!("{e}\n{}", report(&[&a, &b], &backend));
        }
    }
}

/// A PTY pair standing in for a physical serial port: the backend applies the line settings
/// it was given (read back here with tcgetattr) and carries data both ways.
#[test]
fn serial_endpoint_on_a_pty_pair_gets_line_settings_and_data_both_ways() {
    let dir = ScratchDir::new("console-serial").unwrap();
    let sock = dir.path().join("vm.sock");
    let (master, slave) = open_pty_pair();
    let slave_path = tty_path(&slave);
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("a={}", s(&sock)),
        "-p".into(),
        format!("a/console=file:{}", s(&dir.path().join("console.log"))),
        "-p".into(),
        format!(
            "a/org.devshare.serial=serial:{},baud=57600,parity=odd,stop=2,flow=hw",
            s(&slave_path)
        ),
    ];
    let backend = start_backend(dir.path(), &args, &sock);

    // What the backend set is visible on any fd of the same tty.
    let t = termios_of(&slave);
    // SAFETY: `t` is a valid termios filled by tcgetattr.
    let (ispeed, ospeed) = unsafe { (libc::cfgetispeed(&t), libc::cfgetospeed(&t)) };
    assert_eq!(ospeed, libc::B57600, "output speed\n{}", backend.log());
    assert_eq!(ispeed, libc::B57600, "input speed\n{}", backend.log());
    assert_ne!(
        t.c_cflag & libc::CSTOPB,
        0,
        "two stop bits\n{}",
        backend.log()
    );
    assert_ne!(t.c_cflag & libc::CRTSCTS, 0, "RTS/CTS\n{}", backend.log());
    assert_ne!(t.c_cflag & libc::PARODD, 0, "odd parity\n{}", backend.log());
    // A PTY always runs 8 data bits and clears PARENB whatever is asked (Linux pty.c), so
    // the parity request shows only in PARODD; the backend logs the difference.
    assert_eq!(t.c_cflag & libc::CSIZE, libc::CS8);
    // Raw: no echo of what the test writes back into its own reads, no line editing.
    assert_eq!(t.c_lflag & (libc::ECHO | libc::ICANON), 0);

    let mut port = BufReader::new(TimedTty::from_fd(master));
    let mut guest = Guest::builder()
        .name("console-serial")
        .args(qemu_device_args(&args, "a"))
        .script(
            r#"
set -e
exec 3<>/dev/virtio-ports/org.devshare.serial
echo to-serial-line >&3
read -r line <&3
echo "GOT:$line"
"#,
        )
        .spawn()
        .unwrap();
    let got = read_line(&mut port);
    assert!(
        matches!(&got, Ok(l) if l == "to-serial-line"),
        "{got:?}\n{}",
        report(&[&guest], &backend)
    );
    port.get_mut().write_all(b"from-serial-line\n").unwrap();
    let run = expect_clean_exit(&mut guest, &backend, SHORT_RUN);
    assert!(
        run.console.contains("GOT:from-serial-line"),
        "{}",
        report(&[&guest], &backend)
    );
    drop(slave);
}

/// Opens a PTY pair (master, slave).
fn open_pty_pair() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the given pointers; name, termios and winsize may
    // be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// The device path of an open tty fd.
fn tty_path(fd: &OwnedFd) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
}

fn termios_of(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data; zeroed is valid and tcgetattr overwrites it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid for writes; the fd is open.
    let rc = unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) };
    assert_eq!(rc, 0, "tcgetattr: {}", io::Error::last_os_error());
    t
}

/// Stream mode: the backend's port is a second 16550 in the guest. The runner's console is
/// the first `-serial` (ttyS0), so the `-serial chardev:...` the backend prints becomes
/// ttyS1. Bytes go both ways through a Unix endpoint. Runs on every QEMU of the matrix.
fn stream_mode_serial_port_carries_both_ways(qemu: &MatrixQemu) {
    let dir = ScratchDir::new("console-stream").unwrap();
    let sock = dir.path().join("stream.sock");
    let ep = dir.path().join("serial.sock");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("s={},stream", s(&sock)),
        "-p".into(),
        format!("s/serial=unix:{}", s(&ep)),
    ];
    let backend = start_backend(dir.path(), &args, &sock);
    let qemu_args = qemu_device_args_for(&args, "s", qemu);
    assert!(
        qemu_args.iter().any(|a| a.starts_with("chardev:")),
        "{qemu_args:?}"
    );
    // QEMU redials a restarted backend, spelled the way this QEMU wants it.
    let reconnect = qemu.version.chardev_reconnect();
    assert!(
        qemu_args.iter().any(|a| a.ends_with(reconnect)),
        "QEMU {}: no {reconnect} in {qemu_args:?}",
        qemu.version
    );
    let mut client = connect(&ep);
    let mut guest = Guest::builder()
        .name("console-stream")
        .test_bed(qemu.bed())
        .args(qemu_args)
        .script(
            r#"
set -e
stty -F /dev/ttyS1 raw -echo
exec 3<>/dev/ttyS1
echo to-host-over-ttyS1 >&3
read -r line <&3
echo "GOT:$line"
"#,
        )
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.try_clone().unwrap());
    let got = read_line(&mut lines);
    assert!(
        matches!(&got, Ok(l) if l == "to-host-over-ttyS1"),
        "{got:?}\n{}",
        report(&[&guest], &backend)
    );
    client.write_all(b"from-host-over-ttyS1\n").unwrap();
    let run = expect_clean_exit(&mut guest, &backend, SHORT_RUN);
    assert!(
        run.console.contains("GOT:from-host-over-ttyS1"),
        "{}",
        report(&[&guest], &backend)
    );
}

/// `buffered_bytes` of VM `vm`, port `port` from the backend's stats socket (None while the
/// socket does not answer).
fn buffered_bytes(stats: &Path, vm: &str, port: &str) -> Option<u64> {
    let mut s = UnixStream::connect(stats).ok()?;
    s.set_read_timeout(Some(READ_TIMEOUT)).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    doc["ports"]
        .as_array()?
        .iter()
        .find(|p| p["vm"] == vm && p["port"] == port)?["buffered_bytes"]
        .as_u64()
}

/// Waits until the backend holds exactly `want` bytes of port `vm/port` in its buffer.
fn wait_buffered(stats: &Path, vm: &str, port: &str, want: u64, backend: &BackendProcess) {
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    loop {
        let got = buffered_bytes(stats, vm, port);
        if got == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backend buffers {got:?} bytes of {vm}/{port}, expected {want}\n{}",
            backend.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILLs `backend`, removes the socket files it could not clean up, and starts the same
/// command line again (its log is appended to the same file). `last` is the last file the
/// backend creates (its stats socket): once it exists, everything is listening.
fn restart_backend(
    backend: &mut BackendProcess,
    dir: &Path,
    args: &[String],
    stale: &[&Path],
    last: &Path,
) -> BackendProcess {
    backend.kill();
    for f in stale.iter().chain([&last]) {
        let _ = std::fs::remove_file(f);
    }
    start_backend(dir, args, last)
}

/// The bytes of lines `L<first>` ..= `L<last>`, each ending in `ending`.
fn numbered_lines_len(first: u32, last: u32, ending: &str) -> u64 {
    (first..=last)
        .map(|i| (format!("L{i}").len() + ending.len()) as u64)
        .sum()
}

/// Reads `L<first>` ..= `L<last>`, in order, nothing else in between.
fn expect_numbered_lines(r: &mut impl BufRead, first: u32, last: u32) -> Result<(), String> {
    for i in first..=last {
        let line = read_line(r).map_err(|e| format!("waiting for L{i}: {e}"))?;
        if line != format!("L{i}") {
            return Err(format!("expected L{i}, got {line:?}"));
        }
    }
    Ok(())
}

/// Stream mode survives the backend being SIGKILLed twice while the guest runs, with
/// `--state-dir` spool files:
///
/// 1. The guest writes L1..L500 while no client is attached; once the backend holds all of
///    it (stats: buffered_bytes), the backend is killed and restarted, and the new process
///    replays exactly L1..L500 to the client that attaches. Nothing accepted is lost, and the
///    guest does not send these lines again, so they can only come from the spool file.
/// 2. The guest then writes L501..L2500 continuously while the backend is killed and
///    restarted once more mid-stream. QEMU drops what the 16550 sends while no backend is
///    connected (its socket chardev fails the write and the UART discards the byte), so
///    the guest runs a small go-back-N protocol: it sends batches of 50 lines and sends a
///    batch again unless the host acknowledges its last line within 10 s. The host accepts
///    lines strictly in order: duplicates (a resent batch) are skipped, and a gap or a torn
///    line is tolerated only right after a restart, until the resent batch catches up --
///    anywhere else it fails the test. Every line must arrive, in order.
#[test]
fn stream_mode_backend_killed_and_restarted_loses_nothing_it_accepted() {
    let dir = ScratchDir::new("console-stream-restart").unwrap();
    let sock = dir.path().join("stream.sock");
    let ep = dir.path().join("serial.sock");
    let stats = dir.path().join("stats.sock");
    let state = dir.path().join("state");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("s={},stream", s(&sock)),
        "-p".into(),
        format!("s/serial=unix:{}", s(&ep)),
        "--state-dir".into(),
        s(&state),
        "--stats-socket".into(),
        s(&stats),
    ];
    let mut backend = start_backend(dir.path(), &args, &stats);
    let qemu_args = qemu_device_args(&args, "s");
    // QEMU itself redials the restarted backend.
    assert!(
        qemu_args.iter().any(|a| a.contains("reconnect-ms=")),
        "{qemu_args:?}"
    );
    let mut guest = Guest::builder()
        .name("console-stream-restart")
        .args(qemu_args)
        .script(
            r#"
set -e
stty -F /dev/ttyS1 raw -echo
exec 3<>/dev/ttyS1
seq 1 500 | sed 's/^/L/' >&3
echo PART1-WRITTEN
read -r go <&3
echo "GOT:$go"
n=501
while [ $n -le 2500 ]; do
    end=$((n+49))
    i=$n
    while [ $i -le $end ]; do echo "L$i"; i=$((i+1)); done >&3
    ok=0
    while read -t 10 -r ack <&3; do
        if [ "$ack" = "A$end" ]; then ok=1; break; fi
    done
    if [ $ok = 1 ]; then n=$((end+1)); else echo "RESEND-FROM $n"; fi
done
echo PART2-WRITTEN
"#,
        )
        .spawn()
        .unwrap();

    // Part 1: spool replay across a SIGKILL.
    guest
        .wait_for_line("PART1-WRITTEN", SHORT_RUN)
        .unwrap_or_else(|e| panic!("{e}\n{}", backend.log()));
    let part1 = numbered_lines_len(1, 500, "\n");
    wait_buffered(&stats, "s", "serial", part1, &backend);
    backend = restart_backend(&mut backend, dir.path(), &args, &[&sock, &ep], &stats);
    let mut client = connect(&ep);
    let mut lines = BufReader::new(client.try_clone().unwrap());
    if let Err(e) = expect_numbered_lines(&mut lines, 1, 500) {
        panic!("replay after restart: {e}\n{}", report(&[&guest], &backend));
    }
    client.write_all(b"GO\n").unwrap();

    // Part 2: continuous lines, one more SIGKILL mid-stream.
    const LAST: u32 = 2500;
    const KILL_AT: u32 = 1200;
    let mut expected = 501u32;
    let mut killed = false;
    // Set by a restart; cleared by the next line that is in order.
    let mut after_restart = false;
    let mut duplicates = 0u32;
    let mut tolerated = Vec::new();
    // A line torn by a restart: its head came on the old connection.
    let mut carry = String::new();
    while expected <= LAST {
        if !killed && expected > KILL_AT {
            killed = true;
            backend = restart_backend(&mut backend, dir.path(), &args, &[&sock, &ep], &stats);
            // What the dead backend had already written is still in the old connection:
            // read it to its end before attaching to the new backend.
            let mut rest = Vec::new();
            let _ = lines.read_to_end(&mut rest);
            let text = carry.clone() + &String::from_utf8_lossy(&rest);
            let (complete, torn) = match text.rfind('\n') {
                Some(i) => (text[..=i].to_string(), text[i + 1..].to_string()),
                None => (String::new(), text.clone()),
            };
            for line in complete.lines() {
                check_line(
                    line,
                    &mut expected,
                    &mut duplicates,
                    after_restart,
                    &mut tolerated,
                )
                .unwrap_or_else(|e| panic!("{e}\n{}", report(&[&guest], &backend)));
            }
            carry = torn;
            client = connect(&ep);
            lines = BufReader::new(client.try_clone().unwrap());
            after_restart = true;
            continue;
        }
        let mut raw = String::new();
        match lines.read_line(&mut raw) {
            Ok(n) if n > 0 && raw.ends_with('\n') => {}
            other => panic!(
                "stream ended or timed out at L{expected}: {other:?}\n{}",
                report(&[&guest], &backend)
            ),
        }
        let line = std::mem::take(&mut carry) + raw.trim_end_matches('\n');
        let in_order = check_line(
            &line,
            &mut expected,
            &mut duplicates,
            after_restart,
            &mut tolerated,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&[&guest], &backend)));
        if in_order {
            after_restart = false;
        }
        // Acknowledge a batch's last line once everything up to it is here (again, when a
        // resent batch shows the acknowledgement was lost).
        if let Some(n) = line.strip_prefix('L').and_then(|n| n.parse::<u32>().ok()) {
            if n >= 550 && (n - 500) % 50 == 0 && n < expected {
                let _ = client.write_all(format!("A{n}\n").as_bytes());
            }
        }
    }
    let run = expect_clean_exit(&mut guest, &backend, SHORT_RUN);
    assert!(run.console.contains("GOT:GO"), "{}", run.console);
    eprintln!(
        "stream restart: {duplicates} duplicate lines (resent batches), tolerated after the \
         mid-stream restart: {tolerated:?}"
    );
}

/// Checks one received line of part 2 against the next expected number; returns whether it
/// was the expected one. See the test above for the rules.
fn check_line(
    line: &str,
    expected: &mut u32,
    duplicates: &mut u32,
    after_restart: bool,
    tolerated: &mut Vec<String>,
) -> Result<bool, String> {
    let n = line.strip_prefix('L').and_then(|n| n.parse::<u32>().ok());
    match n {
        Some(n) if n == *expected => {
            *expected += 1;
            Ok(true)
        }
        Some(n) if n < *expected => {
            *duplicates += 1;
            Ok(false)
        }
        _ if after_restart => {
            tolerated.push(line.to_string());
            Ok(false)
        }
        _ => Err(format!(
            "line {line:?} while expecting L{expected} (not right after a restart)"
        )),
    }
}

/// Virtio mode with QEMU listening (`server=on`) and the backend dialing (`--vm a=PATH,connect`),
/// and a SIGKILL of the backend.
///
/// The backend starts first and keeps dialing until QEMU is there. The guest writes L1..L300
/// to hvc0 while no client is attached: a console write returns only after the device has
/// marked the buffer used, so these lines are accepted and sit in the `--state-dir` spool.
/// The backend is then killed and started again; the client that attaches to the new process
/// must get exactly L1..L300.
///
/// What QEMU 11 does next is its own limit: its generic vhost-user device
/// (`vhost-user-test-device-pci`, hw/virtio/vhost-user-base.c) cannot take a second
/// connection. On disconnect `vub_disconnect()` runs `vhost_dev_cleanup()`, which zeroes the
/// `vhost_dev` (`vhost_ops` included), and `vub_connect()` never calls `vhost_dev_init()`
/// again, so when the restarted backend connects and the guest's device is running,
/// `vub_start()` -> `vhost_dev_start()` aborts on `assert(hdev->vhost_ops)`. The other way
/// round does not work either: with `reconnect-ms` on the chardev (QEMU dialing a listening
/// backend) the device fails at realize, because `vhost_dev_init()` runs before the
/// background connect has finished ("Failed to set msg fds", "vhost_backend_init failed").
/// So this test accepts exactly two endings after the restart: QEMU aborting with that
/// assertion, or -- with a QEMU that reconnects -- the guest's next lines arriving through the
/// new backend. Anything else fails.
#[test]
fn virtio_client_mode_backend_kill_replays_accepted_console_output() {
    let dir = ScratchDir::new("console-virtio-restart").unwrap();
    let sock = dir.path().join("vm.sock");
    let con = dir.path().join("console.sock");
    let stats = dir.path().join("stats.sock");
    let state = dir.path().join("state");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("a={},connect", s(&sock)),
        "-p".into(),
        format!("a/console=unix:{}", s(&con)),
        "--state-dir".into(),
        s(&state),
        "--stats-socket".into(),
        s(&stats),
    ];
    let qemu_args = qemu_device_args(&args, "a");
    assert!(
        qemu_args.iter().any(|a| a.contains("server=on")),
        "{qemu_args:?}"
    );
    // Started before QEMU exists: it must keep dialing.
    let mut backend = start_backend(dir.path(), &args, &stats);
    let mut guest = Guest::builder()
        .name("console-virtio-restart")
        .args(qemu_args)
        .script(
            r#"
set -e
exec 4<>/dev/hvc0
stty -F /dev/hvc0 raw -echo
i=1
while [ $i -le 300 ]; do echo "L$i" >&4; i=$((i+1)); done
echo PART1-WRITTEN
read -r go <&4
echo "GOT:$go"
i=301
while [ $i -le 310 ]; do echo "L$i" >&4; i=$((i+1)); done
"#,
        )
        .spawn()
        .unwrap();
    guest
        .wait_for_line("PART1-WRITTEN", SHORT_RUN)
        .unwrap_or_else(|e| panic!("{e}\n{}", report(&[&guest], &backend)));
    assert!(
        backend.log().contains("not reachable yet"),
        "the backend did not have to wait for QEMU?\n{}",
        backend.log()
    );
    wait_buffered(
        &stats,
        "a",
        "console",
        numbered_lines_len(1, 300, "\n"),
        &backend,
    );
    // QEMU's listening socket stays; only the backend's own sockets are stale.
    backend = restart_backend(&mut backend, dir.path(), &args, &[&con], &stats);
    let mut client = connect(&con);
    let mut lines = BufReader::new(client.try_clone().unwrap());
    if let Err(e) = expect_numbered_lines(&mut lines, 1, 300) {
        panic!("replay after restart: {e}\n{}", report(&[&guest], &backend));
    }
    client.write_all(b"GO\n").unwrap();
    match guest.wait_exit(SHORT_RUN) {
        Ok(run) => {
            assert_eq!(run.exit_code, 0, "{}", report(&[&guest], &backend));
            if let Err(e) = expect_numbered_lines(&mut lines, 301, 310) {
                panic!("after reconnect: {e}\n{}", report(&[&guest], &backend));
            }
        }
        Err(e) => {
            let stderr = guest.qemu_stderr();
            assert!(
                stderr.contains("vhost_dev_start: Assertion `hdev->vhost_ops' failed"),
                "QEMU ended in an unexpected way: {e}\n{}",
                report(&[&guest], &backend)
            );
            eprintln!(
                "virtio restart: QEMU 11 aborted when the restarted backend connected \
                 (vhost-user-base cannot reconnect); the accepted output was replayed"
            );
        }
    }
}

/// On a QEMU without a user-creatable generic vhost-user device (before 10.2): the backend's
/// `--print-qemu-args` refuses a virtio VM and points to stream mode; QEMU itself refuses the
/// device; and the README's compatibility table says so for this version.
fn virtio_console_device_is_not_creatable(qemu: &MatrixQemu) {
    assert_eq!(
        qemu.version.generic_vhost_user_device(),
        None,
        "QEMU {} has the device: run the virtio tests on it instead",
        qemu.version
    );
    let dir = ScratchDir::new("console-no-device").unwrap();
    let sock = dir.path().join("vm.sock");
    let args: Vec<String> = vec![
        "--vm".into(),
        format!("a={}", s(&sock)),
        "-p".into(),
        format!("a/console=file:{}", s(&dir.path().join("console.log"))),
    ];

    // 1. The backend will not print options this QEMU would refuse.
    let bin = devshare_integration::workspace::binary("vhost-user-console").unwrap();
    let out = std::process::Command::new(bin)
        .args(&args)
        .arg("--print-qemu-args")
        .args(qemu.print_args())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "QEMU {} cannot plug a vhost-user virtio-console",
            qemu.version
        )) && stderr.contains("--vm a=SOCKET,stream"),
        "{stderr}"
    );

    // 2. QEMU refuses both generic vhost-user devices, with the backend listening.
    let backend = start_backend(dir.path(), &args, &sock);
    for device in ["vhost-user-test-device-pci", "vhost-user-device-pci"] {
        let out = std::process::Command::new(qemu.path())
            .args(["-S", "-display", "none", "-nodefaults", "-monitor", "none"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-machine", "q35,memory-backend=mem", "-m", "256M"])
            .arg("-chardev")
            .arg(format!("socket,id=con0,path={}", s(&sock)))
            .arg("-device")
            .arg(format!(
                "{device},chardev=con0,virtio-id=3,num_vqs=2,config_size=12"
            ))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "QEMU {} created {device}:\n{err}\n{}",
            qemu.version,
            backend.log()
        );
        // 7.2 has neither device; 10.0 has vhost-user-device-pci but will not create it.
        assert!(
            err.contains(&format!("'{device}' is not a valid device model name"))
                || (device == "vhost-user-device-pci"
                    && err.contains("expects a pluggable device type")),
            "QEMU {} refused {device} for another reason:\n{err}",
            qemu.version
        );
        eprintln!(
            "QEMU {}: -device {device}: {}",
            qemu.version,
            err.lines().last().unwrap_or("").trim()
        );
    }

    // 3. The README's table says this QEMU has no vhost-user console.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let row = compatibility_row(&readme, qemu.name)
        .unwrap_or_else(|| panic!("no compatibility-table row for QEMU {}", qemu.name));
    assert!(
        row.get(1)
            .is_some_and(|cell| cell.contains("not creatable")),
        "README's vhost-user console cell for QEMU {} does not say 'not creatable': {row:?}",
        qemu.name
    );
}

/// The cells of the README compatibility table's row for QEMU `version` (the first cell,
/// e.g. `7.2 (bookworm)`, starts with the version).
fn compatibility_row(readme: &str, version: &str) -> Option<Vec<String>> {
    let table = &readme[readme.find("## Which QEMU supports what")?..];
    table.lines().find_map(|line| {
        let cells: Vec<String> = line
            .trim()
            .strip_prefix('|')?
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        let first = cells.first()?;
        let rest = first.strip_prefix(version)?;
        (rest.is_empty() || rest.starts_with(' ')).then_some(cells)
    })
}

qemu_matrix! {
    qemu_7_2("7.2"): [
        stream_mode_serial_port_carries_both_ways,
        virtio_console_device_is_not_creatable,
    ];
    qemu_10_0("10.0"): [
        stream_mode_serial_port_carries_both_ways,
        virtio_console_device_is_not_creatable,
    ];
    qemu_11_1("11.1"): [
        stream_mode_serial_port_carries_both_ways,
        console_on_pty_and_named_port_on_unix_socket_carry_both_ways,
    ];
}
