//! The console's control-queue conversation (virtio 1.2, 5.3.6.2) through the path a
//! vhost-user worker takes: a VM of the real console (`group::build` from a configuration, log
//! file endpoints in a scratch directory) whose driver side is played here, writing control
//! messages into the control transmitq, posting control receive buffers and kicking queues
//! (`Vms::on_queue_event`), in any order and with any values: DEVICE_READY, PORT_READY and
//! PORT_OPEN with random ids, values and payloads, truncated or malformed chains, receive
//! buffers of any size or none at all.
//!
//! Checked after every step:
//! - the device's queue of replies stays bounded (one message per port and event at most),
//!   whatever the driver sends and whether or not it ever posts receive buffers;
//! - every control chain the driver made available comes back used; every reply written fits
//!   its buffer and is a well-formed message about a port that exists, a PORT_NAME carrying
//!   that port's name;
//! - no panic, and no descriptor left open once the VM is gone.

use std::path::PathBuf;
use std::sync::OnceLock;

use devshare_common::chain::Memory;
use devshare_common::listen::SocketOptions;
use vhost_user_backend::VringT;
use vhost_user_console::config::{Config, DeviceKind, PortConfig, SocketMode, Target, VmConfig};
use vhost_user_console::endpoint::EndpointSpec;
use vhost_user_console::group;
use vhost_user_console::queue::Vring;
use vhost_user_console::virtio_console as vc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use crate::fds::fd_count;
use crate::{seed_enum, seed_struct};

/// Entries per queue.
const QSIZE: u16 = 16;
/// Guest memory: the queues, one 4 KiB page each, then the buffers.
const MEM_SIZE: u64 = 0x8_0000;
const BUFFERS: u64 = 0x4_0000;
/// Bytes of the buffer area that belong to one descriptor slot of one queue: a buffer the
/// driver posts starts there (its length may claim more), so what the device writes into one
/// (replies are far shorter) never lands in another.
const SLOT_SPACE: u64 = 256;
const WRITE: u16 = 2;
/// Most ports a fuzzed VM has.
const MAX_PORTS: u8 = 6;
/// Events the device sends per port: DEVICE_ADD, CONSOLE_PORT, RESIZE, PORT_NAME, PORT_OPEN.
const EVENTS_PER_PORT: usize = 5;

seed_struct! {
    /// One descriptor of a hand-made chain: `offset` into the buffer area (or, past it,
    /// anywhere), length, flags, and the next index relative to the chain's first descriptor.
    pub struct RawDesc {
        pub offset: u32,
        pub len: u16,
        pub flags: u16,
        pub next: u8,
    }
}

seed_enum! {
    /// One thing the driver does.
    pub enum Step {
        /// A control message on the control transmitq (cut to `cut` bytes if given), then a
        /// kick of that queue.
        Control { id: u32, event: u16, value: u16, payload: Vec<u8>, cut: Option<u8> },
        /// Several messages in one kick.
        Batch { messages: Vec<(u32, u16)>, value: u16 },
        /// A hand-made chain on the control transmitq, then a kick.
        RawControl { descs: Vec<RawDesc> },
        /// Control receive buffers, then a kick of the control receiveq.
        PostReceive { size: u16, count: u8 },
        /// A hand-made chain on the control receiveq, then a kick.
        RawReceive { descs: Vec<RawDesc> },
        /// A kick on any queue, used or not.
        Kick { queue: u8 },
        /// Guest output on a port's transmitq, then a kick.
        Output { port: u8, bytes: Vec<u8> },
        /// A receive buffer on a port's receiveq, then a kick.
        PostPortReceive { port: u8, size: u16 },
    }
}

seed_struct! {
    /// A VM of `ports` ports whose driver negotiated `features`, then the driver's steps.
    pub struct Input {
        pub ports: u8,
        pub features: u64,
        pub steps: Vec<Step>,
    }
}

/// A chain the driver made available.
#[derive(Clone)]
struct Chain {
    /// `(addr, len, flags)` of its descriptors, in table order.
    descs: Vec<(u64, u32, u16)>,
    /// Made by [`DriverQueue::add_buffer`]: one buffer, so what the device wrote is checked.
    simple: bool,
}

