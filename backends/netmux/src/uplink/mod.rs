//! The host side: one link shared by all guests. Two kinds sit behind the [`Uplink`] trait,
//! an AF_PACKET socket on an existing interface and a TAP device. Both carry a virtio-net
//! header on every frame, so checksum and segmentation offloads pass through to and from the
//! host kernel instead of being done here.
//!
//! Transmit takes frames in batches whose bytes stay in guest memory (`iovec`s); receive fills
//! a set of host buffers, which the switch then copies into guest RX buffers.

mod af_packet;
mod sys;
mod tap;

use std::io;
use std::os::fd::RawFd;

use crate::virtio_net::{NetHdr, HDR_LEN_LEGACY};

pub use af_packet::AfPacket;
pub use tap::Tap;

/// Why an uplink could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The interface does not exist.
    #[error("no network interface named '{0}'")]
    NoSuchInterface(String),
    /// A system call failed while setting the uplink up.
    #[error("cannot set up uplink {name}: {what}: {source}")]
    Setup {
        /// Uplink name.
        name: String,
        /// Which step failed.
        what: &'static str,
        /// Underlying error.
        source: io::Error,
    },
}

/// How one frame of a transmit batch fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The kernel took it.
    Sent,
    /// The uplink's queue was full; dropped.
    Busy,
    /// The kernel refused this frame (bad offload request, too long for the link, ...).
    Refused,
}

/// Largest frame the uplink hands over, including a full 64 KiB segment and a VLAN tag.
pub const MAX_FRAME: usize = 65536 + 14 + 4;
/// Frames received per batch.
pub const RX_BATCH: usize = 32;
/// Bytes of host memory a frame to transmit may start with before the guest's bytes: the
/// virtio-net header and the Ethernet header (with an 802.1Q tag when the frame is tagged on
/// its way out).
pub const TX_HEAD_MAX: usize = HDR_LEN_LEGACY + 14 + 4;
/// Most pieces of guest memory one frame to transmit may be in: one `iovec` of the
/// kernel's limit goes to the host head.
pub const TX_MAX_PIECES: usize = libc::UIO_MAXIOV as usize - 1;

/// Frames to transmit, their bytes mostly left in guest memory.
#[derive(Default)]
pub struct TxBatch {
    heads: Vec<[u8; TX_HEAD_MAX]>,
    head_lens: Vec<usize>,
    iov: Vec<libc::iovec>,
    ranges: Vec<(usize, usize)>,
    outcomes: Vec<SendOutcome>,
}

impl TxBatch {
    /// An empty batch.
    pub fn new() -> TxBatch {
        TxBatch::default()
    }

