//! Hang-ups and errors on every endpoint fd, in every state of the guest side, with the real
//! backend process: stream mode with QEMU's socket not connected and connected (the test
//! plays QEMU's `-chardev socket`), virtio mode with no front-end, with the port closed, with
//! the port open but no receive buffers, and open with buffers (the frontend harness plays
//! the guest driver); Unix and TCP clients that close, half-close, reset, or leave input
//! behind; PTY users that close the terminal or hang it up; a serial device that goes away
//! and comes back.
//!
//! After every hang-up the backend must burn (next to) no CPU
//! ([`Console::assert_quiet`]: a window defined by this thread's own work, not by time), and
//! the next client must be served. Readiness comes from the stats socket (`attached`,
//! `reopens`, byte counters) and the backend's log, never from sleeping.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use devshare_integration::console_backend::{Console, WAIT};
use devshare_integration::console_guest::*;

fn unix_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn tcp_client(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn read_n(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).unwrap();
    v
}

/// How a client leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// close(): nothing sent.
    Close,
    /// Sends a line, then closes (the input may not be taken by the guest).
    CloseAfterInput,
    /// shutdown(SHUT_WR), then close().
    HalfThenClose,
}

const LEAVES: [Leave; 3] = [Leave::Close, Leave::CloseAfterInput, Leave::HalfThenClose];

/// A Unix client attaches to `vm/port` at `sock` and leaves as `how`; returns once the
/// backend shows it gone.
fn unix_client_leaves(c: &Console, vm: &str, port: &str, sock: &str, how: Leave) {
    let mut s = unix_client(&c.path(sock));
    c.wait_stat(vm, port, "attached", 1);
    match how {
        Leave::Close => {}
        Leave::CloseAfterInput => s.write_all(b"left behind\n").unwrap(),
        Leave::HalfThenClose => {
            let n = c.log_count("shut down its sending side");
            s.shutdown(Shutdown::Write).unwrap();
            c.wait_log_n("shut down its sending side", n + 1);
        }
    }
    drop(s);
    c.wait_stat(vm, port, "attached", 0);
}

/// Sets SO_LINGER to 0, so that close() sends a reset instead of a FIN.
fn reset_on_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one linger struct from a valid pointer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

/// Stream mode, `unix:` endpoint. The reproduction first: a client connects and
/// disconnects while QEMU is not connected (it used to spin a core and make every later
/// client `port busy`).
#[test]
fn stream_unix_client_hang_ups_cost_no_cpu_and_the_next_client_is_served() {
    let mut c = Console::start(
        "hup-stream-unix",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
        ],
        &["s.sock", "c.sock"],
    );
    for how in LEAVES {
        unix_client_leaves(&c, "s", "serial", "c.sock", how);
        c.assert_quiet(&format!("stream, QEMU not connected, client: {how:?}"));
    }

    // The next client is served both ways once QEMU connects.
    let mut client = unix_client(&c.path("c.sock"));
    c.wait_stat("s", "serial", "attached", 1);
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(b"guest says hi\n").unwrap();
    assert_eq!(read_n(&mut client, 14), b"guest says hi\n");
    client.write_all(b"host says hi\n").unwrap();
    assert_eq!(read_n(&mut qemu, 13), b"host says hi\n");

    // QEMU connected: a client's last input still reaches the guest when it leaves.
    client.write_all(b"last words\n").unwrap();
    drop(client);
    assert_eq!(read_n(&mut qemu, 11), b"last words\n");
    c.wait_stat("s", "serial", "attached", 0);
    c.assert_quiet("stream, QEMU connected, client closed after input");
    for how in LEAVES {
        unix_client_leaves(&c, "s", "serial", "c.sock", how);
        c.assert_quiet(&format!("stream, QEMU connected, client: {how:?}"));
    }
    // Output with nobody attached is kept and replayed to the next client.
    qemu.write_all(b"kept\n").unwrap();
    c.wait_stat("s", "serial", "buffered_bytes", 5);
    let mut next = unix_client(&c.path("c.sock"));
    assert_eq!(read_n(&mut next, 5), b"kept\n");

    // QEMU itself hangs up: the stream socket is let go of as well.
    drop(qemu);
    c.wait_log("QEMU went away");
    c.assert_quiet("stream, QEMU gone, client attached");
    let mut qemu = unix_client(&c.path("s.sock"));
    next.write_all(b"again\n").unwrap();
    assert_eq!(read_n(&mut qemu, 6), b"again\n");
}

