//! Daemon lifecycle shared by every backend: serve one vhost-user socket for the life of the
//! process, across front-end disconnects and restarts.
//!
//! A backend opens each device's [`FrontendSocket`] at start-up (so a socket that cannot be
//! served stops the process before it runs) and hands [`serve`] that socket and a factory that
//! builds a fresh `VhostUserBackend` for each connection; whatever must outlive a connection
//! (buffers, endpoints, counters) lives in state the factory closes over. In [`Transport::Listen`] mode one listening socket is kept for the
//! whole run, so a QEMU started with `reconnect-ms` finds it again after it restarts; in
//! [`Transport::Connect`] mode (QEMU's `server=on`, as libvirt and OVS use) the daemon dials
//! the front-end and dials again whenever either side went away.

use std::fmt;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::chain::Memory;
use crate::listen::{listen, ListenError, SocketFile, SocketOptions};
use crate::ratelimit::RateLimit;
use crate::relay;
use crate::worker_exit::ExitEventCopies;

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

/// Why a daemon could not serve.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The listening socket could not be created (the error names the path and the cause: a
    /// live process serving it, a file that is not a socket, permissions...).
    #[error(transparent)]
    Listen(#[from] ListenError),
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
    /// Back-off after a failure (a connection that ended in an error, a backend that could not
    /// be built, a failed accept): the first wait, doubled after each further failure in a row.
    pub retry_min: Duration,
    /// Longest back-off between failures in a row.
    pub retry_max: Duration,
    /// Set to stop after the current connection ends.
    pub stop: Arc<AtomicBool>,
    /// The answer to GET_QUEUE_NUM when it is not the number of virtqueues (the vhost-user
    /// library's answer). QEMU's vhost-user-net reads it as queue pairs and refuses a netdev
    /// with more (`you are asking more queues than supported: N`), so a network device sets
    /// its queue pairs here. `None`: the library's answer.
    pub queue_num: Option<u64>,
    /// Fds the first worker thread of every connection also watches (readable, level
    /// triggered), each with its `device_event` (past [`connection_start_event`]): a backend's
    /// own event sources, so one thread serves its kicks and its other fds. The backend must
    /// keep them open while it may be connected.
    pub worker_fds: Vec<(RawFd, u16)>,
    /// How long a new front-end may take to send the header of its first message. QEMU sends
    /// GET_FEATURES at once; a client that connects and says nothing (or only part of a
    /// header) is disconnected after this, so it cannot keep the socket from the real QEMU.
    pub handshake_timeout: Duration,
    /// Whether guest memory whose file can still shrink is refused (the default) or accepted
    /// (`--allow-unsealed-memory`); see [`crate::mem_table`].
    pub unsealed_memory: crate::mem_table::UnsealedMemory,
}

/// The default of [`ServeOptions::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variable that sets [`ServeOptions::handshake_timeout`] in milliseconds
/// (instead of [`DEFAULT_HANDSHAKE_TIMEOUT`]), read by [`ServeOptions::new`]: for a host where
/// the front-end is known to be slow, and for tests.
pub const HANDSHAKE_TIMEOUT_ENV: &str = "DEVSHARE_HANDSHAKE_TIMEOUT_MS";

fn handshake_timeout_from_env() -> Duration {
    match std::env::var(HANDSHAKE_TIMEOUT_ENV) {
        Err(_) => DEFAULT_HANDSHAKE_TIMEOUT,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                log::warn!(
                    "{HANDSHAKE_TIMEOUT_ENV}={v:?} is not a positive number of milliseconds; \
                     using {DEFAULT_HANDSHAKE_TIMEOUT:?}"
                );
                DEFAULT_HANDSHAKE_TIMEOUT
            }
        },
    }
}

impl ServeOptions {
    /// Options with a 500 ms reconnect delay, a 100 ms to 5 s back-off, a fresh stop flag and
    /// the handshake timeout of [`HANDSHAKE_TIMEOUT_ENV`] (10 s when unset).
    pub fn new(name: impl Into<String>, transport: Transport) -> Self {
        ServeOptions {
            handshake_timeout: handshake_timeout_from_env(),
            name: name.into(),
            transport,
            reconnect_delay: Duration::from_millis(500),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            stop: Arc::new(AtomicBool::new(false)),
            queue_num: None,
            worker_fds: Vec::new(),
            unsealed_memory: crate::mem_table::UnsealedMemory::Refuse,
        }
    }
}

