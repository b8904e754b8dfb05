//! Readiness: what each event of a VM's [`Reactor`](crate::reactor::Reactor) (its endpoint fds, its stream socket, its
//! timer) means, and which fds with which interest each port and the stream socket keep in
//! it ([`Device::sync`]).
//!
//! Hang-ups and errors are reported by the kernel whether asked for or not, and keep being
//! reported while the condition lasts: every one is taken here ([`Vms::serve_events`]) in
//! every state of the guest side (port open or closed, front-end or QEMU connected or not),
//! and the endpoint drops the peer, closes the device or reopens its side, so no fd stays in
//! the set with a condition nobody consumes.
//!
//! A reactor is itself an fd: it is served by whichever thread holds it. While the VM has no
//! front-end that is its group's home thread ([`run_home`]); while a front-end is connected
//! it is the VM's vhost-user worker thread, which then serves the VM's kicks and its
//! endpoints alike (see `vhu_console.rs`): a round trip crosses one backend thread, not two.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::device::{Device, Guest};
use crate::endpoint::{Readiness, WatchRole};
use crate::group::{Group, Vms};
use crate::port::Host;
use crate::reactor::Token;

/// Events handled per round before other work gets the lock.
const EVENTS_PER_ROUND: usize = 64;
/// Bit of [`Device::tick_wants`] for what needs ticks besides ports: a console on a PTY (its
/// size is polled) or a stream VM that dials QEMU.
pub const TICK_ALWAYS: u64 = 1 << 63;
/// Bit of [`Device::tick_wants`] while stream output is held back for a slow client.
pub const TICK_STREAM_HOLD: u64 = 1 << 62;

impl Device {
    /// Records whether `bit` (a port's index, or one of the `TICK_*` bits) needs the timer,
    /// and arms or disarms it.
    pub fn want_ticks(&mut self, bit: u64, on: bool) {
        if on {
            self.tick_wants |= bit;
        } else {
            self.tick_wants &= !bit;
        }
        self.reactor.set_ticking(self.tick_wants != 0);
    }

    /// Whether host input for port `p` can go to the guest now: a virtio port the guest
    /// opened and gave buffers to, or a connected stream with room in its queue. A stream
    /// port has no open/close handshake, so `guest_open` never applies to it.
    pub fn takes_input(&self, p: usize) -> bool {
        match &self.guest {
            Guest::Stream(s) => s.connected() && s.can_take(),
            Guest::Virtio(_) => self
                .ports
                .get(p)
                .is_some_and(|port| !port.rx_starved && port.guest_open),
        }
    }

    /// Brings the epoll interest of port `p`'s endpoint fds in line with its state, closes
    /// the fds the endpoint let go of, and keeps the timer armed while the endpoint needs it.
    pub fn sync(&mut self, p: usize) {
        let takes_input = self.takes_input(p);
        let Some(port) = self.ports.get_mut(p) else {
            return;
        };
        let pending = port.has_pending_output();
        let Host::Endpoint(ep) = &mut port.host else {
            return;
        };
        let input = ep.input_fd().map(|f| f.as_raw_fd());
        let output = ep.output_fd().map(|f| f.as_raw_fd());
        let mut want = [None; 2];
        for (slot, w) in ep.watch_set().into_iter().enumerate() {
            let Some(w) = w else { continue };
            let ev = match w.role {
                WatchRole::Accept => EventSet::IN,
                WatchRole::Data { read_hang_up } => {
                    let mut ev = EventSet::empty();
                    if takes_input && input == Some(w.fd) {
                        ev |= EventSet::IN;
                    }
                    if read_hang_up {
                        ev |= EventSet::READ_HANG_UP;
                    }
                    if pending && output == Some(w.fd) {
                        ev |= EventSet::OUT;
                    }
                    ev
                }
                WatchRole::HangUp => EventSet::empty(),
            };
            want[slot] = Some((w.fd, ev));
        }
        self.reactor
            .set(&mut port.interest, want, |fd, gen| Token::Port {
                port: p,
                fd,
                gen,
            });
        ep.close_retired();
        let ticks = ep.needs_tick();
        self.want_ticks(1 << p, ticks);
    }

    /// Brings the epoll interest of the stream socket in line with its state.
    pub fn sync_stream(&mut self) {
        let held = self.stream_held();
        let Guest::Stream(s) = &self.guest else {
            return;
        };
        let want = s.watch(held);
        self.reactor
            .set(&mut self.stream_interest, want, |fd, gen| Token::Stream {
                fd,
                gen,
            });
        let hold_ticks = s.needs_tick();
        self.want_ticks(TICK_STREAM_HOLD, hold_ticks);
    }
}

impl Vms {
    /// Handles what is ready in VM `dev`'s reactor.
    pub fn serve_events(&mut self, dev: usize) {
        let mut events = [EpollEvent::default(); EVENTS_PER_ROUND];
        let Some(d) = self.devices.get(dev) else {
            return;
        };
        let n = d.reactor.ready(&mut events);
        for ev in &events[..n] {
            let Some(token) = Token::decode(ev.data()) else {
                continue;
            };
            // Each event has its own work budget (see `crate::queue`).
            self.begin_event();
            self.on_event(dev, token, ev.event_set());
        }
    }

