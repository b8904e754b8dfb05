//! Counters updated on the data path and served, as JSON, on a Unix socket while running.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

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

/// How long one stats client may take to read its document before it is dropped: a client
/// that connects and never reads must not stop the others from being served.
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause after failed `accept` calls in a row (out of file descriptors or memory):
/// the pending connection stays, and accepting again at once would spin.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Serves `snapshot()` (a JSON document) to every client of the Unix socket at `path`, then
/// closes that connection. Runs on its own thread for the life of the process. The socket is
/// made by [`crate::listen::listen`] with `socket`'s mode and group: a live stats socket of
/// another process, or anything that is not a socket, at `path` is refused, never replaced.
/// A client that does not read its document within [`CLIENT_WRITE_TIMEOUT`] is dropped; an
/// `accept` that fails is retried after a pause that grows (logged once per run of failures).
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
            let mut pause: Option<Duration> = None;
            for conn in listener.incoming() {
                match conn {
                    Ok(mut c) => {
                        if pause.take().is_some() {
                            log::info!("stats socket {}: accepting again", path.display());
                        }
                        let mut doc = snapshot();
                        doc.push('\n');
                        let sent = c
                            .set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))
                            .and_then(|()| c.write_all(doc.as_bytes()));
                        if let Err(e) = sent {
                            log::debug!("stats client on {} dropped: {e}", path.display());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let wait = match pause {
                            None => {
                                log::warn!(
                                    "stats socket {}: {e}; retrying with pauses",
                                    path.display()
                                );
                                Duration::from_millis(10)
                            }
                            Some(p) => (p * 2).min(ACCEPT_PAUSE_MAX),
                        };
                        pause = Some(wait);
                        thread::sleep(wait);
                    }
                }
            }
        })
        .map_err(StatsError::Thread)?;
    Ok(())
}

/// How long [`query`] waits for the whole snapshot: [`serve_json`] writes it at once.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest snapshot [`query`] reads (thousands of ports fit in far less).
pub const QUERY_MAX_BYTES: u64 = 16 << 20;

/// Reads one snapshot from a stats socket served by [`serve_json`], waiting at most
/// [`QUERY_TIMEOUT`] in all and reading at most [`QUERY_MAX_BYTES`].
///
/// # Errors
/// The connect or read error; `TimedOut` when the socket accepts but does not answer in time
/// (not a backend's stats socket, or a stuck one); `InvalidData` for an answer too large or
/// not UTF-8.
pub fn query(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let s = UnixStream::connect(path)?;
    let deadline = std::time::Instant::now() + QUERY_TIMEOUT;
    let timed_out = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no complete answer within {}s (is this a backend's stats socket?)",
                QUERY_TIMEOUT.as_secs()
            ),
        )
    };
    let mut reader = (&s).take(QUERY_MAX_BYTES + 1);
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        s.set_read_timeout(Some(left))?;
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if out.len() as u64 > QUERY_MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("answer larger than {QUERY_MAX_BYTES} bytes"),
        ));
    }
    String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_client_that_never_reads_does_not_stop_the_others() {
        let _serial = crate::process_state_lock();
        let dir = std::env::temp_dir().join(format!("ds-stats-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.sock");
        // A document far larger than a socket buffer.
        let doc = format!("\"{}\"", "x".repeat(8 << 20));
        let len = doc.len() + 1;
        serve_json(&path, &SocketOptions::default(), move || doc.clone()).unwrap();
        let stalled = UnixStream::connect(&path).unwrap();
        let mut reader = UnixStream::connect(&path).unwrap();
        reader
            .set_read_timeout(Some(CLIENT_WRITE_TIMEOUT * 10))
            .unwrap();
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), len, "the second client was not served");
        drop(stalled);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
