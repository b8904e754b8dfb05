//! Steady traffic through one console data port, on a thread of its own, for tests that check
//! that one VM or port keeps moving while something else happens to another.
//!
//! Each round the guest sends 4 KiB (in two segments), the port's client reads them and
//! answers 1 KiB, and the guest receives that; both directions are compared byte for byte.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::console_guest::ConsoleGuest;
use crate::testdata::pattern;

/// How long one receive of a round may take before the traffic counts as failed.
const ROUND_WAIT: Duration = Duration::from_secs(10);

/// Round trips through port `port` of a guest, until [`finish`](Self::finish).
pub struct RoundTrips {
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RoundTrips {
    /// Starts the rounds between guest `g`'s port `port` (8 receive buffers of `rx_len` bytes
    /// posted first) and `client`, the port's endpoint client.
    pub fn start(mut g: ConsoleGuest, port: usize, rx_len: u32, mut client: UnixStream) -> Self {
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let (r, s, f) = (rounds.clone(), stop.clone(), failure.clone());
        let handle = thread::spawn(move || {
            if let Err(e) = g.post_rx(port, 8, rx_len, 1) {
                *lock(&f) = Some(e.to_string());
                return;
            }
            let mut round = |n: u32| -> Result<(), String> {
                let out = pattern(4096, n);
                g.send(port, &out, 2).map_err(|e| e.to_string())?;
                let mut got = vec![0u8; out.len()];
                client.read_exact(&mut got).map_err(|e| e.to_string())?;
                if got != out {
                    return Err(format!("round {n}: output corrupted"));
                }
                let input = pattern(1024, n + 1_000_000);
                client.write_all(&input).map_err(|e| e.to_string())?;
                let got = g
                    .recv_exact(port, input.len(), ROUND_WAIT)
                    .map_err(|e| e.to_string())?;
                if got != input {
                    return Err(format!("round {n}: input corrupted"));
                }
                Ok(())
            };
            while !s.load(Ordering::Relaxed) {
                let n = r.load(Ordering::Relaxed) as u32;
                if let Err(e) = round(n) {
                    *lock(&f) = Some(e);
                    return;
                }
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        RoundTrips {
            rounds,
            stop,
            failure,
            handle: Some(handle),
        }
    }

    /// Rounds completed so far; panics (`what` naming the traffic) if they failed.
    pub fn rounds(&self, what: &str) -> u64 {
        if let Some(e) = self.failure() {
            panic!("{what} failed: {e}");
        }
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until a few more rounds went through than when called; panics
    /// (`what` naming the traffic, `after` what happened meanwhile) if they failed or stalled.
    pub fn check_moving(&self, what: &str, after: &str, timeout: Duration) {
        let start = self.rounds.load(Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        while self.rounds.load(Ordering::Relaxed) < start + 3 {
            if let Some(e) = self.failure() {
                panic!("{what} failed after {after}: {e}");
            }
            assert!(Instant::now() < deadline, "{what} stalled after {after}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the rounds and returns how many went through; panics (`what` naming the traffic)
    /// if they failed.
    pub fn finish(mut self, what: &str) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.rounds(what)
    }

    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}

impl Drop for RoundTrips {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(m: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
