//! Counters updated on the data path and served, as JSON, on a Unix socket while running.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use crate::listen::{listen, ListenError, SocketOptions};

/// A monotonically increasing counter, cheap enough for every packet. Serializes as its
/// current value (a JSON number).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl serde::Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

impl Counter {
    /// A counter at zero (usable in statics).
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why the stats socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The socket could not be created (the error names the path).
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The serving thread could not be started.
    #[error("cannot start the stats thread: {0}")]
    Thread(io::Error),
}

/// Serves `snapshot()` (a JSON document) to every client of the Unix socket at `path`, then
/// closes that connection. Runs on its own thread for the life of the process. The socket is
/// made by [`crate::listen::listen`] with `socket`'s mode and group: a live stats socket of
/// another process, or anything that is not a socket, at `path` is refused, never replaced.
///
/// # Errors
/// [`StatsError`] naming the path when the socket or the thread cannot be set up.
pub fn serve_json<F>(path: &Path, socket: &SocketOptions, snapshot: F) -> Result<(), StatsError>
where
    F: Fn() -> String + Send + 'static,
{
    let (listener, file) = listen(path, socket)?;
    let path: PathBuf = path.to_owned();
    thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            // Lives as long as the listener: the path is removed only when serving ends.
            let _file = file;
            for conn in listener.incoming() {
                match conn {
                    Ok(mut c) => {
                        let mut doc = snapshot();
                        doc.push('\n');
                        if let Err(e) = c.write_all(doc.as_bytes()) {
                            log::debug!("stats client on {} went away: {e}", path.display());
                        }
                    }
                    Err(e) => log::warn!("stats socket {}: {e}", path.display()),
                }
            }
        })
        .map_err(StatsError::Thread)?;
    Ok(())
}

/// Reads one snapshot from a stats socket served by [`serve_json`].
pub fn query(path: &Path) -> io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    let mut out = String::new();
    io::Read::read_to_string(&mut s, &mut out)?;
    Ok(out)
}
