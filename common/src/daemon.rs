//! Daemon lifecycle shared by every backend: serve one vhost-user socket for the life of the
//! process, across front-end disconnects and restarts.
//!
//! A backend hands [`serve`] a factory that builds a fresh `VhostUserBackend` for each
//! connection; whatever must outlive a connection (buffers, endpoints, counters) lives in state
//! the factory closes over. In [`Transport::Listen`] mode one listening socket is kept for the
//! whole run, so a QEMU started with `reconnect-ms` finds it again after it restarts; in
//! [`Transport::Connect`] mode (QEMU's `server=on`, as libvirt and OVS use) the daemon dials
//! the front-end and dials again whenever either side went away.

use std::fmt;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::chain::Memory;
use crate::relay;

/// How a backend meets its front-end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Listen on this Unix socket path; QEMU connects (`-chardev socket,path=...`).
    Listen(PathBuf),
    /// Connect to a front-end listening on this path (`-chardev socket,path=...,server=on`).
    Connect(PathBuf),
}

impl Transport {
    /// The socket path, whichever side listens.
    pub fn path(&self) -> &Path {
        match self {
            Transport::Listen(p) | Transport::Connect(p) => p,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Listen(p) => write!(f, "listening on {}", p.display()),
            Transport::Connect(p) => write!(f, "connecting to {}", p.display()),
        }
    }
}

/// Why a daemon stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The listening socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The backend for a new connection could not be built.
    #[error("cannot set up the device for a new connection: {0}")]
    Backend(String),
}

/// Knobs of [`serve`].
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Thread and log name of this device.
    pub name: String,
    /// Where the front-end is.
    pub transport: Transport,
    /// Delay between attempts to reach a listening front-end (client mode).
    pub reconnect_delay: Duration,
    /// Set to stop after the current connection ends.
    pub stop: Arc<AtomicBool>,
    /// The answer to GET_QUEUE_NUM when it is not the number of virtqueues (the vhost-user
    /// library's answer). QEMU's vhost-user-net reads it as queue pairs and refuses a netdev
    /// with more (`you are asking more queues than supported: N`), so a network device sets
    /// its queue pairs here. `None`: the library's answer.
    pub queue_num: Option<u64>,
}

impl ServeOptions {
    /// Options with a 500 ms reconnect delay and a fresh stop flag.
    pub fn new(name: impl Into<String>, transport: Transport) -> Self {
        ServeOptions {
            name: name.into(),
            transport,
            reconnect_delay: Duration::from_millis(500),
            stop: Arc::new(AtomicBool::new(false)),
            queue_num: None,
        }
    }
}

/// The `device_event` with which every worker thread's `handle_event` is called once when a
/// connection starts, before the front-end has sent anything: the one chance a backend gets to
/// see its vrings before the first kick. Backends that do not care ignore it (it is past every
/// queue index and past the library's own `num_queues` event).
pub fn connection_start_event(num_queues: usize) -> u16 {
    (num_queues + 1) as u16
}

/// Serves one front-end after another until `opts.stop` is set.
///
/// `make_backend` is called once per connection. Its backend's `exit_event` must hand out
/// clones of one fixed event pair per thread: after a connection ends the daemon signals them
/// so the connection's worker threads finish. `on_disconnect` runs after each connection.
/// Every connection's messages pass through [`relay`].
pub fn serve<B, F, D>(
    opts: &ServeOptions,
    mut make_backend: F,
    mut on_disconnect: D,
) -> Result<(), DaemonError>
where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
    F: FnMut() -> Result<B, String>,
    D: FnMut(),
{
    let public = match &opts.transport {
        Transport::Listen(path) => {
            if path.exists() {
                let _ = std::fs::remove_file(path);
            }
            Some(
                UnixListener::bind(path).map_err(|source| DaemonError::Listen {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        Transport::Connect(_) => None,
    };
    log::info!("{}: {}", opts.name, opts.transport);
    let mut waiting_logged = false;
    while !opts.stop.load(Ordering::Acquire) {
        let frontend = match (&public, &opts.transport) {
            (Some(l), _) => l.accept().map(|(s, _)| s),
            (None, t) => UnixStream::connect(t.path()),
        };
        let frontend = match frontend {
            Ok(s) => s,
            Err(e) => {
                if !waiting_logged {
                    log::info!("{}: front-end not reachable yet ({e}); retrying", opts.name);
                    waiting_logged = true;
                }
                thread::sleep(opts.reconnect_delay);
                continue;
            }
        };
        waiting_logged = false;
        let backend = make_backend().map_err(DaemonError::Backend)?;
        log::info!("{}: front-end connected", opts.name);
        if let Err(e) = run_connection(&opts.name, frontend, backend.clone(), opts.queue_num) {
            log::warn!("{}: connection ended: {e}", opts.name);
        } else {
            log::info!("{}: front-end disconnected", opts.name);
        }
        stop_workers(&backend);
        on_disconnect();
        if public.is_none() {
            thread::sleep(opts.reconnect_delay);
        }
    }
    Ok(())
}

fn run_connection<B>(
    name: &str,
    frontend: UnixStream,
    backend: B,
    queue_num: Option<u64>,
) -> io::Result<()>
where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    let mem = GuestMemoryAtomic::new(Memory::new());
    let num_queues = backend.num_queues();
    let mut daemon = VhostUserDaemon::new(name.to_string(), backend, mem)
        .map_err(|e| io::Error::other(e.to_string()))?;
    // A private, nameless (abstract, kernel-chosen) socket between the relay and the library.
    let private = relay::autobound_listener()?;
    let addr = private.local_addr()?;
    let inner = UnixStream::connect_addr(&addr)?;
    let mut listener = Listener::from(private);
    daemon
        .start(&mut listener)
        .map_err(|e| io::Error::other(e.to_string()))?;
    // Edge-triggered and written once: each worker sees the start event exactly once. The
    // descriptors stay open (and registered) until the connection ends.
    let start_event = u64::from(connection_start_event(num_queues));
    let mut start_fds = Vec::new();
    for handler in daemon.get_epoll_handlers() {
        let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        handler.register_listener(
            fd.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            start_event,
        )?;
        fd.write(1)?;
        start_fds.push(fd);
    }

    let to_daemon = {
        let (from, to) = (frontend.try_clone()?, inner.try_clone()?);
        thread::Builder::new()
            .name(format!("{name}-relay"))
            .spawn(move || {
                let r = relay::relay_frontend_messages(&from, &to);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                r
            })?
    };
    let to_frontend = {
        let (from, to) = (inner.try_clone()?, frontend.try_clone()?);
        thread::Builder::new()
            .name(format!("{name}-reply"))
            .spawn(move || {
                // Replies carry no descriptors for the features these devices offer.
                if let Err(e) = relay::relay_backend_replies(&from, &to, queue_num) {
                    log::debug!("reply relay: {e}");
                }
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
            })?
    };
    let res = daemon.wait().map_err(|e| io::Error::other(e.to_string()));
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = inner.shutdown(Shutdown::Both);
    if let Ok(Err(e)) = to_daemon.join() {
        log::debug!("{name}: relay: {e}");
    }
    let _ = to_frontend.join();
    drop(start_fds);
    res
}

/// Tells each worker thread of a finished connection to exit.
fn stop_workers<B: VhostUserBackend>(backend: &B) {
    for i in 0..backend.queues_per_thread().len() {
        if let Some((_, notifier)) = backend.exit_event(i) {
            if let Err(e) = notifier.notify() {
                log::warn!("cannot stop worker thread {i}: {e}");
            }
        }
    }
}
