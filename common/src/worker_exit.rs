//! The exit events of vhost-user-backend's worker threads, and the descriptor the library
//! keeps of each.
//!
//! When the library builds a connection's worker (`VringEpollHandler::new`, vhost-user-backend
//! 0.24 and upstream at the time of writing) it takes the consumer half that the backend's
//! `exit_event` hands out with `into_raw_fd()`, adds it to the worker's epoll and never closes
//! it. A backend must hand out a duplicate (it keeps the original to tell the worker to stop),
//! so every connection left one open eventfd per worker thread behind: the soak
//! (`scripts/soak.sh`) counted one more descriptor per QEMU reconnect in both backends.
//!
//! [`ExitEventCopies`] finds those descriptors right after the daemon is built: in each
//! worker's epoll (its `/proc/self/fdinfo` lists the registered descriptors) the one that is
//! the same open file description as the backend's exit event, as `kcmp(2)` tells. Once the
//! daemon is gone it closes them (each only if it still is such a copy). Where `kcmp` is not
//! available nothing is found and nothing is closed.

use std::os::fd::{AsRawFd, RawFd};

use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::event::EventConsumer;

/// `kcmp(2)` type: compare two file descriptors.
const KCMP_FILE: libc::c_int = 0;

/// Whether `a` and `b` refer to the same open file description (None: cannot tell).
fn same_file(a: RawFd, b: RawFd) -> Option<bool> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: kcmp only compares kernel objects of this process by number; it reads and writes
    // no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    match r {
        0 => Some(true),
        1 | 2 => Some(false),
        _ => None,
    }
}

/// The descriptors registered in the epoll instance `epoll` (the `tfd:` lines of its fdinfo).
fn epoll_targets(epoll: RawFd) -> Vec<RawFd> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}"))
        .map(|info| {
            info.lines()
                .filter_map(|l| {
                    l.strip_prefix("tfd:")?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many open descriptors of this process are copies of `fd` (`fd` included).
#[cfg(test)]
pub(crate) fn open_copies(fd: RawFd) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
                .filter(|&f| same_file(f, fd) == Some(true))
                .count()
        })
        .unwrap_or(0)
}

/// The backend's exit events, and the copies of them the library took (see the module docs).
pub(crate) struct ExitEventCopies {
    /// One copy of each worker's exit event, to compare with.
    events: Vec<EventConsumer>,
    /// Descriptors the library took and will not close.
    taken: Vec<(RawFd, usize)>,
}

impl ExitEventCopies {
    /// Takes a copy of each of `backend`'s worker exit events, to recognise the library's.
    pub(crate) fn new<B: VhostUserBackend>(backend: &B) -> ExitEventCopies {
        let events = (0..backend.queues_per_thread().len())
            .filter_map(|i| backend.exit_event(i).map(|(consumer, _)| consumer))
            .collect();
        ExitEventCopies {
            events,
            taken: Vec::new(),
        }
    }

    /// Finds the exit-event descriptors registered in the workers' epoll instances `epolls`
    /// (the daemon's `get_epoll_handlers()`, right after it was built).
    pub(crate) fn find_in(&mut self, epolls: impl IntoIterator<Item = RawFd>) {
        for epoll in epolls {
            for f in epoll_targets(epoll) {
                if let Some(i) = self
                    .events
                    .iter()
                    .position(|e| same_file(f, e.as_raw_fd()) == Some(true))
                {
                    self.taken.push((f, i));
                }
            }
        }
    }

    /// How many were found.
    #[cfg(test)]
    pub(crate) fn found(&self) -> usize {
        self.taken.len()
    }

    /// Closes what [`find_in`](Self::find_in) found. Call it once the daemon that took them is
    /// dropped (dropping `self` does it too: declared before the daemon, it is dropped after
    /// it on every path). Returns how many were closed.
    pub(crate) fn close_taken(&mut self) -> usize {
        let mut closed = 0;
        for (f, i) in std::mem::take(&mut self.taken) {
            let Some(event) = self.events.get(i) else {
                continue;
            };
            // Still the library's copy (a later version might close it itself, and the number
            // could then be in other use).
            if same_file(f, event.as_raw_fd()) == Some(true) {
                // SAFETY: `f` was registered in a worker's epoll as a copy of this exit event:
                // the consumer the library took with `into_raw_fd()` and never closes, and it
                // still is that copy. The daemon is gone, so nothing uses or owns the number;
                // the event itself lives on in the backend's own copies.
                unsafe { libc::close(f) };
                closed += 1;
            }
        }
        closed
    }
}

impl Drop for ExitEventCopies {
    fn drop(&mut self) {
        self.close_taken();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};

    use crate::idle_backend::Idle;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only queries the descriptor table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
    }

    #[test]
    fn the_copy_registered_in_an_epoll_is_closed_and_the_others_stay() {
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        let backend = Idle(Some(std::sync::Arc::new(pair)));
        let kept = backend.0.as_ref().unwrap().0.try_clone().unwrap();
        let mut copies = ExitEventCopies::new(&backend);
        // What the library does with the pair it is given: the consumer goes into an epoll as
        // a raw descriptor, the notifier is kept (owned) for a while.
        let (consumer, notifier) = backend.exit_event(0).unwrap();
        let epoll = Epoll::new().unwrap();
        let leaked = consumer.into_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                leaked,
                EpollEvent::new(EventSet::IN, 1),
            )
            .unwrap();
        // An unrelated eventfd in the same epoll is left alone.
        let other = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                other.0.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 2),
            )
            .unwrap();
        copies.find_in([epoll.as_raw_fd()]);
        assert_eq!(copies.found(), 1);
        drop(epoll);
        drop(notifier);
        assert!(is_open(leaked));
        assert_eq!(copies.close_taken(), 1);
        assert!(!is_open(leaked));
        assert!(is_open(kept.as_raw_fd()) && is_open(backend.0.as_ref().unwrap().0.as_raw_fd()));
        assert!(is_open(other.0.as_raw_fd()));
        // The event still works through the copies that remain.
        backend.0.as_ref().unwrap().1.notify().unwrap();
        assert!(kept.consume().is_ok());
    }
}
