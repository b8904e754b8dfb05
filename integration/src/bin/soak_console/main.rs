//! `soak_console`: SIGKILLs and restarts `vhost-user-console` over and over while two guests
//! write to it, and checks that every byte it accepted reached the port's client exactly
//! once and in order. Run by `scripts/soak.sh`; docs/soak.md says what is checked and why.
//!
//! One backend process serves two VMs, each port with a `unix:` endpoint read by a client
//! of this program, and `--state-dir` (what keeps accepted output across a crash):
//! - `s`, stream mode: the guest side is [`stream_writer`], playing QEMU's `-chardev socket`
//!   with `reconnect-ms`. Accepted = read by the backend out of the socket (the writer knows
//!   it from SIOCOUTQ). What was written but not read when the backend died may be lost, as
//!   the README says of a stream device with no backend; nothing else.
//! - `v`, virtio mode (unless `--no-virtio`): [`virtio_writer`], the frontend harness
//!   playing the guest driver and a QEMU that reconnects. Accepted = marked used. Chains not
//!   used stay in the ring, so nothing at all may be lost.
//!
//! Each kill lands after a random extra stretch of traffic; the next one comes only after
//! data written after the restart went through the new process (readiness, no fixed sleeps).
//! Then, with the last process staying up, the front-ends and clients restart
//! `--frontend-restarts` times (QEMU restarts, clients reattach): the backend's descriptors,
//! memory and threads must not grow across them either.

mod endpoint_reader;
mod qemu_stream;
mod rig;
mod stream_writer;
mod virtio_writer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use devshare_integration::soak::accounting::{account, Accounting};
use devshare_integration::soak::backend::Backend;
use devshare_integration::soak::driver::{self, Bounds, FdWatch, Scratch};
use devshare_integration::soak::pace::Rng;
use devshare_integration::soak::series::{Series, UsageSeries};
use devshare_integration::soak::usage::Usage;
use devshare_integration::soak::wait_for;

use endpoint_reader::EndpointReader;
use rig::{backend_args, Paths, Rig, VirtioPair};
use stream_writer::StreamWriter;
use virtio_writer::VirtioWriter;

/// The most a backend killed during a write to its client sends again (README, "Nothing
/// silently lost": one write of at most 64 KiB, counted in `replayed_after_restart_bytes`).
const REPEAT_BOUND: u64 = 64 * 1024;

/// SIGKILL and restart vhost-user-console under traffic, and check that every byte it
/// accepted arrived, in order, and once (but for the one write a kill may repeat, counted), and that its descriptors, memory and threads stay
/// flat. Prints one line per kill and a summary; exits non-zero on any failure.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub(crate) struct Args {
    /// Kills (SIGKILL) and restarts of the backend.
    #[arg(long, default_value_t = 100)]
    iterations: u32,
    /// Then front-end restarts with the backend staying up (QEMU restarts, clients reattach).
    #[arg(long, default_value_t = 100)]
    frontend_restarts: u32,
    /// Scratch directory (sockets, state, backend log); default: a new one under /tmp,
    /// removed after a run that passed.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Bytes per second each writer offers, e.g. 8M (0: as fast as the backend takes them).
    #[arg(long, default_value = "8M", value_parser = parse_rate)]
    rate: u64,
    /// The backend's buffer per port (--buffer-size): how long a client may stall before
    /// the stream port drops (and counts) its oldest bytes.
    #[arg(long, default_value = "4M")]
    buffer_size: String,
    /// The writers' reconnect period after losing the backend (QEMU's reconnect-ms).
    #[arg(long, default_value_t = 200)]
    reconnect_ms: u64,
    /// Lines (32 bytes) written after a restart that must reach the client through the new
    /// process before it is killed again.
    #[arg(long, default_value_t = 1024)]
    min_lines: u64,
    /// Up to this much more traffic (random, milliseconds) before each kill.
    #[arg(long, default_value_t = 50)]
    kill_jitter_ms: u64,
    /// Longest wait for anything (a socket, a reconnect, data): only a stuck run hits it.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Only the stream-mode VM.
    #[arg(long)]
    no_virtio: bool,
    /// The stream VM's front-end is a real QEMU guest printing the lines to its serial port
    /// (QEMU's reconnect-ms redials); only the kills, no virtio VM (see qemu_stream.rs).
    #[arg(long)]
    qemu: bool,
    /// Seed of the kill points.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    bounds: Bounds,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t.as_str(), 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("'{s}' is not a rate in bytes per second (e.g. 8M)"))
}

