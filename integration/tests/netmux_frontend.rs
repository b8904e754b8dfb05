//! vhost-user-netmux driven by the frontend harness (a vhost-user front-end playing the guest
//! driver): counters match the frames sent, and malformed descriptor chains are refused and
//! counted while the process and the other port keep working. Needs root (the uplink is a
//! veth whose far end sits in a test namespace).

mod netmux_common;

use std::time::Duration;

use devshare_integration::frontend::{
    Connection, Descriptor, DriverQueue, FrontendListener, GuestBuffer, GuestRam, Segment,
    VhostUserProtocolFeatures, DESC_F_NEXT, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use netmux_common::*;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Upper bound of every wait for a readiness signal (a used buffer, a counter): only a
/// failure ever waits this long, so it is generous for a busy machine.
const WAIT: Duration = Duration::from_secs(60);
const HDR: usize = 12;

/// One port driven by the harness.
struct HarnessGuest {
    ram: GuestRam,
    conn: Connection,
    rx: DriverQueue,
    tx: DriverQueue,
}

fn mac_bytes(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x77, 0x00, (i + 1) as u8]
}

impl HarnessGuest {
    fn attach(nm: &Netmux, i: usize) -> HarnessGuest {
        Self::attach_with(nm, i, 0)
    }

    /// Like [`HarnessGuest::attach`], the driver also accepting the virtio features `extra`.
    fn attach_with(nm: &Netmux, i: usize, extra: u64) -> HarnessGuest {
        let conn = Connection::connect(Netmux::socket(nm.dir.path(), i)).unwrap();
        HarnessGuest::setup_with(conn, extra)
    }

    /// Drives an established connection like a guest driver of port `i` would.
    fn setup(conn: Connection) -> HarnessGuest {
        Self::setup_with(conn, 0)
    }

    fn setup_with(mut conn: Connection, extra: u64) -> HarnessGuest {
        let ram = GuestRam::new(16 << 20).unwrap();
        Self::negotiate(&mut conn, &ram, extra);
        // REPLY_ACK: each message below is answered once the device has handled it, so when
        // these return both rings run and frames for this guest land.
        let rx = conn.start_queue(&ram, 0, 256).unwrap();
        let tx = conn.start_queue(&ram, 1, 256).unwrap();
        HarnessGuest { ram, conn, rx, tx }
    }

    /// What QEMU sends a new connection before the rings: features and the memory table.
    fn negotiate(conn: &mut Connection, ram: &GuestRam, extra: u64) {
        // What QEMU asks for; the device offers only what it uses.
        conn.device_counts_queue_pairs();
        let agreed = conn
            .handshake(
                1 << VIRTIO_F_VERSION_1
                    | 1 << VIRTIO_NET_F_MRG_RXBUF
                    | VHOST_USER_F_PROTOCOL_FEATURES
                    | extra,
                VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK,
            )
            .unwrap();
        assert!(agreed.has(VIRTIO_F_VERSION_1));
        assert_eq!(
            agreed.acked_protocol,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
        );
        // GET_QUEUE_NUM counts queue pairs, as QEMU's vhost-user-net reads it.
        assert_eq!(agreed.queue_num, Some(1));
        assert_eq!(
            agreed.acked_features & extra,
            extra,
            "the device refused {extra:#x}"
        );
        conn.set_mem_table(ram).unwrap();
    }

    /// What QEMU does when its back-end came back after it vanished: a new connection to port
    /// `i` (features `extra` as before), and the rings handed over where the guest left them
    /// (from their used index: the dead back-end answered no GET_VRING_BASE).
    fn reconnect(&mut self, nm: &Netmux, i: usize, extra: u64) {
        let mut conn = Connection::connect(Netmux::socket(nm.dir.path(), i)).unwrap();
        Self::negotiate(&mut conn, &self.ram, extra);
        conn.attach_queue(&mut self.rx).unwrap();
        conn.attach_queue(&mut self.tx).unwrap();
        self.conn = conn;
    }

    /// Posts `n` receive buffers of 2 KiB.
    fn post_rx(&mut self, n: usize) -> Vec<GuestBuffer> {
        let bufs: Vec<_> = (0..n)
            .map(|_| {
                let b = self.ram.alloc(2048).unwrap();
                self.rx.add_chain(&[Segment::writable(b)]).unwrap();
                b
            })
            .collect();
        self.rx.kick().unwrap();
        bufs
    }

    /// Takes every frame the device has written into the RX ring so far and posts each buffer
    /// again. Returns the frames (virtio-net header included).
    fn drain_rx(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(u) = self.rx.poll_used().unwrap() {
            let d = self.rx.raw_read_desc(u.head).unwrap();
            out.push(self.ram.read_vec(d.addr, u.len as usize).unwrap());
            self.rx
                .add_chain(&[Segment::writable(GuestBuffer {
                    addr: d.addr,
                    len: 2048,
                })])
                .unwrap();
        }
        self.rx.kick().unwrap();
        out
    }

    /// Sends one buffer holding `bytes` and waits for the device to hand it back.
    fn send(&mut self, bytes: &[u8]) {
        let b = self.ram.alloc(bytes.len() as u32).unwrap();
        self.ram.fill(b, bytes).unwrap();
        self.tx.add_chain(&[Segment::readable(b)]).unwrap();
        self.tx.kick().unwrap();
        self.tx.wait_used(WAIT).unwrap();
    }

    /// Takes the interrupt each ring gets when it starts (see `devshare_common::vring`), for
    /// a test that counts interrupts.
    fn take_start_interrupts(&self) {
        for (q, name) in [(&self.rx, "RX"), (&self.tx, "TX")] {
            assert!(
                q.wait_call(WAIT).unwrap(),
                "no interrupt when the {name} ring started"
            );
        }
    }
}

/// virtio-net header (no offloads) + Ethernet frame of `len` bytes from `src` to `dst`.
fn frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < HDR + len {
        f.push((f.len() % 251) as u8);
    }
    f
}

fn uplink_counter(nm: &Netmux, key: &str) -> u64 {
    nm.stats()["uplink"][key].as_u64().unwrap()
}

