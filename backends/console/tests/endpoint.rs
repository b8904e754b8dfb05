//! Endpoints against real PTYs, sockets, files and a PTY pair standing in for a serial port.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vhost_user_console::endpoint::{
    DataBits, Endpoint, EndpointError, EndpointSpec, FlowControl, Parity, Readiness, StopBits,
    WatchRole,
};

/// A per-test scratch directory, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("endpoint-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(spec: &str) -> Endpoint {
    let spec: EndpointSpec = spec.parse().unwrap_or_else(|e| panic!("{e}"));
    Endpoint::open(&spec).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `fd` is readable; the long timeout only keeps a broken build from hanging.
fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 20_000) };
    assert_eq!(n, 1, "fd {fd} never became readable");
}

/// Reads from the endpoint until `want` bytes arrived, driving it like the engine does.
fn read_from_endpoint(ep: &mut Endpoint, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let fd = ep.input_fd().expect("no input fd").as_raw_fd();
        wait_readable(fd);
        assert_eq!(ep.on_readable(fd).unwrap(), Readiness::Input);
        let mut buf = [0u8; 256];
        let n = ep.read_input(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Reads exactly `want` bytes from a (possibly non-blocking) fd.
fn read_exact_fd(fd: BorrowedFd<'_>, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        wait_readable(fd.as_raw_fd());
        let mut buf = [0u8; 256];
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n > 0, "read gave {n}: {}", std::io::Error::last_os_error());
        got.extend_from_slice(&buf[..n as usize]);
    }
    got
}

