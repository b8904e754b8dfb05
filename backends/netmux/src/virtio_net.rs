//! virtio-net wire formats: the per-packet header, the feature bits this device offers, the
//! device configuration space, and the offload rules that decide whether a receiver can take a
//! frame as it is.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::frame::ETH_HLEN;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of the header with `num_buffers` (VERSION_1 or MRG_RXBUF).
pub const HDR_LEN: usize = 12;
/// Size of the legacy header without `num_buffers`; also what AF_PACKET and TAP use.
pub const HDR_LEN_LEGACY: usize = 10;

/// `flags`: the checksum from `csum_start` on is still to be computed.
pub const F_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `flags`: the checksum was already verified.
pub const F_DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
/// `gso_type`: none.
pub const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
/// `gso_type`: UDP segmentation (USO).
pub const GSO_UDP_L4: u8 = VIRTIO_NET_HDR_GSO_UDP_L4 as u8;
/// `gso_type` flag: TCP ECN.
pub const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// `VHOST_USER_F_PROTOCOL_FEATURES`: lets the front-end negotiate vhost-user protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Guest-to-device offloads: the guest may hand over partial checksums and large segments.
pub const HOST_OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_USO);

/// Device-to-guest offloads: the guest accepts partial checksums and large segments.
pub const GUEST_OFFLOADS: u64 = bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_USO4)
    | bit(VIRTIO_NET_F_GUEST_USO6);

/// The virtio features a port offers; `MQ` is added when it has more than one queue pair.
pub fn device_features(queue_pairs: u16) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | HOST_OFFLOADS
        | GUEST_OFFLOADS
        | VHOST_USER_F_PROTOCOL_FEATURES;
    if queue_pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    f
}

/// What a guest driver accepted, in the terms the data path needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated(pub u64);

impl Negotiated {
    fn has(&self, b: u32) -> bool {
        self.0 & bit(b) != 0
    }

    /// Header length on this guest's rings.
    pub fn hdr_len(&self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            HDR_LEN
        } else {
            HDR_LEN_LEGACY
        }
    }

    /// A received frame may span several RX buffers.
    pub fn mergeable_rx(&self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// Whether this guest can receive a frame with header `h` unchanged; if only the checksum
    /// is in the way, the sender completes it (see [`RxFixup`]).
    pub fn rx_fixup(&self, h: &NetHdr, ethertype: u16) -> RxFixup {
        let csum = self.has(VIRTIO_NET_F_GUEST_CSUM);
        let gso_ok = match h.gso_type & !GSO_ECN {
            GSO_NONE => true,
            GSO_TCPV4 => self.has(VIRTIO_NET_F_GUEST_TSO4),
            GSO_TCPV6 => self.has(VIRTIO_NET_F_GUEST_TSO6),
            GSO_UDP_L4 => match ethertype {
                0x0800 => self.has(VIRTIO_NET_F_GUEST_USO4),
                0x86dd => self.has(VIRTIO_NET_F_GUEST_USO6),
                _ => false,
            },
            _ => false,
        } && (h.gso_type & GSO_ECN == 0 || self.has(VIRTIO_NET_F_GUEST_ECN));
        if h.gso_type != GSO_NONE {
            // Segments only make sense with checksum offload; without it they cannot go.
            return if gso_ok && csum {
                RxFixup::AsIs
            } else {
                RxFixup::Refuse
            };
        }
        if csum {
            RxFixup::AsIs
        } else if h.flags & F_NEEDS_CSUM != 0 {
            RxFixup::CompleteChecksum
        } else {
            RxFixup::ClearFlags
        }
    }
}

/// What must happen to a frame before a given guest may receive it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxFixup {
    /// Pass header and frame unchanged.
    AsIs,
    /// Pass the frame but clear the header's checksum flags (the guest did not ask for them).
    ClearFlags,
    /// Compute the pending checksum in software, then clear the flags.
    CompleteChecksum,
    /// The guest cannot take this large segment; drop it.
    Refuse,
}

/// The virtio-net packet header, host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to repeat in every segment.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// RX only: how many buffers the frame spans.
    pub num_buffers: u16,
}

