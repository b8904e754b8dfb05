//! vhost-user-console driven by the frontend harness playing the guest's virtio-console
//! driver: the real backend process, real vhost-user messages, real Unix-socket endpoints.
//!
//! What a driver sees (features, config space, the control-queue conversation, data both
//! ways with and without indirect chains and EVENT_IDX, emergency writes), malformed input
//! refused and counted while a second VM of the same process keeps moving data, and the
//! port buffers: kept while no client listens, back-pressure on data ports, newest bytes
//! kept on the console.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use devshare_integration::console_backend::Console;
use devshare_integration::console_guest::*;
use devshare_integration::console_traffic::RoundTrips;
use devshare_integration::frontend::{
    Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use devshare_integration::testdata::pattern;

const WAIT: Duration = Duration::from_secs(10);

/// A vhost-user-console process serving the VMs named in `vms`, each with a `console` and a
/// `data` port on Unix sockets `<vm>-console.sock` / `<vm>-data.sock`.
struct Backend(Console);

impl Backend {
    fn start(label: &str, vms: &[&str], extra: &[&str]) -> Backend {
        let mut args: Vec<String> = Vec::new();
        for vm in vms {
            args.push("--vm".into());
            args.push(format!("{vm}={{dir}}/{vm}.sock"));
        }
        for vm in vms {
            for port in ["console", "data"] {
                args.push("-p".into());
                args.push(format!("{vm}/{port}=unix:{{dir}}/{vm}-{port}.sock"));
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ready: Vec<String> = vms.iter().map(|vm| format!("{vm}.sock")).collect();
        let ready: Vec<&str> = ready.iter().map(String::as_str).collect();
        Backend(Console::start(label, &args, &ready))
    }

    fn socket(&self, vm: &str) -> PathBuf {
        self.0.path(&format!("{vm}.sock"))
    }

    fn guest(&self, vm: &str, opts: GuestOptions) -> ConsoleGuest {
        ConsoleGuest::connect(self.socket(vm), opts).unwrap()
    }

    /// A client of port `port` of `vm` (the backend accepts it asynchronously).
    fn client(&self, vm: &str, port: &str) -> UnixStream {
        let s = UnixStream::connect(self.0.path(&format!("{vm}-{port}.sock"))).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    /// One counter of one port from the stats socket.
    fn stat(&self, vm: &str, port: &str, key: &str) -> u64 {
        self.0.stat(vm, port, key)
    }

    /// Waits until counter `key` of `vm/port` reaches `want`.
    fn wait_stat(&self, vm: &str, port: &str, key: &str, want: u64) {
        let reached = |p: &serde_json::Value| p[key].as_u64().is_some_and(|got| got >= want);
        let p = self
            .0
            .wait_port(vm, port, &format!("{key} >= {want}"), reached);
        assert_eq!(p[key].as_u64(), Some(want), "{vm}/{port} {key} overshot");
    }

    /// Waits until the backend's log contains `needle`.
    fn wait_log(&self, needle: &str) {
        self.0.wait_log(needle);
    }

    fn assert_running(&mut self) {
        assert!(
            self.0.process.is_running(),
            "backend died; log:\n{}",
            self.0.process.log()
        );
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// A guest of VM `vm` with both ports up.
fn up(b: &Backend, vm: &str, opts: GuestOptions) -> ConsoleGuest {
    let mut g = b.guest(vm, opts);
    g.bring_up(2).unwrap();
    g
}

#[test]
fn features_config_and_port_announcements() {
    let b = Backend::start("con-fe-proto", &["a"], &[]);
    let mut g = b.guest("a", GuestOptions::default());
    let offered = g.agreed.device_features;
    for (bit, name) in [
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (F_SIZE, "SIZE"),
        (F_MULTIPORT, "MULTIPORT"),
        (F_EMERG_WRITE, "EMERG_WRITE"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
    ] {
        assert!(
            offered & (1 << bit) != 0,
            "{name} not offered: {offered:#x}"
        );
    }
    // Two ports with MULTIPORT: 4 + 2 * (2 - 1) queues.
    assert_eq!(g.agreed.queue_num, Some(6));

    // cols, rows (no terminal behind a Unix socket: 0), max_nr_ports.
    let cfg = g.conn.get_config(0, 12).unwrap();
    assert_eq!(&cfg[0..4], &[0, 0, 0, 0]);
    assert_eq!(u32::from_le_bytes([cfg[4], cfg[5], cfg[6], cfg[7]]), 2);

    let seen = g.bring_up(2).unwrap();
    let of =
        |event: u16| -> Vec<&ControlMsg> { seen.iter().filter(|m| m.event == event).collect() };
    let added: Vec<u32> = of(DEVICE_ADD).iter().map(|m| m.id).collect();
    assert_eq!(added, vec![0, 1]);
    assert!(of(DEVICE_ADD).iter().all(|m| m.value == 1));
    let consoles: Vec<u32> = of(CONSOLE_PORT).iter().map(|m| m.id).collect();
    assert_eq!(consoles, vec![0], "only port 0 is the console");
    let names: Vec<(u32, String)> = of(PORT_NAME)
        .iter()
        .map(|m| (m.id, String::from_utf8(m.payload.clone()).unwrap()))
        .collect();
    assert_eq!(
        names,
        vec![(0, "console".to_string()), (1, "data".to_string())]
    );
    let opened: Vec<(u32, u16)> = of(PORT_OPEN).iter().map(|m| (m.id, m.value)).collect();
    assert_eq!(opened, vec![(0, 1), (1, 1)]);
    // For the console port CONSOLE_PORT comes before its PORT_OPEN, as Linux expects.
    let pos = |e: u16, id: u32| seen.iter().position(|m| m.event == e && m.id == id);
    assert!(pos(CONSOLE_PORT, 0) < pos(PORT_OPEN, 0));

    // Emergency write: one character through the config space reaches the console endpoint.
    let mut console = b.client("a", "console");
    g.conn.set_config(8, &[b'!', 0, 0, 0]).unwrap();
    assert_eq!(read_n(&mut console, 1), b"!");
    // Writes to the read-only part are ignored (and logged); the connection keeps working.
    g.conn.set_config(0, &[9, 9, 9, 9]).unwrap();
    b.wait_log("ignored config write of 4 bytes at offset 0");
    assert_eq!(g.conn.get_config(0, 4).unwrap(), vec![0, 0, 0, 0]);
    g.send(0, b"still here\n", 1).unwrap();
    assert_eq!(read_n(&mut console, 11), b"still here\n");
}

/// Guest -> endpoint and endpoint -> guest on both ports, for one set of ring features.
fn exchange(
    b: &Backend,
    opts: GuestOptions,
    seed: u32,
    data: &mut UnixStream,
    con: &mut UnixStream,
) {
    let mut g = up(b, "a", opts);
    assert_eq!(g.uses_indirect(), opts.indirect);
    assert_eq!(g.agreed.has(VIRTIO_RING_F_EVENT_IDX), opts.event_idx);

    // Guest to endpoint: 200 KiB in chains of up to 64 KiB, each split into 3 descriptors.
    let out = pattern(200 * 1024, seed);
    let reader = {
        let mut s = data.try_clone().unwrap();
        let n = out.len();
        thread::spawn(move || read_n(&mut s, n))
    };
    g.send(1, &out, 3).unwrap();
    assert!(reader.join().unwrap() == out, "data port output corrupted");
    g.send(0, b"console line\n", 2).unwrap();
    assert_eq!(read_n(con, 13), b"console line\n");

    // Endpoint to guest: receive chains of 2 x 700 bytes.
    g.post_rx(1, 16, 700, 2).unwrap();
    let input = pattern(100 * 1024, seed + 1);
    let writer = {
        let mut s = data.try_clone().unwrap();
        let input = input.clone();
        thread::spawn(move || s.write_all(&input).unwrap())
    };
    let got = g.recv_exact(1, input.len(), WAIT).unwrap();
    writer.join().unwrap();
    assert!(got == input, "data port input corrupted");
    g.post_rx(0, 4, 64, 1).unwrap();
    con.write_all(b"typed\n").unwrap();
    assert_eq!(g.recv_exact(0, 6, WAIT).unwrap(), b"typed\n");
    g.conn.disconnect();
}

#[test]
fn data_both_ways_with_indirect_and_event_idx_on_and_off() {
    let b = Backend::start("con-fe-data", &["a"], &[]);
    let mut data = b.client("a", "data");
    let mut con = b.client("a", "console");
    let mut total_out = 0;
    let mut total_in = 0;
    // Each combination on a fresh connection: the backend also survives three reconnects.
    for (i, (event_idx, indirect)) in [(true, true), (true, false), (false, true), (false, false)]
        .into_iter()
        .enumerate()
    {
        let opts = GuestOptions {
            event_idx,
            indirect,
            ..GuestOptions::default()
        };
        exchange(&b, opts, 10 * i as u32, &mut data, &mut con);
        total_out += 200 * 1024;
        total_in += 100 * 1024;
        b.wait_stat("a", "data", "to_host_bytes", total_out);
        b.wait_stat("a", "data", "to_guest_bytes", total_in);
    }
    assert_eq!(b.stat("a", "data", "bad_chains"), 0);
    assert_eq!(b.stat("a", "console", "dropped_bytes"), 0);
}

/// VM `b`'s traffic, both ways through its data port, in a thread until stopped.
struct SteadyTraffic(RoundTrips);

const STEADY: &str = "the other VM's traffic";

impl SteadyTraffic {
    fn start(b: &Backend, vm: &str) -> SteadyTraffic {
        let g = up(b, vm, GuestOptions::default());
        SteadyTraffic(RoundTrips::start(g, 1, 512, b.client(vm, "data")))
    }

    /// Waits until a few more rounds went through than when called.
    fn check_moving(&self, after: &str) {
        self.0.check_moving(STEADY, after, WAIT);
    }

    fn finish(self) -> u64 {
        self.0.finish(STEADY)
    }
}

/// Publishes a chain of raw descriptors on queue `q` (the first one is the head) and kicks.
fn publish_raw(g: &mut ConsoleGuest, q: u16, descs: &[Descriptor]) -> u16 {
    let queue = g.queue(q).unwrap();
    let ids = queue.raw_reserve(descs.len()).unwrap();
    for (k, d) in descs.iter().enumerate() {
        let mut d = *d;
        if d.flags & DESC_F_NEXT != 0 && d.next == u16::MAX {
            // "the next one of this chain"
            d.next = ids[k + 1];
        }
        queue.raw_write_desc(ids[k], d).unwrap();
    }
    queue.raw_publish(ids[0]);
    queue.notify().unwrap();
    ids[0]
}

/// Waits for the refused chain `head` to come back used with length 0.
fn expect_refused(g: &mut ConsoleGuest, q: u16, head: u16) {
    let used = g.queue(q).unwrap().wait_used(WAIT).unwrap();
    assert_eq!((used.head, used.len), (head, 0));
}

#[test]
fn malformed_input_is_refused_and_counted_while_another_vm_keeps_moving() {
    let mut b = Backend::start("con-fe-evil", &["a", "b"], &[]);
    let other = SteadyTraffic::start(&b, "b");
    other.check_moving("start");

    let mut g = up(&b, "a", GuestOptions::default());
    let mut data = b.client("a", "data");
    let (rxq, txq) = port_queues(1);
    let buf = g.ram.alloc(4096).unwrap();
    g.ram.fill(buf, &pattern(4096, 7)).unwrap();
    let ram_end = g.options().ram;
    let mut refused = 0;
    let mut check = |b: &mut Backend, g: &mut ConsoleGuest, data: &mut UnixStream, what: &str| {
        refused += 1;
        b.wait_stat("a", "data", "bad_chains", refused);
        b.wait_log("refused descriptor chain");
        b.assert_running();
        // The same connection still carries data.
        let msg = format!("after {what}\n");
        g.send(1, msg.as_bytes(), 1).unwrap();
        assert_eq!(read_n(data, msg.len()), msg.as_bytes(), "after {what}");
        other.check_moving(what);
    };

    // A buffer outside guest memory, on the transmit queue.
    let outside = Descriptor {
        addr: ram_end + 4096,
        len: 64,
        flags: 0,
        next: 0,
    };
    let h = publish_raw(&mut g, txq, &[outside]);
    expect_refused(&mut g, txq, h);
    check(&mut b, &mut g, &mut data, "a buffer outside guest memory");

    // A buffer straddling the end of guest memory.
    let straddle = Descriptor {
        addr: ram_end - 16,
        len: 64,
        flags: 0,
        next: 0,
    };
    let h = publish_raw(&mut g, txq, &[straddle]);
    expect_refused(&mut g, txq, h);
    check(
        &mut b,
        &mut g,
        &mut data,
        "a buffer across the end of memory",
    );

    // A huge length at a valid address.
    let huge = Descriptor {
        addr: buf.addr,
        len: u32::MAX,
        flags: 0,
        next: 0,
    };
    let h = publish_raw(&mut g, txq, &[huge]);
    expect_refused(&mut g, txq, h);
    check(&mut b, &mut g, &mut data, "a 4 GiB descriptor");

    // Only device-writable buffers on a transmit queue.
    let writable = Descriptor {
        addr: buf.addr,
        len: 64,
        flags: DESC_F_WRITE,
        next: 0,
    };
    let h = publish_raw(&mut g, txq, &[writable]);
    expect_refused(&mut g, txq, h);
    check(&mut b, &mut g, &mut data, "a writable-only transmit chain");

    // A readable descriptor after a writable one.
    let h = publish_raw(
        &mut g,
        txq,
        &[
            Descriptor {
                addr: buf.addr,
                len: 64,
                flags: DESC_F_WRITE | DESC_F_NEXT,
                next: u16::MAX,
            },
            Descriptor {
                addr: buf.addr + 64,
                len: 64,
                flags: 0,
                next: 0,
            },
        ],
    );
    expect_refused(&mut g, txq, h);
    check(&mut b, &mut g, &mut data, "readable after writable");

    // A next-loop: two descriptors pointing at each other.
    {
        let q = g.queue(txq).unwrap();
        let ids = q.raw_reserve(2).unwrap();
        for (k, id) in ids.iter().enumerate() {
            let d = Descriptor {
                addr: buf.addr,
                len: 16,
                flags: DESC_F_NEXT,
                next: ids[1 - k],
            };
            q.raw_write_desc(*id, d).unwrap();
        }
        q.raw_publish(ids[0]);
        q.notify().unwrap();
        expect_refused(&mut g, txq, ids[0]);
    }
    check(&mut b, &mut g, &mut data, "a descriptor loop");

    // A next index past the table.
    let h = publish_raw(
        &mut g,
        txq,
        &[Descriptor {
            addr: buf.addr,
            len: 16,
            flags: DESC_F_NEXT,
            next: 9999,
        }],
    );
    expect_refused(&mut g, txq, h);
    check(&mut b, &mut g, &mut data, "a next index past the table");

    // Bad indirect tables: a length that is no multiple of 16, a table outside memory, an
    // indirect descriptor inside a table, and a table whose entries point outside memory.
    let table = g.ram.alloc(64).unwrap();
    let bad_tables: Vec<(&str, Descriptor, Vec<Descriptor>)> = vec![
        (
            "an indirect table of 17 bytes",
            Descriptor {
                addr: table.addr,
                len: 17,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
            vec![Descriptor {
                addr: buf.addr,
                len: 16,
                flags: 0,
                next: 0,
            }],
        ),
        (
            "an indirect table outside memory",
            Descriptor {
                addr: ram_end + 8192,
                len: 32,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
            vec![],
        ),
        (
            "a nested indirect table",
            Descriptor {
                addr: table.addr,
                len: 16,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
            vec![Descriptor {
                addr: table.addr,
                len: 16,
                flags: DESC_F_INDIRECT,
                next: 0,
            }],
        ),
        (
            "an indirect entry outside memory",
            Descriptor {
                addr: table.addr,
                len: 32,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
            vec![
                Descriptor {
                    addr: buf.addr,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: 1,
                },
                Descriptor {
                    addr: ram_end * 4,
                    len: 16,
                    flags: 0,
                    next: 0,
                },
            ],
        ),
        (
            "an indirect entry looping",
            Descriptor {
                addr: table.addr,
                len: 32,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
            vec![
                Descriptor {
                    addr: buf.addr,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: 1,
                },
                Descriptor {
                    addr: buf.addr,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: 0,
                },
            ],
        ),
    ];
    for (what, head, entries) in bad_tables {
        g.ram.write_descriptors(table.addr, &entries).unwrap();
        let h = publish_raw(&mut g, txq, &[head]);
        expect_refused(&mut g, txq, h);
        check(&mut b, &mut g, &mut data, what);
    }

    // A head index past the descriptor table: nothing can be handed back for it, but the
    // queue carries on with the next chain.
    {
        let q = g.queue(txq).unwrap();
        q.raw_publish(4000);
        q.notify().unwrap();
    }
    check(&mut b, &mut g, &mut data, "a head index past the table");

    // A readable-only chain on the receive queue (refused when the device goes for input).
    let h = publish_raw(
        &mut g,
        rxq,
        &[Descriptor {
            addr: buf.addr,
            len: 64,
            flags: 0,
            next: 0,
        }],
    );
    expect_refused(&mut g, rxq, h);
    check(&mut b, &mut g, &mut data, "a readable-only receive chain");
    // A receive buffer outside memory.
    let h = publish_raw(
        &mut g,
        rxq,
        &[Descriptor {
            addr: ram_end + 4096,
            len: 64,
            flags: DESC_F_WRITE,
            next: 0,
        }],
    );
    expect_refused(&mut g, rxq, h);
    check(&mut b, &mut g, &mut data, "a receive buffer outside memory");
    // Input still reaches the guest on the same connection.
    g.post_rx(1, 2, 256, 1).unwrap();
    data.write_all(b"input after abuse").unwrap();
    assert_eq!(g.recv_exact(1, 17, WAIT).unwrap(), b"input after abuse");

    // The avail index jumping past the ring: the device takes nothing from that queue...
    {
        let q = g.queue(txq).unwrap();
        let real = q.avail_idx();
        q.raw_set_avail_idx(real.wrapping_add(1000));
        q.notify().unwrap();
        b.wait_log("Iterator error");
        b.assert_running();
        other.check_moving("an avail index jump");
        // ...until the driver puts it right: then the same connection works again.
        q.raw_set_avail_idx(real);
    }
    g.send(1, b"ring repaired\n", 1).unwrap();
    assert_eq!(read_n(&mut data, 14), b"ring repaired\n");

    // Control messages: too short, for ports that do not exist, unknown events, a chain
    // outside memory. Each is logged and ignored.
    g.send_control_bytes(&[1, 2, 3, 4]).unwrap();
    b.wait_log("malformed control message");
    g.send_control(77, PORT_READY, 1).unwrap();
    g.send_control(77, PORT_OPEN, 1).unwrap();
    b.wait_log("control message for unknown port 77");
    g.send_control(0, 0x4242, 1).unwrap();
    b.wait_log("unexpected control event 16962");
    let h = publish_raw(
        &mut g,
        CONTROL_TX,
        &[Descriptor {
            addr: ram_end + 4096,
            len: 8,
            flags: 0,
            next: 0,
        }],
    );
    expect_refused(&mut g, CONTROL_TX, h);
    b.wait_log("refused control chain");
    b.assert_running();
    other.check_moving("bad control messages");
    // The control queue still answers: PORT_READY again gets the port's name.
    g.send_control(1, PORT_READY, 1).unwrap();
    let name = g
        .expect_control(WAIT, |m| m.id == 1 && m.event == PORT_NAME)
        .unwrap();
    assert_eq!(name.payload, b"data");

    // A driver that vanishes mid-abuse (ring still broken) and comes back: served afresh.
    {
        let q = g.queue(txq).unwrap();
        q.raw_set_avail_idx(q.avail_idx().wrapping_add(5000));
        q.notify().unwrap();
    }
    drop(g);
    let mut g = up(&b, "a", GuestOptions::default());
    g.send(1, b"new connection\n", 2).unwrap();
    assert_eq!(read_n(&mut data, 15), b"new connection\n");
    other.check_moving("a reconnect");

    b.assert_running();
    let rounds = other.finish();
    assert!(rounds > 0);
    // None of this was charged to the other VM.
    assert_eq!(b.stat("b", "data", "bad_chains"), 0);
    assert_eq!(b.stat("b", "console", "bad_chains"), 0);
}

#[test]
fn output_is_kept_while_no_client_listens_and_replayed_on_connect() {
    let b = Backend::start("con-fe-replay", &["a"], &[]);
    let mut g = up(&b, "a", GuestOptions::default());
    // Nobody listens on either port: every chain still completes.
    let early = pattern(30_000, 5);
    g.send(1, &early, 4).unwrap();
    g.send(0, b"boot message\n", 1).unwrap();
    assert_eq!(b.stat("a", "data", "to_host_bytes"), 0);
    let mut data = b.client("a", "data");
    let mut con = b.client("a", "console");
    assert!(read_n(&mut data, early.len()) == early, "replay corrupted");
    assert_eq!(read_n(&mut con, 13), b"boot message\n");
    // And what follows comes after it, in order.
    let late = pattern(5_000, 6);
    g.send(1, &late, 1).unwrap();
    assert!(read_n(&mut data, late.len()) == late);
    b.wait_stat(
        "a",
        "data",
        "to_host_bytes",
        (early.len() + late.len()) as u64,
    );
    assert_eq!(b.stat("a", "data", "dropped_bytes"), 0);
}

/// Waits a moment and checks that nothing more came back used on `q`.
fn assert_no_more_used(g: &mut ConsoleGuest, q: u16, why: &str) {
    thread::sleep(Duration::from_millis(300));
    assert_eq!(g.queue(q).unwrap().poll_used().unwrap(), None, "{why}");
}

#[test]
fn full_data_buffer_holds_the_guest_back_until_a_client_drains_it() {
    let b = Backend::start("con-fe-backpressure", &["a"], &["--buffer-size", "4K"]);
    let mut g = up(&b, "a", GuestOptions::default());
    let (_, txq) = port_queues(1);
    let chunks: Vec<Vec<u8>> = (0..12).map(|i| pattern(1024, 100 + i)).collect();
    let mut heads = Vec::new();
    for c in &chunks {
        heads.push(g.submit(1, c, 2).unwrap());
    }
    // 4 KiB of buffer: the first four chains are taken, the rest wait in the ring.
    let used = g.queue(txq).unwrap().wait_used_n(4, WAIT).unwrap();
    assert_eq!(used.iter().map(|u| u.head).collect::<Vec<_>>(), heads[..4]);
    assert_no_more_used(&mut g, txq, "a full data buffer must hold the guest back");
    assert_eq!(b.stat("a", "data", "dropped_bytes"), 0);
    assert_eq!(g.queue(txq).unwrap().in_flight(), 8);

    // A client drains the buffer: the rest follows, nothing lost, in order.
    let mut data = b.client("a", "data");
    let got = read_n(&mut data, 12 * 1024);
    assert!(got == chunks.concat(), "back-pressured output corrupted");
    let rest = g.queue(txq).unwrap().wait_used_n(8, WAIT).unwrap();
    assert_eq!(rest.iter().map(|u| u.head).collect::<Vec<_>>(), heads[4..]);
    b.wait_stat("a", "data", "to_host_bytes", 12 * 1024);
    assert_eq!(b.stat("a", "data", "dropped_bytes"), 0);

    // A client that stops reading holds the guest back the same way (socket and buffer full).
    let big = pattern(64 * 1024, 9);
    let mut sent = 0usize;
    let mut outstanding = 0u16;
    while sent < 8 << 20 {
        g.submit(1, &big, 1).unwrap();
        outstanding += 1;
        sent += big.len();
        while let Some(_u) = g.queue(txq).unwrap().poll_used().unwrap() {
            outstanding -= 1;
        }
        if outstanding >= 8 {
            // Give the device a chance; if it stays stuck, back-pressure is on.
            if g.queue(txq)
                .unwrap()
                .wait_used(Duration::from_millis(500))
                .is_err()
            {
                break;
            }
            outstanding -= 1;
        }
    }
    assert!(sent < 8 << 20, "8 MiB went into a client that never read");
    // Draining the socket lets everything through.
    let total = sent;
    let reader = thread::spawn(move || read_n(&mut data, total).len());
    let n = outstanding as usize;
    g.queue(txq).unwrap().wait_used_n(n, WAIT).unwrap();
    assert_eq!(reader.join().unwrap(), total);
}

#[test]
fn full_console_buffer_keeps_the_newest_bytes_and_counts_drops() {
    let b = Backend::start("con-fe-console-drop", &["a"], &["--buffer-size", "4K"]);
    let mut g = up(&b, "a", GuestOptions::default());
    // 16 KiB of console output, nobody listening: every chain completes (a console never
    // stalls the guest), the oldest 12 KiB are dropped and counted.
    let chunks: Vec<Vec<u8>> = (0..16).map(|i| pattern(1024, 200 + i)).collect();
    for c in &chunks {
        g.send(0, c, 1).unwrap();
    }
    b.wait_stat("a", "console", "dropped_bytes", 12 * 1024);
    let mut con = b.client("a", "console");
    let got = read_n(&mut con, 4 * 1024);
    assert!(
        got == chunks[12..].concat(),
        "the console must keep the newest 4 KiB"
    );
    // Nothing else is pending: the next line follows directly.
    g.send(0, b"after\n", 1).unwrap();
    assert_eq!(read_n(&mut con, 6), b"after\n");
    // One chain larger than the whole buffer: only its last 4 KiB survive.
    drop(con);
    let big = pattern(10 * 1024, 300);
    g.send(0, &big, 3).unwrap();
    b.wait_stat("a", "console", "dropped_bytes", 18 * 1024);
    let mut con = b.client("a", "console");
    assert!(read_n(&mut con, 4096) == big[6 * 1024..]);
}

#[test]
fn guest_to_guest_link_carries_data_both_ways_and_waits_for_the_receiver() {
    let b = Backend::start(
        "con-fe-link",
        &["a", "b"],
        &["-p", "a/link=vm:b/link", "-p", "b/link=vm:a/link"],
    );
    const LINK: usize = 2;
    let mut ga = b.guest("a", GuestOptions::default());
    ga.bring_up(3).unwrap();
    let mut gb = b.guest(
        "b",
        GuestOptions {
            event_idx: false,
            indirect: false,
            ..GuestOptions::default()
        },
    );
    gb.bring_up(3).unwrap();

    // b has no receive buffer yet: a's output is kept (its chains still complete)...
    let out = pattern(300 * 1024, 41);
    ga.send(LINK, &out, 3).unwrap();
    assert_eq!(b.stat("b", "link", "to_guest_bytes"), 0);
    // ...and arrives, in order, once b posts buffers.
    gb.post_rx(LINK, 16, 2048, 2).unwrap();
    let got = gb.recv_exact(LINK, out.len(), WAIT).unwrap();
    assert!(got == out, "a -> b over the link corrupted");

    // The other way, receiver ready first.
    ga.post_rx(LINK, 8, 8192, 1).unwrap();
    let back = pattern(100 * 1024, 42);
    gb.send(LINK, &back, 1).unwrap();
    let got = ga.recv_exact(LINK, back.len(), WAIT).unwrap();
    assert!(got == back, "b -> a over the link corrupted");

    b.wait_stat("a", "link", "to_host_bytes", out.len() as u64);
    b.wait_stat("b", "link", "to_guest_bytes", out.len() as u64);
    b.wait_stat("b", "link", "to_host_bytes", back.len() as u64);
    b.wait_stat("a", "link", "to_guest_bytes", back.len() as u64);
    assert_eq!(b.stat("a", "link", "bad_chains"), 0);
    assert_eq!(b.stat("b", "link", "bad_chains"), 0);
}