fn write_fd(fd: BorrowedFd<'_>, data: &[u8]) {
    // SAFETY: data is valid for reads of its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    assert_eq!(
        n,
        data.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

#[track_caller]
fn write_all_output(ep: &mut Endpoint, bufs: &[IoSlice<'_>]) {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    match ep.write_output(bufs) {
        Ok(n) => assert_eq!(n, total),
        Err(e) => panic!("write_output: {e:?}"),
    }
}

fn open_slave(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap()
}

#[test]
fn pty_carries_bytes_unchanged_both_ways_and_reports_window_size() {
    let scratch = Scratch::new("pty");
    let link = scratch.path("console");
    // A stale link from an earlier run is replaced.
    std::os::unix::fs::symlink("/dev/pts/nonexistent", &link).unwrap();
    let mut ep = open(&format!("pty:{}", link.display()));
    let slave_path = ep.pty_path().unwrap().to_path_buf();
    assert!(
        slave_path.starts_with("/dev/pts"),
        "{}",
        slave_path.display()
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), slave_path);
    assert_eq!(
        ep.describe(),
        format!("pty {} (link {})", slave_path.display(), link.display())
    );
    assert!(ep.is_attached());
    assert_eq!(ep.window_size(), None);

    let program = open_slave(&link);
    // Guest output, in two iovecs; \r and \n must not be translated (raw mode).
    write_all_output(
        &mut ep,
        &[IoSlice::new(b"boot\r\n"), IoSlice::new(b"login: ")],
    );
    assert_eq!(read_exact_fd(program.as_fd(), 13), b"boot\r\nlogin: ");
    // Nothing is echoed back towards the guest.
    let mut buf = [0u8; 16];
    assert_eq!(ep.read_input(&mut buf).unwrap(), 0);

    (&program).write_all(b"root\n\x03\x7f").unwrap();
    assert_eq!(read_from_endpoint(&mut ep, 7), b"root\n\x03\x7f");

    let ws = libc::winsize {
        ws_row: 43,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    let rc = unsafe { libc::ioctl(program.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    assert_eq!(ep.window_size(), Some((132, 43)));

    // With the program gone the master still works (we hold the slave): no EIO, no detach.
    drop(program);
    assert_eq!(ep.read_input(&mut buf).unwrap(), 0);
    write_all_output(&mut ep, &[IoSlice::new(b"still here")]);
    let program = open_slave(&slave_path);
    assert_eq!(read_exact_fd(program.as_fd(), 10), b"still here");

    drop(ep);
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "link not removed"
    );
}

#[test]
fn pty_link_never_replaces_a_regular_file() {
    let scratch = Scratch::new("pty-file");
    let link = scratch.path("console");
    std::fs::write(&link, "keep me").unwrap();
    let spec: EndpointSpec = format!("pty:{}", link.display()).parse().unwrap();
    let e = Endpoint::open(&spec).unwrap_err();
    assert!(matches!(e, EndpointError::PtyLink { .. }));
    assert!(e.to_string().contains(&link.display().to_string()), "{e}");
    assert_eq!(std::fs::read_to_string(&link).unwrap(), "keep me");
}

/// How a listener learns that a client closed: a Unix peer's close is a hang-up the kernel
/// reports; a TCP peer's close looks like the end of its input (a FIN) until a write fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CloseSeen {
    HangUp,
    EndOfInput,
}

/// The listener flow shared by unix and tcp: connect, data both ways, refuse a second
/// client, detach on close, accept a new client.
fn exercise_listener<S: Read + Write + AsRawFd>(
    ep: &mut Endpoint,
    close: CloseSeen,
    connect: impl Fn() -> S,
) {
    let listen_fd = ep.watch_fds()[0];
    assert_eq!(ep.watch_fds(), vec![listen_fd]);
    assert!(!ep.is_attached());
    assert!(ep.input_fd().is_none());
    let e = ep.write_output(&[IoSlice::new(b"x")]).unwrap_err();
    assert!(matches!(e, EndpointError::NotAttached { .. }), "{e}");

    let mut first = connect();
    wait_readable(listen_fd);
    assert_eq!(ep.on_readable(listen_fd).unwrap(), Readiness::Connected);
    assert!(ep.is_attached());
    let client_fd = ep.input_fd().unwrap().as_raw_fd();
    assert_eq!(ep.watch_fds(), vec![listen_fd, client_fd]);
    assert_eq!(ep.output_fd().unwrap().as_raw_fd(), client_fd);
    assert_eq!(
        ep.watch_set()[1].unwrap().role,
        WatchRole::Data { read_hang_up: true },
        "a client's half-close must be asked for"
    );

    write_all_output(ep, &[IoSlice::new(b"to "), IoSlice::new(b"host\n")]);
    let mut buf = [0u8; 8];
    first.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to host\n");
    first.write_all(b"to guest").unwrap();
    assert_eq!(read_from_endpoint(ep, 8), b"to guest");

    let mut second = connect();
    wait_readable(listen_fd);
    assert_eq!(ep.on_readable(listen_fd).unwrap(), Readiness::Refused);
    let mut refused = Vec::new();
    second.read_to_end(&mut refused).unwrap();
    assert_eq!(refused, b"port busy\n");
    // The first client is untouched.
    assert_eq!(ep.input_fd().unwrap().as_raw_fd(), client_fd);
    write_all_output(ep, &[IoSlice::new(b"ok")]);
    let mut ok = [0u8; 2];
    first.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"ok");

    drop(first);
    wait_readable(client_fd);
    assert_eq!(ep.on_readable(client_fd).unwrap(), Readiness::Input);
    let mut buf = [0u8; 8];
    match close {
        CloseSeen::HangUp => {
            let e = ep.read_input(&mut buf).unwrap_err();
            assert!(matches!(e, EndpointError::Detached { .. }), "{e}");
            assert!(!ep.is_attached());
            assert_eq!(ep.watch_fds(), vec![listen_fd]);
        }
        CloseSeen::EndOfInput => {
            // Only its input ended, as far as TCP can tell: it stays for output...
            assert_eq!(ep.read_input(&mut buf).unwrap(), 0);
            assert!(ep.is_attached());
            assert!(ep.input_fd().is_none(), "input that ended is read no more");
            assert_eq!(ep.output_fd().unwrap().as_raw_fd(), client_fd);
            assert_eq!(
                ep.watch_set()[1].unwrap().role,
                WatchRole::Data {
                    read_hang_up: false
                }
            );
        }
    }
    ep.close_retired();

    // ...and a new client takes the port over from a client whose input ended.
    let mut third = connect();
    wait_readable(listen_fd);
    assert_eq!(ep.on_readable(listen_fd).unwrap(), Readiness::Connected);
    ep.close_retired();
    third.write_all(b"again").unwrap();
    assert_eq!(read_from_endpoint(ep, 5), b"again");
    // The engine's own detach drops the client too, once the event loop let go of its fd.
    ep.detach();
    assert!(!ep.is_attached());
    ep.close_retired();
    let mut rest = Vec::new();
    third.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// A client that shut down its sending side still gets output until it closes.
fn half_closed_client_keeps_getting_output<S: Read + Write + AsRawFd>(
    ep: &mut Endpoint,
    connect: impl Fn() -> S,
    shutdown_write: impl Fn(&S),
) {
    let listen_fd = ep.watch_fds()[0];
    let mut client = connect();
    wait_readable(listen_fd);
    assert_eq!(ep.on_readable(listen_fd).unwrap(), Readiness::Connected);
    let fd = ep.input_fd().unwrap().as_raw_fd();
    client.write_all(b"cmd\n").unwrap();
    shutdown_write(&client);
    assert_eq!(read_from_endpoint(ep, 4), b"cmd\n");
    wait_readable(fd);
    let mut buf = [0u8; 8];
    assert_eq!(ep.read_input(&mut buf).unwrap(), 0, "end of its input");
    assert!(ep.is_attached(), "a half-closed client was dropped");
    write_all_output(ep, &[IoSlice::new(b"answer\n")]);
    let mut got = [0u8; 7];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"answer\n");
    ep.detach();
    ep.close_retired();
}

