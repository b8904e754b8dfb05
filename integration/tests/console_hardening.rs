//! vhost-user-console against what a hostile guest, a careless operator or another local user
//! can do (issue 10): the largest VM the configuration accepts, state files that cannot be
//! turned against their targets, guest-caused warnings at a bounded rate, and a guest that
//! floods its rings with the worst chains the spec allows while the other ports and the
//! linked VM keep moving.
//!
//! The backend is the real process; the guest is the frontend harness playing the driver.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::console_guest::*;
use devshare_integration::console_traffic::RoundTrips;
use devshare_integration::frontend::{
    Descriptor, DriverQueue, QueueConfig, DESC_F_INDIRECT, DESC_F_NEXT,
};
use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::ScratchDir;
use devshare_integration::testdata::pattern;

const WAIT: Duration = Duration::from_secs(10);
/// For conditions that need many round trips on a machine busy with other builds.
const LONG_WAIT: Duration = Duration::from_secs(60);

/// A running vhost-user-console and its scratch directory.
struct Backend {
    dir: PathBuf,
    process: BackendProcess,
}

impl Backend {
    /// Starts the backend with `args` and waits for the vhost-user sockets `vms` (names of
    /// `<vm>.sock` in `dir`) and the stats socket.
    fn start(dir: &Path, args: Vec<String>, vms: &[&str]) -> Backend {
        let mut args = args;
        args.push("--stats-socket".into());
        args.push(dir.join("stats.sock").display().to_string());
        let mut process =
            BackendProcess::spawn("vhost-user-console", &args, &dir.join("backend.log")).unwrap();
        for vm in vms {
            process
                .wait_for_socket(&dir.join(format!("{vm}.sock")), WAIT)
                .unwrap();
        }
        process
            .wait_for_path(&dir.join("stats.sock"), WAIT)
            .unwrap();
        Backend {
            dir: dir.to_path_buf(),
            process,
        }
    }

