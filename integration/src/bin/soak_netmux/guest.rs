//! A guest on one netmux port, played by the frontend harness: a virtio-net driver that sends
//! numbered frames to its peer at a steady rate and checks the frames it receives, and a QEMU
//! with `reconnect-ms` that dials the port's socket again when netmux went away (its queues
//! resume at the used index, as QEMU resumes them when GET_VRING_BASE could not be asked).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use devshare_integration::frontend::{
    Connection, DriverQueue, Error as FrontendError, GuestBuffer, GuestRam, Negotiated, Segment,
    VhostUserProtocolFeatures, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use devshare_integration::soak::pace::Pacer;
use devshare_integration::soak::socket::peer_gone;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

use crate::frames::{build, parse, Received, FRAME_LEN, HDR};

/// Ring size of both queues (netmux's largest): 1024 receive buffers last a tenth of a second
/// at 10,000 frames/s, so a guest thread that a busy machine does not schedule for a while
/// does not make netmux drop (it would count them: rx_no_buffer).
const QUEUE_SIZE: u16 = 1024;
/// Receive buffer size.
const RX_BUF: u32 = 2048;

/// What the guest thread and the soak share. Counts are frames.
pub struct GuestState {
    /// This guest's index (its MAC derives from it).
    pub index: usize,
    /// Frames put in the transmit ring; the next frame's number.
    pub submitted: AtomicU64,
    /// Transmit chains netmux marked used (frames it took).
    pub sent: AtomicU64,
    /// Frames received.
    pub received: AtomicU64,
    /// Frames received whose number was not above the last one from the same sender.
    pub duplicates: AtomicU64,
    /// Frames skipped over (numbers missing between two received ones).
    pub missing: AtomicU64,
    /// Soak frames that were not what was sent.
    pub corrupt: AtomicU64,
    /// Frames that were no soak frames (from the uplink's wire).
    pub foreign: AtomicU64,
    /// The last frame number received from each sender.
    last_from: Mutex<Vec<Option<u64>>>,
    /// Connections made (the first included).
    pub connects: AtomicU64,
    /// Stop sending.
    pub pause: AtomicBool,
    /// Stop the queues (GET_VRING_BASE), close, and connect again (a QEMU restart with netmux
    /// staying up).
    pub reconnect: AtomicBool,
    /// End the thread.
    pub quit: AtomicBool,
    /// Why the thread gave up, if it did.
    error: Mutex<Option<String>>,
    /// The first corrupt frame, for the report.
    first_corrupt: Mutex<Option<String>>,
    /// Passes of the guest's loop (each looks at both rings once).
    passes: AtomicU64,
}

impl GuestState {
    fn new(index: usize, guests: usize) -> GuestState {
        GuestState {
            index,
            submitted: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            last_from: Mutex::new(vec![None; guests]),
            connects: AtomicU64::new(0),
            pause: AtomicBool::new(false),
            reconnect: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            error: Mutex::new(None),
            first_corrupt: Mutex::new(None),
            passes: AtomicU64::new(0),
        }
    }

    /// Passes of the guest's loop so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
    }

    /// The last frame number received from guest `src`.
    pub fn last_from(&self, src: usize) -> Option<u64> {
        self.last_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(src)
            .copied()
            .flatten()
    }

    /// Why the thread gave up, if it did.
    pub fn error(&self) -> MutexGuard<'_, Option<String>> {
        self.error.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first corrupt frame seen.
    pub fn first_corrupt(&self) -> Option<String> {
        self.first_corrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count_received(&self, src: usize, seq: u64) {
        self.received.fetch_add(1, Ordering::AcqRel);
        let mut last = self.last_from.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = last.get_mut(src) else {
            return;
        };
        match *slot {
            Some(l) if seq <= l => {
                self.duplicates.fetch_add(1, Ordering::AcqRel);
                return;
            }
            Some(l) => {
                self.missing.fetch_add(seq - l - 1, Ordering::AcqRel);
            }
            None => {
                self.missing.fetch_add(seq, Ordering::AcqRel);
            }
        }
        *slot = Some(seq);
    }
}

