//! `console_load`: a polling load generator for virtio-console vhost-user backends
//! (vhost-user-console, or rust-vmm's vhost-device-console for comparison), built on the
//! frontend harness. It plays the guest driver, keeps the rings full without interrupts and
//! prints one JSON line with what it measured. A benchmark, not a test: it passes no verdict.
//!
//! Modes:
//! - `to-endpoint`: the guest writes `--size` chains on `--port`; a client of the port's
//!   host endpoint (`unix:PATH` or `tcp:ADDR:PORT`) reads as fast as it can. MB/s at the client.
//! - `from-endpoint`: the client writes `--size` blocks; the guest keeps `--size` receive
//!   buffers posted. MB/s at the guest.
//! - `link`: two guests, on `--socket` and `--peer-socket`, whose ports the backend links;
//!   the first sends, the second receives. MB/s at the receiver.
//! - `latency`: a `--size` message guest -> endpoint, echoed by the client, back to the guest;
//!   round trips in microseconds.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use devshare_integration::console_guest::{
    port_queues, ConsoleGuest, ConsoleGuestError, GuestOptions,
};
use devshare_integration::frontend::{self, GuestBuffer, Segment};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Guest output read by a client of the port's endpoint (MB/s).
    ToEndpoint,
    /// Client input delivered into guest receive buffers (MB/s).
    FromEndpoint,
    /// One guest to another over a guest-to-guest link (MB/s).
    Link,
    /// Guest -> endpoint -> echoed -> guest round trip (microseconds).
    Latency,
}

/// Drive a virtio-console vhost-user backend as a polling guest driver and print one JSON
/// line of throughput (MB/s, 10^6 bytes) or round-trip latency.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The backend's vhost-user socket of the (sending) guest.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The receiving guest's vhost-user socket (mode link).
    #[arg(long, value_name = "PATH")]
    peer_socket: Option<PathBuf>,
    /// The port's host endpoint: unix:PATH or tcp:ADDR:PORT (all modes but link).
    #[arg(long, value_name = "SPEC")]
    endpoint: Option<String>,
    /// Ports the device announces (all are brought up, as a guest would).
    #[arg(long, default_value_t = 2)]
    ports: usize,
    /// The port carrying the load (0 is the console).
    #[arg(long, default_value_t = 1)]
    port: usize,
    /// Bytes per chain (and per endpoint write); the latency message size in mode latency.
    #[arg(long, default_value_t = 65536)]
    size: u32,
    /// Seconds to measure (after a short warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Ring size of every queue (vhost-device-console accepts at most 128).
    #[arg(long, default_value_t = 128)]
    queue_size: u16,
    /// Use EVENT_IDX (otherwise flag-based notification suppression).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    event_idx: bool,
    /// Backend process id: report its CPU time during the measurement.
    #[arg(long)]
    pid: Option<u32>,
    /// Accept used lengths on transmit chains that exceed their writable part (a quirk of
    /// vhost-device-console, which reports the bytes it read).
    #[arg(long)]
    lenient: bool,
    /// A name for this run, copied into the JSON.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Guest(#[from] ConsoleGuestError),
    #[error(transparent)]
    Frontend(#[from] frontend::Error),
    #[error("endpoint {spec}: {source}")]
    Endpoint { spec: String, source: io::Error },
    #[error("{0}")]
    Usage(String),
    #[error("no progress for {0:?}: the backend stopped taking or delivering data")]
    Stalled(Duration),
}

/// A client of the port's host endpoint.
enum Client {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Client {
    fn connect(spec: &str) -> Result<Client, LoadError> {
        let err = |source| LoadError::Endpoint {
            spec: spec.to_string(),
            source,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = if let Some(path) = spec.strip_prefix("unix:") {
                UnixStream::connect(path).map(Client::Unix)
            } else if let Some(addr) = spec.strip_prefix("tcp:") {
                TcpStream::connect(addr).map(|s| {
                    let _ = s.set_nodelay(true);
                    Client::Tcp(s)
                })
            } else {
                return Err(LoadError::Usage(format!(
                    "endpoint '{spec}' must be unix:PATH or tcp:ADDR:PORT"
                )));
            };
            match r {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() < deadline => {
                    log::debug!("{spec}: {e}; retrying");
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(e)),
            }
        }
    }

    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Client::Unix(s) => s.set_read_timeout(Some(t)),
            Client::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }
}

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Client::Unix(s) => s.read(buf),
            Client::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Client {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Client::Unix(s) => s.write(buf),
            Client::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Printable ASCII, so backends that insist on UTF-8 take it too.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')').map(|(_, r)| r)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// A guest with every port up, its RAM sized for a ring full of `size`-byte buffers.
