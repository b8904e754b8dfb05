//! Test doubles for the switch's unit tests: guests whose rings virtio-queue's mock builds in
//! shared test memory, and a host-side link that records what it is given.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use devshare_common::chain::{Memory, MemoryAtomic};
use devshare_common::daemon::Transport;
use devshare_common::ring::Signalled;
use vhost_user_backend::VringT;
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Config, MacAddr, Mode, PortConfig, UplinkSpec};
use crate::fabric::{Fabric, TxEnd, TxQueue};
use crate::port::{RxPath, Vring};
use crate::uplink::{RxBatch, SendOutcome, TxBatch, Uplink};

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;
/// virtio-net header length of the test guests (VERSION_1).
pub const HDR: usize = 12;
/// Ring size of the test guests.
pub const QSIZE: u16 = 256;
/// Guest memory: every test guest's rings and buffers.
pub const MEM_SIZE: usize = 64 << 20;
/// Bytes of guest memory each test guest gets.
const GUEST_SPAN: u64 = 8 << 20;

/// Test guest `i`'s MAC.
pub fn mac(i: usize) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, i as u8 + 1])
}

/// A configuration with one untagged or tagged port per entry of `vlans`, anti-spoofing on.
pub fn config(vlans: &[Option<u16>], mode: Mode) -> Config {
    Config {
        uplink: UplinkSpec::AfPacket("fake0".into()),
        host_port: None,
        ports: vlans
            .iter()
            .enumerate()
            .map(|(i, &vlan)| PortConfig {
                name: format!("g{i}"),
                transport: Transport::Listen(PathBuf::from(format!("/nonexistent/g{i}"))),
                mac: mac(i),
                vlan,
                queue_pairs: 1,
            })
            .collect(),
        mode,
        anti_spoof: true,
        mtu: 1500,
        stats_socket: None,
        socket: Default::default(),
        unsealed_memory: Default::default(),
    }
}

/// Test memory, one region.
pub fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A descriptor.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
}

/// An Ethernet frame of `len` bytes with a zero virtio-net header in front.
pub fn frame(dst: MacAddr, src: MacAddr, ethertype: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    while f.len() < HDR + len {
        f.push(f.len() as u8);
    }
    f
}

/// What a [`FakeLink`] was given.
#[derive(Default)]
pub struct LinkLog {
    /// Frames it took (virtio-net header included), in order.
    pub sent: Vec<Vec<u8>>,
    /// The MAC the link's interface has (`hw_addr`); none: the link cannot tell.
    pub mac: Option<MacAddr>,
}

/// A host-side link that keeps what it sends, or refuses it.
pub struct FakeLink {
    name: String,
    outcome: SendOutcome,
    log: Arc<Mutex<LinkLog>>,
    fd: EventFd,
}

