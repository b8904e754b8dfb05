//! netmux's switch, fed through the path a guest's TX kick takes (`Fabric::transmit`): frames
//! with random virtio-net headers (checksum and segmentation requests, header lengths, offsets)
//! and random Ethernet, 802.1Q/802.1ad, ARP, IPv4 and IPv6 headers, from guests on access
//! ports with or without a VLAN, split over random descriptors, to guests with random offload
//! features, an uplink whose sends succeed or fail, and optionally a host port.
//!
//! Checked on everything that leaves the switch (what the uplink and host links are handed,
//! and every frame written into a guest's RX ring):
//! - no forged source MAC: each frame carries the sending port's MAC;
//! - no guest's own VLAN tag: nothing a guest tagged itself is forwarded, an untagged port's
//!   frames leave untagged and a tagged port's frames leave with exactly its tag, on the
//!   uplink only; guests only hear guests of their own VLAN, and never in private mode;
//! - no link-local group frames (01:80:c2:00:00:0x) anywhere;
//! - the bytes after the Ethernet header leave the sender unchanged on the links;
//! - counters add up: every chain taken is either a malformed chain, a malformed frame or a
//!   frame the port sent; a frame sent is dropped for exactly one reason or goes somewhere;
//!   every frame handed to a link is counted as sent or dropped on the sender and the link; a
//!   receiver counts every frame offered to it as received (and it is in its RX ring) or
//!   dropped; every TX chain comes back used.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use devshare_common::chain::{Memory, MemoryAtomic};
use devshare_common::daemon::Transport;
use devshare_common::listen::SocketOptions;
use devshare_common::ring::Signalled;
use vhost_user_backend::VringT;
use vhost_user_netmux::config::{Config, MacAddr, Mode, PortConfig, UplinkSpec};
use vhost_user_netmux::fabric::{Fabric, TxEnd, TxQueue};
use vhost_user_netmux::port::{RxPath, Vring};
use vhost_user_netmux::stats::{LinkCounters, PortCounters};
use vhost_user_netmux::uplink::{RxBatch, SendOutcome, TxBatch, Uplink};
use virtio_bindings::bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use crate::{seed_enum, seed_struct};

const QSIZE: u16 = 256;
const MEM_SIZE: u64 = 16 << 20;
/// Per port: TX rings, RX rings, TX buffers, RX buffers.
const PORT_SPAN: u64 = 4 << 20;
const TX_BUFFERS: u64 = 0x1_0000;
const RX_BUFFERS: u64 = 0x20_0000;
const RX_BUF_LEN: u32 = 4096;
const RX_POSTED: u16 = 64;
const WRITE: u16 = 2;
const NEXT: u16 = 1;
/// Largest frame built (a full TSO segment).
const MAX_PAYLOAD: usize = 65000;
const TPIDS: [u16; 5] = [0x8100, 0x88a8, 0x9100, 0x9200, 0x9300];
/// Frames queued before a pass at most (their buffers must fit the TX buffer area).
const MAX_BATCH: usize = 16;

fn bit(b: u32) -> u64 {
    1 << b
}

seed_enum! {
    /// A MAC address in a frame.
    pub enum Mac {
        /// Guest port `index`'s (modulo the ports there are).
        Port { index: u8 },
        Broadcast,
        /// An IPv4 (01:00:5e:...) or IPv6 (33:33:...) multicast group.
        Multicast { v6: bool, low: u8 },
        /// 01:80:c2:00:00:0x: STP, LACP, 802.1X and the like.
        LinkLocal { low: u8 },
        /// The host port's MAC.
        Host,
        Any { bytes: [u8; 6] },
    }
}

seed_enum! {
    /// The virtio-net header of a frame.
    pub enum Header {
        Plain,
        /// Checksum offload: start relative to the transport header, offset in it.
        Checksum { start_delta: i8, offset: u8 },
        /// Segmentation (with checksum offload, as a driver sends it).
        Segments { gso_type: u8, gso_size: u16, ecn: bool },
        /// Every field as given.
        Raw { flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, csum_start: u16, csum_offset: u16, num_buffers: u16 },
    }
}

seed_enum! {
    /// What follows the Ethernet header (and the guest's own tags, if any).
    pub enum Network {
        Arp { request: bool },
        Ipv4 { protocol: u8, options: u8, fragment: u16 },
        Ipv6 { next: u8, hop_by_hop: bool },
        Raw { ethertype: u16, bytes: Vec<u8> },
    }
}

seed_struct! {
    /// One frame a guest queues.
    pub struct TxFrame {
        pub from: u8,
        pub header: Header,
        pub dst: Mac,
        pub src: Mac,
        /// 802.1Q/802.1ad tags the guest puts in itself: (TPID index, VLAN id).
        pub tags: Vec<(u8, u16)>,
        pub network: Network,
        pub payload: u16,
        /// Where the frame's bytes are cut into descriptors.
        pub cuts: Vec<u16>,
        /// Cut the chain short of the frame's end, or give it a device-writable buffer.
        pub damage: u8,
        /// Kick (run a TX pass) after queueing this frame, rather than batching it with the
        /// next.
        pub kick: bool,
    }
}