fn guest(a: &Args, socket: &PathBuf) -> Result<ConsoleGuest, LoadError> {
    let ram = u64::from(a.queue_size) * u64::from(a.size) * 2 + (32 << 20);
    let opts = GuestOptions {
        event_idx: a.event_idx,
        indirect: false,
        multiport: true,
        queue_size: a.queue_size,
        ram,
        lenient_used_len: a.lenient,
    };
    let mut g = ConsoleGuest::connect(socket, opts)?;
    g.bring_up(a.ports)?;
    Ok(g)
}

/// Counts bytes and reports the rate over the measuring window.
struct Window {
    warmup: Duration,
    length: Duration,
}

impl Window {
    fn new(a: &Args) -> Window {
        Window {
            warmup: Duration::from_millis(500),
            length: Duration::from_secs_f64(a.seconds),
        }
    }
}

/// Keeps `q`'s transmit ring full of `bufs` until `stop`, polling. Returns chains completed.
fn transmit_loop(
    g: &mut ConsoleGuest,
    txq: u16,
    bufs: &[GuestBuffer],
    stop: &AtomicBool,
) -> Result<u64, LoadError> {
    g.queue(txq)?.disable_calls();
    let mut next = 0usize;
    let mut done = 0u64;
    let mut idle_since = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let q = g.queue(txq)?;
        let mut added = false;
        while q.free_descriptors() > 0 {
            q.add_chain(&[Segment::readable(bufs[next % bufs.len()])])?;
            next += 1;
            added = true;
        }
        if added {
            q.kick()?;
        }
        let mut any = false;
        while let Some(_u) = g.poll_tx_used(txq)? {
            done += 1;
            any = true;
        }
        if any {
            idle_since = Instant::now();
        } else if idle_since.elapsed() > Duration::from_secs(10) {
            return Err(LoadError::Stalled(Duration::from_secs(10)));
        } else {
            std::hint::spin_loop();
        }
    }
    Ok(done)
}

/// Keeps `rxq` full of receive buffers until `stop`, polling; adds received bytes to `count`.
fn receive_loop(
    g: &mut ConsoleGuest,
    rxq: u16,
    size: u32,
    count: &AtomicU64,
    stop: &AtomicBool,
) -> Result<(), LoadError> {
    let n = usize::from(g.queue(rxq)?.size());
    let bufs: Vec<GuestBuffer> = (0..n)
        .map(|_| g.ram.alloc(size))
        .collect::<Result<_, _>>()?;
    let q = g.queue(rxq)?;
    let mut by_head = vec![0usize; n];
    for (i, b) in bufs.iter().enumerate() {
        let head = q.add_chain(&[Segment::writable(*b)])?;
        by_head[usize::from(head)] = i;
    }
    q.kick()?;
    q.disable_calls();
    while !stop.load(Ordering::Relaxed) {
        let mut any = false;
        while let Some(u) = q.poll_used()? {
            any = true;
            count.fetch_add(u64::from(u.len), Ordering::Relaxed);
            let i = by_head[usize::from(u.head)];
            let head = q.add_chain(&[Segment::writable(bufs[i])])?;
            by_head[usize::from(head)] = i;
        }
        if any {
            q.kick()?;
        } else {
            std::hint::spin_loop();
        }
    }
    Ok(())
}

/// Runs `measure` between warm-up and the end of the window, sampling `count` and the
/// backend's CPU time. Returns (bytes, seconds, backend CPU seconds).
fn measure(a: &Args, count: &AtomicU64) -> (u64, f64, Option<f64>) {
    let w = Window::new(a);
    thread::sleep(w.warmup);
    let c0 = count.load(Ordering::Relaxed);
    let cpu0 = a.pid.and_then(cpu_seconds);
    let t0 = Instant::now();
    thread::sleep(w.length);
    let c1 = count.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu = a.pid.and_then(cpu_seconds).zip(cpu0).map(|(b, a)| b - a);
    (c1 - c0, secs, cpu)
}

