//! What a crash of the backend (SIGKILL) costs, with `--state-dir`: nothing it accepted is
//! lost, and at most one write to the host side (64 KiB) is repeated, counted by the next
//! process in `replayed_after_restart_bytes` (README, "Nothing silently lost").
//!
//! A real SIGKILL takes effect when a system call returns, after the call did its work and
//! before the process recorded it: exactly where the windows of loss and repetition are. To
//! hit them every time, debug builds have crash points (`DEVSHARE_CONSOLE_CRASH_AT=NAME[:N]`,
//! `backends/console/src/failpoint.rs`): the backend SIGKILLs itself the N-th time it passes
//! the point. One case needs none: a chain left half-taken in the ring is a stable state, and
//! the test kills the backend there from outside.
//!
//! Then a new process starts on the same state directory, the test's QEMU side or harness
//! front-end comes back (resuming the rings at the used index, as QEMU does after a backend
//! crash) and a client attaches: what it gets over both connections must be every accepted
//! byte, in order, with at most the one counted repeat.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use devshare_integration::console_backend::{Console, WAIT};
use devshare_integration::console_guest::{port_queues, ConsoleGuest, GuestOptions};
use devshare_integration::frontend::{Connection, Segment};
use devshare_integration::testdata::pattern;

/// The variable that arms a crash point of a debug build.
const CRASH_AT: &str = "DEVSHARE_CONSOLE_CRASH_AT";
/// The most a crash may make the next process send again, per port (README).
const REPEAT_BOUND: usize = 64 * 1024;

/// Whether the backend under test has crash points: debug builds only, and the backend is
/// built with the profile of these tests (`scripts/test.sh` with
/// `DEVSHARE_TEST_PROFILE=release` builds both without them). Says so when it has none.
fn has_crash_points(test: &str) -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("{test}: skipped, release builds have no crash points");
    }
    cfg!(debug_assertions)
}

/// A backend started in a fresh scratch directory with `args`, set to die at crash point
/// `point` (`NAME[:N]`), ready when `ready` exist.
fn start_with_crash_point(scratch: &str, args: &[&str], ready: &[&str], point: &str) -> Console {
    Console::start_in_with_env(
        devshare_integration::qemu::ScratchDir::new(scratch).unwrap(),
        args,
        ready,
        &[(CRASH_AT, point)],
    )
}

fn unix_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Everything a client connection of a process that died still holds, to its end.
fn read_to_end(mut s: UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}

/// Reads from `s` until `settled` says the backend has nothing more for it (buffer empty,
/// chains used), then takes what is left in the socket. `settled` is the readiness signal;
/// the short read timeout only paces the loop.
fn read_until_settled(s: &mut UnixStream, settled: &mut dyn FnMut() -> bool) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut v = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return v,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if settled() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "never settled ({} bytes read)",
                    v.len()
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    s.set_nonblocking(true).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    v
}

/// Waits for the backend to kill itself at its crash point, then starts a new process with
/// `args` on the same directory.
fn after_crash(c: Console, args: &[&str], ready: &[&str]) -> Console {
    let Console { dir, mut process } = c;
    let status = process.wait_exit(WAIT).unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the backend did not die at its crash point ({status}); log:\n{}",
        process.log()
    );
    assert!(
        process.log().contains("reached: SIGKILL"),
        "{}",
        process.log()
    );
    Console::start_in(dir, args, ready)
}

/// Holds what a client got over the dead process's connection (`before`) and the new one's
/// (`after`) against the bytes written (`data`): `before` must be a prefix, `after` the rest
/// with at most a repeat of the end of `before`. Returns the bytes repeated.
fn repeated(data: &[u8], before: &[u8], after: &[u8]) -> usize {
    assert!(
        data.starts_with(before),
        "the first connection got {} bytes that are not the start of what was written",
        before.len()
    );
    assert!(
        after.len() <= data.len(),
        "{} bytes after the restart, of {} written: more than all of it",
        after.len(),
        data.len()
    );
    let from = data.len() - after.len();
    assert!(
        from <= before.len(),
        "bytes {}..{from} were lost (the first connection got {}, the second {})",
        before.len(),
        before.len(),
        after.len()
    );
    assert!(
        after == &data[from..],
        "the second connection's {} bytes are not the end of what was written",
        after.len()
    );
    before.len() - from
}

