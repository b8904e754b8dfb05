//! A virtio-console guest driver on top of the [`frontend`] harness: the
//! control-queue conversation Linux's `virtio_console` has with the device (DEVICE_READY,
//! PORT_READY, PORT_OPEN) and data through the ports' receive and transmit queues.
//!
//! Tests use it to play a guest without booting one; the `console_load` benchmark uses it to
//! bring ports up and then drives the rings itself, polling.
//!
//! Queue layout (virtio 1.2, 5.3.2): port 0 uses queues 0 (receive) and 1 (transmit), the
//! control queues are 2 (device to driver) and 3 (driver to device), port n > 0 uses 2 + 2n
//! and 3 + 2n.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::frontend::{
    self, Connection, DriverQueue, GuestBuffer, GuestRam, Negotiated, QueueConfig, Segment,
    UsedElem, VhostUserProtocolFeatures, DEFAULT_INDIRECT_MAX, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Feature bit number: console size in the config space.
pub const F_SIZE: u32 = 0;
/// Feature bit number: several ports and the control queues.
pub const F_MULTIPORT: u32 = 1;
/// Feature bit number: emergency write through the config space.
pub const F_EMERG_WRITE: u32 = 2;

/// Control event: the driver is ready for port announcements.
pub const DEVICE_READY: u16 = 0;
/// Control event: the device announces a port.
pub const DEVICE_ADD: u16 = 1;
/// Control event: the device removes a port.
pub const DEVICE_REMOVE: u16 = 2;
/// Control event: the driver has set a port up.
pub const PORT_READY: u16 = 3;
/// Control event: the port is a console.
pub const CONSOLE_PORT: u16 = 4;
/// Control event: the console size changed.
pub const RESIZE: u16 = 5;
/// Control event: a side opened (1) or closed (0) the port.
pub const PORT_OPEN: u16 = 6;
/// Control event: the port's name follows the header.
pub const PORT_NAME: u16 = 7;

/// Control receive queue (device to driver).
pub const CONTROL_RX: u16 = 2;
/// Control transmit queue (driver to device).
pub const CONTROL_TX: u16 = 3;

/// Size of each control receive buffer: a header and a port name of up to 248 bytes.
const CONTROL_BUF: u32 = 256;
/// Control receive buffers kept posted.
const CONTROL_BUFS: usize = 32;
/// Largest chain [`ConsoleGuest::send`] builds.
const SEND_CHUNK: usize = 64 * 1024;

/// What can go wrong while playing the guest.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleGuestError {
    /// The harness reported an error.
    #[error(transparent)]
    Frontend(#[from] frontend::Error),
    /// The device said something a driver would not accept.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No such queue on this device (port out of range, or MULTIPORT off).
    #[error("queue {0} is not set up")]
    NoQueue(u16),
}

type Result<T> = std::result::Result<T, ConsoleGuestError>;

/// How to drive the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestOptions {
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC and send chains through indirect tables.
    pub indirect: bool,
    /// Negotiate MULTIPORT (needed for more than one port and for the control queues).
    pub multiport: bool,
    /// Ring size of every queue.
    pub queue_size: u16,
    /// Guest RAM in bytes.
    pub ram: u64,
    /// Accept a used length on a transmit chain larger than its device-writable part (0):
    /// vhost-device-console reports the bytes it read there. Off for tests of our backend.
    pub lenient_used_len: bool,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            event_idx: true,
            indirect: true,
            multiport: true,
            queue_size: 256,
            ram: 64 << 20,
            lenient_used_len: false,
        }
    }
}

/// One control message, as it travels on the control queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMsg {
    /// Port id.
    pub id: u32,
    /// Event (one of the constants of this module).
    pub event: u16,
    /// Event argument.
    pub value: u16,
    /// Bytes after the 8-byte header (the name of PORT_NAME, the size of RESIZE).
    pub payload: Vec<u8>,
}

impl ControlMsg {
    /// The message in guest byte order.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.payload.len());
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.event.to_le_bytes());
        v.extend_from_slice(&self.value.to_le_bytes());
        v.extend_from_slice(&self.payload);
        v
    }

    fn decode(b: &[u8]) -> Option<ControlMsg> {
        if b.len() < 8 {
            return None;
        }
        Some(ControlMsg {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
            payload: b[8..].to_vec(),
        })
    }
}

/// (receive queue, transmit queue) of `port`.
pub fn port_queues(port: usize) -> (u16, u16) {
    if port == 0 {
        (0, 1)
    } else {
        (2 + 2 * port as u16, 3 + 2 * port as u16)
    }
}