    /// Adds a frame: `head` (host bytes, at most [`TX_HEAD_MAX`]) followed by the bytes
    /// `guest` points at. The pointers must stay valid until [`Uplink::send`] ran. Refuses
    /// (returns false) a frame the kernel could not take in one message: a head too long, or
    /// more than [`TX_MAX_PIECES`] pieces of guest memory.
    pub fn push(&mut self, head: &[u8], guest: Vec<libc::iovec>) -> bool {
        if head.len() > TX_HEAD_MAX || guest.len() > TX_MAX_PIECES {
            return false;
        }
        let mut h = [0u8; TX_HEAD_MAX];
        let n = head.len();
        h[..n].copy_from_slice(head);
        self.heads.push(h);
        self.head_lens.push(n);
        let start = self.iov.len();
        self.iov.extend(guest);
        self.ranges.push((start, self.iov.len()));
        true
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Outcome of each frame, in push order, after [`Uplink::send`].
    pub fn outcomes(&self) -> &[SendOutcome] {
        &self.outcomes
    }

    /// Sets every frame's outcome to `outcome`: for an [`Uplink`] that takes or refuses a
    /// whole batch at once.
    pub fn set_outcomes(&mut self, outcome: SendOutcome) {
        self.outcomes.clear();
        self.outcomes.resize(self.len(), outcome);
    }

    /// The bytes of frame `i` as the kernel would take them (host head, then guest bytes).
    /// Must run while the guest memory is still mapped, like [`Uplink::send`].
    pub fn copy_frame(&self, i: usize) -> Option<Vec<u8>> {
        let (a, b) = *self.ranges.get(i)?;
        let mut out = self.heads[i][..self.head_lens[i]].to_vec();
        for v in &self.iov[a..b] {
            // SAFETY: the iovecs were made from guest memory slices that stay mapped until
            // the batch is sent (see `push`); `iov_len` bytes are readable at `iov_base`.
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            out.extend_from_slice(bytes);
        }
        Some(out)
    }

    /// One iovec list per frame: the host head, then the guest bytes.
    fn frame_iovecs(&self) -> Vec<Vec<libc::iovec>> {
        (0..self.heads.len())
            .map(|i| {
                let (a, b) = self.ranges[i];
                let mut v = Vec::with_capacity(1 + b - a);
                v.push(libc::iovec {
                    iov_base: self.heads[i].as_ptr() as *mut libc::c_void,
                    iov_len: self.head_lens[i],
                });
                v.extend_from_slice(&self.iov[a..b]);
                v
            })
            .collect()
    }
}

/// A VLAN tag the kernel took off a received frame and reported in `PACKET_AUXDATA` (the tag
/// is no longer in the frame's bytes then).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanTag {
    /// Tag protocol identifier: 0x8100 for an 802.1Q C-tag, 0x88a8 for an 802.1ad S-tag.
    pub tpid: u16,
    /// VLAN id, 0 to 4095 (0: a priority tag, no VLAN).
    pub vid: u16,
}

/// One received frame.
pub struct RxFrame<'a> {
    /// The offload header the kernel supplied.
    pub hdr: NetHdr,
    /// The outer tag, if the kernel took it off; inline tags are for the caller to handle.
    pub tag: Option<VlanTag>,
    /// The Ethernet frame, writable so an inline VLAN tag can be removed in place.
    pub data: &'a mut [u8],
}

/// Host buffers for a receive batch.
pub struct RxBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    tags: Vec<Option<VlanTag>>,
    count: usize,
}

impl Default for RxBatch {
    fn default() -> Self {
        RxBatch::new()
    }
}

impl RxBatch {
    /// Buffers for [`RX_BATCH`] frames of up to [`MAX_FRAME`] bytes each.
    pub fn new() -> RxBatch {
        RxBatch {
            bufs: (0..RX_BATCH)
                .map(|_| vec![0u8; HDR_LEN_LEGACY + MAX_FRAME])
                .collect(),
            lens: vec![0; RX_BATCH],
            tags: vec![None; RX_BATCH],
            count: 0,
        }
    }

    /// Frame `i` of the last receive (`i < count`).
    pub fn frame(&mut self, i: usize) -> Option<RxFrame<'_>> {
        if i >= self.count {
            return None;
        }
        let len = self.lens[i];
        let buf = self.bufs.get_mut(i)?;
        if len < HDR_LEN_LEGACY || len > buf.len() {
            return None;
        }
        let (h, data) = buf[..len].split_at_mut(HDR_LEN_LEGACY);
        Some(RxFrame {
            hdr: NetHdr::from_bytes(h),
            tag: self.tags[i],
            data,
        })
    }
}

/// The host link all guests share.
pub trait Uplink: Send + Sync {
    /// `af-packet:IFACE` or `tap:NAME`, for logs.
    fn describe(&self) -> String;
    /// The descriptor to poll for readable frames.
    fn raw_fd(&self) -> RawFd;
    /// Transmits a batch; fills [`TxBatch::outcomes`]. Never blocks.
    fn send(&self, batch: &mut TxBatch);
    /// Receives up to [`RX_BATCH`] frames without blocking; returns how many (0: none).
    fn recv(&self, batch: &mut RxBatch) -> io::Result<usize>;
}
