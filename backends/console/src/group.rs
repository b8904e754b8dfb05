//! A group: VMs that guest-to-guest links join (a connected component of the links; most
//! groups hold one VM). Each group has its own lock and its own home thread, so VMs that no
//! link joins never wait for each other, and guest chains are only ever walked under the lock
//! of their own group.
//!
//! [`Vms`] is what the lock guards. Its methods move data for one port at a time, reaching
//! into the linked VM where a port is a link: guest transmitq -> spool -> endpoint (or the
//! peer's receiveq), and endpoint (or the peer's transmitq) -> guest receiveq.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Config;
use crate::control::Effect;
use crate::device::{Device, DeviceError, Guest};
use crate::event_loop::Home;
use crate::link::{self, PeerPort};
use crate::port::{Host, Input, Port};
use crate::queue::{pin, Batch, Dir};
use crate::stats::PortReport;
use crate::virtio_console as vc;

/// The VMs of one group, under its lock.
pub struct Vms {
    /// The VMs, in configuration order.
    pub devices: Vec<Device>,
}

/// A group of linked VMs (see the module docs).
pub struct Group {
    vms: Mutex<Vms>,
    /// Serves the reactors of the VMs without a front-end.
    pub home: Home,
}

/// Where a VM of the configuration lives: its group and its index there.
#[derive(Clone)]
pub struct VmRef {
    /// The group.
    pub group: Arc<Group>,
    /// Index in the group.
    pub dev: usize,
}

/// Why the groups could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// A VM could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The home thread's epoll set could not be made.
    #[error("event loop: {0}")]
    Home(std::io::Error),
}

impl VmRef {
    /// The VM's worker serves its reactor from now on (a front-end connected).
    pub fn release_home(&self) {
        let fd = self.group.lock().devices[self.dev].reactor.fd();
        self.group.home.release(fd);
    }

    /// The front-end went away: the VM is detached and its reactor goes home.
    pub fn disconnected(&self) {
        let mut vms = self.group.lock();
        let d = &mut vms.devices[self.dev];
        d.detach();
        self.group.home.adopt(self.dev, d.reactor.fd());
    }

    /// The VM's reactor fd.
    pub fn reactor_fd(&self) -> std::os::fd::RawFd {
        self.group.lock().devices[self.dev].reactor.fd()
    }
}

impl Group {
    /// Locks the group, recovering from a poisoned lock (a panic elsewhere must not stop the
    /// group's other VMs from being served).
    pub fn lock(&self) -> MutexGuard<'_, Vms> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens every VM of `cfg`, grouped by links. Returns the groups and, per VM of `cfg`, where
/// it lives.
pub fn build(cfg: &Config) -> Result<(Vec<Arc<Group>>, Vec<VmRef>), GroupError> {
    let mut groups = Vec::new();
    let mut refs: Vec<Option<VmRef>> = vec![None; cfg.vms.len()];
    for members in link::groups(cfg) {
        let mut devices = Vec::new();
        for &i in &members {
            devices.push(Device::open(cfg, &cfg.vms[i], &members)?);
        }
        let home = Home::new().map_err(GroupError::Home)?;
        for (dev, d) in devices.iter().enumerate() {
            home.adopt(dev, d.reactor.fd());
        }
        let group = Arc::new(Group {
            vms: Mutex::new(Vms { devices }),
            home,
        });
        for (dev, &i) in members.iter().enumerate() {
            refs[i] = Some(VmRef {
                group: group.clone(),
                dev,
            });
        }
        groups.push(group);
    }
    Ok((groups, refs.into_iter().flatten().collect()))
}

impl Vms {
    /// The counters of every port, for the stats document.
    pub fn stats(&self) -> Vec<PortReport> {
        let mut v = Vec::new();
        for d in &self.devices {
            for p in &d.ports {
                v.push(PortReport {
                    vm: d.name().to_string(),
                    port: p.name.clone(),
                    stats: p.stats.clone(),
                });
            }
        }
        v
    }

