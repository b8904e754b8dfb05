//! A VM's [`Reactor`]: an epoll set of its endpoint fds, its stream socket and a timer armed
//! only while something needs it. Every registration carries a [`Token`] saying what the fd is
//! (port endpoint, stream socket, timer) and its generation, so an event needs no lookup and a
//! stale one (for an fd closed, and its number reused, in the same round) is recognised; each
//! owner keeps its [`Interest`], so `epoll_ctl` runs only when the wanted interest changes.
//! What an event means is the event loop's business (`event_loop.rs`).

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

/// How often PTY sizes are polled, a client-mode stream dials QEMU, and devices that went away
/// are retried (only while one of these needs it: the timer is disarmed otherwise).
pub const TICK: Duration = Duration::from_millis(250);
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

    /// The token an event carries; None for data no registration made.
    pub fn decode(v: u64) -> Option<Token> {
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
    pub(crate) fn ready(&self, events: &mut [EpollEvent]) -> usize {
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
    pub(crate) fn consume_timer(&mut self) {
        let _ = self.timer.wait();
    }
}