#[test]
fn unix_listener_serves_one_client_at_a_time() {
    let scratch = Scratch::new("unix");
    let path = scratch.path("console.sock");
    // A socket file left by an earlier run (nobody listening) is removed.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut ep = open(&format!("unix:{}", path.display()));
    assert_eq!(
        ep.describe(),
        format!("unix {} (no client)", path.display())
    );

    exercise_listener(&mut ep, CloseSeen::HangUp, || {
        UnixStream::connect(&path).unwrap()
    });
    half_closed_client_keeps_getting_output(
        &mut ep,
        || UnixStream::connect(&path).unwrap(),
        |c| c.shutdown(std::net::Shutdown::Write).unwrap(),
    );

    // A peer that closed makes the next write fail as "client gone", detaching it.
    let peer = UnixStream::connect(&path).unwrap();
    let listen_fd = ep.watch_fds()[0];
    wait_readable(listen_fd);
    assert_eq!(ep.on_readable(listen_fd).unwrap(), Readiness::Connected);
    drop(peer);
    let e = ep.write_output(&[IoSlice::new(b"lost")]).unwrap_err();
    assert!(matches!(e, EndpointError::Detached { .. }), "{e}");
    assert!(!ep.is_attached());

    // A live listener is not taken over (its probe connection waits in the backlog).
    let spec: EndpointSpec = format!("unix:{}", path.display()).parse().unwrap();
    let e = Endpoint::open(&spec).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "unix endpoint: {} is served by another running process; stop it first or choose another path",
            path.display()
        )
    );

    drop(ep);
    assert!(!path.exists(), "socket file not removed");
}

#[test]
fn unix_listener_never_removes_a_regular_file() {
    let scratch = Scratch::new("unix-file");
    let path = scratch.path("not-a-socket");
    std::fs::write(&path, "data").unwrap();
    let spec: EndpointSpec = format!("unix:{}", path.display()).parse().unwrap();
    let e = Endpoint::open(&spec).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
}

