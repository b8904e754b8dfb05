//! `soak_netmux`: SIGKILLs and restarts `vhost-user-netmux` over and over while harness
//! guests on its ports send each other frames, and checks that every guest's front-end
//! reconnects and traffic resumes in both directions every time, that no frame arrives
//! corrupted, and that the backend's descriptors, memory and threads stay flat. Run by
//! `scripts/soak.sh`; docs/soak.md says what is checked and why.
//!
//! Frames in flight when netmux dies may be lost (or, once the new process takes the
//! unfinished transmit chains again, arrive twice): the README promises nothing else for a
//! network device, and both are counted. Then, with the last process staying up, the guests'
//! front-ends restart `--frontend-restarts` times (QEMU restarts): no frame may go missing
//! then beyond what netmux counts as dropped, and the backend must not grow.

mod frames;
mod guest;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use devshare_integration::soak::backend::{stats, Backend};
use devshare_integration::soak::driver::{self, Bounds, FdWatch, Scratch};
use devshare_integration::soak::pace::Rng;
use devshare_integration::soak::series::{Series, UsageSeries};
use devshare_integration::soak::usage::Usage;

use guest::HarnessGuest;

/// SIGKILL and restart vhost-user-netmux under guest-to-guest traffic; check that the guests
/// reconnect and traffic resumes every time, and that its descriptors, memory and threads
/// stay flat. Prints one line per kill and a summary; exits non-zero on any failure.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// netmux's uplink, as its --uplink takes it: af-packet:IFACE (scripts/soak.sh makes a
    /// veth whose far end sits in a namespace of its own) or tap:NAME.
    #[arg(long, value_name = "SPEC")]
    uplink: String,
    /// Kills (SIGKILL) and restarts of the backend.
    #[arg(long, default_value_t = 100)]
    iterations: u32,
    /// Then front-end restarts of every guest with the backend staying up.
    #[arg(long, default_value_t = 100)]
    frontend_restarts: u32,
    /// Harness guests; guest i sends to guest i+1 (the last to the first).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
    guests: u8,
    /// Frames per second each guest sends.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// The guests' reconnect period after losing netmux (QEMU's reconnect-ms).
    #[arg(long, default_value_t = 200)]
    reconnect_ms: u64,
    /// Frames sent after a restart that must reach each receiver before the next kill.
    #[arg(long, default_value_t = 200)]
    min_frames: u64,
    /// Up to this much more traffic (random, milliseconds) before each kill.
    #[arg(long, default_value_t = 50)]
    kill_jitter_ms: u64,
    /// Longest wait for anything (a socket, a reconnect, a frame): only a stuck run hits it.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Seed of the kill points.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Scratch directory (sockets, backend log); default: a new one under /tmp, removed after
    /// a run that passed.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    bounds: Bounds,
}

/// Readiness polling step.
const STEP: Duration = Duration::from_millis(2);

/// netmux, its guests, and the waits between them.
struct Rig {
    backend: Backend,
    stats_path: PathBuf,
    guests: Vec<HarnessGuest>,
    timeout: Duration,
}

impl Rig {
    /// Guest `i`'s peer (the guest it sends to).
    fn peer(&self, i: usize) -> usize {
        (i + 1) % self.guests.len()
    }