/// The driver's side of one split queue: where its rings are, which descriptors are in use,
/// what it has made available and what it has seen used.
struct DriverQueue {
    /// Queue index.
    q: usize,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
    /// The chain whose head each descriptor slot is part of, while the device has it.
    owner: Vec<Option<u16>>,
    /// Chains the device has, by head.
    chains: Vec<Option<Chain>>,
}

impl DriverQueue {
    fn new(q: usize) -> DriverQueue {
        let base = 0x1000 * q as u64;
        DriverQueue {
            q,
            desc: base,
            avail: base + 0x400,
            used: base + 0x800,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
            owner: vec![None; usize::from(QSIZE)],
            chains: vec![None; usize::from(QSIZE)],
        }
    }

    /// Where the buffer of descriptor slot `slot` starts.
    fn buffer_at(&self, slot: u16) -> u64 {
        BUFFERS + (self.q as u64 * u64::from(QSIZE) + u64::from(slot)) * SLOT_SPACE
    }

    /// Makes one buffer available: `bytes` (at most [`SLOT_SPACE`]) to read, or with `write`
    /// `len` bytes of room.
    fn add_buffer(&mut self, mem: &Memory, bytes: &[u8], len: u32, writable: bool) -> Option<u16> {
        let flags = if writable { WRITE } else { 0 };
        let addr = self.buffer_at(self.next_desc);
        if self.owner[usize::from(self.next_desc)].is_some() {
            return None;
        }
        let bytes = &bytes[..bytes.len().min(SLOT_SPACE as usize)];
        write(mem, addr, bytes);
        let len = if writable { len } else { bytes.len() as u32 };
        let head = self.add(mem, &[(addr, len, flags, None)])?;
        if let Some(c) = self.chains[usize::from(head)].as_mut() {
            c.simple = true;
        }
        Some(head)
    }

    /// Makes a chain of `(addr, len, flags, next)` available, `next` relative to the chain's
    /// first descriptor (or the following one when None), in descriptor slots the device does
    /// not have. Returns the head, or None when the ring has no room.
    fn add(&mut self, mem: &Memory, descs: &[(u64, u32, u16, Option<u8>)]) -> Option<u16> {
        let head = self.next_desc;
        let n = descs.len().clamp(1, usize::from(QSIZE)) as u16;
        let slot = |i: u16| usize::from((head + i) % QSIZE);
        if descs.is_empty() || (0..n).any(|i| self.owner[slot(i)].is_some()) {
            return None;
        }
        for (i, &(addr, len, flags, next)) in descs.iter().take(usize::from(n)).enumerate() {
            let i = i as u16;
            let next = match next {
                Some(rel) => (head + u16::from(rel)) % QSIZE,
                None => (head + i + 1) % QSIZE,
            };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            write(mem, self.desc + 16 * slot(i) as u64, &raw);
            self.owner[slot(i)] = Some(head);
        }
        self.next_desc = (head + n) % QSIZE;
        let at = u64::from(self.avail_idx % QSIZE);
        write(mem, self.avail + 4 + 2 * at, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The index after the entry (the device reads it with acquire semantics).
        write(mem, self.avail + 2, &self.avail_idx.to_le_bytes());
        self.chains[usize::from(head)] = Some(Chain {
            descs: descs
                .iter()
                .take(usize::from(n))
                .map(|&(a, l, f, _)| (a, l, f))
                .collect(),
            simple: false,
        });
        Some(head)
    }

    /// Chains made available and not yet used.
    fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.seen_used)
    }

    /// Used entries `(head, len, chain)` since the last call; their descriptors are free again.
    fn used(&mut self, mem: &Memory) -> Vec<(u16, u32, Chain)> {
        let idx = u16::from_le_bytes(read::<2>(mem, self.used + 2));
        let mut out = Vec::new();
        let mut guard = 0;
        while self.seen_used != idx && guard <= QSIZE {
            let at = self.used + 4 + 8 * u64::from(self.seen_used % QSIZE);
            let id = u32::from_le_bytes(read::<4>(mem, at));
            let len = u32::from_le_bytes(read::<4>(mem, at + 4));
            let chain = usize::try_from(id)
                .ok()
                .and_then(|h| self.chains.get_mut(h))
                .and_then(Option::take);
            let Some(chain) = chain else {
                panic!("the device used chain {id}, which it did not have");
            };
            for o in self.owner.iter_mut() {
                if *o == Some(id as u16) {
                    *o = None;
                }
            }
            out.push((id as u16, len, chain));
            self.seen_used = self.seen_used.wrapping_add(1);
            guard += 1;
        }
        assert!(
            guard <= QSIZE,
            "the device published more used entries than the ring holds"
        );
        out
    }
}

