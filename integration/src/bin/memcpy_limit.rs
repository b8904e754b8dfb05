//! `memcpy_limit`: what this machine can copy, for benchmarks to be read against. Copies
//! 64 KiB blocks (one console chain) with the C library's memcpy, the way a backend moves
//! bytes between guests, in two settings:
//! - `dram`: source and destination together far larger than the last-level cache, so every
//!   block comes from and goes to memory;
//! - `cache`: a small working set that stays in cache.
//!
//! Prints one JSON line with GB/s (10^9 bytes per second) for each. A measurement, not a test.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// Bytes per copy: one console chain in the benchmarks.
const BLOCK: usize = 64 * 1024;

/// Measure memcpy of 64 KiB blocks from memory and in cache; print one JSON line of GB/s.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Seconds to copy in each setting.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Bytes of each of source and destination for `dram` (default: the last-level cache
    /// size from sysfs plus 64 MiB, at least 256 MiB).
    #[arg(long)]
    dram_bytes: Option<usize>,
    /// Bytes of each of source and destination for `cache`.
    #[arg(long, default_value_t = 256 * 1024)]
    cache_bytes: usize,
}

/// The largest cache of CPU 0 per sysfs, in bytes.
fn llc_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let text = std::fs::read_to_string(e.ok()?.path().join("size")).ok()?;
        let t = text.trim();
        let (num, mult) = match t.strip_suffix('K') {
            Some(n) => (n, 1024),
            None => match t.strip_suffix('M') {
                Some(n) => (n, 1024 * 1024),
                None => (t, 1),
            },
        };
        num.parse::<usize>().ok().map(|n| n * mult)
    })
    .max()
}

/// Copies `BLOCK`-sized pieces from `src` to `dst`, walking both buffers, for `secs`.
/// Returns bytes per second.
fn copy_rate(src: &[u8], dst: &mut [u8], secs: f64) -> f64 {
    let blocks = src.len().min(dst.len()) / BLOCK;
    let want = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut copied = 0usize;
    let mut i = 0usize;
    while start.elapsed() < want {
        // Check the clock every 64 blocks (4 MiB) only.
        for _ in 0..64 {
            let at = i % blocks * BLOCK;
            dst[at..at + BLOCK].copy_from_slice(black_box(&src[at..at + BLOCK]));
            black_box(&mut dst[at]);
            copied += BLOCK;
            i += 1;
        }
    }
    copied as f64 / start.elapsed().as_secs_f64()
}

/// A buffer of `n` bytes, touched so its pages exist before the clock starts.
fn buffer(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    for (i, b) in v.iter_mut().enumerate().step_by(4096) {
        *b = i as u8;
    }
    v
}

fn main() -> ExitCode {
    let a = Args::parse();
    let llc = llc_bytes();
    let dram_bytes = a
        .dram_bytes
        .unwrap_or_else(|| (llc.unwrap_or(0) + (64 << 20)).max(256 << 20));
    if dram_bytes < BLOCK || a.cache_bytes < BLOCK {
        eprintln!("memcpy_limit: buffers must hold at least one 64 KiB block");
        return ExitCode::from(2);
    }
    let (src, mut dst) = (buffer(a.cache_bytes), buffer(a.cache_bytes));
    let cache = copy_rate(&src, &mut dst, a.seconds);
    drop((src, dst));
    let (src, mut dst) = (buffer(dram_bytes), buffer(dram_bytes));
    let dram = copy_rate(&src, &mut dst, a.seconds);
    println!(
        "{}",
        serde_json::json!({
            "block_bytes": BLOCK,
            "llc_bytes": llc,
            "dram_buffer_bytes": dram_bytes,
            "cache_buffer_bytes": a.cache_bytes,
            "dram_gb_per_s": dram / 1e9,
            "cache_gb_per_s": cache / 1e9,
        })
    );
    ExitCode::SUCCESS
}