/// Stream mode, `tcp:` endpoint: a TCP client's close is only a FIN (its input ended) until
/// a write fails, so the backend takes the half-close and lets the next client take over; a
/// reset is a hang-up.
#[test]
fn stream_tcp_client_hang_ups_cost_no_cpu_and_the_next_client_takes_over() {
    let mut c = Console::start(
        "hup-stream-tcp",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=tcp:127.0.0.1:0",
        ],
        &["s.sock"],
    );
    let port = c.tcp_port("127.0.0.1");
    let closes = |c: &Console| c.log_count("shut down its sending side");

    // QEMU not connected: a client closes (FIN).
    let n = closes(&c);
    let s = tcp_client(port);
    c.wait_stat("s", "serial", "attached", 1);
    drop(s);
    c.wait_log_n("shut down its sending side", n + 1);
    c.assert_quiet("stream, QEMU not connected, TCP client closed");
    // A reset (SO_LINGER 0) is seen as a hang-up.
    let s = tcp_client(port);
    c.wait_log("takes the port over");
    reset_on_close(&s);
    drop(s);
    c.wait_stat("s", "serial", "attached", 0);
    c.assert_quiet("stream, QEMU not connected, TCP client reset");
    // A client that leaves input behind and closes.
    let n = closes(&c);
    let mut s = tcp_client(port);
    c.wait_stat("s", "serial", "attached", 1);
    s.write_all(b"left behind\n").unwrap();
    drop(s);
    c.wait_log_n("shut down its sending side", n + 1);
    c.assert_quiet("stream, QEMU not connected, TCP client closed after input");

    // The next client takes over and is served both ways.
    let taken = c.log_count("takes the port over");
    let mut client = tcp_client(port);
    c.wait_log_n("takes the port over", taken + 1);
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(b"guest says hi\n").unwrap();
    assert_eq!(read_n(&mut client, 14), b"guest says hi\n");
    client.write_all(b"host says hi\n").unwrap();
    assert_eq!(read_n(&mut qemu, 13), b"host says hi\n");

    // QEMU connected: close after input; the input reaches the guest.
    let n = closes(&c);
    client.write_all(b"last words\n").unwrap();
    drop(client);
    assert_eq!(read_n(&mut qemu, 11), b"last words\n");
    c.wait_log_n("shut down its sending side", n + 1);
    c.assert_quiet("stream, QEMU connected, TCP client closed after input");
    let s = tcp_client(port);
    c.wait_log_n("takes the port over", taken + 2);
    reset_on_close(&s);
    drop(s);
    c.wait_stat("s", "serial", "attached", 0);
    c.assert_quiet("stream, QEMU connected, TCP client reset");
    let mut next = tcp_client(port);
    c.wait_stat("s", "serial", "attached", 1);
    qemu.write_all(b"served\n").unwrap();
    assert_eq!(read_n(&mut next, 7), b"served\n");
}