fn write(mem: &Memory, at: u64, bytes: &[u8]) {
    if let Err(e) = mem.write_slice(bytes, GuestAddress(at)) {
        panic!("driver write at {at:#x} failed: {e}");
    }
}

fn read<const N: usize>(mem: &Memory, at: u64) -> [u8; N] {
    let mut b = [0u8; N];
    if let Err(e) = mem.read_slice(&mut b, GuestAddress(at)) {
        panic!("driver read at {at:#x} failed: {e}");
    }
    b
}

fn port_name(i: usize) -> String {
    if i == 0 {
        "console".into()
    } else {
        format!("org.devshare.port{i}")
    }
}

/// Names of the scratch directories in the temporary directory: this, then the owner's pid.
const SCRATCH_PREFIX: &str = "devshare-fuzz-control-";

/// This process's scratch directory, once made.
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// A scratch directory of this process for the ports' log files. It goes when the process
/// exits: libFuzzer ends a run (`-runs`, `-max_total_time`) with exit(), which runs atexit
/// handlers. One left by a process that crashed or was killed goes with the next run.
fn scratch() -> &'static std::path::Path {
    SCRATCH.get_or_init(|| {
        remove_stale_scratch();
        let dir = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        // SAFETY: registers a function without arguments that only touches `SCRATCH`.
        if unsafe { libc::atexit(remove_scratch) } != 0 {
            eprintln!("cannot register the removal of {}", dir.display());
        }
        dir
    })
}