fn throughput_json(a: &Args, bytes: u64, secs: f64, cpu: Option<f64>) -> serde_json::Value {
    serde_json::json!({
        "label": a.label,
        "mode": format!("{:?}", a.mode),
        "size": a.size,
        "queue_size": a.queue_size,
        "event_idx": a.event_idx,
        "seconds": secs,
        "bytes": bytes,
        "mb_per_s": bytes as f64 / secs / 1e6,
        "backend_cpu_seconds": cpu,
    })
}

/// Spawns the thread doing the guest side of a throughput run; errors come back through
/// the join handle, and `stop` is raised on error so the others end too.
fn spawn_worker<F>(stop: &Arc<AtomicBool>, f: F) -> thread::JoinHandle<Result<(), LoadError>>
where
    F: FnOnce(&AtomicBool) -> Result<(), LoadError> + Send + 'static,
{
    let stop = stop.clone();
    thread::spawn(move || {
        let r = f(&stop);
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        r
    })
}

fn endpoint(a: &Args) -> Result<String, LoadError> {
    a.endpoint
        .clone()
        .ok_or_else(|| LoadError::Usage(format!("--endpoint is needed for {:?}", a.mode)))
}

fn to_endpoint(a: &Args) -> Result<serde_json::Value, LoadError> {
    let mut client = Client::connect(&endpoint(a)?)?;
    client
        .set_read_timeout(Duration::from_millis(200))
        .map_err(|source| LoadError::Endpoint {
            spec: endpoint(a).unwrap_or_default(),
            source,
        })?;
    let mut g = guest(a, &a.socket)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let reader = {
        let (count, stop) = (count.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while !stop.load(Ordering::Relaxed) {
                match client.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        })
    };
    let data = payload(a.size as usize);
    let n = usize::from(a.queue_size);
    let bufs: Vec<GuestBuffer> = (0..n)
        .map(|_| -> Result<GuestBuffer, LoadError> {
            let b = g.ram.alloc(a.size)?;
            g.ram.fill(b, &data)?;
            Ok(b)
        })
        .collect::<Result<_, _>>()?;
    let (_, txq) = port_queues(a.port);
    let sender = spawn_worker(&stop, move |stop| {
        transmit_loop(&mut g, txq, &bufs, stop).map(|_| ())
    });
    let (bytes, secs, cpu) = measure(a, &count);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap_or(Ok(()));
    let _ = reader.join();
    sent?;
    Ok(throughput_json(a, bytes, secs, cpu))
}

fn from_endpoint(a: &Args) -> Result<serde_json::Value, LoadError> {
    let mut client = Client::connect(&endpoint(a)?)?;
    let mut g = guest(a, &a.socket)?;
    if a.lenient {
        // vhost-device-console drops host input until the guest has written something.
        g.send(a.port, b"\n", 1)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = stop.clone();
        let data = payload(a.size as usize);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if client.write_all(&data).is_err() {
                    break;
                }
            }
        })
    };
    let (rxq, _) = port_queues(a.port);
    let size = a.size;
    let c = count.clone();
    let receiver = spawn_worker(&stop, move |stop| receive_loop(&mut g, rxq, size, &c, stop));
    let (bytes, secs, cpu) = measure(a, &count);
    stop.store(true, Ordering::Relaxed);
    let got = receiver.join().unwrap_or(Ok(()));
    // The writer may be blocked in write(): it ends when this process exits.
    drop(writer);
    got?;
    Ok(throughput_json(a, bytes, secs, cpu))
}

fn link(a: &Args) -> Result<serde_json::Value, LoadError> {
    let peer = a
        .peer_socket
        .clone()
        .ok_or_else(|| LoadError::Usage("--peer-socket is needed for link".into()))?;
    let mut rx_guest = guest(a, &peer)?;
    let mut tx_guest = guest(a, &a.socket)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let (rxq, txq) = port_queues(a.port);
    let size = a.size;
    let c = count.clone();
    let receiver = spawn_worker(&stop, move |stop| {
        receive_loop(&mut rx_guest, rxq, size, &c, stop)
    });
    let data = payload(a.size as usize);
    let bufs: Vec<GuestBuffer> = (0..usize::from(a.queue_size))
        .map(|_| -> Result<GuestBuffer, LoadError> {
            let b = tx_guest.ram.alloc(a.size)?;
            tx_guest.ram.fill(b, &data)?;
            Ok(b)
        })
        .collect::<Result<_, _>>()?;
    let sender = spawn_worker(&stop, move |stop| {
        transmit_loop(&mut tx_guest, txq, &bufs, stop).map(|_| ())
    });
    let (bytes, secs, cpu) = measure(a, &count);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap_or(Ok(()));
    let got = receiver.join().unwrap_or(Ok(()));
    sent?;
    got?;
    Ok(throughput_json(a, bytes, secs, cpu))
}

