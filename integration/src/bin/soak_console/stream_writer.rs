//! The QEMU side of a stream-mode console: what `-chardev socket,path=SOCK,reconnect-ms=N`
//! with a guest printing to its serial port does. It dials the backend's stream socket,
//! writes numbered lines (4 KiB at a time, at a set rate), and when the backend goes away it
//! waits `reconnect` and dials again, as QEMU's reconnect timer does. What the guest would
//! print while no backend is connected QEMU drops; this writer simply produces nothing then.
//!
//! Each connection is one [`Session`]. Its `accepted` count is what the backend has
//! certainly read out of the socket (`written - SIOCOUTQ`, see `soak::socket`), sampled
//! after every write and while waiting: the writer's acknowledgement.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::soak::lines::{fill_lines, Session, Sessions, CHUNK_LEN, LINE_LEN};
use devshare_integration::soak::pace::Pacer;
use devshare_integration::soak::socket::{peer_gone, unread_by_peer, wait_writable};

/// What the writer thread and the soak share.
#[derive(Default)]
pub struct WriterState {
    /// One per connection, in order.
    pub sessions: Sessions,
    /// Connections made so far.
    pub connects: AtomicU64,
    /// When the last connection was made.
    pub connected_at: Mutex<Option<Instant>>,
    /// Stop writing new lines (the connection stays).
    pub pause: AtomicBool,
    /// Close the connection once everything written was read, then dial again (a QEMU
    /// restart, with the backend staying up).
    pub reconnect: AtomicBool,
    /// End the thread.
    pub quit: AtomicBool,
    /// Whether the current connection is established.
    pub connected: AtomicBool,
}

impl WriterState {
    /// The sessions, locked.
    pub fn sessions(&self) -> MutexGuard<'_, Vec<Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Global offset after the last byte written so far.
    pub fn end(&self) -> u64 {
        self.sessions().last().map_or(0, Session::end)
    }
}

/// A running writer.
pub struct StreamWriter {
    /// Shared state.
    pub state: Arc<WriterState>,
    thread: Option<thread::JoinHandle<()>>,
}

impl StreamWriter {
    /// Starts dialing `path`; `rate` bytes per second (0: as fast as the backend reads).
    pub fn start(path: PathBuf, reconnect: Duration, rate: u64) -> StreamWriter {
        let state = Arc::new(WriterState::default());
        let s = state.clone();
        let thread = thread::Builder::new()
            .name("stream-writer".into())
            .spawn(move || run(&s, &path, reconnect, rate))
            .ok();
        StreamWriter { state, thread }
    }

    /// Ends the thread (closing its connection).
    pub fn stop(&mut self) {
        self.state.quit.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(state: &WriterState, path: &PathBuf, reconnect: Duration, rate: u64) {
    let mut pacer = Pacer::new(rate, CHUNK_LEN as u64 * 4);
    let mut next_seq = 0u64;
    let mut chunk = vec![0u8; CHUNK_LEN];
    while !state.quit.load(Ordering::Acquire) {
        let Ok(stream) = UnixStream::connect(path) else {
            thread::sleep(reconnect);
            continue;
        };
        if stream.set_nonblocking(true).is_err() {
            thread::sleep(reconnect);
            continue;
        }
        let index = {
            let mut s = state.sessions();
            s.push(Session {
                first_seq: next_seq,
                ..Session::default()
            });
            s.len() - 1
        };
        *state.connected_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        state.connected.store(true, Ordering::Release);
        state.connects.fetch_add(1, Ordering::AcqRel);
        let (chunk_seq, offset) = session(state, stream, index, next_seq, &mut chunk, &mut pacer);
        state.connected.store(false, Ordering::Release);
        state.sessions()[index].closed = true;
        // A line cut short stays cut: the next connection starts on a fresh line.
        next_seq = chunk_seq + (offset as u64).div_ceil(LINE_LEN as u64);
        if !state.quit.load(Ordering::Acquire) {
            thread::sleep(reconnect);
        }
    }
}

/// One connection, until the backend goes away or the soak asks to reconnect or quit.
/// Returns the line the unfinished chunk starts with and how much of it was written.
fn session(
    state: &WriterState,
    mut stream: UnixStream,
    index: usize,
    first_seq: u64,
    chunk: &mut [u8],
    pacer: &mut Pacer,
) -> (u64, usize) {
    let fd = stream.as_raw_fd();
    let mut chunk_seq = first_seq;
    fill_lines(chunk, chunk_seq);
    let mut offset = 0usize;
    let mut written = 0u64;
    let update = |written: u64, accepted: Option<u64>| {
        let mut s = state.sessions();
        let sess = &mut s[index];
        sess.written = written;
        if let Some(a) = accepted {
            sess.accepted = sess.accepted.max(a.min(written));
        }
    };
    loop {
        if state.quit.load(Ordering::Acquire) {
            return (chunk_seq, offset);
        }
        // The acknowledgement: what the backend has read of what was written.
        let unread = match unread_by_peer(fd) {
            Ok(Some(u)) => u,
            _ => return (chunk_seq, offset),
        };
        update(written, Some(written.saturating_sub(unread)));
        if state.reconnect.load(Ordering::Acquire) && offset == 0 {
            if unread == 0 {
                // Everything was read: close, as a QEMU that is shut down would.
                state.reconnect.store(false, Ordering::Release);
                return (chunk_seq, offset);
            }
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        if state.pause.load(Ordering::Acquire) && offset == 0 {
            if matches!(peer_gone(fd), Ok(true) | Err(_)) {
                return (chunk_seq, offset);
            }
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        if offset == 0 {
            if let Some(wait) = pacer.take(CHUNK_LEN as u64) {
                thread::sleep(wait.min(Duration::from_millis(2)));
                continue;
            }
        }
        match stream.write(&chunk[offset..]) {
            Ok(n) => {
                offset += n;
                written += n as u64;
                update(written, None);
                if offset == chunk.len() {
                    chunk_seq += (chunk.len() / LINE_LEN) as u64;
                    fill_lines(chunk, chunk_seq);
                    offset = 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait_writable(fd, 2).is_err() {
                    return (chunk_seq, offset);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (chunk_seq, offset),
        }
    }
}
