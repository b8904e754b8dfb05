//! `netmux_load`: a polling load generator for vhost-user-net backends (vhost-user-netmux, or
//! DPDK's `net_vhost` in testpmd for comparison), built on the frontend harness.
//!
//! It plays two guests from one polling thread: a sender on `--tx-socket` that keeps its
//! transmit ring full of one frame, and (for guest-to-guest runs) a receiver on `--rx-socket`
//! that keeps its receive ring full of buffers. No interrupts. At the end it prints one JSON line:
//! frames and bytes sent and received, Mpps and Gbps (of frames received in guest-to-guest runs,
//! of frames sent otherwise), the rate the backend took frames from the sender (`ingest_mpps`)
//! and, with `--pid`, the backend's CPU seconds per million frames.
//!
//! ```text
//! netmux_load --tx-socket g0.sock --rx-socket g1.sock --dst-mac 52:54:00:77:00:02 \
//!     --src-mac 52:54:00:77:00:01 --size 64 --seconds 10 --pid $(pidof vhost-user-netmux)
//! ```
//! Without `--rx-socket` frames go to `--dst-mac` and the receiver is whatever the backend
//! forwards them to (e.g. its uplink). `--size 65536` sends TCP segmentation (TSO) frames.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use devshare_integration::frontend::{
    Connection, DriverQueue, GuestBuffer, GuestRam, Segment, VhostUserProtocolFeatures,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const HDR: usize = 12;
/// Ring size of both guests (the largest vhost-user-netmux offers).
const QUEUE: u16 = 1024;

fn usage() -> ! {
    eprintln!(
        "usage: netmux_load --tx-socket PATH [--rx-socket PATH] --src-mac MAC --dst-mac MAC \
         [--size BYTES] [--seconds N] [--pid PID]\n\
         Frame sizes are Ethernet frame lengths; 65536 sends TCP/IPv4 TSO frames."
    );
    std::process::exit(2)
}

struct Args {
    tx: PathBuf,
    rx: Option<PathBuf>,
    src: [u8; 6],
    dst: [u8; 6],
    size: usize,
    seconds: u64,
    pid: Option<u32>,
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    v.try_into().unwrap_or_else(|_| usage())
}