/// A guest's virtio-console driver on one vhost-user connection.
pub struct ConsoleGuest {
    /// Guest memory (shared with the backend).
    pub ram: GuestRam,
    /// The vhost-user connection.
    pub conn: Connection,
    /// What the handshake agreed.
    pub agreed: Negotiated,
    /// Every queue of the device, by index.
    pub queues: Vec<DriverQueue>,
    opts: GuestOptions,
    /// Buffers of chains in flight, by (queue, head), to read received bytes and re-post.
    posted: HashMap<(u16, u16), Vec<GuestBuffer>>,
    /// One reusable transmit buffer per queue for [`send`](Self::send).
    tx_scratch: HashMap<u16, GuestBuffer>,
    /// Control messages received but not yet taken by [`recv_control`](Self::recv_control).
    control_backlog: Vec<ControlMsg>,
}

impl ConsoleGuest {
    /// Connects to the backend socket at `path`, negotiates and starts every queue.
    pub fn connect(path: impl AsRef<Path>, opts: GuestOptions) -> Result<ConsoleGuest> {
        let conn = Connection::connect(path)?;
        ConsoleGuest::start(conn, opts)
    }

    /// Negotiates on an open connection and starts every queue.
    pub fn start(mut conn: Connection, opts: GuestOptions) -> Result<ConsoleGuest> {
        let ram = GuestRam::new(opts.ram)?;
        let mut want = 1u64 << VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | 1 << F_SIZE
            | 1 << F_EMERG_WRITE;
        if opts.multiport {
            want |= 1 << F_MULTIPORT;
        }
        if opts.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect {
            want |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        let agreed = conn.handshake(
            want,
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK,
        )?;
        let count = if agreed.has(F_MULTIPORT) {
            agreed.queue_num.unwrap_or(4) as u16
        } else {
            2
        };
        conn.set_mem_table(&ram)?;
        let mut queues = Vec::with_capacity(usize::from(count));
        for index in 0..count {
            let cfg = QueueConfig {
                index,
                size: opts.queue_size,
                event_idx: agreed.has(VIRTIO_RING_F_EVENT_IDX),
                indirect_max: if agreed.has(VIRTIO_RING_F_INDIRECT_DESC) {
                    DEFAULT_INDIRECT_MAX
                } else {
                    0
                },
            };
            let mut q = DriverQueue::new(&ram, cfg)?;
            conn.attach_queue(&mut q)?;
            queues.push(q);
        }
        Ok(ConsoleGuest {
            ram,
            conn,
            agreed,
            queues,
            opts,
            posted: HashMap::new(),
            tx_scratch: HashMap::new(),
            control_backlog: Vec::new(),
        })
    }

    /// Dials `path` again after the backend went away and hands it the device as it stands,
    /// as QEMU does for a backend that restarted: the features agreed before, the same
    /// memory, every queue resumed where the driver stands (at the used index, since
    /// GET_VRING_BASE could not be asked of a dead backend). Chains the old backend never
    /// marked used are still in the rings; every queue is kicked for them.
    pub fn reconnect(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let mut conn = Connection::connect(path)?;
        conn.handshake(self.agreed.acked_features, self.agreed.acked_protocol)?;
        conn.set_mem_table(&self.ram)?;
        for q in self.queues.iter_mut() {
            conn.attach_queue(q)?;
        }
        self.conn = conn;
        for q in &self.queues {
            q.notify()?;
        }
        Ok(())
    }

    /// The options this guest was started with.
    pub fn options(&self) -> GuestOptions {
        self.opts
    }

    /// Whether chains go through indirect tables.
    pub fn uses_indirect(&self) -> bool {
        self.agreed.has(VIRTIO_RING_F_INDIRECT_DESC)
    }

    /// Queue `index`.
    pub fn queue(&mut self, index: u16) -> Result<&mut DriverQueue> {
        self.queues
            .get_mut(usize::from(index))
            .ok_or(ConsoleGuestError::NoQueue(index))
    }

    /// Adds a chain over `segs` the way this guest was configured (indirect or not).
    pub fn add_chain(&mut self, q: u16, segs: &[Segment]) -> Result<u16> {
        let indirect = self.uses_indirect();
        let queue = self.queue(q)?;
        Ok(if indirect {
            queue.add_indirect_chain(segs)?
        } else {
            queue.add_chain(segs)?
        })
    }

    // ---- control queues ----

    /// Posts the control receive buffers (once per connection, before DEVICE_READY).
    pub fn post_control_buffers(&mut self) -> Result<()> {
        for _ in 0..CONTROL_BUFS {
            let b = self.ram.alloc(CONTROL_BUF)?;
            let head = self.add_chain(CONTROL_RX, &[Segment::writable(b)])?;
            self.posted.insert((CONTROL_RX, head), vec![b]);
        }
        self.queue(CONTROL_RX)?.kick()?;
        Ok(())
    }

    /// Sends raw bytes as one control message chain and waits for the device to take it.
    pub fn send_control_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let b = self.ram.alloc(bytes.len().max(1) as u32)?;
        self.ram.fill(b, bytes)?;
        let b = b.prefix(bytes.len() as u32);
        self.add_chain(CONTROL_TX, &[Segment::readable(b)])?;
        self.queue(CONTROL_TX)?.kick()?;
        self.wait_tx_used(CONTROL_TX, Duration::from_secs(10))?;
        Ok(())
    }