seed_struct! {
    /// One guest port.
    pub struct PortSpec {
        /// 0: untagged, 1: VLAN 10, 2: VLAN 20, else the id given (as an access port).
        pub vlan: (u8, u16),
        /// Which offloads the guest negotiated, by bit: GUEST_CSUM, GUEST_TSO4, GUEST_TSO6,
        /// GUEST_ECN, GUEST_USO4, GUEST_USO6, MRG_RXBUF, VERSION_1 (clear: legacy header).
        pub features: u8,
        /// RX buffers the guest posts.
        pub rx_buffers: u8,
    }
}

seed_struct! {
    /// A switch and the frames its guests send.
    pub struct Input {
        pub ports: Vec<PortSpec>,
        pub private: bool,
        /// A host port, and the last byte of its MAC.
        pub host: Option<u8>,
        /// How the uplink fares: 0 sends, 1 is busy, 2 refuses; the host port likewise.
        pub uplink: u8,
        pub host_link: u8,
        pub frames: Vec<TxFrame>,
    }
}

fn port_mac(i: usize) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0x12, 0x34, i as u8 + 1])
}

fn host_mac(low: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0x0f, low])
}

fn is_link_local(m: &[u8]) -> bool {
    m[..5] == [0x01, 0x80, 0xc2, 0, 0] && m[5] & 0xf0 == 0
}

/// A host-side link that keeps what it is handed and answers each frame with `outcome`.
struct Recorder {
    name: &'static str,
    outcome: SendOutcome,
    sent: Mutex<Vec<(Vec<u8>, SendOutcome)>>,
}

impl Uplink for Recorder {
    fn describe(&self) -> String {
        format!("fuzz:{}", self.name)
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        static NULL: OnceLock<std::fs::File> = OnceLock::new();
        let f = NULL.get_or_init(|| match std::fs::File::open("/dev/null") {
            Ok(f) => f,
            Err(e) => panic!("cannot open /dev/null: {e}"),
        });
        std::os::fd::AsRawFd::as_raw_fd(f)
    }

    fn send(&self, batch: &mut TxBatch) {
        batch.set_outcomes(self.outcome);
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..batch.len() {
            match batch.copy_frame(i) {
                Some(f) => sent.push((f, self.outcome)),
                None => panic!("frame {i} of a batch of {} cannot be read", batch.len()),
            }
        }
    }

    fn recv(&self, _batch: &mut RxBatch) -> std::io::Result<usize> {
        Ok(0)
    }
}

/// A shared recorder, so the test can read what the fabric's boxed link was handed.
struct Shared(Arc<Recorder>);

impl Uplink for Shared {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.raw_fd()
    }
    fn send(&self, batch: &mut TxBatch) {
        self.0.send(batch)
    }
    fn recv(&self, batch: &mut RxBatch) -> std::io::Result<usize> {
        self.0.recv(batch)
    }
}

fn outcome(x: u8) -> SendOutcome {
    match x % 3 {
        0 => SendOutcome::Sent,
        1 => SendOutcome::Busy,
        _ => SendOutcome::Refused,
    }
}

/// A chain's descriptors: (guest address, length, flags).
type Descs = Vec<(u64, u32, u16)>;

/// The driver's side of a split queue in guest memory.
struct DriverRing {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
    /// Descriptor slots of each chain still with the device, by head.
    chains: Vec<Option<Descs>>,
    free: u16,
}

impl DriverRing {
    fn new(at: u64) -> DriverRing {
        DriverRing {
            desc: at,
            avail: at + 0x1000,
            used: at + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
            chains: vec![None; usize::from(QSIZE)],
            free: QSIZE,
        }
    }

    /// Makes a chain available; None if the table has no room.
    fn add(&mut self, mem: &Memory, descs: &[(u64, u32, u16)]) -> Option<u16> {
        let n = descs.len() as u16;
        if n == 0 || n > self.free {
            return None;
        }
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let slot = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | NEXT };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&((slot + 1) % QSIZE).to_le_bytes());
            put(mem, self.desc + 16 * u64::from(slot), &raw);
        }
        self.next_desc = (head + n) % QSIZE;
        self.free -= n;
        put(
            mem,
            self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE),
            &head.to_le_bytes(),
        );
        self.avail_idx = self.avail_idx.wrapping_add(1);
        put(mem, self.avail + 2, &self.avail_idx.to_le_bytes());
        self.chains[usize::from(head)] = Some(descs.to_vec());
        Some(head)
    }

    /// Used entries `(head, len, descriptors)` since the last call.
    fn used(&mut self, mem: &Memory) -> Vec<(u16, u32, Descs)> {
        let idx = u16::from_le_bytes(get::<2>(mem, self.used + 2));
        let n = idx.wrapping_sub(self.seen_used);
        assert!(n <= QSIZE, "the device published {n} used entries at once");
        let mut out = Vec::new();
        for _ in 0..n {
            let at = self.used + 4 + 8 * u64::from(self.seen_used % QSIZE);
            let id = u32::from_le_bytes(get::<4>(mem, at));
            let len = u32::from_le_bytes(get::<4>(mem, at + 4));
            let Some(descs) = usize::try_from(id)
                .ok()
                .and_then(|h| self.chains.get_mut(h))
                .and_then(Option::take)
            else {
                panic!("the device used chain {id}, which it did not have");
            };
            self.free += descs.len() as u16;
            out.push((id as u16, len, descs));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }

    fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.seen_used)
    }
}