    /// Runs `f` on VM `dev` with port `p`'s link peer, if `p` is a link.
    fn with_peer<R>(
        &mut self,
        dev: usize,
        p: usize,
        f: impl FnOnce(&mut Device, Option<&mut PeerPort<'_>>) -> R,
    ) -> R {
        let peer = match self.devices[dev].ports[p].host {
            Host::Link { dev: odev, port } => Some((odev, port)),
            Host::Endpoint(_) => None,
        };
        if let Some((odev, oport)) = peer {
            if let Some((me, other)) = link::pair_mut(&mut self.devices, dev, odev) {
                let mut peer = PeerPort {
                    dev: other,
                    port: oport,
                };
                return f(me, Some(&mut peer));
            }
        }
        f(&mut self.devices[dev], None)
    }

    /// A vhost-user worker woke for queue `q` of VM `dev`.
    pub fn on_queue_event(&mut self, dev: usize, q: usize) {
        let d = &mut self.devices[dev];
        log::debug!("{}: event on queue {q}", d.name());
        let multiport = d.multiport();
        let nports = d.ports.len();
        match vc::queue_role(q) {
            vc::QueueRole::Transmit(p) | vc::QueueRole::Receive(p)
                if p >= nports || (p > 0 && !multiport) =>
            {
                d.unused_queue(q)
            }
            vc::QueueRole::Transmit(p) => self.pump_out(dev, p),
            vc::QueueRole::Receive(p) => {
                d.ports[p].rx_starved = false;
                self.pump_in(dev, p);
            }
            vc::QueueRole::ControlTransmit if multiport => self.control_in(dev),
            vc::QueueRole::ControlReceive if multiport => d.control_flush(),
            _ => d.unused_queue(q),
        }
    }

    /// Moves the guest's output of port `p` of VM `dev` towards its host side.
    pub fn pump_out(&mut self, dev: usize, p: usize) {
        if matches!(self.devices[dev].guest, Guest::Stream(_)) {
            self.flush(dev, p);
            return;
        }
        self.with_peer(dev, p, |d, mut peer| {
            let (_, txq) = vc::port_queues(p);
            let Some((vring, mem)) = d.rings().and_then(|r| r.get(txq)) else {
                return;
            };
            let port = &mut d.ports[p];
            // Older output first.
            port.flush(peer.as_deref_mut());
            let mem = pin(&mem);
            let mut tx = match Batch::open(&vring, &mem) {
                Ok(tx) => tx,
                Err(e) => {
                    d.note_ring(txq, Err(&e));
                    return;
                }
            };
            let res = take_chains(port, &mut tx, peer);
            tx.finish();
            d.note_ring(txq, res.as_ref().map(|_| ()));
            d.sync(p);
        });
    }

    /// Fills the guest's receive buffers of port `p` of VM `dev` from its host side.
    pub fn pump_in(&mut self, dev: usize, p: usize) {
        if matches!(self.devices[dev].guest, Guest::Stream(_)) {
            self.devices[dev].stream_in();
            return;
        }
        match self.devices[dev].ports[p].host {
            Host::Link {
                dev: odev,
                port: oport,
            } => {
                if odev < self.devices.len() && odev != dev {
                    // The peer's output is our input: drain its spool, then its ring.
                    self.flush(odev, oport);
                    self.pump_out(odev, oport);
                }
            }
            Host::Endpoint(_) => {
                let d = &mut self.devices[dev];
                let (rxq, _) = vc::port_queues(p);
                if d.ports[p].guest_open {
                    if let Some((vring, mem)) = d.rings().and_then(|r| r.get(rxq)) {
                        let mem = pin(&mem);
                        match Batch::open(&vring, &mem) {
                            Ok(mut rx) => {
                                let port = &mut d.ports[p];
                                if port.fill_from_endpoint(&mut rx) == Input::Starved {
                                    port.rx_starved = true;
                                }
                                rx.finish();
                            }
                            Err(e) => d.note_ring(rxq, Err(&e)),
                        }
                    }
                }
                d.sync(p);
            }
        }
    }

    /// Sends what port `p` of VM `dev` holds in its spool to its host side.
    pub fn flush(&mut self, dev: usize, p: usize) {
        self.with_peer(dev, p, |d, peer| {
            d.ports[p].flush(peer);
            d.sync(p);
        });
    }

    fn control_in(&mut self, dev: usize) {
        let msgs = self.devices[dev].control_receive();
        for m in msgs {
            let d = &mut self.devices[dev];
            let name = d.cfg.name.clone();
            let Some(c) = m else {
                if let Some(conn) = d.conn() {
                    conn.control.malformed(&name);
                }
                continue;
            };
            let effect = match &mut d.guest {
                Guest::Virtio(Some(conn)) => conn.control.answer(&name, c, &mut d.ports),
                _ => Effect::None,
            };
            if let Effect::Opened(id) = effect {
                self.pump_in(dev, id);
                if let Host::Link {
                    dev: odev,
                    port: oport,
                } = self.devices[dev].ports[id].host
                {
                    if odev < self.devices.len() && odev != dev {
                        self.flush(odev, oport);
                        self.pump_out(odev, oport);
                    }
                }
            }
        }
        self.devices[dev].control_flush();
    }

    /// The driver of VM `dev` wrote the config space: only `emerg_wr` is writable.
    pub fn write_config(&mut self, dev: usize, offset: u32, data: &[u8]) -> bool {
        let d = &mut self.devices[dev];
        if offset != vc::CONFIG_EMERG_WR || data.is_empty() || data.len() > 4 {
            log::warn!(
                "{}: ignored config write of {} bytes at offset {offset}",
                d.name(),
                data.len()
            );
            return false;
        }
        // Emergency write: one character for the console, taken even before the rings work.
        let Some(port) = d.ports.first_mut() else {
            return false;
        };
        port.keep_newest(&crate::port::Pieces([&data[..1], &[]]), 0);
        self.flush(dev, 0);
        true
    }
}

/// Takes transmit chains from `tx` for `port` until the ring is empty or a data port's
/// buffer is full (then the chain stays in the ring: back-pressure). Malformed chains are
/// refused, counted and returned used.
fn take_chains(
    port: &mut Port,
    tx: &mut Batch<'_, '_>,
    mut peer: Option<&mut PeerPort<'_>>,
) -> Result<(), devshare_common::ring::RingError> {
    loop {
        let start = tx.next_avail();
        let Some(head) = tx.pop()? else {
            return Ok(());
        };
        let bufs = match tx.chain_for(head, Dir::Transmit) {
            Ok(bufs) => bufs,
            Err(why) => {
                port.refuse(&why);
                tx.push_used(head, 0);
                continue;
            }
        };
        if port.take_output(&bufs, peer.as_deref_mut()) {
            tx.push_used(head, 0);
        } else {
            // Data port and buffer full: leave the chain to the guest.
            tx.rewind(start);
            return Ok(());
        }
    }
}