#[test]
fn counters_match_the_frames_sent() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-counters", &ns.host_if, &ports, &[]);
    let mut a = HarnessGuest::attach(&nm, 0);
    let mut b = HarnessGuest::attach(&nm, 1);
    const N: usize = 100;
    b.post_rx(N + 1);
    for seq in 0..N as u32 {
        a.send(&frame(mac_bytes(1), mac_bytes(0), seq, 60 + seq as usize));
    }
    let used =
        b.rx.wait_used_n(N, WAIT)
            .unwrap_or_else(|e| panic!("{e}: {}", nm.stats()));
    for (k, u) in used.iter().enumerate() {
        let want = frame(mac_bytes(1), mac_bytes(0), k as u32, 60 + k);
        assert_eq!(u.len as usize, want.len(), "frame {k} length");
        let head_buf = b.rx.raw_read_desc(u.head).unwrap();
        let got = b.ram.read_vec(head_buf.addr, u.len as usize).unwrap();
        // num_buffers = 1 in the header; the rest as sent.
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(&got[HDR..], &want[HDR..], "frame {k} bytes");
    }
    // Forged source: dropped, counted, never delivered.
    for seq in 0..10 {
        a.send(&frame(
            mac_bytes(1),
            [0x52, 0x54, 0, 0x77, 0, 0x99],
            seq,
            60,
        ));
    }
    // Unknown unicast: out through the uplink.
    for seq in 0..5 {
        a.send(&frame([0x02, 0, 0, 0, 0, 0x42], mac_bytes(0), seq, 60));
    }
    // A marker behind them must be the very next frame port 1 receives.
    a.send(&frame(mac_bytes(1), mac_bytes(0), 0xdead, 64));
    let marker = b.rx.wait_used(WAIT).unwrap();
    let d = b.rx.raw_read_desc(marker.head).unwrap();
    let got = b.ram.read_vec(d.addr, marker.len as usize).unwrap();
    assert_eq!(&got[HDR + 14..HDR + 18], &0xdead_u32.to_be_bytes());

    let ok = eventually(WAIT, || {
        nm.port_counter(0, "tx_packets") == (N + 16) as u64
            && nm.port_counter(1, "rx_packets") == (N + 1) as u64
            && nm.port_counter(0, "drops/spoofed") == 10
            && uplink_counter(&nm, "tx_packets") == 5
    });
    assert!(ok, "counters: {}", nm.stats());
    let bytes: u64 = (0..N as u64).map(|k| 60 + k).sum::<u64>() + 64;
    assert_eq!(nm.port_counter(1, "rx_bytes"), bytes);
    assert_eq!(nm.port_counter(0, "rx_packets"), 0);
    assert_eq!(nm.port_counter(1, "tx_packets"), 0);
    drop(a.conn);
    drop(b.conn);
}

#[test]
fn malformed_chains_are_refused_and_the_others_keep_working() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let mut nm = Netmux::start("netmux-malformed", &ns.host_if, &ports, &[]);
    let mut a = HarnessGuest::attach(&nm, 0);
    let mut b = HarnessGuest::attach(&nm, 1);
    // Port 1's first receive buffer is one the device may only read.
    let ro = b.ram.alloc(2048).unwrap();
    b.rx.add_chain(&[Segment::readable(ro)]).unwrap();
    b.rx.kick().unwrap();

    // 1. A buffer outside guest memory.
    let ids = a.tx.raw_reserve(1).unwrap();
    a.tx.raw_write_desc(
        ids[0],
        Descriptor {
            addr: 1 << 40,
            len: 100,
            flags: 0,
            next: 0,
        },
    )
    .unwrap();
    a.tx.raw_publish(ids[0]);
    // 2. A loop: two descriptors pointing at each other.
    let lp = a.tx.raw_reserve(2).unwrap();
    let buf = a.ram.alloc(64).unwrap();
    for (i, &id) in lp.iter().enumerate() {
        a.tx.raw_write_desc(
            id,
            Descriptor {
                addr: buf.addr,
                len: 32,
                flags: DESC_F_NEXT,
                next: lp[1 - i],
            },
        )
        .unwrap();
    }
    a.tx.raw_publish(lp[0]);
    // 3. A bogus length running far past the end of memory.
    let huge = a.tx.raw_reserve(1).unwrap();
    a.tx.raw_write_desc(
        huge[0],
        Descriptor {
            addr: buf.addr,
            len: u32::MAX,
            flags: 0,
            next: 0,
        },
    )
    .unwrap();
    a.tx.raw_publish(huge[0]);
    // 4. A device-writable buffer on the transmit queue.
    let w = a.ram.alloc(100).unwrap();
    a.tx.add_chain(&[Segment::writable(w)]).unwrap();
    // 5. A head index past the ring.
    a.tx.raw_publish(5000);
    a.tx.kick().unwrap();
    let bad_chains = 5;

    // 6-8. Frames too short for a header, for an Ethernet header, and a segmentation request
    // without a checksum request.
    let short = a.ram.alloc(5).unwrap();
    a.tx.add_chain(&[Segment::readable(short)]).unwrap();
    let eth_short = a.ram.alloc((HDR + 10) as u32).unwrap();
    a.tx.add_chain(&[Segment::readable(eth_short)]).unwrap();
    let mut gso = frame(mac_bytes(1), mac_bytes(0), 1, 100);
    gso[1] = 1; // GSO_TCPV4
    gso[4] = 0x40; // gso_size 64, but flags lack NEEDS_CSUM
    let g = a.ram.alloc(gso.len() as u32).unwrap();
    a.ram.fill(g, &gso).unwrap();
    a.tx.add_chain(&[Segment::readable(g)]).unwrap();
    a.tx.kick().unwrap();
    let bad_frames = 3;

    let ok = eventually(WAIT, || {
        nm.port_counter(0, "drops/bad_chain") == bad_chains
            && nm.port_counter(0, "drops/bad_frame") == bad_frames
    });
    assert!(ok, "counters: {}\n{}", nm.stats(), nm.log());
    assert!(nm.process.is_running(), "netmux died:\n{}", nm.log());
    assert_eq!(
        nm.port_counter(1, "rx_packets"),
        0,
        "a malformed frame got through"
    );

    // A good frame meets port 1's read-only receive buffer: refused and counted there.
    a.send(&frame(mac_bytes(1), mac_bytes(0), 6, 80));
    let refused = b.rx.wait_used(WAIT).unwrap();
    assert_eq!(refused.len, 0);
    assert!(eventually(WAIT, || nm
        .port_counter(1, "drops/rx_bad_chain")
        == 1));
    // With proper buffers the port works, and so does the sender after all its bad chains.
    b.post_rx(8);
    a.send(&frame(mac_bytes(1), mac_bytes(0), 7, 80));
    let got = b.rx.wait_used(WAIT).unwrap();
    assert_eq!(got.len as usize, HDR + 80);
    assert!(nm.process.is_running(), "netmux died:\n{}", nm.log());
    assert_eq!(nm.port_counter(1, "rx_packets"), 1);
    drop(a.conn);
    drop(b.conn);
    nm.process.kill();
}