fn put(mem: &Memory, at: u64, bytes: &[u8]) {
    if let Err(e) = mem.write_slice(bytes, GuestAddress(at)) {
        panic!("driver write at {at:#x} failed: {e}");
    }
}

fn get<const N: usize>(mem: &Memory, at: u64) -> [u8; N] {
    let mut b = [0u8; N];
    if let Err(e) = mem.read_slice(&mut b, GuestAddress(at)) {
        panic!("driver read at {at:#x} failed: {e}");
    }
    b
}

/// A guest's TX queue as the fabric drives it.
struct Tx {
    queue: Queue,
}

impl TxQueue for Tx {
    fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }
    fn interrupt(&mut self) {}
}

/// One guest: its port's settings, its TX queue and rings, its RX rings.
struct Guest {
    vlan: Option<u16>,
    features: u64,
    hdr_len: usize,
    tx: Tx,
    /// The TX ring's interrupt record.
    tx_signalled: Signalled,
    tx_ring: DriverRing,
    rx_ring: DriverRing,
    rx_buf: u64,
    /// RX buffers the guest keeps posted.
    rx_target: u16,
    /// A frame spread over several RX buffers, being put together.
    partial: Option<(Vec<u8>, u16)>,
}

fn mac_of(m: &Mac, ports: usize, host: Option<MacAddr>) -> [u8; 6] {
    match m {
        Mac::Port { index } => port_mac(usize::from(*index) % ports).0,
        Mac::Broadcast => [0xff; 6],
        Mac::Multicast { v6: false, low } => [0x01, 0, 0x5e, 0, 0, *low],
        Mac::Multicast { v6: true, low } => [0x33, 0x33, 0, 0, 0, *low],
        Mac::LinkLocal { low } => [0x01, 0x80, 0xc2, 0, 0, low & 0x0f],
        Mac::Host => host.unwrap_or(host_mac(1)).0,
        Mac::Any { bytes } => *bytes,
    }
}

/// The Ethernet frame (after the virtio-net header) and the header's checksum start, from a
/// frame description.
fn build_frame(f: &TxFrame, ports: usize, host: Option<MacAddr>) -> (Vec<u8>, usize) {
    let mut b = Vec::with_capacity(64 + usize::from(f.payload));
    b.extend_from_slice(&mac_of(&f.dst, ports, host));
    b.extend_from_slice(&mac_of(&f.src, ports, host));
    for &(tpid, vid) in f.tags.iter().take(3) {
        b.extend_from_slice(&TPIDS[usize::from(tpid) % TPIDS.len()].to_be_bytes());
        b.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    let payload = usize::from(f.payload).min(MAX_PAYLOAD);
    let l4;
    match &f.network {
        Network::Arp { request } => {
            b.extend_from_slice(&0x0806u16.to_be_bytes());
            b.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, if *request { 1 } else { 2 }]);
            b.extend_from_within(6..12);
            b.extend_from_slice(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
            l4 = b.len();
        }
        Network::Ipv4 {
            protocol,
            options,
            fragment,
        } => {
            let opts = usize::from(options % 11) * 4;
            b.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (20 + opts + 20 + payload).min(65535) as u16;
            b.push(0x45 + (opts / 4) as u8);
            b.push(0);
            b.extend_from_slice(&total.to_be_bytes());
            b.extend_from_slice(&[0x12, 0x34]);
            b.extend_from_slice(&fragment.to_be_bytes());
            b.extend_from_slice(&[64, *protocol, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
            b.resize(b.len() + opts, 1);
            l4 = b.len();
            transport(&mut b, *protocol, payload);
        }
        Network::Ipv6 { next, hop_by_hop } => {
            b.extend_from_slice(&0x86ddu16.to_be_bytes());
            let ext = if *hop_by_hop { 8 } else { 0 };
            b.extend_from_slice(&[0x60, 0, 0, 0]);
            b.extend_from_slice(&((ext + 20 + payload).min(65535) as u16).to_be_bytes());
            b.push(if *hop_by_hop { 0 } else { *next });
            b.push(64);
            b.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            b.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            if *hop_by_hop {
                b.extend_from_slice(&[*next, 0, 1, 4, 0, 0, 0, 0]);
            }
            l4 = b.len();
            transport(&mut b, *next, payload);
        }
        Network::Raw { ethertype, bytes } => {
            b.extend_from_slice(&ethertype.to_be_bytes());
            b.extend_from_slice(&bytes[..bytes.len().min(256)]);
            l4 = b.len();
        }
    }
    let fill = b.len();
    b.resize(fill + payload, 0);
    for (i, x) in b[fill..].iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(7).wrapping_add(f.from);
    }
    (b, l4)
}

/// A TCP (6) or UDP (17) header with zero checksum, or nothing for other protocols.
fn transport(b: &mut Vec<u8>, protocol: u8, payload: usize) {
    match protocol {
        6 => b.extend_from_slice(&[
            0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
        ]),
        17 => {
            let len = (8 + payload).min(65535) as u16;
            b.extend_from_slice(&[0x30, 0x39, 0, 53]);
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
        }
        _ => {}
    }
}

/// The virtio-net header for `f` (12 bytes; the legacy form is its first 10).
fn build_header(f: &TxFrame, frame: &[u8], l4: usize) -> [u8; 12] {
    let mut h = [0u8; 12];
    let (flags, gso_type, hdr_len, gso_size, start, offset, nb) = match &f.header {
        Header::Plain => (0, 0, 0, 0, 0, 0, 0),
        Header::Checksum {
            start_delta,
            offset,
        } => {
            let start = (l4 as i64 + i64::from(*start_delta)).clamp(0, 65535) as u16;
            (1, 0, 0, 0, start, u16::from(*offset), 0)
        }
        Header::Segments {
            gso_type,
            gso_size,
            ecn,
        } => {
            let t = [
                vn::VIRTIO_NET_HDR_GSO_TCPV4,
                vn::VIRTIO_NET_HDR_GSO_TCPV6,
                vn::VIRTIO_NET_HDR_GSO_UDP_L4,
                vn::VIRTIO_NET_HDR_GSO_UDP,
            ][usize::from(*gso_type) % 4] as u8;
            let t = if *ecn { t | 0x80 } else { t };
            let csum_off = if t & 0x7f == vn::VIRTIO_NET_HDR_GSO_UDP_L4 as u8 {
                6
            } else {
                16
            };
            let hdr = (l4 + if csum_off == 6 { 8 } else { 20 }).min(frame.len()) as u16;
            (1, t, hdr, *gso_size, l4 as u16, csum_off, 0)
        }
        Header::Raw {
            flags,
            gso_type,
            hdr_len,
            gso_size,
            csum_start,
            csum_offset,
            num_buffers,
        } => (
            *flags,
            *gso_type,
            *hdr_len,
            *gso_size,
            *csum_start,
            *csum_offset,
            *num_buffers,
        ),
    };
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&offset.to_le_bytes());
    h[10..12].copy_from_slice(&nb.to_le_bytes());
    h
}