const STREAM_ARGS: &[&str] = &[
    "--vm",
    "s={dir}/s.sock,stream",
    "-p",
    "s/serial=unix:{dir}/c.sock",
    "--state-dir",
    "{dir}/state",
];
const STREAM_READY: &[&str] = &["s.sock", "c.sock"];

/// Stream mode: a crash right after guest output left QEMU's socket (`guest-output-read`),
/// or between copying it into the buffer and taking it out of the socket. What left the
/// socket is accepted and arrives once; what was only copied is still QEMU's, and dies with
/// the connection (the README's "only what QEMU sends while no backend is connected").
#[test]
fn stream_output_taken_from_qemu_survives_a_crash_at_every_step() {
    if !has_crash_points("stream_output_taken_from_qemu_survives_a_crash_at_every_step") {
        return;
    }
    // (crash point, whether the bytes were accepted when the process died)
    for (point, accepted) in [
        ("guest-output-read", true),
        ("stream-buffered", true),
        ("stream-peeked", false),
    ] {
        let c = start_with_crash_point("crash-stream-read", STREAM_ARGS, STREAM_READY, point);
        let client = unix_client(&c.path("c.sock"));
        c.wait_stat("s", "serial", "attached", 1);
        let data = pattern(3000, 11);
        let mut qemu = unix_client(&c.path("s.sock"));
        qemu.write_all(&data).unwrap();
        let c = after_crash(c, STREAM_ARGS, STREAM_READY);
        let before = read_to_end(client);
        let mut client = unix_client(&c.path("c.sock"));
        let after = read_until_settled(&mut client, &mut || {
            c.stat("s", "serial", "buffered_bytes") == 0
        });
        let got = [before, after].concat();
        if accepted {
            assert_eq!(
                got.len(),
                data.len(),
                "{point}: {} of {} accepted bytes arrived; log:\n{}",
                got.len(),
                data.len(),
                c.process.log()
            );
            assert!(got == data, "{point}: the bytes differ");
        } else {
            assert!(got.is_empty(), "{point}: {} bytes arrived", got.len());
        }
        assert_eq!(c.stat("s", "serial", "replayed_after_restart_bytes"), 0);
    }
}

/// Stream mode: a crash right after a write to the client returned (`host-write`), while a
/// megabyte kept with no client attached is replayed. The next process sends that write
/// again: at most 64 KiB, and exactly what it counts.
#[test]
fn stream_a_crash_during_a_write_to_the_client_repeats_at_most_that_write_and_counts_it() {
    if !has_crash_points(
        "stream_a_crash_during_a_write_to_the_client_repeats_at_most_that_write_and_counts_it",
    ) {
        return;
    }
    let c = start_with_crash_point(
        "crash-stream-write",
        STREAM_ARGS,
        STREAM_READY,
        "host-write",
    );
    let data = pattern(1 << 20, 12);
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(&data).unwrap();
    c.wait_stat("s", "serial", "buffered_bytes", data.len() as u64);
    // The client's socket takes a few hundred KiB at once: the first write is as large as
    // the backend makes it.
    let client = unix_client(&c.path("c.sock"));
    let c = after_crash(c, STREAM_ARGS, STREAM_READY);
    let before = read_to_end(client);
    let mut client = unix_client(&c.path("c.sock"));
    let after = read_until_settled(&mut client, &mut || {
        c.stat("s", "serial", "buffered_bytes") == 0
    });
    let dup = repeated(&data, &before, &after);
    assert!(dup > 0, "the write the process died in was not repeated");
    assert!(
        dup <= REPEAT_BOUND,
        "{dup} bytes repeated (bound {REPEAT_BOUND})"
    );
    let counted = c.stat("s", "serial", "replayed_after_restart_bytes") as usize;
    assert!(
        dup <= counted && counted <= REPEAT_BOUND,
        "{dup} bytes repeated, {counted} counted (bound {REPEAT_BOUND})"
    );
}

