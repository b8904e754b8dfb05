//! `--qemu`: the stream VM's QEMU side for real. A TCG guest (the test bed's kernel and
//! busybox) prints the soak's numbered lines to its second serial port as fast as the 16550
//! goes; the port is QEMU's `-chardev socket,path=SOCK,reconnect-ms=N`, so QEMU itself is the
//! surviving side that redials every restarted backend.
//!
//! QEMU drops what the UART sends while no backend is connected, and a guest behind it cannot
//! know what the backend read, so the rule is the weaker one: lines arrive in order and none
//! twice; data goes missing (whole lines, plus at most the torn line at each side) only across
//! a kill: never more gaps than kills.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::qemu::Guest;
use devshare_integration::soak::backend::{stats, Backend};
use devshare_integration::soak::lines::{LineCheck, Run, LINE_LEN};
use devshare_integration::soak::pace::Rng;
use devshare_integration::soak::series::{Series, UsageSeries};
use devshare_integration::soak::usage::Usage;
use devshare_integration::soak::wait_for;

use crate::endpoint_reader::EndpointReader;
use crate::rig::{backend_args, Paths, STREAM_PORT};
use crate::Args;

/// The guest: raw mode on ttyS1 (no CR inserted), then line after line, forever.
const SCRIPT: &str = r#"
stty -F /dev/ttyS1 raw -echo
exec 3>/dev/ttyS1
echo SOAK-WRITING
i=0
while :; do
    printf 'S%016d %013x\n' $i $(( (i * 2654435761) & 0xFFFFFFFFFFFFF )) >&3
    i=$((i + 1))
done
"#;

/// How long the guest may take to boot under TCG on a busy machine.
const BOOT: Duration = Duration::from_secs(300);

/// Lines that must pass through a new backend after a kill before the next one (the UART is
/// slow under TCG: fewer than the player's).
fn min_lines(a: &Args) -> u64 {
    a.min_lines.min(256)
}

/// Places where data went missing: a run that starts after the previous one ended.
fn gaps(runs: &[Run]) -> usize {
    runs.windows(2).filter(|w| w[1].start > w[0].end).count()
}