/// The Ethernet frames one TX pass queued, as the guest wrote them.
struct Sent {
    frames: Vec<Vec<u8>>,
}

fn port_counters(c: &PortCounters) -> [u64; 21] {
    let d = &c.drops;
    [
        c.tx_packets.get(),
        c.rx_packets.get(),
        d.spoofed.get(),
        d.private.get(),
        d.hairpin.get(),
        d.tagged.get(),
        d.link_local.get(),
        d.oversize.get(),
        d.bad_chain.get(),
        d.bad_frame.get(),
        d.uplink_busy.get(),
        d.uplink_refused.get(),
        d.host_busy.get(),
        d.host_refused.get(),
        d.rx_no_buffer.get(),
        d.rx_too_big.get(),
        d.rx_offload.get(),
        d.rx_down.get(),
        d.rx_bad_chain.get(),
        c.tx_bytes.get(),
        c.rx_bytes.get(),
    ]
}
const TX_PACKETS: usize = 0;
const RX_PACKETS: usize = 1;
const SWITCH_DROPS: std::ops::Range<usize> = 2..8;
const BAD_CHAIN: usize = 8;
const BAD_FRAME: usize = 9;
const LINK_DROPS: std::ops::Range<usize> = 10..14;
const RX_DROPS: std::ops::Range<usize> = 14..19;

fn link_sent(c: &LinkCounters) -> u64 {
    c.tx_packets.get()
}