/// A client that sends its input and shuts down its sending side (`printf 'cmd\n' | socat
/// -t3 - ...`) gets the guest's answer, on Unix and TCP endpoints, in stream and virtio mode.
#[test]
fn half_closed_clients_get_the_answer_until_they_close() {
    let c = Console::start(
        "hup-half-close",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
            "--vm",
            "t={dir}/t.sock,stream",
            "-p",
            "t/serial=tcp:127.0.0.1:0",
            "--vm",
            "v={dir}/v.sock",
            "-p",
            "v/console=unix:{dir}/con.sock",
            "-p",
            "v/data=tcp:127.0.0.1:0",
        ],
        &["s.sock", "t.sock", "v.sock", "c.sock", "con.sock"],
    );
    let tcp_t = c.tcp_port("127.0.0.1");
    let log = c.process.log();
    let tcp_v = log
        .match_indices("console endpoint ready: tcp 127.0.0.1:")
        .filter_map(|(i, m)| {
            log[i + m.len()..]
                .split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse::<u16>()
                .ok()
        })
        .find(|p| *p != tcp_t)
        .unwrap_or_else(|| panic!("second TCP port not logged:\n{log}"));

    // Readiness: the backend took the end of the client's input, whatever it made of it
    // (it must keep the client: a client dropped here never gets the answer).
    let took_eof = |c: &Console, before: &[usize]| {
        c.wait_log_change(&["shut down its sending side", "detached"], before)
    };
    let counts = |c: &Console| {
        [
            c.log_count("shut down its sending side"),
            c.log_count("detached"),
        ]
    };
    // Stream, Unix.
    let mut qemu = unix_client(&c.path("s.sock"));
    let mut client = unix_client(&c.path("c.sock"));
    let before = counts(&c);
    client.write_all(b"cmd\n").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_n(&mut qemu, 4), b"cmd\n");
    took_eof(&c, &before);
    qemu.write_all(b"answer\n").unwrap();
    assert_eq!(read_n(&mut client, 7), b"answer\n");
    assert_eq!(c.stat("s", "serial", "buffered_bytes"), 0);

    // Stream, TCP.
    let mut qemu = unix_client(&c.path("t.sock"));
    let mut client = tcp_client(tcp_t);
    let before = counts(&c);
    client.write_all(b"cmd\n").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_n(&mut qemu, 4), b"cmd\n");
    took_eof(&c, &before);
    qemu.write_all(b"answer\n").unwrap();
    assert_eq!(read_n(&mut client, 7), b"answer\n");

    // Virtio, TCP data port.
    let mut g = ConsoleGuest::connect(c.path("v.sock"), GuestOptions::default()).unwrap();
    g.bring_up(2).unwrap();
    g.post_rx(1, 4, 256, 1).unwrap();
    let mut client = tcp_client(tcp_v);
    let before = counts(&c);
    client.write_all(b"cmd\n").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(g.recv_exact(1, 4, WAIT).unwrap(), b"cmd\n");
    took_eof(&c, &before);
    g.send(1, b"answer\n", 1).unwrap();
    assert_eq!(read_n(&mut client, 7), b"answer\n");
    assert_eq!(c.stat("v", "data", "buffered_bytes"), 0);
}

