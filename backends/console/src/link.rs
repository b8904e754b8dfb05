//! Guest-to-guest links (`vm:OTHER/PORT`): a port's output is copied from one guest's memory
//! straight into the receive buffers of the linked port of another guest.
//!
//! Linked VMs share one lock (their [`Group`](crate::group::Group)); VMs that no link joins
//! share nothing. [`groups`] finds the groups: the connected components of the links.

use crate::config::{Config, Target};
use crate::device::Device;
use crate::port::Source;
use crate::queue::{pin, Batch, Budget, Dir};
use crate::virtio_console as vc;

/// The receiving end of a link: port `port` of the peer VM `dev`.
pub struct PeerPort<'a> {
    /// The peer VM.
    pub dev: &'a mut Device,
    /// Its port.
    pub port: usize,
    /// The work budget of the event (the sender's and the peer's rings share it).
    pub budget: &'a Budget,
}

impl PeerPort<'_> {
    /// Copies `src` from `off` on, at most `max` bytes, into the peer port's receive buffers,
    /// chain after chain, until it is all delivered, the peer has no buffer left or the
    /// event's budget is spent (the sender's ring is kicked for the rest); the peer's used
    /// entries are published before it returns. Returns the bytes delivered.
    pub fn write(&mut self, src: &dyn Source, off: usize, max: usize) -> usize {
        let want = src.len().saturating_sub(off).min(max);
        if want == 0 {
            return 0;
        }
        let dev = &mut *self.dev;
        if !dev.ports.get(self.port).is_some_and(|p| p.guest_open) {
            return 0;
        }
        let (rxq, _) = vc::port_queues(self.port);
        let Some((vring, mem)) = dev.rings().and_then(|r| r.get(rxq)) else {
            return 0;
        };
        let mem = pin(&mem);
        let mut rx = match Batch::open(&vring, &mem) {
            Ok(b) => b,
            Err(e) => {
                dev.note_ring(rxq, Err(&e));
                return 0;
            }
        };
        let Some(port) = dev.ports.get_mut(self.port) else {
            return 0;
        };
        let mut done = 0usize;
        let mut broken = None;
        while done < want && !self.budget.spent() {
            let head = match rx.pop() {
                Ok(Some(head)) => head,
                Ok(None) => {
                    port.rx_starved = true;
                    break;
                }
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            let dst = match rx.chain_for(head, Dir::Receive) {
                Ok(dst) => dst,
                Err(why) => {
                    rx.charge(self.budget, 0);
                    port.refuse(&why);
                    rx.push_used(head, 0);
                    continue;
                }
            };
            let n = src.copy_into(off + done, &dst).min(want - done);
            rx.charge(self.budget, n);
            rx.push_used(head, n as u32);
            port.stats.to_guest_bytes.add(n as u64);
            done += n;
            if n == 0 {
                break;
            }
        }
        rx.finish();
        dev.note_ring(rxq, broken.as_ref().map_or(Ok(()), Err));
        done
    }
}

/// Mutable access to two different devices of a slice.
pub fn pair_mut(devs: &mut [Device], a: usize, b: usize) -> Option<(&mut Device, &mut Device)> {
    if a == b || a >= devs.len() || b >= devs.len() {
        return None;
    }
    if a < b {
        let (x, y) = devs.split_at_mut(b);
        Some((&mut x[a], &mut y[0]))
    } else {
        let (x, y) = devs.split_at_mut(a);
        Some((&mut y[0], &mut x[b]))
    }
}

/// The VMs of `cfg` grouped by the connected components of their links: indices into
/// `cfg.vms`, each group in declaration order, groups ordered by their first VM.
pub fn groups(cfg: &Config) -> Vec<Vec<usize>> {
    let n = cfg.vms.len();
    // Union-find over VM indices.
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for (i, vm) in cfg.vms.iter().enumerate() {
        for p in &vm.ports {
            if let Target::Link { vm: other, .. } = &p.target {
                if let Some(j) = cfg.vm_index(other) {
                    let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                    parent[ri.max(rj)] = ri.min(rj);
                }
            }
        }
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut slot = vec![usize::MAX; n];
    for i in 0..n {
        let r = root(&mut parent, i);
        if slot[r] == usize::MAX {
            slot[r] = out.len();
            out.push(Vec::new());
        }
        out[slot[r]].push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        let f: crate::config::ConfigFile = toml::from_str(text).unwrap();
        Config::try_from(f).unwrap()
    }

    #[test]
    fn groups_follow_links_only() {
        let c = cfg(r#"
            [[vm]]
            name = "a"
            socket = "/tmp/a.sock"
            port = [{ name = "console", endpoint = "pty" }, { name = "l", endpoint = "vm:c/l" }]
            [[vm]]
            name = "b"
            socket = "/tmp/b.sock"
            port = [{ name = "console", endpoint = "pty" }]
            [[vm]]
            name = "c"
            socket = "/tmp/c.sock"
            port = [{ name = "console", endpoint = "pty" }, { name = "l", endpoint = "vm:a/l" },
                    { name = "m", endpoint = "vm:d/m" }]
            [[vm]]
            name = "d"
            socket = "/tmp/d.sock"
            port = [{ name = "console", endpoint = "pty" }, { name = "m", endpoint = "vm:c/m" }]
        "#);
        assert_eq!(groups(&c), vec![vec![0, 2, 3], vec![1]]);
    }
}
