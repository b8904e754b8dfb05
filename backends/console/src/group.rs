//! A group: VMs that guest-to-guest links join (a connected component of the links; most
//! groups hold one VM). Each group has its own lock and its own home thread, so VMs that no
//! link joins never wait for each other, and guest chains are only ever walked under the lock
//! of their own group.
//!
//! [`Vms`] is what the lock guards. Its methods move data for one port at a time, reaching
//! into the linked VM where a port is a link: guest transmitq -> spool -> endpoint (or the
//! peer's receiveq), and endpoint (or the peer's transmitq) -> guest receiveq.

use std::sync::{Arc, Mutex, MutexGuard};

use devshare_common::warn_limited;

use crate::config::Config;
use crate::control::Effect;
use crate::device::{Device, DeviceError, Guest};
use crate::event_loop::Home;
use crate::link::{self, PeerPort};
use crate::port::{Host, Input, Port, TxChain};
use crate::queue::{self, pin, Batch, Budget, Dir, Pass};
use crate::stats::PortReport;
use crate::virtio_console as vc;

/// The VMs of one group, under its lock.
pub struct Vms {
    /// The VMs, in configuration order.
    pub devices: Vec<Device>,
    /// The work budget of the event being handled (see [`crate::queue`]): refilled as each
    /// kick or endpoint event begins, spent by every ring that event touches.
    pub(crate) budget: Budget,
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
            vms: Mutex::new(Vms {
                devices,
                budget: Budget::default(),
            }),
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