#[test]
fn private_mode_counts_blocked_unicast_between_ports() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start(
        "netmux-private-count",
        &ns.host_if,
        &ports,
        &["--mode", "private"],
    );
    let mut a = HarnessGuest::attach(&nm, 0);
    let mut b = HarnessGuest::attach(&nm, 1);
    b.post_rx(4);
    for seq in 0..7 {
        a.send(&frame(mac_bytes(1), mac_bytes(0), seq, 60));
    }
    // Broadcast from a guest leaves only through the uplink in private mode.
    a.send(&frame([0xff; 6], mac_bytes(0), 99, 60));
    let ok = eventually(WAIT, || {
        nm.port_counter(0, "drops/private") == 7 && uplink_counter(&nm, "tx_packets") == 1
    });
    assert!(ok, "counters: {}", nm.stats());
    assert_eq!(nm.port_counter(1, "rx_packets"), 0);
    assert!(b.rx.poll_used().unwrap().is_none());
    drop(a.conn);
    drop(b.conn);
}

#[test]
fn client_mode_dials_a_listening_front_end_and_redials_after_it_restarts() {
    let ns = NetNs::new();
    let mut client = PortSpec::new(1);
    client.client = true;
    let ports = vec![PortSpec::new(0), client];
    // The "QEMU" of port 1 listens (server=on); netmux dials it.
    let nm = Netmux::start("netmux-client", &ns.host_if, &ports, &[]);
    let path = Netmux::socket(nm.dir.path(), 1);
    for round in 0..2u32 {
        let listener = FrontendListener::bind(&path).unwrap();
        let conn = listener.accept(WAIT).unwrap();
        let mut b = HarnessGuest::setup(conn);
        let mut a = HarnessGuest::attach(&nm, 0);
        b.post_rx(2);
        a.send(&frame(mac_bytes(1), mac_bytes(0), round, 70));
        let got = b.rx.wait_used(WAIT).unwrap();
        assert_eq!(got.len as usize, HDR + 70, "round {round}");
        // Both "QEMUs" go away; the listening one comes back on the next round.
        drop(a.conn);
        drop(b.conn);
        drop(listener);
        let _ = std::fs::remove_file(&path);
    }
    assert!(nm.port_counter(1, "connects") >= 2, "{}", nm.stats());
}

/// A back-end killed after it published a frame in a guest's RX ring but before it interrupted
/// leaves the guest waiting for that interrupt with its used_event already passed. The next
/// process interrupts at its first frame for that ring whatever used_event says (as Linux's
/// vhost does after a ring starts); before, no later frame ever interrupted that guest and its
/// network stayed dead after the restart (a real-QEMU restart test saw it under load).
#[test]
fn after_a_restart_the_first_frame_interrupts_a_guest_that_missed_one() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let mut nm = Netmux::start("netmux-missed-irq", &ns.host_if, &ports, &[]);
    let event_idx = 1 << VIRTIO_RING_F_EVENT_IDX;
    let mut a = HarnessGuest::attach_with(&nm, 0, event_idx);
    a.take_start_interrupts();
    let mut b = HarnessGuest::attach(&nm, 1);
    a.post_rx(8);
    // used_event = 0: the guest wants to hear of the first frame.
    a.rx.enable_calls();
    b.send(&frame(mac_bytes(0), mac_bytes(1), 0, 70));
    // The interrupt comes, and is lost with the back-end: the frame stays unread and the
    // guest's used_event stays behind it, as if the process had died before interrupting.
    assert!(
        a.rx.wait_call(WAIT).unwrap(),
        "no interrupt for the first frame"
    );
    assert_ne!(a.rx.used_idx(), 0);

    nm.restart();
    a.reconnect(&nm, 0, event_idx);
    // The guest misses the interrupt of the ring's start too: the first frame must interrupt.
    a.take_start_interrupts();
    b = HarnessGuest::attach(&nm, 1);
    b.send(&frame(mac_bytes(0), mac_bytes(1), 1, 70));
    assert!(
        a.rx.wait_call(WAIT).unwrap(),
        "the restarted back-end published a frame (used index {}) and never interrupted\n{}",
        a.rx.used_idx(),
        nm.stats()
    );
    let seqs: Vec<u32> = a
        .drain_rx()
        .iter()
        .filter(|f| f.len() == HDR + 70)
        .map(|f| u32::from_be_bytes(f[HDR + 14..HDR + 18].try_into().unwrap()))
        .collect();
    assert_eq!(seqs, [0, 1]);
}

/// A back-end killed after it handed a guest's last frames back on its TX ring but before it
/// interrupted leaves the guest waiting for that interrupt (a driver whose TX ring was full
/// sleeps until its chains come back), and here nothing new ever comes: no later entry would
/// pass used_event. So a ring that starts interrupts the guest at once (a spurious interrupt
/// costs a driver nothing); before, the guest was never told its chains came back.
#[test]
fn after_a_restart_a_guest_that_missed_its_last_tx_interrupt_hears_of_it() {
    let ns = NetNs::new();
    let ports = [PortSpec::new(0)];
    let mut nm = Netmux::start("netmux-missed-tx-irq", &ns.host_if, &ports, &[]);
    let event_idx = 1 << VIRTIO_RING_F_EVENT_IDX;
    let mut a = HarnessGuest::attach_with(&nm, 0, event_idx);
    a.take_start_interrupts();
    // used_event = 0: the guest wants to hear of its first chain coming back.
    a.tx.enable_calls();
    let bytes = frame([0x02, 0, 0, 0, 0, 0x42], mac_bytes(0), 0, 60);
    let b = a.ram.alloc(bytes.len() as u32).unwrap();
    a.ram.fill(b, &bytes).unwrap();
    a.tx.add_chain(&[Segment::readable(b)]).unwrap();
    a.tx.kick().unwrap();
    // The interrupt comes and is lost with the back-end, as if it had died before sending it.
    assert!(a.tx.wait_call(WAIT).unwrap(), "no interrupt for the frame");
    assert_eq!(a.tx.used_idx(), 1);

    nm.restart();
    a.reconnect(&nm, 0, event_idx);
    assert!(
        a.tx.wait_call(WAIT).unwrap(),
        "the restarted back-end never told the guest of its used TX chain\n{}",
        nm.stats()
    );
    assert_eq!(a.tx.poll_used().unwrap().map(|u| u.len), Some(0));
}

