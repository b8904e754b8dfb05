//! The front-end message relay (`devshare_common::relay`), fed random vhost-user message
//! streams carrying real file descriptors over real sockets.
//!
//! Each input is a sequence of messages: a request (the memory-table ones laid out as the
//! vhost-user spec says, with region sizes and offsets around the size of the file sent with
//! them), a body whose header may lie about its size, and descriptors of every kind a
//! front-end could send (memfds, sealed or not, temporary files, /dev/null, pipes, sockets,
//! eventfds, a directory). A writer thread sends them, possibly split in two `sendmsg` calls,
//! the relay runs on its own, and a reader thread receives what it forwards the way the
//! library does (header with descriptors, then body).
//!
//! A model written from the spec, not from the relay, parses the same byte stream and says
//! which messages must come out and how the relay must end. Checked:
//! - no panic, and no descriptor left open (`/proc/self/fd` counted before and after);
//! - bad messages (oversized bodies, malformed or oversized memory tables, descriptors lost
//!   on the way) end the connection with `Refused`, a stream cut short with an I/O error;
//! - every message before that point comes out unchanged, with the same files attached (by
//!   device and inode), plus one `SET_FEATURES` before an early `SET_VRING_ENABLE`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::fds::{fd_count, file_id, recv_with_fds, send_with_fds, FileId};
use crate::{seed_enum, seed_struct};
use devshare_common::relay::{relay_frontend_messages, RelayError};

const HDR: usize = 12;
const MAX_BODY: usize = 4096;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;
/// Descriptors one message may carry (the library's limit): a message with more is refused.
const RELAY_MAX_FDS: usize = 32;

seed_enum! {
    /// A vhost-user request code.
    pub enum Request {
        SetFeatures,
        SetVringEnable,
        SetMemTable,
        AddMemReg,
        SetLogBase,
        SetInflightFd,
        GetQueueNum,
        Other { code: u32 },
    }
}

impl Request {
    fn code(&self) -> u32 {
        match self {
            Request::SetFeatures => SET_FEATURES,
            Request::SetVringEnable => SET_VRING_ENABLE,
            Request::SetMemTable => SET_MEM_TABLE,
            Request::AddMemReg => ADD_MEM_REG,
            Request::SetLogBase => SET_LOG_BASE,
            Request::SetInflightFd => SET_INFLIGHT_FD,
            Request::GetQueueNum => GET_QUEUE_NUM,
            Request::Other { code } => *code,
        }
    }
}

seed_enum! {
    /// A file size: small and page-sized most of the time, anything sometimes.
    pub enum FileSize {
        Pages { pages: u8 },
        Bytes { bytes: u16 },
        Raw { bytes: u32 },
    }
}

impl FileSize {
    fn bytes(&self) -> u64 {
        match *self {
            FileSize::Pages { pages } => u64::from(pages) * 4096,
            FileSize::Bytes { bytes } => u64::from(bytes),
            FileSize::Raw { bytes } => u64::from(bytes),
        }
    }
}

seed_enum! {
    /// A descriptor sent with a message.
    pub enum FdKind {
        Memfd { size: FileSize, seal_shrink: bool },
        TmpFile { size: FileSize },
        DevNull,
        PipeRead,
        PipeWrite,
        Socket,
        EventFd,
        Directory,
    }
}

seed_enum! {
    /// A region size or offset, relative to the size of the file sent with the region so that
    /// the boundary is reached often.
    pub enum Extent {
        FileSize,
        FileMinus { by: u16 },
        FilePlus { by: u16 },
        Zero,
        Pages { pages: u8 },
        Raw { value: u64 },
    }
}

impl Extent {
    fn value(&self, file: u64) -> u64 {
        match *self {
            Extent::FileSize => file,
            Extent::FileMinus { by } => file.wrapping_sub(u64::from(by)),
            Extent::FilePlus { by } => file.wrapping_add(u64::from(by)),
            Extent::Zero => 0,
            Extent::Pages { pages } => u64::from(pages) * 4096,
            Extent::Raw { value } => value,
        }
    }
}