fn args() -> Args {
    let mut a = Args {
        tx: PathBuf::new(),
        rx: None,
        src: [0x52, 0x54, 0, 0x77, 0, 1],
        dst: [0x52, 0x54, 0, 0x77, 0, 2],
        size: 64,
        seconds: 10,
        pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--tx-socket" => a.tx = v().into(),
            "--rx-socket" => a.rx = Some(v().into()),
            "--src-mac" => a.src = parse_mac(&v()),
            "--dst-mac" => a.dst = parse_mac(&v()),
            "--size" => a.size = v().parse().unwrap_or_else(|_| usage()),
            "--seconds" => a.seconds = v().parse().unwrap_or_else(|_| usage()),
            "--pid" => a.pid = Some(v().parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    if a.tx.as_os_str().is_empty() || a.size < 60 || a.size > 65536 + 14 {
        usage();
    }
    a
}

fn features() -> u64 {
    1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | VHOST_USER_F_PROTOCOL_FEATURES
}

fn open(path: &PathBuf, ram: &GuestRam) -> (Connection, DriverQueue, DriverQueue) {
    let mut c = Connection::connect(path).expect("connect");
    // vhost-user-net answers GET_QUEUE_NUM in queue pairs (netmux and DPDK alike).
    c.device_counts_queue_pairs();
    c.handshake(
        features(),
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .expect("handshake");
    c.set_mem_table(ram).expect("mem table");
    let rx = c.start_queue(ram, 0, QUEUE).expect("rx queue");
    let tx = c.start_queue(ram, 1, QUEUE).expect("tx queue");
    (c, rx, tx)
}

/// The frame: virtio-net header, Ethernet, IPv4, TCP, payload. TSO above 1514 bytes.
fn build_frame(a: &Args) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    let tso = a.size > 1514;
    if tso {
        f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        f[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        f[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        f[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    f.extend_from_slice(&a.dst);
    f.extend_from_slice(&a.src);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip_len = (a.size - 14).min(65535) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (ip_len >> 8) as u8,
        ip_len as u8,
        0,
        0,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    f.extend_from_slice(&[10, 77, 0, 1, 10, 77, 0, 2]);
    f.extend_from_slice(&[
        0x13, 0x88, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff,
    ]);
    f.extend_from_slice(&[0, 0, 0, 0]);
    while f.len() < HDR + a.size {
        f.push(0x5a);
    }
    f
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// The receiving guest: a ring kept full of buffers, refilled as the device uses them.
struct Receiver {
    _conn: Connection,
    rx: DriverQueue,
    bufs: Vec<GuestBuffer>,
    by_head: Vec<usize>,
    frames: u64,
    bytes: u64,
}

impl Receiver {
    fn open(path: &PathBuf, ram: &GuestRam, buf_len: u32) -> Receiver {
        let (conn, mut rx, _tx) = open(path, ram);
        rx.disable_calls();
        let bufs: Vec<GuestBuffer> = (0..QUEUE).map(|_| ram.alloc(buf_len).unwrap()).collect();
        let mut by_head = vec![0usize; usize::from(QUEUE)];
        for (i, b) in bufs.iter().enumerate() {
            let head = rx.add_chain(&[Segment::writable(*b)]).unwrap();
            by_head[usize::from(head)] = i;
        }
        rx.kick().unwrap();
        Receiver {
            _conn: conn,
            rx,
            bufs,
            by_head,
            frames: 0,
            bytes: 0,
        }
    }

    /// Takes what arrived and posts its buffers again; returns whether anything did.
    fn poll(&mut self) -> bool {
        let mut any = false;
        while let Ok(Some(u)) = self.rx.poll_used() {
            any = true;
            self.frames += 1;
            self.bytes += u64::from(u.len).saturating_sub(HDR as u64);
            let i = self.by_head[usize::from(u.head)];
            let head = self
                .rx
                .add_chain(&[Segment::writable(self.bufs[i])])
                .unwrap();
            self.by_head[usize::from(head)] = i;
        }
        if any {
            let _ = self.rx.kick();
        }
        any
    }
}

fn main() {
    let a = args();
    let frame = build_frame(&a);
    // Receiver first, so its buffers are there when frames arrive.
    let buf_len: u32 = if a.size > 1514 { 65600 } else { 2048 };
    let rx_ram = GuestRam::new(u64::from(QUEUE) * u64::from(buf_len) + (8 << 20)).unwrap();
    let mut receiver = a.rx.as_ref().map(|p| Receiver::open(p, &rx_ram, buf_len));

    let ram = GuestRam::new(8 << 20).unwrap();
    let (_c, _rx, mut tx) = open(&a.tx, &ram);
    tx.disable_calls();
    let fb = ram.alloc(frame.len() as u32).unwrap();
    ram.fill(fb, &frame).unwrap();
    let cpu0 = a.pid.map(cpu_seconds);
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let mut sent: u64 = 0;
    // One thread drives both guests: on a 2-core machine a second polling thread would only
    // take turns with the first and with the backend under test.
    while Instant::now() < end {
        let mut added = false;
        while tx.free_descriptors() > 0 {
            tx.add_chain(&[Segment::readable(fb)]).unwrap();
            added = true;
        }
        if added {
            let _ = tx.kick();
        }
        while let Ok(Some(_)) = tx.poll_used() {
            sent += 1;
        }
        if let Some(r) = receiver.as_mut() {
            r.poll();
        }
        std::hint::spin_loop();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = a.pid.map(cpu_seconds).zip(cpu0).map(|(b, a)| b - a);
    // Frames still on their way count as received if they land shortly after.
    let settle = Instant::now() + Duration::from_millis(200);
    while Instant::now() < settle {
        if let Some(r) = receiver.as_mut() {
            r.poll();
        }
    }
    let (rcvd, rcvd_bytes) = receiver.as_ref().map_or((0, 0), |r| (r.frames, r.bytes));
    let counted = if a.rx.is_some() { rcvd } else { sent };
    let mpps = counted as f64 / elapsed / 1e6;
    let gbps = counted as f64 * a.size as f64 * 8.0 / elapsed / 1e9;
    let cpu_per_m = cpu.map(|c| c / (counted.max(1) as f64 / 1e6));
    println!(
        "{}",
        serde_json::json!({
            "size": a.size,
            "seconds": elapsed,
            "sent": sent,
            "received": rcvd,
            "received_bytes": rcvd_bytes,
            "mpps": mpps,
            "ingest_mpps": sent as f64 / elapsed / 1e6,
            "gbps": gbps,
            "backend_cpu_seconds": cpu,
            "cpu_s_per_mpkt": cpu_per_m,
        })
    );
}