/// Runs one input.
pub fn run(input: &Input) {
    let nports = input.ports.len().clamp(1, 4);
    let specs: Vec<PortSpec> = (0..nports)
        .map(|i| {
            input.ports.get(i).cloned().unwrap_or(PortSpec {
                vlan: (0, 0),
                features: 0xff,
                rx_buffers: 16,
            })
        })
        .collect();
    let vlans: Vec<Option<u16>> = specs
        .iter()
        .map(|s| match s.vlan.0 % 4 {
            0 => None,
            1 => Some(10),
            2 => Some(20),
            _ => Some(s.vlan.1 % 4094 + 1),
        })
        .collect();
    let config = Config {
        uplink: UplinkSpec::AfPacket("fuzz0".into()),
        host_port: None,
        ports: (0..nports)
            .map(|i| PortConfig {
                name: format!("g{i}"),
                transport: Transport::Listen(PathBuf::from(format!("/nonexistent/g{i}.sock"))),
                mac: port_mac(i),
                vlan: vlans[i],
                queue_pairs: 1,
            })
            .collect(),
        mode: if input.private {
            Mode::Private
        } else {
            Mode::Bridge
        },
        anti_spoof: true,
        mtu: 1500,
        stats_socket: None,
        socket: SocketOptions::default(),
        unsealed_memory: Default::default(),
    };
    let uplink = Arc::new(Recorder {
        name: "uplink",
        outcome: outcome(input.uplink),
        sent: Mutex::new(Vec::new()),
    });
    let host = Arc::new(Recorder {
        name: "host",
        outcome: outcome(input.host_link),
        sent: Mutex::new(Vec::new()),
    });
    let hmac = input.host.map(host_mac);
    let fabric = Fabric::new(
        &config,
        Box::new(Shared(uplink.clone())),
        hmac.map(|m| (Box::new(Shared(host.clone())) as Box<dyn Uplink>, m)),
    );
    let mem = match Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) {
        Ok(m) => m,
        Err(e) => panic!("cannot map guest memory: {e}"),
    };
    let atomic: MemoryAtomic = GuestMemoryAtomic::new(mem.clone());

    let mut guests: Vec<Guest> = (0..nports)
        .map(|i| {
            let base = PORT_SPAN * i as u64;
            let f = specs[i].features;
            let mut features = bit(vn::VIRTIO_NET_F_MAC);
            for (k, b) in [
                vn::VIRTIO_NET_F_GUEST_CSUM,
                vn::VIRTIO_NET_F_GUEST_TSO4,
                vn::VIRTIO_NET_F_GUEST_TSO6,
                vn::VIRTIO_NET_F_GUEST_ECN,
                vn::VIRTIO_NET_F_GUEST_USO4,
                vn::VIRTIO_NET_F_GUEST_USO6,
                vn::VIRTIO_NET_F_MRG_RXBUF,
                virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1,
            ]
            .into_iter()
            .enumerate()
            {
                if f & (1 << k) != 0 {
                    features |= bit(b);
                }
            }
            let hdr_len = if f & 0xc0 != 0 { 12 } else { 10 };
            let tx_ring = DriverRing::new(base);
            let rx_ring = DriverRing::new(base + 0x8000);
            let mut queue = match Queue::new(QSIZE) {
                Ok(q) => q,
                Err(e) => panic!("cannot make a queue: {e:?}"),
            };
            queue.set_size(QSIZE);
            queue.set_desc_table_address(Some(tx_ring.desc as u32), Some(0));
            queue.set_avail_ring_address(Some(tx_ring.avail as u32), Some(0));
            queue.set_used_ring_address(Some(tx_ring.used as u32), Some(0));
            queue.set_ready(true);
            let rx = match Vring::new(atomic.clone(), QSIZE) {
                Ok(v) => v,
                Err(e) => panic!("cannot make a vring: {e}"),
            };
            rx.set_queue_size(QSIZE);
            if let Err(e) = rx.set_queue_info(rx_ring.desc, rx_ring.avail, rx_ring.used) {
                panic!("RX vring refused: {e}");
            }
            rx.set_queue_ready(true);
            rx.set_enabled(true);
            if let Some(p) = fabric.port(i) {
                p.mark_connected();
                let path =
                    RxPath::new(vec![rx], atomic.clone(), Arc::new(AtomicU64::new(features)));
                p.ensure_attached(|| Some(path));
            }
            let mut g = Guest {
                vlan: vlans[i],
                features,
                hdr_len,
                tx: Tx { queue },
                tx_signalled: Signalled::default(),
                tx_ring,
                rx_ring,
                rx_buf: base + RX_BUFFERS,
                rx_target: u16::from(specs[i].rx_buffers) % (RX_POSTED + 1),
                partial: None,
            };
            post_rx(&mem, &mut g);
            g
        })
        .collect();

    let mut batch: Vec<&TxFrame> = Vec::new();
    let frames: Vec<&TxFrame> = input.frames.iter().take(96).collect();
    for (k, f) in frames.iter().enumerate() {
        let last = k + 1 == frames.len();
        let from = usize::from(f.from) % nports;
        // One TX pass is for one guest: a frame from another ends the batch.
        if batch
            .first()
            .is_some_and(|b| usize::from(b.from) % nports != from)
        {
            let taken = std::mem::take(&mut batch);
            pass(
                &fabric,
                &mem,
                &mut guests,
                &taken,
                nports,
                hmac,
                &uplink,
                &host,
                input.private,
            );
        }
        batch.push(f);
        if f.kick || last || batch.len() >= MAX_BATCH {
            let taken = std::mem::take(&mut batch);
            pass(
                &fabric,
                &mem,
                &mut guests,
                &taken,
                nports,
                hmac,
                &uplink,
                &host,
                input.private,
            );
        }
    }
}

/// Posts RX buffers for guest `g` until it has as many as it keeps.
fn post_rx(mem: &Memory, g: &mut Guest) {
    while g.rx_ring.outstanding() < g.rx_target {
        let slot = g.rx_ring.next_desc;
        let addr = g.rx_buf + u64::from(slot) * u64::from(RX_BUF_LEN);
        if g.rx_ring.add(mem, &[(addr, RX_BUF_LEN, WRITE)]).is_none() {
            break;
        }
    }
}

