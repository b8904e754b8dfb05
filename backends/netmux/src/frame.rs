//! A frame on its way through the switch: where its bytes are, and the host copy of the
//! headers every decision is made on.
//!
//! A guest may rewrite its TX buffers at any moment, from another vCPU, while netmux works on
//! them. So the virtio-net header and the Ethernet header (addresses and type) of a guest's
//! frame are copied into host memory once ([`GuestFrame::parse`]); anti-spoofing, VLAN and
//! link-local rules and the switching decision read that copy, and that same copy is what the
//! receiver or the link gets, followed by the rest of the frame from guest memory. Bytes
//! after the Ethernet header decide nothing here.

use devshare_common::chain::GuestBuffers;

use crate::config::MacAddr;
use crate::virtio_net::{NetHdr, F_NEEDS_CSUM, GSO_NONE};

/// Ethernet header: two MACs and the type.
pub const ETH_HLEN: usize = 14;
/// Ethernet type of an 802.1Q tag (C-tag), the one tag an access port's VLAN is carried in.
pub const ETH_P_8021Q: u16 = 0x8100;
/// TPIDs of VLAN tags: 802.1Q (C-tag), 802.1ad (S-tag), and the pre-802.1ad QinQ TPIDs
/// switches still accept when configured for them (Linux names them ETH_P_QINQ1..3). No access
/// port sends or receives a frame that carries one: a guest's 0x9100 tag would reach another
/// VLAN on such a switch just as a 0x8100 one would.
pub const VLAN_TPIDS: [u16; 5] = [ETH_P_8021Q, 0x88a8, 0x9100, 0x9200, 0x9300];
/// Largest frame a guest may send: a 64 KiB segment plus Ethernet and VLAN headers.
pub const MAX_GUEST_FRAME: usize = 65536 + ETH_HLEN + 4;

/// An Ethernet header, in host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHeader(pub [u8; ETH_HLEN]);

impl EthHeader {
    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        MacAddr([
            self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5],
        ])
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        MacAddr([
            self.0[6], self.0[7], self.0[8], self.0[9], self.0[10], self.0[11],
        ])
    }

    /// The Ethernet type (or TPID of a VLAN tag).
    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes([self.0[12], self.0[13]])
    }
}

/// Why a guest's TX frame was refused before switching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the virtio-net and Ethernet headers, longer than [`MAX_GUEST_FRAME`], or a
    /// virtio-net header whose checksum or segmentation request does not fit the frame.
    Malformed,
}

/// A frame a guest queued for transmission, with its headers copied to host memory.
#[derive(Clone, Copy)]
pub struct GuestFrame<'a, 'm> {
    /// The virtio-net header (checksum and segmentation requests), as copied.
    pub hdr: NetHdr,
    /// The Ethernet header, as copied.
    pub eth: EthHeader,
    /// The sender's chain.
    pub bufs: &'a GuestBuffers<'m>,
    /// Where the bytes after the Ethernet header start in the chain's readable part.
    pub body: usize,
}

impl<'a, 'm> GuestFrame<'a, 'm> {
    /// Copies the headers of the frame in `bufs` (which starts with a virtio-net header of
    /// `hdr_len` bytes) and checks them.
    #[inline]
    pub fn parse(bufs: &'a GuestBuffers<'m>, hdr_len: usize) -> Result<Self, FrameError> {
        let mut head = [0u8; 12 + ETH_HLEN];
        let need = hdr_len + ETH_HLEN;
        let frame_len = bufs.readable_len().saturating_sub(hdr_len);
        if bufs.readable_len() < need
            || frame_len > MAX_GUEST_FRAME
            || need > head.len()
            || bufs.read_at(0, &mut head[..need]) != need
        {
            return Err(FrameError::Malformed);
        }
        let hdr = NetHdr::from_bytes(&head[..hdr_len]);
        if !hdr.csum_in_bounds(frame_len)
            || (hdr.gso_type != GSO_NONE && (hdr.gso_size == 0 || hdr.flags & F_NEEDS_CSUM == 0))
        {
            return Err(FrameError::Malformed);
        }
        let mut eth = [0u8; ETH_HLEN];
        eth.copy_from_slice(&head[hdr_len..hdr_len + ETH_HLEN]);
        Ok(GuestFrame {
            hdr,
            eth: EthHeader(eth),
            bufs,
            body: need,
        })
    }

    /// The Ethernet frame's length in bytes.
    pub fn len(&self) -> usize {
        ETH_HLEN + self.bufs.readable_len().saturating_sub(self.body)
    }

    /// Never true: a parsed frame has at least its Ethernet header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The frame as a receiver takes it.
    pub fn as_frame(&self) -> Frame<'a, 'm> {
        Frame {
            hdr: self.hdr,
            ethertype: self.eth.ethertype(),
            payload: Payload::Guest {
                eth: self.eth,
                bufs: self.bufs,
                body: self.body,
            },
        }
    }
}

/// A frame to be received by a guest: where its bytes are and what its header says.
#[derive(Clone, Copy)]
pub struct Frame<'a, 'm> {
    /// The virtio-net header that came with it (checksum and segmentation requests).
    pub hdr: NetHdr,
    /// The Ethernet type (for offload decisions).
    pub ethertype: u16,
    /// The bytes of the frame.
    pub payload: Payload<'a, 'm>,
}