seed_struct! {
    /// One memory region description.
    pub struct RegionSpec {
        guest_phys_addr: u64,
        size: Extent,
        userspace_addr: u64,
        offset: Extent,
    }
}

seed_enum! {
    /// A message body.
    pub enum Body {
        /// A memory table: the regions (one per descriptor), and a count that may lie.
        MemTable { regions: Vec<RegionSpec>, count: Option<u32> },
        /// ADD_MEM_REG's layout: padding, then one region.
        OneRegion { region: RegionSpec },
        /// SET_LOG_BASE's and SET_INFLIGHT_FD's layout: size, offset, then whatever follows.
        Area { size: Extent, offset: Extent, tail: Vec<u8> },
        U64 { value: u64 },
        Raw { bytes: Vec<u8> },
    }
}

seed_struct! {
    /// One message as the front-end sends it.
    pub struct Message {
        request: Request,
        flags: u32,
        body: Body,
        fds: Vec<FdKind>,
        /// Cut or pad the body to this length.
        resize: Option<u16>,
        /// The header's size field, when it lies about the body.
        size_field: Option<u32>,
        /// Send the bytes in two `sendmsg` calls, split here (descriptors with the first).
        split: Option<u16>,
    }
}

seed_struct! {
    /// A whole input: the messages, then whatever bytes follow them.
    pub struct Input {
        messages: Vec<Message>,
        /// Bytes after the last message (a cut-off header or body).
        trailing: Vec<u8>,
    }
}

/// One descriptor made for a message, with what the model needs to know of it.
struct MadeFd {
    fd: OwnedFd,
    id: FileId,
    /// The file size when it is a regular file (the only kind whose regions are judged).
    regular_size: Option<u64>,
}

fn make_fd(kind: &FdKind) -> Option<MadeFd> {
    let (fd, regular_size): (OwnedFd, Option<u64>) = match *kind {
        FdKind::Memfd {
            ref size,
            seal_shrink,
        } => {
            let flags = libc::MFD_CLOEXEC
                | if seal_shrink {
                    libc::MFD_ALLOW_SEALING
                } else {
                    0
                };
            // SAFETY: a valid NUL-terminated name and flags.
            let raw = unsafe { libc::memfd_create(c"fuzz".as_ptr(), flags) };
            let fd = owned(raw)?;
            let f = std::fs::File::from(fd);
            f.set_len(size.bytes()).ok()?;
            if seal_shrink {
                // SAFETY: F_ADD_SEALS takes an int; the memfd is open.
                unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            }
            (f.into(), Some(size.bytes()))
        }
        FdKind::TmpFile { ref size } => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_tmpfile()
                .open(std::env::temp_dir())
                .ok()?;
            f.set_len(size.bytes()).ok()?;
            (f.into(), Some(size.bytes()))
        }
        FdKind::DevNull => (std::fs::File::open("/dev/null").ok()?.into(), None),
        FdKind::PipeRead | FdKind::PipeWrite => {
            let mut p = [0 as RawFd; 2];
            // SAFETY: `p` has room for the two descriptors.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
                return None;
            }
            let (r, w) = (owned(p[0])?, owned(p[1])?);
            (
                if matches!(kind, FdKind::PipeRead) {
                    r
                } else {
                    w
                },
                None,
            )
        }
        FdKind::Socket => {
            let (a, _b) = UnixStream::pair().ok()?;
            (a.into(), None)
        }
        FdKind::EventFd => {
            // SAFETY: plain flags.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            (owned(raw)?, None)
        }
        FdKind::Directory => (std::fs::File::open(std::env::temp_dir()).ok()?.into(), None),
    };
    let id = file_id(&fd)?;
    Some(MadeFd {
        fd,
        id,
        regular_size,
    })
}