    fn wait(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&Rig) -> bool,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            if ready(self) {
                return Ok(start.elapsed());
            }
            if let Some((i, e)) = self
                .guests
                .iter()
                .enumerate()
                .find_map(|(i, g)| g.state.error().clone().map(|e| (i, e)))
            {
                return Err(format!("{what}: guest {i} gave up: {e}"));
            }
            if start.elapsed() > self.timeout {
                return Err(format!(
                    "{what}: not within {:?}\n{}\n--- netmux log (tail) ---\n{}",
                    self.timeout,
                    self.traffic(),
                    self.backend.log_tail(30)
                ));
            }
            thread::sleep(STEP);
        }
    }

    /// Per direction: the sender's count and where the receiver stands.
    fn traffic(&self) -> String {
        (0..self.guests.len())
            .map(|i| {
                let s = &self.guests[i].state;
                let r = &self.guests[self.peer(i)].state;
                format!(
                    "guest {i} -> {}: submitted {}, taken {}, last received {:?}",
                    self.peer(i),
                    s.submitted.load(Ordering::Acquire),
                    s.sent.load(Ordering::Acquire),
                    r.last_from(i)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether the receiver of guest `i`'s frames has one numbered `seq` or later.
    fn delivered(&self, i: usize, seq: u64) -> bool {
        self.guests[self.peer(i)]
            .state
            .last_from(i)
            .is_some_and(|l| l >= seq)
    }

    /// Drops netmux counted, by reason, summed over its ports.
    fn drops(&self) -> Result<Vec<(String, u64)>, String> {
        let doc = stats(&self.stats_path).ok_or("the stats socket does not answer")?;
        let mut out: Vec<(String, u64)> = Vec::new();
        for p in doc["ports"].as_array().cloned().unwrap_or_default() {
            let Some(drops) = p["drops"].as_object() else {
                continue;
            };
            for (k, v) in drops {
                let n = v.as_u64().unwrap_or(0);
                match out.iter_mut().find(|(name, _)| name == k) {
                    Some((_, m)) => *m += n,
                    None => out.push((k.clone(), n)),
                }
            }
        }
        Ok(out)
    }

    /// The guests stop sending; everything they sent is taken and every receiver has looked at
    /// its ring since.
    fn drain(&mut self) -> Result<(), String> {
        for g in &self.guests {
            g.state.pause.store(true, Ordering::Release);
        }
        self.wait("netmux takes every frame sent", |r| {
            r.guests.iter().all(|g| {
                g.state.sent.load(Ordering::Acquire) == g.state.submitted.load(Ordering::Acquire)
            })
        })?;
        // netmux delivers a frame before it gives the transmit chain back; one more pass of
        // every receiver's loop takes what is in its ring.
        let passes: Vec<u64> = self.guests.iter().map(|g| g.state.passes()).collect();
        self.wait("every receiver takes what arrived", |r| {
            r.guests
                .iter()
                .zip(&passes)
                .all(|(g, p)| g.state.passes() > p + 1)
        })?;
        Ok(())
    }

    fn resume(&self) {
        for g in &self.guests {
            g.state.pause.store(false, Ordering::Release);
        }
    }

    fn sum(&self, f: impl Fn(&guest::GuestState) -> u64) -> u64 {
        self.guests.iter().map(|g| f(&g.state)).sum()
    }
}

fn sum_drops(d: &[(String, u64)]) -> u64 {
    d.iter().map(|(_, n)| n).sum()
}

fn nonzero(d: &[(String, u64)]) -> String {
    let v: Vec<String> = d
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// What the soak measured.
struct Results {
    backend_usage: UsageSeries,
    driver_usage: UsageSeries,
    frontend_usage: UsageSeries,
    t_up: Series,
    t_reconnected: Series,
    t_resumed: Series,
    /// netmux's drop counters summed over every process killed, by reason.
    kill_drops: Vec<(String, u64)>,
    problems: Vec<String>,
    kill_secs: f64,
    frontend_secs: f64,
    /// Frames missing at receivers during the kills, and during the front-end restarts.
    kill_missing: u64,
    frontend_missing: u64,
    frontend_drops: u64,
}

fn add_drops(into: &mut Vec<(String, u64)>, from: &[(String, u64)]) {
    for (k, n) in from {
        match into.iter_mut().find(|(name, _)| name == k) {
            Some((_, m)) => *m += n,
            None => into.push((k.clone(), *n)),
        }
    }
}

fn kill_phase(a: &Args, rig: &mut Rig, res: &mut Results) -> Result<(), String> {
    let started = Instant::now();
    let mut rng = Rng::new(a.seed);
    let mut fds = FdWatch::default();
    let n = rig.guests.len();
    let missing0 = rig.sum(|s| s.missing.load(Ordering::Acquire));
    let (mut sent_prev, mut recv_prev, mut miss_prev, mut dup_prev) = (
        rig.sum(|s| s.sent.load(Ordering::Acquire)),
        rig.sum(|s| s.received.load(Ordering::Acquire)),
        missing0,
        rig.sum(|s| s.duplicates.load(Ordering::Acquire)),
    );
    for i in 1..=a.iterations {
        thread::sleep(rng.below(Duration::from_millis(a.kill_jitter_ms)));
        if !rig.backend.is_running() {
            return Err(format!(
                "kill {i}: netmux exited by itself\n{}",
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
        let drops = rig.drops()?;
        add_drops(&mut res.kill_drops, &drops);
        let connects: Vec<u64> = rig
            .guests
            .iter()
            .map(|g| g.state.connects.load(Ordering::Acquire))
            .collect();
        let submitted: Vec<u64> = rig
            .guests
            .iter()
            .map(|g| g.state.submitted.load(Ordering::Acquire))
            .collect();
        let t_kill = Instant::now();
        rig.backend.kill();
        rig.backend
            .start_again()
            .map_err(|e| format!("kill {i}: cannot start netmux again: {e}"))?;
        let stats_path = rig.stats_path.clone();
        rig.wait("the new netmux serves its stats socket", |_| {
            stats(&stats_path).is_some()
        })?;
        res.t_up.push(ms(t_kill.elapsed()));
        rig.wait("every guest's front-end reconnects", |r| {
            r.guests
                .iter()
                .zip(&connects)
                .all(|(g, c)| g.state.connects.load(Ordering::Acquire) > *c)
        })?;
        res.t_reconnected.push(ms(t_kill.elapsed()));
        // Traffic resumed: frames sent after the kill arrive, every direction.
        let min = a.min_frames;
        rig.wait("traffic resumes in every direction", |r| {
            (0..n).all(|g| r.delivered(g, submitted[g] + min))
        })?;
        res.t_resumed.push(ms(t_kill.elapsed()));
        let sent = rig.sum(|s| s.sent.load(Ordering::Acquire));
        let recv = rig.sum(|s| s.received.load(Ordering::Acquire));
        let miss = rig.sum(|s| s.missing.load(Ordering::Acquire));
        let dup = rig.sum(|s| s.duplicates.load(Ordering::Acquire));
        println!(
            "kill {i:3}/{}: frames taken {}, received {}, lost at the kill {}, twice {} | \
             netmux up {} ms, guests back {} ms, traffic {} ms | drops counted by the killed \
             process: {} | \
             backend fds {} rss {} KiB threads {} | driver fds {}",
            a.iterations,
            sent - sent_prev,
            recv - recv_prev,
            miss - miss_prev,
            dup - dup_prev,
            res.t_up.last().unwrap_or(0),
            res.t_reconnected.last().unwrap_or(0),
            res.t_resumed.last().unwrap_or(0),
            nonzero(&drops),
            u.fds,
            u.rss_kib,
            u.threads,
            own.fds
        );
        (sent_prev, recv_prev, miss_prev, dup_prev) = (sent, recv, miss, dup);
    }
    res.kill_missing = rig.sum(|s| s.missing.load(Ordering::Acquire)) - missing0;
    res.kill_secs = started.elapsed().as_secs_f64();
    Ok(())
}

fn frontend_phase(a: &Args, rig: &mut Rig, res: &mut Results) -> Result<(), String> {
    let started = Instant::now();
    let mut fds = FdWatch::default();
    let n = rig.guests.len();
    rig.drain()?;
    let missing0 = rig.sum(|s| s.missing.load(Ordering::Acquire));
    let drops0 = sum_drops(&rig.drops()?);
    rig.resume();
    for j in 1..=a.frontend_restarts {
        rig.drain()?;
        let connects: Vec<u64> = rig
            .guests
            .iter()
            .map(|g| {
                g.state.reconnect.store(true, Ordering::Release);
                g.state.connects.load(Ordering::Acquire)
            })
            .collect();
        rig.wait("every guest's front-end connects again", |r| {
            r.guests
                .iter()
                .zip(&connects)
                .all(|(g, c)| g.state.connects.load(Ordering::Acquire) > *c)
        })?;
        let submitted: Vec<u64> = rig
            .guests
            .iter()
            .map(|g| g.state.submitted.load(Ordering::Acquire))
            .collect();
        rig.resume();
        let min = a.min_frames;
        rig.wait("traffic flows after the front-end restart", |r| {
            (0..n).all(|g| r.delivered(g, submitted[g] + min))
        })?;
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
    rig.drain()?;
    res.frontend_missing = rig.sum(|s| s.missing.load(Ordering::Acquire)) - missing0;
    res.frontend_drops = sum_drops(&rig.drops()?) - drops0;
    if res.frontend_missing > res.frontend_drops {
        res.problems.push(format!(
            "front-end restarts (netmux up): {} frames never arrived, netmux counted {} dropped",
            res.frontend_missing, res.frontend_drops
        ));
    }
    res.frontend_secs = started.elapsed().as_secs_f64();
    Ok(())
}

fn finish(a: &Args, rig: &mut Rig, res: &mut Results) -> Result<(), String> {
    let corrupt = rig.sum(|s| s.corrupt.load(Ordering::Acquire));
    if corrupt > 0 {
        let first = rig
            .guests
            .iter()
            .find_map(|g| g.state.first_corrupt())
            .unwrap_or_default();
        res.problems.push(format!(
            "{corrupt} frames arrived corrupted; the first: {first}"
        ));
    }
    res.problems.extend(a.bounds.check(&[
        &res.backend_usage,
        &res.frontend_usage,
        &res.driver_usage,
    ]));
    let last_drops = rig.drops()?;
    println!("--- netmux soak summary ---");
    println!(
        "kills: {} in {:.1} s; front-end restarts: {} in {:.1} s; {} guests, {} frames/s each",
        a.iterations,
        res.kill_secs,
        a.frontend_restarts,
        res.frontend_secs,
        rig.guests.len(),
        a.rate
    );
    let mut directions = Vec::new();
    for i in 0..rig.guests.len() {
        let s = &rig.guests[i].state;
        let p = rig.peer(i);
        let r = &rig.guests[p].state;
        let line = format!(
            "guest {i} -> {p}: sent {} (taken by netmux {}), last received {:?}",
            s.submitted.load(Ordering::Acquire),
            s.sent.load(Ordering::Acquire),
            r.last_from(i)
        );
        println!("{line}");
        directions.push(line);
    }
    println!(
        "frames received {}, missing {} (at kills {}, during front-end restarts {}), arrived \
         twice {}, corrupted {}; frames from the uplink's wire {}",
        rig.sum(|s| s.received.load(Ordering::Acquire)),
        rig.sum(|s| s.missing.load(Ordering::Acquire)),
        res.kill_missing,
        res.frontend_missing,
        rig.sum(|s| s.duplicates.load(Ordering::Acquire)),
        corrupt,
        rig.sum(|s| s.foreign.load(Ordering::Acquire))
    );
    println!(
        "netmux drops: killed processes {}; the last one {}",
        nonzero(&res.kill_drops),
        nonzero(&last_drops)
    );
    for s in [&res.t_up, &res.t_reconnected, &res.t_resumed] {
        println!("{}", s.summary());
    }
    a.bounds
        .print(&[&res.backend_usage, &res.frontend_usage, &res.driver_usage]);
    if a.bounds.json.is_some() {
        let doc = serde_json::json!({
            "backend": "vhost-user-netmux",
            "kills": a.iterations, "frontend_restarts": a.frontend_restarts,
            "guests": rig.guests.len(), "rate": a.rate,
            "kill_seconds": res.kill_secs, "frontend_seconds": res.frontend_secs,
            "directions": directions,
            "received": rig.sum(|s| s.received.load(Ordering::Acquire)),
            "missing_at_kills": res.kill_missing,
            "missing_frontend_restarts": res.frontend_missing,
            "duplicates": rig.sum(|s| s.duplicates.load(Ordering::Acquire)),
            "corrupt": corrupt,
            "foreign": rig.sum(|s| s.foreign.load(Ordering::Acquire)),
            "kill_drops": res.kill_drops, "last_drops": last_drops,
            "times_ms": [res.t_up.json(), res.t_reconnected.json(), res.t_resumed.json()],
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
    let scratch = Scratch::new(a.dir.as_deref(), "netmux")?;
    let dir = scratch.path().to_owned();
    let n = usize::from(a.guests);
    let stats_path = dir.join("stats.sock");
    let sock = |i: usize| dir.join(format!("g{i}.sock"));
    let mut args = vec![
        "--uplink".to_string(),
        a.uplink.clone(),
        "--stats-socket".into(),
        stats_path.display().to_string(),
    ];
    for i in 0..n {
        args.push("--port".into());
        args.push(format!(
            "name=g{i},socket={},mac={}",
            sock(i).display(),
            frames::mac_text(i)
        ));
    }
    println!(
        "netmux soak: {} kills, {} front-end restarts, {n} guests at {} frames/s each, \
         reconnect {} ms, scratch {}",
        a.iterations,
        a.frontend_restarts,
        a.rate,
        a.reconnect_ms,
        dir.display()
    );
    println!("backend: vhost-user-netmux {}", args.join(" "));
    let backend = Backend::start("vhost-user-netmux", args, &dir.join("backend.log"))
        .map_err(|e| format!("cannot start vhost-user-netmux: {e}"))?;
    let reconnect = Duration::from_millis(a.reconnect_ms);
    let guests = (0..n)
        .map(|i| HarnessGuest::start(i, n, (i + 1) % n, sock(i), reconnect, a.rate))
        .collect();
    let mut rig = Rig {
        backend,
        stats_path,
        guests,
        timeout: Duration::from_secs(a.timeout_s),
    };
    let min = a.min_frames;
    rig.wait("first frames in every direction", |r| {
        (0..n).all(|g| r.delivered(g, min))
    })?;
    let mut res = Results {
        backend_usage: UsageSeries::new("backend"),
        driver_usage: UsageSeries::new("soak driver"),
        frontend_usage: UsageSeries::new("backend (front-end restarts)"),
        t_up: Series::new("kill -> new netmux serving", "ms"),
        t_reconnected: Series::new("kill -> every guest reconnected", "ms"),
        t_resumed: Series::new("kill -> traffic flowing again both ways", "ms"),
        kill_drops: Vec::new(),
        problems: Vec::new(),
        kill_secs: 0.0,
        frontend_secs: 0.0,
        kill_missing: 0,
        frontend_missing: 0,
        frontend_drops: 0,
    };
    kill_phase(a, &mut rig, &mut res)?;
    frontend_phase(a, &mut rig, &mut res)?;
    finish(a, &mut rig, &mut res)?;
    drop(rig);
    scratch.verdict(&res.problems)
}

fn main() -> ExitCode {
    let a = Args::parse();
    driver::main("netmux", || soak(&a))
}
