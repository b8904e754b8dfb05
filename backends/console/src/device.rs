//! One VM: its guest side (a vhost-user connection or a stream socket), its ports and the
//! event loop of its endpoints. What crosses to another VM (links) is the group's job
//! ([`crate::group`]).

use std::path::PathBuf;

use devshare_common::chain::Memory;
use devshare_common::ratelimit::RateLimit;
use devshare_common::ring::RingError;
use vm_memory::GuestMemoryAtomic;

use crate::config::{Config, DeviceKind, Target, VmConfig};
use crate::control::ControlChannel;
use crate::endpoint::{Endpoint, EndpointError};
use crate::event_loop::TICK_ALWAYS;
use crate::port::{Host, Port};
use crate::queue::{self, pin, Batch, Budget, GuestRings, Pass, Vring};
use crate::reactor::{Interest, Reactor};
use crate::spool::{Spool, SpoolError};
use crate::stream::{StreamError, StreamGuest};
use crate::virtio_console as vc;

/// Why a VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An endpoint could not be opened.
    #[error("{vm}/{port}: {source}")]
    Endpoint {
        /// VM name.
        vm: String,
        /// Port name.
        port: String,
        /// What went wrong.
        source: Box<EndpointError>,
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
    #[error("{vm}: event loop: {source}")]
    Events {
        /// VM name.
        vm: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A stream device's socket could not be set up.
    #[error("{vm}: {source}")]
    Stream {
        /// VM name.
        vm: String,
        /// What went wrong (names the path).
        source: StreamError,
    },
}

/// State of a live vhost-user connection.
#[derive(Default)]
pub struct Connection {
    /// The guest's rings and memory.
    pub rings: GuestRings,
    /// Features the driver acknowledged.
    pub features: u64,
    /// The control-queue conversation.
    pub control: ControlChannel,
}

impl Connection {
    /// Whether the driver took MULTIPORT.
    pub fn multiport(&self) -> bool {
        self.features & vc::F_MULTIPORT != 0
    }
}

/// Guest side of a VM.
pub enum Guest {
    /// vhost-user; None while no front-end is connected.
    Virtio(Option<Connection>),
    /// Plain bytes on QEMU's `-chardev socket`.
    Stream(StreamGuest),
}

/// One VM (see the module docs).
pub struct Device {
    /// The VM's configuration.
    pub cfg: VmConfig,
    /// Its guest side.
    pub guest: Guest,
    /// Its ports, in guest order.
    pub ports: Vec<Port>,
    /// Its endpoints' (and stream socket's) readiness.
    pub reactor: Reactor,
    /// The stream socket fds registered with `reactor`.
    pub stream_interest: Interest,
    /// What needs the reactor's timer: bit `p` for port `p`'s endpoint, plus
    /// [`TICK_ALWAYS`] and
    /// [`TICK_STREAM_HOLD`](crate::event_loop::TICK_STREAM_HOLD).
    pub tick_wants: u64,
    /// Limits what the VM's guest and front-end can make it log.
    pub warnings: VmWarnings,
}

/// The limits of what a VM's guest and front-end can make it log, one per kind of event so
/// that one kind cannot hide another (a port's refused chains have the port's own limit).
/// They outlive connections: a front-end that reconnects gets no fresh burst.
#[derive(Debug)]
pub struct VmWarnings {
    /// The control queues: malformed or unexpected messages, refused control chains.
    pub control: RateLimit,
    /// Rings found broken (or usable again), kicks on queues the device does not use.
    pub rings: RateLimit,
    /// Writes to the read-only part of the config space.
    pub config: RateLimit,
}

impl VmWarnings {
    fn new(vm: &str) -> VmWarnings {
        VmWarnings {
            control: RateLimit::standard(format!("{vm}: control queue")),
            rings: RateLimit::standard(format!("{vm}: rings")),
            config: RateLimit::standard(format!("{vm}: config space")),
        }
    }
}

impl Device {
    /// Opens every endpoint and buffer of `vm`; `group` maps VM indices of `cfg` to indices
    /// in the VM's group (for links).
    pub fn open(cfg: &Config, vm: &VmConfig, group: &[usize]) -> Result<Device, DeviceError> {
        let mut ports = Vec::new();
        let mut has_window = false;
        for p in &vm.ports {
            let host = match &p.target {
                Target::Endpoint(spec) => {
                    let ep = Endpoint::open(spec).map_err(|source| DeviceError::Endpoint {
                        vm: vm.name.clone(),
                        port: p.name.clone(),
                        source: Box::new(source),
                    })?;
                    log::info!("{}/{}: {}", vm.name, p.name, ep.describe());
                    has_window |= p.console && ep.pty_path().is_some();
                    Host::Endpoint(ep)
                }
                Target::Link {
                    vm: ovm,
                    port: oport,
                } => {
                    let other = cfg.vm_index(ovm);
                    let dev = other
                        .and_then(|o| group.iter().position(|&g| g == o))
                        .unwrap_or(usize::MAX);
                    let port = other
                        .and_then(|o| cfg.vms[o].ports.iter().position(|q| &q.name == oport))
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
            .map_err(|source| DeviceError::Spool {
                vm: vm.name.clone(),
                port: p.name.clone(),
                source,
            })?;
            ports.push(Port::new(&vm.name, &p.name, p.console, host, spool));
        }
        let guest = match vm.kind {
            DeviceKind::Virtio => Guest::Virtio(None),
            DeviceKind::Stream => {
                Guest::Stream(StreamGuest::new(&vm.socket, vm.mode, &cfg.socket).map_err(
                    |source| DeviceError::Stream {
                        vm: vm.name.clone(),
                        source,
                    },
                )?)
            }
        };
        // Ticks: a PTY's size has to be polled, and a stream in client mode dials QEMU.
        let ticks = has_window || matches!(&guest, Guest::Stream(s) if s.dials());
        let reactor = Reactor::new().map_err(|source| DeviceError::Events {
            vm: vm.name.clone(),
            source,
        })?;
        let mut d = Device {
            cfg: vm.clone(),
            guest,
            ports,
            reactor,
            stream_interest: Interest::default(),
            tick_wants: 0,
            warnings: VmWarnings::new(&vm.name),
        };
        d.want_ticks(TICK_ALWAYS, ticks);
        d.sync_stream();
        for p in 0..d.ports.len() {
            d.sync(p);
        }
        Ok(d)
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The live vhost-user connection.
    pub fn conn(&mut self) -> Option<&mut Connection> {
        match &mut self.guest {
            Guest::Virtio(Some(c)) => Some(c),
            _ => None,
        }
    }

    /// The guest's rings, while a front-end is connected.
    pub fn rings(&self) -> Option<&GuestRings> {
        match &self.guest {
            Guest::Virtio(Some(c)) => Some(&c.rings),
            _ => None,
        }
    }

    /// Records whether queue `q` could be used (see [`GuestRings::note`]).
    pub fn note_ring(&mut self, q: usize, result: Result<(), &RingError>) {
        if let Guest::Virtio(Some(c)) = &mut self.guest {
            c.rings
                .note(&self.cfg.name, &self.warnings.rings, q, result);
        }
    }

    /// The guest kicked a queue the device does not use.
    pub fn unused_queue(&mut self, q: usize) {
        let name = &self.cfg.name;
        match &mut self.guest {
            Guest::Virtio(Some(c)) => c.control.unused_queue(name, &self.warnings.rings, q),
            _ => log::debug!("{name}: kick on queue {q} without a connection"),
        }
    }

    /// Whether the driver took MULTIPORT.
    pub fn multiport(&self) -> bool {
        matches!(&self.guest, Guest::Virtio(Some(c)) if c.multiport())
    }

    /// A front-end connected.
    pub fn attach(&mut self) {
        self.guest = Guest::Virtio(Some(Connection::default()));
        for p in &mut self.ports {
            p.guest_open = false;
            p.new_connection();
            p.rx_starved = false;
        }
    }

    /// The front-end went away (or reset the device).
    pub fn detach(&mut self) {
        if let Guest::Virtio(c) = &mut self.guest {
            *c = None;
        }
        for p in &mut self.ports {
            p.guest_open = false;
            p.new_connection();
        }
        for p in 0..self.ports.len() {
            self.sync(p);
        }
    }

    /// The driver acknowledged `features`.
    pub fn set_features(&mut self, features: u64) {
        if let Some(c) = self.conn() {
            c.features = features;
        }
        if features & vc::F_MULTIPORT == 0 {
            // Without MULTIPORT port 0 is the console and open from the start.
            if let Some(p) = self.ports.first_mut() {
                p.guest_open = true;
            }
        }
    }

    /// New guest memory table.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<Memory>) {
        if let Some(c) = self.conn() {
            c.rings.mem = Some(mem);
        }
    }

    /// The vrings, known from the first event on them.
    pub fn set_vrings(&mut self, vrings: &[Vring]) {
        if let Some(c) = self.conn() {
            if c.rings.vrings.is_none() {
                c.rings.vrings = Some(vrings.to_vec());
            }
        }
    }

    /// The config space (cols, rows of the console; port count).
    pub fn config_space(&self) -> [u8; vc::CONFIG_SIZE] {
        let (cols, rows) = self.ports.first().and_then(|p| p.winsize).unwrap_or((0, 0));
        vc::config_bytes(cols, rows, self.ports.len() as u32)
    }

    /// Messages from the driver on the control transmitq, as many as the event's `budget`
    /// allows (the queue is kicked for the rest); every chain read goes back used.
    pub fn control_receive(&mut self, budget: &Budget) -> Vec<Option<vc::Control>> {
        let Some((vring, mem)) = self.rings().and_then(|r| r.get(vc::CONTROL_TX)) else {
            return Vec::new();
        };
        let mem = pin(&mem);
        let Guest::Virtio(Some(c)) = &mut self.guest else {
            return Vec::new();
        };
        let opened = Batch::open(&vring, &mem);
        let (msgs, res) = match opened {
            Ok(mut tx) => {
                let got =
                    c.control
                        .receive(&self.cfg.name, &self.warnings.control, &mut tx, budget);
                tx.finish();
                got
            }
            Err(e) => (Vec::new(), Err(e)),
        };
        if res == Ok(Pass::Yielded) {
            queue::kick(&vring);
        }
        self.note_ring(vc::CONTROL_TX, res.as_ref().map(|_| ()));
        msgs
    }

    /// Writes waiting control messages into the driver's control receive buffers.
    pub fn control_flush(&mut self) {
        let Some((vring, mem)) = self.rings().and_then(|r| r.get(vc::CONTROL_RX)) else {
            return;
        };
        let Guest::Virtio(Some(c)) = &mut self.guest else {
            return;
        };
        if c.control.pending() == 0 {
            return;
        }
        let mem = pin(&mem);
        let opened = Batch::open(&vring, &mem);
        match opened {
            Ok(mut rx) => {
                c.control
                    .flush(&self.cfg.name, &self.warnings.control, &mut rx);
                rx.finish();
            }
            Err(e) => self.note_ring(vc::CONTROL_RX, Err(&e)),
        };
    }

    /// Checks the console's terminal size and tells the guest about a change (RESIZE).
    pub fn check_window(&mut self) {
        for p in 0..self.ports.len() {
            let port = &mut self.ports[p];
            if !port.console {
                continue;
            }
            let Some(size) = port.endpoint().and_then(|ep| ep.window_size()) else {
                continue;
            };
            if Some(size) == port.winsize {
                continue;
            }
            port.winsize = Some(size);
            if let Some(c) = self.conn() {
                if c.multiport() {
                    c.control.send_resize(p, size.0, size.1);
                    self.control_flush();
                }
            }
        }
    }
}
