//! Counters of every port, updated on the data path and read by the stats socket without
//! taking any VM's lock.

use std::sync::atomic::{AtomicU64, Ordering};

use devshare_common::stats::Counter;

/// Counters of one port, readable while running.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Bytes the guest sent that reached the host side.
    pub to_host: Counter,
    /// Bytes delivered into the guest.
    pub to_guest: Counter,
    /// Console output dropped because the buffer was full (oldest first).
    pub dropped: Counter,
    /// Descriptor chains refused as malformed.
    pub bad_chains: Counter,
    /// Guest output accepted and waiting in the port's buffer for its endpoint (with
    /// `--state-dir` it survives a restart).
    pub buffered: AtomicU64,
}

impl PortStats {
    /// Sets the bytes waiting in the port's buffer.
    pub fn set_buffered(&self, n: usize) {
        self.buffered.store(n as u64, Ordering::Relaxed);
    }
}