/// Queues `frames` on one guest's TX ring, runs TX passes until it is drained, and checks
/// everything that came out.
#[allow(clippy::too_many_arguments)]
fn pass(
    fabric: &Fabric,
    mem: &Memory,
    guests: &mut [Guest],
    frames: &[&TxFrame],
    nports: usize,
    hmac: Option<MacAddr>,
    uplink: &Recorder,
    host: &Recorder,
    private: bool,
) {
    let Some(first) = frames.first() else { return };
    let from = usize::from(first.from) % nports;
    let before: Vec<[u64; 21]> = (0..nports)
        .map(|i| {
            fabric
                .port(i)
                .map_or([0; 21], |p| port_counters(&p.counters))
        })
        .collect();
    let stats = fabric.stats();
    let (up_before, host_before) = (
        link_sent(stats.uplink.counters),
        stats.host.as_ref().map_or(0, |h| link_sent(h.counters)),
    );
    drop(stats);
    uplink
        .sent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    host.sent.lock().unwrap_or_else(|p| p.into_inner()).clear();

    // Queue the frames.
    let sender_mac = port_mac(from).0;
    let mut sent = Sent { frames: Vec::new() };
    let mut chains = 0u16;
    {
        let g = &mut guests[from];
        let mut at = PORT_SPAN * from as u64 + TX_BUFFERS;
        for f in frames {
            let (eth, l4) = build_frame(f, nports, hmac);
            let hdr = build_header(f, &eth, l4);
            let mut bytes = hdr[..g.hdr_len].to_vec();
            bytes.extend_from_slice(&eth);
            let mut descs = Vec::new();
            let mut cuts: Vec<usize> = f
                .cuts
                .iter()
                .take(7)
                .map(|&c| usize::from(c) % (bytes.len() + 1))
                .collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            cuts.dedup();
            for w in cuts.windows(2) {
                let piece = &bytes[w[0]..w[1]];
                put(mem, at, piece);
                descs.push((at, piece.len() as u32, 0u16));
                at += (piece.len() as u64).next_multiple_of(64);
            }
            // The bytes the chain holds, as sent.
            let mut held = bytes.len();
            match f.damage % 8 {
                // A device-writable buffer at the end: not a TX chain.
                1 => descs.push((at, 64, WRITE)),
                // An empty buffer.
                2 => descs.push((at, 0, 0)),
                // Cut short by its last descriptor.
                3 if descs.len() > 1 => {
                    if let Some((_, len, _)) = descs.pop() {
                        held -= len as usize;
                    }
                }
                _ => {}
            }
            if g.tx_ring.add(mem, &descs).is_some() {
                chains += 1;
                sent.frames.push(bytes[g.hdr_len.min(held)..held].to_vec());
            }
        }
    }

    // Drain: passes until the ring is idle (each pass has a work budget).
    let mut passes = 0;
    loop {
        let g = &mut guests[from];
        let end = fabric.transmit(from, 0, g.hdr_len, mem, &g.tx_signalled, &mut g.tx);
        passes += 1;
        if end == TxEnd::Idle {
            break;
        }
        assert!(passes < 1000, "the TX ring never drains");
    }
    let used = guests[from].tx_ring.used(mem);
    assert_eq!(used.len(), usize::from(chains), "TX chains not returned");
    assert_eq!(guests[from].tx_ring.outstanding(), 0);

    let after: Vec<[u64; 21]> = (0..nports)
        .map(|i| {
            fabric
                .port(i)
                .map_or([0; 21], |p| port_counters(&p.counters))
        })
        .collect();
    let delta = |i: usize, k: usize| after[i][k] - before[i][k];
    let deltas = |i: usize, r: std::ops::Range<usize>| r.map(|k| delta(i, k)).sum::<u64>();

    // Every chain: a bad chain, a bad frame, or a frame sent.
    assert_eq!(
        delta(from, TX_PACKETS) + delta(from, BAD_CHAIN) + delta(from, BAD_FRAME),
        u64::from(chains),
        "chains taken from guest {from} do not add up: {:?} -> {:?}",
        before[from],
        after[from]
    );
    // Other ports sent nothing.
    for i in (0..nports).filter(|&i| i != from) {
        assert_eq!(delta(i, TX_PACKETS) + deltas(i, SWITCH_DROPS), 0);
    }
    let switch_drops = deltas(from, SWITCH_DROPS);
    assert!(switch_drops <= delta(from, TX_PACKETS));

    // What the links were handed.
    let up = uplink
        .sent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let hs = host.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let stats = fabric.stats();
    let up_sent = link_sent(stats.uplink.counters) - up_before;
    let host_sent = stats.host.as_ref().map_or(0, |h| link_sent(h.counters)) - host_before;
    drop(stats);
    let count =
        |v: &[(Vec<u8>, SendOutcome)], o: SendOutcome| v.iter().filter(|f| f.1 == o).count() as u64;
    assert_eq!(up_sent, count(&up, SendOutcome::Sent), "uplink frames sent");
    assert_eq!(host_sent, count(&hs, SendOutcome::Sent), "host frames sent");
    // uplink_busy, uplink_refused, host_busy, host_refused.
    let l = LINK_DROPS.start;
    assert_eq!(
        delta(from, l) + delta(from, l + 1),
        count(&up, SendOutcome::Busy) + count(&up, SendOutcome::Refused),
        "uplink drops on the sender"
    );
    assert_eq!(
        delta(from, l + 2) + delta(from, l + 3),
        count(&hs, SendOutcome::Busy) + count(&hs, SendOutcome::Refused),
        "host drops on the sender"
    );
    let sender_vlan = guests[from].vlan;
    for (frame, _) in &up {
        check_link_frame(frame, &sender_mac, sender_vlan, &sent);
    }
    for (frame, _) in &hs {
        assert_eq!(
            sender_vlan, None,
            "a tagged port's frame reached the host port"
        );
        check_link_frame(frame, &sender_mac, None, &sent);
    }

    // What the guests received.
    let mut offered_anywhere = !up.is_empty() || !hs.is_empty();
    for (i, g) in guests.iter_mut().enumerate() {
        let rx_in = delta(i, RX_PACKETS);
        let rx_dropped = deltas(i, RX_DROPS);
        offered_anywhere |= rx_in + rx_dropped > 0;
        if i == from || (private && rx_in + rx_dropped > 0) {
            assert_eq!(
                rx_in + rx_dropped,
                0,
                "guest {i} was offered a frame it must not hear"
            );
        }
        if rx_in + rx_dropped > 0 {
            assert_eq!(
                g.vlan, sender_vlan,
                "guest {i} heard a guest of another VLAN"
            );
        }
        let got = receive(mem, g);
        assert_eq!(
            got.len() as u64,
            rx_in,
            "guest {i}: frames counted and frames in its ring"
        );
        for frame in got {
            check_guest_frame(&frame, &sender_mac);
        }
        // Give back what was used.
        post_rx(mem, g);
    }
    // A frame sent and not dropped by the switch goes somewhere.
    if delta(from, TX_PACKETS) > switch_drops {
        assert!(offered_anywhere, "a frame neither dropped nor forwarded");
    }
}

