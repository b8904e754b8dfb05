//! Crash points for tests, in debug builds only.
//!
//! `DEVSHARE_CONSOLE_CRASH_AT=NAME[:N]` makes a debug build send itself SIGKILL the N-th time
//! (default: the first) it passes the point `NAME` of the data path. A real SIGKILL lands
//! most often right where these points are: the kernel acts on a signal when a system call
//! returns, after the call did its work and before the process could record it. Tests use
//! them to kill the backend at exactly that moment, every time, instead of hoping a kill
//! from outside hits it. Release builds compile the points to nothing and ignore the
//! variable.
//!
//! The points (see where [`reached`] is called):
//! - `guest-output-read`: stream mode, guest output has left QEMU's socket;
//! - `stream-peeked`: stream mode, guest output was copied into the buffer but the copy is
//!   not yet published (nor taken out of QEMU's socket);
//! - `stream-buffered`: stream mode, the copy is published but not yet taken out of QEMU's
//!   socket;
//! - `host-write`: a write of guest output to the host side (an endpoint, or a linked
//!   guest's receive buffers) returned having taken bytes;
//! - `chain-buffered`: virtio mode, bytes of a transmit chain went into the buffer, the
//!   chain is not yet marked used.

/// The environment variable that arms a crash point.
pub const CRASH_AT: &str = "DEVSHARE_CONSOLE_CRASH_AT";

/// The process passes crash point `name` (see the module docs): a no-op unless a debug build
/// was armed for it, and then SIGKILL on the pass it was armed for.
#[inline]
pub fn reached(name: &str) {
    #[cfg(debug_assertions)]
    armed::reached(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct Plan {
        name: String,
        pass: u64,
        passed: AtomicU64,
    }

    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();

    fn plan() -> Option<&'static Plan> {
        PLAN.get_or_init(|| {
            let spec = std::env::var(super::CRASH_AT).ok()?;
            let (name, pass) = match spec.split_once(':') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            log::warn!("crash point armed: {name} (pass {pass})");
            Some(Plan {
                name,
                pass,
                passed: AtomicU64::new(0),
            })
        })
        .as_ref()
    }

    pub(super) fn reached(name: &str) {
        let Some(p) = plan() else { return };
        if p.name != name || p.passed.fetch_add(1, Ordering::AcqRel) + 1 != p.pass {
            return;
        }
        log::warn!("crash point {name} reached: SIGKILL");
        // SAFETY: kill(2) on our own pid with a signal number; no memory is involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