fn owned(raw: RawFd) -> Option<OwnedFd> {
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

trait TmpFile {
    fn custom_flags_tmpfile(&mut self) -> &mut Self;
}

impl TmpFile for std::fs::OpenOptions {
    fn custom_flags_tmpfile(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
    }
}

fn put_region(b: &mut Vec<u8>, r: &RegionSpec, file: u64) {
    for v in [
        r.guest_phys_addr,
        r.size.value(file),
        r.userspace_addr,
        r.offset.value(file),
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn body_bytes(m: &Message, files: &[u64]) -> Vec<u8> {
    let file = |i: usize| files.get(i).copied().unwrap_or(0);
    let mut b = Vec::new();
    match &m.body {
        Body::MemTable { regions, count } => {
            let n = count.unwrap_or(regions.len() as u32);
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            for (i, r) in regions.iter().take(12).enumerate() {
                put_region(&mut b, r, file(i));
            }
        }
        Body::OneRegion { region: r } => {
            b.extend_from_slice(&0u64.to_le_bytes());
            put_region(&mut b, r, file(0));
        }
        Body::Area { size, offset, tail } => {
            b.extend_from_slice(&size.value(file(0)).to_le_bytes());
            b.extend_from_slice(&offset.value(file(0)).to_le_bytes());
            b.extend_from_slice(&tail[..tail.len().min(64)]);
        }
        Body::U64 { value: v } => b.extend_from_slice(&v.to_le_bytes()),
        Body::Raw { bytes: r } => b.extend_from_slice(&r[..r.len().min(MAX_BODY + 64)]),
    }
    if let Some(n) = m.resize {
        b.resize(usize::from(n) % (MAX_BODY + 64), 0);
    }
    b
}

/// A stretch of the stream sent with one `sendmsg`, descriptors attached to its first byte.
struct Chunk {
    bytes: Vec<u8>,
    fds: Vec<MadeFd>,
}

/// A descriptor as the model sees it: the file, and its size if it is a regular file.
type SentFd = (FileId, Option<u64>);

/// How the relay must end.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum End {
    /// The front-end hung up between messages.
    HungUp,
    /// The relay refused a message.
    Refused,
    /// The stream ended inside a message.
    CutShort,
}

/// One message as the library must receive it.
#[derive(Debug, PartialEq, Eq)]
struct Forwarded {
    bytes: Vec<u8>,
    fds: Vec<FileId>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether a memory-table message is acceptable, from the vhost-user spec's layouts: every
/// region it announces is present, there is one descriptor per region, and each region lies
/// inside its file where the descriptor is a regular file. `None` for other requests.
fn mem_table_ok(request: u32, body: &[u8], fds: &[SentFd]) -> Option<bool> {
    // (size, offset) of each area the message asks to map.
    let areas: Option<Vec<(u64, u64)>> = match request {
        SET_MEM_TABLE => u32_at(body, 0).and_then(|n| {
            (0..n as usize)
                .map(|i| {
                    let at = 8usize.checked_add(i.checked_mul(32)?)?;
                    Some((u64_at(body, at + 8)?, u64_at(body, at + 24)?))
                })
                .collect()
        }),
        ADD_MEM_REG => (|| Some(vec![(u64_at(body, 16)?, u64_at(body, 32)?)]))(),
        SET_LOG_BASE | SET_INFLIGHT_FD => (|| Some(vec![(u64_at(body, 0)?, u64_at(body, 8)?)]))(),
        _ => return None,
    };
    let Some(areas) = areas else {
        return Some(false);
    };
    if areas.len() != fds.len() {
        return Some(false);
    }
    Some(
        areas
            .iter()
            .zip(fds)
            .all(|(&(size, offset), (_, file))| match file {
                Some(len) => offset.checked_add(size).is_some_and(|end| end <= *len),
                None => true,
            }),
    )
}

/// Reads the stream as the relay must: what comes out, and how it ends.
fn model(chunks: &[Chunk]) -> (Vec<Forwarded>, End) {
    let mut stream = Vec::new();
    // (offset of the chunk's first byte, its descriptors)
    let mut attached: Vec<(usize, Vec<SentFd>)> = Vec::new();
    for c in chunks {
        if !c.fds.is_empty() {
            let fds = c.fds.iter().map(|f| (f.id, f.regular_size)).collect();
            attached.push((stream.len(), fds));
        }
        stream.extend_from_slice(&c.bytes);
    }
    let mut out = Vec::new();
    let mut features_seen = false;
    let mut at = 0;
    loop {
        if at == stream.len() {
            return (out, End::HungUp);
        }
        if stream.len() - at < HDR {
            return (out, End::CutShort);
        }
        // Descriptors arrive with the header bytes they were sent with; one message carries
        // at most RELAY_MAX_FDS of them, or some are lost and the message is refused.
        let mut fds = Vec::new();
        for (off, f) in &attached {
            if (at..at + HDR).contains(off) {
                if f.len() > RELAY_MAX_FDS {
                    return (out, End::Refused);
                }
                fds.extend_from_slice(f);
            }
        }
        let hdr = &stream[at..at + HDR];
        let request = u32_at(hdr, 0).unwrap_or(0);
        let size = u32_at(hdr, 8).unwrap_or(0) as usize;
        if size > MAX_BODY {
            return (out, End::Refused);
        }
        if stream.len() - at - HDR < size {
            return (out, End::CutShort);
        }
        let body = &stream[at + HDR..at + HDR + size];
        if mem_table_ok(request, body, &fds) == Some(false) {
            return (out, End::Refused);
        }
        if request == SET_FEATURES {
            features_seen = true;
        } else if request == SET_VRING_ENABLE && !features_seen {
            let mut fix = Vec::new();
            for v in [SET_FEATURES, 1, 8] {
                fix.extend_from_slice(&v.to_le_bytes());
            }
            fix.extend_from_slice(&(1u64 << 30).to_le_bytes());
            out.push(Forwarded {
                bytes: fix,
                fds: Vec::new(),
            });
            features_seen = true;
        }
        out.push(Forwarded {
            bytes: stream[at..at + HDR + size].to_vec(),
            fds: fds.iter().map(|(id, _)| *id).collect(),
        });
        at += HDR + size;
    }
}

fn build(input: &Input) -> Option<Vec<Chunk>> {
    let mut chunks = Vec::new();
    let mut total_fds = 0;
    for m in input.messages.iter().take(24) {
        let mut fds = Vec::new();
        for k in m.fds.iter().take(40) {
            if total_fds >= 96 {
                break;
            }
            fds.push(make_fd(k)?);
            total_fds += 1;
        }
        let files: Vec<u64> = fds.iter().map(|f| f.regular_size.unwrap_or(0)).collect();
        let body = body_bytes(m, &files);
        let mut bytes = Vec::with_capacity(HDR + body.len());
        bytes.extend_from_slice(&m.request.code().to_le_bytes());
        bytes.extend_from_slice(&m.flags.to_le_bytes());
        let size = m.size_field.unwrap_or(body.len() as u32);
        bytes.extend_from_slice(&size.to_le_bytes());
        bytes.extend_from_slice(&body);
        match m.split.map(usize::from) {
            Some(at) if at > 0 && at < bytes.len() => {
                let rest = bytes.split_off(at);
                chunks.push(Chunk { bytes, fds });
                chunks.push(Chunk {
                    bytes: rest,
                    fds: Vec::new(),
                });
            }
            _ => chunks.push(Chunk { bytes, fds }),
        }
    }
    if !input.trailing.is_empty() {
        chunks.push(Chunk {
            bytes: input.trailing[..input.trailing.len().min(64)].to_vec(),
            fds: Vec::new(),
        });
    }
    Some(chunks)
}

/// Runs one input through the relay and checks it against the model.
pub fn run(input: &Input) {
    let before = fd_count();
    {
        // Descriptors that cannot be made (a full /tmp, say) are not the relay's problem.
        let Some(chunks) = build(input) else {
            return;
        };
        let (expected, end) = model(&chunks);
        let (frontend, relay_in) = UnixStream::pair().expect("socketpair");
        let (relay_out, library) = UnixStream::pair().expect("socketpair");
        let (result, received) = std::thread::scope(|s| {
            let writer = s.spawn(move || {
                let frontend = frontend;
                for c in &chunks {
                    let raw: Vec<RawFd> = c.fds.iter().map(|f| f.fd.as_raw_fd()).collect();
                    if send_with_fds(&frontend, &c.bytes, &raw).is_err() {
                        break;
                    }
                }
                // Hang up: the relay sees the end of the stream.
            });
            let reader = s.spawn(move || read_forwarded(&library));
            // Allow: the oracle judges sizes only; the seal check has its unit tests.
            let result = relay_frontend_messages(
                "fuzz",
                &relay_in,
                &relay_out,
                devshare_common::mem_table::UnsealedMemory::Allow,
            );
            // What the daemon does when the relay returns: both sockets go.
            drop(relay_in);
            drop(relay_out);
            let _ = writer.join();
            (result, reader.join().expect("reader thread"))
        });
        let got_end = match &result {
            Ok(()) => End::HungUp,
            Err(RelayError::Refused { .. }) => End::Refused,
            Err(RelayError::Io(_)) => End::CutShort,
        };
        assert_eq!(got_end, end, "the relay ended with {result:?}");
        assert_eq!(received.len(), expected.len(), "forwarded message count");
        for (i, (g, e)) in received.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "forwarded message {i} differs");
        }
    }
    assert_eq!(fd_count(), before, "descriptors leaked");
}

/// Receives what the relay forwards, as the library does: a header with its descriptors,
/// then the body (which must carry none).
fn read_forwarded(s: &UnixStream) -> Vec<Forwarded> {
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; HDR];
        let Ok(Some(fds)) = recv_with_fds(s, &mut hdr) else {
            return out;
        };
        let size = u32_at(&hdr, 8).unwrap_or(0) as usize;
        let mut body = vec![0u8; size.min(MAX_BODY)];
        let body_fds = match recv_with_fds(s, &mut body) {
            Ok(Some(f)) => f,
            _ if body.is_empty() => Vec::new(),
            _ => return out,
        };
        assert!(body_fds.is_empty(), "descriptors arrived with a body");
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(&body);
        out.push(Forwarded {
            bytes,
            fds: fds.iter().filter_map(file_id).collect(),
        });
    }
}

