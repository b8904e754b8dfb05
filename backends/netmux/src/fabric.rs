//! The running switch: guest ports, the uplink, the optional host port and the table that
//! decides between them. Two entry points move frames:
//!
//! - [`Fabric::transmit`]: one pass over a guest's TX ring (`tx`): frames are taken in
//!   batches, checked, switched, written into the receiving guests' RX rings and sent out of
//!   the host-side links; the vhost-user layer only calls it when the guest kicks.
//! - [`Fabric::run_link_rx`]: one thread per host-side link delivers the frames arriving from
//!   it (`link_rx`).
//!
//! Nothing here ever waits for a guest: a full RX ring or a busy link costs a drop, counted on
//! the port it concerns.

mod link_rx;
mod tx;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devshare_common::ratelimit::RateLimit;

use crate::config::{Config, MacAddr};
use crate::frame::Frame;
use crate::port::Port;
use crate::stats::{LinkCounters, LinkDoc, StatsDoc};
use crate::switch::SwitchTable;
use crate::uplink::Uplink;

pub use tx::{TxEnd, TxQueue};

/// The two host-side links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The shared NIC (or TAP) towards the outside.
    Uplink,
    /// The TAP through which the host itself reaches the guests.
    Host,
}

/// A host-side link: its device, counters and the limit on its warnings.
struct HostLink {
    io: Box<dyn Uplink>,
    counters: LinkCounters,
    warn: RateLimit,
    /// When the interface's MAC was last read for a frame with another source (see
    /// `Fabric::host_source_ok`).
    mac_read: Mutex<Option<Instant>>,
}

impl HostLink {
    fn new(io: Box<dyn Uplink>) -> HostLink {
        let warn = RateLimit::new(io.describe(), 5, Duration::from_secs(10));
        HostLink {
            io,
            counters: LinkCounters::default(),
            warn,
            mac_read: Mutex::new(None),
        }
    }

    /// Adds what the kernel dropped for this link since the last look to `rx_dropped`. Safe
    /// from any thread: the kernel hands each drop out once.
    fn count_kernel_drops(&self) {
        let n = self.io.take_kernel_drops();
        if n > 0 {
            self.counters.rx_dropped.add(n);
        }
    }

    fn doc(&self, mac: Option<MacAddr>) -> LinkDoc<'_> {
        self.count_kernel_drops();
        LinkDoc {
            name: self.io.describe(),
            counters: &self.counters,
            mac: mac.map(|m| m.to_string()),
        }
    }
}

/// RX queues to interrupt once a batch is done: (port, queue), without repeats.
#[derive(Default)]
struct Signals(Vec<(usize, usize)>);

impl Signals {
    /// Remembers that `port`'s RX queue `q` got frames.
    fn add(&mut self, port: usize, q: usize) {
        if !self.0.contains(&(port, q)) {
            self.0.push((port, q));
        }
    }

    /// Interrupts every remembered queue that asked for it, and forgets them.
    fn flush(&mut self, ports: &[Arc<Port>]) {
        for (p, q) in self.0.drain(..) {
            if let Some(port) = ports.get(p) {
                port.signal(q);
            }
        }
    }
}

/// Ports, uplink, host port and switch table.
pub struct Fabric {
    table: SwitchTable,
    /// The guests' MTU (`--mtu`): no frame longer than it allows reaches a guest or a link.
    mtu: usize,
    ports: Vec<Arc<Port>>,
    uplink: HostLink,
    host: Option<HostLink>,
}

impl Fabric {
    /// The switch for `config`, around an opened uplink and, if there is a host port, its TAP
    /// with the MAC the host's stack uses on it.
    pub fn new(
        config: &Config,
        uplink: Box<dyn Uplink>,
        host: Option<(Box<dyn Uplink>, MacAddr)>,
    ) -> Fabric {
        let entries: Vec<_> = config.ports.iter().map(|p| (p.mac, p.vlan)).collect();
        let table = SwitchTable::new(&entries, config.mode, config.anti_spoof);
        let (table, host) = match host {
            Some((tap, mac)) => (table.with_host(mac), Some(HostLink::new(tap))),
            None => (table, None),
        };
        Fabric {
            table,
            mtu: usize::from(config.mtu),
            ports: config
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| Arc::new(Port::new(i, p.clone())))
                .collect(),
            uplink: HostLink::new(uplink),
            host,
        }
    }

    /// Guest port `index`, if there is one.
    pub fn port(&self, index: usize) -> Option<&Arc<Port>> {
        self.ports.get(index)
    }

    /// The host-side links this switch has: the uplink, and the host port if configured.
    pub fn links(&self) -> Vec<Link> {
        let mut v = vec![Link::Uplink];
        if self.host.is_some() {
            v.push(Link::Host);
        }
        v
    }

    /// The device and counters of a host-side link (`None`: no host port configured).
    fn link(&self, link: Link) -> Option<&HostLink> {
        match link {
            Link::Uplink => Some(&self.uplink),
            Link::Host => self.host.as_ref(),
        }
    }

    /// Writes one frame into guest port `to` (queue chosen by `hint`).
    fn deliver(&self, to: usize, hint: usize, frame: &Frame<'_, '_>, signals: &mut Signals) {
        if let Some(p) = self.ports.get(to) {
            if let Some(q) = p.receive_batch(hint, std::slice::from_ref(frame)) {
                signals.add(to, q);
            }
        }
    }

    /// Every counter, as the stats document (see [`crate::stats`]).
    pub fn stats(&self) -> StatsDoc<'_> {
        StatsDoc {
            uplink: self.uplink.doc(None),
            ports: self.ports.iter().map(|p| p.doc()).collect(),
            host: self.host.as_ref().map(|h| h.doc(self.table.host_mac())),
        }
    }

    /// The stats document as JSON.
    pub fn stats_json(&self) -> String {
        serde_json::to_string(&self.stats())
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode the counters: {e}\"}}"))
    }
}

#[cfg(test)]
mod tests;
