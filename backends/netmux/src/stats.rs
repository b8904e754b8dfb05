//! netmux's counters and the stats document built from them.
//!
//! Each counter is a field of a struct that derives `Serialize`, so its name in the JSON
//! document (`vhost-user-netmux stats`) is the field's name, written once. The document:
//!
//! ```text
//! { "uplink": { "name": ..., <LinkCounters> },
//!   "ports": [ { "name", "mac", "vlan", "queue_pairs", "connected", <PortCounters> }, ... ],
//!   "host":   { "name": ..., <LinkCounters>, "mac": ... } }      (with --host-port only)
//! ```
//!
//! Counters only grow (frames and bytes since the process started); a port's survive its
//! guest's reconnects.

use devshare_common::stats::Counter;
use serde::Serialize;

/// What one guest port counts.
#[derive(Debug, Default, Serialize)]
pub struct PortCounters {
    /// Frames taken from the guest's TX rings (sent by the guest, whatever became of them).
    pub tx_packets: Counter,
    /// Bytes of those frames (Ethernet frame, without the virtio-net header).
    pub tx_bytes: Counter,
    /// Frames written into the guest's RX rings.
    pub rx_packets: Counter,
    /// Bytes of those frames.
    pub rx_bytes: Counter,
    /// Times a front-end connected.
    pub connects: Counter,
    /// Times a front-end went away.
    pub disconnects: Counter,
    /// Frames from or for this guest that were dropped, by reason.
    pub drops: PortDrops,
}

/// Why a guest port's frames were dropped: one counter per reason. The `rx_` ones are frames
/// for this guest; the others are frames it sent.
#[derive(Debug, Default, Serialize)]
pub struct PortDrops {
    /// Source MAC not the port's (anti-spoofing).
    pub spoofed: Counter,
    /// To another guest in private mode.
    pub private: Counter,
    /// Addressed to the sender itself.
    pub hairpin: Counter,
    /// Carrying the guest's own 802.1Q or 802.1ad tag (guests are on access ports).
    pub tagged: Counter,
    /// To a link-local group address 01:80:c2:00:00:00..0f (STP, LACP, 802.1X, LLDP, ...),
    /// which a bridge never forwards.
    pub link_local: Counter,
    /// Malformed TX descriptor chains (outside memory, broken links, loops, empty or
    /// device-writable buffers, longer than the queue), and a TX ring found unusable.
    pub bad_chain: Counter,
    /// Frames too short, too long or with an inconsistent virtio-net header, or in more
    /// pieces than the host can send at once.
    pub bad_frame: Counter,
    /// The uplink could not take the frame right now (its queue was full).
    pub uplink_busy: Counter,
    /// The uplink refused the frame (e.g. a bad offload request).
    pub uplink_refused: Counter,
    /// The host port's TAP could not take the frame right now.
    pub host_busy: Counter,
    /// The host port's TAP refused the frame.
    pub host_refused: Counter,
    /// For this guest: its RX ring had no (or not enough) buffers.
    pub rx_no_buffer: Counter,
    /// For this guest: larger than one RX buffer while it did not accept MRG_RXBUF.
    pub rx_too_big: Counter,
    /// For this guest: a large segment while it did not accept the matching offload.
    pub rx_offload: Counter,
    /// For this guest: not connected, or its ring not running.
    pub rx_down: Counter,
    /// For this guest: malformed RX descriptor chains (taken back empty).
    pub rx_bad_chain: Counter,
}

/// What a host-side link (the uplink, or the host port) counts. `tx` is towards the link,
/// `rx` from it.
#[derive(Debug, Default, Serialize)]
pub struct LinkCounters {
    /// Frames sent.
    pub tx_packets: Counter,
    /// Bytes sent.
    pub tx_bytes: Counter,
    /// Frames received.
    pub rx_packets: Counter,
    /// Bytes received.
    pub rx_bytes: Counter,
    /// Received unicast frames for no guest.
    pub rx_not_for_us: Counter,
    /// Received frames claiming a guest's MAC as source.
    pub rx_local_source: Counter,
    /// Received frames too short or truncated.
    pub rx_bad_frame: Counter,
    /// Received frames whose outer tag is an 802.1ad S-tag (0x88a8, or 0x9100 to 0x9300):
    /// service-provider frames, for no access port.
    pub rx_s_tagged: Counter,
    /// Received frames that carry a second tag inside the port VLAN's 802.1Q tag (QinQ): an
    /// access port's guest would get a tagged frame.
    pub rx_double_tagged: Counter,
    /// Receive errors other than "nothing there".
    pub rx_errors: Counter,
}

/// One guest port in the stats document.
#[derive(Serialize)]
pub struct PortDoc<'a> {
    /// Port name.
    pub name: &'a str,
    /// The guest's MAC.
    pub mac: String,
    /// Its VLAN, `null` when untagged.
    pub vlan: Option<u16>,
    /// Queue pairs offered.
    pub queue_pairs: u16,
    /// Whether a front-end is connected now.
    pub connected: bool,
    /// The counters.
    #[serde(flatten)]
    pub counters: &'a PortCounters,
}

/// A host-side link in the stats document.
#[derive(Serialize)]
pub struct LinkDoc<'a> {
    /// `af-packet:IFACE` or `tap:NAME`.
    pub name: String,
    /// The counters.
    #[serde(flatten)]
    pub counters: &'a LinkCounters,
    /// The host's MAC on the host port (absent for the uplink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The whole stats document.
#[derive(Serialize)]
pub struct StatsDoc<'a> {
    /// The uplink.
    pub uplink: LinkDoc<'a>,
    /// Every guest port, in configuration order.
    pub ports: Vec<PortDoc<'a>>,
    /// The host port, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<LinkDoc<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn the_document_keeps_its_shape() {
        let port = PortCounters::default();
        port.tx_packets.add(3);
        port.drops.spoofed.inc();
        let up = LinkCounters::default();
        up.rx_errors.inc();
        let doc = StatsDoc {
            uplink: LinkDoc {
                name: "af-packet:eth0".into(),
                counters: &up,
                mac: None,
            },
            ports: vec![PortDoc {
                name: "vm1",
                mac: "52:54:00:00:00:01".into(),
                vlan: Some(10),
                queue_pairs: 1,
                connected: true,
                counters: &port,
            }],
            host: None,
        };
        let v: Value = serde_json::to_value(&doc).unwrap();
        let zero_drops: Value = json!({
            "spoofed": 1, "private": 0, "hairpin": 0, "tagged": 0, "link_local": 0,
            "bad_chain": 0, "bad_frame": 0, "uplink_busy": 0, "uplink_refused": 0,
            "host_busy": 0, "host_refused": 0, "rx_no_buffer": 0, "rx_too_big": 0,
            "rx_offload": 0, "rx_down": 0, "rx_bad_chain": 0,
        });
        assert_eq!(
            v,
            json!({
                "uplink": {
                    "name": "af-packet:eth0", "tx_packets": 0, "tx_bytes": 0, "rx_packets": 0,
                    "rx_bytes": 0, "rx_not_for_us": 0, "rx_local_source": 0,
                    "rx_bad_frame": 0, "rx_s_tagged": 0, "rx_double_tagged": 0, "rx_errors": 1,
                },
                "ports": [{
                    "name": "vm1", "mac": "52:54:00:00:00:01", "vlan": 10, "queue_pairs": 1,
                    "connected": true, "tx_packets": 3, "tx_bytes": 0, "rx_packets": 0,
                    "rx_bytes": 0, "connects": 0, "disconnects": 0, "drops": zero_drops,
                }],
            })
        );
    }
}