/// A [`FakeLink`] named `name` whose every frame has `outcome`, and its log.
pub fn fake_link(name: &str, outcome: SendOutcome) -> (Box<dyn Uplink>, Arc<Mutex<LinkLog>>) {
    let log = Arc::new(Mutex::new(LinkLog::default()));
    let link = FakeLink {
        name: name.into(),
        outcome,
        log: log.clone(),
        fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    (Box::new(link), log)
}

impl Uplink for FakeLink {
    fn describe(&self) -> String {
        format!("fake:{}", self.name)
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    fn send(&self, batch: &mut TxBatch) {
        if self.outcome == SendOutcome::Sent {
            let mut log = self.log.lock().unwrap();
            for i in 0..batch.len() {
                log.sent.push(batch.copy_frame(i).unwrap());
            }
        }
        batch.set_outcomes(self.outcome);
    }

    fn recv(&self, _batch: &mut RxBatch) -> std::io::Result<usize> {
        Ok(0)
    }

    fn hw_addr(&self) -> std::io::Result<MacAddr> {
        self.log
            .lock()
            .unwrap()
            .mac
            .ok_or_else(|| std::io::ErrorKind::Unsupported.into())
    }
}

/// A guest's TX queue as a test drives it.
pub struct TestTx {
    pub queue: Queue,
    pub interrupts: usize,
}

impl TxQueue for TestTx {
    fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    fn interrupt(&mut self) {
        self.interrupts += 1;
    }
}

/// One test guest: a TX ring, an RX ring (a vring, as the port's receive side takes it) and a
/// bump allocator for buffers, all in its part of the test memory.
pub struct Guest<'m> {
    mem: &'m Memory,
    pub tx: TestTx,
    /// The TX ring's interrupt record.
    pub tx_signalled: Signalled,
    tx_mock: MockSplitQueue<'m, Memory>,
    tx_next: u16,
    rx_mock: MockSplitQueue<'m, Memory>,
    rx_used: u64,
    rx_next: u16,
    pub rx_vring: Vring,
    next_buf: u64,
}

impl<'m> Guest<'m> {
    /// Guest `i`'s rings in `mem`.
    pub fn new(mem: &'m Memory, atomic: &MemoryAtomic, i: usize) -> Guest<'m> {
        let base = GUEST_SPAN * i as u64;
        let tx_mock = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        let mut queue: Queue = tx_mock.create_queue().unwrap();
        // The mock lays its used ring over the avail ring's last field; ours goes elsewhere.
        queue.set_used_ring_address(Some((base + 0x8000) as u32), Some(0));
        let rx_base = base + 0x1_0000;
        let rx_mock = MockSplitQueue::create(mem, GuestAddress(rx_base), QSIZE);
        let rx_used = rx_base + 0x8000;
        let rx_vring = Vring::new(atomic.clone(), QSIZE).unwrap();
        rx_vring
            .set_queue_info(rx_mock.desc_table_addr().0, rx_mock.avail_addr().0, rx_used)
            .unwrap();
        rx_vring.set_queue_size(QSIZE);
        rx_vring.set_queue_ready(true);
        rx_vring.set_enabled(true);
        Guest {
            mem,
            tx: TestTx {
                queue,
                interrupts: 0,
            },
            tx_signalled: Signalled::default(),
            tx_mock,
            tx_next: 0,
            rx_mock,
            rx_used,
            rx_next: 0,
            rx_vring,
            next_buf: base + 0x2_0000,
        }
    }

    /// A receive side for this guest's port, with `features` negotiated.
    pub fn rx_path(&self, atomic: &MemoryAtomic, features: u64) -> RxPath {
        RxPath::new(
            vec![self.rx_vring.clone()],
            atomic.clone(),
            Arc::new(AtomicU64::new(features)),
        )
    }

    /// `len` bytes of this guest's memory, holding `bytes` at the start.
    pub fn buffer(&mut self, len: usize, bytes: &[u8]) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (len as u64).next_multiple_of(64).max(64);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Queues raw TX chains (`descs`, with `next` counted from 0: rebased here).
    pub fn tx_chains(&mut self, descs: &[RawDescriptor]) {
        let at = self.tx_next;
        self.tx_mock
            .add_desc_chains(&rebase(descs, at), at)
            .unwrap();
        self.tx_next = (at + descs.len() as u16) % QSIZE;
    }

    /// Queues each of `frames` as a one-buffer TX chain.
    pub fn send(&mut self, frames: &[Vec<u8>]) {
        for f in frames {
            let addr = self.buffer(f.len(), f);
            self.tx_chains(&[desc(addr, f.len() as u32, 0, 0)]);
        }
    }

    /// Posts `n` RX buffers of `len` bytes.
    pub fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = self.buffer(len as usize, &[]);
            let at = self.rx_next;
            self.rx_mock
                .add_desc_chains(&[desc(addr, len, WRITE, 0)], at)
                .unwrap();
            self.rx_next = (at + 1) % QSIZE;
        }
    }

    /// Posts raw RX chains (`next` counted from 0).
    pub fn post_rx_raw(&mut self, descs: &[RawDescriptor]) {
        let at = self.rx_next;
        self.rx_mock
            .add_desc_chains(&rebase(descs, at), at)
            .unwrap();
        self.rx_next = (at + descs.len() as u16) % QSIZE;
    }

    /// Overwrites RX descriptor `index` (as a guest may, behind the device's back).
    pub fn rewrite_rx_desc(&self, index: u16, d: RawDescriptor) {
        self.rx_mock.desc_table().store(index, d).unwrap();
    }

    /// How many TX chains the device has returned.
    pub fn tx_used(&self) -> u16 {
        let used = self.tx.queue.used_ring();
        u16::from_le(self.mem.read_obj(GuestAddress(used + 2)).unwrap())
    }

    /// The frames the device wrote into the RX ring so far: (head, bytes with the header).
    pub fn rx_frames(&self) -> Vec<(u16, Vec<u8>)> {
        let n: u16 = u16::from_le(self.mem.read_obj(GuestAddress(self.rx_used + 2)).unwrap());
        (0..n)
            .map(|k| {
                let at = GuestAddress(self.rx_used + 4 + 8 * u64::from(k % QSIZE));
                let id: u32 = self.mem.read_obj(at).unwrap();
                let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
                let d = SplitDesc::from(self.rx_mock.desc_table().load(id as u16).unwrap());
                let mut bytes = vec![0u8; len as usize];
                self.mem.read_slice(&mut bytes, d.addr()).unwrap();
                (id as u16, bytes)
            })
            .collect()
    }
}

/// `descs` (with `next` counted from 0) placed from table index `at`: every `next` of a
/// chained descriptor moved by `at`.
fn rebase(descs: &[RawDescriptor], at: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .map(|d| {
            let d = SplitDesc::from(*d);
            let next = if d.flags() & NEXT != 0 {
                d.next() + at
            } else {
                0
            };
            desc(d.addr().0, d.len(), d.flags(), next)
        })
        .collect()
}

/// Runs TX passes for `port` until one ends idle; returns how many passes it took.
pub fn drain(fabric: &Fabric, port: usize, mem: &Memory, g: &mut Guest<'_>) -> usize {
    let mut passes = 1;
    while fabric.transmit(port, 0, HDR, mem, &g.tx_signalled, &mut g.tx) == TxEnd::Yielded {
        passes += 1;
        assert!(passes < 10_000, "the TX ring never drains");
    }
    passes
}
