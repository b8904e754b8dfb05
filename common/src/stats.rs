//! Counters updated on the data path and served, as JSON, on a Unix socket while running.

use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

/// A monotonically increasing counter, cheap enough for every packet. Serializes as its
/// current value (a JSON number), so a struct of counters that derives `serde::Serialize` is
/// its own stats document.
#[derive(Debug, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Counter(AtomicU64);

impl Counter {
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

/// Serves `snapshot()` (a JSON document) to every client of the Unix socket at `path`, then
/// closes that connection. Runs on its own thread for the life of the process.
pub fn serve_json<F>(path: &Path, snapshot: F) -> io::Result<()>
where
    F: Fn() -> String + Send + 'static,
{
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let path: PathBuf = path.to_owned();
    thread::Builder::new().name("stats".into()).spawn(move || {
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
    })?;
    Ok(())
}

/// Reads one snapshot from a stats socket served by [`serve_json`].
pub fn query(path: &Path) -> io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    let mut out = String::new();
    io::Read::read_to_string(&mut s, &mut out)?;
    Ok(out)
}
