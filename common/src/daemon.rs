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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::chain::Memory;

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
        source: vhost::vhost_user::Error,
    },
    /// The backend for a new connection could not be built.
    #[error("cannot set up the device for a new connection: {0}")]
    Backend(String),
    /// The vhost-user daemon could not be created.
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
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
}

impl ServeOptions {
    /// Options with a 500 ms reconnect delay and a fresh stop flag.
    pub fn new(name: impl Into<String>, transport: Transport) -> Self {
        ServeOptions {
            name: name.into(),
            transport,
            reconnect_delay: Duration::from_millis(500),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Serves one front-end after another until `opts.stop` is set.
///
/// `make_backend` is called once per connection. Its backend's `exit_event` must hand out
/// clones of one fixed event pair per thread: after a connection ends the daemon signals them
/// so the connection's worker threads finish. `on_disconnect` runs after each connection.
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
    let mut listener = match &opts.transport {
        Transport::Listen(path) => {
            Some(
                Listener::new(path, true).map_err(|source| DaemonError::Listen {
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
        let backend = make_backend().map_err(DaemonError::Backend)?;
        let mem = GuestMemoryAtomic::new(Memory::new());
        let mut daemon = VhostUserDaemon::new(opts.name.clone(), backend.clone(), mem)
            .map_err(DaemonError::Daemon)?;
        let started = match (&mut listener, &opts.transport) {
            (Some(l), _) => daemon.start(l),
            (None, Transport::Connect(path)) => daemon.start_client(&path.to_string_lossy()),
            (None, Transport::Listen(_)) => unreachable!("listen mode always has a listener"),
        };
        match started {
            Ok(()) => {
                waiting_logged = false;
                log::info!("{}: front-end connected", opts.name);
                match daemon.wait() {
                    Ok(()) => log::info!("{}: front-end disconnected", opts.name),
                    Err(e) => log::warn!("{}: connection ended: {e}", opts.name),
                }
            }
            Err(e) => {
                if listener.is_some() {
                    log::warn!("{}: failed to accept a front-end: {e}", opts.name);
                } else if !waiting_logged {
                    log::info!("{}: front-end not reachable yet ({e}); retrying", opts.name);
                    waiting_logged = true;
                }
                stop_workers(&backend);
                thread::sleep(opts.reconnect_delay);
                continue;
            }
        }
        stop_workers(&backend);
        on_disconnect();
        if listener.is_none() {
            thread::sleep(opts.reconnect_delay);
        }
    }
    Ok(())
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