/// A port whose RX ring is empty costs drops on that port only: the sender's frames are all
/// taken at once, another port receives everything meant for it, and nothing is queued up for
/// the starved port (its first frame after posting buffers is the next one sent).
#[test]
fn a_full_rx_ring_costs_drops_on_that_port_only() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..3).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-starved", &ns.host_if, &ports, &[]);
    let mut a = HarnessGuest::attach(&nm, 0);
    let mut starved = HarnessGuest::attach(&nm, 1);
    let mut c = HarnessGuest::attach(&nm, 2);
    const N: usize = 40;
    c.post_rx(2 * N);
    for seq in 0..N as u32 {
        // `send` waits until the frame is taken: a stalled TX ring would fail here.
        a.send(&frame(mac_bytes(1), mac_bytes(0), seq, 60));
        a.send(&frame(mac_bytes(2), mac_bytes(0), seq, 60));
    }
    // Broadcasts reach c and cost the starved port a drop each.
    for seq in 0..4 {
        a.send(&frame([0xff; 6], mac_bytes(0), 1000 + seq, 60));
    }
    let got = c.rx.wait_used_n(N + 4, WAIT).unwrap();
    assert_eq!(got.len(), N + 4);
    let ok = eventually(WAIT, || {
        nm.port_counter(1, "drops/rx_no_buffer") == (N + 4) as u64
            && nm.port_counter(2, "rx_packets") == (N + 4) as u64
    });
    assert!(ok, "counters: {}", nm.stats());
    assert_eq!(nm.port_counter(1, "rx_packets"), 0);
    assert_eq!(nm.port_counter(2, "drops/rx_no_buffer"), 0);
    assert_eq!(nm.port_counter(0, "tx_packets"), (2 * N + 4) as u64);

    starved.post_rx(4);
    a.send(&frame(mac_bytes(1), mac_bytes(0), 0xbeef, 64));
    let u = starved.rx.wait_used(WAIT).unwrap();
    let d = starved.rx.raw_read_desc(u.head).unwrap();
    let bytes = starved.ram.read_vec(d.addr, u.len as usize).unwrap();
    assert_eq!(&bytes[HDR + 14..HDR + 18], &0xbeef_u32.to_be_bytes());
    assert!(
        starved.rx.poll_used().unwrap().is_none(),
        "stale frames were queued"
    );
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// No busy polling: with guests attached, rings running and nothing to send, netmux sleeps.
/// A polling loop would burn the whole 3 s of one core; the bound leaves room for a busy
/// machine's wake-ups and is no speed goal.
#[test]
fn an_idle_switch_uses_no_cpu() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-idle", &ns.host_if, &ports, &[]);
    let mut a = HarnessGuest::attach(&nm, 0);
    let mut b = HarnessGuest::attach(&nm, 1);
    b.post_rx(8);
    a.post_rx(8);
    a.send(&frame(mac_bytes(1), mac_bytes(0), 1, 60));
    b.rx.wait_used(WAIT).unwrap();
    let pid = nm.process.pid().expect("netmux is running");
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(300),
        "netmux used {used:?} of CPU in 3 s of idleness"
    );
    // And it is awake when needed.
    a.send(&frame(mac_bytes(1), mac_bytes(0), 2, 60));
    b.rx.wait_used(WAIT).unwrap();
}

/// The MAC the spoofing tests forge: a guest's prefix, so captures record it.
const FORGED: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x99];

/// Anti-spoofing cannot be raced: while guests send frames, a second thread (a second vCPU)
/// keeps rewriting the source MAC in the very buffer being sent, between the real and a forged
/// one. Whatever netmux checked must be what goes out: no forged frame reaches the wire
/// (captured on the veth's far end, untagged and tagged), the host port (captured on its TAP),
/// or another guest (untagged and in VLAN 42). Spoofed drops show the race was on.
#[test]
fn a_source_mac_rewritten_while_frames_are_sent_never_gets_out() {
    let ns = NetNs::new();
    let mut ports: Vec<PortSpec> = (0..4).map(PortSpec::new).collect();
    ports[2].vlan = Some(42);
    ports[3].vlan = Some(42);
    let tap = ns.unique_name("nmxt");
    let nm = Netmux::start(
        "netmux-spoof-race",
        &ns.host_if,
        &ports,
        &["--host-port", &tap],
    );
    let wire = Capture::start(Some(&ns.name), &ns.peer);
    let host = Capture::start(None, &tap);
    let mut senders = [HarnessGuest::attach(&nm, 0), HarnessGuest::attach(&nm, 2)];
    let mut receivers = [HarnessGuest::attach(&nm, 1), HarnessGuest::attach(&nm, 3)];
    for r in receivers.iter_mut() {
        r.post_rx(200);
    }
    // One buffer per sender, sent over and over: broadcasts reach the other guest of the
    // same VLAN, the uplink and (untagged only) the host port.
    let mut bufs = Vec::new();
    for (g, i) in senders.iter().zip([0, 2]) {
        let f = frame([0xff; 6], mac_bytes(i), 7, 60);
        let b = g.ram.alloc(f.len() as u32).unwrap();
        g.ram.fill(b, &f).unwrap();
        bufs.push((g.ram.clone(), b, mac_bytes(i)[5]));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, bufs) = (stop.clone(), bufs.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for last in [FORGED[5], 0] {
                    for (ram, b, real) in &bufs {
                        let v = if last == 0 { *real } else { last };
                        ram.write(b.addr + (HDR + 6 + 5) as u64, &[v]).unwrap();
                    }
                }
                flips += 1;
            }
            for (ram, b, real) in &bufs {
                ram.write(b.addr + (HDR + 6 + 5) as u64, &[*real]).unwrap();
            }
            flips
        })
    };
    // At least ROUNDS rounds, then on until the race has shown both outcomes: the check saw
    // a forged MAC, and real frames went out everywhere. On a busy machine the flipper can
    // sit preempted in either state for many rounds, so this waits on those counts, not on
    // a number of rounds (the deadline only ends a run where the flipper never gets a core).
    const ROUNDS: usize = 60;
    const PER_ROUND: usize = 64;
    let mut received: Vec<Vec<u8>> = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    let spoofed =
        |nm: &Netmux| nm.port_counter(0, "drops/spoofed") + nm.port_counter(2, "drops/spoofed");
    let mut round = 0;
    while round < ROUNDS
        || !(spoofed(&nm) > 0
            && wire.frames().len() > 2
            && host.frames().len() > 1
            && received.len() > 2)
            && std::time::Instant::now() < deadline
    {
        round += 1;
        for (g, (_, b, _)) in senders.iter_mut().zip(&bufs) {
            for _ in 0..PER_ROUND {
                g.tx.add_chain(&[Segment::readable(*b)]).unwrap();
            }
            g.tx.kick().unwrap();
        }
        for g in senders.iter_mut() {
            g.tx.wait_used_n(PER_ROUND, WAIT).unwrap();
        }
        for r in receivers.iter_mut() {
            received.extend(r.drain_rx());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    // A marker behind everything: once it is seen, everything sent before it was too.
    for (g, i) in senders.iter_mut().zip([0usize, 2]) {
        g.send(&frame([0xff; 6], mac_bytes(i), 0xfeed, 60));
    }
    let marker = |f: &[u8]| f.len() >= 18 && f[14..18] == 0xfeed_u32.to_be_bytes();
    for r in receivers.iter_mut() {
        let ok = eventually(WAIT, || {
            let got = r.drain_rx();
            let done = got.iter().any(|f| marker(&f[HDR..]));
            received.extend(got);
            done
        });
        assert!(ok, "marker not received: {}", nm.stats());
    }
    let markers = |frames: &[CapturedFrame]| frames.iter().filter(|f| marker(&f.bytes)).count();
    assert!(
        wire.wait_for(WAIT, |f| markers(f) == 2),
        "markers not on the wire: {}",
        nm.stats()
    );
    assert!(
        host.wait_for(WAIT, |f| markers(f) == 1),
        "marker not at the host port: {}",
        nm.stats()
    );

    let spoofed = spoofed(&nm);
    let forged = |frames: &[CapturedFrame]| frames.iter().filter(|f| f.src == FORGED).count();
    let forged_rx = received
        .iter()
        .filter(|f| f.len() >= HDR + 12 && f[HDR + 6..HDR + 12] == FORGED)
        .count();
    let (wire_frames, host_frames) = (wire.frames(), host.frames());
    eprintln!(
        "{round} rounds, {flips} flips; {spoofed} refused as spoofed; wire {} frames, host {}, guests {}",
        wire_frames.len(),
        host_frames.len(),
        received.len()
    );
    assert_eq!(forged(&wire_frames), 0, "forged frames on the wire");
    assert_eq!(forged(&host_frames), 0, "forged frames at the host port");
    assert_eq!(forged_rx, 0, "forged frames reached another guest");
    // The race was on: the check saw forged MACs, and real frames passed too.
    assert!(
        spoofed > 0,
        "the flipper never hit the check: {}",
        nm.stats()
    );
    assert!(wire_frames.len() > 2 && host_frames.len() > 1 && received.len() > 2);
    // Tagged frames from the VLAN 42 guest leave tagged; nothing from VLAN 42 reaches the host.
    assert!(wire_frames
        .iter()
        .all(|f| (f.src == mac_bytes(2)) == (f.vlan == Some(42))));
    assert!(host_frames.iter().all(|f| f.src == mac_bytes(0)));
}

/// A frame from `src` to `dst` whose Ethernet type field is `ethertype`, followed by `rest`
/// (a VLAN tag's other half and an inner type, say) and padding to 60 bytes.
fn raw_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, rest: &[u8], seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(rest);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(HDR + 60, 0);
    f
}