    fn on_event(&mut self, dev: usize, token: Token, ev: EventSet) {
        match token {
            Token::Timer => {
                let d = &mut self.devices[dev];
                d.reactor.consume_timer();
                d.check_window();
                d.stream_tick();
                self.tick_endpoints(dev);
            }
            Token::Stream { fd, gen } => {
                let d = &mut self.devices[dev];
                if !d.stream_interest.has(fd, gen) {
                    return;
                }
                d.stream_ready(fd, ev);
                d.sync_stream();
                // (Dis)connecting QEMU changes whether the endpoint's input is wanted.
                d.sync(0);
            }
            Token::Port { port, fd, gen } => {
                let live = self.devices[dev]
                    .ports
                    .get(port)
                    .is_some_and(|p| p.interest.has(fd, gen));
                if !live {
                    return;
                }
                self.on_endpoint(dev, port, fd, ev);
                self.devices[dev].sync(port);
            }
        }
    }

    fn on_endpoint(&mut self, dev: usize, port: usize, fd: RawFd, ev: EventSet) {
        let hang_up = ev.intersects(EventSet::HANG_UP | EventSet::ERROR);
        let p = &mut self.devices[dev].ports[port];
        let Host::Endpoint(ep) = &mut p.host else {
            return;
        };
        let Some(role) = ep
            .watch_set()
            .into_iter()
            .flatten()
            .find(|w| w.fd == fd)
            .map(|w| w.role)
        else {
            // Let go of already; the caller's sync unregisters it.
            return;
        };
        match role {
            WatchRole::Accept => {
                // A client that left just as this one came may not have been seen to go
                // yet: take its going first (its last input to the guest, then the hang-up),
                // so the newcomer gets the port instead of `port busy`.
                if let Some((data_fd, data_ev)) = ep.peer_left() {
                    self.on_endpoint(dev, port, data_fd, data_ev);
                }
                let p = &mut self.devices[dev].ports[port];
                let Host::Endpoint(ep) = &mut p.host else {
                    return;
                };
                let r = if hang_up && !ev.contains(EventSet::IN) {
                    ep.on_hang_up(fd)
                } else {
                    match ep.on_readable(fd) {
                        Ok(r) => r,
                        Err(e) => {
                            log::warn!("{}: {e}", p.label);
                            Readiness::Nothing
                        }
                    }
                };
                if r == Readiness::Connected {
                    // The endpoint logged it (at a bounded rate: clients decide how often).
                    log::debug!("{}: {} attached", p.label, ep.describe());
                    self.replay(dev, port);
                }
            }
            WatchRole::Data { .. } => {
                if ev.contains(EventSet::READ_HANG_UP) && !hang_up {
                    ep.on_read_hang_up(fd);
                }
                if ev.contains(EventSet::IN) || (hang_up && self.devices[dev].takes_input(port)) {
                    // With a hang-up: what the peer sent before it left still goes in.
                    self.pump_in(dev, port);
                }
                if ev.contains(EventSet::OUT) && !hang_up {
                    self.flush(dev, port);
                    self.pump_out(dev, port);
                }
                if hang_up {
                    self.endpoint_hung_up(dev, port, fd);
                }
            }
            WatchRole::HangUp => {
                if hang_up {
                    self.endpoint_hung_up(dev, port, fd);
                }
            }
        }
    }

    /// `fd` of port `port`'s endpoint reported a hang-up or an error: the endpoint lets the
    /// peer go (or opens its side again), unless reading already did.
    fn endpoint_hung_up(&mut self, dev: usize, port: usize, fd: RawFd) {
        let Host::Endpoint(ep) = &mut self.devices[dev].ports[port].host else {
            return;
        };
        if !ep.watch_set().into_iter().flatten().any(|w| w.fd == fd) {
            return;
        }
        if ep.on_hang_up(fd) == Readiness::Reopened {
            self.replay(dev, port);
        }
    }

    /// Something attached (a client, a device back): replay what was kept, then move data.
    fn replay(&mut self, dev: usize, port: usize) {
        self.flush(dev, port);
        self.pump_out(dev, port);
        self.pump_in(dev, port);
    }

    /// Ticks the endpoints that wait for something (a device or log file to reopen, a
    /// listener to resume accepting).
    fn tick_endpoints(&mut self, dev: usize) {
        let now = Instant::now();
        for port in 0..self.devices[dev].ports.len() {
            let Host::Endpoint(ep) = &mut self.devices[dev].ports[port].host else {
                continue;
            };
            if !ep.needs_tick() {
                continue;
            }
            if ep.tick(now) == Readiness::Reopened {
                self.replay(dev, port);
            }
            self.devices[dev].sync(port);
        }
    }
}

/// The home of a group's reactors: a thread that serves the reactors of the group's VMs
/// that have no front-end (whose vhost-user worker would otherwise serve them).
pub struct Home {
    epoll: Epoll,
}

impl Home {
    /// An empty home.
    pub fn new() -> io::Result<Home> {
        Ok(Home {
            epoll: Epoll::new()?,
        })
    }

    /// Serves VM `dev`'s reactor `fd` here.
    pub fn adopt(&self, dev: usize, fd: RawFd) {
        let ev = EpollEvent::new(EventSet::IN, dev as u64);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, fd, ev)
            .or_else(|_| self.epoll.ctl(ControlOperation::Modify, fd, ev))
        {
            log::warn!("cannot watch the events of VM {dev}: {e}");
        }
    }

    /// Stops serving reactor `fd` here (its VM's worker serves it now).
    pub fn release(&self, fd: RawFd) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd,
            EpollEvent::new(EventSet::empty(), 0),
        );
    }
}

/// Runs the home thread of `group`, forever.
pub fn run_home(group: Arc<Group>) {
    let mut events = [EpollEvent::default(); 16];
    loop {
        let n = match group.home.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("event loop stopped: {e}");
                return;
            }
        };
        let mut vms = group.lock();
        for ev in &events[..n] {
            vms.serve_events(ev.data() as usize);
        }
    }
}
