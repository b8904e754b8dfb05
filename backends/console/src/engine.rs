//! The forwarding engine: every port of every VM, its buffer and its host side, behind one
//! lock. Guest rings are pumped from two kinds of threads: a VM's vhost-user worker (on a
//! kick) and the engine's own event loop (when an endpoint becomes readable or writable).
//!
//! Data flows one way per direction:
//! guest transmitq -> [`spool`](crate::spool) -> endpoint (or the peer guest's receiveq, for links) and
//! endpoint (or the peer's transmitq) -> guest receiveq. Nothing here knows what kind of
//! endpoint it talks to beyond the `Endpoint` API.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devshare_common::chain::{GuestBuffers, Memory, MemoryAtomic};
use devshare_common::stats::Counter;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::{Config, DeviceKind, Target, VmConfig};
use crate::endpoint::{Endpoint, EndpointError, Readiness};
use crate::spool::{Spool, SpoolError};
use crate::stream::StreamGuest;
use crate::virtio_console as vc;

/// Most spooled bytes offered to a linked guest per round of [`Engine::flush`].
const LINK_FLUSH_CHUNK: usize = 64 * 1024;

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An endpoint could not be opened.
    #[error("{vm}/{port}: {source}")]
    Endpoint {
        /// VM name.
        vm: String,
        /// Port name.
        port: String,
        /// What went wrong.
        source: EndpointError,
    },
    /// A port buffer could not be created.
    #[error("{vm}/{port}: {source}")]
    Spool {
        /// VM name.
        vm: String,
        /// Port name.
        port: String,
        /// What went wrong.
        source: SpoolError,
    },
    /// The event loop could not be set up.
    #[error("event loop: {0}")]
    Epoll(io::Error),
    /// A stream device's socket could not be set up.
    #[error("{vm}: {source}")]
    Stream {
        /// VM name.
        vm: String,
        /// What went wrong.
        source: io::Error,
    },
}

/// Counters of one port, readable while running.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Bytes the guest sent that reached the host side.
    pub to_host: Counter,
    /// Bytes delivered into the guest.
    pub to_guest: Counter,
    /// Console output dropped because the buffer was full (oldest first).
    pub dropped: Counter,
    /// Descriptor chains refused as malformed.
    pub bad_chains: Counter,
    /// Guest output accepted and waiting in the port's buffer for its endpoint, as of the
    /// last [`Engine::stats`] call (with `--state-dir` it survives a restart).
    pub buffered: std::sync::atomic::AtomicU64,
}

/// Where a port's host-side data goes.
enum Host {
    Endpoint(Endpoint),
    Link { dev: usize, port: usize },
}

struct Port {
    name: String,
    console: bool,
    host: Host,
    spool: Spool,
    /// Bytes of the transmitq's next chain already taken (data ports under back-pressure).
    tx_offset: usize,
    /// The guest opened the port (or it is the console).
    guest_open: bool,
    /// No receive buffer was available last time host input was due.
    rx_starved: bool,
    winsize: Option<(u16, u16)>,
    stats: Arc<PortStats>,
}

/// State of a live vhost-user connection.
struct Connection {
    vrings: Option<Vec<VringRwLock>>,
    mem: Option<MemoryAtomic>,
    features: u64,
    event_idx: bool,
    control_out: VecDeque<Vec<u8>>,
}

impl Connection {
    fn multiport(&self) -> bool {
        self.features & vc::F_MULTIPORT != 0
    }
}

/// Guest side of a VM.
enum Guest {
    Virtio(Option<Connection>),
    Stream(StreamGuest),
}

struct Device {
    cfg: VmConfig,
    guest: Guest,
    ports: Vec<Port>,
}

/// What an epoll token refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Endpoint { dev: usize, port: usize },
    Stream { dev: usize },
}

/// All devices and the event loop's epoll set.
pub struct Engine {
    devices: Vec<Device>,
    epoll: Epoll,
    watched: HashMap<RawFd, (Owner, EventSet)>,
}

/// The engine shared between the event loop and the vhost-user workers.
pub type Shared = Arc<Mutex<Engine>>;