/// Virtio mode through the harness: no front-end, port closed, port open without receive
/// buffers, port open with buffers.
#[test]
fn virtio_client_hang_ups_cost_no_cpu_in_every_port_state() {
    let mut c = Console::start(
        "hup-virtio",
        &[
            "--vm",
            "v={dir}/v.sock",
            "-p",
            "v/console=unix:{dir}/con.sock",
            "-p",
            "v/data=unix:{dir}/data.sock",
            "-p",
            "v/net=tcp:127.0.0.1:0",
        ],
        &["v.sock", "con.sock", "data.sock"],
    );
    let tcp = c.tcp_port("127.0.0.1");
    let tcp_leaves = |c: &Console| {
        let n = c.log_count("shut down its sending side");
        let s = tcp_client(tcp);
        c.wait_stat("v", "net", "attached", 1);
        drop(s);
        c.wait_log_n("shut down its sending side", n + 1);
    };

    for how in LEAVES {
        unix_client_leaves(&c, "v", "data", "data.sock", how);
        c.assert_quiet(&format!("virtio, no front-end, client: {how:?}"));
    }
    tcp_leaves(&c);
    c.assert_quiet("virtio, no front-end, TCP client closed");

    // A guest driver with the data ports closed (nothing opened them).
    let mut g = ConsoleGuest::connect(c.path("v.sock"), GuestOptions::default()).unwrap();
    g.bring_up_opening(3, &[0]).unwrap();
    for how in LEAVES {
        unix_client_leaves(&c, "v", "data", "data.sock", how);
        c.assert_quiet(&format!("virtio, port closed, client: {how:?}"));
    }
    tcp_leaves(&c);
    c.assert_quiet("virtio, port closed, TCP client closed");

    // Port open, no receive buffer posted yet.
    g.send_control(1, PORT_OPEN, 1).unwrap();
    g.send_control(2, PORT_OPEN, 1).unwrap();
    for how in LEAVES {
        unix_client_leaves(&c, "v", "data", "data.sock", how);
        c.assert_quiet(&format!(
            "virtio, port open without buffers, client: {how:?}"
        ));
    }
    tcp_leaves(&c);
    c.assert_quiet("virtio, port open without buffers, TCP client closed");

    // Port open with buffers: a client's last input reaches the guest.
    g.post_rx(1, 8, 256, 1).unwrap();
    let mut s = unix_client(&c.path("data.sock"));
    c.wait_stat("v", "data", "attached", 1);
    s.write_all(b"last words\n").unwrap();
    drop(s);
    assert_eq!(g.recv_exact(1, 11, WAIT).unwrap(), b"last words\n");
    c.wait_stat("v", "data", "attached", 0);
    c.assert_quiet("virtio, port open with buffers, client closed after input");
    for how in LEAVES {
        unix_client_leaves(&c, "v", "data", "data.sock", how);
        if let Leave::CloseAfterInput = how {
            // Input is wanted here: what the client sent before it left goes in.
            assert_eq!(g.recv_exact(1, 12, WAIT).unwrap(), b"left behind\n");
        }
        c.assert_quiet(&format!("virtio, port open with buffers, client: {how:?}"));
    }

    // The next client is served both ways, and gets what was kept meanwhile.
    g.send(1, b"kept\n", 1).unwrap();
    c.wait_stat("v", "data", "buffered_bytes", 5);
    let mut next = unix_client(&c.path("data.sock"));
    assert_eq!(read_n(&mut next, 5), b"kept\n");
    next.write_all(b"typed\n").unwrap();
    assert_eq!(g.recv_exact(1, 6, WAIT).unwrap(), b"typed\n");
    let taken = c.log_count("takes the port over");
    let mut tcp_next = tcp_client(tcp);
    c.wait_log_n("takes the port over", taken + 1);
    g.send(2, b"over tcp\n", 1).unwrap();
    assert_eq!(read_n(&mut tcp_next, 9), b"over tcp\n");

    // The front-end goes away with clients attached: nothing spins either.
    drop(g);
    c.wait_log_change(
        &["v: front-end disconnected", "v: connection ended"],
        &[0, 0],
    );
    c.assert_quiet("virtio, front-end gone, clients attached");
}

/// Opens the PTY behind `link` as a terminal program would.
fn open_tty(link: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(link)
        .unwrap_or_else(|e| panic!("{}: {e}", link.display()))
}

fn termios_of(f: &File) -> libc::termios {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer, open fd.
    assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
    t
}

