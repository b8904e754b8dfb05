//! A virtio-console guest driver, played by the frontend harness, writing numbered lines on
//! a data port, with a front-end that reconnects after the backend died (QEMU 11's generic
//! vhost-user device cannot, see the README; the harness can, so the backend side can be
//! checked on its own).
//!
//! A transmit chain the backend marked used is accepted: its bytes must reach the port's
//! client exactly once, in order. A chain not yet used when the backend died stays in the
//! ring; after reconnecting, the harness resumes the queue at the used index (what QEMU does
//! when GET_VRING_BASE could not be asked), so the new backend takes it again. Nothing at all
//! may go missing, and nothing may arrive twice.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::console_guest::{port_queues, ConsoleGuest, GuestOptions};
use devshare_integration::frontend::{Connection, GuestBuffer, Segment};
use devshare_integration::soak::lines::{fill_lines, CHUNK_LEN, LINES_PER_CHUNK};
use devshare_integration::soak::pace::Pacer;
use devshare_integration::soak::socket::peer_gone;

/// Ring size of every queue.
const QUEUE_SIZE: u16 = 256;
/// The data port the lines go through (port 0 is the console).
pub const DATA_PORT: usize = 1;
/// Ports the device has.
const PORTS: usize = 2;

/// What the guest thread and the soak share.
#[derive(Default)]
pub struct GuestState {
    /// Lines put in the transmit ring so far.
    pub submitted_lines: AtomicU64,
    /// Every line before this one is in a chain the backend marked used.
    pub accepted_lines: AtomicU64,
    /// Connections made so far (the first included).
    pub connects: AtomicU64,
    /// When the last connection was set up.
    pub connected_at: Mutex<Option<Instant>>,
    /// Stop putting new lines in the ring.
    pub pause: AtomicBool,
    /// Stop the queues (GET_VRING_BASE), close and connect again (a QEMU restart with the
    /// backend staying up).
    pub reconnect: AtomicBool,
    /// End the thread.
    pub quit: AtomicBool,
    /// Why the thread gave up, if it did.
    pub error: Mutex<Option<String>>,
}

impl GuestState {
    /// The error, if any.
    pub fn error(&self) -> MutexGuard<'_, Option<String>> {
        self.error.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running guest.
pub struct VirtioWriter {
    /// Shared state.
    pub state: Arc<GuestState>,
    thread: Option<thread::JoinHandle<()>>,
}

impl VirtioWriter {
    /// Connects to the backend's vhost-user socket `path`, brings the ports up and writes
    /// `rate` bytes per second (0: as fast as the backend takes them).
    pub fn start(path: PathBuf, reconnect: Duration, rate: u64) -> VirtioWriter {
        let state = Arc::new(GuestState::default());
        let s = state.clone();
        let thread = thread::Builder::new()
            .name("virtio-guest".into())
            .spawn(move || {
                if let Err(e) = run(&s, &path, reconnect, rate) {
                    *s.error() = Some(e);
                }
            })
            .ok();
        VirtioWriter { state, thread }
    }

