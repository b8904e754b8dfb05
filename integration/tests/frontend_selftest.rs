//! Proves the frontend harness against a real vhost-user backend.
//!
//! The backend here is a small loopback device built on `vhost-user-backend`: two queues, and
//! every buffer the driver sends on queue 1 is copied into the next receive buffer on queue 0.
//! It runs on a real Unix socket in a thread; the harness drives it as QEMU plus a guest would
//! and checks every byte that comes back.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use devshare_integration::frontend::{
    Connection, Descriptor, DriverQueue, Error, FrontendListener, GuestBuffer, GuestRam,
    QueueConfig, Segment, VhostUserProtocolFeatures, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use vhost::vhost_user::{Listener, VhostUserProtocolFeatures as Proto};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type GM<B> = GuestMemoryAtomic<GuestMemoryMmap<B>>;

const RX: u16 = 0;
const TX: u16 = 1;
const WAIT: Duration = Duration::from_secs(10);
const RX_BUF_LEN: u32 = 2048;
const MAX_MSG: usize = 1500;
/// Largest message the loopback device accepts; anything longer is rejected like a bad chain.
const LOOPBACK_MAX: usize = 64 * 1024;
const INITIAL_CONFIG: [u8; 8] = [2, 0, 0xde, 0xad, 0xbe, 0xef, 0, 1];

// ---------------------------------------------------------------------------------------------
// The loopback device
// ---------------------------------------------------------------------------------------------

struct Loopback {
    event_idx: bool,
    mem: Option<GM<()>>,
    config: [u8; 8],
}

impl Loopback {
    fn new() -> Loopback {
        Loopback {
            event_idx: false,
            mem: None,
            config: INITIAL_CONFIG,
        }
    }

    /// Move tx buffers into rx buffers until one side runs dry; returns how many moved.
    fn move_all(
        &self,
        mem: &GuestMemoryMmap,
        rx: &mut VringState<GM<()>>,
        tx: &mut VringState<GM<()>>,
    ) -> io::Result<(usize, bool, bool)> {
        let (mut moved, mut rx_used, mut tx_used) = (0, false, false);
        while let Some(rx_chain) = rx.get_queue_mut().pop_descriptor_chain(mem) {
            let rx_head = rx_chain.head_index();
            // Collect the receive chain's writable parts; a readable part makes it unusable.
            let mut targets = Vec::new();
            let mut rx_ok = true;
            for d in rx_chain {
                if !d.is_write_only() {
                    rx_ok = false;
                    break;
                }
                targets.push((d.addr(), d.len()));
            }
            if !rx_ok || targets.is_empty() {
                rx.add_used(rx_head, 0).map_err(io::Error::other)?;
                rx_used = true;
                continue;
            }
            let Some(tx_chain) = tx.get_queue_mut().pop_descriptor_chain(mem) else {
                // No message for this receive buffer yet: leave it for the next kick.
                rx.get_queue_mut().go_to_previous_position();
                break;
            };
            let tx_head = tx_chain.head_index();
            let data = read_message(mem, tx_chain);
            tx.add_used(tx_head, 0).map_err(io::Error::other)?;
            tx_used = true;
            let Some(data) = data else {
                // Rejected message: the receive buffer stays available.
                rx.get_queue_mut().go_to_previous_position();
                continue;
            };
            let mut written = 0usize;
            for (addr, len) in targets {
                if written == data.len() {
                    break;
                }
                let n = (len as usize).min(data.len() - written);
                mem.write_slice(&data[written..written + n], addr)
                    .map_err(io::Error::other)?;
                written += n;
            }
            rx.add_used(rx_head, written as u32)
                .map_err(io::Error::other)?;
            rx_used = true;
            moved += 1;
        }
        Ok((moved, rx_used, tx_used))
    }