/// One kill's numbers.
#[derive(Clone, Copy, Default)]
struct KillRecord {
    /// The killed stream connection: written, accepted, delivered, lost, lost although accepted.
    written: u64,
    accepted: u64,
    delivered: u64,
    lost: u64,
    lost_accepted: u64,
    /// Bytes the killed process counted as dropped on the stream port.
    dropped: u64,
    /// Bytes that arrived twice because of this kill (stream, virtio).
    stream_dup: u64,
    virtio_dup: u64,
}

/// What the soak measured.
struct Results {
    backend_usage: UsageSeries,
    driver_usage: UsageSeries,
    frontend_usage: UsageSeries,
    t_up: Series,
    t_writer: Series,
    t_stream: Series,
    t_virtio: Series,
    kills: Vec<KillRecord>,
    /// Stream bytes all backend processes counted as dropped.
    stream_dropped: u64,
    /// Bytes all backend processes counted as sent again after a crash (stream, virtio).
    stream_replayed: u64,
    virtio_replayed: u64,
    problems: Vec<String>,
    kill_secs: f64,
    frontend_secs: f64,
}

impl Results {
    fn new() -> Results {
        Results {
            backend_usage: UsageSeries::new("backend"),
            driver_usage: UsageSeries::new("soak driver"),
            frontend_usage: UsageSeries::new("backend (front-end restarts)"),
            t_up: Series::new("kill -> new backend serving", "ms"),
            t_writer: Series::new("kill -> stream writer reconnected", "ms"),
            t_stream: Series::new("kill -> stream data flowing again", "ms"),
            t_virtio: Series::new("kill -> virtio data flowing again", "ms"),
            kills: Vec::new(),
            stream_dropped: 0,
            stream_replayed: 0,
            virtio_replayed: 0,
            problems: Vec::new(),
            kill_secs: 0.0,
            frontend_secs: 0.0,
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The stream accounting so far (runs first: the sessions may only have grown since).
fn stream_accounting(rig: &Rig, complete: bool) -> Accounting {
    let runs = rig.reader.state.check().runs(true);
    let sessions = rig.writer.state.sessions().clone();
    account(&sessions, &runs, complete)
}

/// The kills: SIGKILL, start again, wait until new data went through, account.
fn kill_phase(a: &Args, rig: &mut Rig, res: &mut Results) -> Result<(), String> {
    let started = Instant::now();
    let min = a.min_lines;
    let mut rng = Rng::new(a.seed);
    let mut fds = FdWatch::default();
    let (mut dup_stream, mut dup_virtio) = (0u64, 0u64);
    for i in 1..=a.iterations {
        thread::sleep(rng.below(Duration::from_millis(a.kill_jitter_ms)));
        if !rig.backend.is_running() {
            return Err(format!(
                "kill {i}: the backend exited by itself\n{}",
                rig.backend.log_tail(30)
            ));
        }
        let u = rig.backend.usage().map_err(|e| e.to_string())?;
        let own = Usage::own().map_err(|e| e.to_string())?;
        if let Some(note) = fds.sample(rig.backend.pid(), u.fds, a.bounds.fd_slack) {
            res.problems.push(format!("kill {i}: backend {note}"));
        }
        res.backend_usage.push(u);
        res.driver_usage.push(own);
        let counters = rig.counters()?;
        res.stream_dropped += counters.stream_dropped;
        res.stream_replayed += counters.stream_replayed;
        res.virtio_replayed += counters.virtio_replayed;
        if counters.virtio_dropped > 0 || counters.bad_chains > 0 {
            res.problems.push(format!(
                "kill {i}: the virtio data port dropped {} bytes, {} chains were refused",
                counters.virtio_dropped, counters.bad_chains
            ));
        }
        let sessions_before = rig.writer.state.sessions().len();
        let (v_connects, v_submitted) = rig.virtio.as_ref().map_or((0, 0), |v| {
            (
                v.guest.state.connects.load(Ordering::Acquire),
                v.guest.state.submitted_lines.load(Ordering::Acquire),
            )
        });
        let t_kill = Instant::now();
        rig.backend.kill();
        rig.backend
            .start_again()
            .map_err(|e| format!("kill {i}: cannot start the backend again: {e}"))?;
        rig.wait_serving()?;
        res.t_up.push(ms(t_kill.elapsed()));
        rig.wait("the stream writer reconnects", |r| {
            r.writer.state.sessions().len() > sessions_before
        })?;
        res.t_writer.push(ms(t_kill.elapsed()));
        let new_first = rig.writer.state.sessions()[sessions_before].first_seq;
        rig.wait(
            "stream data of the new connection reaches the client",
            |r| r.stream_next() >= new_first + min,
        )?;
        res.t_stream.push(ms(t_kill.elapsed()));
        if rig.virtio.is_some() {
            rig.wait(
                "the virtio guest reconnects and its new data arrives",
                |r| {
                    r.virtio.as_ref().is_some_and(|v| {
                        v.guest.state.connects.load(Ordering::Acquire) > v_connects
                    }) && r.virtio_next() >= v_submitted + min
                },
            )?;
            res.t_virtio.push(ms(t_kill.elapsed()));
        }
        // The killed connection is over and its data settled: hold it against what arrived.
        let acc = stream_accounting(rig, false);
        let killed = acc.sessions.last().copied().unwrap_or_default();
        let v_dup = rig
            .virtio
            .as_ref()
            .map_or(0, |v| v.check(false).duplicated());
        let k = KillRecord {
            written: killed.written,
            accepted: killed.accepted,
            delivered: killed.delivered,
            lost: killed.lost,
            lost_accepted: killed.lost_accepted,
            dropped: counters.stream_dropped,
            stream_dup: acc.duplicated() - dup_stream,
            virtio_dup: v_dup - dup_virtio,
        };
        (dup_stream, dup_virtio) = (acc.duplicated(), v_dup);
        res.kills.push(k);
        let corrupt = rig.reader.state.check().errors().len()
            + rig
                .virtio
                .as_ref()
                .map_or(0, |v| v.client.state.check().errors().len());
        let mut flags = Vec::new();
        if k.lost_accepted > k.dropped {
            flags.push(format!("ACCEPTED AND LOST {}", k.lost_accepted));
        }
        if k.dropped > 0 {
            flags.push(format!("counted as dropped {}", k.dropped));
        }
        if k.stream_dup > 0 {
            flags.push(format!("STREAM DUPLICATE {}", k.stream_dup));
        }
        if k.virtio_dup > 0 {
            flags.push(format!("VIRTIO DUPLICATE {}", k.virtio_dup));
        }
        if corrupt > 0 {
            flags.push(format!("CORRUPT {corrupt}"));
        }
        println!(
            "kill {i:3}/{}: stream written {} B, accepted >= {}, delivered {}, lost {} | \
             up {} ms, writer back {} ms, data {} ms{} | backend fds {} rss {} KiB threads {} | \
             driver fds {}{}",
            a.iterations,
            k.written,
            k.accepted,
            k.delivered,
            k.lost,
            res.t_up.last().unwrap_or(0),
            res.t_writer.last().unwrap_or(0),
            res.t_stream.last().unwrap_or(0),
            res.t_virtio
                .last()
                .map_or(String::new(), |t| format!(", virtio {t} ms")),
            u.fds,
            u.rss_kib,
            u.threads,
            own.fds,
            if flags.is_empty() {
                String::new()
            } else {
                format!(" | {}", flags.join(", "))
            }
        );
    }
    res.kill_secs = started.elapsed().as_secs_f64();
    Ok(())
}

/// Front-end restarts with the last backend staying up: QEMU restarts (the stream writer and
/// the virtio guest close and dial again), then the clients reattach.
fn frontend_phase(a: &Args, rig: &mut Rig, res: &mut Results) -> Result<(), String> {
    let started = Instant::now();
    let min = a.min_lines;
    let mut fds = FdWatch::default();
    let mut dropped_before = rig.counters()?.stream_dropped;
    for j in 1..=a.frontend_restarts {
        rig.drain()?;
        let w0 = rig.writer.state.connects.load(Ordering::Acquire);
        rig.writer.state.reconnect.store(true, Ordering::Release);
        let g0 = rig.virtio.as_ref().map(|v| {
            v.guest.state.reconnect.store(true, Ordering::Release);
            v.guest.state.connects.load(Ordering::Acquire)
        });
        rig.wait(
            "the stream writer and the virtio guest connect again",
            |r| {
                r.writer.state.connects.load(Ordering::Acquire) > w0
                    && r.writer.state.connected.load(Ordering::Acquire)
                    && match (&r.virtio, g0) {
                        (Some(v), Some(g)) => v.guest.state.connects.load(Ordering::Acquire) > g,
                        _ => true,
                    }
            },
        )?;
        // With the front-ends connected the backend watches its clients, and sees them go.
        let r0 = rig.reader.state.connects.load(Ordering::Acquire);
        rig.reader.state.reconnect.store(true, Ordering::Release);
        let c0 = rig.virtio.as_ref().map(|v| {
            v.client.state.reconnect.store(true, Ordering::Release);
            v.client.state.connects.load(Ordering::Acquire)
        });
        rig.wait("the clients attach again", |r| {
            r.reader.state.connects.load(Ordering::Acquire) > r0
                && match (&r.virtio, c0) {
                    (Some(v), Some(c)) => v.client.state.connects.load(Ordering::Acquire) > c,
                    _ => true,
                }
        })?;
        let first = rig
            .writer
            .state
            .sessions()
            .last()
            .map_or(0, |s| s.first_seq);
        let v_from = rig
            .virtio
            .as_ref()
            .map_or(0, |v| v.guest.state.submitted_lines.load(Ordering::Acquire));
        rig.resume();
        rig.wait("data flows after the front-end restart", |r| {
            r.stream_next() >= first + min && r.virtio_next() >= v_from + min
        })?;
        let counters = rig.counters()?;
        if counters.stream_dropped > dropped_before {
            println!(
                "front-end restart {j}: the stream port counted {} bytes dropped",
                counters.stream_dropped - dropped_before
            );
            dropped_before = counters.stream_dropped;
        }
        let u = rig.backend.usage().map_err(|e| e.to_string())?;
        if let Some(note) = fds.sample(rig.backend.pid(), u.fds, a.bounds.fd_slack) {
            res.problems
                .push(format!("front-end restart {j}: backend {note}"));
        }
        res.frontend_usage.push(u);
        if j % 10 == 0 || j == 1 {
            println!(
                "front-end restart {j:3}/{}: backend fds {} rss {} KiB threads {} | driver fds {}",
                a.frontend_restarts,
                u.fds,
                u.rss_kib,
                u.threads,
                Usage::own().map(|o| o.fds).unwrap_or(0)
            );
        }
    }
    res.frontend_secs = started.elapsed().as_secs_f64();
    Ok(())
}

/// The end: everything written must arrive; then the verdict and the summary.
fn finish(a: &Args, rig: &mut Rig, res: &mut Results) -> Result<(), String> {
    rig.drain()?;
    let counters = rig.counters()?;
    res.stream_dropped += counters.stream_dropped;
    if counters.virtio_dropped > 0 || counters.bad_chains > 0 {
        res.problems.push(format!(
            "at the end: the virtio data port dropped {} bytes, {} chains were refused",
            counters.virtio_dropped, counters.bad_chains
        ));
    }
    let stream = stream_accounting(rig, true);
    // Repeats the backend counted, each at most one write, are the README's promise kept.
    let mut judged = stream.clone();
    let stream_admitted = judged.admit_counted_repeats(res.stream_replayed, REPEAT_BOUND);
    res.problems.extend(
        judged
            .violations(res.stream_dropped)
            .into_iter()
            .map(|v| format!("stream: {v}")),
    );
    res.problems.extend(
        rig.reader
            .state
            .check()
            .errors()
            .iter()
            .map(|e| format!("stream client: {e}")),
    );
    let virtio = rig.virtio.as_ref().map(|v| v.check(true));
    if let (Some(v), Some(acc)) = (&rig.virtio, &virtio) {
        let mut judged = acc.clone();
        judged.admit_counted_repeats(res.virtio_replayed, REPEAT_BOUND);
        res.problems.extend(
            judged
                .violations(0)
                .into_iter()
                .map(|x| format!("virtio: {x}")),
        );
        res.problems.extend(
            v.client
                .state
                .check()
                .errors()
                .iter()
                .map(|e| format!("virtio client: {e}")),
        );
    }
    res.problems.extend(a.bounds.check(&[
        &res.backend_usage,
        &res.frontend_usage,
        &res.driver_usage,
    ]));

    let t = stream.total();
    let kills_with_loss = res.kills.iter().filter(|k| k.lost > 0).count();
    let stream_busy = rig.reader.state.busy.load(Ordering::Acquire);
    let virtio_busy = rig
        .virtio
        .as_ref()
        .map_or(0, |v| v.client.state.busy.load(Ordering::Acquire));
    println!("--- console soak summary ---");
    println!(
        "kills: {} in {:.1} s; front-end restarts: {} in {:.1} s",
        a.iterations, res.kill_secs, a.frontend_restarts, res.frontend_secs
    );
    println!(
        "stream: {} connections; written {} B, accepted >= {} B, delivered {} B; lost {} B in \
         {kills_with_loss} of {} kills, of it accepted {} B (counted as dropped by the backend: \
         {} B); duplicated {} B in {} places (counted by the backend as sent again after a \
         crash: {} B; admitted as within the promise: {stream_admitted} B)",
        stream.sessions.len(),
        t.written,
        t.accepted,
        t.delivered,
        t.lost,
        res.kills.len(),
        t.lost_accepted,
        res.stream_dropped,
        stream.duplicated(),
        stream.duplicates.len(),
        res.stream_replayed
    );
    if let (Some(v), Some(acc)) = (&rig.virtio, &virtio) {
        let vt = acc.total();
        println!(
            "virtio: {} connections; written {} B, accepted {} B, delivered {} B; lost {} B; \
             duplicated {} B in {} places (counted by the backend as sent again after a \
             crash: {} B)",
            v.guest.state.connects.load(Ordering::Acquire),
            vt.written,
            vt.accepted,
            vt.delivered,
            vt.lost,
            acc.duplicated(),
            acc.duplicates.len(),
            res.virtio_replayed
        );
    }
    println!(
        "clients told 'port busy' on reattaching (the backend had not yet noticed the old \
         client leave): stream {stream_busy}, virtio {virtio_busy}"
    );
    for s in [&res.t_up, &res.t_writer, &res.t_stream, &res.t_virtio] {
        if s.first().is_some() {
            println!("{}", s.summary());
        }
    }
    a.bounds
        .print(&[&res.backend_usage, &res.frontend_usage, &res.driver_usage]);
    if a.bounds.json.is_some() {
        let doc = serde_json::json!({
            "backend": "vhost-user-console",
            "kills": a.iterations, "frontend_restarts": a.frontend_restarts,
            "rate": a.rate, "buffer_size": a.buffer_size,
            "kill_seconds": res.kill_secs, "frontend_seconds": res.frontend_secs,
            "stream": {
                "connections": stream.sessions.len(), "written": t.written,
                "accepted": t.accepted, "delivered": t.delivered, "lost": t.lost,
                "lost_accepted": t.lost_accepted, "counted_dropped": res.stream_dropped,
                "kills_with_loss": kills_with_loss, "duplicated": stream.duplicated(),
                "duplicates": stream.duplicates, "busy_refusals": stream_busy,
                "counted_replayed": res.stream_replayed,
                "per_kill": res.kills.iter().map(|k| serde_json::json!({
                    "written": k.written, "accepted": k.accepted, "delivered": k.delivered,
                    "lost": k.lost, "lost_accepted": k.lost_accepted, "dropped": k.dropped,
                    "stream_duplicated": k.stream_dup, "virtio_duplicated": k.virtio_dup,
                })).collect::<Vec<_>>(),
            },
            "virtio": virtio.as_ref().map(|acc| {
                let vt = acc.total();
                serde_json::json!({"written": vt.written, "accepted": vt.accepted,
                    "delivered": vt.delivered, "lost": vt.lost, "duplicated": acc.duplicated(),
                    "duplicates": acc.duplicates, "busy_refusals": virtio_busy,
                    "counted_replayed": res.virtio_replayed})
            }),
            "times_ms": [res.t_up.json(), res.t_writer.json(), res.t_stream.json(),
                         res.t_virtio.json()],
            "backend_usage": res.backend_usage.json(),
            "frontend_restart_usage": res.frontend_usage.json(),
            "driver_usage": res.driver_usage.json(),
            "problems": res.problems,
        });
        a.bounds.write_json(&doc)?;
    }
    Ok(())
}

fn soak(a: &Args) -> Result<(), String> {
    let scratch = Scratch::new(a.dir.as_deref(), "console")?;
    let dir = scratch.path().to_owned();
    if a.qemu {
        let problems = qemu_stream::run(a, &dir)?;
        return scratch.verdict(&problems);
    }
    let paths = Paths::new(&dir);
    let virtio = !a.no_virtio;
    let args = backend_args(&dir, &paths, virtio, &a.buffer_size);
    let timeout = Duration::from_secs(a.timeout_s);
    let reconnect = Duration::from_millis(a.reconnect_ms);
    println!(
        "console soak: {} kills, {} front-end restarts, {} B/s per writer, buffer {}, \
         reconnect {} ms, scratch {}",
        a.iterations,
        a.frontend_restarts,
        a.rate,
        a.buffer_size,
        a.reconnect_ms,
        dir.display()
    );
    println!("backend: vhost-user-console {}", args.join(" "));
    let backend = Backend::start("vhost-user-console", args, &dir.join("backend.log"))
        .map_err(|e| format!("cannot start vhost-user-console: {e}"))?;
    let stats_path = paths.stats.clone();
    wait_for(
        "vhost-user-console serves its stats socket",
        timeout,
        Duration::from_millis(5),
        || devshare_integration::soak::backend::stats(&stats_path).is_some(),
    )?;
    let writer = StreamWriter::start(paths.stream_sock.clone(), reconnect, a.rate);
    let reader = EndpointReader::start(
        paths.stream_client.clone(),
        Some(writer.state.sessions.clone()),
    );
    let virtio_pair = virtio.then(|| VirtioPair {
        guest: VirtioWriter::start(paths.virtio_sock.clone(), reconnect, a.rate),
        client: EndpointReader::start(paths.virtio_client.clone(), None),
    });
    let mut rig = Rig {
        backend,
        paths,
        writer,
        reader,
        virtio: virtio_pair,
        timeout,
    };
    let min = a.min_lines;
    rig.wait("first lines through both ports", |r| {
        r.stream_next() >= min && r.virtio_next() >= min
    })?;
    let mut res = Results::new();
    kill_phase(a, &mut rig, &mut res)?;
    frontend_phase(a, &mut rig, &mut res)?;
    finish(a, &mut rig, &mut res)?;
    drop(rig);
    scratch.verdict(&res.problems)
}

fn main() -> ExitCode {
    let a = Args::parse();
    driver::main("console", || soak(&a))
}