/// A console on a PTY: a user closes the terminal and another opens it later; a user hangs
/// the terminal up (`vhangup()`, as a getty does), which resets it to cooked mode with echo:
/// the backend opens it again in raw mode, and guest output is not echoed back to the guest.
#[test]
fn pty_users_come_and_go_and_a_hang_up_leaves_the_terminal_raw() {
    let mut c = Console::start(
        "hup-pty",
        &[
            "--vm",
            "p={dir}/p.sock",
            "-p",
            "p/console=pty:{dir}/con.pty",
            "-p",
            "p/data=unix:{dir}/data.sock",
        ],
        &["p.sock", "con.pty"],
    );
    let link = c.path("con.pty");
    let mut g = ConsoleGuest::connect(c.path("p.sock"), GuestOptions::default()).unwrap();
    g.bring_up(2).unwrap();
    g.post_rx(0, 8, 256, 1).unwrap();

    // A user comes and goes; the next one is served.
    let tty = open_tty(&link);
    drop(tty);
    c.assert_quiet("pty, the last user closed the terminal");
    let mut tty = open_tty(&link);
    g.send(0, b"hello\n", 1).unwrap();
    assert_eq!(read_n(&mut tty, 6), b"hello\n");

    // A user hangs the terminal up.
    // SAFETY: TIOCVHANGUP takes no argument; the fd is open.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCVHANGUP) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    drop(tty);
    c.wait_stat("p", "console", "reopens", 1);
    c.wait_log("the terminal was hung up");
    c.assert_quiet("pty, terminal hung up");

    // The next user finds it raw; guest output is not echoed into the guest.
    let mut tty = open_tty(&link);
    let t = termios_of(&tty);
    assert_eq!(
        t.c_lflag & (libc::ECHO | libc::ICANON),
        0,
        "the terminal is cooked again after the hang-up"
    );
    g.send(0, b"login: \n", 1).unwrap();
    assert_eq!(
        read_n(&mut tty, 8),
        b"login: \n",
        "output translated (ONLCR)"
    );
    tty.write_all(b"root\n").unwrap();
    assert_eq!(
        g.recv_exact(0, 5, WAIT).unwrap(),
        b"root\n",
        "the guest got its own output back"
    );
    assert_eq!(c.stat("p", "console", "dropped_bytes"), 0);
}