const VIRTIO_ARGS: &[&str] = &[
    "--vm",
    "v={dir}/v.sock",
    "-p",
    "v/console=unix:{dir}/con.sock",
    "-p",
    "v/data=unix:{dir}/data.sock",
    "--state-dir",
    "{dir}/state",
];
const VIRTIO_READY: &[&str] = &["v.sock", "con.sock", "data.sock"];
const DATA_PORT: usize = 1;

/// Puts `chunks` on the data port's transmit ring as one chain each, then kicks once: the
/// backend takes them in one pass.
fn post_chains(g: &mut ConsoleGuest, chunks: &[&[u8]]) {
    let (_, txq) = port_queues(DATA_PORT);
    for chunk in chunks {
        let b = g.ram.alloc(chunk.len() as u32).unwrap();
        g.ram.fill(b, chunk).unwrap();
        g.add_chain(txq, &[Segment::readable(b)]).unwrap();
    }
    g.queue(txq).unwrap().notify().unwrap();
}

/// Whether every chain of the data port's transmit ring is used.
fn all_used(g: &mut ConsoleGuest) -> bool {
    let (_, txq) = port_queues(DATA_PORT);
    while g.poll_tx_used(txq).unwrap().is_some() {}
    g.queue(txq).unwrap().in_flight() == 0
}

/// The front-end dials `c` again and resumes its rings; a new client reads the data port
/// until every chain is used and nothing is buffered. Returns what it read.
fn resume_and_read(c: &Console, g: &mut ConsoleGuest) -> Vec<u8> {
    g.reconnect(c.path("v.sock")).unwrap();
    let mut client = unix_client(&c.path("data.sock"));
    read_until_settled(&mut client, &mut || {
        all_used(g) && c.stat("v", "data", "buffered_bytes") == 0
    })
}

fn guest(c: &Console) -> ConsoleGuest {
    let mut g = ConsoleGuest::connect(c.path("v.sock"), GuestOptions::default()).unwrap();
    g.bring_up_opening(2, &[0, 1]).unwrap();
    g
}

/// Virtio mode: chains go straight from guest memory to an attached client; the backend
/// dies right after the write of the third chain of one pass returned. The chains before it
/// were marked used one by one; the third is taken again by the next process, which counts
/// the write it repeats. Before, the used entries of a pass were published at its end, and
/// every chain written so far was sent twice.
#[test]
fn virtio_a_crash_during_a_write_to_the_client_repeats_at_most_that_write_and_counts_it() {
    if !has_crash_points(
        "virtio_a_crash_during_a_write_to_the_client_repeats_at_most_that_write_and_counts_it",
    ) {
        return;
    }
    let c = start_with_crash_point(
        "crash-virtio-write",
        VIRTIO_ARGS,
        VIRTIO_READY,
        "host-write:3",
    );
    let client = unix_client(&c.path("data.sock"));
    c.wait_stat("v", "data", "attached", 1);
    let mut g = guest(&c);
    let data = pattern(6 * 16 * 1024, 13);
    let chunks: Vec<&[u8]> = data.chunks(16 * 1024).collect();
    post_chains(&mut g, &chunks);
    let c = after_crash(c, VIRTIO_ARGS, VIRTIO_READY);
    let before = read_to_end(client);
    let after = resume_and_read(&c, &mut g);
    let dup = repeated(&data, &before, &after);
    assert_eq!(
        dup,
        16 * 1024,
        "more than the write of one chain was repeated"
    );
    let counted = c.stat("v", "data", "replayed_after_restart_bytes") as usize;
    assert_eq!(counted, dup, "the repeat was not counted");
}