    /// Waits for a used transmit chain of queue `q`, tolerating a too-long used length when
    /// the options say so.
    pub fn wait_tx_used(&mut self, q: u16, timeout: Duration) -> Result<UsedElem> {
        let lenient = self.opts.lenient_used_len;
        match self.queue(q)?.wait_used(timeout) {
            Err(frontend::Error::UsedLenTooLong { head, len, .. }) if lenient => {
                Ok(UsedElem { head, len })
            }
            r => Ok(r?),
        }
    }

    /// Takes a used transmit chain of queue `q` if there is one (see
    /// [`wait_tx_used`](Self::wait_tx_used) for the leniency).
    pub fn poll_tx_used(&mut self, q: u16) -> Result<Option<UsedElem>> {
        let lenient = self.opts.lenient_used_len;
        match self.queue(q)?.poll_used() {
            Err(frontend::Error::UsedLenTooLong { head, len, .. }) if lenient => {
                Ok(Some(UsedElem { head, len }))
            }
            r => Ok(r?),
        }
    }

    /// Sends one control message.
    pub fn send_control(&mut self, id: u32, event: u16, value: u16) -> Result<()> {
        let msg = ControlMsg {
            id,
            event,
            value,
            payload: Vec::new(),
        };
        self.send_control_bytes(&msg.encode())
    }

    /// The next control message from the device (re-posting its buffer).
    pub fn recv_control(&mut self, timeout: Duration) -> Result<ControlMsg> {
        if !self.control_backlog.is_empty() {
            return Ok(self.control_backlog.remove(0));
        }
        let used = self.queue(CONTROL_RX)?.wait_used(timeout)?;
        let bytes = self.take_received(CONTROL_RX, used.head, used.len as usize)?;
        ControlMsg::decode(&bytes).ok_or_else(|| {
            ConsoleGuestError::Protocol(format!(
                "control message of {} bytes is shorter than its header",
                bytes.len()
            ))
        })
    }

