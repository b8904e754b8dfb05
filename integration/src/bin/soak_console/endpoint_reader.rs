//! A client of a console port's `unix:` endpoint (a terminal program, a log collector): it
//! reads everything the backend delivers and feeds it to a [`LineCheck`]. When the backend
//! dies it reads the old connection to its end (what the dead process wrote is still
//! queued there) and then attaches to the new process, which replays its spool.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use devshare_integration::soak::lines::{LineCheck, Sessions};

/// How often a client that lost its endpoint tries again.
const RETRY: Duration = Duration::from_millis(10);
/// What a listener endpoint tells a second client before closing it.
const BUSY: &[u8] = b"port busy\n";

/// What the reader thread and the soak share.
pub struct ReaderState {
    check: Mutex<LineCheck>,
    /// Connections made so far.
    pub connects: AtomicU64,
    /// Connections refused with `port busy` (another client was still attached, as far as
    /// the backend knew).
    pub busy: AtomicU64,
    /// Close the connection once nothing is left to read, then attach again.
    pub reconnect: AtomicBool,
    /// End the thread.
    pub quit: AtomicBool,
}

impl ReaderState {
    /// The check, locked.
    pub fn check(&self) -> MutexGuard<'_, LineCheck> {
        self.check.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running reader.
pub struct EndpointReader {
    /// Shared state.
    pub state: Arc<ReaderState>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EndpointReader {
    /// Starts reading from the endpoint at `path`; `sessions` are the writer's (to place
    /// short fragments), if it has sessions.
    pub fn start(path: PathBuf, sessions: Option<Sessions>) -> EndpointReader {
        EndpointReader::start_with(path, LineCheck::new(sessions))
    }

    /// Starts reading from the endpoint at `path` into `check`.
    pub fn start_with(path: PathBuf, check: LineCheck) -> EndpointReader {
        let state = Arc::new(ReaderState {
            check: Mutex::new(check),
            connects: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            reconnect: AtomicBool::new(false),
            quit: AtomicBool::new(false),
        });
        let s = state.clone();
        let thread = thread::Builder::new()
            .name("endpoint-reader".into())
            .spawn(move || run(&s, &path))
            .ok();
        EndpointReader { state, thread }
    }

    /// Ends the thread.
    pub fn stop(&mut self) {
        self.state.quit.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EndpointReader {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(state: &ReaderState, path: &PathBuf) {
    let mut buf = vec![0u8; 1 << 16];
    while !state.quit.load(Ordering::Acquire) {
        let Ok(mut conn) = UnixStream::connect(path) else {
            thread::sleep(RETRY);
            continue;
        };
        if conn
            .set_read_timeout(Some(Duration::from_millis(20)))
            .is_err()
        {
            thread::sleep(RETRY);
            continue;
        }
        state.connects.fetch_add(1, Ordering::AcqRel);
        // The first bytes of a connection may be the busy notice, which is not port data:
        // they are held in `head` until they cannot be (lines start with 'S').
        let mut head: Option<Vec<u8>> = Some(Vec::new());
        loop {
            if state.quit.load(Ordering::Acquire) {
                return;
            }
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => match &mut head {
                    Some(h) => {
                        h.extend_from_slice(&buf[..n]);
                        if h.as_slice() == BUSY {
                            state.busy.fetch_add(1, Ordering::AcqRel);
                            head = None;
                            thread::sleep(RETRY);
                            break;
                        }
                        if !BUSY.starts_with(h) {
                            state.check().feed(h);
                            head = None;
                        }
                    }
                    None => state.check().feed(&buf[..n]),
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    // Nothing for 20 ms: a good moment for a client restart, if asked for.
                    if state.reconnect.swap(false, Ordering::AcqRel) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        // A connection that ended inside what looked like the busy notice carried data.
        if let Some(h) = head.filter(|h| !h.is_empty()) {
            state.check().feed(&h);
        }
    }
}