#[test]
fn tcp_listener_serves_one_client_at_a_time() {
    let mut ep = open("tcp:0");
    let addr = ep.local_addr().unwrap();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    assert_eq!(ep.describe(), format!("tcp {addr} (no client)"));

    let client = TcpStream::connect(addr).unwrap();
    let listen_fd = ep.watch_fds()[0];
    wait_readable(listen_fd);
    assert_eq!(ep.on_readable(listen_fd).unwrap(), Readiness::Connected);
    assert_eq!(
        ep.describe(),
        format!("tcp {addr} (client {})", client.local_addr().unwrap())
    );
    let mut nodelay: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into a valid pointer with its length.
    let rc = unsafe {
        libc::getsockopt(
            ep.input_fd().unwrap().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&mut nodelay as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    assert_eq!(nodelay, 1, "TCP_NODELAY not set on the client");
    ep.detach();
    drop(client);

    exercise_listener(&mut ep, CloseSeen::EndOfInput, || {
        TcpStream::connect(addr).unwrap()
    });
    half_closed_client_keeps_getting_output(
        &mut ep,
        || TcpStream::connect(addr).unwrap(),
        |c| c.shutdown(std::net::Shutdown::Write).unwrap(),
    );
}

#[test]
fn tcp_bind_failure_names_the_address() {
    let ep = open("tcp:0");
    let addr = ep.local_addr().unwrap();
    let e = Endpoint::open(&EndpointSpec::Tcp(addr)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot listen on tcp {addr}: the address is in use by another process \
             (choose another port, or stop the other process)"
        )
    );
}

/// Checks `[YYYY-MM-DDTHH:MM:SS.mmmZ] ` at the start of `line` and returns the rest.
fn strip_stamp(line: &str) -> &str {
    let (stamp, rest) = line
        .split_at_checked(27)
        .unwrap_or_else(|| panic!("line too short for a timestamp: {line:?}"));
    let shape = stamp
        .bytes()
        .map(|b| if b.is_ascii_digit() { b'9' } else { b })
        .collect::<Vec<u8>>();
    assert_eq!(
        String::from_utf8(shape).unwrap(),
        "[9999-99-99T99:99:99.999Z] ",
        "bad stamp in {line:?}"
    );
    assert!(stamp >= "[2024-", "timestamp not near now: {line:?}");
    rest
}

#[test]
fn file_appends_with_timestamps_at_line_starts() {
    let scratch = Scratch::new("file-ts");
    let path = scratch.path("guest.log");
    std::fs::write(&path, "earlier run\n").unwrap();
    let mut ep = open(&format!("file:{},timestamps", path.display()));
    assert!(ep.is_attached());
    assert!(ep.watch_fds().is_empty());
    assert!(ep.input_fd().is_none());
    assert!(ep.output_fd().is_none());
    assert_eq!(
        ep.describe(),
        format!("file {} (timestamps)", path.display())
    );

    write_all_output(&mut ep, &[IoSlice::new(b"hel"), IoSlice::new(b"lo\nwor")]);
    write_all_output(&mut ep, &[IoSlice::new(b"ld\n")]);
    write_all_output(&mut ep, &[IoSlice::new(b"\npartial")]);
    write_all_output(&mut ep, &[IoSlice::new(b" line\n")]);

    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.split_inclusive('\n');
    assert_eq!(lines.next(), Some("earlier run\n"));
    let stamped: Vec<&str> = lines.map(strip_stamp).collect();
    assert_eq!(stamped, ["hello\n", "world\n", "\n", "partial line\n"]);
}

#[test]
fn file_without_timestamps_appends_bytes_as_they_are() {
    let scratch = Scratch::new("file");
    let path = scratch.path("sub-missing-file.log");
    {
        let mut ep = open(&format!("file:{}", path.display()));
        write_all_output(&mut ep, &[IoSlice::new(b"one\n"), IoSlice::new(b"tw")]);
    }
    // A second run appends, never truncates.
    let mut ep = open(&format!("file:{}", path.display()));
    write_all_output(&mut ep, &[IoSlice::new(b"o\n\x00\xff")]);
    assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n\x00\xff");

    let spec: EndpointSpec = "file:/nonexistent-dir/x.log".parse().unwrap();
    let e = Endpoint::open(&spec).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot open log file /nonexistent-dir/x.log: "),
        "{e}"
    );
}