    /// Ends the thread.
    pub fn stop(&mut self) {
        self.state.quit.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VirtioWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn first_connect(state: &GuestState, path: &PathBuf) -> Result<ConsoleGuest, String> {
    let opts = GuestOptions {
        event_idx: true,
        indirect: false,
        multiport: true,
        queue_size: QUEUE_SIZE,
        ram: 16 << 20,
        lenient_used_len: false,
    };
    let mut g = ConsoleGuest::connect(path, opts).map_err(|e| e.to_string())?;
    g.bring_up(PORTS).map_err(|e| e.to_string())?;
    // A guest with the port open is ready for host input too (none comes).
    g.post_rx(DATA_PORT, 8, 4096, 1)
        .map_err(|e| e.to_string())?;
    state.connects.fetch_add(1, Ordering::AcqRel);
    *state.connected_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    Ok(g)
}

/// Dials again until a backend takes the device over: handshake with what was agreed before,
/// the same memory, every queue resumed where the driver stands.
fn reconnect(
    state: &GuestState,
    g: &mut ConsoleGuest,
    path: &PathBuf,
    every: Duration,
) -> Result<(), String> {
    loop {
        if state.quit.load(Ordering::Acquire) {
            return Err("quit while reconnecting".into());
        }
        thread::sleep(every);
        let Ok(mut conn) = Connection::connect_timeout(path, Duration::ZERO) else {
            continue;
        };
        let set_up = (|| -> Result<(), devshare_integration::frontend::Error> {
            conn.handshake(g.agreed.acked_features, g.agreed.acked_protocol)?;
            conn.set_mem_table(&g.ram)?;
            for q in g.queues.iter_mut() {
                conn.attach_queue(q)?;
            }
            Ok(())
        })();
        if set_up.is_err() {
            // The backend went away again while being set up: try again.
            continue;
        }
        g.conn = conn;
        let (_, txq) = port_queues(DATA_PORT);
        if let Some(q) = g.queues.get_mut(usize::from(txq)) {
            q.kick().map_err(|e| e.to_string())?;
        }
        state.connects.fetch_add(1, Ordering::AcqRel);
        *state.connected_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        return Ok(());
    }
}

fn run(state: &GuestState, path: &PathBuf, every: Duration, rate: u64) -> Result<(), String> {
    let mut g = first_connect(state, path)?;
    let (_, txq) = port_queues(DATA_PORT);
    let bufs: Vec<GuestBuffer> = (0..QUEUE_SIZE)
        .map(|_| g.ram.alloc(CHUNK_LEN as u32))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut free: Vec<usize> = (0..bufs.len()).collect();
    // By head: (buffer index, first line of the chain).
    let mut by_head: Vec<Option<(usize, u64)>> = vec![None; usize::from(QUEUE_SIZE)];
    let mut in_flight: BTreeSet<u64> = BTreeSet::new();
    let mut next_seq = 0u64;
    let mut pacer = Pacer::new(rate, CHUNK_LEN as u64 * 4);
    let mut chunk = vec![0u8; CHUNK_LEN];
    let q_err = |e: devshare_integration::console_guest::ConsoleGuestError| e.to_string();
    while !state.quit.load(Ordering::Acquire) {
        if matches!(
            peer_gone(g.conn.frontend_mut().as_raw_fd()),
            Ok(true) | Err(_)
        ) {
            reconnect(state, &mut g, path, every)?;
        }
        if state.reconnect.load(Ordering::Acquire) {
            // A clean stop, as QEMU does when the VM stops: GET_VRING_BASE on every queue.
            for i in 0..g.queues.len() {
                let (conn, q) = (&mut g.conn, &mut g.queues[i]);
                conn.stop_queue(q).map_err(|e| e.to_string())?;
            }
            // Closed before dialing again: the backend serves one front-end at a time.
            let placeholder = UnixStream::pair().map_err(|e| e.to_string())?.0;
            std::mem::replace(&mut g.conn, Connection::from_stream(placeholder)).disconnect();
            reconnect(state, &mut g, path, every)?;
            state.reconnect.store(false, Ordering::Release);
        }
        let mut busy = false;
        let mut added = false;
        while !state.pause.load(Ordering::Acquire) && !free.is_empty() {
            if pacer.take(CHUNK_LEN as u64).is_some() {
                break;
            }
            let Some(b) = free.pop() else { break };
            fill_lines(&mut chunk, next_seq);
            g.ram.fill(bufs[b], &chunk).map_err(|e| e.to_string())?;
            let head = g
                .add_chain(txq, &[Segment::readable(bufs[b])])
                .map_err(q_err)?;
            by_head[usize::from(head)] = Some((b, next_seq));
            in_flight.insert(next_seq);
            next_seq += LINES_PER_CHUNK as u64;
            added = true;
        }
        if added {
            state.submitted_lines.store(next_seq, Ordering::Release);
            g.queue(txq)
                .map_err(q_err)?
                .kick()
                .map_err(|e| e.to_string())?;
            busy = true;
        }
        while let Some(u) = g.poll_tx_used(txq).map_err(q_err)? {
            let Some((b, seq)) = by_head.get_mut(usize::from(u.head)).and_then(Option::take) else {
                return Err(format!("the backend used chain {} twice", u.head));
            };
            free.push(b);
            in_flight.remove(&seq);
            busy = true;
        }
        let accepted = in_flight.first().copied().unwrap_or(next_seq);
        state.accepted_lines.store(accepted, Ordering::Release);
        if !busy {
            thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}