/// A frame a link was handed: legacy virtio-net header, Ethernet header with the sender's
/// MAC and (on the uplink, from a tagged port) exactly its tag, then the sender's bytes.
fn check_link_frame(frame: &[u8], sender: &[u8; 6], vlan: Option<u16>, sent: &Sent) {
    let eth = &frame[10..];
    assert!(eth.len() >= 14, "a link frame of {} bytes", frame.len());
    assert_eq!(&eth[6..12], sender, "a forged source MAC reached a link");
    assert!(
        !is_link_local(&eth[..6]),
        "a link-local frame reached a link"
    );
    let (inner, rest) = match vlan {
        Some(v) => {
            assert_eq!(
                &eth[12..14],
                &[0x81, 0],
                "a tagged port's frame left without its tag"
            );
            assert_eq!(
                u16::from_be_bytes([eth[14], eth[15]]) & 0x0fff,
                v,
                "wrong tag"
            );
            (u16::from_be_bytes([eth[16], eth[17]]), &eth[18..])
        }
        None => (u16::from_be_bytes([eth[12], eth[13]]), &eth[14..]),
    };
    assert!(
        !TPIDS.contains(&inner),
        "a frame the guest tagged itself was forwarded"
    );
    // The rest is the sender's, unchanged: one of the frames queued.
    let matches = sent.frames.iter().any(|f| {
        f.len() >= 14
            && f[..12] == eth[..12]
            && f[12..14] == inner.to_be_bytes()
            && &f[14..] == rest
    });
    assert!(matches, "a link frame is none of the frames the guest sent");
}

/// A frame a guest received (virtio-net header stripped).
fn check_guest_frame(frame: &[u8], sender: &[u8; 6]) {
    assert!(
        frame.len() >= 14,
        "a received frame of {} bytes",
        frame.len()
    );
    assert_eq!(&frame[6..12], sender, "a forged source MAC reached a guest");
    assert!(
        !is_link_local(&frame[..6]),
        "a link-local frame reached a guest"
    );
    let t = u16::from_be_bytes([frame[12], frame[13]]);
    assert!(!TPIDS.contains(&t), "a tagged frame reached a guest");
}

/// Frames the device wrote into guest `g`'s RX ring since the last call (virtio-net headers
/// stripped; with MRG_RXBUF put together from their buffers).
fn receive(mem: &Memory, g: &mut Guest) -> Vec<Vec<u8>> {
    let hdr = if g.features
        & (bit(vn::VIRTIO_NET_F_MRG_RXBUF)
            | bit(virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1))
        != 0
    {
        12
    } else {
        10
    };
    let merge = g.features & bit(vn::VIRTIO_NET_F_MRG_RXBUF) != 0;
    let mut out = Vec::new();
    for (_, len, descs) in g.rx_ring.used(mem) {
        let (addr, room, _) = descs[0];
        assert!(len <= room, "{len} bytes written into a {room}-byte buffer");
        let mut bytes = vec![0u8; len as usize];
        if let Err(e) = mem.read_slice(&mut bytes, GuestAddress(addr)) {
            panic!("cannot read an RX buffer: {e}");
        }
        match g.partial.take() {
            Some((mut acc, left)) => {
                acc.extend_from_slice(&bytes);
                if left <= 1 {
                    out.push(acc);
                } else {
                    g.partial = Some((acc, left - 1));
                }
            }
            None => {
                assert!(bytes.len() >= hdr, "an RX buffer without a header");
                let n = if merge {
                    u16::from_le_bytes([bytes[10], bytes[11]])
                } else {
                    1
                };
                assert!(n >= 1, "num_buffers 0");
                let frame = bytes[hdr..].to_vec();
                if n == 1 {
                    out.push(frame);
                } else {
                    g.partial = Some((frame, n - 1));
                }
            }
        }
    }
    assert!(
        g.partial.is_none(),
        "a frame was left spread over buffers not yet used"
    );
    out
}

fn frame(from: u8, dst: Mac, network: Network, payload: u16) -> TxFrame {
    TxFrame {
        from,
        header: Header::Plain,
        dst,
        src: Mac::Port { index: from },
        tags: Vec::new(),
        network,
        payload,
        cuts: Vec::new(),
        damage: 0,
        kick: false,
    }
}

