//! The host side: one link shared by all guests. Two kinds sit behind the [`Uplink`] trait,
//! an AF_PACKET socket on an existing interface and a TAP device. Both carry a virtio-net
//! header on every frame, so checksum and segmentation offloads pass through to and from the
//! host kernel instead of being done here.
//!
//! Transmit takes frames in batches whose bytes stay in guest memory (`iovec`s); receive fills
//! a set of host buffers, which the switch then copies into guest RX buffers.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::config::MacAddr;
use crate::frame::ETH_P_8021Q;
use crate::virtio_net::{NetHdr, HDR_LEN_LEGACY};

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

/// An interface name as `struct ifreq` holds it: NUL-padded, cut to IFNAMSIZ - 1 bytes.
fn ifreq_name(name: &str) -> [u8; libc::IFNAMSIZ] {
    let mut out = [0; libc::IFNAMSIZ];
    let n = name.len().min(libc::IFNAMSIZ - 1);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// A plain datagram socket, used only as the handle for interface ioctls.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

fn setup_err<'a>(name: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> UplinkError + 'a {
    move |source| UplinkError::Setup {
        name: name.to_string(),
        what,
        source,
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points at a live `T` and its exact size is passed; the kernel only reads.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (val as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn is_would_block(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR)
    )
}

/// An AF_PACKET raw socket bound to one interface, promiscuous, with virtio-net headers,
/// batched with `sendmmsg`/`recvmmsg`.
pub struct AfPacket {
    name: String,
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl AfPacket {
    /// Opens the socket on interface `name`.
    pub fn open(name: &str) -> Result<AfPacket, UplinkError> {
        let cname = CString::new(name).map_err(|_| UplinkError::NoSuchInterface(name.into()))?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(UplinkError::NoSuchInterface(name.into()));
        }
        // SAFETY: plain socket creation; the result is checked before use.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        })
        .map_err(setup_err(name, "socket(AF_PACKET)"))?;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // The header must be enabled before binding; it tells us about (and lets us hand
        // over) checksum and segmentation offloads.
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)
            .map_err(setup_err(name, "PACKET_VNET_HDR"))?;
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_AUXDATA, &one)
            .map_err(setup_err(name, "PACKET_AUXDATA"))?;
        // Our own transmissions must not come back as received frames.
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)
            .map_err(setup_err(name, "PACKET_IGNORE_OUTGOING"))?;
        // Skipping the qdisc makes a full device queue show up as EAGAIN right away.
        if let Err(e) = setsockopt(raw, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one) {
            log::debug!("{name}: PACKET_QDISC_BYPASS unavailable: {e}");
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and its size is passed.
        cvt(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(setup_err(name, "bind"))?;
        // SAFETY: packet_mreq is plain data; all-zero is a valid starting value.
        let mut mreq: libc::packet_mreq = unsafe { mem::zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .map_err(setup_err(name, "promiscuous mode"))?;
        Ok(AfPacket {
            name: name.into(),
            fd,
        })
    }
}

impl Uplink for AfPacket {
    fn describe(&self) -> String {
        format!("af-packet:{}", self.name)
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn send(&self, batch: &mut TxBatch) {
        let n = batch.len();
        batch.outcomes.clear();
        batch.outcomes.resize(n, SendOutcome::Busy);
        if n == 0 {
            return;
        }
        let mut iovs = batch.frame_iovecs();
        // SAFETY: mmsghdr is plain data; all-zero is valid (no name, no control).
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = v.as_mut_ptr();
            m.msg_hdr.msg_iovlen = v.len();
        }
        let mut i = 0;
        while i < n {
            let rest = &mut msgs[i..];
            // SAFETY: every message points at iovecs that live in `iovs` for this call and
            // cover host header bytes in `batch` and guest memory the caller keeps mapped.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                for o in &mut batch.outcomes[i..i + r as usize] {
                    *o = SendOutcome::Sent;
                }
                i += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if r == 0 || is_would_block(&e) {
                // The rest stay `Busy`.
                break;
            }
            // sendmmsg reports an error only for the first message it could not send.
            log::debug!("{}: frame refused: {e}", self.name);
            batch.outcomes[i] = SendOutcome::Refused;
            i += 1;
        }
    }

    fn recv(&self, batch: &mut RxBatch) -> io::Result<usize> {
        const CMSG_SPACE: usize = 64;
        let n = batch.bufs.len();
        let mut iovs: Vec<libc::iovec> = batch
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut ctl = vec![[0u64; CMSG_SPACE / 8]; n];
        // SAFETY: mmsghdr is plain data; all-zero is valid.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
        for ((m, v), c) in msgs.iter_mut().zip(iovs.iter_mut()).zip(ctl.iter_mut()) {
            m.msg_hdr.msg_iov = v as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = c.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = CMSG_SPACE;
        }
        // SAFETY: each message describes one host buffer of `batch` and one control buffer
        // of `ctl`, both alive and exclusively borrowed for the call.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        batch.count = 0;
        if r < 0 {
            let e = io::Error::last_os_error();
            return if is_would_block(&e) { Ok(0) } else { Err(e) };
        }
        let got = r as usize;
        for (i, m) in msgs.iter().enumerate().take(got) {
            let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            batch.lens[i] = if truncated { 0 } else { m.msg_len as usize };
            batch.tags[i] = tag_from_cmsg(&m.msg_hdr);
        }
        batch.count = got;
        Ok(got)
    }
}

/// Reads the VLAN tag the kernel moved out of the frame from a PACKET_AUXDATA message.
fn tag_from_cmsg(hdr: &libc::msghdr) -> Option<VlanTag> {
    // SAFETY: `hdr` is a msghdr the kernel just filled; CMSG_FIRSTHDR/NXTHDR stay within
    // `msg_controllen` of the control buffer it points at.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a complete cmsghdr inside the buffer.
        let cm = unsafe { &*c };
        if cm.cmsg_level == libc::SOL_PACKET && cm.cmsg_type == libc::PACKET_AUXDATA {
            // SAFETY: the kernel writes a whole tpacket_auxdata after a PACKET_AUXDATA header;
            // read_unaligned because control data has only cmsg alignment.
            let aux: libc::tpacket_auxdata =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
                return None;
            }
            // Kernels before 4.0 report no TPID: they only took C-tags off.
            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                aux.tp_vlan_tpid
            } else {
                ETH_P_8021Q
            };
            return Some(VlanTag {
                tpid,
                vid: aux.tp_vlan_tci & 0x0fff,
            });
        }
        // SAFETY: as above, NXTHDR returns null past the end.
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
    None
}

vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, b'T' as u32, 208, libc::c_uint);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);

/// A TAP device with IFF_VNET_HDR; frames are read one by one and written with `writev`.
pub struct Tap {
    name: String,
    file: File,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct ifreq` holding a hardware address (SIOCGIFHWADDR / SIOCSIFHWADDR).
#[repr(C)]
struct IfReqHwAddr {
    name: [u8; libc::IFNAMSIZ],
    family: libc::sa_family_t,
    data: [u8; 14],
    _pad: [u8; 8],
}

impl Tap {
    /// Opens (creating if needed) TAP device `name` and brings it up.
    pub fn open(name: &str) -> Result<Tap, UplinkError> {
        Tap::open_with_mac(name, None)
    }

    /// Like [`Tap::open`], first giving the host's end of the TAP the address `mac` if set.
    pub fn open_with_mac(name: &str, mac: Option<MacAddr>) -> Result<Tap, UplinkError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(setup_err(name, "open /dev/net/tun"))?;
        let mut req = IfReq {
            name: ifreq_name(name),
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        let fd = file.as_raw_fd();
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` has its size and layout.
        cvt(unsafe { libc::ioctl(fd, TUNSETIFF(), &mut req) })
            .map_err(setup_err(name, "TUNSETIFF"))?;
        let hdr = HDR_LEN_LEGACY as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        cvt(unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ(), &hdr) })
            .map_err(setup_err(name, "TUNSETVNETHDRSZ"))?;
        let offloads = libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_USO4
            | libc::TUN_F_USO6;
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD(), offloads as libc::c_ulong) } < 0 {
            // Kernels without USO: keep the TCP offloads.
            let tcp_only =
                libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
            // SAFETY: as above.
            cvt(unsafe { libc::ioctl(fd, TUNSETOFFLOAD(), tcp_only as libc::c_ulong) })
                .map_err(setup_err(name, "TUNSETOFFLOAD"))?;
        }
        let tap = Tap {
            name: name.into(),
            file,
        };
        if let Some(mac) = mac {
            tap.set_mac(mac)
                .map_err(setup_err(name, "set the MAC address"))?;
        }
        tap.set_up()
            .map_err(setup_err(name, "bring the interface up"))?;
        Ok(tap)
    }

    /// The MAC address of the host's end of the TAP.
    pub fn mac(&self) -> io::Result<MacAddr> {
        let s = ioctl_socket()?;
        let mut req = self.hwaddr_req();
        // SAFETY: SIOCGIFHWADDR fills the sockaddr of an ifreq-sized buffer; `req` is one.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
        MacAddr::from_slice(&req.data).ok_or_else(|| io::Error::other("short hardware address"))
    }

    fn set_mac(&self, mac: MacAddr) -> io::Result<()> {
        let s = ioctl_socket()?;
        let mut req = self.hwaddr_req();
        req.family = libc::ARPHRD_ETHER;
        req.data[..6].copy_from_slice(&mac.0);
        // SAFETY: SIOCSIFHWADDR reads the sockaddr of an ifreq-sized buffer; `req` is one.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFHWADDR, &req) })?;
        Ok(())
    }

    fn hwaddr_req(&self) -> IfReqHwAddr {
        IfReqHwAddr {
            name: ifreq_name(&self.name),
            family: 0,
            data: [0; 14],
            _pad: [0; 8],
        }
    }

    fn set_up(&self) -> io::Result<()> {
        let s = ioctl_socket()?;
        let mut req = IfReq {
            name: ifreq_name(&self.name),
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: SIOCGIFFLAGS fills `flags` of an ifreq-sized buffer.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads an ifreq-sized buffer.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
        Ok(())
    }
}