/// Virtio mode: one chain larger than a write (192 KiB, three writes of 64 KiB) goes
/// straight to a client that keeps up, so nothing was ever buffered; the backend dies right
/// after the chain's second write. The next process continues the chain after its first
/// write and repeats only the second, counted. (It used to lose track of a chain once more
/// had gone straight to the client than the buffer had ever held, and sent it all again.)
#[test]
fn virtio_a_crash_in_the_middle_of_a_large_chain_repeats_only_the_last_write() {
    if !has_crash_points(
        "virtio_a_crash_in_the_middle_of_a_large_chain_repeats_only_the_last_write",
    ) {
        return;
    }
    let c = start_with_crash_point(
        "crash-virtio-large",
        VIRTIO_ARGS,
        VIRTIO_READY,
        "host-write:2",
    );
    let client = unix_client(&c.path("data.sock"));
    // Room for the whole chain in the client's socket: every write is taken whole.
    let sz: libc::c_int = 1 << 20;
    // SAFETY: setsockopt on an open socket with a c_int option of its size.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&client),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&sz as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "{}", io::Error::last_os_error());
    c.wait_stat("v", "data", "attached", 1);
    let mut g = guest(&c);
    let data = pattern(3 * REPEAT_BOUND, 17);
    post_chains(&mut g, &[&data]);
    let c = after_crash(c, VIRTIO_ARGS, VIRTIO_READY);
    let before = read_to_end(client);
    assert_eq!(
        before.len(),
        2 * REPEAT_BOUND,
        "the first two writes were not taken whole"
    );
    let after = resume_and_read(&c, &mut g);
    let dup = repeated(&data, &before, &after);
    assert_eq!(dup, REPEAT_BOUND, "not just the last write was repeated");
    let counted = c.stat("v", "data", "replayed_after_restart_bytes") as usize;
    assert_eq!(counted, dup, "the repeat was not counted");
}

/// Virtio mode with no client: chains go into the buffer file and are marked used one by
/// one. The backend dies after the third chain of a pass went into the buffer, before it
/// was marked used. The next process finds that chain in the ring again (the front-end
/// resumes at the used index) and knows from the buffer file that it has its bytes: it
/// marks it used without taking it twice.
#[test]
fn virtio_a_buffered_chain_not_yet_used_is_not_taken_twice_after_a_crash() {
    if !has_crash_points("virtio_a_buffered_chain_not_yet_used_is_not_taken_twice_after_a_crash") {
        return;
    }
    let c = start_with_crash_point(
        "crash-virtio-spool",
        VIRTIO_ARGS,
        VIRTIO_READY,
        "chain-buffered:3",
    );
    let mut g = guest(&c);
    let data = pattern(6 * 4096, 14);
    let chunks: Vec<&[u8]> = data.chunks(4096).collect();
    post_chains(&mut g, &chunks);
    let c = after_crash(c, VIRTIO_ARGS, VIRTIO_READY);
    let got = resume_and_read(&c, &mut g);
    assert_eq!(repeated(&data, &[], &got), 0);
    assert_eq!(got.len(), data.len(), "{}", c.process.log());
    assert_eq!(c.stat("v", "data", "replayed_after_restart_bytes"), 0);
}

/// Virtio mode, a data port with a small buffer and no client: a chain larger than the
/// buffer is taken as far as it fits and stays in the ring (back-pressure). The backend is
/// killed in that state (SIGKILL from outside: the state is stable, no crash point needed).
/// The next process continues the chain where the buffer file says it stopped.
#[test]
fn virtio_a_half_taken_chain_continues_where_it_stopped_after_a_kill() {
    let args: Vec<&str> = VIRTIO_ARGS
        .iter()
        .copied()
        .chain(["--buffer-size", "8K"])
        .collect();
    let c = Console::start("crash-virtio-partial", &args, VIRTIO_READY);
    let mut g = guest(&c);
    let data = pattern(20 * 1024, 15);
    post_chains(&mut g, &[&data]);
    c.wait_stat("v", "data", "buffered_bytes", 8192);
    assert!(!all_used(&mut g), "the chain did not stay in the ring");
    let Console { dir, mut process } = c;
    process.kill();
    let c = Console::start_in(dir, &args, VIRTIO_READY);
    let got = resume_and_read(&c, &mut g);
    assert_eq!(
        got.len(),
        data.len(),
        "{} bytes arrived for a {}-byte chain",
        got.len(),
        data.len()
    );
    assert!(got == data, "the bytes differ");
    assert_eq!(c.stat("v", "data", "replayed_after_restart_bytes"), 0);
}