fn latency(a: &Args) -> Result<serde_json::Value, LoadError> {
    let mut client = Client::connect(&endpoint(a)?)?;
    let mut g = guest(a, &a.socket)?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop.clone();
        client
            .set_read_timeout(Duration::from_millis(100))
            .map_err(|source| LoadError::Endpoint {
                spec: endpoint(a).unwrap_or_default(),
                source,
            })?;
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                match client.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        })
    };
    let (rxq, txq) = port_queues(a.port);
    let msg = payload(a.size as usize);
    let tx_buf = g.ram.alloc(a.size)?;
    g.ram.fill(tx_buf, &msg)?;
    // One receive buffer: a ping-pong has one message in flight, and vhost-device-console
    // swallows every other posted buffer when it delivers input.
    let rx_bufs: Vec<GuestBuffer> = (0..1)
        .map(|_| g.ram.alloc(a.size.max(4096)))
        .collect::<Result<_, _>>()?;
    let mut by_head = vec![0usize; usize::from(a.queue_size)];
    {
        let rx = g.queue(rxq)?;
        for (i, b) in rx_bufs.iter().enumerate() {
            let head = rx.add_chain(&[Segment::writable(*b)])?;
            by_head[usize::from(head)] = i;
        }
        rx.kick()?;
        rx.disable_calls();
    }
    g.queue(txq)?.disable_calls();
    let mut samples: Vec<f64> = Vec::new();
    let w = Window::new(a);
    let start = Instant::now();
    let end = start + w.warmup + w.length;
    while Instant::now() < end {
        let t0 = Instant::now();
        {
            let tx = g.queue(txq)?;
            tx.add_chain(&[Segment::readable(tx_buf)])?;
            tx.kick()?;
        }
        let mut got = 0usize;
        let mut consumed = Vec::new();
        while got < msg.len() {
            let rx = g.queue(rxq)?;
            match rx.poll_used()? {
                Some(u) => {
                    got += u.len as usize;
                    consumed.push(by_head[usize::from(u.head)]);
                    if got < msg.len() {
                        repost(rx, &rx_bufs, &mut by_head, &mut consumed)?;
                    }
                }
                None if t0.elapsed() > Duration::from_secs(10) => {
                    return Err(LoadError::Stalled(Duration::from_secs(10)))
                }
                None => std::hint::spin_loop(),
            }
        }
        let rtt = t0.elapsed();
        // The transmit chain is long done by now; take it back.
        while g.queue(txq)?.in_flight() > 0 {
            if g.poll_tx_used(txq)?.is_none() {
                std::hint::spin_loop();
            }
        }
        // Let the device finish its turn before the buffer comes back (outside the measured
        // time): vhost-device-console swallows a buffer posted while it is still looping.
        thread::sleep(Duration::from_micros(200));
        repost(g.queue(rxq)?, &rx_bufs, &mut by_head, &mut consumed)?;
        if t0 >= start + w.warmup {
            samples.push(rtt.as_secs_f64() * 1e6);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    samples.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[i.min(samples.len() - 1)]
    };
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    Ok(serde_json::json!({
        "label": a.label,
        "mode": "Latency",
        "size": a.size,
        "round_trips": samples.len(),
        "mean_us": mean,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "max_us": pct(1.0),
    }))
}

/// Posts the receive buffers in `consumed` again and kicks.
fn repost(
    rx: &mut frontend::DriverQueue,
    bufs: &[GuestBuffer],
    by_head: &mut [usize],
    consumed: &mut Vec<usize>,
) -> Result<(), LoadError> {
    for i in consumed.drain(..) {
        let head = rx.add_chain(&[Segment::writable(bufs[i])])?;
        by_head[usize::from(head)] = i;
    }
    rx.kick()?;
    Ok(())
}

fn main() -> ExitCode {
    env_logger::init();
    let a = Args::parse();
    let r = match a.mode {
        Mode::ToEndpoint => to_endpoint(&a),
        Mode::FromEndpoint => from_endpoint(&a),
        Mode::Link => link(&a),
        Mode::Latency => latency(&a),
    };
    match r {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({
                    "label": a.label, "mode": format!("{:?}", a.mode), "error": e.to_string()
                })
            );
            ExitCode::FAILURE
        }
    }
}