    /// Waits for a control message matching `pred`, keeping the others for later.
    pub fn expect_control(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&ControlMsg) -> bool,
    ) -> Result<ControlMsg> {
        if let Some(i) = self.control_backlog.iter().position(&pred) {
            return Ok(self.control_backlog.remove(i));
        }
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_control(left) {
                Ok(m) if pred(&m) => break Ok(m),
                Ok(m) => skipped.push(m),
                Err(ConsoleGuestError::Frontend(frontend::Error::Timeout { .. })) => {
                    break Err(ConsoleGuestError::Protocol(format!(
                        "expected control message not received within {timeout:?}; got {skipped:?}"
                    )))
                }
                Err(e) => break Err(e),
            }
        };
        self.control_backlog.extend(skipped);
        found
    }

    /// What a Linux guest does at probe time: DEVICE_READY, then PORT_READY for every
    /// announced port, then PORT_OPEN for each (a program opened it). Returns every control
    /// message the device sent along the way, in order.
    pub fn bring_up(&mut self, ports: usize) -> Result<Vec<ControlMsg>> {
        let all: Vec<usize> = (0..ports).collect();
        self.bring_up_opening(ports, &all)
    }

    /// [`bring_up`](Self::bring_up), but only the ports in `open` are opened by a program;
    /// the others stay set up and closed (as on a guest where nothing opened them yet).
    pub fn bring_up_opening(&mut self, ports: usize, open: &[usize]) -> Result<Vec<ControlMsg>> {
        let t = Duration::from_secs(10);
        self.post_control_buffers()?;
        self.send_control(0, DEVICE_READY, 1)?;
        let mut seen = Vec::new();
        for _ in 0..ports {
            let m = self.recv_control(t)?;
            if m.event != DEVICE_ADD {
                return Err(ConsoleGuestError::Protocol(format!(
                    "expected DEVICE_ADD, got {m:?}"
                )));
            }
            seen.push(m);
        }
        for port in 0..ports as u32 {
            self.send_control(port, PORT_READY, 1)?;
            loop {
                let m = self.recv_control(t)?;
                let done = m.id == port && m.event == PORT_OPEN;
                seen.push(m);
                if done {
                    break;
                }
            }
        }
        for &port in open {
            self.send_control(port as u32, PORT_OPEN, 1)?;
        }
        Ok(seen)
    }

    // ---- data ----

    /// Posts `count` receive chains on `port`, each of `segments` buffers of `len` bytes.
    pub fn post_rx(&mut self, port: usize, count: usize, len: u32, segments: usize) -> Result<()> {
        let (rxq, _) = port_queues(port);
        for _ in 0..count {
            let bufs: Vec<GuestBuffer> = (0..segments.max(1))
                .map(|_| self.ram.alloc(len))
                .collect::<std::result::Result<_, _>>()?;
            let segs: Vec<Segment> = bufs.iter().map(|b| Segment::writable(*b)).collect();
            let head = self.add_chain(rxq, &segs)?;
            self.posted.insert((rxq, head), bufs);
        }
        self.queue(rxq)?.kick()?;
        Ok(())
    }

    /// Takes the next filled receive chain of `port` and re-posts it. Returns its bytes.
    pub fn recv(&mut self, port: usize, timeout: Duration) -> Result<Vec<u8>> {
        let (rxq, _) = port_queues(port);
        let used = self.queue(rxq)?.wait_used(timeout)?;
        self.take_received(rxq, used.head, used.len as usize)
    }

    /// Receives on `port` until `len` bytes arrived (at most `timeout` in all).
    pub fn recv_exact(&mut self, port: usize, len: usize, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let left = deadline.saturating_duration_since(Instant::now());
            out.extend(self.recv(port, left)?);
        }
        Ok(out)
    }

    /// Copies the first `len` bytes of a used chain out and posts the same buffers again.
    fn take_received(&mut self, q: u16, head: u16, len: usize) -> Result<Vec<u8>> {
        let bufs = self.posted.remove(&(q, head)).ok_or_else(|| {
            ConsoleGuestError::Protocol(format!("queue {q}: used head {head} was not posted"))
        })?;
        let mut out = Vec::with_capacity(len);
        for b in &bufs {
            let n = (len - out.len()).min(b.len as usize);
            if n == 0 {
                break;
            }
            out.extend(self.ram.read_vec(b.addr, n)?);
        }
        if out.len() < len {
            return Err(ConsoleGuestError::Protocol(format!(
                "queue {q}: device used {len} bytes of a {}-byte chain",
                out.len()
            )));
        }
        let segs: Vec<Segment> = bufs.iter().map(|b| Segment::writable(*b)).collect();
        let new_head = self.add_chain(q, &segs)?;
        self.posted.insert((q, new_head), bufs);
        self.queue(q)?.kick()?;
        Ok(out)
    }

    /// Queues `data` on `port`'s transmit queue as one chain of `segments` parts in newly
    /// allocated guest memory, and kicks. Returns the head; the chain completes later.
    pub fn submit(&mut self, port: usize, data: &[u8], segments: usize) -> Result<u16> {
        let (_, txq) = port_queues(port);
        let b = self.ram.alloc(data.len().max(1) as u32)?;
        self.ram.fill(b, data)?;
        let segs = split(b.prefix(data.len() as u32), segments);
        let head = self.add_chain(txq, &segs)?;
        self.queue(txq)?.kick()?;
        Ok(head)
    }

    /// Sends `data` on `port` in chains of at most 64 KiB, each split into `segments` parts,
    /// waiting for every chain to be used. Reuses one buffer per queue, so it can run forever.
    pub fn send(&mut self, port: usize, data: &[u8], segments: usize) -> Result<()> {
        let (_, txq) = port_queues(port);
        let scratch = match self.tx_scratch.get(&txq) {
            Some(b) => *b,
            None => {
                let b = self.ram.alloc(SEND_CHUNK as u32)?;
                self.tx_scratch.insert(txq, b);
                b
            }
        };
        for chunk in data.chunks(SEND_CHUNK) {
            self.ram.fill(scratch, chunk)?;
            let segs = split(scratch.prefix(chunk.len() as u32), segments);
            let head = self.add_chain(txq, &segs)?;
            self.queue(txq)?.kick()?;
            let used = self.wait_tx_used(txq, Duration::from_secs(10))?;
            if used.head != head {
                return Err(ConsoleGuestError::Protocol(format!(
                    "queue {txq}: used head {} while only {head} was in flight",
                    used.head
                )));
            }
        }
        Ok(())
    }
}

/// Splits `b` into `parts` consecutive segments (fewer if it is shorter).
pub fn split(b: GuestBuffer, parts: usize) -> Vec<Segment> {
    let parts = parts.clamp(1, b.len.max(1) as usize) as u32;
    let step = b.len / parts;
    (0..parts)
        .map(|i| {
            let start = i * step;
            let len = if i + 1 == parts { b.len - start } else { step };
            Segment::readable(b.offset(start).prefix(len))
        })
        .collect()
}
