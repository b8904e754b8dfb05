//! What a backend does on SIGTERM, SIGINT and SIGHUP, the same way in every binary.
//!
//! [`handle_signals`] starts one thread that receives the signals through `signal-hook` (the
//! handler itself only wakes the thread, so nothing unsafe runs in signal context) and:
//!
//! - **SIGTERM, SIGINT**: shut down cleanly. The sockets this process created
//!   ([`crate::listen::remove_created_sockets`]) are removed first, so no new connection can
//!   arrive; then the binary's `on_shutdown` runs (flush what must be flushed, remove PTY links
//!   and other files it made); then the process exits with status 0. Only paths this process
//!   created are removed. A second SIGTERM or SIGINT during that work ends the process at
//!   once with status 1, for an operator whose shutdown hangs.
//! - **SIGHUP**: never terminates the process (as it would by default, taking every VM's
//!   device with it). The binary's `on_reload` runs (the console reopens its log files after
//!   an external rotation; netmux has nothing to reload and only logs).
//!
//! Every signal handled is counted per process ([`signal_counts`]); the stats JSON of each
//! binary carries them as `"process": {"signals": {"hup": N, "term": N, "int": N}}`
//! ([`ProcessStats`]).

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;

use serde::Serialize;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::stats::Counter;

/// Signals handled so far by this process, by kind.
#[derive(Debug, Serialize)]
pub struct SignalCounts {
    /// SIGHUP (reload) signals.
    pub hup: Counter,
    /// SIGTERM (shut down) signals.
    pub term: Counter,
    /// SIGINT (shut down, e.g. Ctrl-C) signals.
    pub int: Counter,
}

static COUNTS: SignalCounts = SignalCounts {
    hup: Counter::new(),
    term: Counter::new(),
    int: Counter::new(),
};

/// The per-process signal counters (one set per process: signals are process-wide).
pub fn signal_counts() -> &'static SignalCounts {
    &COUNTS
}

/// The per-process part of a stats document: `{"signals": {"hup": N, "term": N, "int": N}}`.
/// Binaries put it under the top-level key `"process"`.
#[derive(Debug, Serialize)]
pub struct ProcessStats {
    /// Signals handled.
    pub signals: &'static SignalCounts,
}

impl ProcessStats {
    /// The counters of this process, serialized at their values when serialized.
    pub fn current() -> ProcessStats {
        ProcessStats { signals: &COUNTS }
    }
}

/// What a binary does on top of the common signal handling.
pub struct SignalActions {
    /// Runs on every SIGHUP, on the signal thread.
    pub on_reload: Box<dyn FnMut() + Send>,
    /// Runs once on the first SIGTERM or SIGINT, on the signal thread, after the sockets were
    /// removed and before the process exits with status 0.
    pub on_shutdown: Box<dyn FnOnce() + Send>,
}

impl SignalActions {
    /// No extra action: SIGHUP is only logged, SIGTERM/SIGINT only remove the sockets.
    pub fn none() -> SignalActions {
        SignalActions {
            on_reload: Box::new(|| {}),
            on_shutdown: Box::new(|| {}),
        }
    }
}

/// Why signal handling could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Registering the handlers failed.
    #[error("cannot install signal handlers: {0}")]
    Register(io::Error),
    /// The signal thread could not be started.
    #[error("cannot start the signal thread: {0}")]
    Thread(io::Error),
}

/// Installs the handlers described in the module documentation and starts the thread that
/// runs `actions`: [`install_signal_handlers`] and [`PendingSignals::start`] at once.
///
/// # Errors
/// [`SignalError`] when the handlers or the thread cannot be set up.
pub fn handle_signals(actions: SignalActions) -> Result<(), SignalError> {
    install_signal_handlers()?.start(actions)
}

/// Signal handlers installed, their signals held until [`PendingSignals::start`].
pub struct PendingSignals {
    signals: Signals,
    shutting_down: Arc<AtomicBool>,
}

/// Installs the handlers for SIGHUP, SIGTERM and SIGINT without acting on them yet: a signal
/// that arrives from now on is held (not its default effect: SIGHUP would kill the process,
/// SIGTERM would leave the sockets created so far behind) and handled as the module says
/// once [`PendingSignals::start`] runs. Call it first thing in `main`, before the config is
/// read and anything is created; call `start` once start-up is done, so a SIGTERM during
/// start-up removes every socket start-up created and runs the binary's `on_shutdown`. A
/// second SIGTERM or SIGINT while the first is held ends the process at once with status 1.
///
/// # Errors
/// [`SignalError::Register`] when the handlers cannot be installed.
pub fn install_signal_handlers() -> Result<PendingSignals, SignalError> {
    let shutting_down = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        // Armed by the first SIGTERM or SIGINT itself (the handlers run in the order they
        // were registered): the second then exits at once, also while the first is still
        // held because start-up has not finished.
        signal_hook::flag::register_conditional_shutdown(sig, 1, shutting_down.clone())
            .map_err(SignalError::Register)?;
        signal_hook::flag::register(sig, shutting_down.clone()).map_err(SignalError::Register)?;
    }
    let signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(SignalError::Register)?;
    // Handled from here on, so take them even if the parent started us with them blocked (a
    // supervisor may do so to hand over a signal sent during exec): one left blocked would
    // never be acted on.
    unblock(&[SIGHUP, SIGTERM, SIGINT]).map_err(SignalError::Register)?;
    Ok(PendingSignals {
        signals,
        shutting_down,
    })
}

fn unblock(sigs: &[i32]) -> io::Result<()> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned here; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for &sig in sigs {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

impl PendingSignals {
    /// Starts the thread that handles the signals held so far and every later one with
    /// `actions`.
    ///
    /// # Errors
    /// [`SignalError::Thread`] when the thread cannot be started.
    pub fn start(self, actions: SignalActions) -> Result<(), SignalError> {
        let PendingSignals {
            mut signals,
            shutting_down,
        } = self;
        let SignalActions {
            mut on_reload,
            on_shutdown,
        } = actions;
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut on_shutdown = Some(on_shutdown);
                for sig in signals.forever() {
                    match sig {
                        SIGHUP => {
                            COUNTS.hup.inc();
                            log::info!("SIGHUP: reloading; every VM keeps being served");
                            on_reload();
                        }
                        SIGTERM | SIGINT => {
                            let name = if sig == SIGTERM {
                                COUNTS.term.inc();
                                "SIGTERM"
                            } else {
                                COUNTS.int.inc();
                                "SIGINT"
                            };
                            shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
                            log::info!("{name}: shutting down");
                            for p in crate::listen::close_and_remove_created_sockets() {
                                log::debug!("removed {}", p.display());
                            }
                            if let Some(f) = on_shutdown.take() {
                                f();
                            }
                            log::info!("shut down cleanly");
                            std::process::exit(0);
                        }
                        _ => {}
                    }
                }
            })
            .map_err(SignalError::Thread)?;
        Ok(())
    }
}