fn tcp4() -> Network {
    Network::Ipv4 {
        protocol: 6,
        options: 0,
        fragment: 0x4000,
    }
}

fn ports3() -> Vec<PortSpec> {
    vec![
        // Linux with every offload, mergeable buffers.
        PortSpec {
            vlan: (0, 0),
            features: 0xff,
            rx_buffers: 64,
        },
        // A legacy driver without offloads.
        PortSpec {
            vlan: (0, 0),
            features: 0x00,
            rx_buffers: 32,
        },
        // VLAN 10, checksum offload only.
        PortSpec {
            vlan: (1, 0),
            features: 0x81,
            rx_buffers: 16,
        },
    ]
}

/// Realistic traffic and the attacks of issue 10.
pub fn seeds() -> Vec<(&'static str, Input)> {
    let input = |frames: Vec<TxFrame>| Input {
        ports: ports3(),
        private: false,
        host: Some(0xfe),
        uplink: 0,
        host_link: 0,
        frames,
    };
    let mut arp = frame(0, Mac::Broadcast, Network::Arp { request: true }, 0);
    arp.kick = true;
    let mut tcp = frame(0, Mac::Port { index: 1 }, tcp4(), 1448);
    tcp.header = Header::Checksum {
        start_delta: 0,
        offset: 16,
    };
    tcp.cuts = vec![12];
    let mut tso = frame(0, Mac::Port { index: 1 }, tcp4(), 60000);
    tso.header = Header::Segments {
        gso_type: 0,
        gso_size: 1448,
        ecn: false,
    };
    tso.cuts = vec![12, 66, 4096, 8192];
    let mut tso6 = frame(
        0,
        Mac::Any {
            bytes: [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc],
        },
        Network::Ipv6 {
            next: 6,
            hop_by_hop: false,
        },
        30000,
    );
    tso6.header = Header::Segments {
        gso_type: 1,
        gso_size: 1440,
        ecn: true,
    };
    let ndp = frame(
        1,
        Mac::Multicast { v6: true, low: 1 },
        Network::Ipv6 {
            next: 58,
            hop_by_hop: false,
        },
        24,
    );
    let mut udp = frame(
        2,
        Mac::Any {
            bytes: [0x00, 0x16, 0x3e, 1, 2, 3],
        },
        Network::Ipv4 {
            protocol: 17,
            options: 0,
            fragment: 0,
        },
        512,
    );
    udp.header = Header::Checksum {
        start_delta: 0,
        offset: 6,
    };
    let to_host = frame(1, Mac::Host, tcp4(), 100);
    let mut tagged = frame(1, Mac::Broadcast, Network::Arp { request: true }, 0);
    tagged.tags = vec![(0, 20)];
    let mut double = frame(2, Mac::Port { index: 0 }, tcp4(), 64);
    double.tags = vec![(1, 10), (0, 20)];
    let bpdu = frame(
        0,
        Mac::LinkLocal { low: 0 },
        Network::Raw {
            ethertype: 0x0026,
            bytes: vec![0x42, 0x42, 0x03, 0, 0, 0, 0, 0],
        },
        0,
    );
    let mut lacp = frame(
        1,
        Mac::LinkLocal { low: 2 },
        Network::Raw {
            ethertype: 0x8809,
            bytes: vec![1, 1],
        },
        100,
    );
    lacp.kick = true;
    let mut spoofed = frame(0, Mac::Broadcast, Network::Arp { request: false }, 0);
    spoofed.src = Mac::Port { index: 1 };
    let mut bad = frame(0, Mac::Port { index: 1 }, tcp4(), 100);
    bad.header = Header::Raw {
        flags: 1,
        gso_type: 1,
        hdr_len: 54,
        gso_size: 0,
        csum_start: 9000,
        csum_offset: 16,
        num_buffers: 0,
    };
    bad.damage = 1;
    let mut private = input(vec![
        frame(0, Mac::Port { index: 1 }, tcp4(), 100),
        frame(0, Mac::Broadcast, Network::Arp { request: true }, 0),
    ]);
    private.private = true;
    let mut busy = input(vec![tcp.clone(), to_host.clone(), udp.clone()]);
    busy.uplink = 1;
    busy.host_link = 2;
    vec![
        ("arp-and-tcp", input(vec![arp, tcp, ndp, udp])),
        ("tso", input(vec![tso, tso6])),
        ("to-host", input(vec![to_host])),
        ("guest-vlan-tags", input(vec![tagged, double])),
        ("link-local", input(vec![bpdu, lacp])),
        ("spoofed-and-malformed", input(vec![spoofed, bad])),
        ("private-mode", private),
        ("links-busy-and-refusing", busy),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::Seed;
    use arbitrary::{Arbitrary, Unstructured};

    #[test]
    fn seeds_decode_to_themselves_and_pass() {
        let _serial = crate::serial();
        for (name, input) in seeds() {
            let bytes = input.to_input();
            let back = Input::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
            assert_eq!(back, input, "seed {name} does not decode to itself");
            eprintln!("seed {name}");
            run(&input);
        }
    }
}