/// Locks the engine, recovering from a poisoned lock (a panic elsewhere must not stop the
/// other VMs from being served).
pub fn lock(e: &Shared) -> MutexGuard<'_, Engine> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens every endpoint and buffer of `cfg`.
    pub fn new(cfg: &Config) -> Result<Engine, EngineError> {
        let epoll = Epoll::new().map_err(EngineError::Epoll)?;
        let mut devices = Vec::new();
        for vm in &cfg.vms {
            let mut ports = Vec::new();
            for p in &vm.ports {
                let host = match &p.target {
                    Target::Endpoint(spec) => {
                        let ep = Endpoint::open(spec).map_err(|source| EngineError::Endpoint {
                            vm: vm.name.clone(),
                            port: p.name.clone(),
                            source,
                        })?;
                        log::info!("{}/{}: {}", vm.name, p.name, ep.describe());
                        Host::Endpoint(ep)
                    }
                    Target::Link {
                        vm: ovm,
                        port: oport,
                    } => {
                        let dev = cfg.vm_index(ovm).unwrap_or(usize::MAX);
                        let port = cfg
                            .vms
                            .get(dev)
                            .and_then(|v| v.ports.iter().position(|q| &q.name == oport))
                            .unwrap_or(usize::MAX);
                        log::info!("{}/{}: linked to {ovm}/{oport}", vm.name, p.name);
                        Host::Link { dev, port }
                    }
                };
                let spool = match &cfg.state_dir {
                    Some(dir) => {
                        let path: PathBuf = dir.join(format!("{}.{}.spool", vm.name, p.name));
                        Spool::open(&path, p.buffer_size)
                    }
                    None => Spool::anonymous(p.buffer_size),
                }
                .map_err(|source| EngineError::Spool {
                    vm: vm.name.clone(),
                    port: p.name.clone(),
                    source,
                })?;
                ports.push(Port {
                    name: p.name.clone(),
                    console: p.console,
                    host,
                    spool,
                    tx_offset: 0,
                    guest_open: false,
                    rx_starved: false,
                    winsize: None,
                    stats: Arc::new(PortStats::default()),
                });
            }
            let guest = match vm.kind {
                DeviceKind::Virtio => Guest::Virtio(None),
                DeviceKind::Stream => {
                    Guest::Stream(StreamGuest::new(&vm.socket, vm.mode).map_err(|source| {
                        EngineError::Stream {
                            vm: vm.name.clone(),
                            source,
                        }
                    })?)
                }
            };
            devices.push(Device {
                cfg: vm.clone(),
                guest,
                ports,
            });
        }
        let mut engine = Engine {
            devices,
            epoll,
            watched: HashMap::new(),
        };
        for dev in 0..engine.devices.len() {
            engine.sync_stream_fds(dev);
            for port in 0..engine.devices[dev].ports.len() {
                engine.sync_fds(dev, port);
            }
        }
        Ok(engine)
    }

    /// Counters of every port, as (vm, port, counters).
    pub fn stats(&self) -> Vec<(String, String, Arc<PortStats>)> {
        let mut v = Vec::new();
        for d in &self.devices {
            for p in &d.ports {
                p.stats
                    .buffered
                    .store(p.spool.len() as u64, std::sync::atomic::Ordering::Relaxed);
                v.push((d.cfg.name.clone(), p.name.clone(), p.stats.clone()));
            }
        }
        v
    }

    /// Number of VMs.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// The configuration of VM `dev`.
    pub fn vm(&self, dev: usize) -> &VmConfig {
        &self.devices[dev].cfg
    }

    // ---- vhost-user connection lifecycle (called by the per-connection backend) ----

    /// A front-end connected to VM `dev`.
    pub fn attach(&mut self, dev: usize) {
        let d = &mut self.devices[dev];
        d.guest = Guest::Virtio(Some(Connection {
            vrings: None,
            mem: None,
            features: 0,
            event_idx: false,
            control_out: VecDeque::new(),
        }));
        for p in &mut d.ports {
            p.guest_open = false;
            p.tx_offset = 0;
            p.rx_starved = false;
        }
    }

    /// The front-end of VM `dev` went away (or reset the device).
    pub fn detach(&mut self, dev: usize) {
        if let Guest::Virtio(c) = &mut self.devices[dev].guest {
            *c = None;
        }
        for p in &mut self.devices[dev].ports {
            p.guest_open = false;
            p.tx_offset = 0;
        }
        for port in 0..self.devices[dev].ports.len() {
            self.sync_fds(dev, port);
        }
    }

    fn conn(&mut self, dev: usize) -> Option<&mut Connection> {
        match &mut self.devices[dev].guest {
            Guest::Virtio(Some(c)) => Some(c),
            _ => None,
        }
    }

    /// The driver acknowledged `features`.
    pub fn set_features(&mut self, dev: usize, features: u64) {
        let multiport = features & vc::F_MULTIPORT != 0;
        if let Some(c) = self.conn(dev) {
            c.features = features;
        }
        if !multiport {
            // Without MULTIPORT port 0 is the console and open from the start.
            if let Some(p) = self.devices[dev].ports.first_mut() {
                p.guest_open = true;
            }
        }
    }

    /// EVENT_IDX negotiated or not.
    pub fn set_event_idx(&mut self, dev: usize, on: bool) {
        if let Some(c) = self.conn(dev) {
            c.event_idx = on;
        }
    }

    /// New guest memory table.
    pub fn set_memory(&mut self, dev: usize, mem: GuestMemoryAtomic<Memory>) {
        if let Some(c) = self.conn(dev) {
            c.mem = Some(mem);
        }
    }

    /// The config space (cols, rows of the console; port count).
    pub fn config_space(&self, dev: usize) -> [u8; vc::CONFIG_SIZE] {
        let d = &self.devices[dev];
        let (cols, rows) = d.ports.first().and_then(|p| p.winsize).unwrap_or((0, 0));
        vc::config_bytes(cols, rows, d.ports.len() as u32)
    }

    /// The driver wrote the config space: only `emerg_wr` is writable.
    pub fn write_config(&mut self, dev: usize, offset: u32, data: &[u8]) -> bool {
        if offset != vc::CONFIG_EMERG_WR || data.is_empty() || data.len() > 4 {
            log::warn!(
                "{}: ignored config write of {} bytes at offset {offset}",
                self.devices[dev].cfg.name,
                data.len()
            );
            return false;
        }
        // Emergency write: one character for the console, taken even before the rings work.
        let Some(p) = self.devices[dev].ports.first_mut() else {
            return false;
        };
        let ch = [data[0]];
        if p.spool.free() == 0 {
            p.spool.discard(1);
            p.stats.dropped.inc();
        }
        p.spool.push(&ch);
        self.flush(dev, 0);
        true
    }

    /// A vhost-user worker woke for queue `q` of VM `dev`.
    pub fn on_queue_event(&mut self, dev: usize, q: usize, vrings: &[VringRwLock]) {
        log::debug!("{}: event on queue {q}", self.devices[dev].cfg.name);
        let Some(c) = self.conn(dev) else { return };
        if c.vrings.is_none() {
            c.vrings = Some(vrings.to_vec());
        }
        let multiport = c.multiport();
        match vc::queue_role(q) {
            vc::QueueRole::Transmit(p) | vc::QueueRole::Receive(p)
                if p >= self.devices[dev].ports.len() || (p > 0 && !multiport) =>
            {
                log::warn!("{}: kick on unused queue {q}", self.devices[dev].cfg.name)
            }
            vc::QueueRole::Transmit(p) => self.pump_out(dev, p),
            vc::QueueRole::Receive(p) => {
                self.devices[dev].ports[p].rx_starved = false;
                self.pump_in(dev, p);
            }
            vc::QueueRole::ControlTransmit if multiport => self.control_in(dev),
            vc::QueueRole::ControlReceive if multiport => self.control_flush(dev),
            _ => log::warn!("{}: kick on unused queue {q}", self.devices[dev].cfg.name),
        }
    }

    /// The vring and guest memory for queue `q` of VM `dev`, if the guest is connected.
    fn ring(&self, dev: usize, q: usize) -> Option<(VringRwLock, MemoryAtomic, bool)> {
        match &self.devices.get(dev)?.guest {
            Guest::Virtio(Some(c)) => {
                let vr = c.vrings.as_ref()?.get(q)?.clone();
                let enabled = vr.get_ref().get_queue().ready();
                if !enabled {
                    log::debug!("queue {q} of device {dev} is not ready");
                    return None;
                }
                Some((vr, c.mem.clone()?, c.event_idx))
            }
            _ => None,
        }
    }

    // ---- guest -> host ----

    /// Moves the guest's output of port `p` towards its host side.
    fn pump_out(&mut self, dev: usize, p: usize) {
        if matches!(self.devices[dev].guest, Guest::Stream(_)) {
            self.flush(dev, p);
            return;
        }
        let (_, txq) = vc::port_queues(p);
        let Some((vring, mem, _)) = self.ring(dev, txq) else {
            return;
        };
        // Older output first.
        self.flush(dev, p);
        let guard = mem.memory();
        let mut used_any = false;
        while let Some(chain) = pop(&vring, &guard) {
            let head = chain.head_index();
            let Some(bufs) = self.accept_chain(dev, p, &vring, &chain, &guard, Dir::Transmit)
            else {
                used_any = true;
                continue;
            };
            if self.take_output(dev, p, &bufs) {
                let _ = vring.add_used(head, 0);
                used_any = true;
            } else {
                // Data port and buffer full: leave the chain to the guest (back-pressure).
                unpop(&vring);
                break;
            }
        }
        if used_any {
            signal(&vring);
        }
        // A short write above left bytes in the spool: wait for the endpoint to drain.
        if !self.devices[dev].ports[p].spool.is_empty() {
            self.sync_fds(dev, p);
        }
    }

    /// Maps a chain popped from port `p`'s queue for direction `dir`. A chain that is
    /// malformed, or has no buffer in the direction the queue needs, goes back to the guest
    /// used with length 0 and is counted; None then (the caller must still signal the ring).
    fn accept_chain<'m>(
        &mut self,
        dev: usize,
        p: usize,
        vring: &VringRwLock,
        chain: &Chain,
        mem: &'m Memory,
        dir: Dir,
    ) -> Option<GuestBuffers<'m>> {
        let why = match GuestBuffers::parse(chain, mem) {
            Ok(b) => match dir {
                Dir::Transmit if b.writable_len() > 0 && b.readable_len() == 0 => {
                    "transmit chain has only device-writable buffers".to_string()
                }
                Dir::Receive if b.writable_len() == 0 => {
                    "receive chain has no device-writable buffer".to_string()
                }
                _ => return Some(b),
            },
            Err(e) => e.to_string(),
        };
        self.refuse_chain(dev, p, &why);
        let _ = vring.add_used(chain.head_index(), 0);
        None
    }

    fn refuse_chain(&mut self, dev: usize, p: usize, why: &str) {
        let d = &self.devices[dev];
        log::warn!(
            "{}/{}: refused descriptor chain: {why}",
            d.cfg.name,
            d.ports[p].name
        );
        d.ports[p].stats.bad_chains.inc();
    }

    /// Takes one transmit chain: to the host side directly when nothing is queued before it,
    /// else into the spool. Returns false when a data port's spool is full and the chain
    /// must stay with the guest (its `tx_offset` remembers what was already taken).
    fn take_output(&mut self, dev: usize, p: usize, bufs: &GuestBuffers<'_>) -> bool {
        let len = bufs.readable_len();
        let mut off = self.devices[dev].ports[p].tx_offset.min(len);
        if self.devices[dev].ports[p].spool.is_empty() {
            off += self.deliver_guest(dev, p, bufs, off);
        }
        let port = &mut self.devices[dev].ports[p];
        let rest = len - off;
        if rest > 0 {
            if port.console {
                // The console never holds the guest up: keep the newest bytes.
                let cap = port.spool.capacity();
                if rest > cap {
                    port.stats.dropped.add((rest - cap) as u64);
                    off += rest - cap;
                }
                let rest = len - off;
                let need = rest.saturating_sub(port.spool.free());
                let dropped = port.spool.discard(need);
                port.stats.dropped.add(dropped as u64);
            }
            let mut pos = off;
            let n = port.spool.push_with(len - off, |dst| {
                let n = bufs.read_at(pos, dst);
                pos += n;
                n
            });
            off += n;
        }
        if off < len {
            self.devices[dev].ports[p].tx_offset = off;
            return false;
        }
        self.devices[dev].ports[p].tx_offset = 0;
        true
    }

    /// Delivers readable bytes of `bufs` from `off` straight to the host side; returns how
    /// many were taken.
    fn deliver_guest(
        &mut self,
        dev: usize,
        p: usize,
        bufs: &GuestBuffers<'_>,
        off: usize,
    ) -> usize {
        let (vm, pname) = self.names(dev, p);
        match &mut self.devices[dev].ports[p].host {
            Host::Endpoint(ep) => {
                if !ep.is_attached() {
                    return 0;
                }
                let slices = bufs.readable_io_slices(off);
                match ep.write_output(&slices) {
                    Ok(n) => {
                        self.devices[dev].ports[p].stats.to_host.add(n as u64);
                        if off + n < bufs.readable_len() {
                            self.sync_fds(dev, p);
                        }
                        n
                    }
                    Err(e) => {
                        log::info!("{vm}/{pname}: {e}");
                        self.sync_fds(dev, p);
                        0
                    }
                }
            }
            Host::Link {
                dev: odev,
                port: oport,
            } => {
                let (odev, oport) = (*odev, *oport);
                let want = bufs.readable_len() - off;
                let n = self.link_write(odev, oport, want, |dst, done| {
                    bufs.copy_to(off + done, dst, 0)
                });
                self.devices[dev].ports[p].stats.to_host.add(n as u64);
                n
            }
        }
    }

    /// Writes into receive buffers of the linked port `(odev, oport)`, chain after chain,
    /// with `fill(chain, done)` copying the source from offset `done` into one chain and
    /// reporting how much it copied.
    /// `want` bounds the total; returns the bytes delivered.
    fn link_write(
        &mut self,
        odev: usize,
        oport: usize,
        want: usize,
        mut fill: impl FnMut(&GuestBuffers<'_>, usize) -> usize,
    ) -> usize {
        if want == 0 {
            return 0;
        }
        let Some(peer) = self.devices.get(odev).and_then(|d| d.ports.get(oport)) else {
            return 0;
        };
        if !peer.guest_open {
            return 0;
        }
        let (rxq, _) = vc::port_queues(oport);
        let Some((vring, mem, _)) = self.ring(odev, rxq) else {
            return 0;
        };
        let guard = mem.memory();
        let mut done = 0usize;
        let mut used = false;
        while done < want {
            let chain = pop(&vring, &guard);
            let Some(chain) = chain else {
                self.devices[odev].ports[oport].rx_starved = true;
                break;
            };
            used = true;
            let Some(dst) = self.accept_chain(odev, oport, &vring, &chain, &guard, Dir::Receive)
            else {
                continue;
            };
            let n = fill(&dst, done).min(want - done);
            let _ = vring.add_used(chain.head_index(), n as u32);
            self.devices[odev].ports[oport].stats.to_guest.add(n as u64);
            done += n;
            if n == 0 {
                break;
            }
        }
        if used {
            signal(&vring);
        }
        done
    }

    // ---- host -> guest ----

    /// Fills the guest's receive buffers of port `p` from its host side.
    fn pump_in(&mut self, dev: usize, p: usize) {
        if matches!(self.devices[dev].guest, Guest::Stream(_)) {
            self.stream_in(dev);
            return;
        }
        match self.devices[dev].ports[p].host {
            Host::Link {
                dev: odev,
                port: oport,
            } => {
                // The peer's output is our input: drain its spool, then its ring.
                self.flush(odev, oport);
                self.pump_out(odev, oport);
            }
            Host::Endpoint(_) => {
                self.endpoint_in(dev, p);
                self.sync_fds(dev, p);
            }
        }
    }

    fn endpoint_in(&mut self, dev: usize, p: usize) {
        if !self.devices[dev].ports[p].guest_open {
            return;
        }
        let (rxq, _) = vc::port_queues(p);
        let Some((vring, mem, _)) = self.ring(dev, rxq) else {
            return;
        };
        let guard = mem.memory();
        let mut used = false;
        while let Host::Endpoint(ep) = &mut self.devices[dev].ports[p].host {
            let Some(fd) = ep.input_fd().map(|f| f.as_raw_fd()) else {
                break;
            };
            let chain = pop(&vring, &guard);
            let Some(chain) = chain else {
                self.devices[dev].ports[p].rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let Some(dst) = self.accept_chain(dev, p, &vring, &chain, &guard, Dir::Receive) else {
                used = true;
                continue;
            };
            match dst.read_writable_from(&RawFdRef(fd), 0, usize::MAX) {
                Ok(0) => {
                    unpop(&vring);
                    self.endpoint_gone(dev, p, "end of file");
                    break;
                }
                Ok(n) => {
                    let _ = vring.add_used(head, n as u32);
                    used = true;
                    self.devices[dev].ports[p].stats.to_guest.add(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    unpop(&vring);
                    break;
                }
                Err(e) => {
                    unpop(&vring);
                    self.endpoint_gone(dev, p, &e.to_string());
                    break;
                }
            }
        }
        if used {
            signal(&vring);
        }
    }

    fn endpoint_gone(&mut self, dev: usize, p: usize, why: &str) {
        let (vm, pname) = self.names(dev, p);
        if let Host::Endpoint(ep) = &mut self.devices[dev].ports[p].host {
            log::info!("{vm}/{pname}: {} detached ({why})", ep.describe());
            ep.detach();
        }
    }

    // ---- spool ----

    /// Sends what the spool of port `p` holds to its host side, as far as it takes it.
    fn flush(&mut self, dev: usize, p: usize) {
        loop {
            if self.devices[dev].ports[p].spool.is_empty() {
                break;
            }
            let (vm, pname) = self.names(dev, p);
            let port = &mut self.devices[dev].ports[p];
            let n = match &mut port.host {
                Host::Endpoint(ep) => {
                    if !ep.is_attached() {
                        break;
                    }
                    let (a, b) = port.spool.front();
                    let slices = [IoSlice::new(a), IoSlice::new(b)];
                    match ep.write_output(&slices) {
                        Ok(n) => n,
                        Err(e) => {
                            log::info!("{vm}/{pname}: {e}");
                            0
                        }
                    }
                }
                Host::Link {
                    dev: odev,
                    port: oport,
                } => {
                    let (odev, oport) = (*odev, *oport);
                    // Copy out first: the spool and the peer's ring are both borrowed from self.
                    // A bounded piece per round keeps a receiver without buffers cheap; the
                    // loop comes back for the rest while the receiver takes something.
                    let (a, b) = port.spool.front();
                    let mut data = Vec::with_capacity(LINK_FLUSH_CHUNK.min(a.len() + b.len()));
                    data.extend_from_slice(&a[..a.len().min(LINK_FLUSH_CHUNK)]);
                    let room = LINK_FLUSH_CHUNK - data.len();
                    data.extend_from_slice(&b[..b.len().min(room)]);
                    self.link_write(odev, oport, data.len(), |dst, done| {
                        dst.write_at(0, &data[done..])
                    })
                }
            };
            let port = &mut self.devices[dev].ports[p];
            port.spool.discard(n);
            port.stats.to_host.add(n as u64);
            if n == 0 {
                break;
            }
        }
        self.sync_fds(dev, p);
    }

    // ---- control queues ----

    fn control_in(&mut self, dev: usize) {
        let Some((vring, mem, _)) = self.ring(dev, vc::CONTROL_TX) else {
            return;
        };
        let guard = mem.memory();
        let mut used = false;
        let mut msgs = Vec::new();
        while let Some(chain) = pop(&vring, &guard) {
            let head = chain.head_index();
            match GuestBuffers::parse(&chain, &guard) {
                Ok(b) => {
                    let mut raw = [0u8; 8];
                    if b.read_at(0, &mut raw) == 8 {
                        msgs.push(vc::Control::decode(&raw));
                    } else {
                        msgs.push(None);
                    }
                }
                Err(e) => {
                    log::warn!("{}: refused control chain: {e}", self.devices[dev].cfg.name);
                    msgs.push(None);
                }
            }
            let _ = vring.add_used(head, 0);
            used = true;
        }
        if used {
            signal(&vring);
        }
        for m in msgs {
            match m {
                Some(c) => self.control_message(dev, c),
                None => log::warn!(
                    "{}: malformed control message (shorter than 8 bytes) ignored",
                    self.devices[dev].cfg.name
                ),
            }
        }
        self.control_flush(dev);
    }

    fn control_message(&mut self, dev: usize, c: vc::Control) {
        let name = self.devices[dev].cfg.name.clone();
        log::debug!("{name}: control message {c:?}");
        let nports = self.devices[dev].ports.len();
        let id = c.id as usize;
        match c.event {
            vc::DEVICE_READY => {
                if c.value != 1 {
                    log::warn!("{name}: guest driver failed to initialise the device");
                    return;
                }
                for i in 0..nports {
                    self.send_control(dev, vc::Control::encode(i as u32, vc::DEVICE_ADD, 1, &[]));
                }
            }
            vc::PORT_READY if id < nports => {
                if c.value != 1 {
                    log::warn!("{name}: guest failed to set up port {id}");
                    return;
                }
                let port = &self.devices[dev].ports[id];
                let (console, pname, winsize) = (port.console, port.name.clone(), port.winsize);
                if console {
                    self.send_control(dev, vc::Control::encode(c.id, vc::CONSOLE_PORT, 1, &[]));
                    if let Some((cols, rows)) = winsize {
                        self.send_resize(dev, id, cols, rows);
                    }
                    // The kernel's console port counts as opened by the guest.
                    self.devices[dev].ports[id].guest_open = true;
                }
                self.send_control(
                    dev,
                    vc::Control::encode(c.id, vc::PORT_NAME, 1, pname.as_bytes()),
                );
                // Output is always accepted (buffered when nothing is attached), so the host
                // side is open from the guest's point of view.
                self.send_control(dev, vc::Control::encode(c.id, vc::PORT_OPEN, 1, &[]));
            }
            vc::PORT_OPEN if id < nports => {
                let open = c.value == 1;
                self.devices[dev].ports[id].guest_open =
                    open || self.devices[dev].ports[id].console;
                log::debug!(
                    "{name}: guest {} port {id}",
                    if open { "opened" } else { "closed" }
                );
                if open {
                    self.devices[dev].ports[id].rx_starved = false;
                    self.pump_in(dev, id);
                    if let Host::Link {
                        dev: odev,
                        port: oport,
                    } = self.devices[dev].ports[id].host
                    {
                        self.flush(odev, oport);
                        self.pump_out(odev, oport);
                    }
                }
            }
            vc::PORT_READY | vc::PORT_OPEN => {
                log::warn!("{name}: control message for unknown port {id} ignored")
            }
            other => log::warn!("{name}: unexpected control event {other} ignored"),
        }
    }

    fn send_control(&mut self, dev: usize, msg: Vec<u8>) {
        if let Some(c) = self.conn(dev) {
            c.control_out.push_back(msg);
        }
    }

    fn send_resize(&mut self, dev: usize, port: usize, cols: u16, rows: u16) {
        // virtio 1.2 5.3.6.2: struct virtio_console_resize { le16 cols; le16 rows; }. Debian's
        // 6.1 guest kernel reads it that way: with this order `stty size` in the guest shows
        // the host terminal's rows and columns (checked by a QEMU test).
        let mut payload = Vec::with_capacity(4);
        payload.extend_from_slice(&cols.to_le_bytes());
        payload.extend_from_slice(&rows.to_le_bytes());
        self.send_control(
            dev,
            vc::Control::encode(port as u32, vc::RESIZE, 0, &payload),
        );
    }

    fn control_flush(&mut self, dev: usize) {
        let Some((vring, mem, _)) = self.ring(dev, vc::CONTROL_RX) else {
            return;
        };
        let guard = mem.memory();
        let mut used = false;
        while let Some(msg) = self.conn(dev).and_then(|c| c.control_out.pop_front()) {
            let Some(chain) = pop(&vring, &guard) else {
                if let Some(c) = self.conn(dev) {
                    c.control_out.push_front(msg);
                }
                break;
            };
            let head = chain.head_index();
            match GuestBuffers::parse(&chain, &guard) {
                Ok(b) if b.writable_len() >= msg.len() => {
                    let n = b.write_at(0, &msg);
                    let _ = vring.add_used(head, n as u32);
                }
                Ok(_) => {
                    log::warn!(
                        "{}: control buffer too small for a {}-byte message; message dropped",
                        self.devices[dev].cfg.name,
                        msg.len()
                    );
                    let _ = vring.add_used(head, 0);
                }
                Err(e) => {
                    log::warn!("{}: refused control chain: {e}", self.devices[dev].cfg.name);
                    if let Some(c) = self.conn(dev) {
                        c.control_out.push_front(msg);
                    }
                    let _ = vring.add_used(head, 0);
                }
            }
            used = true;
        }
        if used {
            signal(&vring);
        }
    }

    // ---- endpoints and the event loop ----

    fn names(&self, dev: usize, p: usize) -> (String, String) {
        (
            self.devices[dev].cfg.name.clone(),
            self.devices[dev].ports[p].name.clone(),
        )
    }

    /// Brings the epoll interest of port `p`'s endpoint fds in line with its state.
    fn sync_fds(&mut self, dev: usize, p: usize) {
        let port = &self.devices[dev].ports[p];
        let Host::Endpoint(ep) = &port.host else {
            return;
        };
        let owner = Owner::Endpoint { dev, port: p };
        let input = ep.input_fd().map(|f| f.as_raw_fd());
        let output = ep.output_fd().map(|f| f.as_raw_fd());
        // Host input is read only when the guest side can take it: a virtio port the guest
        // opened and gave buffers to, or a connected stream with room in its queue. A stream
        // port has no open/close handshake, so `guest_open` never applies to it.
        let takes_input = match &self.devices[dev].guest {
            Guest::Stream(s) => s.connected() && s.can_take(),
            Guest::Virtio(_) => !port.rx_starved && port.guest_open,
        };
        let mut want: HashMap<RawFd, EventSet> = HashMap::new();
        for fd in ep.watch_fds() {
            let mut ev = EventSet::empty();
            if Some(fd) != input || takes_input {
                ev |= EventSet::IN;
            }
            want.insert(fd, ev);
        }
        if let Some(fd) = output {
            if !port.spool.is_empty() || port.tx_offset > 0 {
                *want.entry(fd).or_insert(EventSet::empty()) |= EventSet::OUT;
            }
        }
        self.apply_interest(owner, want);
    }

    fn sync_stream_fds(&mut self, dev: usize) {
        let Guest::Stream(s) = &self.devices[dev].guest else {
            return;
        };
        let want = s.watch();
        self.apply_interest(Owner::Stream { dev }, want.into_iter().collect());
    }

    fn apply_interest(&mut self, owner: Owner, want: HashMap<RawFd, EventSet>) {
        let stale: Vec<RawFd> = self
            .watched
            .iter()
            .filter(|(fd, (o, _))| *o == owner && !want.contains_key(fd))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::empty(), 0),
            );
            self.watched.remove(&fd);
        }
        for (fd, ev) in want {
            let op = match self.watched.get(&fd) {
                Some((o, old)) if *o == owner && *old == ev => continue,
                Some(_) => ControlOperation::Modify,
                None => ControlOperation::Add,
            };
            if let Err(e) = self.epoll.ctl(op, fd, EpollEvent::new(ev, fd as u64)) {
                log::warn!("cannot watch fd {fd}: {e}");
                continue;
            }
            self.watched.insert(fd, (owner, ev));
        }
    }

    /// Handles one ready fd of the event loop.
    fn on_ready(&mut self, fd: RawFd, ev: EventSet) {
        let Some((owner, _)) = self.watched.get(&fd).copied() else {
            return;
        };
        match owner {
            Owner::Stream { dev } => {
                self.stream_ready(dev, fd, ev);
                self.sync_stream_fds(dev);
                // (Dis)connecting QEMU changes whether the endpoint's input is wanted.
                self.sync_fds(dev, 0);
            }
            Owner::Endpoint { dev, port } => {
                let (vm, pname) = self.names(dev, port);
                let Host::Endpoint(ep) = &mut self.devices[dev].ports[port].host else {
                    return;
                };
                let is_input = ep.input_fd().map(|f| f.as_raw_fd()) == Some(fd);
                if ev.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    if is_input {
                        self.pump_in(dev, port);
                    } else {
                        match ep.on_readable(fd) {
                            Ok(Readiness::Connected) => {
                                log::info!("{vm}/{pname}: {} attached", ep.describe());
                                // Replay what was kept while nobody listened.
                                self.flush(dev, port);
                                self.pump_out(dev, port);
                                self.pump_in(dev, port);
                            }
                            Ok(Readiness::Input) => self.pump_in(dev, port),
                            Ok(Readiness::Refused) | Ok(Readiness::Nothing) => {}
                            Err(e) => log::warn!("{vm}/{pname}: {e}"),
                        }
                    }
                }
                if ev.contains(EventSet::OUT) {
                    self.flush(dev, port);
                    self.pump_out(dev, port);
                }
                self.sync_fds(dev, port);
            }
        }
    }

    /// Checks terminal sizes and tells guests about changes (RESIZE control message).
    fn tick(&mut self) {
        for dev in 0..self.devices.len() {
            for p in 0..self.devices[dev].ports.len() {
                let port = &self.devices[dev].ports[p];
                if !port.console {
                    continue;
                }
                let Host::Endpoint(ep) = &port.host else {
                    continue;
                };
                let size = ep.window_size();
                if size.is_some() && size != port.winsize {
                    self.devices[dev].ports[p].winsize = size;
                    let multiport = self.conn(dev).map(|c| c.multiport()).unwrap_or(false);
                    if let (Some((cols, rows)), true) = (size, multiport) {
                        self.send_resize(dev, p, cols, rows);
                        self.control_flush(dev);
                    }
                }
            }
            if let Guest::Stream(_) = self.devices[dev].guest {
                self.stream_tick(dev);
            }
        }
    }

    // ---- stream devices ----

    fn stream_ready(&mut self, dev: usize, fd: RawFd, ev: EventSet) {
        let name = self.devices[dev].cfg.name.clone();
        let Guest::Stream(s) = &mut self.devices[dev].guest else {
            return;
        };
        match s.on_ready(fd, ev) {
            Ok(crate::stream::StreamEvent::Connected) => {
                log::info!("{name}: QEMU connected (stream)");
                self.stream_in(dev);
            }
            Ok(crate::stream::StreamEvent::Disconnected) => {
                log::info!("{name}: QEMU disconnected (stream)")
            }
            Ok(crate::stream::StreamEvent::Output) => self.stream_out(dev),
            Ok(crate::stream::StreamEvent::Writable) => self.stream_in(dev),
            Ok(crate::stream::StreamEvent::Nothing) => {}
            Err(e) => log::warn!("{name}: {e}"),
        }
    }

    /// Guest output on a stream device: socket -> spool -> endpoint. The guest's serial port
    /// must never stall, so the spool keeps the newest bytes.
    fn stream_out(&mut self, dev: usize) {
        let d = &mut self.devices[dev];
        let Guest::Stream(s) = &mut d.guest else {
            return;
        };
        let Some(port) = d.ports.first_mut() else {
            return;
        };
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let need = n.saturating_sub(port.spool.free());
                    let dropped = port.spool.discard(need);
                    port.stats.dropped.add(dropped as u64);
                    let keep = &buf[n.saturating_sub(port.spool.capacity())..n];
                    port.stats.dropped.add((n - keep.len()) as u64);
                    port.spool.push(keep);
                }
                Err(_) => break,
            }
        }
        self.flush(dev, 0);
    }

    /// Host input for a stream device: endpoint -> socket, only as fast as QEMU takes it.
    fn stream_in(&mut self, dev: usize) {
        let d = &mut self.devices[dev];
        let Guest::Stream(s) = &mut d.guest else {
            return;
        };
        let Some(port) = d.ports.first_mut() else {
            return;
        };
        let Host::Endpoint(ep) = &mut port.host else {
            return;
        };
        let mut buf = [0u8; 16384];
        while s.connected() && s.can_take() {
            match ep.read_input(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    port.stats.to_guest.add(n as u64);
                    s.send(&buf[..n]);
                }
                // A client that went away has been detached by the endpoint already.
                Err(e) => {
                    log::info!("{}/{}: {e}", d.cfg.name, port.name);
                    break;
                }
            }
        }
        self.sync_stream_fds(dev);
        self.sync_fds(dev, 0);
    }

    fn stream_tick(&mut self, dev: usize) {
        let Guest::Stream(s) = &mut self.devices[dev].guest else {
            return;
        };
        if s.tick() {
            log::info!("{}: connected to QEMU (stream)", self.devices[dev].cfg.name);
            self.stream_in(dev);
        }
        self.sync_stream_fds(dev);
    }
}

