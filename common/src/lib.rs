//! Shared pieces of the devshare vhost-user backends: daemon lifecycle ([`daemon`]), the
//! front-end message relay ([`relay`]) and its memory-table check ([`mem_table`]),
//! split-ring access ([`ring`], on the vrings of [`vring`]) and descriptor-chain access
//! ([`chain`]), configuration ([`config`]), counters ([`stats`]), rate-limited logging of
//! guest-caused events ([`ratelimit`]), listening sockets ([`listen`]), signals
//! ([`signals`]), private files ([`files`]) and the QEMU options that differ between QEMU
//! versions ([`qemu`]).

pub mod chain;
pub mod config;
pub mod daemon;
pub mod files;
#[cfg(test)]
mod idle_backend;
pub mod listen;
pub mod mem_table;
pub mod output;
pub mod pit;
pub mod qemu;
pub mod ratelimit;
pub mod relay;
pub mod ring;
pub mod signals;
pub mod stats;
pub mod vring;
mod worker_exit;

/// The `log` crate, for [`warn_limited!`] in crates that name it differently or not at all.
#[doc(hidden)]
pub use log as __log;

/// Serializes the unit tests that change process-wide state (the umask, the list of created
/// sockets), which would otherwise see each other's changes.
#[cfg(test)]
pub(crate) static PROCESS_STATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
pub(crate) fn process_state_lock() -> std::sync::MutexGuard<'static, ()> {
    PROCESS_STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A thread name made from `name` (a VM or port name from a config file or the command line):
/// every control character (NUL among them, with which `std::thread::Builder::spawn` panics)
/// becomes `?`. Names are for `ps`/`top`/debuggers only; the kernel keeps the first 15 bytes.
pub fn thread_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Starts logging to stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .try_init();
}

#[cfg(test)]
mod thread_name_tests {
    #[test]
    fn names_with_control_characters_still_name_a_thread() {
        let name = super::thread_name("vm-a\0b\n\u{7f}c");
        assert_eq!(name, "vm-a?b??c");
        let t = std::thread::Builder::new().name(name).spawn(|| ()).unwrap();
        t.join().unwrap();
    }
}