/// The front-end side of one device's socket, opened once for the life of the process.
#[derive(Debug)]
pub enum FrontendSocket {
    /// This process listens (the socket file is removed when this is dropped).
    Listening(UnixListener, SocketFile),
    /// This process connects to a front-end listening on this path.
    Connecting(PathBuf),
}

impl FrontendSocket {
    /// Opens `transport`: in listen mode creates the socket now through
    /// [`crate::listen::listen`] (so a second instance, or a file in the way, is refused at
    /// start-up, before any thread runs); in connect mode only records the path.
    ///
    /// # Errors
    /// [`DaemonError::Listen`] naming the path.
    pub fn open(transport: &Transport, socket: &SocketOptions) -> Result<Self, DaemonError> {
        Ok(match transport {
            Transport::Listen(path) => {
                let (l, f) = listen(path, socket)?;
                FrontendSocket::Listening(l, f)
            }
            Transport::Connect(path) => FrontendSocket::Connecting(path.clone()),
        })
    }

    fn next(&self) -> io::Result<UnixStream> {
        match self {
            FrontendSocket::Listening(l, _) => l.accept().map(|(s, _)| s),
            FrontendSocket::Connecting(path) => UnixStream::connect(path),
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

/// What a new front-end did within [`ServeOptions::handshake_timeout`].
#[derive(Debug, PartialEq)]
enum FirstMessage {
    /// A whole message header is waiting.
    Arrived,
    /// It hung up without a message.
    HungUp,
    /// It sent nothing (or part of a header) in time.
    TimedOut,
}

/// Waits until `s` holds a whole vhost-user header (12 bytes, peeked: the relay reads it),
/// the peer hangs up, or `timeout` passes.
fn wait_first_message(s: &UnixStream, timeout: Duration) -> io::Result<FirstMessage> {
    const HEADER: usize = 12;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(FirstMessage::TimedOut);
        }
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, and the count says one.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut header = [0u8; HEADER];
        // SAFETY: the buffer is valid for writes of its length; MSG_PEEK leaves the bytes (and
        // any descriptors) queued for the relay.
        let got = unsafe {
            libc::recv(
                s.as_raw_fd(),
                header.as_mut_ptr().cast(),
                header.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match got {
            0 => return Ok(FirstMessage::HungUp),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    return Err(e);
                }
            }
            n if n as usize >= HEADER => return Ok(FirstMessage::Arrived),
            // Part of a header: the socket stays readable, so poll would return at once. A
            // real front-end sends the rest in the same write; look again shortly.
            _ => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Bounded exponential back-off between failures in a row.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(opts: &ServeOptions) -> Self {
        Backoff {
            min: opts.retry_min,
            max: opts.retry_max.max(opts.retry_min),
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    fn failed(&mut self) -> Duration {
        let d = self
            .min
            .checked_mul(1u32 << self.failures.min(16))
            .map_or(self.max, |d| d.min(self.max));
        self.failures = self.failures.saturating_add(1);
        d
    }

    fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// Serves one front-end after another on `socket` until `opts.stop` is set.
///
/// The policy, the same for every backend: a device's socket keeps being served for the life
/// of the process. A connection that ends in an error, a failed accept or a backend that
/// cannot be built is logged and followed by a bounded back-off ([`ServeOptions::retry_min`]
/// doubling up to [`ServeOptions::retry_max`]; reset by a connection that ends cleanly), never
/// by a busy loop and never by the end of service for that device. In connect mode, a
/// front-end that is not there yet is retried every [`ServeOptions::reconnect_delay`].
///
/// `make_backend` is called once per connection. Its backend's `exit_event` must hand out
/// clones of one fixed event pair per thread: after a connection ends the daemon signals them
/// so the connection's worker threads finish. `on_disconnect` runs after each connection.
/// Every connection's messages pass through [`relay`].
pub fn serve<B, F, D>(
    opts: &ServeOptions,
    socket: &FrontendSocket,
    mut make_backend: F,
    mut on_disconnect: D,
) where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
    F: FnMut() -> Result<B, String>,
    D: FnMut(),
{
    log::info!("{}: {}", opts.name, opts.transport);
    let idle_warnings = RateLimit::standard(format!("{}: silent front-ends", opts.name));
    let mut waiting_logged = false;
    let mut backoff = Backoff::new(opts);
    while !opts.stop.load(Ordering::Acquire) {
        let frontend = match socket.next() {
            Ok(s) => s,
            Err(e) if matches!(socket, FrontendSocket::Connecting(_)) => {
                if !waiting_logged {
                    log::info!("{}: front-end not reachable yet ({e}); retrying", opts.name);
                    waiting_logged = true;
                }
                thread::sleep(opts.reconnect_delay);
                continue;
            }
            Err(e) => {
                let wait = backoff.failed();
                log::warn!(
                    "{}: cannot accept a front-end: {e}; again in {wait:?}",
                    opts.name
                );
                thread::sleep(wait);
                continue;
            }
        };
        waiting_logged = false;
        // Nothing is set up for a front-end until it speaks: one that connects and stays
        // silent must not hold the socket (in listen mode, the real QEMU waits in the backlog).
        let first = wait_first_message(&frontend, opts.handshake_timeout);
        if first.as_ref().ok() != Some(&FirstMessage::Arrived) {
            match first {
                Ok(FirstMessage::TimedOut) => crate::warn_limited!(
                    idle_warnings,
                    "{}: a front-end connected but sent no message within {:?}; disconnected it",
                    opts.name,
                    opts.handshake_timeout
                ),
                Ok(_) => log::debug!(
                    "{}: a front-end hung up before its first message",
                    opts.name
                ),
                Err(e) => crate::warn_limited!(
                    idle_warnings,
                    "{}: cannot read a new front-end: {e}; disconnected it",
                    opts.name
                ),
            }
            drop(frontend);
            if matches!(socket, FrontendSocket::Connecting(_)) {
                thread::sleep(opts.reconnect_delay);
            }
            continue;
        }
        let backend = match make_backend() {
            Ok(b) => b,
            Err(e) => {
                // The front-end sees the connection close; QEMU with reconnect-ms comes back.
                drop(frontend);
                let wait = backoff.failed();
                log::error!(
                    "{}: cannot set up the device for a new connection: {e}; serving again in {wait:?}",
                    opts.name
                );
                thread::sleep(wait);
                continue;
            }
        };
        log::info!("{}: front-end connected", opts.name);
        let failed = match run_connection(opts, frontend, backend.clone()) {
            Err(e) => {
                log::warn!("{}: connection ended: {e}", opts.name);
                true
            }
            Ok(()) => {
                log::info!("{}: front-end disconnected", opts.name);
                false
            }
        };
        stop_workers(&backend);
        on_disconnect();
        if failed {
            let wait = backoff.failed();
            log::debug!("{}: serving again in {wait:?}", opts.name);
            thread::sleep(wait);
        } else {
            backoff.succeeded();
            if matches!(socket, FrontendSocket::Connecting(_)) {
                thread::sleep(opts.reconnect_delay);
            }
        }
    }
}

fn run_connection<B>(opts: &ServeOptions, frontend: UnixStream, backend: B) -> io::Result<()>
where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    let name = opts.name.as_str();
    let mem = GuestMemoryAtomic::new(Memory::new());
    let num_queues = backend.num_queues();
    // Declared before the daemon: on every way out it is dropped after it (see worker_exit).
    let mut exit_copies = ExitEventCopies::new(&backend);
    // The library names a thread after it.
    let mut daemon = VhostUserDaemon::new(crate::thread_name(name), backend, mem)
        .map_err(|e| io::Error::other(e.to_string()))?;
    // The library's end of the relay, reachable by this process only (see PrivateListener).
    let private = relay::PrivateListener::new()?;
    let inner = UnixStream::connect(private.path())?;
    let mut listener = Listener::from(private.listener.try_clone()?);
    daemon
        .start(&mut listener)
        .map_err(|e| io::Error::other(e.to_string()))?;
    // Accepted: nothing else can ever connect to the library now.
    drop(listener);
    drop(private);
    exit_copies.find_in(daemon.get_epoll_handlers().iter().map(|h| h.as_raw_fd()));
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
    if let Some(first) = daemon.get_epoll_handlers().first() {
        for &(fd, event) in &opts.worker_fds {
            first.register_listener(fd, EventSet::IN, u64::from(event))?;
        }
    }

    let to_daemon = {
        let (from, to) = (frontend.try_clone()?, inner.try_clone()?);
        let vm = name.to_string();
        let unsealed = opts.unsealed_memory;
        thread::Builder::new()
            .name(crate::thread_name(&format!("{name}-relay")))
            .spawn(move || {
                let r = relay::relay_frontend_messages(&vm, &from, &to, unsealed);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                r
            })?
    };
    let to_frontend = {
        let (from, to) = (inner.try_clone()?, frontend.try_clone()?);
        let queue_num = opts.queue_num;
        thread::Builder::new()
            .name(crate::thread_name(&format!("{name}-reply")))
            .spawn(move || {
                // Replies carry no descriptors for the features these devices offer.
                if let Err(e) = relay::relay_backend_replies(&from, &to, queue_num) {
                    log::debug!("reply relay: {e}");
                }
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
            })?
    };
    let res = match daemon.wait() {
        // The front-end hung up (QEMU stopped or restarted): how a connection normally ends,
        // not a failure to back off from.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        r => r.map_err(|e| io::Error::other(e.to_string())),
    };
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = inner.shutdown(Shutdown::Both);
    let relayed = to_daemon.join();
    let _ = to_frontend.join();
    drop(start_fds);
    drop(daemon);
    let closed = exit_copies.close_taken();
    log::debug!("{name}: closed {closed} exit-event descriptors the library left behind");
    match relayed {
        // What the relay refused is the cause, whatever the library made of the hang-up.
        Ok(Err(e @ relay::RelayError::Refused { .. })) => Err(io::Error::other(e.to_string())),
        Ok(Err(e)) => {
            log::debug!("{name}: relay: {e}");
            res
        }
        _ => res,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;
    use vmm_sys_util::event::{EventConsumer, EventNotifier};

    use crate::idle_backend::Idle;

    #[test]
    fn backoff_doubles_up_to_its_bound_and_resets() {
        let mut opts = ServeOptions::new("t", Transport::Listen("/x".into()));
        opts.retry_min = Duration::from_millis(100);
        opts.retry_max = Duration::from_secs(1);
        let mut b = Backoff::new(&opts);
        let waits: Vec<u128> = (0..7).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
        for _ in 0..100 {
            b.failed(); // never overflows, never exceeds the bound
        }
        assert_eq!(b.failed(), Duration::from_secs(1));
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(100));
    }

    /// GET_FEATURES (request 1) and its reply: the device answered.
    fn features_answered(path: &Path) -> bool {
        let Ok(mut s) = UnixStream::connect(path) else {
            return false;
        };
        // Generous: only a device that is not served (or backs off) misses it.
        if s.set_read_timeout(Some(Duration::from_secs(10))).is_err() {
            return false;
        }
        let mut msg = [0u8; 12];
        msg[0] = 1;
        msg[4] = 1; // version 1
        if s.write_all(&msg).is_err() {
            return false;
        }
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply).is_ok() && reply[12..20] == (1u64 << 32 | 1 << 30).to_le_bytes()
    }

    #[test]
    fn a_failing_backend_factory_is_retried_and_the_socket_stays_served() {
        let _serial = crate::process_state_lock();
        let dir = std::env::temp_dir().join(format!("ds-daemon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.sock");
        let transport = Transport::Listen(path.clone());
        let mut opts = ServeOptions::new("t", transport.clone());
        opts.retry_min = Duration::from_millis(1);
        let socket = FrontendSocket::open(&transport, &SocketOptions::default()).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        thread::spawn(move || {
            serve(
                &opts,
                &socket,
                || {
                    // Fails for the first three connections, as a backend short of a resource.
                    if c.fetch_add(1, Ordering::SeqCst) < 3 {
                        Err("no eventfd left".to_string())
                    } else {
                        Ok(Idle(None))
                    }
                },
                || {},
            )
        });
        let mut answered = false;
        for _ in 0..4 {
            answered = features_answered(&path);
        }
        assert!(answered, "the device stopped being served");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    /// A worker exit event, as the backends make one (the library's workers, and with them
    /// the end of a connection, wait for it).
    fn exit_pair() -> (EventConsumer, EventNotifier) {
        vmm_sys_util::event::new_event_consumer_and_notifier(
            vmm_sys_util::event::EventFlag::NONBLOCK,
        )
        .unwrap()
    }

    /// Serves `backend` on a new socket in a thread of its own; returns the socket's path.
    fn serve_in_thread(
        tag: &str,
        opts_of: impl FnOnce(&mut ServeOptions),
        backend: Idle,
    ) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ds-daemon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.sock");
        let transport = Transport::Listen(path.clone());
        let mut opts = ServeOptions::new("t", transport.clone());
        opts_of(&mut opts);
        let socket = FrontendSocket::open(&transport, &SocketOptions::default()).unwrap();
        thread::spawn(move || serve(&opts, &socket, || Ok(backend.clone()), || {}));
        path
    }

    /// A client that connects and says nothing, or only part of a header, is disconnected
    /// after the handshake timeout, and the real front-end waiting behind it is served.
    #[test]
    fn a_silent_front_end_cannot_hold_the_socket() {
        let _serial = crate::process_state_lock();
        let path = serve_in_thread(
            "silent",
            |o| o.handshake_timeout = Duration::from_millis(200),
            Idle(Some(Arc::new(exit_pair()))),
        );
        let mut silent = UnixStream::connect(&path).unwrap();
        let mut partial = UnixStream::connect(&path).unwrap();
        partial.write_all(&[1, 0, 0]).unwrap();
        assert!(
            features_answered(&path),
            "a front-end behind a silent one was not served"
        );
        // Both were hung up on: reads end (the bound only keeps a broken build from hanging).
        for s in [&mut silent, &mut partial] {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut b = [0u8; 1];
            // A socket closed with unread bytes (the partial header) reads as a reset.
            match s.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("still connected: {other:?}"),
            }
        }
        // And the socket is still served.
        assert!(features_answered(&path));
    }

    /// QEMU restarting is a front-end hanging up: the next one is served at once, with no
    /// back-off (here one of a minute, which a hang-up taken for a failure would wait).
    #[test]
    fn a_front_end_that_hangs_up_is_no_failure_to_back_off_from() {
        let _serial = crate::process_state_lock();
        let path = serve_in_thread(
            "hangup",
            |o| o.retry_min = Duration::from_secs(60),
            Idle(Some(Arc::new(exit_pair()))),
        );
        for round in 0..3 {
            assert!(
                features_answered(&path),
                "front-end {round} was not served within 10 s of the one before hanging up"
            );
        }
    }

    /// vhost-user-backend takes each worker's exit event with `into_raw_fd()` and never closes
    /// it: one descriptor per worker per connection, unless serve() closes it (worker_exit).
    #[test]
    fn connections_leave_no_exit_event_descriptors_behind() {
        let _serial = crate::process_state_lock();
        let exit = Arc::new(exit_pair());
        let event = exit.0.as_raw_fd();
        let path = serve_in_thread(
            "exit-fds",
            |o| o.retry_min = Duration::from_millis(1),
            Idle(Some(exit)),
        );
        // Each answer means the connection before it has ended completely (serve runs one
        // at a time), so the count taken then includes everything earlier connections left.
        let mut copies = Vec::new();
        for _ in 0..6 {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut msg = [0u8; 12];
            msg[0] = 1;
            msg[4] = 1;
            s.write_all(&msg).unwrap();
            let mut reply = [0u8; 20];
            s.read_exact(&mut reply).unwrap();
            copies.push(crate::worker_exit::open_copies(event));
        }
        assert!(copies[0] > 0, "kcmp cannot compare descriptors here");
        assert_eq!(
            copies[5], copies[1],
            "copies of the exit event open during connections 1..6: {copies:?}"
        );
    }
}