/// From the wire, an access port gets a frame only with exactly its own 802.1Q tag, which is
/// taken off: double-tagged (QinQ) and 802.1ad S-tagged frames reach no guest and are counted
/// (`rx_double_tagged`, `rx_s_tagged`). The kernel takes the outer tag off before netmux reads
/// the frame and reports it with its TPID (PACKET_AUXDATA): the path frames from a real NIC
/// take.
#[test]
fn qinq_and_s_tagged_frames_from_the_wire_reach_no_access_port() {
    let ns = NetNs::new();
    let mut ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    ports[1].vlan = Some(10);
    let nm = Netmux::start("netmux-qinq", &ns.host_if, &ports, &[]);
    let mut g: Vec<HarnessGuest> = (0..2).map(|i| HarnessGuest::attach(&nm, i)).collect();
    for guest in g.iter_mut() {
        guest.post_rx(32);
    }
    let wire = WireSender::new(&ns);
    // Not a guest's MAC: the switch would drop it as a local source.
    const EXT: [u8; 6] = [0x02, 0x00, 0x00, 0x78, 0x00, 0x99];
    // `tags` (TPID, VLAN id) outermost first, the test's Ethernet type, `seq`.
    let tagged = |dst: [u8; 6], tags: &[(u16, u16)], seq: u32| {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&EXT);
        for &(tpid, vid) in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&seq.to_be_bytes());
        f.resize(f.len().max(60), 0);
        f
    };
    let (g0, g1) = (mac_bytes(0), mac_bytes(1));
    for f in [
        // QinQ with the port's VLAN outside, another inside; and with a priority tag outside.
        tagged(g1, &[(0x8100, 10), (0x8100, 20)], 1),
        tagged(g0, &[(0x8100, 0), (0x8100, 20)], 2),
        // 802.1ad S-tags, with and without a C-tag for the port inside.
        tagged(g1, &[(0x88a8, 10), (0x8100, 10)], 3),
        tagged(g1, &[(0x88a8, 10)], 4),
        tagged(g0, &[(0x88a8, 10)], 5),
    ] {
        wire.send(&f);
    }
    // One good frame per port, behind the others: the uplink is read in order, so once these
    // are in, the ones before have been dealt with.
    wire.send(&tagged(g0, &[], 100));
    wire.send(&tagged(g1, &[(0x8100, 10)], 101));
    // Every frame from EXT, whatever it carries after the addresses.
    let ours = |f: &Vec<u8>| f.len() >= HDR + 18 && f[HDR + 6..HDR + 12] == EXT;
    let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(), Vec::new()];
    let all_in = eventually(WAIT, || {
        for (k, guest) in g.iter_mut().enumerate() {
            got[k].extend(guest.drain_rx().into_iter().filter(ours));
        }
        got.iter().all(|frames| {
            frames.iter().any(|f| {
                f[HDR + 14..HDR + 18] == [0, 0, 0, 100] || f[HDR + 14..HDR + 18] == [0, 0, 0, 101]
            })
        })
    });
    assert!(all_in, "the good frames never arrived: {}", nm.stats());
    // Each guest got its good frame only, untagged.
    assert_eq!(got[0].len(), 1, "guest 0 got {:02x?}", got[0]);
    assert_eq!(&got[0][0][HDR..], &tagged(g0, &[], 100)[..]);
    assert_eq!(got[1].len(), 1, "guest 1 got {:02x?}", got[1]);
    // 60 bytes on the wire less the 4 of the tag.
    assert_eq!(&got[1][0][HDR..], &tagged(g1, &[], 101)[..56]);
    assert_eq!(uplink_counter(&nm, "rx_double_tagged"), 2, "{}", nm.stats());
    assert_eq!(uplink_counter(&nm, "rx_s_tagged"), 3, "{}", nm.stats());
}