/// A running guest.
pub struct HarnessGuest {
    /// Shared state.
    pub state: Arc<GuestState>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HarnessGuest {
    /// Guest `index` of `guests` on the port socket `path`, sending to guest `peer` at `rate`
    /// frames per second; after losing netmux it dials again every `reconnect`.
    pub fn start(
        index: usize,
        guests: usize,
        peer: usize,
        path: PathBuf,
        reconnect: Duration,
        rate: u64,
    ) -> HarnessGuest {
        let state = Arc::new(GuestState::new(index, guests));
        let s = state.clone();
        let thread = thread::Builder::new()
            .name(format!("guest-{index}"))
            .spawn(move || {
                if let Err(e) = run(&s, peer, &path, reconnect, rate) {
                    *s.error() = Some(e);
                }
            })
            .ok();
        HarnessGuest { state, thread }
    }

    /// Ends the thread.
    pub fn stop(&mut self) {
        self.state.quit.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HarnessGuest {
    fn drop(&mut self) {
        self.stop();
    }
}

fn features() -> u64 {
    1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | VHOST_USER_F_PROTOCOL_FEATURES
}

/// One vhost-user session: negotiate, hand over the memory and both queues, and wait until
/// netmux has taken them all (its reply to a later request: it handles messages in order).
fn attach(
    conn: &mut Connection,
    ram: &GuestRam,
    rx: &mut DriverQueue,
    tx: &mut DriverQueue,
) -> Result<Negotiated, FrontendError> {
    // netmux answers GET_QUEUE_NUM in queue pairs, as QEMU's vhost-user-net reads it.
    conn.device_counts_queue_pairs();
    let agreed = conn.handshake(
        features(),
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
    )?;
    conn.set_mem_table(ram)?;
    conn.attach_queue(rx)?;
    conn.attach_queue(tx)?;
    conn.get_features()?;
    Ok(agreed)
}

/// Dials `path` every `every` until a netmux takes the port over.
fn dial(
    state: &GuestState,
    path: &PathBuf,
    every: Duration,
    ram: &GuestRam,
    rx: &mut DriverQueue,
    tx: &mut DriverQueue,
) -> Result<Connection, String> {
    loop {
        if state.quit.load(Ordering::Acquire) {
            return Err("quit while reconnecting".into());
        }
        let Ok(mut conn) = Connection::connect_timeout(path, Duration::ZERO) else {
            thread::sleep(every);
            continue;
        };
        match attach(&mut conn, ram, rx, tx) {
            Ok(agreed) if !agreed.has(VIRTIO_RING_F_EVENT_IDX) => {
                return Err("netmux did not agree to EVENT_IDX, which the rings use".into())
            }
            Ok(_) => {}
            Err(_) => {
                // netmux went away again while being set up.
                thread::sleep(every);
                continue;
            }
        }
        rx.kick().map_err(|e| e.to_string())?;
        tx.kick().map_err(|e| e.to_string())?;
        state.connects.fetch_add(1, Ordering::AcqRel);
        return Ok(conn);
    }
}

fn run(
    state: &GuestState,
    peer: usize,
    path: &PathBuf,
    every: Duration,
    rate: u64,
) -> Result<(), String> {
    let me = state.index;
    let e = |e: FrontendError| e.to_string();
    let ram = GuestRam::new(8 << 20).map_err(e)?;
    let cfg = |index| devshare_integration::frontend::QueueConfig {
        index,
        size: QUEUE_SIZE,
        event_idx: true,
        indirect_max: 0,
    };
    let mut rx = DriverQueue::new(&ram, cfg(0)).map_err(e)?;
    let mut tx = DriverQueue::new(&ram, cfg(1)).map_err(e)?;
    // Receive buffers first: posted before netmux sees the ring, and re-posted as used.
    let rx_bufs: Vec<GuestBuffer> = (0..QUEUE_SIZE)
        .map(|_| ram.alloc(RX_BUF))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut rx_by_head = vec![0usize; usize::from(QUEUE_SIZE)];
    for (i, b) in rx_bufs.iter().enumerate() {
        let head = rx.add_chain(&[Segment::writable(*b)]).map_err(e)?;
        rx_by_head[usize::from(head)] = i;
    }
    let tx_bufs: Vec<GuestBuffer> = (0..QUEUE_SIZE)
        .map(|_| ram.alloc((HDR + FRAME_LEN) as u32))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut tx_free: Vec<usize> = (0..tx_bufs.len()).collect();
    let mut tx_by_head = vec![0usize; usize::from(QUEUE_SIZE)];
    let mut conn = dial(state, path, every, &ram, &mut rx, &mut tx)?;
    let mut pacer = Pacer::new(rate, 64);
    let mut frame = vec![0u8; HDR + FRAME_LEN];
    let mut rx_bytes = vec![0u8; RX_BUF as usize];
    while !state.quit.load(Ordering::Acquire) {
        if matches!(
            peer_gone(conn.frontend_mut().as_raw_fd()),
            Ok(true) | Err(_)
        ) {
            // netmux died: QEMU's reconnect timer fires after reconnect-ms.
            thread::sleep(every);
            conn = dial(state, path, every, &ram, &mut rx, &mut tx)?;
        }
        if state.reconnect.load(Ordering::Acquire) {
            // A clean stop, as QEMU does when the VM stops: GET_VRING_BASE on both queues.
            conn.stop_queue(&mut rx).map_err(e)?;
            conn.stop_queue(&mut tx).map_err(e)?;
            let placeholder = UnixStream::pair().map_err(|x| x.to_string())?.0;
            std::mem::replace(&mut conn, Connection::from_stream(placeholder)).disconnect();
            conn = dial(state, path, every, &ram, &mut rx, &mut tx)?;
            state.reconnect.store(false, Ordering::Release);
        }
        let mut busy = false;
        // Transmit, at the rate.
        let mut added = false;
        while !state.pause.load(Ordering::Acquire) && !tx_free.is_empty() {
            if pacer.take(1).is_some() {
                break;
            }
            let Some(b) = tx_free.pop() else { break };
            let seq = state.submitted.load(Ordering::Acquire);
            build(&mut frame, me, peer, seq);
            ram.fill(tx_bufs[b], &frame).map_err(e)?;
            let head = tx.add_chain(&[Segment::readable(tx_bufs[b])]).map_err(e)?;
            tx_by_head[usize::from(head)] = b;
            state.submitted.store(seq + 1, Ordering::Release);
            added = true;
        }
        if added {
            tx.kick().map_err(e)?;
            busy = true;
        }
        while let Some(u) = tx.poll_used().map_err(e)? {
            tx_free.push(tx_by_head[usize::from(u.head)]);
            state.sent.fetch_add(1, Ordering::AcqRel);
            busy = true;
        }
        // Receive and post the buffers again.
        let mut reposted = false;
        while let Some(u) = rx.poll_used().map_err(e)? {
            let i = rx_by_head[usize::from(u.head)];
            let len = (u.len as usize).min(rx_bytes.len());
            ram.read(rx_bufs[i].addr, &mut rx_bytes[..len]).map_err(e)?;
            match parse(rx_bytes.get(HDR..len).unwrap_or(&[]), me) {
                Ok(Received::Ours { src, seq }) => state.count_received(src, seq),
                Ok(Received::Foreign) => {
                    state.foreign.fetch_add(1, Ordering::AcqRel);
                }
                Err(why) => {
                    if state.corrupt.fetch_add(1, Ordering::AcqRel) == 0 {
                        *state
                            .first_corrupt
                            .lock()
                            .unwrap_or_else(|x| x.into_inner()) = Some(why);
                    }
                }
            }
            let head = rx.add_chain(&[Segment::writable(rx_bufs[i])]).map_err(e)?;
            rx_by_head[usize::from(head)] = i;
            reposted = true;
        }
        if reposted {
            rx.kick().map_err(e)?;
            busy = true;
        }
        state.passes.fetch_add(1, Ordering::AcqRel);
        if !busy {
            thread::sleep(Duration::from_micros(500));
        }
    }
    Ok(())
}