impl Uplink for Tap {
    fn describe(&self) -> String {
        format!("tap:{}", self.name)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&self, batch: &mut TxBatch) {
        let iovs = batch.frame_iovecs();
        batch.outcomes.clear();
        for v in &iovs {
            // SAFETY: the iovecs cover host header bytes in `batch` and guest memory the
            // caller keeps mapped for this call; the kernel only reads them.
            let r =
                unsafe { libc::writev(self.file.as_raw_fd(), v.as_ptr(), v.len() as libc::c_int) };
            let outcome = if r >= 0 {
                SendOutcome::Sent
            } else if is_would_block(&io::Error::last_os_error()) {
                SendOutcome::Busy
            } else {
                SendOutcome::Refused
            };
            batch.outcomes.push(outcome);
        }
    }

    fn recv(&self, batch: &mut RxBatch) -> io::Result<usize> {
        batch.count = 0;
        for i in 0..batch.bufs.len() {
            let buf = &mut batch.bufs[i];
            // SAFETY: reads at most `buf.len()` bytes into the exclusively borrowed buffer.
            let r =
                unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if is_would_block(&e) {
                    break;
                }
                if batch.count == 0 {
                    return Err(e);
                }
                break;
            }
            batch.lens[i] = r as usize;
            batch.tags[i] = None;
            batch.count += 1;
        }
        Ok(batch.count)
    }
}
