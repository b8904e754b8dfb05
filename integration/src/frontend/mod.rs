//! A vhost-user frontend that plays QEMU and the guest's virtio driver, with no VM.
//!
//! Tests use it to drive a backend over its Unix socket exactly as QEMU plus a guest driver
//! would, and to send what a real guest never would (the `raw_*` methods of [`DriverQueue`]).
//! Benchmarks use it as a polling load generator: the ring code does no allocation and no
//! per-byte work.
//!
//! The pieces:
//! - [`GuestRam`]: memfd-backed guest memory with a bump allocator, shared with the backend by
//!   SET_MEM_TABLE.
//! - [`Connection`]: the vhost-user control channel (connect, or accept a backend in client
//!   mode through [`FrontendListener`]); one method per message plus QEMU-like sequences.
//! - [`DriverQueue`]: one split virtqueue's driver side: chains in, kicks, used buffers out.
//!
//! A typical test:
//!
//! ```no_run
//! use std::time::Duration;
//! use devshare_integration::frontend::{
//!     Connection, GuestRam, Segment, VhostUserProtocolFeatures, VHOST_USER_F_PROTOCOL_FEATURES,
//!     VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
//! };
//!
//! # fn main() -> Result<(), devshare_integration::frontend::Error> {
//! let ram = GuestRam::new(16 << 20)?;
//! let mut conn = Connection::connect("/tmp/backend.sock")?;
//! let agreed = conn.handshake(
//!     1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES,
//!     VhostUserProtocolFeatures::CONFIG
//!         | VhostUserProtocolFeatures::MQ
//!         | VhostUserProtocolFeatures::REPLY_ACK,
//! )?;
//! assert!(agreed.has(VIRTIO_F_VERSION_1));
//! conn.set_mem_table(&ram)?;
//! let mut rx = conn.start_queue(&ram, 0, 256)?;
//! let mut tx = conn.start_queue(&ram, 1, 256)?;
//!
//! // Give the device a receive buffer and send it a message.
//! let rx_buf = ram.alloc(2048)?;
//! rx.add_chain(&[Segment::writable(rx_buf)])?;
//! rx.kick()?;
//! let tx_buf = ram.alloc(5)?;
//! ram.fill(tx_buf, b"hello")?;
//! tx.add_chain(&[Segment::readable(tx_buf)])?;
//! tx.kick()?;
//!
//! let sent = tx.wait_used(Duration::from_secs(5))?;
//! let got = rx.wait_used(Duration::from_secs(5))?;
//! let bytes = ram.read_vec(rx_buf.addr, got.len as usize)?;
//! # let _ = (sent, bytes);
//!
//! conn.stop_queue(&mut rx)?;
//! conn.stop_queue(&mut tx)?;
//! conn.disconnect();
//! # Ok(())
//! # }
//! ```
//!
//! To reconnect, make a new [`Connection`] to the same path, `handshake`, `set_mem_table`, and
//! [`Connection::attach_queue`] the same queues: they resume from the base the backend gave on
//! GET_VRING_BASE.

mod connection;
mod memory;
mod queue;

use std::path::PathBuf;
use std::time::Duration;