/// Runs the kills with a real QEMU as the stream VM's front-end (no virtio VM, no front-end
/// restarts: a QEMU restart is a new boot).
pub fn run(a: &Args, dir: &Path) -> Result<Vec<String>, String> {
    let paths = Paths::new(dir);
    let args = backend_args(dir, &paths, false, &a.buffer_size);
    let timeout = Duration::from_secs(a.timeout_s);
    println!(
        "console soak with QEMU: {} kills, reconnect-ms={}, scratch {}",
        a.iterations,
        a.reconnect_ms,
        dir.display()
    );
    println!("backend: vhost-user-console {}", args.join(" "));
    let mut backend = Backend::start("vhost-user-console", args, &dir.join("backend.log"))
        .map_err(|e| format!("cannot start vhost-user-console: {e}"))?;
    let step = Duration::from_millis(5);
    wait_for(
        "vhost-user-console serves its stats socket",
        timeout,
        step,
        || stats(&paths.stats).is_some(),
    )?;
    let reader = EndpointReader::start_with(paths.stream_client.clone(), LineCheck::lenient());
    let chardev = format!(
        "socket,id=soak,path={},reconnect-ms={}",
        paths.stream_sock.display(),
        a.reconnect_ms
    );
    let mut guest = Guest::builder()
        .name("soak-stream")
        .args(["-chardev", &chardev, "-serial", "chardev:soak"])
        .script(SCRIPT)
        .spawn()
        .map_err(|e| format!("cannot start the QEMU guest: {e}"))?;
    guest
        .wait_for_line("SOAK-WRITING", BOOT)
        .map_err(|e| format!("the guest did not start writing: {e}"))?;
    let min = min_lines(a);
    wait_for(
        "the guest's first lines reach the client",
        timeout,
        step,
        || reader.state.check().next_seq() >= min,
    )?;

    let started = Instant::now();
    let mut rng = Rng::new(a.seed);
    let mut backend_usage = UsageSeries::new("backend");
    let mut qemu_usage = UsageSeries::new("QEMU");
    let mut driver_usage = UsageSeries::new("soak driver");
    let mut t_up = Series::new("kill -> new backend serving", "ms");
    let mut t_resumed = Series::new("kill -> QEMU's lines flowing again", "ms");
    let mut lost_lines = Series::new("lines lost per kill", "");
    let mut dropped = 0u64;
    let mut replayed = 0u64;
    let mut problems = Vec::new();
    for i in 1..=a.iterations {
        thread::sleep(rng.below(Duration::from_millis(a.kill_jitter_ms)));
        if !backend.is_running() {
            return Err(format!("kill {i}: the backend exited by itself"));
        }
        let u = backend.usage().map_err(|e| e.to_string())?;
        let q = Usage::of(guest.pid()).map_err(|e| format!("QEMU is gone: {e}"))?;
        let own = Usage::own().map_err(|e| e.to_string())?;
        backend_usage.push(u);
        qemu_usage.push(q);
        driver_usage.push(own);
        dropped += port_counter(&paths.stats, "dropped_bytes");
        replayed += port_counter(&paths.stats, "replayed_after_restart_bytes");
        let runs_before = reader.state.check().runs(true).len();
        let t_kill = Instant::now();
        backend.kill();
        backend
            .start_again()
            .map_err(|e| format!("kill {i}: cannot start the backend again: {e}"))?;
        wait_for(
            "the new backend serves its stats socket",
            timeout,
            step,
            || stats(&paths.stats).is_some(),
        )?;
        t_up.push(t_kill.elapsed().as_millis() as u64);
        // QEMU redialed when lines written after the gap the kill made go through.
        wait_for(
            "QEMU reconnects and its lines flow again",
            timeout,
            step,
            || {
                let c = reader.state.check();
                let runs = c.runs(false);
                runs.len() > runs_before
                    && runs
                        .last()
                        .is_some_and(|r| c.next_seq() >= r.start / LINE_LEN as u64 + min)
            },
        )
        .map_err(|e| format!("kill {i}: {e}\n{}", backend.log_tail(20)))?;
        t_resumed.push(t_kill.elapsed().as_millis() as u64);
        let runs = reader.state.check().runs(false);
        let gap = match runs.len() {
            n if n >= 2 => runs[n - 1].start.saturating_sub(runs[n - 2].end) / LINE_LEN as u64,
            _ => 0,
        };
        lost_lines.push(gap);
        println!(
            "kill {i:3}/{}: lines lost {gap} | up {} ms, QEMU's lines again {} ms | backend fds {} \
             rss {} KiB threads {} | QEMU fds {} rss {} KiB threads {} | driver fds {}",
            a.iterations,
            t_up.last().unwrap_or(0),
            t_resumed.last().unwrap_or(0),
            u.fds,
            u.rss_kib,
            u.threads,
            q.fds,
            q.rss_kib,
            q.threads,
            own.fds
        );
    }
    let kill_secs = started.elapsed().as_secs_f64();
    dropped += port_counter(&paths.stats, "dropped_bytes");
    replayed += port_counter(&paths.stats, "replayed_after_restart_bytes");

    let c = reader.state.check();
    let runs = c.runs(true);
    let repeats: Vec<(u64, u64)> = runs
        .windows(2)
        .filter(|w| w[1].start < w[0].end)
        .map(|w| (w[1].start, w[0].end.min(w[1].end)))
        .collect();
    let repeated: u64 = repeats.iter().map(|(a, b)| b - a).sum();
    // A repeat the backend counted, each at most one write, is the README's promise kept.
    let admitted =
        repeated <= replayed && repeats.iter().all(|(a, b)| b - a <= super::REPEAT_BOUND);
    if !admitted {
        for (a, b) in &repeats {
            problems.push(format!(
                "bytes {a}..{b} arrived twice (duplicate; the backend counted {replayed} bytes \
                 sent again after a crash)"
            ));
        }
    }
    if gaps(&runs) > a.iterations as usize {
        problems.push(format!(
            "{} gaps in the lines with {} kills: data went missing with no kill to explain it \
             (the port counted {dropped} bytes dropped)",
            gaps(&runs),
            a.iterations
        ));
    }
    problems.extend(c.errors().iter().map(|e| format!("client: {e}")));
    problems.extend(
        a.bounds
            .check(&[&backend_usage, &qemu_usage, &driver_usage]),
    );
    let reconnects = reader.state.connects.load(Ordering::Acquire);
    println!("--- console soak with QEMU: summary ---");
    println!(
        "kills: {} in {kill_secs:.1} s; lines received {} ({} B), gaps {} (one per kill at most), \
         bytes of torn lines {}, client reattached {reconnects} times; the port counted \
         {dropped} bytes dropped; delivered twice {repeated} B in {} places (counted by the \
         backend as sent again after a crash: {replayed} B)",
        a.iterations,
        c.lines(),
        c.received(),
        gaps(&runs),
        c.torn(),
        repeats.len()
    );
    for s in [&lost_lines, &t_up, &t_resumed] {
        println!("{}", s.summary());
    }
    a.bounds
        .print(&[&backend_usage, &qemu_usage, &driver_usage]);
    drop(c);
    if a.bounds.json.is_some() {
        let doc = serde_json::json!({
            "backend": "vhost-user-console", "front_end": "QEMU",
            "kills": a.iterations, "kill_seconds": kill_secs,
            "lines": reader.state.check().lines(), "gaps": gaps(&runs),
            "dropped": dropped, "duplicated": repeated, "counted_replayed": replayed,
            "lost_lines": lost_lines.json(), "times_ms": [t_up.json(), t_resumed.json()],
            "backend_usage": backend_usage.json(), "qemu_usage": qemu_usage.json(),
            "driver_usage": driver_usage.json(), "problems": problems,
        });
        a.bounds.write_json(&doc)?;
    }
    let _ = guest.kill();
    Ok(problems)
}

/// Counter `key` of the stream port (0 when the stats do not answer).
fn port_counter(stats_path: &Path, key: &str) -> u64 {
    stats(stats_path)
        .and_then(|doc| {
            doc["ports"].as_array()?.iter().find_map(|p| {
                (p["vm"] == STREAM_PORT.0 && p["port"] == STREAM_PORT.1)
                    .then(|| p[key].as_u64())
                    .flatten()
            })
        })
        .unwrap_or(0)
}