    fn pump(&self, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        let guard = atomic.memory();
        let mem: &GuestMemoryMmap = &guard;
        let mut rx = vrings[usize::from(RX)].get_mut();
        let mut tx = vrings[usize::from(TX)].get_mut();
        let (mut rx_used, mut tx_used) = (false, false);
        loop {
            if self.event_idx {
                rx.disable_notification().map_err(io::Error::other)?;
                tx.disable_notification().map_err(io::Error::other)?;
            }
            let (_, r, t) = self.move_all(mem, &mut rx, &mut tx)?;
            rx_used |= r;
            tx_used |= t;
            if !self.event_idx {
                break;
            }
            rx.enable_notification().map_err(io::Error::other)?;
            tx.enable_notification().map_err(io::Error::other)?;
            // Buffers may have arrived between the last pop and re-enabling notifications.
            let (moved, r, t) = self.move_all(mem, &mut rx, &mut tx)?;
            rx_used |= r;
            tx_used |= t;
            if moved == 0 && !r && !t {
                break;
            }
        }
        for (used, state) in [(rx_used, &mut rx), (tx_used, &mut tx)] {
            if used && state.needs_notification().map_err(io::Error::other)? {
                state.signal_used_queue()?;
            }
        }
        Ok(())
    }
}

/// All readable bytes of a transmit chain, or None if the chain is one the device must refuse
/// (no descriptors, a device-writable part, memory outside the guest, absurd length).
fn read_message<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
) -> Option<Vec<u8>>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut data = Vec::new();
    let mut parts = 0;
    for d in chain {
        parts += 1;
        if d.is_write_only() || data.len() + d.len() as usize > LOOPBACK_MAX {
            return None;
        }
        let start = data.len();
        data.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut data[start..], d.addr()).ok()?;
    }
    (parts > 0).then_some(data)
}

impl VhostUserBackendMut for Loopback {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> Proto {
        Proto::CONFIG | Proto::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (o, s) = (offset as usize, size as usize);
        self.config
            .get(o..o.saturating_add(s))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        let dst = self
            .config
            .get_mut(o..o.saturating_add(buf.len()))
            .ok_or_else(|| io::Error::other("config write out of range"))?;
        dst.copy_from_slice(buf);
        Ok(())
    }

    fn update_memory(&mut self, mem: GM<()>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event == RX || device_event == TX {
            self.pump(vrings)?;
        }
        Ok(())
    }
}

type Daemon = VhostUserDaemon<Arc<RwLock<Loopback>>>;

fn new_daemon() -> Result<Daemon, String> {
    let backend = Arc::new(RwLock::new(Loopback::new()));
    VhostUserDaemon::new(
        "loopback".to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("creating daemon: {e}"))
}