/// The same half-taken chain, but the backend stays up and the front-end goes away and comes
/// back (QEMU reconnecting: GET_VRING_BASE on every queue, close, dial again with the same
/// memory and the rings resumed where GET_VRING_BASE said). The chain is handed over again
/// and must be continued, not taken from its start a second time.
#[test]
fn virtio_a_half_taken_chain_continues_where_it_stopped_after_a_front_end_restart() {
    for durable in [true, false] {
        let args: Vec<&str> = VIRTIO_ARGS
            .iter()
            .copied()
            .filter(|a| durable || !a.contains("state"))
            .chain(["--buffer-size", "8K"])
            .collect();
        let c = Console::start("frontend-restart-partial", &args, VIRTIO_READY);
        let mut g = guest(&c);
        let data = pattern(20 * 1024, 16);
        post_chains(&mut g, &[&data]);
        c.wait_stat("v", "data", "buffered_bytes", 8192);
        assert!(!all_used(&mut g), "the chain did not stay in the ring");
        for i in 0..g.queues.len() {
            let (conn, q) = (&mut g.conn, &mut g.queues[i]);
            conn.stop_queue(q).unwrap();
        }
        let placeholder = UnixStream::pair().unwrap().0;
        std::mem::replace(&mut g.conn, Connection::from_stream(placeholder)).disconnect();
        let got = resume_and_read(&c, &mut g);
        assert_eq!(
            got.len(),
            data.len(),
            "durable {durable}: {} bytes arrived for a {}-byte chain",
            got.len(),
            data.len()
        );
        assert!(got == data, "durable {durable}: the bytes differ");
        assert_eq!(c.stat("v", "data", "replayed_after_restart_bytes"), 0);
    }
}

/// A back-end that dies between putting bytes in the guest's receive ring and interrupting it
/// leaves the guest waiting for that interrupt with its used_event already passed. Whoever
/// serves the ring next must interrupt at its first bytes for that ring whatever used_event
/// says, as Linux's vhost does after a ring starts; before, no later chain ever interrupted the
/// guest for that port again. Here the interrupt comes and the guest misses it, which leaves
/// the same state, and the front-end comes back on a new connection, whose rings start anew
/// as a new process's would.
#[test]
fn virtio_on_a_new_connection_the_first_bytes_interrupt_a_guest_that_missed_one() {
    let c = Console::start("missed-interrupt", VIRTIO_ARGS, VIRTIO_READY);
    let mut g = guest(&c);
    let (rxq, _) = port_queues(DATA_PORT);
    take_start_interrupt(&mut g, rxq);
    g.post_rx(DATA_PORT, 8, 64, 1).unwrap();
    // used_event = 0: the guest wants to hear of the first chain.
    g.queue(rxq).unwrap().enable_calls();
    let mut client = unix_client(&c.path("data.sock"));
    client.write_all(b"first").unwrap();
    assert!(
        g.queue(rxq).unwrap().wait_call(WAIT).unwrap(),
        "no interrupt for the first bytes"
    );

    let placeholder = UnixStream::pair().unwrap().0;
    std::mem::replace(&mut g.conn, Connection::from_stream(placeholder)).disconnect();
    c.wait_log("front-end disconnected");
    g.reconnect(c.path("v.sock")).unwrap();
    // To the backend a new connection is a new device: the driver brings it up again.
    g.bring_up_opening(2, &[0, 1]).unwrap();
    // The guest misses the interrupt of the ring's start too: the first bytes must interrupt.
    take_start_interrupt(&mut g, rxq);
    client.write_all(b"second").unwrap();
    let q = g.queue(rxq).unwrap();
    assert!(
        q.wait_call(WAIT).unwrap(),
        "the backend filled a chain (used index {}) and never interrupted\n{}",
        q.used_idx(),
        c.port_stats("v", "data")
    );
    assert_eq!(
        g.recv_exact(DATA_PORT, 11, WAIT).unwrap(),
        b"firstsecond".to_vec()
    );
}

/// Takes the interrupt queue `q` gets when its ring starts (see `devshare_common::vring`), for
/// a test that counts interrupts.
fn take_start_interrupt(g: &mut ConsoleGuest, q: u16) {
    assert!(
        g.queue(q).unwrap().wait_call(WAIT).unwrap(),
        "no interrupt when ring {q} started"
    );
}