/// Which way a port queue carries data, for [`Engine::accept_chain`].
#[derive(Clone, Copy)]
enum Dir {
    /// Guest to host: the chain must offer bytes to read.
    Transmit,
    /// Host to guest: the chain must offer room to write.
    Receive,
}

type Chain = virtio_queue::DescriptorChain<vm_memory::GuestMemoryLoadGuard<Memory>>;

/// Takes the next available chain. When the ring is empty, asks the driver to notify us of
/// the next one (with EVENT_IDX this moves `avail_event`; without it nothing changes) and
/// looks once more, so a buffer added in between is not missed. The ring lock is held only
/// inside: `add_used` and friends lock it again.
fn pop(vring: &VringRwLock, mem: &vm_memory::GuestMemoryLoadGuard<Memory>) -> Option<Chain> {
    let chain = {
        let mut state = vring.get_mut();
        state.get_queue_mut().pop_descriptor_chain(mem.clone())
    };
    if chain.is_some() {
        return chain;
    }
    match vring.enable_notification() {
        Ok(true) => {
            let mut state = vring.get_mut();
            state.get_queue_mut().pop_descriptor_chain(mem.clone())
        }
        _ => None,
    }
}

/// Gives the last popped chain back to the ring (it will be popped again).
fn unpop(vring: &VringRwLock) {
    let mut state = vring.get_mut();
    state.get_queue_mut().go_to_previous_position();
}

/// Signals the driver that used buffers are there, when it asked to be told.
fn signal(vring: &VringRwLock) {
    if vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            log::debug!("cannot signal used queue: {e}");
        }
    }
}

/// A borrowed raw fd for `GuestBuffers::read_writable_from`.
struct RawFdRef(RawFd);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Runs the engine's event loop on the calling thread, forever.
pub fn run_event_loop(engine: Shared) {
    let epoll_fd = {
        let e = lock(&engine);
        e.epoll.as_raw_fd()
    };
    let mut events = vec![EpollEvent::default(); 64];
    let tick = Duration::from_millis(250);
    loop {
        // SAFETY: `epoll_fd` stays open for the engine's lifetime (the engine is never
        // dropped while this loop runs) and `events` is a valid buffer of its length.
        let n = unsafe {
            libc::epoll_wait(
                epoll_fd,
                events.as_mut_ptr().cast(),
                events.len() as libc::c_int,
                tick.as_millis() as libc::c_int,
            )
        };
        let mut e = lock(&engine);
        if n > 0 {
            for ev in &events[..n as usize] {
                e.on_ready(ev.fd(), ev.event_set());
            }
        }
        e.tick();
    }
}