/// How one backend connection ended.
fn finish(daemon: &mut Daemon) -> Result<(), String> {
    use vhost::vhost_user::Error as VuError;
    match daemon.wait() {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            VuError::Disconnected | VuError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Serve `connections` frontends one after another on `path` (a fresh device each time, as a
/// restarted backend would be); returns how each connection ended.
fn serve(path: &Path, connections: usize) -> JoinHandle<Vec<Result<(), String>>> {
    let mut listener = match Listener::new(path, true) {
        Ok(l) => l,
        Err(e) => panic!("binding {}: {e}", path.display()),
    };
    thread::spawn(move || {
        let mut results = Vec::new();
        for _ in 0..connections {
            let r = new_daemon().and_then(|mut d| {
                d.start(&mut listener)
                    .map_err(|e| format!("accepting: {e}"))?;
                finish(&mut d)
            });
            results.push(r);
        }
        results
    })
}

fn sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("devshare-fe-{}-{name}.sock", std::process::id()))
}

// ---------------------------------------------------------------------------------------------
// Driving it
// ---------------------------------------------------------------------------------------------

const BASE_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;

fn all_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// A deterministic message: its length and bytes depend on `seed` only.
fn message(seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(0x9e37_79b9) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let len = 1 + next() as usize % MAX_MSG;
    (0..len).map(|_| next() as u8).collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Plain,
    Indirect,
    /// Alternate plain and indirect chains.
    Mixed,
}

/// The driver side of the loopback device: two queues and per-slot buffers.
struct Driver {
    ram: GuestRam,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_bufs: Vec<GuestBuffer>,
    tx_bufs: Vec<GuestBuffer>,
    sent: u32,
}

impl Driver {
    fn new(ram: GuestRam, rx: DriverQueue, tx: DriverQueue) -> Result<Driver, Error> {
        let slots = usize::from(rx.size().min(tx.size()));
        let mut rx_bufs = Vec::with_capacity(slots);
        let mut tx_bufs = Vec::with_capacity(slots);
        for _ in 0..slots {
            rx_bufs.push(ram.alloc(RX_BUF_LEN)?);
            tx_bufs.push(ram.alloc(MAX_MSG as u32)?);
        }
        Ok(Driver {
            ram,
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            sent: 0,
        })
    }

    /// Post a receive buffer (two segments, so writes must scatter).
    fn post_rx(&mut self, slot: usize, indirect: bool) -> Result<u16, Error> {
        let buf = self.rx_bufs[slot];
        // Poison it so stale bytes can never pass for a delivered message.
        self.ram.write(buf.addr, &[0xee; RX_BUF_LEN as usize])?;
        let segs = [
            Segment::writable(buf.prefix(64)),
            Segment::writable(buf.offset(64)),
        ];
        if indirect {
            self.rx.add_indirect_chain(&segs)
        } else {
            self.rx.add_chain(&segs)
        }
    }

    /// Queue `msg` for transmission in up to three segments.
    fn post_tx(&mut self, slot: usize, msg: &[u8], indirect: bool) -> Result<u16, Error> {
        let buf = self.tx_bufs[slot];
        self.ram.fill(buf, msg)?;
        let len = msg.len() as u32;
        let cuts = [0, len / 3, 2 * len / 3, len];
        let mut segs = Vec::with_capacity(3);
        for w in cuts.windows(2) {
            if w[1] > w[0] {
                segs.push(Segment::readable(buf.offset(w[0]).prefix(w[1] - w[0])));
            }
        }
        if indirect {
            self.tx.add_indirect_chain(&segs)
        } else {
            self.tx.add_chain(&segs)
        }
    }

    /// Send `count` new messages in batches of at most `batch`, checking every delivered byte
    /// and that used heads come back in the order they were posted.
    fn exchange(&mut self, count: u32, batch: usize, shape: Shape) -> Result<(), Error> {
        let mut left = count;
        while left > 0 {
            // Plain chains take up to 3 (tx) and 2 (rx) descriptors each.
            let fit = if shape == Shape::Indirect {
                self.rx_bufs.len()
            } else {
                usize::from(self.tx.size() / 3).min(usize::from(self.rx.size() / 2))
            };
            let n = batch.min(left as usize).min(fit.max(1));
            let mut expect = VecDeque::with_capacity(n);
            for slot in 0..n {
                let (rx_indirect, tx_indirect) = match shape {
                    Shape::Plain => (false, false),
                    Shape::Indirect => (true, true),
                    Shape::Mixed => {
                        let odd = (self.sent as usize + slot) % 2 == 1;
                        (odd, !odd)
                    }
                };
                let rx_head = self.post_rx(slot, rx_indirect)?;
                let msg = message(self.sent + slot as u32);
                let tx_head = self.post_tx(slot, &msg, tx_indirect)?;
                expect.push_back((slot, rx_head, tx_head, msg));
            }
            self.rx.kick()?;
            self.tx.kick()?;
            let tx_used = self.tx.wait_used_n(n, WAIT)?;
            let rx_used = self.rx.wait_used_n(n, WAIT)?;
            for ((t, r), (slot, rx_head, tx_head, msg)) in tx_used.iter().zip(&rx_used).zip(expect)
            {
                assert_eq!(t.head, tx_head, "tx chains must come back in order");
                assert_eq!(t.len, 0, "the device writes nothing into a tx chain");
                assert_eq!(r.head, rx_head, "rx chains must come back in order");
                assert_eq!(r.len as usize, msg.len(), "delivered length");
                let got = self.ram.read_vec(self.rx_bufs[slot].addr, msg.len())?;
                assert!(got == msg, "message {} corrupted", self.sent);
                self.sent += 1;
            }
            left -= n as u32;
        }
        assert_eq!(self.rx.in_flight(), 0);
        assert_eq!(self.tx.in_flight(), 0);
        assert_eq!(self.rx.free_descriptors(), usize::from(self.rx.size()));
        assert_eq!(self.tx.free_descriptors(), usize::from(self.tx.size()));
        Ok(())
    }
}

/// Connect, negotiate, share memory and start both queues.
fn bring_up(
    conn: &mut Connection,
    ram: &GuestRam,
    features: u64,
    size: u16,
) -> Result<Driver, Error> {
    let agreed = conn.handshake(features, all_protocol())?;
    assert_eq!(
        agreed.acked_features, features,
        "loopback offers every feature asked for here"
    );
    assert_eq!(agreed.queue_num, Some(2), "GET_QUEUE_NUM");
    assert!(agreed
        .acked_protocol
        .contains(VhostUserProtocolFeatures::REPLY_ACK));
    conn.set_mem_table(ram)?;
    let rx = conn.start_queue(ram, RX, size)?;
    let tx = conn.start_queue(ram, TX, size)?;
    assert_eq!(rx.event_idx(), agreed.has(VIRTIO_RING_F_EVENT_IDX));
    Driver::new(ram.clone(), rx, tx)
}

fn check_server(server: JoinHandle<Vec<Result<(), String>>>, connections: usize) {
    let results = match server.join() {
        Ok(r) => r,
        Err(_) => panic!("backend thread panicked"),
    };
    assert_eq!(results.len(), connections);
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "backend connection {i} ended with {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn loopback_plain_chains_without_event_idx() -> Result<(), Error> {
    let path = sock("plain");
    let server = serve(&path, 1);
    let ram = GuestRam::new(16 << 20)?;
    let mut conn = Connection::connect(&path)?;
    let mut d = bring_up(&mut conn, &ram, BASE_FEATURES, 16)?;
    assert!(!d.rx.event_idx());
    // One at a time, then full rings: 300 messages through 16-entry rings wrap them many times.
    d.exchange(20, 1, Shape::Plain)?;
    d.exchange(280, 16, Shape::Plain)?;

    // Config space: read, write, read back.
    assert_eq!(conn.get_config(0, 8)?, INITIAL_CONFIG);
    conn.set_config(4, &[1, 2, 3, 4])?;
    assert_eq!(conn.get_config(2, 6)?, [0xde, 0xad, 1, 2, 3, 4]);

    let rx_base = conn.stop_queue(&mut d.rx)?;
    let tx_base = conn.stop_queue(&mut d.tx)?;
    assert_eq!(
        (rx_base, tx_base),
        (300, 300),
        "GET_VRING_BASE after 300 messages"
    );
    conn.disconnect();
    check_server(server, 1);
    Ok(())
}

#[test]
fn loopback_event_idx_across_index_wrap() -> Result<(), Error> {
    let path = sock("event-idx");
    let server = serve(&path, 1);
    let ram = GuestRam::new(16 << 20)?;
    let mut conn = Connection::connect(&path)?;
    let features = BASE_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX;
    conn.handshake(features, all_protocol())?;
    conn.set_mem_table(&ram)?;
    // Build the queues by hand to start their indices just below the 16-bit wrap.
    let mut queues = Vec::new();
    for index in [RX, TX] {
        let mut q = DriverQueue::new(
            &ram,
            QueueConfig {
                index,
                size: 8,
                event_idx: true,
                indirect_max: 0,
            },
        )?;
        q.start_at(65_500)?;
        conn.attach_queue(&mut q)?;
        queues.push(q);
    }
    let tx = queues.pop().ok_or(Error::EmptyChain)?;
    let rx = queues.pop().ok_or(Error::EmptyChain)?;
    let mut d = Driver::new(ram.clone(), rx, tx)?;
    d.exchange(30, 1, Shape::Plain)?;
    d.exchange(170, 8, Shape::Plain)?;
    d.exchange(100, 3, Shape::Plain)?;
    assert_eq!(d.rx.avail_idx(), 65_500u16.wrapping_add(300));
    assert_eq!(d.rx.used_idx(), d.rx.avail_idx());
    // The device re-armed avail_event at its position, so the next buffer must be kicked.
    assert_eq!(d.tx.avail_event(), d.tx.avail_idx());
    conn.stop_queue(&mut d.rx)?;
    conn.stop_queue(&mut d.tx)?;
    conn.disconnect();
    check_server(server, 1);
    Ok(())
}

#[test]
fn loopback_indirect_and_mixed_chains() -> Result<(), Error> {
    let path = sock("indirect");
    let server = serve(&path, 1);
    let ram = GuestRam::new(32 << 20)?;
    let mut conn = Connection::connect(&path)?;
    let features = BASE_FEATURES | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;
    let mut d = bring_up(&mut conn, &ram, features, 32)?;
    d.exchange(64, 32, Shape::Indirect)?;
    d.exchange(200, 32, Shape::Mixed)?;
    // An indirect chain takes exactly one ring descriptor whatever its length.
    let buf = ram.alloc(32)?;
    let segs: Vec<Segment> = (0..20)
        .map(|i| Segment::readable(buf.offset(i).prefix(1)))
        .collect();
    ram.write(buf.addr, &(0u8..20).collect::<Vec<u8>>())?;
    let free = d.tx.free_descriptors();
    d.tx.add_indirect_chain(&segs)?;
    assert_eq!(d.tx.free_descriptors(), free - 1);
    d.post_rx(0, false)?;
    d.rx.kick()?;
    d.tx.kick()?;
    d.tx.wait_used(WAIT)?;
    let got = d.rx.wait_used(WAIT)?;
    assert_eq!(got.len, 20);
    assert_eq!(
        ram.read_vec(d.rx_bufs[0].addr, 20)?,
        (0u8..20).collect::<Vec<u8>>()
    );
    conn.disconnect();
    check_server(server, 1);
    Ok(())
}

#[test]
fn loopback_disconnect_and_reconnect() -> Result<(), Error> {
    let path = sock("reconnect");
    let server = serve(&path, 3);
    // Two regions with a gap, like a guest with a PCI hole. The low one holds exactly the null
    // guard page and the two queues' rings (3 pages each), so all data lives in the high one.
    let ram = GuestRam::with_regions(&[(0, 7 * 4096), (1 << 32, 16 << 20)])?;
    let features = BASE_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX;

    // First connection: traffic, then a clean QEMU-style stop.
    let mut conn = Connection::connect(&path)?;
    let mut d = bring_up(&mut conn, &ram, features, 16)?;
    assert!(
        d.tx.layout().used < 7 * 4096,
        "rings should be in the low region"
    );
    assert!(
        d.rx_bufs[0].addr >= 1 << 32,
        "buffers should be in the high region"
    );
    d.exchange(40, 16, Shape::Plain)?;
    assert_eq!(conn.stop_queue(&mut d.rx)?, 40);
    assert_eq!(conn.stop_queue(&mut d.tx)?, 40);
    conn.disconnect();

    // Second connection: a fresh device resumes the same rings where the first stopped.
    let mut conn = Connection::connect(&path)?;
    conn.handshake(features, all_protocol())?;
    conn.set_mem_table(&ram)?;
    conn.attach_queue(&mut d.rx)?;
    conn.attach_queue(&mut d.tx)?;
    d.exchange(40, 16, Shape::Plain)?;
    // Leave receive buffers posted but unused, then vanish without GET_VRING_BASE.
    for slot in 0..4 {
        d.post_rx(slot, false)?;
    }
    d.rx.kick()?;
    drop(conn);

    // Third connection: resumes from the used index, so the 4 posted buffers are still there.
    let mut conn = Connection::connect(&path)?;
    conn.handshake(features, all_protocol())?;
    conn.set_mem_table(&ram)?;
    assert_eq!(d.rx.resume_base(), 80);
    conn.attach_queue(&mut d.rx)?;
    conn.attach_queue(&mut d.tx)?;
    let mut heads = Vec::new();
    for slot in 0..4 {
        let msg = message(1000 + slot as u32);
        d.post_tx(slot, &msg, false)?;
        heads.push(msg);
    }
    d.tx.kick()?;
    d.tx.wait_used_n(4, WAIT)?;
    let used = d.rx.wait_used_n(4, WAIT)?;
    for (slot, (u, msg)) in used.iter().zip(&heads).enumerate() {
        assert_eq!(u.len as usize, msg.len());
        assert!(ram.read_vec(d.rx_bufs[slot].addr, msg.len())? == *msg);
    }
    d.exchange(20, 8, Shape::Plain)?;
    conn.stop_queue(&mut d.rx)?;
    conn.stop_queue(&mut d.tx)?;
    conn.disconnect();
    check_server(server, 3);
    Ok(())
}

#[test]
fn client_mode_backend_connects_to_harness() -> Result<(), Error> {
    let path = sock("client-mode");
    let listener = FrontendListener::bind(&path)?;
    let backend_path = path.to_string_lossy().into_owned();
    let backend = thread::spawn(move || -> Result<(), String> {
        let mut daemon = new_daemon()?;
        daemon
            .start_client(&backend_path)
            .map_err(|e| format!("connecting: {e}"))?;
        finish(&mut daemon)
    });
    let mut conn = listener.accept(WAIT)?;
    let ram = GuestRam::new(8 << 20)?;
    let mut d = bring_up(
        &mut conn,
        &ram,
        BASE_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX,
        64,
    )?;
    d.exchange(100, 64, Shape::Plain)?;
    conn.stop_queue(&mut d.rx)?;
    conn.stop_queue(&mut d.tx)?;
    conn.disconnect();
    match backend.join() {
        Ok(r) => assert_eq!(r, Ok(())),
        Err(_) => panic!("backend thread panicked"),
    }
    Ok(())
}

#[test]
fn reply_ack_reports_a_refused_request() -> Result<(), Error> {
    let path = sock("reply-ack");
    let server = serve(&path, 1);
    let mut conn = Connection::connect(&path)?;
    // Without MQ there is no GET_QUEUE_NUM, so the vhost crate lets any queue index through.
    let agreed = conn.handshake(
        BASE_FEATURES,
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK,
    )?;
    assert_eq!(agreed.queue_num, None);
    // Queue 7 does not exist; only REPLY_ACK lets the frontend hear the refusal.
    match conn.set_vring_enable(7, true) {
        Err(Error::Request {
            request,
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::BackendInternalError),
        }) => assert_eq!(request, "SET_VRING_ENABLE"),
        other => panic!("expected the backend to refuse SET_VRING_ENABLE, got {other:?}"),
    }
    drop(conn);
    let results = match server.join() {
        Ok(r) => r,
        Err(_) => panic!("backend thread panicked"),
    };
    // vhost-user-backend drops a connection after a refused request.
    assert!(
        results[0].is_err(),
        "backend should have failed the request: {results:?}"
    );
    Ok(())
}