impl NetHdr {
    /// Reads a header of `len` (10 or 12) bytes.
    pub fn from_bytes(b: &[u8]) -> NetHdr {
        let u16_at = |o: usize| {
            b.get(o..o + 2)
                .map(|s| u16::from_le_bytes([s[0], s[1]]))
                .unwrap_or(0)
        };
        NetHdr {
            flags: b.first().copied().unwrap_or(0),
            gso_type: b.get(1).copied().unwrap_or(0),
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// The 12-byte encoding; take the first 10 for the legacy layout.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Whether the checksum request lies inside a frame of `frame_len` bytes, after its
    /// Ethernet header. No checksum covers the MAC addresses or the type; and netmux itself
    /// completes a checksum for a receiver that did not negotiate GUEST_CSUM (as the kernel
    /// does for a link), so one placed in the Ethernet header would rewrite the very fields
    /// the switch checked (a forged source MAC, a VLAN type).
    pub fn csum_in_bounds(&self, frame_len: usize) -> bool {
        self.flags & F_NEEDS_CSUM == 0
            || (usize::from(self.csum_start) >= ETH_HLEN
                && usize::from(self.csum_start) + usize::from(self.csum_offset) + 2 <= frame_len)
    }
}

/// Folds a running ones'-complement sum of `data` into `sum` (RFC 1071). `odd` says whether an
/// odd number of bytes came before, so a sum can be built over scattered pieces.
pub fn csum_add(mut sum: u64, data: &[u8], odd: &mut bool) -> u64 {
    let mut rest = data;
    if *odd {
        if let Some((&b, tail)) = rest.split_first() {
            sum += u64::from(b);
            rest = tail;
            *odd = false;
        }
    }
    let mut chunks = rest.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u64::from(*b) << 8;
        *odd = true;
    }
    sum
}

/// Finishes a sum from [`csum_add`] into the 16-bit checksum to store.
pub fn csum_finish(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHdr::from_bytes(&h.to_bytes()), h);
        let legacy = NetHdr::from_bytes(&h.to_bytes()[..HDR_LEN_LEGACY]);
        assert_eq!(legacy.num_buffers, 0);
        assert!(h.csum_in_bounds(52));
        assert!(!h.csum_in_bounds(51));
        // A checksum in the Ethernet header is out of bounds, wherever its field ends.
        for (start, offset) in [(0, 6), (0, 12), (13, 30), (4, 16)] {
            let h = NetHdr {
                csum_start: start,
                csum_offset: offset,
                ..h
            };
            assert!(!h.csum_in_bounds(1500), "start {start}, offset {offset}");
        }
        let h = NetHdr {
            csum_start: ETH_HLEN as u16,
            csum_offset: 10,
            ..h
        };
        assert!(h.csum_in_bounds(1500));
    }

    #[test]
    fn rx_fixups() {
        let all = Negotiated(device_features(1));
        let bare = Negotiated(bit(VIRTIO_F_VERSION_1));
        let tso = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            ..Default::default()
        };
        let partial = NetHdr {
            flags: F_NEEDS_CSUM,
            ..Default::default()
        };
        let valid = NetHdr {
            flags: F_DATA_VALID,
            ..Default::default()
        };
        assert_eq!(all.rx_fixup(&tso, 0x0800), RxFixup::AsIs);
        assert_eq!(bare.rx_fixup(&tso, 0x0800), RxFixup::Refuse);
        assert_eq!(bare.rx_fixup(&partial, 0x0800), RxFixup::CompleteChecksum);
        assert_eq!(bare.rx_fixup(&valid, 0x0800), RxFixup::ClearFlags);
        let uso = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            ..Default::default()
        };
        assert_eq!(all.rx_fixup(&uso, 0x86dd), RxFixup::AsIs);
        assert_eq!(all.rx_fixup(&uso, 0x0806), RxFixup::Refuse);
        assert_eq!(bare.hdr_len(), HDR_LEN);
        assert_eq!(Negotiated(0).hdr_len(), HDR_LEN_LEGACY);
    }

    #[test]
    fn checksum_matches_rfc1071_example_across_pieces() {
        // RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        let mut odd = false;
        let whole = csum_add(0, &data, &mut odd);
        assert_eq!(csum_finish(whole), !0xddf2);
        let mut odd = false;
        let mut s = csum_add(0, &data[..3], &mut odd);
        s = csum_add(s, &data[3..], &mut odd);
        assert_eq!(csum_finish(s), !0xddf2);
    }
}
