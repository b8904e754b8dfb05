//! What several fuzz targets share: descriptors over Unix sockets and counting open
//! descriptors ([`fds`]), guest memory laid out by the fuzzer ([`guest`]) and seed inputs for
//! the committed corpora ([`seed`]).

pub mod config;
pub mod control;
pub mod fds;
pub mod guest;
pub mod net;
pub mod relay;
pub mod ring;
pub mod seed;

/// Serializes the unit tests that run targets: they count the process's descriptors, which
/// tests running beside them would change.
#[cfg(test)]
pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