/// Guests cannot leave their VLAN or talk to the wire's link-local protocols: a frame carrying
/// its own 802.1Q or 802.1ad tag, from an untagged or a tagged port, and frames to the
/// reserved group addresses 01:80:c2:00:00:00..0f (STP, LACP, 802.1X, ...) are dropped and
/// counted; none reaches the wire or another guest, and ordinary frames sent after them do.
#[test]
fn guest_vlan_tags_and_link_local_frames_stay_inside() {
    let ns = NetNs::new();
    let mut ports: Vec<PortSpec> = (0..4).map(PortSpec::new).collect();
    ports[2].vlan = Some(10);
    ports[3].vlan = Some(10);
    let nm = Netmux::start("netmux-tags", &ns.host_if, &ports, &[]);
    let wire = Capture::start(Some(&ns.name), &ns.peer);
    let mut g: Vec<HarnessGuest> = (0..4).map(|i| HarnessGuest::attach(&nm, i)).collect();
    g[1].post_rx(32);
    g[3].post_rx(32);
    const BCAST: [u8; 6] = [0xff; 6];
    let link_local = |last: u8| [0x01, 0x80, 0xc2, 0x00, 0x00, last];
    for sender in [0usize, 2] {
        let me = mac_bytes(sender);
        let frames = [
            // 802.1Q tag for VLAN 20, then ARP: VLAN hopping.
            raw_frame(BCAST, me, 0x8100, &[0x00, 20, 0x08, 0x06], 1),
            raw_frame(
                mac_bytes(sender + 1),
                me,
                0x8100,
                &[0x00, 10, 0x88, 0xb5],
                2,
            ),
            // 802.1ad (QinQ) outer tag.
            raw_frame(BCAST, me, 0x88a8, &[0x00, 30, 0x81, 0x00], 3),
            // STP BPDU (LLC), LACP, 802.1X EAPOL, and the last reserved address.
            raw_frame(link_local(0x00), me, 0x0026, &[0x42, 0x42, 0x03], 4),
            raw_frame(link_local(0x02), me, 0x8809, &[0x01], 5),
            raw_frame(link_local(0x03), me, 0x888e, &[0x01], 6),
            raw_frame(link_local(0x0f), me, 0x88b5, &[], 7),
        ];
        for f in &frames {
            g[sender].send(f);
        }
        // An ordinary broadcast behind them: once it arrived, the others had their chance.
        g[sender].send(&raw_frame(BCAST, me, 0x88b5, &[], 0xfeed));
    }
    let is_marker = |f: &[u8]| {
        f.len() >= 18 && f[12..14] == [0x88, 0xb5] && f[14..18] == 0xfeed_u32.to_be_bytes()
    };
    for r in [1usize, 3] {
        let got = g[r]
            .rx
            .wait_used(WAIT)
            .unwrap_or_else(|e| panic!("{e}: {}", nm.stats()));
        let d = g[r].rx.raw_read_desc(got.head).unwrap();
        let bytes = g[r].ram.read_vec(d.addr, got.len as usize).unwrap();
        assert!(
            is_marker(&bytes[HDR..]),
            "guest {r} got {:02x?} first",
            &bytes[HDR..]
        );
        assert!(g[r].rx.poll_used().unwrap().is_none(), "guest {r} got more");
    }
    assert!(
        wire.wait_for(WAIT, |f| f.iter().filter(|f| is_marker(&f.bytes)).count()
            == 2),
        "markers not on the wire: {:?}\n{}",
        wire.frames(),
        nm.stats()
    );
    let frames = wire.frames();
    assert!(
        frames.iter().all(|f| is_marker(&f.bytes)),
        "tagged or link-local frames on the wire: {frames:?}"
    );
    // The VLAN 10 guest's marker left tagged 10, the untagged guest's untagged.
    let vlans: Vec<Option<u16>> = frames.iter().map(|f| f.vlan).collect();
    assert_eq!(vlans, vec![None, Some(10)]);
    for sender in [0usize, 2] {
        assert_eq!(nm.port_counter(sender, "drops/tagged"), 3, "{}", nm.stats());
        assert_eq!(
            nm.port_counter(sender, "drops/link_local"),
            4,
            "{}",
            nm.stats()
        );
    }
}

/// One guest flooding the longest chains the ring allows cannot hold the others up: while
/// guest 0 keeps its TX ring full of indirect chains of 256 buffers (the queue size; one byte
/// each after the headers) and leaves in its RX ring only buffers too small for what comes,
/// guest 1's frames all reach guest 2, each one also offered to guest 0 (a broadcast) and
/// refused there without netmux walking those buffers again. The flood runs on throughout:
/// compared by counters, not by time.
#[test]
fn a_flood_of_the_longest_chains_does_not_hold_other_guests_up() {
    use devshare_integration::frontend::{QueueConfig, VIRTIO_RING_F_INDIRECT_DESC};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..3).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-flood", &ns.host_if, &ports, &[]);
    // Guest 0 by hand: indirect tables as large as the queue.
    let mut conn = Connection::connect(Netmux::socket(nm.dir.path(), 0)).unwrap();
    conn.device_counts_queue_pairs();
    conn.handshake(
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES,
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    let ram = GuestRam::new(16 << 20).unwrap();
    conn.set_mem_table(&ram).unwrap();
    let mut rx0 = conn.start_queue(&ram, 0, 256).unwrap();
    let cfg = QueueConfig {
        indirect_max: 256,
        ..QueueConfig::new(1, 256)
    };
    let mut tx0 = DriverQueue::new(&ram, cfg).unwrap();
    conn.attach_queue(&mut tx0).unwrap();
    // Its RX ring: 100 buffers of 13 bytes (the first must hold the 12-byte header), 1300
    // bytes in all, less than any of guest 1's frames needs.
    for _ in 0..100 {
        let b = ram.alloc(13).unwrap();
        rx0.add_chain(&[Segment::writable(b)]).unwrap();
    }
    rx0.kick().unwrap();
    let mut g1 = HarnessGuest::attach(&nm, 1);
    let mut g2 = HarnessGuest::attach(&nm, 2);
    g2.post_rx(250);

    let head = frame([0x02, 0, 0, 0, 0, 0x42], mac_bytes(0), 0, 0);
    let head_buf = ram.alloc(head.len() as u32).unwrap();
    ram.fill(head_buf, &head).unwrap();
    let byte = ram.alloc(1).unwrap();
    let mut segs = vec![Segment::readable(head_buf)];
    segs.extend((1..256).map(|_| Segment::readable(byte)));
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, flooded) = (stop.clone(), flooded.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                while tx0.free_descriptors() > 0 {
                    tx0.add_indirect_chain(&segs).unwrap();
                }
                tx0.kick().unwrap();
                tx0.wait_used(WAIT).expect("the flood is held up");
                let mut n = 1;
                while tx0.poll_used().unwrap().is_some() {
                    n += 1;
                }
                flooded.fetch_add(n, Ordering::Relaxed);
            }
            (tx0, conn)
        })
    };
    // The flood is under way before guest 1 starts.
    assert!(eventually(WAIT, || flooded.load(Ordering::Relaxed) >= 256));
    // Guest 1 sends in batches, and before each batch the flood has moved on since the last
    // one: the two run interleaved whatever the scheduler does (a busy machine can leave the
    // flooder without a core for all of a quick burst), and guest 2 must still get all.
    const N: usize = 200;
    const BATCH: usize = 20;
    let before = flooded.load(Ordering::Relaxed);
    let mut mark = before;
    for seq in 0..N as u32 {
        if seq as usize % BATCH == 0 {
            assert!(
                eventually(WAIT, || flooded.load(Ordering::Relaxed) > mark),
                "the flood stopped while guest 1 sent: {}",
                nm.stats()
            );
            mark = flooded.load(Ordering::Relaxed);
        }
        // Broadcasts: to guest 2, and to guest 0, whose buffers are too small.
        g1.send(&frame([0xff; 6], mac_bytes(1), seq, 1400));
    }
    let got = g2
        .rx
        .wait_used_n(N, WAIT)
        .unwrap_or_else(|e| panic!("{e}: {}", nm.stats()));
    let during = flooded.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let (_tx0, _conn) = flooder.join().unwrap();
    for (k, u) in got.iter().enumerate() {
        let d = g2.rx.raw_read_desc(u.head).unwrap();
        let bytes = g2.ram.read_vec(d.addr, u.len as usize).unwrap();
        assert_eq!(&bytes[HDR + 14..HDR + 18], &(k as u32).to_be_bytes());
    }
    eprintln!("guest 0 flooded {during} chains of 256 buffers while guest 1 sent {N} frames");
    assert!(
        during >= (N / BATCH) as u64,
        "the flood stopped while guest 1 sent"
    );
    assert_eq!(nm.port_counter(2, "rx_packets"), N as u64);
    assert_eq!(nm.port_counter(0, "drops/rx_no_buffer"), N as u64);
    assert_eq!(nm.port_counter(0, "drops/bad_chain"), 0, "{}", nm.stats());
    assert!(nm.port_counter(0, "tx_packets") >= before + during);
}

