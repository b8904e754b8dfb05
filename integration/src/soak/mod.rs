//! Building blocks of the soak drivers (`soak_console`, `soak_netmux`, run by
//! `scripts/soak.sh`): they SIGKILL and restart a backend over and over under traffic and
//! check what survived.
//!
//! - [`lines`]: numbered fixed-width lines a writer sends, and the reader-side check that
//!   splits what arrived into contiguous runs.
//! - [`accounting`]: the runs held against the writer's sessions: every byte delivered, lost
//!   while unaccepted, lost although accepted, or duplicated.
//! - [`usage`]: a process's open descriptors, resident memory and threads, from `/proc`.
//! - [`series`]: one number per iteration, its first/last/max, and the flatness bound.
//! - [`backend`]: the backend under test, killed with SIGKILL and started again.
//! - [`socket`]: how much of what a writer sent its peer has read (the stream acknowledgement).
//! - [`driver`]: what the drivers' mains share: the bounds options, the descriptor watch, the
//!   scratch directory and the verdict.
//! - [`pace`]: a token bucket for a steady rate, and a small seeded generator for kill points.

pub mod accounting;
pub mod backend;
pub mod driver;
pub mod lines;
pub mod pace;
pub mod series;
pub mod socket;
pub mod usage;

use std::time::{Duration, Instant};

/// Polls `ready` every `step` until it holds; Err(what) once `timeout` passed. Returns how
/// long it took. This is the only way the soak waits for something: on a readiness signal
/// (a counter, a socket, a received line), with a timeout that only ends a stuck run.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    step: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        if ready() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        std::thread::sleep(step);
    }
}
