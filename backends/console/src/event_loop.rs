//! Readiness: each VM has a [`Reactor`], an epoll set of its endpoint fds, its stream socket
//! and, where needed, a periodic timer. Every registration carries a token saying what the fd
//! is (port endpoint, stream socket, timer; signals can join later), so an event needs no
//! lookup, and each port remembers what it registered, so `epoll_ctl` runs only when the
//! wanted interest changes.
//!
//! A reactor is itself an fd: it is served by whichever thread holds it. While the VM has no
//! front-end that is its group's home thread ([`run_home`]); while a front-end is connected
//! it is the VM's vhost-user worker thread, which then serves the VM's kicks and its
//! endpoints alike (see `vhu_console.rs`): a round trip crosses one backend thread, not two.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{Device, Guest};
use crate::endpoint::Readiness;
use crate::group::{Group, Vms};
use crate::port::Host;

/// How often PTY sizes are polled and a client-mode stream dials QEMU.
const TICK: Duration = Duration::from_millis(250);
/// Events handled per round before other work gets the lock.
const EVENTS_PER_ROUND: usize = 64;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// An fd of port `port`'s endpoint.
    Port {
        /// Port index.
        port: usize,
        /// The fd.
        fd: RawFd,
    },
    /// The stream socket (listener or connection).
    Stream {
        /// The fd.
        fd: RawFd,
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
            Token::Port { port, fd } => {
                KIND_PORT << 56 | (port as u64 & 0xffff) << 32 | fd as u32 as u64
            }
            Token::Stream { fd } => KIND_STREAM << 56 | fd as u32 as u64,
            Token::Timer => KIND_TIMER << 56,
        }
    }

    fn decode(v: u64) -> Option<Token> {
        let fd = v as u32 as RawFd;
        match v >> 56 {
            KIND_PORT => Some(Token::Port {
                port: (v >> 32 & 0xffff) as usize,
                fd,
            }),
            KIND_STREAM => Some(Token::Stream { fd }),
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

/// The fds one owner (a port's endpoint, a stream socket) registered, and for what.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Interest([Option<(RawFd, EventSet)>; 2]);

/// A VM's epoll set (see the module docs).
pub struct Reactor {
    epoll: Epoll,
    timer: Option<TimerFd>,
}

impl Reactor {
    /// An empty set; with `tick`, a periodic timer in it.
    pub fn new(tick: bool) -> io::Result<Reactor> {
        let epoll = Epoll::new()?;
        let timer = if tick {
            let mut t = TimerFd::new()?;
            // Non-blocking: two threads may both see it ready (while a VM's worker and its
            // group's home thread change hands), and the second must not block in read.
            set_nonblocking(t.as_raw_fd())?;
            t.reset(TICK, Some(TICK))?;
            epoll.ctl(
                ControlOperation::Add,
                t.as_raw_fd(),
                EpollEvent::new(EventSet::IN, Token::Timer.encode()),
            )?;
            Some(t)
        } else {
            None
        };
        Ok(Reactor { epoll, timer })
    }

    /// The epoll fd, to be watched by the thread serving this VM.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Brings the registration of `interest` in line with `want`, calling `epoll_ctl` only
    /// for what changed.
    pub fn set(
        &self,
        interest: &mut Interest,
        want: [Option<(RawFd, EventSet)>; 2],
        token: impl Fn(RawFd) -> Token,
    ) {
        if *interest == Interest(want) {
            return;
        }
        for (fd, _) in interest.0.iter().flatten() {
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
            let old = interest.0.iter().flatten().find(|(o, _)| o == fd);
            let event = EpollEvent::new(*ev, token(*fd).encode());
            let res = match old {
                Some((_, old_ev)) if old_ev == ev => Ok(()),
                // A new fd with an old number (the old one closed) is not registered yet.
                Some(_) => self
                    .epoll
                    .ctl(ControlOperation::Modify, *fd, event)
                    .or_else(|_| self.epoll.ctl(ControlOperation::Add, *fd, event)),
                None => self
                    .epoll
                    .ctl(ControlOperation::Add, *fd, event)
                    .or_else(|_| self.epoll.ctl(ControlOperation::Modify, *fd, event)),
            };
            match res {
                Ok(()) => now.0[slot] = Some((*fd, *ev)),
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
        if let Some(t) = &mut self.timer {
            let _ = t.wait();
        }
    }
}

impl Device {
    /// Brings the epoll interest of port `p`'s endpoint fds in line with its state.
    pub fn sync(&mut self, p: usize) {
        // Host input is read only when the guest side can take it: a virtio port the guest
        // opened and gave buffers to, or a connected stream with room in its queue. A stream
        // port has no open/close handshake, so `guest_open` never applies to it.
        let takes_input = match &self.guest {
            Guest::Stream(s) => s.connected() && s.can_take(),
            Guest::Virtio(_) => {
                let port = &self.ports[p];
                !port.rx_starved && port.guest_open
            }
        };
        let port = &mut self.ports[p];
        let pending = port.has_pending_output();
        let Host::Endpoint(ep) = &port.host else {
            return;
        };
        let input = ep.input_fd().map(|f| f.as_raw_fd());
        let output = ep.output_fd().map(|f| f.as_raw_fd());
        let mut want = [None; 2];
        for (slot, fd) in ep.watch_set().into_iter().enumerate() {
            if let Some(fd) = fd {
                let ev = if Some(fd) != input || takes_input {
                    EventSet::IN
                } else {
                    EventSet::empty()
                };
                want[slot] = Some((fd, ev));
            }
        }
        if let (Some(fd), true) = (output, pending) {
            match want.iter_mut().flatten().find(|(w, _)| *w == fd) {
                Some((_, ev)) => *ev |= EventSet::OUT,
                None => {
                    if let Some(free) = want.iter_mut().find(|w| w.is_none()) {
                        *free = Some((fd, EventSet::OUT));
                    }
                }
            }
        }
        self.reactor
            .set(&mut port.interest, want, |fd| Token::Port { port: p, fd });
    }

    /// Brings the epoll interest of the stream socket in line with its state.
    pub fn sync_stream(&mut self) {
        let Guest::Stream(s) = &self.guest else {
            return;
        };
        let want = s.watch();
        self.reactor
            .set(&mut self.stream_interest, want, |fd| Token::Stream { fd });
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
            }
            Token::Stream { fd } => {
                let d = &mut self.devices[dev];
                d.stream_ready(fd, ev);
                d.sync_stream();
                // (Dis)connecting QEMU changes whether the endpoint's input is wanted.
                d.sync(0);
            }
            Token::Port { port, fd } => {
                if port >= self.devices[dev].ports.len() {
                    return;
                }
                self.on_endpoint(dev, port, fd, ev);
                self.devices[dev].sync(port);
            }
        }
    }

    fn on_endpoint(&mut self, dev: usize, port: usize, fd: RawFd, ev: EventSet) {
        if ev.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            let p = &mut self.devices[dev].ports[port];
            let Host::Endpoint(ep) = &mut p.host else {
                return;
            };
            let readiness = match ep.on_readable(fd) {
                Ok(Readiness::Connected) => {
                    log::info!("{}: {} attached", p.label, ep.describe());
                    Readiness::Connected
                }
                Ok(r) => r,
                Err(e) => {
                    log::warn!("{}: {e}", p.label);
                    Readiness::Nothing
                }
            };
            match readiness {
                Readiness::Connected => {
                    // Replay what was kept while nobody listened.
                    self.flush(dev, port);
                    self.pump_out(dev, port);
                    self.pump_in(dev, port);
                }
                Readiness::Input => self.pump_in(dev, port),
                Readiness::Refused | Readiness::Nothing => {}
            }
        }
        if ev.contains(EventSet::OUT) {
            self.flush(dev, port);
            self.pump_out(dev, port);
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
