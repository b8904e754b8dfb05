//! Readiness: each VM has a [`Reactor`], an epoll set of its endpoint fds, its stream socket
//! and a timer armed only while something needs it. Every registration carries a token saying
//! what the fd is (port endpoint, stream socket, timer) and its generation, so an event needs
//! no lookup and a stale one is recognised, and each port remembers what it registered, so
//! `epoll_ctl` runs only when the wanted interest changes.
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

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{Device, Guest};
use crate::endpoint::{Readiness, WatchRole};
use crate::group::{Group, Vms};
use crate::port::Host;

/// How often PTY sizes are polled, a client-mode stream dials QEMU, and devices that went away
/// are retried (only while one of these needs it: the timer is disarmed otherwise).
pub const TICK: Duration = Duration::from_millis(250);
/// Events handled per round before other work gets the lock.
const EVENTS_PER_ROUND: usize = 64;

/// What an event is about. `gen` tells a registration from an earlier one of the same fd
/// number: an event still queued for an fd that was closed (and its number reused) in the
/// same round is recognised as stale and skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// An fd of port `port`'s endpoint.
    Port {
        /// Port index.
        port: usize,
        /// The fd.
        fd: RawFd,
        /// Registration generation.
        gen: u8,
    },
    /// The stream socket (listener or connection).
    Stream {
        /// The fd.
        fd: RawFd,
        /// Registration generation.
        gen: u8,
    },
    /// The periodic timer.
    Timer,
}

const KIND_PORT: u64 = 1;
const KIND_STREAM: u64 = 2;
const KIND_TIMER: u64 = 3;

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Port { port, fd, gen } => {
                KIND_PORT << 56
                    | (gen as u64) << 48
                    | (port as u64 & 0xffff) << 32
                    | fd as u32 as u64
            }
            Token::Stream { fd, gen } => KIND_STREAM << 56 | (gen as u64) << 48 | fd as u32 as u64,
            Token::Timer => KIND_TIMER << 56,
        }
    }

    fn decode(v: u64) -> Option<Token> {
        let fd = v as u32 as RawFd;
        let gen = (v >> 48) as u8;
        match v >> 56 {
            KIND_PORT => Some(Token::Port {
                port: (v >> 32 & 0xffff) as usize,
                fd,
                gen,
            }),
            KIND_STREAM => Some(Token::Stream { fd, gen }),
            KIND_TIMER => Some(Token::Timer),
            _ => None,
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; the result is checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The fds one owner (a port's endpoint, a stream socket) registered, for what, and under
/// which generation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Interest([Option<(RawFd, EventSet, u8)>; 2]);

impl Interest {
    /// Whether `fd` is registered under generation `gen`.
    pub fn has(&self, fd: RawFd, gen: u8) -> bool {
        self.0
            .iter()
            .flatten()
            .any(|&(f, _, g)| f == fd && g == gen)
    }

    fn same(&self, want: &[Option<(RawFd, EventSet)>; 2]) -> bool {
        self.0
            .iter()
            .zip(want)
            .all(|(have, want)| have.map(|(f, e, _)| (f, e)) == *want)
    }
}

/// A VM's epoll set (see the module docs).
pub struct Reactor {
    epoll: Epoll,
    timer: TimerFd,
    ticking: bool,
    next_gen: Cell<u8>,
}

impl Reactor {
    /// An empty set with a (disarmed) timer in it.
    pub fn new() -> io::Result<Reactor> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        // Non-blocking: two threads may both see it ready (while a VM's worker and its
        // group's home thread change hands), and the second must not block in read.
        set_nonblocking(timer.as_raw_fd())?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, Token::Timer.encode()),
        )?;
        Ok(Reactor {
            epoll,
            timer,
            ticking: false,
            next_gen: Cell::new(0),
        })
    }

    /// The epoll fd, to be watched by the thread serving this VM.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Arms the periodic timer ([`TICK`]) or disarms it.
    pub fn set_ticking(&mut self, on: bool) {
        if on == self.ticking {
            return;
        }
        let res = if on {
            self.timer.reset(TICK, Some(TICK))
        } else {
            self.timer.clear()
        };
        match res {
            Ok(()) => self.ticking = on,
            Err(e) => log::warn!("event loop timer: {e}"),
        }
    }

    /// Brings the registration of `interest` in line with `want`, calling `epoll_ctl` only
    /// for what changed. An fd registered with no events is still told about hang-ups and
    /// errors (the kernel always reports those).
    pub fn set(
        &self,
        interest: &mut Interest,
        want: [Option<(RawFd, EventSet)>; 2],
        token: impl Fn(RawFd, u8) -> Token,
    ) {
        if interest.same(&want) {
            return;
        }
        for (fd, _, _) in interest.0.iter().flatten() {
            if !want.iter().flatten().any(|(w, _)| w == fd) {
                // Fails harmlessly when the fd was closed already (which unregistered it).
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    *fd,
                    EpollEvent::new(EventSet::empty(), 0),
                );
            }
        }
        let mut now = Interest::default();
        for (slot, (fd, ev)) in want.iter().flatten().enumerate() {
            let old = interest.0.iter().flatten().find(|(o, _, _)| o == fd);
            let res = match old {
                Some(&(_, old_ev, gen)) if old_ev == *ev => Ok(gen),
                Some(&(_, _, gen)) => {
                    let event = EpollEvent::new(*ev, token(*fd, gen).encode());
                    self.epoll
                        .ctl(ControlOperation::Modify, *fd, event)
                        .map(|()| gen)
                }
                None => {
                    let gen = self.next_gen.get().wrapping_add(1);
                    self.next_gen.set(gen);
                    let event = EpollEvent::new(*ev, token(*fd, gen).encode());
                    self.epoll
                        .ctl(ControlOperation::Add, *fd, event)
                        .or_else(|_| self.epoll.ctl(ControlOperation::Modify, *fd, event))
                        .map(|()| gen)
                }
            };
            match res {
                Ok(gen) => now.0[slot] = Some((*fd, *ev, gen)),
                Err(e) => log::warn!("cannot watch fd {fd}: {e}"),
            }
        }
        *interest = now;
    }

    /// The events ready now (without waiting).
    fn ready(&self, events: &mut [EpollEvent]) -> usize {
        loop {
            match self.epoll.wait(0, events) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("event loop: {e}");
                    return 0;
                }
            }
        }
    }

    /// Consumes the timer's expirations.
    fn consume_timer(&mut self) {
        let _ = self.timer.wait();
    }
}

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
        let label = p.label.clone();
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
                let r = if hang_up && !ev.contains(EventSet::IN) {
                    ep.on_hang_up(fd)
                } else {
                    match ep.on_readable(fd) {
                        Ok(r) => r,
                        Err(e) => {
                            log::warn!("{label}: {e}");
                            Readiness::Nothing
                        }
                    }
                };
                if r == Readiness::Connected {
                    log::info!("{label}: {} attached", ep.describe());
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