/// A PTY pair standing in for a physical serial line: (far end, a device-side fd to read
/// termios back, device path).
fn serial_line_pair() -> (OwnedFd, File, PathBuf) {
    // SAFETY: plain flags; result checked.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: fresh fd owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: master is open.
    assert_eq!(unsafe { libc::grantpt(master.as_raw_fd()) }, 0);
    // SAFETY: master is open.
    assert_eq!(unsafe { libc::unlockpt(master.as_raw_fd()) }, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name within the buffer.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    assert_eq!(rc, 0);
    // SAFETY: NUL-terminated by ptsname_r.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let path = PathBuf::from(name.to_str().unwrap());
    let device = open_slave(&path);
    (master, device, path)
}

fn termios_of(fd: &File) -> libc::termios {
    // SAFETY: plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer, open fd.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

/// Opens `serial:DEVICE,OPTIONS` and checks the termios read back from the device with
/// tcgetattr: the baud rate, PARODD, CSTOPB, CRTSCTS and IXON/IXOFF always, CSIZE and
/// PARENB only where the driver keeps them (`full_uart`): the PTY driver forces CS8 and
/// clears PARENB on every termios change (drivers/tty/pty.c, pty_set_termios).
fn check_line_settings(device_path: &Path, options: &str, full_uart: bool) -> Endpoint {
    let ep = open(&format!("serial:{},{options}", device_path.display()));
    let EndpointSpec::Serial(asked) = format!("serial:{},{options}", device_path.display())
        .parse()
        .unwrap()
    else {
        panic!("not a serial spec");
    };
    let device = open_slave(device_path);
    let t = termios_of(&device);
    let code = [
        (9600, libc::B9600),
        (57_600, libc::B57600),
        (115_200, libc::B115200),
    ]
    .iter()
    .find(|(rate, _)| *rate == asked.baud)
    .map(|(_, code)| *code)
    .unwrap_or(libc::BOTHER);
    // SAFETY: reads a field of a valid termios.
    let speed = unsafe { libc::cfgetospeed(&t) };
    assert_eq!(speed, code, "speed for {options}");
    assert_eq!(
        t.c_cflag & libc::PARODD != 0,
        asked.parity == Parity::Odd,
        "PARODD for {options}"
    );
    assert_eq!(
        t.c_cflag & libc::CSTOPB != 0,
        asked.stop_bits == StopBits::Two,
        "CSTOPB for {options}"
    );
    assert_eq!(
        t.c_cflag & libc::CRTSCTS != 0,
        asked.flow == FlowControl::Hardware,
        "CRTSCTS for {options}"
    );
    let sw = asked.flow == FlowControl::Software;
    assert_eq!(t.c_iflag & libc::IXON != 0, sw, "IXON for {options}");
    assert_eq!(t.c_iflag & libc::IXOFF != 0, sw, "IXOFF for {options}");
    assert_eq!(
        t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "not raw"
    );
    let size = match asked.data_bits {
        DataBits::Five => libc::CS5,
        DataBits::Six => libc::CS6,
        DataBits::Seven => libc::CS7,
        DataBits::Eight => libc::CS8,
    };
    let read_back = ep.serial_line().unwrap().unwrap();
    if full_uart {
        assert_eq!(t.c_cflag & libc::CSIZE, size, "CSIZE for {options}");
        assert_eq!(
            t.c_cflag & libc::PARENB != 0,
            asked.parity != Parity::None,
            "PARENB for {options}"
        );
        assert_eq!(read_back, asked);
    } else {
        // What the PTY really runs, and serial_line() reports that rather than the request.
        assert_eq!(t.c_cflag & (libc::CSIZE | libc::PARENB), libc::CS8);
        let mut pty_line = asked.clone();
        pty_line.data_bits = DataBits::Eight;
        pty_line.parity = Parity::None;
        assert_eq!(read_back, pty_line);
    }
    assert_eq!(read_back.baud, asked.baud);
    ep
}

#[test]
fn serial_applies_line_settings_and_carries_data() {
    let (far_end, _device, path) = serial_line_pair();
    let mut ep = check_line_settings(&path, "baud=9600,data=7,parity=even,stop=2,flow=hw", false);
    assert_eq!(
        ep.describe(),
        format!("serial {} 9600 7E2 flow=hw", path.display())
    );

    // The fd must be non-blocking again after serialport's open.
    let fd = ep.input_fd().unwrap().as_raw_fd();
    // SAFETY: F_GETFL on an open fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0, "O_NONBLOCK not restored");
    assert_eq!(ep.watch_fds(), vec![fd]);
    assert_eq!(ep.output_fd().unwrap().as_raw_fd(), fd);
    let mut buf = [0u8; 8];
    assert_eq!(ep.read_input(&mut buf).unwrap(), 0);

    // Raw both ways: CR and LF pass untranslated.
    write_all_output(&mut ep, &[IoSlice::new(b"AT\r"), IoSlice::new(b"\n")]);
    assert_eq!(read_exact_fd(far_end.as_fd(), 4), b"AT\r\n");
    write_fd(far_end.as_fd(), b"OK\r\n");
    assert_eq!(read_from_endpoint(&mut ep, 4), b"OK\r\n");

    // The line hangs up (cable pulled): the endpoint closes the device.
    drop(far_end);
    wait_readable(fd);
    let e = ep.read_input(&mut buf).unwrap_err();
    assert!(matches!(e, EndpointError::Detached { .. }), "{e}");
    assert!(!ep.is_attached());
    assert!(ep.watch_fds().is_empty());
    assert!(ep.serial_line().is_none());
    assert!(ep.describe().ends_with("(closed)"), "{}", ep.describe());
    // The device node is gone with its PTY: reopening fails and names it.
    let e = ep.reopen().unwrap_err();
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

#[test]
fn serial_reopens_after_a_hang_up() {
    let (far_end, device, path) = serial_line_pair();
    let mut ep = open(&format!("serial:{},baud=9600", path.display()));
    assert!(!ep.reopen().unwrap(), "nothing to reopen while open");
    // Hang the line up the way a modem drop does; the device node stays.
    // SAFETY: TIOCVHANGUP takes no argument; the fd is open.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), libc::TIOCVHANGUP) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let fd = ep.input_fd().unwrap().as_raw_fd();
    wait_readable(fd);
    let mut buf = [0u8; 8];
    let e = ep.read_input(&mut buf).unwrap_err();
    assert!(matches!(e, EndpointError::Detached { .. }), "{e}");
    assert!(!ep.is_attached());
    let e = ep.write_output(&[IoSlice::new(b"x")]).unwrap_err();
    assert!(matches!(e, EndpointError::NotAttached { .. }), "{e}");

    assert!(ep.reopen().unwrap());
    assert!(ep.is_attached());
    let line = ep.serial_line().unwrap().unwrap();
    assert_eq!(line.baud, 9600);
    write_all_output(&mut ep, &[IoSlice::new(b"back")]);
    assert_eq!(read_exact_fd(far_end.as_fd(), 4), b"back");
    write_fd(far_end.as_fd(), b"up");
    assert_eq!(read_from_endpoint(&mut ep, 2), b"up");
}

#[test]
fn serial_other_line_settings_read_back() {
    let (far_end, _device, path) = serial_line_pair();
    for options in [
        "baud=57600,parity=odd,flow=sw",
        "data=8",
        "baud=250000,data=5,parity=none,stop=2,flow=none",
        "baud=115200,data=6,parity=odd,stop=1,flow=hw",
    ] {
        let mut ep = check_line_settings(&path, options, false);
        write_all_output(&mut ep, &[IoSlice::new(options.as_bytes())]);
        assert_eq!(
            read_exact_fd(far_end.as_fd(), options.len()),
            options.as_bytes()
        );
    }
}

/// Real UART: `DEVSHARE_TEST_SERIAL=/dev/ttyUSB0 cargo test -p vhost-user-console --test
/// endpoint -- --ignored`. Checks CSIZE and PARENB too, which a PTY cannot hold.
#[test]
#[ignore = "needs a real serial device in DEVSHARE_TEST_SERIAL"]
fn serial_line_settings_on_a_real_uart() {
    let device = std::env::var_os("DEVSHARE_TEST_SERIAL")
        .map(PathBuf::from)
        .expect("set DEVSHARE_TEST_SERIAL to a serial device nothing else uses");
    for options in [
        "baud=9600,data=7,parity=even,stop=2,flow=hw",
        "baud=57600,data=8,parity=odd,stop=1,flow=sw",
        "baud=115200,data=5,parity=none,stop=1,flow=none",
    ] {
        drop(check_line_settings(&device, options, true));
    }
}

#[test]
fn serial_open_failure_names_the_device() {
    let spec: EndpointSpec = "serial:/dev/nonexistent-tty".parse().unwrap();
    let e = Endpoint::open(&spec).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot open serial device /dev/nonexistent-tty: "),
        "{e}"
    );
}

#[test]
fn another_users_symlink_at_a_pty_link_is_left_alone() {
    let scratch = Scratch::new("pty-theirs");
    let link = scratch.path("console");
    std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let spec: EndpointSpec = format!("pty:{}", link.display()).parse().unwrap();
    let e = Endpoint::open(&spec).err().unwrap().to_string();
    assert!(e.contains("another user's symlink"), "{e}");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("/etc/hostname")
    );
}

#[test]
fn pty_settings_changed_by_a_program_are_put_back_to_raw_before_guest_output() {
    let scratch = Scratch::new("pty-stty");
    let link = scratch.path("console");
    let mut ep = open(&format!("pty:{}", link.display()));
    let program = open_slave(&link);
    // What `stty -F LINK echo icanon icrnl onlcr` does.
    // SAFETY: termios is plain data; tcgetattr fills it from an open terminal.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(program.as_raw_fd(), &mut t) }, 0);
    t.c_lflag |= libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN;
    t.c_iflag |= libc::ICRNL;
    t.c_oflag |= libc::OPOST | libc::ONLCR;
    // SAFETY: valid fd and termios.
    let rc = unsafe { libc::tcsetattr(program.as_raw_fd(), libc::TCSANOW, &t) };
    assert_eq!(rc, 0);
    write_all_output(&mut ep, &[IoSlice::new(b"guest says hi\r\n")]);
    // Unchanged (no CR -> NL), and once the program has it the line discipline is done with
    // it: nothing was echoed back towards the guest.
    assert_eq!(read_exact_fd(program.as_fd(), 15), b"guest says hi\r\n");
    let mut buf = [0u8; 64];
    assert_eq!(ep.read_input(&mut buf).unwrap(), 0, "{:?}", &buf[..]);
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(program.as_raw_fd(), &mut t) }, 0);
    assert_eq!(t.c_lflag & (libc::ECHO | libc::ICANON), 0, "raw again");
}