fn msg(request: Request, body: Body, fds: Vec<FdKind>) -> Message {
    Message {
        request,
        flags: 1,
        body,
        fds,
        resize: None,
        size_field: None,
        split: None,
    }
}

fn u64_body(value: u64) -> Body {
    Body::U64 { value }
}

fn raw(bytes: &[u8]) -> Body {
    Body::Raw {
        bytes: bytes.to_vec(),
    }
}

fn memfd(pages: u8) -> FdKind {
    FdKind::Memfd {
        size: FileSize::Pages { pages },
        seal_shrink: true,
    }
}

fn region(gpa: u64, size: Extent) -> RegionSpec {
    RegionSpec {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0x7f00_0000_0000 + gpa,
        offset: Extent::Zero,
    }
}

/// SET_VRING_ADDR's body: index, flags, then the descriptor, used, avail and log addresses.
fn vring_addr(index: u32) -> Body {
    let mut b = Vec::new();
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for a in [0x1000u64, 0x3000, 0x2000, 0] {
        b.extend_from_slice(&(0x7f00_0000_0000 + a).to_le_bytes());
    }
    Body::Raw { bytes: b }
}

/// What QEMU sends a vhost-user-net backend while a guest starts: features, an early
/// SET_VRING_ENABLE, the memory table (a sealed memfd) and two queues set up.
fn qemu_net_start() -> Vec<Message> {
    let other = |code: u32| Request::Other { code };
    let mut v = vec![
        msg(other(1), raw(&[]), vec![]),          // GET_FEATURES
        msg(other(15), raw(&[]), vec![]),         // GET_PROTOCOL_FEATURES
        msg(other(16), u64_body(0x8003), vec![]), // SET_PROTOCOL_FEATURES
        msg(Request::GetQueueNum, raw(&[]), vec![]),
        msg(other(3), raw(&[]), vec![]), // SET_OWNER
        msg(
            Request::SetVringEnable,
            raw(&[0, 0, 0, 0, 1, 0, 0, 0]),
            vec![],
        ),
        msg(Request::SetFeatures, u64_body(0x1_3000_8000), vec![]),
        msg(
            Request::SetMemTable,
            Body::MemTable {
                regions: vec![region(0, Extent::FileSize)],
                count: None,
            },
            vec![memfd(64)],
        ),
    ];
    for q in 0..2u32 {
        let idx = q.to_le_bytes();
        let num = [idx[0], idx[1], idx[2], idx[3], 0, 1, 0, 0];
        v.push(msg(other(8), raw(&num), vec![])); // SET_VRING_NUM 256
        v.push(msg(other(10), raw(&[idx[0], 0, 0, 0, 0, 0, 0, 0]), vec![])); // SET_VRING_BASE
        v.push(msg(other(9), vring_addr(q), vec![])); // SET_VRING_ADDR
        v.push(msg(
            other(12),
            u64_body(u64::from(q)),
            vec![FdKind::EventFd],
        )); // KICK
        v.push(msg(
            other(13),
            u64_body(u64::from(q)),
            vec![FdKind::EventFd],
        )); // CALL
        v.push(msg(
            other(14),
            u64_body(u64::from(q)),
            vec![FdKind::EventFd],
        )); // ERR
    }
    v.push(msg(other(21), raw(&[]), vec![FdKind::Socket])); // SET_BACKEND_REQ_FD
    v
}