    fn socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.sock"))
    }

    /// A client of the Unix endpoint `name` (`<name>.sock` in the scratch directory).
    fn client(&self, name: &str) -> UnixStream {
        let s = UnixStream::connect(self.dir.join(format!("{name}.sock"))).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    fn stat(&self, vm: &str, port: &str, key: &str) -> u64 {
        let mut s = UnixStream::connect(self.dir.join("stats.sock")).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        doc["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["vm"] == vm && p["port"] == port)
            .unwrap_or_else(|| panic!("no stats for {vm}/{port} in {text}"))[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} for {vm}/{port} in {text}"))
    }

    fn wait_stat(&self, vm: &str, port: &str, key: &str, want: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.stat(vm, port, key);
            if got >= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}/{port} {key} is {got}, expected {want}; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.process.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "backend never logged {needle:?}; log:\n{}",
                self.process.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines of the log that contain `needle`.
    fn lines(&self, needle: &str) -> Vec<String> {
        self.process
            .log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    fn assert_running(&mut self) {
        assert!(
            self.process.is_running(),
            "backend died; log:\n{}",
            self.process.log()
        );
    }
}

fn arg(s: impl Into<String>) -> String {
    s.into()
}

/// `-p NAME=unix:DIR/ENDPOINT.sock` (with `vm/` before NAME when given).
fn unix_port(dir: &Path, vm: Option<&str>, name: &str, endpoint: &str) -> [String; 2] {
    let lhs = match vm {
        Some(vm) => format!("{vm}/{name}"),
        None => name.to_string(),
    };
    [
        arg("-p"),
        format!(
            "{lhs}=unix:{}",
            dir.join(format!("{endpoint}.sock")).display()
        ),
    ]
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// Waits until the backend process has exited (it refused to start), failing with its log if
/// it serves instead (`socket` appears) or neither happens in time.
fn wait_for_refusal(process: &mut BackendProcess, socket: &Path) {
    let deadline = Instant::now() + WAIT;
    while process.is_running() {
        assert!(
            !socket.exists(),
            "the backend started serving although it should have refused; log:\n{}",
            process.log()
        );
        assert!(
            Instant::now() < deadline,
            "the backend neither refused nor served; log:\n{}",
            process.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

// ---- hole 7: the largest VM the configuration accepts ----

#[test]
fn a_vm_with_31_ports_negotiates_and_every_port_carries_data_both_ways() {
    const PORTS: usize = 31;
    let scratch = ScratchDir::new("con-31-ports").unwrap();
    let d = scratch.path();
    let mut args = vec![arg("--socket"), d.join("vm.sock").display().to_string()];
    for p in 0..PORTS {
        let name = if p == 0 {
            "console".to_string()
        } else {
            format!("port{p}")
        };
        args.extend(unix_port(d, None, &name, &format!("p{p}")));
    }
    let mut b = Backend::start(d, args, &["vm"]);
    // 4 + 2 * 30 queues: the most one vhost-user worker can serve (a 64-bit queue mask).
    let opts = GuestOptions {
        ram: 128 << 20,
        ..GuestOptions::default()
    };
    let mut g = ConsoleGuest::connect(b.socket("vm"), opts).unwrap();
    assert_eq!(g.agreed.queue_num, Some(64));
    let cfg = g.conn.get_config(0, 12).unwrap();
    assert_eq!(
        u32::from_le_bytes([cfg[4], cfg[5], cfg[6], cfg[7]]),
        PORTS as u32
    );
    let seen = g.bring_up(PORTS).unwrap();
    let named = seen.iter().filter(|m| m.event == PORT_NAME).count();
    assert_eq!(named, PORTS);

    let mut clients: Vec<UnixStream> = (0..PORTS).map(|p| b.client(&format!("p{p}"))).collect();
    for (p, client) in clients.iter_mut().enumerate() {
        let out = format!("guest to host on port {p}\n");
        g.send(p, out.as_bytes(), 2).unwrap();
        assert_eq!(read_n(client, out.len()), out.as_bytes(), "port {p} out");
    }
    for (p, client) in clients.iter_mut().enumerate() {
        g.post_rx(p, 2, 128, 1).unwrap();
        let input = format!("host to guest on port {p}\n");
        client.write_all(input.as_bytes()).unwrap();
        let got = g.recv_exact(p, input.len(), WAIT).unwrap();
        assert_eq!(got, input.as_bytes(), "port {p} in");
    }
    // Each port's counters saw its own bytes, the last one (queues 62 and 63) included.
    for p in 0..PORTS {
        let name = if p == 0 {
            "console".to_string()
        } else {
            format!("port{p}")
        };
        let out = format!("guest to host on port {p}\n").len() as u64;
        let input = format!("host to guest on port {p}\n").len() as u64;
        b.wait_stat("vm0", &name, "to_host_bytes", out);
        assert_eq!(b.stat("vm0", &name, "to_host_bytes"), out, "{name}");
        assert_eq!(b.stat("vm0", &name, "to_guest_bytes"), input, "{name}");
    }
    b.assert_running();
}

// ---- hole 6: state files ----

/// Arguments of a backend serving VM `tag` with a console and a data port on Unix sockets,
/// its buffers in `state`.
fn state_args(d: &Path, state: &Path, tag: &str) -> Vec<String> {
    let mut args = vec![
        arg("--vm"),
        format!("{tag}={}", d.join(format!("{tag}.sock")).display()),
        arg("--state-dir"),
        state.display().to_string(),
    ];
    args.extend(unix_port(
        d,
        Some(tag),
        "console",
        &format!("{tag}-console"),
    ));
    args.extend(unix_port(d, Some(tag), "data", &format!("{tag}-data")));
    args
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn the_state_dir_is_0700_and_spool_files_0600() {
    let scratch = ScratchDir::new("con-state-modes").unwrap();
    let d = scratch.path();
    let state = d.join("state");
    let mut b = Backend::start(d, state_args(d, &state, "vm0"), &["vm0"]);
    assert_eq!(mode(&state), 0o700, "state directory");
    let spool = state.join("vm0.console.spool");
    for port in ["console", "data"] {
        assert_eq!(
            mode(&state.join(format!("vm0.{port}.spool"))),
            0o600,
            "{port}"
        );
    }
    // Output the guest sent while nobody listened is in the spool...
    let mut g = ConsoleGuest::connect(b.socket("vm0"), GuestOptions::default()).unwrap();
    g.bring_up(2).unwrap();
    g.send(1, b"kept across restarts\n", 1).unwrap();
    b.wait_stat("vm0", "data", "buffered_bytes", 21);
    drop(g);
    b.process.kill();

    // ...and a spool an older version left readable by others is made private again, its
    // content kept.
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data_spool = state.join("vm0.data.spool");
    std::fs::set_permissions(&data_spool, std::fs::Permissions::from_mode(0o644)).unwrap();
    let b = Backend::start(d, state_args(d, &state, "vm0"), &["vm0"]);
    assert_eq!(mode(&spool), 0o600);
    assert_eq!(mode(&data_spool), 0o600);
    let mut data = b.client("vm0-data");
    assert_eq!(read_n(&mut data, 21), b"kept across restarts\n");
}

#[test]
fn a_planted_symlink_hard_link_or_foreign_file_at_a_spool_path_is_refused_and_left_intact() {
    let scratch = ScratchDir::new("con-state-planted").unwrap();
    let d = scratch.path();
    let state = d.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = d.join("victim");
    let precious = pattern(10_000, 99);
    let spool = state.join("vm0.console.spool");

    type Plant = fn(&Path, &Path);
    let plants: [(&str, Plant, &str); 3] = [
        (
            "symlink",
            |victim, spool| std::os::unix::fs::symlink(victim, spool).unwrap(),
            "is a symlink",
        ),
        (
            "hard link",
            |victim, spool| std::fs::hard_link(victim, spool).unwrap(),
            "hard links",
        ),
        (
            "a file that is not a spool",
            |victim, spool| {
                std::fs::copy(victim, spool).unwrap();
            },
            "not a spool",
        ),
    ];
    for (what, plant, reason) in plants {
        std::fs::write(&victim, &precious).unwrap();
        let _ = std::fs::remove_file(&spool);
        plant(&victim, &spool);
        let mut process = BackendProcess::spawn(
            "vhost-user-console",
            state_args(d, &state, "vm0"),
            &d.join(format!("{}.log", what.replace(' ', "-"))),
        )
        .unwrap();
        wait_for_refusal(&mut process, &d.join("vm0.sock"));
        let log = process.log();
        assert!(
            log.contains(&spool.display().to_string()) && log.contains(reason),
            "{what}: the refusal must name the spool and say why; log:\n{log}"
        );
        assert!(
            std::fs::read(&victim).unwrap() == precious,
            "{what}: the target was changed"
        );
        if what == "a file that is not a spool" {
            assert!(
                std::fs::read(&spool).unwrap() == precious,
                "{what}: changed"
            );
        }
    }
}

#[test]
fn two_ports_whose_spools_would_share_a_file_are_refused() {
    // "a.b" + "c" and "a" + "b.c" both make "a.b.c.spool": two ports mapping one file would
    // overwrite each other's output.
    let scratch = ScratchDir::new("con-state-clash").unwrap();
    let d = scratch.path();
    let state = d.join("state");
    let mut args = vec![
        arg("--state-dir"),
        state.display().to_string(),
        arg("--vm"),
        format!("a.b={}", d.join("ab.sock").display()),
        arg("--vm"),
        format!("a={}", d.join("a.sock").display()),
    ];
    args.extend(unix_port(d, Some("a.b"), "c", "abc"));
    args.extend(unix_port(d, Some("a"), "b.c", "abc2"));
    let mut process =
        BackendProcess::spawn("vhost-user-console", &args, &d.join("backend.log")).unwrap();
    wait_for_refusal(&mut process, &d.join("a.sock"));
    let log = process.log();
    assert!(
        log.contains(&state.join("a.b.c.spool").display().to_string())
            && log.contains("used twice: as a.b/c's buffer file and as a/b.c's buffer file"),
        "the refusal must name the shared spool; log:\n{log}"
    );
}

#[test]
fn a_second_instance_on_the_same_state_dir_is_refused_and_the_first_keeps_its_spools() {
    let scratch = ScratchDir::new("con-state-lock").unwrap();
    let d = scratch.path();
    let state = d.join("state");
    let mut first = Backend::start(d, state_args(d, &state, "one"), &["one"]);
    let mut g = ConsoleGuest::connect(first.socket("one"), GuestOptions::default()).unwrap();
    g.bring_up(2).unwrap();
    let kept = pattern(50_000, 7);
    g.send(1, &kept, 3).unwrap();
    first.wait_stat("one", "data", "buffered_bytes", kept.len() as u64);
    let spool = state.join("one.data.spool");
    let before = std::fs::read(&spool).unwrap();

    let mut second = BackendProcess::spawn(
        "vhost-user-console",
        state_args(d, &state, "two"),
        &d.join("second.log"),
    )
    .unwrap();
    wait_for_refusal(&mut second, &d.join("two.sock"));
    let log = second.log();
    assert!(
        log.contains(&state.display().to_string()) && log.contains("in use"),
        "the second instance must say the state directory is in use; log:\n{log}"
    );
    assert!(std::fs::read(&spool).unwrap() == before, "spool touched");
    first.assert_running();
    let mut data = first.client("one-data");
    assert!(
        read_n(&mut data, kept.len()) == kept,
        "buffered output lost"
    );
}

// ---- hole 9: guest-caused warnings at a bounded rate ----

/// A chain of one descriptor outside guest memory on queue `q`, published again and again
/// by [`refused_chains`].
fn outside_chain(g: &mut ConsoleGuest, q: u16) -> u16 {
    let ram_end = g.options().ram;
    let queue = g.queue(q).unwrap();
    let head = queue.raw_reserve(1).unwrap()[0];
    let outside = Descriptor {
        addr: ram_end + 4096,
        len: 64,
        flags: 0,
        next: 0,
    };
    queue.raw_write_desc(head, outside).unwrap();
    head
}

/// Publishes chain `head` `n` times on `q`, kicks, and waits for all of them to come back
/// refused.
fn refused_chains(g: &mut ConsoleGuest, q: u16, head: u16, n: usize) {
    let queue = g.queue(q).unwrap();
    for _ in 0..n {
        queue.raw_publish(head);
    }
    queue.notify().unwrap();
    let used = queue.wait_used_n(n, WAIT).unwrap();
    assert!(used.iter().all(|u| u.head == head && u.len == 0));
}

#[test]
fn guest_caused_warnings_are_logged_at_a_bounded_rate_with_a_count() {
    let scratch = ScratchDir::new("con-log-rate").unwrap();
    let d = scratch.path();
    let mut args = vec![arg("--socket"), d.join("vm0.sock").display().to_string()];
    args.extend(unix_port(d, None, "console", "console"));
    args.extend(unix_port(d, None, "data", "data"));
    let mut b = Backend::start(d, args, &["vm0"]);
    let mut g = ConsoleGuest::connect(b.socket("vm0"), GuestOptions::default()).unwrap();
    g.bring_up(2).unwrap();
    let (_, txq) = port_queues(1);
    let start = Instant::now();

    // A front-end writing the read-only config space, over and over.
    for _ in 0..200 {
        g.conn.set_config(0, &[1, 2, 3, 4]).unwrap();
    }
    // A driver breaking and repairing a ring, over and over (the device sees the first
    // break for sure, the others when it gets to the kick before the repair).
    for i in 0..50 {
        let q = g.queue(txq).unwrap();
        let real = q.avail_idx();
        q.raw_set_avail_idx(real.wrapping_add(1000));
        q.notify().unwrap();
        if i == 0 {
            b.wait_log("Iterator error");
        }
        let q = g.queue(txq).unwrap();
        q.raw_set_avail_idx(real);
        g.send(1, b"x", 1).unwrap();
    }
    // Bad control messages and kicks on queues nothing uses.
    for _ in 0..100 {
        g.send_control(77, PORT_OPEN, 1).unwrap();
    }
    // Refused chains, until a whole interval has passed and the count was logged.
    let bad = outside_chain(&mut g, txq);
    let mut sent = 0u64;
    while b.lines("vm0/data: ... and").is_empty() {
        refused_chains(&mut g, txq, bad, 100);
        sent += 100;
        assert!(
            start.elapsed() < LONG_WAIT,
            "no held-back count after {sent} refused chains; log:\n{}",
            b.process.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    b.wait_stat("vm0", "data", "bad_chains", sent);
    let intervals = start.elapsed().as_secs() / 10 + 1;
    let bound = |what: &str, lines: usize| {
        assert!(
            lines as u64 <= 5 * intervals + 1,
            "{lines} lines of {what} in {intervals} intervals; log:\n{}",
            b.process.log()
        );
    };
    bound("refused chains", b.lines("refused descriptor chain").len());
    bound("config writes", b.lines("ignored config write").len());
    bound("broken rings", b.lines("Iterator error").len());
    bound("unknown ports", b.lines("unknown port 77").len());
    // The count says how many were held back.
    let summary = b.lines("vm0/data: ... and").remove(0);
    let held: u64 = summary
        .split("... and ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {summary:?}"));
    assert!(held >= 100, "{summary}");
    // The whole log stays short: tens of thousands of events, a few dozen lines (start-up,
    // connection, and at most 5 per kind and interval).
    let total = b.process.log().lines().count() as u64;
    assert!(
        total <= 20 + 30 * intervals,
        "{total} lines:\n{}",
        b.process.log()
    );
    b.assert_running();
}

// ---- hole 3: a work budget per kick ----

/// A hostile driver on one transmit queue: it publishes the same worst-case chain (one
/// indirect table of as many 1-byte buffers as the queue size allows) over and over, as fast
/// as the device takes it. It watches the used ring element by element (it marks each slot
/// it has seen), so it never announces more than a ring's worth beyond what the device took
/// and the device never has a reason to stop, and it never waits for the device to publish.
struct Flood {
    taken: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Result<(), String>>>,
}

const UNSEEN: u32 = u32::MAX;

impl Flood {
    fn start(mut q: DriverQueue) -> Flood {
        let taken = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (taken.clone(), stop.clone());
        let handle = thread::spawn(move || -> Result<(), String> {
            let e = |e: devshare_integration::frontend::Error| e.to_string();
            let size = q.size();
            let ram = q.ram().clone();
            let bytes = ram.alloc(u32::from(size)).map_err(e)?;
            let table = ram.alloc(u32::from(size) * 16).map_err(e)?;
            let entries: Vec<Descriptor> = (0..size)
                .map(|k| Descriptor {
                    addr: bytes.addr + u64::from(k),
                    len: 1,
                    flags: if k + 1 < size { DESC_F_NEXT } else { 0 },
                    next: k + 1,
                })
                .collect();
            ram.write_descriptors(table.addr, &entries).map_err(e)?;
            let head = q.raw_reserve(1).map_err(e)?[0];
            q.raw_write_desc(
                head,
                Descriptor {
                    addr: table.addr,
                    len: u32::from(size) * 16,
                    flags: DESC_F_INDIRECT,
                    next: 0,
                },
            )
            .map_err(e)?;
            for slot in 0..size {
                q.raw_write_used_elem(slot, UNSEEN, 0).map_err(e)?;
            }
            let mut seen = q.avail_idx();
            while !s.load(Ordering::Relaxed) {
                let mut published = false;
                while q.avail_idx().wrapping_sub(seen) < size {
                    q.raw_publish(head);
                    published = true;
                }
                if published {
                    q.notify().map_err(e)?;
                }
                let mut progressed = false;
                loop {
                    let slot = seen % size;
                    let (id, _) = q.raw_read_used_elem(slot).map_err(e)?;
                    if id == UNSEEN {
                        break;
                    }
                    if id != u32::from(head) {
                        return Err(format!("the device used id {id}, never published"));
                    }
                    q.raw_write_used_elem(slot, UNSEEN, 0).map_err(e)?;
                    seen = seen.wrapping_add(1);
                    t.fetch_add(1, Ordering::Relaxed);
                    progressed = true;
                }
                if !progressed {
                    thread::yield_now();
                }
            }
            Ok(())
        });
        Flood {
            taken,
            stop,
            handle: Some(handle),
        }
    }

    fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap().unwrap();
        }
    }
}

#[test]
fn worst_case_chains_on_one_port_hold_up_neither_its_other_ports_nor_the_linked_vm() {
    let scratch = ScratchDir::new("con-budget").unwrap();
    let d = scratch.path();
    let mut args = Vec::new();
    for vm in ["a", "b"] {
        args.push(arg("--vm"));
        args.push(format!("{vm}={}", d.join(format!("{vm}.sock")).display()));
    }
    for vm in ["a", "b"] {
        args.extend(unix_port(d, Some(vm), "console", &format!("{vm}-console")));
        args.extend(unix_port(d, Some(vm), "data", &format!("{vm}-data")));
        let other = if vm == "a" { "b" } else { "a" };
        args.push(arg("-p"));
        args.push(format!("{vm}/link=vm:{other}/link"));
    }
    let mut b = Backend::start(d, args, &["a", "b"]);
    // The largest queues the device accepts: the longest chains the spec allows.
    let opts = GuestOptions {
        queue_size: 1024,
        ..GuestOptions::default()
    };
    let mut ga = ConsoleGuest::connect(b.socket("a"), opts).unwrap();
    ga.bring_up(3).unwrap();
    let mut gb = ConsoleGuest::connect(b.socket("b"), opts).unwrap();
    gb.bring_up(3).unwrap();

    // a's console transmitq goes to the flood (nobody listens on the console: it keeps the
    // newest bytes and never holds the guest back, so the device always takes more).
    let (_, flood_q) = port_queues(0);
    let spare = DriverQueue::new(&ga.ram, QueueConfig::new(flood_q, 8)).unwrap();
    let flood_queue = std::mem::replace(&mut ga.queues[usize::from(flood_q)], spare);
    let a_data = b.client("a-data");
    let b_data = b.client("b-data");
    let flood = Flood::start(flood_queue);
    // The flood is in full swing: the device went through three rings of it.
    let deadline = Instant::now() + LONG_WAIT;
    while flood.taken() < 3 * 1024 {
        assert!(Instant::now() < deadline, "the flood never got going");
        thread::sleep(Duration::from_millis(10));
    }
    let other_vm = RoundTrips::start(gb, 1, 1024, b_data);
    let other_port = RoundTrips::start(ga, 1, 1024, a_data);
    let flood_before = flood.taken();
    let deadline = Instant::now() + LONG_WAIT;
    while other_vm.rounds("round trips") < 20 || other_port.rounds("round trips") < 20 {
        assert!(
            Instant::now() < deadline,
            "starved: {} round trips on the linked VM and {} on a's other port while the \
             device took {} worst-case chains; log:\n{}",
            other_vm.rounds("round trips"),
            other_port.rounds("round trips"),
            flood.taken() - flood_before,
            b.process.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
    // The flood went on meanwhile: all three were served side by side.
    let flood_during = flood.taken() - flood_before;
    let (vm_rounds, port_rounds) = (
        other_vm.finish("round trips"),
        other_port.finish("round trips"),
    );
    flood.finish();
    assert!(
        flood_during >= 16,
        "the flood stalled while the others ran: {flood_during} chains"
    );
    eprintln!(
        "while the device took {flood_during} worst-case chains of 1024 buffers: \
         {vm_rounds} round trips on the linked VM, {port_rounds} on a's other port"
    );
    b.wait_stat("b", "data", "to_host_bytes", 4096 * vm_rounds);
    b.wait_stat("a", "data", "to_host_bytes", 4096 * port_rounds);
    assert_eq!(b.stat("a", "console", "bad_chains"), 0);
    b.assert_running();
}