    /// Runs `f` on VM `dev` with the event's budget and port `p`'s link peer, if `p` is a
    /// link.
    fn with_peer<R>(
        &mut self,
        dev: usize,
        p: usize,
        f: impl FnOnce(&mut Device, &Budget, Option<&mut PeerPort<'_>>) -> R,
    ) -> R {
        let peer = match self.devices[dev].ports[p].host {
            Host::Link { dev: odev, port } => Some((odev, port)),
            Host::Endpoint(_) => None,
        };
        let Vms { devices, budget } = self;
        if let Some((odev, oport)) = peer {
            if let Some((me, other)) = link::pair_mut(devices, dev, odev) {
                let mut peer = PeerPort {
                    dev: other,
                    port: oport,
                    budget,
                };
                return f(me, budget, Some(&mut peer));
            }
        }
        f(&mut devices[dev], budget, None)
    }

    /// A new event begins: its work budget is full (see [`crate::queue`]).
    pub fn begin_event(&mut self) {
        self.budget.refill();
    }

    /// A vhost-user worker woke for queue `q` of VM `dev`.
    pub fn on_queue_event(&mut self, dev: usize, q: usize) {
        self.begin_event();
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
            // The client took bytes: guest output held back for it may flow again.
            self.devices[dev].stream_out(false);
            return;
        }
        self.with_peer(dev, p, |d, budget, mut peer| {
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
            let res = take_chains(port, &mut tx, peer, budget);
            tx.finish();
            if res == Ok(Pass::Yielded) {
                // Come back for the rest after whatever else is ready.
                queue::kick(&vring);
            }
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
                    // Its ring, if it has one, was kicked if the budget ran out there; its
                    // spool may still hold output for us (a peer without a front-end).
                    if self.budget.spent() && self.devices[odev].ports[oport].has_pending_output() {
                        self.kick(dev, vc::port_queues(p).0);
                    }
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
                                // At the end of the budget the endpoint's input is still
                                // ready, and watched: the event loop comes back for it.
                                if port.fill_from_endpoint(&mut rx, &self.budget) == Input::Starved
                                {
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
        self.with_peer(dev, p, |d, _, peer| {
            d.ports[p].flush(peer);
            d.sync(p);
        });
    }

    /// Kicks queue `q` of VM `dev` (work its budget left over).
    fn kick(&self, dev: usize, q: usize) {
        if let Some((vring, _)) = self.devices[dev].rings().and_then(|r| r.get(q)) {
            queue::kick(&vring);
        }
    }

    fn control_in(&mut self, dev: usize) {
        let msgs = self.devices[dev].control_receive(&self.budget);
        for m in msgs {
            let d = &mut self.devices[dev];
            let (name, limit) = (&d.cfg.name, &d.warnings.control);
            let effect = match (&mut d.guest, m) {
                (Guest::Virtio(Some(conn)), None) => {
                    conn.control.malformed(name, limit);
                    Effect::None
                }
                (Guest::Virtio(Some(conn)), Some(c)) => {
                    conn.control.answer(name, limit, c, &mut d.ports)
                }
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
        self.begin_event();
        let d = &mut self.devices[dev];
        if offset != vc::CONFIG_EMERG_WR || data.is_empty() || data.len() > 4 {
            warn_limited!(
                d.warnings.config,
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
        port.keep_newest(&crate::port::Pieces([&data[..1], &[]]), 0, None);
        self.flush(dev, 0);
        true
    }
}

/// Takes transmit chains from `tx` for `port` until the ring is empty, a data port's buffer
/// is full (then the chain stays in the ring: back-pressure) or the event's `budget` is
/// spent (then the caller kicks the ring). Malformed chains are refused, counted and
/// returned used.
fn take_chains(
    port: &mut Port,
    tx: &mut Batch<'_, '_>,
    mut peer: Option<&mut PeerPort<'_>>,
    budget: &Budget,
) -> Result<Pass, devshare_common::ring::RingError> {
    loop {
        if budget.spent() {
            return Ok(Pass::Yielded);
        }
        let start = tx.next_avail();
        let Some(head) = tx.pop()? else {
            return Ok(Pass::Done);
        };
        let bufs = match tx.chain_for(head, Dir::Transmit) {
            Ok(bufs) => bufs,
            Err(why) => {
                tx.charge(budget, 0);
                port.refuse(&why);
                tx.push_used(head, 0);
                continue;
            }
        };
        // Charged after the chain is taken: a link peer sees the budget as it was before it,
        // so a chain is split by the budget only if the peer's receive buffers spend it.
        let chain = TxChain {
            pos: start,
            head,
            bufs: &bufs,
        };
        let taken = port.take_output(&chain, peer.as_deref_mut());
        tx.charge(budget, bufs.readable_len());
        if taken {
            // Used at once, not at the end of the pass (see `port::output`).
            tx.push_used(head, 0);
            tx.publish_used();
            port.chain_used();
        } else {
            // Data port and buffer full: leave the chain to the guest. A link peer that
            // stopped at the budget (not for want of buffers) takes the rest next time.
            tx.rewind(start);
            return Ok(if budget.spent() {
                Pass::Yielded
            } else {
                Pass::Done
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;

    use crate::queue::Budget;
    use crate::testing::Rig;
    use crate::virtio_console as vc;

    fn buffered(rig: &Rig, p: usize) -> u64 {
        rig.vms().devices[0].ports[p]
            .stats
            .buffered_bytes
            .load(Ordering::Relaxed)
    }

    #[test]
    fn a_transmit_pass_stops_at_its_chain_budget_and_kicks_its_ring_for_the_rest() {
        let mut rig = Rig::new("budget-tx", "64K", vc::F_MULTIPORT);
        let (_, txq) = vc::port_queues(1);
        let heads: Vec<u16> = (0..5u8)
            .map(|i| rig.post(txq, &[b'a' + i; 10], 0))
            .collect();
        rig.vms().budget = Budget::new(2, usize::MAX, usize::MAX);
        let mut taken = Vec::new();
        for (round, (n, kicked)) in [(2, true), (2, true), (1, false)].into_iter().enumerate() {
            rig.vms().on_queue_event(0, txq);
            let used = rig.used(txq);
            assert_eq!(used.len(), n, "round {round}");
            assert_eq!(rig.kicked(txq), kicked, "round {round}");
            taken.extend(used.into_iter().map(|(h, _)| h));
        }
        assert_eq!(taken, heads);
        // Nothing lost, nothing out of order.
        assert_eq!(buffered(&rig, 1), 50);
        let mut client = rig.client("data");
        rig.vms().serve_events(0);
        let mut got = [0u8; 50];
        client.read_exact(&mut got).unwrap();
        let want: Vec<u8> = (0..5u8).flat_map(|i| [b'a' + i; 10]).collect();
        assert_eq!(&got[..], &want[..]);
    }

    #[test]
    fn long_chains_spend_the_descriptor_budget() {
        let mut rig = Rig::new("budget-desc", "64K", vc::F_MULTIPORT);
        let (_, txq) = vc::port_queues(1);
        // Three chains of eight one-byte buffers; ten descriptors per event.
        for _ in 0..3 {
            let descs: Vec<(u64, u32, u16)> = (0..8).map(|k| (0x30_0000 + k, 1, 0)).collect();
            rig.post_raw(txq, &descs);
        }
        rig.vms().budget = Budget::new(usize::MAX, 10, usize::MAX);
        rig.vms().on_queue_event(0, txq);
        assert_eq!(rig.used(txq).len(), 2, "8 + 8 descriptors pass 10");
        assert!(rig.kicked(txq));
        rig.vms().on_queue_event(0, txq);
        assert_eq!(rig.used(txq).len(), 1);
        assert!(!rig.kicked(txq));
        assert_eq!(buffered(&rig, 1), 24);
    }

    #[test]
    fn host_input_stops_at_the_budget_and_the_event_loop_comes_back_for_the_rest() {
        let mut rig = Rig::new("budget-rx", "64", vc::F_MULTIPORT);
        let (rxq, _) = vc::port_queues(1);
        let mut client = rig.client("data");
        rig.vms().serve_events(0);
        rig.vms().devices[0].ports[1].guest_open = true;
        rig.vms().devices[0].sync(1);
        let heads: Vec<u16> = (0..4).map(|_| rig.post(rxq, b"", 4)).collect();
        client.write_all(b"0123456789abcdef").unwrap();
        rig.vms().budget = Budget::new(1, usize::MAX, usize::MAX);
        let mut filled = Vec::new();
        for round in 0..4 {
            // The input is still ready: each round of the event loop takes one chain.
            rig.vms().serve_events(0);
            let used = rig.used(rxq);
            assert_eq!(used.len(), 1, "round {round}");
            filled.extend(used);
        }
        let got: Vec<u8> = filled
            .iter()
            .flat_map(|&(h, len)| rig.written(rxq, h, len))
            .collect();
        assert_eq!(got, b"0123456789abcdef");
        assert_eq!(filled.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
    }

    #[test]
    fn control_messages_beyond_the_budget_wait_for_the_next_kick() {
        let mut rig = Rig::new("budget-ctl", "64", vc::F_MULTIPORT);
        for value in [1, 0, 1] {
            let msg = vc::Control::encode(1, vc::PORT_OPEN, value, &[]);
            rig.post(vc::CONTROL_TX, &msg, 0);
        }
        rig.vms().budget = Budget::new(2, usize::MAX, usize::MAX);
        rig.vms().on_queue_event(0, vc::CONTROL_TX);
        assert_eq!(rig.used(vc::CONTROL_TX).len(), 2);
        assert!(rig.kicked(vc::CONTROL_TX));
        assert!(!rig.vms().devices[0].ports[1].guest_open);
        rig.vms().on_queue_event(0, vc::CONTROL_TX);
        assert_eq!(rig.used(vc::CONTROL_TX).len(), 1);
        assert!(!rig.kicked(vc::CONTROL_TX));
        // The last message was taken too: the port is open.
        assert!(rig.vms().devices[0].ports[1].guest_open);
    }
}