/// Realistic inputs to start the corpus from.
pub fn seeds() -> Vec<(&'static str, Input)> {
    let input = |messages: Vec<Message>| Input {
        messages,
        trailing: Vec::new(),
    };
    let mut two_regions = qemu_net_start();
    two_regions[7] = msg(
        Request::SetMemTable,
        Body::MemTable {
            regions: vec![
                region(0, Extent::FileSize),
                region(0x1_0000_0000, Extent::FileMinus { by: 4096 }),
            ],
            count: None,
        },
        vec![
            memfd(48),
            FdKind::TmpFile {
                size: FileSize::Pages { pages: 32 },
            },
        ],
    );
    let mut oversized = qemu_net_start();
    oversized[7] = msg(
        Request::SetMemTable,
        Body::MemTable {
            regions: vec![region(0, Extent::FilePlus { by: 4096 })],
            count: None,
        },
        vec![FdKind::Memfd {
            size: FileSize::Pages { pages: 16 },
            seal_shrink: false,
        }],
    );
    let hotplug = vec![
        msg(Request::SetFeatures, u64_body(0x1_4000_0000), vec![]),
        msg(
            Request::AddMemReg,
            Body::OneRegion {
                region: region(0x4000_0000, Extent::FileSize),
            },
            vec![memfd(8)],
        ),
        msg(
            Request::Other { code: 38 }, // REM_MEM_REG: a region, no descriptor needed
            Body::OneRegion {
                region: region(0x4000_0000, Extent::Pages { pages: 8 }),
            },
            vec![],
        ),
        msg(
            Request::SetLogBase,
            Body::Area {
                size: Extent::FileSize,
                offset: Extent::Zero,
                tail: vec![],
            },
            vec![FdKind::TmpFile {
                size: FileSize::Bytes { bytes: 4096 },
            }],
        ),
        msg(
            Request::SetInflightFd,
            Body::Area {
                size: Extent::FileSize,
                offset: Extent::Zero,
                tail: vec![2, 0, 0, 1],
            },
            vec![memfd(1)],
        ),
    ];
    let mut split = qemu_net_start();
    split[7].split = Some(5);
    split[8].split = Some(14);
    let mut too_many_fds = qemu_net_start();
    too_many_fds[0].fds = vec![FdKind::DevNull; 33];
    let mut lying = qemu_net_start();
    lying[3].size_field = Some(5000);
    let mut cut = input(qemu_net_start());
    cut.trailing = vec![5, 0, 0, 0, 1, 0, 0];
    vec![
        ("qemu-net-start", input(qemu_net_start())),
        ("two-regions", input(two_regions)),
        ("oversized-region", input(oversized)),
        ("memory-hotplug-log-inflight", input(hotplug)),
        ("split-messages", input(split)),
        ("too-many-fds", input(too_many_fds)),
        ("oversized-body", input(lying)),
        ("cut-short", cut),
        (
            "odd-fds",
            input(vec![msg(
                Request::Other { code: 12 },
                u64_body(0),
                vec![
                    FdKind::PipeRead,
                    FdKind::PipeWrite,
                    FdKind::Directory,
                    FdKind::Socket,
                ],
            )]),
        ),
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