/// A PTY pair standing in for a serial line: (master = the far end, slave path).
fn pty_pair() -> (OwnedFd, PathBuf) {
    // SAFETY: plain flags; the result is checked.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh fd owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: the master is open.
    assert_eq!(unsafe { libc::grantpt(master.as_raw_fd()) }, 0);
    // SAFETY: the master is open.
    assert_eq!(unsafe { libc::unlockpt(master.as_raw_fd()) }, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name within the buffer.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    assert_eq!(rc, 0);
    // SAFETY: NUL-terminated by ptsname_r.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    (master, PathBuf::from(name.to_str().unwrap()))
}

/// Points the symlink `link` at `target` (replacing it atomically), as udev does on a replug.
fn point(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// A serial device goes away (the far end of the line closes: EIO and a hang-up on the
/// device) and comes back behind the same symlink (a USB adapter replugged): the backend
/// burns no CPU meanwhile, logs one "gone" and one "back" line, counts one reopen, keeps the
/// guest's output meanwhile, and carries data both ways again. In stream mode with QEMU
/// connected and in virtio mode with the port open, the device's fd is read (input wanted);
/// with a port closed it is not, and the hang-up must be taken all the same.
#[test]
fn serial_device_that_goes_away_is_reopened_when_it_comes_back() {
    let dir = devshare_integration::qemu::ScratchDir::new("hup-serial").unwrap();
    let (far1, dev1) = pty_pair();
    let link = dir.path().join("ttyUSB0");
    point(&link, &dev1);
    let (far_closed, dev_closed) = pty_pair();
    let link_closed = dir.path().join("ttyUSB1");
    point(&link_closed, &dev_closed);
    let spec = format!("v/data=serial:{},reopen=50ms", link.display());
    let spec_closed = format!("v/other=serial:{},reopen=50ms", link_closed.display());
    let mut c = Console::start_in(
        dir,
        &[
            "--vm",
            "v={dir}/v.sock",
            "-p",
            "v/console=unix:{dir}/con.sock",
            "-p",
            &spec,
            "-p",
            &spec_closed,
        ],
        &["v.sock"],
    );
    let mut g = ConsoleGuest::connect(c.path("v.sock"), GuestOptions::default()).unwrap();
    // Port 1 open (its device's input is read), port 2 closed.
    g.bring_up_opening(3, &[0, 1]).unwrap();
    g.post_rx(1, 8, 256, 1).unwrap();
    let mut far = File::from(far1);
    far.write_all(b"before\n").unwrap();
    assert_eq!(g.recv_exact(1, 7, WAIT).unwrap(), b"before\n");

    // Both devices go away.
    drop(far);
    drop(far_closed);
    c.wait_stat("v", "data", "attached", 0);
    c.wait_stat("v", "other", "attached", 0);
    c.assert_quiet("serial devices gone (port open and port closed)");
    // Output meanwhile is kept.
    g.send(1, b"while away\n", 1).unwrap();
    c.wait_stat("v", "data", "buffered_bytes", 11);

    // The adapter comes back under another device node, behind the same symlink.
    let (far2, dev2) = pty_pair();
    // Raw mode on the new line: the backend sets its own termios on open; the far end here
    // only reads and writes bytes.
    point(&link, &dev2);
    c.wait_stat("v", "data", "attached", 1);
    let mut far = File::from(far2);
    assert_eq!(read_n(&mut far, 11), b"while away\n");
    far.write_all(b"after\n").unwrap();
    assert_eq!(g.recv_exact(1, 6, WAIT).unwrap(), b"after\n");
    g.send(1, b"out again\n", 1).unwrap();
    assert_eq!(read_n(&mut far, 10), b"out again\n");

    assert_eq!(c.stat("v", "data", "reopens"), 1);
    let gone = format!("serial {}: device gone", link.display());
    let back = format!("serial {}: device back", link.display());
    assert_eq!(c.log_count(&gone), 1, "{}", c.process.log());
    assert_eq!(c.log_count(&back), 1, "{}", c.process.log());
    // The other device stays away: one line, however many attempts.
    assert_eq!(
        c.log_count(&format!("serial {}: device gone", link_closed.display())),
        1
    );
    assert_eq!(
        c.log_count(&format!("serial {}: device back", link_closed.display())),
        0
    );
    c.assert_quiet("serial device back, the other still away");
}

/// In which order the backend, stopped meanwhile, finds a client leaving and the next one
/// arriving.
#[derive(Debug, Clone, Copy)]
enum Reattach {
    /// The old client closes, then the new one connects (a terminal program restarted).
    LeaveThenCome,
    /// The new client connects just before the old one's close (two programs overlapping).
    ComeThenLeave,
}

/// Waits until every thread of the backend is stopped: SIGSTOP is delivered
/// asynchronously, and a thread still running could take the next event before the test
/// has set both up.
fn wait_stopped(c: &Console) {
    let pid = c.process.pid().expect("backend pid");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let all_stopped = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                // The state follows the command name, which ends with the last ')'.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
            })
        });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backend never stopped"
        );
        std::thread::yield_now();
    }
}

/// The client leaves: shut down both ways, then closed. Closing alone is not enough here:
/// a sibling test that starts a backend at that moment holds a copy of every fd of this
/// process until its child execs, and the socket stays open for the backend meanwhile (it
/// then rightly tells the newcomer `port busy`).
fn leave<S: AsRawFd>(old: S) {
    // SAFETY: shutdown(2) on the socket `old` owns, open until it is dropped just after;
    // no memory is passed.
    let r = unsafe { libc::shutdown(old.as_raw_fd(), libc::SHUT_RDWR) };
    assert_eq!(r, 0, "shutdown: {}", std::io::Error::last_os_error());
    drop(old);
}

/// How many lines of the log contain both `a` and `b`.
fn log_lines_with(c: &Console, a: &str, b: &str) -> usize {
    c.process
        .log()
        .lines()
        .filter(|l| l.contains(a) && l.contains(b))
        .count()
}