/// `rx_dropped` of the veth end netmux reads (root namespace): frames the veth itself lost.
fn veth_rx_dropped(ifname: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/statistics/rx_dropped"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Frames the kernel drops before netmux reads them (its AF_PACKET socket's buffer full) are
/// counted on the uplink (`rx_dropped`), so every frame from the wire is accounted for: netmux
/// is stopped (SIGSTOP) while 5000 frames arrive, which fill its socket after a few hundred,
/// and once it runs again `rx_packets + rx_dropped` is exactly what the wire delivered.
#[test]
fn frames_the_kernel_drops_before_netmux_reads_them_are_counted() {
    const N: u64 = 5000;
    const EXT: [u8; 6] = [0x02, 0x00, 0x00, 0x78, 0x00, 0x42];
    let ns = NetNs::new();
    let nm = Netmux::start("netmux-kdrops", &ns.host_if, &[PortSpec::new(0)], &[]);
    let wire = WireSender::new(&ns);
    let seen = |nm: &Netmux| uplink_counter(nm, "rx_packets") + uplink_counter(nm, "rx_dropped");
    let (seen_before, veth_before) = (seen(&nm), veth_rx_dropped(&ns.host_if));
    nm.process.signal(libc::SIGSTOP).unwrap();
    for seq in 0..N as u32 {
        // To no guest: each costs netmux only a table lookup once it runs again.
        wire.send(&raw_frame([0x02, 0, 0, 0x78, 0, 0x43], EXT, 0x88b5, &[], seq)[HDR..]);
    }
    let veth_lost = veth_rx_dropped(&ns.host_if) - veth_before;
    nm.process.signal(libc::SIGCONT).unwrap();
    let expected = seen_before + N - veth_lost;
    let ok = eventually(WAIT, || seen(&nm) >= expected);
    assert!(ok, "{veth_lost} lost on the veth: {}", nm.stats());
    assert_eq!(
        seen(&nm),
        expected,
        "{veth_lost} lost on the veth: {}",
        nm.stats()
    );
    assert!(
        uplink_counter(&nm, "rx_dropped") > 0,
        "netmux's socket held all {N} frames?: {}",
        nm.stats()
    );
}

/// The host port cannot take the uplink's own MAC (guests' frames for the uplink host would
/// go to the TAP instead) nor a guest's, tagged or not: netmux refuses to start and says why.
#[test]
fn the_host_port_refuses_the_uplinks_mac_and_a_guests() {
    let ns = NetNs::new();
    let uplink_mac = interface_mac(&ns.host_if);
    let dir = devshare_integration::qemu::ScratchDir::new("netmux-hostmac").unwrap();
    let tap = ns.unique_name("nmhm");
    for (mac, why) in [
        (uplink_mac.as_str(), "is the uplink"),
        ("52:54:00:77:00:05", "is port g0's"),
    ] {
        let args = [
            "--uplink".to_string(),
            format!("af-packet:{}", ns.host_if),
            "--port".into(),
            format!(
                "name=g0,socket={},mac=52:54:00:77:00:05,vlan=7",
                dir.path().join("g0.sock").display()
            ),
            "--host-port".into(),
            tap.clone(),
            "--host-mac".into(),
            mac.to_string(),
        ];
        let log = refused_start(&dir, &args);
        assert!(log.contains(why), "host MAC {mac}: {log}");
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists(),
            "the TAP was created before the check"
        );
    }
}

/// The MAC of interface `ifname`, as sysfs writes it.
fn interface_mac(ifname: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .unwrap()
        .trim()
        .to_string()
}

/// Starts netmux with `args` in `dir`, expects it to exit with an error, and returns its log.
fn refused_start(dir: &devshare_integration::qemu::ScratchDir, args: &[String]) -> String {
    let log = dir.path().join("netmux.log");
    let mut p =
        devshare_integration::process::BackendProcess::spawn("vhost-user-netmux", args, &log)
            .unwrap();
    let status = p.wait_exit(WAIT).unwrap();
    assert!(!status.success(), "started with {args:?}");
    p.log()
}