/// Where a frame's bytes are.
#[derive(Clone, Copy)]
pub enum Payload<'a, 'm> {
    /// From a guest: the Ethernet header as copied, then the sender's buffers from `body` to
    /// the end of their readable part.
    Guest {
        /// The Ethernet header, in host memory.
        eth: EthHeader,
        /// The sender's chain.
        bufs: &'a GuestBuffers<'m>,
        /// Where the bytes after the Ethernet header start in the chain.
        body: usize,
    },
    /// In host memory (read from the uplink or the host port).
    Host(&'a [u8]),
}

impl Payload<'_, '_> {
    /// Frame length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Guest { bufs, body, .. } => {
                ETH_HLEN + bufs.readable_len().saturating_sub(*body)
            }
            Payload::Host(d) => d.len(),
        }
    }

    /// True for an empty frame.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first bytes of the frame when they are in host memory apart from the rest (a
    /// guest frame's Ethernet header), so a receiver can write them together with its own
    /// header; empty otherwise.
    pub fn host_prefix(&self) -> &[u8] {
        match self {
            Payload::Guest { eth, .. } => &eth.0,
            Payload::Host(_) => &[],
        }
    }

    /// Copies frame bytes from `from` on into `dst`'s writable part at `dst_offset`; returns
    /// how many were copied.
    pub fn copy_into(&self, from: usize, dst: &GuestBuffers<'_>, dst_offset: usize) -> usize {
        match self {
            Payload::Guest { eth, bufs, body } => {
                let mut done = 0;
                if from < ETH_HLEN {
                    done = dst.write_at(dst_offset, &eth.0[from..]);
                    if done < ETH_HLEN - from {
                        return done;
                    }
                }
                let rest = body + from.saturating_sub(ETH_HLEN);
                done + bufs.copy_to(rest, dst, dst_offset + done)
            }
            Payload::Host(d) => d
                .get(from..)
                .map(|rest| dst.write_at(dst_offset, rest))
                .unwrap_or(0),
        }
    }

    /// Reads frame bytes from `from` on into `out`; returns how many were read.
    pub fn read(&self, from: usize, out: &mut [u8]) -> usize {
        match self {
            Payload::Guest { eth, bufs, body } => {
                let mut done = 0;
                if from < ETH_HLEN {
                    let head = &eth.0[from..];
                    done = head.len().min(out.len());
                    out[..done].copy_from_slice(&head[..done]);
                }
                let rest = body + from.saturating_sub(ETH_HLEN);
                done + bufs.read_at(rest, &mut out[done..])
            }
            Payload::Host(d) => {
                let rest = d.get(from..).unwrap_or(&[]);
                let n = rest.len().min(out.len());
                out[..n].copy_from_slice(&rest[..n]);
                n
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devshare_common::chain::Memory;
    use vm_memory::{Bytes, GuestAddress};

    fn chain<'m>(mem: &'m Memory, bytes: &[u8], pieces: &[usize]) -> GuestBuffers<'m> {
        let mut b = GuestBuffers::empty(0);
        let mut at = 0;
        for (k, &n) in pieces.iter().enumerate() {
            let addr = 0x1000 * (k as u64 + 1);
            mem.write_slice(&bytes[at..at + n], GuestAddress(addr))
                .unwrap();
            b.push_buffer(mem, addr, n as u32, false).unwrap();
            at += n;
        }
        b
    }

    #[test]
    fn the_copied_header_is_what_receivers_get() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(&[0xff; 6]);
        bytes.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00]);
        bytes.extend((0..40u8).map(|i| i + 1));
        // The headers straddle buffers.
        let bufs = chain(&mem, &bytes, &[5, 15, 46]);
        let f = GuestFrame::parse(&bufs, 12).unwrap();
        assert_eq!(f.eth.src(), MacAddr([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(f.eth.ethertype(), 0x0800);
        assert_eq!(f.len(), 54);
        // The guest rewrites its source MAC after the check: nothing that leaves sees it.
        // (Byte 23 of the chain: the third buffer's fourth byte.)
        mem.write_slice(&[0x99], GuestAddress(0x3003)).unwrap();
        let p = f.as_frame().payload;
        let mut out = vec![0u8; 54];
        assert_eq!(p.read(0, &mut out), 54);
        assert_eq!(&out[..], &bytes[12..]);
        let mut part = [0u8; 6];
        assert_eq!(p.read(10, &mut part), 6);
        assert_eq!(part, [0, 1, 0x08, 0x00, 1, 2]);
        // Into a receiver's buffers, from the start and from inside the header.
        let mut dst = GuestBuffers::empty(1);
        dst.push_buffer(&mem, 0x8000, 20, true).unwrap();
        dst.push_buffer(&mem, 0x9000, 100, true).unwrap();
        assert_eq!(p.copy_into(0, &dst, 2), 54);
        let mut back = [0u8; 120];
        mem.read_slice(&mut back[..20], GuestAddress(0x8000))
            .unwrap();
        mem.read_slice(&mut back[20..], GuestAddress(0x9000))
            .unwrap();
        assert_eq!(&back[2..56], &bytes[12..]);
        assert_eq!(p.copy_into(12, &dst, 0), 42);
        mem.read_slice(&mut back[..20], GuestAddress(0x8000))
            .unwrap();
        assert_eq!(&back[..2], &[0x08, 0x00]);
    }

    #[test]
    fn short_or_inconsistent_frames_are_refused() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let short = chain(&mem, &[0u8; 25], &[25]);
        assert!(GuestFrame::parse(&short, 12).is_err());
        let mut bytes = vec![0u8; 12 + 60];
        // GSO without a checksum request.
        bytes[1] = 1;
        bytes[4] = 64;
        let gso = chain(&mem, &bytes, &[72]);
        assert!(GuestFrame::parse(&gso, 12).is_err());
        let fine = chain(&mem, &[0u8; 72], &[72]);
        assert!(GuestFrame::parse(&fine, 12).is_ok());
    }
}