/// A client of the listener `what` (its describe: `unix PATH` or `tcp ADDR`) leaves and the
/// next one comes "at once": both happen while the backend is stopped (SIGSTOP), so it finds
/// them together, in the order `order` says. The newcomer must get the port, not `port
/// busy`. Returns the newcomer.
fn reattach_at_once<S: Read + Write + AsRawFd>(
    c: &Console,
    what: &str,
    connect: &dyn Fn() -> S,
    order: Reattach,
) -> S {
    let attached = |c: &Console| log_lines_with(c, what, "client connected");
    let taken_over = |c: &Console| log_lines_with(c, what, "takes the port over");
    let busy = |c: &Console| log_lines_with(c, what, "port busy");
    let (n_attached, n_taken, n_busy) = (attached(c), taken_over(c), busy(c));
    let old = connect();
    let deadline = std::time::Instant::now() + WAIT;
    while attached(c) <= n_attached {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the first client was never attached; log:\n{}",
            c.process.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    c.process.signal(libc::SIGSTOP).unwrap();
    wait_stopped(c);
    let new = match order {
        Reattach::LeaveThenCome => {
            leave(old);
            connect()
        }
        Reattach::ComeThenLeave => {
            let new = connect();
            leave(old);
            new
        }
    };
    c.process.signal(libc::SIGCONT).unwrap();
    // The newcomer is either attached (a connect, or a takeover after a TCP FIN) or refused.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert_eq!(
            busy(c),
            n_busy,
            "{what} ({order:?}): the next client was told 'port busy'; log:\n{}",
            c.process.log()
        );
        if attached(c) > n_attached + 1 || taken_over(c) > n_taken {
            return new;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} ({order:?}): the next client was never attached; log:\n{}",
            c.process.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A client that leaves and one that comes at once get the port in every state: stream mode
/// with QEMU not connected and connected, virtio mode with no front-end and with the port
/// open, on Unix and TCP endpoints, whichever of the two events the backend takes first (it
/// used to take the newcomer first and tell it `port busy` until it noticed the old client
/// go). The newcomer is served: with a guest side connected, guest output reaches it.
#[test]
fn a_client_that_reattaches_at_once_gets_the_port_in_every_state() {
    let c = Console::start(
        "hup-reattach",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
            "--vm",
            "v={dir}/v.sock",
            "-p",
            "v/console=unix:{dir}/con.sock",
            "-p",
            "v/data=unix:{dir}/data.sock",
            "-p",
            "v/net=tcp:127.0.0.1:0",
        ],
        &["s.sock", "c.sock", "v.sock", "con.sock", "data.sock"],
    );
    let tcp = c.tcp_port("127.0.0.1");
    let stream_sock = c.path("c.sock");
    let data_sock = c.path("data.sock");
    let stream_what = format!("unix {}", stream_sock.display());
    let data_what = format!("unix {}", data_sock.display());
    let tcp_what = format!("tcp 127.0.0.1:{tcp}");
    let stream_client = || unix_client(&stream_sock);
    let data_client = || unix_client(&data_sock);
    let net_client = || tcp_client(tcp);
    let orders = [Reattach::LeaveThenCome, Reattach::ComeThenLeave];

    // No guest side connected.
    for order in orders {
        reattach_at_once(&c, &stream_what, &stream_client, order);
        reattach_at_once(&c, &data_what, &data_client, order);
        reattach_at_once(&c, &tcp_what, &net_client, order);
    }

    // Guest side connected: QEMU's stream socket, a driver with the ports open.
    let mut qemu = unix_client(&c.path("s.sock"));
    let mut g = ConsoleGuest::connect(c.path("v.sock"), GuestOptions::default()).unwrap();
    g.bring_up_opening(3, &[0, 1, 2]).unwrap();
    for order in orders {
        let mut s = reattach_at_once(&c, &stream_what, &stream_client, order);
        qemu.write_all(b"to the next\n").unwrap();
        assert_eq!(read_n(&mut s, 12), b"to the next\n");
        let mut s = reattach_at_once(&c, &data_what, &data_client, order);
        g.send(1, b"data next\n", 1).unwrap();
        assert_eq!(read_n(&mut s, 10), b"data next\n");
        let mut s = reattach_at_once(&c, &tcp_what, &net_client, order);
        g.send(2, b"tcp next\n", 1).unwrap();
        assert_eq!(read_n(&mut s, 9), b"tcp next\n");
    }
}