/// A guest port given the uplink interface's own MAC would take the frames meant for this
/// host: netmux refuses to start, names the port, and creates no socket.
#[test]
fn a_guest_port_with_the_uplinks_mac_is_refused() {
    let ns = NetNs::new();
    let uplink_mac = interface_mac(&ns.host_if);
    let dir = devshare_integration::qemu::ScratchDir::new("netmux-guestmac").unwrap();
    let socket = dir.path().join("g1.sock");
    let args = [
        "--uplink".to_string(),
        format!("af-packet:{}", ns.host_if),
        "--port".into(),
        format!(
            "name=g0,socket={},mac=52:54:00:77:00:05",
            dir.path().join("g0.sock").display()
        ),
        "--port".into(),
        format!("name=g1,socket={},mac={uplink_mac}", socket.display()),
    ];
    let log = refused_start(&dir, &args);
    assert!(
        log.contains(&format!(
            "port g1: MAC {uplink_mac} is the uplink {}'s own",
            ns.host_if
        )),
        "{log}"
    );
    assert!(!socket.exists(), "a socket was made before the check");
}

/// The host port's MAC is its TAP interface's own, not the source of whatever the host side
/// sends: frames the TAP passes on from other stations (as a TAP enslaved to a bridge does)
/// are dropped and counted (`host/rx_spoofed`) and leave the MAC alone, and a new address
/// given to the interface (`ip link set TAP address`) is followed.
#[test]
fn the_host_port_takes_its_mac_from_the_interface_not_from_frames() {
    const OTHER: [u8; 6] = [0x02, 0x00, 0x00, 0x78, 0x00, 0x77];
    let ns = NetNs::new();
    let tap = ns.unique_name("nmhf");
    let nm = Netmux::start(
        "netmux-hostmac-follow",
        &ns.host_if,
        &[PortSpec::new(0)],
        &["--host-port", &tap],
    );
    let mut g = HarnessGuest::attach(&nm, 0);
    g.post_rx(64);
    let host_mac = || nm.stats()["host"]["mac"].as_str().unwrap().to_string();
    let tap_mac = interface_mac(&tap);
    assert_eq!(host_mac(), tap_mac);
    let tap_bytes: Vec<u8> = tap_mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let tap_bytes: [u8; 6] = tap_bytes.try_into().unwrap();
    let host = WireSender::on_interface(&tap);
    let to_guest = |src: [u8; 6], seq: u32| raw_frame(mac_bytes(0), src, 0x88b5, &[], seq);
    // The test's frames (the host's own IPv6 chatter aside), by sequence number.
    let mut seqs = Vec::new();
    let take = |g: &mut HarnessGuest, seqs: &mut Vec<u32>| {
        for f in g.drain_rx() {
            if f.len() >= HDR + 18 && f[HDR + 12..HDR + 14] == [0x88, 0xb5] {
                seqs.push(u32::from_be_bytes(
                    f[HDR + 14..HDR + 18].try_into().unwrap(),
                ));
            }
        }
    };
    for seq in 0..3 {
        host.send(&to_guest(OTHER, seq)[HDR..]);
    }
    // Behind them, one from the interface's MAC: once it is in, the others were dealt with.
    host.send(&to_guest(tap_bytes, 100)[HDR..]);
    let ok = eventually(WAIT, || {
        take(&mut g, &mut seqs);
        seqs.contains(&100)
    });
    assert!(ok, "the host's own frame never arrived: {}", nm.stats());
    assert_eq!(seqs, [100], "{}", nm.stats());
    assert_eq!(nm.stats()["host"]["rx_spoofed"], 3, "{}", nm.stats());
    assert_eq!(host_mac(), tap_mac, "{}", nm.stats());
    // The operator gives the interface a new address: its frames get through.
    let set = std::process::Command::new("ip")
        .args(["link", "set", &tap, "address", "02:00:00:78:00:77"])
        .status()
        .unwrap();
    assert!(set.success());
    let mut seq = 200;
    let ok = eventually(WAIT, || {
        host.send(&to_guest(OTHER, seq)[HDR..]);
        seq += 1;
        take(&mut g, &mut seqs);
        seqs.iter().any(|&s| s >= 200)
    });
    assert!(
        ok,
        "frames from the new address never arrived: {}",
        nm.stats()
    );
    assert_eq!(host_mac(), "02:00:00:78:00:77", "{}", nm.stats());
}

/// `--mtu 68` holds on every path: frames of 1514 and 9000 bytes from a guest reach neither
/// another guest nor the wire, whether unicast or broadcast (`drops/oversize`), and a frame
/// from the wire longer than the MTU allows reaches no guest (`uplink/rx_oversize`); frames
/// of exactly MTU + 14 bytes get through everywhere.
#[test]
fn frames_longer_than_the_mtu_reach_neither_guests_nor_the_wire() {
    const EXT: [u8; 6] = [0x02, 0x00, 0x00, 0x78, 0x00, 0x68];
    const MAX: usize = 68 + 14;
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-mtu", &ns.host_if, &ports, &["--mtu", "68"]);
    let wire = Capture::start(Some(&ns.name), &ns.peer);
    let mut g: Vec<HarnessGuest> = (0..2).map(|i| HarnessGuest::attach(&nm, i)).collect();
    g[1].post_rx(64);
    let (me, peer) = (mac_bytes(0), mac_bytes(1));
    for (dst, len) in [(peer, 1514), (peer, 9000), (EXT, 1514), ([0xff; 6], 9000)] {
        g[0].send(&frame(dst, me, 1, len));
    }
    assert_eq!(nm.port_counter(0, "drops/oversize"), 4, "{}", nm.stats());
    let from_wire = WireSender::new(&ns);
    from_wire.send(&frame(peer, EXT, 2, 1514)[HDR..]);
    from_wire.send(&frame(peer, EXT, 3, MAX)[HDR..]);
    g[0].send(&frame(peer, me, 4, MAX));
    g[0].send(&frame(EXT, me, 5, MAX));
    // Readiness: the last frame of each path is in.
    let mut got = Vec::new();
    let ok = eventually(WAIT, || {
        got.extend(g[1].drain_rx());
        got.len() >= 2
    });
    assert!(ok, "the frames of MTU size never arrived: {}", nm.stats());
    assert!(
        wire.wait_for(WAIT, |f| f.iter().any(|f| f.src == me)),
        "the frame of MTU size never reached the wire: {}",
        nm.stats()
    );
    let lens: Vec<usize> = got.iter().map(|f| f.len() - HDR).collect();
    assert_eq!(lens, [MAX, MAX], "{}", nm.stats());
    let on_wire: Vec<usize> = wire
        .frames()
        .iter()
        .filter(|f| f.src == me)
        .map(|f| f.bytes.len())
        .collect();
    assert_eq!(on_wire, [MAX], "{}", nm.stats());
    assert_eq!(uplink_counter(&nm, "rx_oversize"), 1, "{}", nm.stats());
}