pub use connection::{
    Connection, FrontendListener, Negotiated, DEFAULT_CONNECT_TIMEOUT, DEFAULT_INDIRECT_MAX,
    VHOST_USER_F_PROTOCOL_FEATURES,
};
pub use memory::{GuestBuffer, GuestRam, DEFAULT_ALIGN};
pub use queue::{
    need_event, Descriptor, DriverQueue, QueueConfig, RingLayout, Segment, UsedElem,
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE_SIZE,
};
pub use vhost::vhost_user::VhostUserProtocolFeatures;
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Everything the frontend harness can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// memfd_create or sizing the memfd failed.
    #[error("creating guest memory: {0}")]
    MemoryCreate(#[source] std::io::Error),
    /// The requested guest memory layout cannot be built or described.
    #[error("guest memory layout: {0}")]
    MemoryLayout(String),
    /// The bump allocator has no room left.
    #[error("guest memory exhausted: no region has {requested} free bytes at alignment {align}; make the GuestRam bigger")]
    OutOfGuestMemory {
        /// Bytes asked for.
        requested: u64,
        /// Alignment asked for.
        align: u64,
    },
    /// An address range is not inside one guest memory region.
    #[error("guest range {addr:#x}+{len:#x} is not inside one guest memory region")]
    BadGuestRange {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Reading or writing guest memory failed.
    #[error("guest memory access at {addr:#x}: {source}")]
    GuestAccess {
        /// Guest-physical address accessed.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Data does not fit the buffer it was meant for.
    #[error("{needed} bytes do not fit the {len}-byte buffer at {addr:#x}")]
    BufferTooSmall {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
        /// Bytes that were to be written.
        needed: usize,
    },
    /// Connecting to the backend's socket failed.
    #[error("connecting to backend socket {}: {source}", path.display())]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Listening for (or accepting) a backend in client mode failed.
    #[error("listening for a backend on {}: {source}", path.display())]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No backend connected in time.
    #[error("no backend connected to {} within {timeout:?}", path.display())]
    AcceptTimeout {
        /// Socket path.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// A vhost-user request failed or was refused by the backend.
    #[error("vhost-user {request} failed: {source}")]
    Request {
        /// The request's name in the vhost-user spec.
        request: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
    },
    /// Duplicating the control socket's descriptor failed.
    #[error("duplicating the vhost-user socket: {0}")]
    DupSocket(#[source] std::io::Error),
    /// Creating an eventfd failed.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Queue size not allowed by the virtio spec.
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadQueueSize(u16),
    /// A chain needs at least one segment.
    #[error("a descriptor chain needs at least one segment")]
    EmptyChain,
    /// Device-readable segments must come before device-writable ones.
    #[error("segment {index} is device-readable but follows a device-writable one (use the raw interface to send that)")]
    ReadableAfterWritable {
        /// Index of the offending segment.
        index: usize,
    },
    /// Not enough free descriptors.
    #[error("queue {queue}: chain needs {needed} descriptors but {free} are free (wait for used buffers first)")]
    QueueFull {
        /// Queue index.
        queue: u16,
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// Indirect chains were not set up for this queue.
    #[error(
        "queue {queue} has no indirect tables (INDIRECT_DESC not negotiated or indirect_max = 0)"
    )]
    IndirectDisabled {
        /// Queue index.
        queue: u16,
    },
    /// Too many segments for one indirect table.
    #[error("indirect chain of {len} segments exceeds the table size {max}")]
    IndirectTooLong {
        /// Segments given.
        len: usize,
        /// Table entries available.
        max: u16,
    },
    /// A descriptor or ring slot index outside the ring.
    #[error("index {index} is outside a ring of size {size}")]
    BadDescriptorIndex {
        /// Index given.
        index: u16,
        /// Ring size.
        size: u16,
    },
    /// The device returned an id it was never given.
    #[error("queue {queue}: device returned used id {id}, which the driver never made available")]
    UnexpectedUsedId {
        /// Queue index.
        queue: u16,
        /// The id in the used ring.
        id: u32,
    },
    /// The device claims to have written more than the chain can hold.
    #[error("queue {queue}: device wrote {len} bytes into chain {head} whose device-writable capacity is {capacity}")]
    UsedLenTooLong {
        /// Queue index.
        queue: u16,
        /// Chain head.
        head: u16,
        /// Length the device reported.
        len: u32,
        /// Device-writable bytes in the chain.
        capacity: u64,
    },
    /// The device's used index ran more than a ring's worth ahead of the driver.
    #[error(
        "queue {queue}: device used index {used} is more than the ring size ahead of {last_used}"
    )]
    UsedIdxAhead {
        /// Queue index.
        queue: u16,
        /// The device's used index.
        used: u16,
        /// The driver's last consumed index.
        last_used: u16,
    },
    /// The operation needs a queue with nothing in flight.
    #[error("queue {queue} has {count} chains in flight")]
    InFlight {
        /// Queue index.
        queue: u16,
        /// Chains in flight.
        count: u16,
    },
    /// Writing the kick eventfd failed.
    #[error("kicking queue {queue}: {source}")]
    Kick {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting on the call eventfd failed.
    #[error("waiting for a call on queue {queue}: {source}")]
    Wait {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No used buffer arrived in time.
    #[error("queue {queue}: no used buffer within {timeout:?}")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// How long we waited.
        timeout: Duration,
    },
    /// Fewer used buffers than wanted arrived in time.
    #[error("queue {queue}: only {got} of {wanted} used buffers within {timeout:?}")]
    TimeoutN {
        /// Queue index.
        queue: u16,
        /// How long we waited.
        timeout: Duration,
        /// Buffers wanted.
        wanted: usize,
        /// Buffers that arrived.
        got: usize,
    },
}
