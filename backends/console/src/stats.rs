//! Counters of every port, updated on the data path and read by the stats socket without
//! taking any VM's lock. The JSON document is generated from these structs: a counter's name
//! is its field name, written once.
//!
//! `{"ports":[{"vm":..,"port":..,"to_host_bytes":..,"to_guest_bytes":..,"dropped_bytes":..,
//! "bad_chains":..,"replayed_after_restart_bytes":..,"buffered_bytes":..,"attached":..,
//! "reopens":..,"rotations":..,"rotation_failures":..}, ...],
//! "process":{"signals":{"hup":..,"term":..,"int":..}}}`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::endpoint::EndpointCounters;
use devshare_common::signals::ProcessStats;
use devshare_common::stats::Counter;
use serde::{Serialize, Serializer};

/// Counters of one port, readable while running.
#[derive(Debug, Default, Serialize)]
pub struct PortStats {
    /// Bytes the guest sent that reached the host side.
    pub to_host_bytes: Counter,
    /// Bytes delivered into the guest.
    pub to_guest_bytes: Counter,
    /// Console output dropped because the buffer was full (oldest first), or kept by an
    /// earlier run that did not fit a smaller buffer, or discarded by a log that could not be
    /// rotated (shared with the endpoint's counters).
    #[serde(serialize_with = "shared_counter")]
    pub dropped_bytes: Arc<Counter>,
    /// Descriptor chains refused as malformed.
    pub bad_chains: Counter,
    /// Bytes this process sends again because the process before it died while writing
    /// them to the host side (`--state-dir`): the client (or linked guest) may get them
    /// twice. At most one write, [`crate::port::WRITE_CAP`] bytes, per crash.
    pub replayed_after_restart_bytes: Counter,
    /// Guest output accepted and waiting in the port's buffer for its endpoint (with
    /// `--state-dir` it survives a restart).
    #[serde(serialize_with = "gauge")]
    pub buffered_bytes: AtomicU64,
    /// The endpoint's own counters: `attached` (0/1), `reopens`, `rotations` (all 0 on a
    /// link).
    #[serde(flatten, serialize_with = "endpoint")]
    pub endpoint: Arc<EndpointCounters>,
}

fn shared_counter<S: Serializer>(v: &Arc<Counter>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().serialize(s)
}

fn endpoint<S: Serializer>(v: &Arc<EndpointCounters>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().serialize(s)
}

fn gauge<S: Serializer>(v: &AtomicU64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.load(Ordering::Relaxed))
}

impl PortStats {
    /// Counters at zero, beside the endpoint's own.
    pub fn new(endpoint: Arc<EndpointCounters>) -> PortStats {
        PortStats {
            dropped_bytes: endpoint.dropped_bytes.clone(),
            endpoint,
            ..PortStats::default()
        }
    }

    /// Sets the bytes waiting in the port's buffer.
    pub fn set_buffered(&self, n: usize) {
        self.buffered_bytes.store(n as u64, Ordering::Relaxed);
    }
}

/// One port's entry in the stats document.
#[derive(Debug, Serialize)]
pub struct PortReport {
    /// VM name.
    pub vm: String,
    /// Port name.
    pub port: String,
    /// Its counters.
    #[serde(flatten, serialize_with = "shared")]
    pub stats: Arc<PortStats>,
}

fn shared<S: Serializer>(v: &Arc<PortStats>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().serialize(s)
}

/// The stats document served on `--stats-socket`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every port of every VM, in configuration order.
    pub ports: Vec<PortReport>,
    /// Counters of the whole process (signals handled).
    pub process: ProcessStats,
}

impl Report {
    /// The document as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_and_shape_stay_as_documented() {
        let stats = Arc::new(PortStats::default());
        stats.to_host_bytes.add(5);
        stats.to_guest_bytes.add(6);
        stats.dropped_bytes.add(7);
        stats.bad_chains.inc();
        stats.replayed_after_restart_bytes.add(4);
        stats.set_buffered(9);
        stats
            .endpoint
            .attached
            .store(1, std::sync::atomic::Ordering::Relaxed);
        stats.endpoint.reopens.add(2);
        stats.endpoint.rotations.add(3);
        let doc = Report {
            ports: vec![PortReport {
                vm: "a".into(),
                port: "console".into(),
                stats,
            }],
            process: ProcessStats::current(),
        };
        let json = doc.to_json();
        assert!(
            json.starts_with(
                r#"{"ports":[{"vm":"a","port":"console","to_host_bytes":5,"to_guest_bytes":6,"dropped_bytes":7,"bad_chains":1,"replayed_after_restart_bytes":4,"buffered_bytes":9,"attached":1,"reopens":2,"rotations":3,"rotation_failures":0}],"process":{"signals":{"#
            ),
            "{json}"
        );
    }
}