/// Removes this process's scratch directory (an atexit handler).
extern "C" fn remove_scratch() {
    if let Some(dir) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes the scratch directories of processes that are gone.
fn remove_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn config(ports: usize) -> Config {
    let endpoint = |i: usize| {
        // A log file kept small (emptied past 64 KiB): the cheapest endpoint that opens.
        let spec = format!("file:{}/p{i}.log,max-size=64K,keep=0", scratch().display());
        match spec.parse::<EndpointSpec>() {
            Ok(e) => e,
            Err(e) => panic!("{spec}: {e}"),
        }
    };
    Config {
        vms: vec![VmConfig {
            name: "fuzz".into(),
            socket: PathBuf::from("/nonexistent/fuzz.sock"),
            mode: SocketMode::Listen,
            kind: DeviceKind::Virtio,
            ports: (0..ports)
                .map(|i| PortConfig {
                    name: port_name(i),
                    target: Target::Endpoint(endpoint(i)),
                    buffer_size: 4096,
                    console: i == 0,
                })
                .collect(),
        }],
        state_dir: None,
        socket: SocketOptions::default(),
    }
}

/// Where hand-made chains point: past the buffers the driver posts one per slot, so what the
/// device writes there cannot land in those (or in the rings), or outside memory altogether.
const RAW_AREA: u64 = BUFFERS + 0x1_0000;
const _: () = assert!(
    BUFFERS + (4 + 2 * (MAX_PORTS as u64 - 1)) * QSIZE as u64 * SLOT_SPACE <= RAW_AREA,
    "the per-slot buffers of every queue must fit below the area of hand-made chains"
);

fn resolve(d: &RawDesc) -> u64 {
    if d.offset & 0x8000_0000 != 0 {
        MEM_SIZE + u64::from(d.offset & 0x7fff_ffff)
    } else {
        RAW_AREA + u64::from(d.offset) % (MEM_SIZE - RAW_AREA)
    }
}

/// Runs one input.
pub fn run(input: &Input) {
    let before = fd_count();
    {
        let nports = usize::from(input.ports % MAX_PORTS) + 1;
        let cfg = config(nports);
        let (groups, _) = match group::build(&cfg) {
            Ok(g) => g,
            Err(e) => panic!("cannot build the VM: {e}"),
        };
        let group = &groups[0];
        let mem = match Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) {
            Ok(m) => m,
            Err(e) => panic!("cannot map guest memory: {e}"),
        };
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let multiport = input.features & vc::F_MULTIPORT != 0;
        let nq = vc::queue_count(nports, true);
        let vrings: Vec<Vring> = (0..nq)
            .map(|q| {
                let dq = DriverQueue::new(q);
                let v = match Vring::new(atomic.clone(), QSIZE) {
                    Ok(v) => v,
                    Err(e) => panic!("cannot make a vring: {e}"),
                };
                v.set_queue_size(QSIZE);
                if let Err(e) = v.set_queue_info(dq.desc, dq.avail, dq.used) {
                    panic!("vring set-up refused: {e}");
                }
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        let mut queues: Vec<DriverQueue> = (0..nq).map(DriverQueue::new).collect();
        {
            let mut vms = group.lock();
            let d = &mut vms.devices[0];
            d.attach();
            d.set_memory(atomic);
            d.set_features(input.features);
            d.set_vrings(&vrings);
        }
        let bound = EVENTS_PER_PORT * nports;
        for step in input.steps.iter().take(64) {
            let kicked = match step {
                Step::Control {
                    id,
                    event,
                    value,
                    payload,
                    cut,
                } => {
                    let mut msg = vc::Control::encode(*id, *event, *value, payload);
                    msg.truncate(64);
                    if let Some(c) = cut {
                        msg.truncate(usize::from(*c));
                    }
                    post_message(&mem, &mut queues[vc::CONTROL_TX], &msg);
                    vc::CONTROL_TX
                }
                Step::Batch { messages, value } => {
                    for &(id, event) in messages.iter().take(usize::from(QSIZE) - 1) {
                        let msg = vc::Control::encode(id, event, *value, &[]);
                        post_message(&mem, &mut queues[vc::CONTROL_TX], &msg);
                    }
                    vc::CONTROL_TX
                }
                Step::RawControl { descs } => {
                    post_raw(&mem, &mut queues[vc::CONTROL_TX], descs);
                    vc::CONTROL_TX
                }
                Step::PostReceive { size, count } => {
                    let q = &mut queues[vc::CONTROL_RX];
                    for _ in 0..(*count % 8).max(1) {
                        q.add_buffer(&mem, &[], u32::from(*size), true);
                    }
                    vc::CONTROL_RX
                }
                Step::RawReceive { descs } => {
                    post_raw(&mem, &mut queues[vc::CONTROL_RX], descs);
                    vc::CONTROL_RX
                }
                Step::Kick { queue } => usize::from(*queue) % nq,
                Step::Output { port, bytes } => {
                    let p = usize::from(*port) % nports;
                    let (_, txq) = vc::port_queues(p);
                    post_message(&mem, &mut queues[txq], bytes);
                    txq
                }
                Step::PostPortReceive { port, size } => {
                    let p = usize::from(*port) % nports;
                    let (rxq, _) = vc::port_queues(p);
                    queues[rxq].add_buffer(&mem, &[], u32::from(*size), true);
                    rxq
                }
            };
            group.lock().on_queue_event(0, kicked);

            let pending = {
                let mut vms = group.lock();
                vms.devices[0].conn().map_or(0, |c| c.control.pending())
            };
            assert!(
                pending <= bound,
                "{pending} control replies wait for the driver ({nports} ports: at most {bound})"
            );
            if multiport {
                check_control(&mem, &mut queues, nports);
            }
            // Used chains give their descriptors back to the driver.
            for q in queues.iter_mut() {
                q.used(&mem);
            }
        }
    }
    assert_eq!(fd_count(), before, "descriptors leaked");
}

/// Puts `bytes` in a buffer and makes it available on `q` as a one-descriptor chain (if the
/// ring has room).
fn post_message(mem: &Memory, q: &mut DriverQueue, bytes: &[u8]) {
    q.add_buffer(mem, bytes, 0, false);
}

fn post_raw(mem: &Memory, q: &mut DriverQueue, descs: &[RawDesc]) {
    let chain: Vec<(u64, u32, u16, Option<u8>)> = descs
        .iter()
        .take(usize::from(QSIZE))
        .map(|d| (resolve(d), u32::from(d.len), d.flags, Some(d.next)))
        .collect();
    q.add(mem, &chain);
}

/// Every control chain made available is used; every reply fits its buffer and is about a
/// port that exists.
fn check_control(mem: &Memory, queues: &mut [DriverQueue], nports: usize) {
    let tx = &mut queues[vc::CONTROL_TX];
    tx.used(mem);
    // The device takes every message it was kicked for (a broken ring aside, which this
    // driver never makes: its chains may be bad, its rings are not).
    assert_eq!(
        tx.outstanding(),
        0,
        "control messages were left in the transmitq"
    );
    for (head, len, chain) in queues[vc::CONTROL_RX].used(mem) {
        if len == 0 || !chain.simple {
            continue;
        }
        let (addr, room, _) = chain.descs[0];
        assert!(
            (8..=room).contains(&len),
            "a {len}-byte reply in chain {head} of {room} bytes"
        );
        let mut raw = vec![0u8; len as usize];
        if let Err(e) = mem.read_slice(&mut raw, GuestAddress(addr)) {
            panic!("cannot read reply at {addr:#x}: {e}");
        }
        let Some(c) = vc::Control::decode(&raw) else {
            panic!("a reply that is no control message: {raw:?}");
        };
        assert!(
            (c.id as usize) < nports,
            "a reply about port {} of {nports}",
            c.id
        );
        match c.event {
            vc::DEVICE_ADD | vc::CONSOLE_PORT | vc::PORT_OPEN => {
                assert_eq!(len, 8, "event {} with a payload", c.event)
            }
            vc::RESIZE => assert_eq!(len, 12),
            vc::PORT_NAME => assert_eq!(
                &raw[8..],
                port_name(c.id as usize).as_bytes(),
                "PORT_NAME of port {}",
                c.id
            ),
            other => panic!("the device sent event {other}"),
        }
    }
}

fn control(id: u32, event: u16, value: u16) -> Step {
    Step::Control {
        id,
        event,
        value,
        payload: Vec::new(),
        cut: None,
    }
}

/// What Linux's virtio_console driver does, in order: DEVICE_READY, then PORT_READY for every
/// port the device added, with receive buffers posted first; a program opens port 1.
fn linux_boot(ports: u8) -> Input {
    let mut steps = vec![
        Step::PostReceive {
            size: 4096,
            count: 7,
        },
        control(0, vc::DEVICE_READY, 1),
    ];
    for p in 0..u32::from(ports) {
        steps.push(control(p, vc::PORT_READY, 1));
        steps.push(Step::PostReceive {
            size: 4096,
            count: 3,
        });
    }
    steps.push(control(1, vc::PORT_OPEN, 1));
    steps.push(Step::PostPortReceive {
        port: 1,
        size: 4096,
    });
    steps.push(Step::Output {
        port: 1,
        bytes: b"hello from the guest\n".to_vec(),
    });
    steps.push(control(1, vc::PORT_OPEN, 0));
    Input {
        ports: ports - 1,
        features: vc::F_MULTIPORT | vc::F_SIZE | (1 << 32),
        steps,
    }
}

/// Realistic conversations, and the hostile one of issue 10.
pub fn seeds() -> Vec<(&'static str, Input)> {
    let mut early = linux_boot(2);
    // Buffers come late: the replies wait.
    early.steps.remove(0);
    early.steps.push(Step::PostReceive { size: 64, count: 7 });
    let malformed = Input {
        ports: 1,
        features: vc::F_MULTIPORT,
        steps: vec![
            Step::PostReceive { size: 8, count: 4 },
            Step::Control {
                id: 0,
                event: vc::DEVICE_READY,
                value: 1,
                payload: Vec::new(),
                cut: Some(7),
            },
            Step::RawControl {
                descs: vec![RawDesc {
                    offset: 0x8100_0000,
                    len: 8,
                    flags: 0,
                    next: 0,
                }],
            },
            control(77, vc::PORT_READY, 1),
            control(0, 0x4242, 1),
            Step::Batch {
                messages: vec![(0, vc::PORT_READY), (1, vc::PORT_READY), (1, vc::PORT_OPEN)],
                value: 1,
            },
            Step::Kick { queue: 9 },
        ],
    };
    let single = Input {
        ports: 0,
        features: 1 << 32,
        steps: vec![
            Step::PostPortReceive { port: 0, size: 256 },
            Step::Output {
                port: 0,
                bytes: b"console output without MULTIPORT\n".to_vec(),
            },
            Step::Kick { queue: 3 },
        ],
    };
    vec![
        ("linux-boot-2-ports", linux_boot(2)),
        ("linux-boot-6-ports", linux_boot(6)),
        ("buffers-late", early),
        ("malformed", malformed),
        ("no-multiport", single),
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