/// Malformed chains built with the raw interface reach the device exactly as written.
#[test]
fn raw_chains_reach_the_device() -> Result<(), Error> {
    let path = sock("raw");
    let server = serve(&path, 1);
    let ram = GuestRam::new(16 << 20)?;
    let mut conn = Connection::connect(&path)?;
    let mut d = bring_up(
        &mut conn,
        &ram,
        BASE_FEATURES | 1 << VIRTIO_RING_F_INDIRECT_DESC,
        8,
    )?;
    // The loopback only looks at a message when a receive buffer waits, so one is posted
    // before each bad chain; a normal message after it must land in that same buffer, proving
    // the bad chain consumed nothing.
    let good = |d: &mut Driver, seed: u32, rx_head: u16| -> Result<(), Error> {
        let msg = message(seed);
        d.post_tx(0, &msg, false)?;
        d.tx.kick()?;
        let r = d.rx.wait_used(WAIT)?;
        assert_eq!((r.head, r.len as usize), (rx_head, msg.len()));
        assert!(ram.read_vec(d.rx_bufs[0].addr, msg.len())? == msg);
        d.tx.wait_used(WAIT)?;
        Ok(())
    };
    let data = ram.alloc(64)?;
    ram.write(data.addr, b"ABCD")?;

    // 1. A descriptor pointing outside guest memory: refused, no receive buffer consumed.
    let ids = d.tx.raw_reserve(3)?;
    let rx_head = d.post_rx(0, false)?;
    d.rx.kick()?;
    d.tx.raw_write_desc(
        ids[0],
        Descriptor {
            addr: 0xdead_0000_0000,
            len: 512,
            flags: 0,
            next: 0,
        },
    )?;
    d.tx.raw_publish(ids[0]);
    d.tx.kick()?;
    let back = d.tx.wait_used(WAIT)?;
    assert_eq!((back.head, back.len), (ids[0], 0));
    good(&mut d, 1, rx_head)?;
    let rx_head = d.post_rx(0, false)?;
    d.rx.kick()?;

    // 2. Wrong direction: a device-writable descriptor on the transmit queue.
    d.tx.raw_write_desc(
        ids[0],
        Descriptor {
            addr: data.addr,
            len: 4,
            flags: DESC_F_WRITE,
            next: 0,
        },
    )?;
    d.tx.raw_publish(ids[0]);
    d.tx.kick()?;
    assert_eq!(d.tx.wait_used(WAIT)?.head, ids[0]);
    good(&mut d, 2, rx_head)?;
    let rx_head = d.post_rx(0, false)?;
    d.rx.kick()?;

    // 3. An indirect table whose length is not a multiple of 16: the chain reads as empty.
    let table = ram.alloc(64)?;
    ram.write_descriptors(
        table.addr,
        &[Descriptor {
            addr: data.addr,
            len: 4,
            flags: 0,
            next: 0,
        }],
    )?;
    d.tx.raw_write_desc(
        ids[0],
        Descriptor {
            addr: table.addr,
            len: 24,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    )?;
    d.tx.raw_publish(ids[0]);
    d.tx.kick()?;
    assert_eq!(d.tx.wait_used(WAIT)?.head, ids[0]);
    good(&mut d, 3, rx_head)?;

    // 4. A loop in `next` (a -> b -> a): the device's chain walk stops after the ring size
    // (8) descriptors, so "AB","CD" alternate 4 times.
    ram.write(data.addr + 8, b"AB")?;
    ram.write(data.addr + 16, b"CD")?;
    let (a, b) = (ids[1], ids[2]);
    d.tx.raw_write_desc(
        a,
        Descriptor {
            addr: data.addr + 8,
            len: 2,
            flags: DESC_F_NEXT,
            next: b,
        },
    )?;
    d.tx.raw_write_desc(
        b,
        Descriptor {
            addr: data.addr + 16,
            len: 2,
            flags: DESC_F_NEXT,
            next: a,
        },
    )?;
    assert_eq!(d.tx.raw_read_desc(b)?.next, a);
    let rx_head = d.post_rx(0, false)?;
    d.tx.raw_publish(a);
    d.rx.kick()?;
    d.tx.kick()?;
    assert_eq!(d.tx.wait_used(WAIT)?.head, a);
    let r = d.rx.wait_used(WAIT)?;
    assert_eq!((r.head, r.len), (rx_head, 16));
    assert_eq!(ram.read_vec(d.rx_bufs[0].addr, 16)?, b"ABCDABCDABCDABCD");

    // 5. A zero-length descriptor is a valid, empty message.
    d.tx.raw_write_desc(
        ids[0],
        Descriptor {
            addr: data.addr,
            len: 0,
            flags: 0,
            next: 0,
        },
    )?;
    let rx_head = d.post_rx(0, false)?;
    d.tx.raw_publish(ids[0]);
    d.rx.kick()?;
    d.tx.kick()?;
    assert_eq!(d.tx.wait_used(WAIT)?.head, ids[0]);
    assert_eq!(
        d.rx.wait_used(WAIT)?,
        devshare_integration::frontend::UsedElem {
            head: rx_head,
            len: 0
        }
    );

    // After all that the device still works normally.
    let rx_head = d.post_rx(0, false)?;
    d.rx.kick()?;
    good(&mut d, 4, rx_head)?;
    conn.stop_queue(&mut d.rx)?;
    conn.stop_queue(&mut d.tx)?;
    conn.disconnect();
    check_server(server, 1);
    Ok(())
}

/// Ring layout and kick suppression, checked against the spec's byte offsets (no device).
#[test]
fn ring_layout_and_kick_suppression() -> Result<(), Error> {
    let ram = GuestRam::new(1 << 20)?;
    let size = 8u16;
    let mut q = DriverQueue::new(
        &ram,
        QueueConfig {
            index: 0,
            size,
            event_idx: true,
            indirect_max: 4,
        },
    )?;
    let l = q.layout();
    let le16 = |addr: u64| -> Result<u16, Error> {
        let b = ram.read_vec(addr, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    let buf = ram.alloc(300)?;
    let head = q.add_chain(&[
        Segment::readable(buf.prefix(100)),
        Segment::writable(buf.offset(100)),
    ])?;
    // Descriptor table: addr, len, flags, next as the spec lays them out.
    let raw = ram.read_vec(l.desc + 16 * u64::from(head), 16)?;
    assert_eq!(
        u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        buf.addr
    );
    assert_eq!(
        u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
        100
    );
    assert_eq!(u16::from_le_bytes([raw[12], raw[13]]), DESC_F_NEXT);
    let second = u16::from_le_bytes([raw[14], raw[15]]);
    let d2 = q.raw_read_desc(second)?;
    assert_eq!(
        (d2.addr, d2.len, d2.flags),
        (buf.addr + 100, 200, DESC_F_WRITE)
    );
    // Avail ring: idx at +2, ring[0] at +4.
    assert_eq!(le16(l.avail + 2)?, 1);
    assert_eq!(le16(l.avail + 4)?, head);

    // EVENT_IDX: the device asked to be kicked when avail idx passes 0 -> kick.
    q.raw_set_avail_event(0);
    assert!(q.kick()?);
    assert_eq!(q.kick_fd().read().map_err(Error::EventFd)?, 1);
    // The device wants a kick only after entry 5: adding entries 1 and 2 must not kick ...
    q.raw_set_avail_event(5);
    q.add_chain(&[Segment::readable(buf.prefix(1))])?;
    q.add_chain(&[Segment::readable(buf.prefix(1))])?;
    assert!(!q.kick()?);
    assert!(q.kick_fd().read().is_err(), "no kick may have been written");
    // ... but crossing 5 (entries 3..=6 published) must.
    for _ in 0..4 {
        q.add_indirect_chain(&[Segment::readable(buf.prefix(1))])?;
    }
    assert!(q.kick()?);

    // Used ring: play the device returning the first chain, check recycling and used_event.
    let free = q.free_descriptors();
    ram.write(l.used + 4, &u32::from(head).to_le_bytes())?;
    ram.write(l.used + 8, &150u32.to_le_bytes())?;
    ram.write(l.used + 2, &1u16.to_le_bytes())?;
    assert_eq!(
        q.poll_used()?,
        Some(devshare_integration::frontend::UsedElem { head, len: 150 })
    );
    assert_eq!(q.free_descriptors(), free + 2);
    assert_eq!(
        le16(l.avail + 4 + 2 * u64::from(size))?,
        1,
        "used_event follows last_used"
    );
    assert_eq!(q.poll_used()?, None);

    // A device claiming more bytes than the chain can hold, or an id it never got, is caught.
    ram.write(l.used + 12, &1000u32.to_le_bytes())?;
    ram.write(l.used + 16, &0u32.to_le_bytes())?;
    ram.write(l.used + 2, &2u16.to_le_bytes())?;
    assert!(matches!(
        q.poll_used(),
        Err(Error::UnexpectedUsedId { id: 1000, .. })
    ));

    // Without EVENT_IDX, the used ring's NO_NOTIFY flag suppresses kicks.
    let mut q2 = DriverQueue::new(&ram, QueueConfig::new(1, size))?;
    q2.add_chain(&[Segment::readable(buf.prefix(1))])?;
    q2.raw_set_used_flags(1);
    assert!(!q2.kick()?);
    q2.raw_set_used_flags(0);
    assert!(q2.kick()?);

    // The raw interface writes exactly what it is told.
    q2.raw_set_avail_idx(0xfff0);
    assert_eq!(le16(q2.layout().avail + 2)?, 0xfff0);
    q2.raw_publish(0x1234);
    assert_eq!(
        le16(q2.layout().avail + 4 + 2 * u64::from(0xfff0u16 % size))?,
        0x1234
    );
    assert_eq!(le16(q2.layout().avail + 2)?, 0xfff1);
    // The normal interface refuses what the spec forbids.
    assert!(matches!(
        q2.add_chain(&[Segment::writable(buf), Segment::readable(buf)]),
        Err(Error::ReadableAfterWritable { index: 1 })
    ));
    assert!(matches!(
        q2.add_indirect_chain(&[Segment::readable(buf)]),
        Err(Error::IndirectDisabled { .. })
    ));
    Ok(())
}

/// A backend started after the harness made its queues must not inherit their eventfds (the
/// soak restarts backends while harness guests live on; an inherited kick or call eventfd
/// would look like a descriptor leak of the backend, and keep the event alive).
#[test]
fn queue_eventfds_are_not_inherited_by_child_processes() -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let ram = GuestRam::new(1 << 20)?;
    let q = DriverQueue::new(&ram, QueueConfig::new(0, 8))?;
    for fd in [q.kick_fd().as_raw_fd(), q.call_fd().as_raw_fd()] {
        // SAFETY: F_GETFD only reads the descriptor flags of an fd this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert!(
            flags >= 0 && flags & libc::FD_CLOEXEC != 0,
            "fd {fd} flags {flags:#x}"
        );
    }
    Ok(())
}
