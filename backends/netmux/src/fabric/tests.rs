//! The switch driven through virtio-queue's mock rings: drops by reason, a full RX ring, the
//! headers that leave, the TX pass budget.

use std::sync::{Arc, Mutex};

use devshare_common::chain::{Memory, MemoryAtomic};
use vm_memory::GuestMemoryAtomic;

use super::*;
use crate::config::Mode;
use crate::testing::*;
use crate::uplink::{SendOutcome, VlanTag};
use crate::virtio_net::NetHdr;
use crate::virtio_net::{GSO_TCPV4, HDR_LEN_LEGACY};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// A guest that negotiated VERSION_1 only (no MRG_RXBUF, no offloads).
const PLAIN: u64 = 1 << VIRTIO_F_VERSION_1;
const IP: u16 = 0x0800;
const BCAST: MacAddr = MacAddr::BROADCAST;
const EXT: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x99]);

struct Switch {
    fabric: Fabric,
    uplink: Arc<Mutex<crate::testing::LinkLog>>,
    host: Option<Arc<Mutex<crate::testing::LinkLog>>>,
}

fn switch(
    vlans: &[Option<u16>],
    mode: Mode,
    uplink: SendOutcome,
    host: Option<SendOutcome>,
) -> Switch {
    let (up, up_log) = fake_link("up", uplink);
    let host = host.map(|o| fake_link("host", o));
    let host_log = host.as_ref().map(|(_, l)| l.clone());
    let host = host.map(|(link, _)| (link, MacAddr([0x02, 0, 0, 0, 0, 0xaa])));
    Switch {
        fabric: Fabric::new(&config(vlans, mode), up, host),
        uplink: up_log,
        host: host_log,
    }
}

/// Gives guests `first..` their ports' receive sides (VERSION_1 only negotiated).
fn attach(f: &Fabric, guests: &[Guest<'_>], first: usize, atomic: &MemoryAtomic) {
    for (k, g) in guests.iter().enumerate() {
        let port = f.port(first + k).unwrap();
        port.ensure_attached(|| Some(g.rx_path(atomic, PLAIN)));
    }
}

fn drops(f: &Fabric, port: usize, reason: &str) -> u64 {
    let doc = serde_json::to_value(f.stats()).unwrap();
    doc["ports"][port]["drops"][reason].as_u64().unwrap()
}

fn counter(f: &Fabric, port: usize, name: &str) -> u64 {
    let doc = serde_json::to_value(f.stats()).unwrap();
    doc["ports"][port][name].as_u64().unwrap()
}

/// Every drop reason of the sender's side, each counted as such and nothing else.
#[test]
fn frames_from_a_guest_are_dropped_and_counted_by_reason() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let sw = switch(
        &[None, None, Some(5)],
        Mode::Bridge,
        SendOutcome::Sent,
        None,
    );
    let f = &sw.fabric;
    let mut g: Vec<Guest<'_>> = (0..3).map(|i| Guest::new(&mem, &atomic, i)).collect();
    g[1].post_rx(8, 2048);
    g[2].post_rx(8, 2048);
    attach(f, &g[1..3], 1, &atomic);
    let mut gso = frame(mac(1), mac(0), IP, 100);
    gso[1] = GSO_TCPV4;
    gso[4] = 64;
    g[0].send(&[
        frame(mac(1), EXT, IP, 60),                                   // spoofed
        frame(BCAST, mac(0), 0x8100, 60),                             // tagged
        frame(BCAST, mac(0), 0x88a8, 60),                             // tagged
        frame(MacAddr([1, 0x80, 0xc2, 0, 0, 0]), mac(0), 0x0026, 60), // link-local
        frame(mac(0), mac(0), IP, 60),                                // hairpin
        vec![0u8; HDR + 10],                                          // bad frame: short
        gso,                                                          // bad frame: GSO, no checksum
    ]);
    let buf = g[0].buffer(100, &[]);
    g[0].tx_chains(&[desc(buf, 100, WRITE, 0)]); // bad chain: writable on TX
    g[0].tx_chains(&[desc(MEM_SIZE as u64, 100, 0, 0)]); // bad chain: outside memory
    g[0].tx_chains(&[desc(buf, 60, NEXT, 1), desc(buf, 0, 0, 0)]); // bad chain: empty buffer
                                                                   // And frames that go through: to guest 1, out of the uplink, flooded.
    g[0].send(&[
        frame(mac(1), mac(0), IP, 60),
        frame(EXT, mac(0), IP, 70),
        frame(BCAST, mac(0), IP, 80),
    ]);
    assert_eq!(drain(f, 0, &mem, &mut g[0]), 1);
    assert_eq!(g[0].tx_used(), 13, "every chain is returned");
    for (reason, n) in [
        ("spoofed", 1),
        ("tagged", 2),
        ("link_local", 1),
        ("hairpin", 1),
        ("bad_frame", 2),
        ("bad_chain", 3),
        ("private", 0),
        ("uplink_busy", 0),
        ("rx_no_buffer", 0),
    ] {
        assert_eq!(drops(f, 0, reason), n, "{reason}: {}", f.stats_json());
    }
    // Parsed frames count as sent by the guest, whatever became of them.
    assert_eq!(counter(f, 0, "tx_packets"), 8);
    // Guest 1 got the unicast and the broadcast; guest 2 (VLAN 5) nothing.
    let got: Vec<Vec<u8>> = g[1].rx_frames().into_iter().map(|(_, b)| b).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(&got[0][HDR..HDR + 6], &mac(1).0);
    assert_eq!(&got[1][HDR..HDR + 6], &BCAST.0);
    assert!(g[2].rx_frames().is_empty());
    // The uplink got the unknown unicast and the broadcast, each behind a legacy header.
    let sent = &sw.uplink.lock().unwrap().sent;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].len(), HDR_LEN_LEGACY + 70);
    assert_eq!(&sent[0][HDR_LEN_LEGACY..HDR_LEN_LEGACY + 6], &EXT.0);
    assert_eq!(&sent[1][HDR_LEN_LEGACY..HDR_LEN_LEGACY + 6], &BCAST.0);
    let doc = serde_json::to_value(f.stats()).unwrap();
    assert_eq!(doc["uplink"]["tx_packets"], 2);
}

/// A tagged port's frames leave with its tag; what the receiving guest gets carries none.
#[test]
fn a_vlan_ports_frames_are_tagged_on_the_uplink_only() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let sw = switch(&[Some(42), Some(42)], Mode::Bridge, SendOutcome::Sent, None);
    let f = &sw.fabric;
    let mut g: Vec<Guest<'_>> = (0..2).map(|i| Guest::new(&mem, &atomic, i)).collect();
    g[1].post_rx(4, 2048);
    f.port(1)
        .unwrap()
        .ensure_attached(|| Some(g[1].rx_path(&atomic, PLAIN)));
    let sent_frame = frame(BCAST, mac(0), IP, 64);
    g[0].send(std::slice::from_ref(&sent_frame));
    drain(f, 0, &mem, &mut g[0]);
    let up = &sw.uplink.lock().unwrap().sent;
    assert_eq!(up.len(), 1);
    let wire = &up[0][HDR_LEN_LEGACY..];
    assert_eq!(&wire[..12], &sent_frame[HDR..HDR + 12]);
    assert_eq!(&wire[12..16], &[0x81, 0x00, 0x00, 42]);
    assert_eq!(&wire[16..], &sent_frame[HDR + 12..]);
    let got = g[1].rx_frames();
    assert_eq!(&got[0].1[HDR..], &sent_frame[HDR..]);
}

/// Drops on the link side, counted on the sending port: busy and refused, uplink and host
/// port; and private mode.
#[test]
fn link_drops_and_private_mode_are_counted_on_the_sender() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    for (up, host, reasons) in [
        (
            SendOutcome::Busy,
            SendOutcome::Refused,
            ["uplink_busy", "host_refused"],
        ),
        (
            SendOutcome::Refused,
            SendOutcome::Busy,
            ["uplink_refused", "host_busy"],
        ),
    ] {
        let sw = switch(&[None, None], Mode::Private, up, Some(host));
        let f = &sw.fabric;
        let mut g0 = Guest::new(&mem, &atomic, 0);
        // A broadcast goes to the uplink and the host port; unicast to guest 1 is private.
        g0.send(&[frame(BCAST, mac(0), IP, 60), frame(mac(1), mac(0), IP, 60)]);
        drain(f, 0, &mem, &mut g0);
        assert_eq!(drops(f, 0, reasons[0]), 1, "{}", f.stats_json());
        assert_eq!(drops(f, 0, reasons[1]), 1, "{}", f.stats_json());
        assert_eq!(drops(f, 0, "private"), 1);
        assert!(sw.uplink.lock().unwrap().sent.is_empty());
        assert!(sw.host.as_ref().unwrap().lock().unwrap().sent.is_empty());
    }
}

/// Drops on the receiving side, each counted on the receiver as such.
#[test]
fn frames_for_a_guest_are_dropped_and_counted_by_reason() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let sw = switch(&[None; 6], Mode::Bridge, SendOutcome::Sent, None);
    let f = &sw.fabric;
    let mut g: Vec<Guest<'_>> = (0..6).map(|i| Guest::new(&mem, &atomic, i)).collect();
    // 1: attached, ring empty. 2: buffers too small, no MRG_RXBUF. 3: a readable buffer.
    // 4: fine, but no TSO. 5: not attached at all.
    g[2].post_rx(2, 64);
    let b = g[3].buffer(2048, &[]);
    g[3].post_rx_raw(&[desc(b, 2048, 0, 0)]);
    g[4].post_rx(2, 2048);
    attach(f, &g[1..5], 1, &atomic);
    let mut tso = frame(mac(4), mac(0), IP, 200);
    tso[0] = 1; // NEEDS_CSUM
    tso[1] = GSO_TCPV4;
    tso[4] = 100;
    tso[6] = 34; // csum_start
    tso[8] = 16; // csum_offset
    g[0].send(&[
        frame(mac(1), mac(0), IP, 60),
        frame(mac(2), mac(0), IP, 100),
        frame(mac(3), mac(0), IP, 60),
        tso,
        frame(mac(5), mac(0), IP, 60),
    ]);
    drain(f, 0, &mem, &mut g[0]);
    for (port, reason) in [
        (1, "rx_no_buffer"),
        (2, "rx_too_big"),
        (3, "rx_bad_chain"),
        (4, "rx_offload"),
        (5, "rx_down"),
    ] {
        assert_eq!(drops(f, port, reason), 1, "port {port}: {}", f.stats_json());
        assert_eq!(counter(f, port, "rx_packets"), 0);
    }
    // The malformed RX chain went back to its guest, empty.
    assert_eq!(g[3].rx_frames(), vec![(0, vec![])]);
    assert_eq!(drops(f, 0, "bad_frame") + drops(f, 0, "bad_chain"), 0);
}

/// Found by the net fuzz target: a checksum request that starts in the Ethernet header made
/// netmux, completing the checksum for a receiver without GUEST_CSUM, write the sum over the
/// source MAC it had checked (or over the type: a VLAN tag). Such a frame is malformed.
#[test]
fn a_checksum_request_cannot_rewrite_the_checked_headers() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let sw = switch(&[None, None], Mode::Bridge, SendOutcome::Sent, None);
    let f = &sw.fabric;
    let mut g: Vec<Guest<'_>> = (0..2).map(|i| Guest::new(&mem, &atomic, i)).collect();
    g[1].post_rx(8, 2048);
    attach(f, &g[1..2], 1, &atomic);
    let mut frames = Vec::new();
    for (start, offset) in [(0u16, 5u16), (0, 6), (2, 10), (0, 12)] {
        for dst in [mac(1), EXT] {
            let mut fr = frame(dst, mac(0), IP, 60);
            fr[0] = 1; // NEEDS_CSUM
            fr[6..8].copy_from_slice(&start.to_le_bytes());
            fr[8..10].copy_from_slice(&offset.to_le_bytes());
            frames.push(fr);
        }
    }
    g[0].send(&frames);
    drain(f, 0, &mem, &mut g[0]);
    for (_, bytes) in g[1].rx_frames() {
        assert_eq!(
            &bytes[HDR + 6..HDR + 14],
            &[&mac(0).0[..], &IP.to_be_bytes()[..]].concat()[..],
            "a received frame's source or type was rewritten"
        );
    }
    assert!(sw.uplink.lock().unwrap().sent.is_empty());
    assert_eq!(drops(f, 0, "bad_frame"), 8, "{}", f.stats_json());
}

/// A guest whose RX ring is full (empty of buffers) costs drops on its own port only: the
/// sender's ring is drained in one pass and every chain returned, another receiver gets all
/// its frames.
#[test]
fn a_full_rx_ring_costs_drops_on_that_port_only() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let sw = switch(&[None, None, None], Mode::Bridge, SendOutcome::Sent, None);
    let f = &sw.fabric;
    let mut g: Vec<Guest<'_>> = (0..3).map(|i| Guest::new(&mem, &atomic, i)).collect();
    g[2].post_rx(100, 2048);
    attach(f, &g[1..3], 1, &atomic);
    let frames: Vec<Vec<u8>> = (0..200)
        .map(|k| frame(mac(1 + k % 2), mac(0), IP, 60))
        .collect();
    g[0].send(&frames[..100]);
    assert_eq!(drain(f, 0, &mem, &mut g[0]), 1);
    g[0].send(&frames[100..]);
    assert_eq!(drain(f, 0, &mem, &mut g[0]), 1);
    assert_eq!(g[0].tx_used(), 200);
    assert_eq!(drops(f, 1, "rx_no_buffer"), 100);
    assert_eq!(counter(f, 2, "rx_packets"), 100);
    assert_eq!(g[2].rx_frames().len(), 100);
    assert_eq!(drops(f, 2, "rx_no_buffer"), 0);
    assert_eq!(counter(f, 0, "tx_packets"), 200);
}

/// A pass stops at its work budget and says so; the rest waits for the next pass. A ring of
/// chains as long as the queue allows (through indirect tables) yields after a few of them.
#[test]
fn a_tx_pass_yields_after_its_budget() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let sw = switch(&[None], Mode::Bridge, SendOutcome::Sent, None);
    let f = &sw.fabric;
    let mut g = Guest::new(&mem, &atomic, 0);
    const CHAINS: u16 = 200;
    let head = frame(EXT, mac(0), IP, 14);
    for _ in 0..CHAINS {
        // A table of QSIZE entries: the header and Ethernet header, then one byte each.
        let first = g.buffer(head.len(), &head);
        let byte = g.buffer(1, &[0xab]);
        let table: Vec<_> = (0..QSIZE)
            .map(|i| {
                let flags = if i + 1 < QSIZE { NEXT } else { 0 };
                match i {
                    0 => desc(first, head.len() as u32, flags, 1),
                    _ => desc(byte, 1, flags, i + 1),
                }
            })
            .collect();
        let at = g.buffer(16 * usize::from(QSIZE), &[]);
        for (k, d) in table.iter().enumerate() {
            vm_memory::Bytes::write_obj(&mem, *d, vm_memory::GuestAddress(at + 16 * k as u64))
                .unwrap();
        }
        g.tx_chains(&[desc(at, 16 * u32::from(QSIZE), INDIRECT, 0)]);
    }
    assert_eq!(
        f.transmit(0, 0, HDR, &mem, &g.tx_signalled, &mut g.tx),
        TxEnd::Yielded
    );
    let first_pass = g.tx_used();
    assert!(
        first_pass > 0 && first_pass < CHAINS,
        "{first_pass} chains in the first pass"
    );
    let passes = drain(f, 0, &mem, &mut g);
    assert!(passes > 1);
    assert_eq!(g.tx_used(), CHAINS);
    assert_eq!(counter(f, 0, "tx_packets"), u64::from(CHAINS));
    assert_eq!(drops(f, 0, "bad_chain"), 0);
    let sent = &sw.uplink.lock().unwrap().sent;
    assert_eq!(sent.len(), usize::from(CHAINS));
    assert_eq!(sent[0].len(), HDR_LEN_LEGACY + 14 + usize::from(QSIZE) - 1);
}

/// The host copy of the Ethernet header is what leaves, not what the guest's memory holds
/// by the time the frame is sent. (The race itself is shown with a second thread in the
/// harness test `a_source_mac_rewritten_while_frames_are_sent_never_gets_out`; here the
/// uplink rewrites guest memory from inside `send`, the latest moment there is.)
#[test]
fn what_leaves_is_what_was_checked() {
    struct Rewriter {
        inner: Box<dyn Uplink>,
        mem: Memory,
        at: u64,
    }
    impl Uplink for Rewriter {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn raw_fd(&self) -> std::os::fd::RawFd {
            self.inner.raw_fd()
        }
        fn send(&self, batch: &mut crate::uplink::TxBatch) {
            vm_memory::Bytes::write_slice(&self.mem, &[0x99], vm_memory::GuestAddress(self.at))
                .unwrap();
            self.inner.send(batch)
        }
        fn recv(&self, batch: &mut crate::uplink::RxBatch) -> std::io::Result<usize> {
            self.inner.recv(batch)
        }
        fn hw_addr(&self) -> std::io::Result<MacAddr> {
            self.inner.hw_addr()
        }
    }
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let mut g = Guest::new(&mem, &atomic, 0);
    let bytes = frame(EXT, mac(0), IP, 60);
    let addr = g.buffer(bytes.len(), &bytes);
    g.tx_chains(&[desc(addr, bytes.len() as u32, 0, 0)]);
    let (inner, log) = fake_link("up", SendOutcome::Sent);
    let up = Box::new(Rewriter {
        inner,
        mem: mem.clone(),
        at: addr + (HDR + 11) as u64,
    });
    let f = Fabric::new(&config(&[None], Mode::Bridge), up, None);
    drain(&f, 0, &mem, &mut g);
    let sent = &log.lock().unwrap().sent;
    assert_eq!(&sent[0][HDR_LEN_LEGACY..], &bytes[HDR..]);
}

/// An untagged Ethernet frame (no virtio-net header) to `dst`, with `tags` (TPID, VLAN id)
/// outermost first, then an IPv4 type and a 46-byte payload.
fn tagged(dst: MacAddr, tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&EXT.0);
    for &(tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&IP.to_be_bytes());
    f.extend((0..46u8).map(|b| b.wrapping_mul(7)));
    f
}

/// Frames from the uplink reach an access port with exactly its own 802.1Q tag taken off;
/// S-tagged and double-tagged (QinQ) frames reach no guest and are counted, whether the
/// kernel took the outer tag off or it is inline.
#[test]
fn access_ports_get_only_their_own_tag_taken_off_from_uplink_frames() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    // Port 0 untagged, port 1 in VLAN 10.
    let sw = switch(&[None, Some(10)], Mode::Bridge, SendOutcome::Sent, None);
    let f = &sw.fabric;
    let mut g: Vec<Guest<'_>> = (0..2).map(|i| Guest::new(&mem, &atomic, i)).collect();
    for guest in &mut g {
        guest.post_rx(16, 2048);
    }
    attach(f, &g, 0, &atomic);
    let c_tag = |vid| Some(VlanTag { tpid: 0x8100, vid });
    let s_tag = |vid| Some(VlanTag { tpid: 0x88a8, vid });
    let plain = |dst| tagged(dst, &[]);
    // (kernel tag, frame bytes, the port it must reach with `plain(dst)`, or the counter)
    type Case = (Option<VlanTag>, Vec<u8>, Result<usize, &'static str>);
    let cases: Vec<Case> = vec![
        (None, tagged(mac(1), &[(0x8100, 10)]), Ok(1)),
        (c_tag(10), plain(mac(1)), Ok(1)),
        (None, plain(mac(0)), Ok(0)),
        // A priority tag (VLAN id 0) is no VLAN.
        (None, tagged(mac(0), &[(0x8100, 0)]), Ok(0)),
        (c_tag(0), plain(mac(0)), Ok(0)),
        // QinQ: the port's tag outside, another inside.
        (
            None,
            tagged(mac(1), &[(0x8100, 10), (0x8100, 20)]),
            Err("rx_double_tagged"),
        ),
        (
            c_tag(10),
            tagged(mac(1), &[(0x8100, 20)]),
            Err("rx_double_tagged"),
        ),
        (
            None,
            tagged(mac(0), &[(0x8100, 0), (0x8100, 20)]),
            Err("rx_double_tagged"),
        ),
        (
            c_tag(10),
            tagged(mac(1), &[(0x88a8, 20)]),
            Err("rx_double_tagged"),
        ),
        // 802.1ad outer tags, with or without a C-tag inside, for either port.
        (
            None,
            tagged(mac(1), &[(0x88a8, 10), (0x8100, 10)]),
            Err("rx_s_tagged"),
        ),
        (None, tagged(mac(0), &[(0x88a8, 10)]), Err("rx_s_tagged")),
        (None, tagged(mac(0), &[(0x9100, 10)]), Err("rx_s_tagged")),
        (s_tag(10), plain(mac(1)), Err("rx_s_tagged")),
        (
            s_tag(10),
            tagged(mac(1), &[(0x8100, 10)]),
            Err("rx_s_tagged"),
        ),
    ];
    let mut delivered = [0usize; 2];
    let mut counted = std::collections::HashMap::<&str, u64>::new();
    for (i, (tag, bytes, want)) in cases.into_iter().enumerate() {
        let dst = MacAddr::from_slice(&bytes).unwrap();
        let mut data = bytes.clone();
        let mut signals = Signals::default();
        f.forward_from_link(
            Link::Uplink,
            NetHdr::default(),
            tag,
            &mut data,
            &mut signals,
        );
        match want {
            Ok(port) => {
                delivered[port] += 1;
                let got = g[port].rx_frames();
                assert_eq!(got.len(), delivered[port], "case {i}: {}", f.stats_json());
                let (_, last) = got.last().unwrap();
                assert_eq!(&last[HDR..], &plain(dst)[..], "case {i}");
            }
            Err(counter) => *counted.entry(counter).or_default() += 1,
        }
        for (port, guest) in g.iter().enumerate() {
            assert_eq!(
                guest.rx_frames().len(),
                delivered[port],
                "case {i}, port {port}"
            );
        }
        let doc = serde_json::to_value(f.stats()).unwrap();
        for name in ["rx_double_tagged", "rx_s_tagged"] {
            let want = counted.get(name).copied().unwrap_or(0);
            assert_eq!(doc["uplink"][name], want, "case {i}: {name}");
        }
    }
}

/// The host port's MAC is the TAP interface's own: a frame from the host side with another
/// source (a TAP in a bridge passes on other stations' frames) is dropped and counted
/// (`rx_spoofed`) and does not change it; when the interface's MAC changes, frames from the
/// new one pass and guests' frames for it go to the host port.
#[test]
fn the_host_port_follows_its_interface_not_the_frames() {
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let sw = switch(
        &[None],
        Mode::Bridge,
        SendOutcome::Sent,
        Some(SendOutcome::Sent),
    );
    let f = &sw.fabric;
    let host = sw.host.clone().unwrap();
    const OLD: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xaa]);
    const NEW: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xbb]);
    host.lock().unwrap().mac = Some(OLD);
    let mut g = Guest::new(&mem, &atomic, 0);
    g.post_rx(16, 2048);
    attach(f, std::slice::from_ref(&g), 0, &atomic);
    let from_host = |src: MacAddr| {
        let mut data = frame(mac(0), src, IP, 60)[HDR..].to_vec();
        let mut signals = Signals::default();
        f.forward_from_link(Link::Host, NetHdr::default(), None, &mut data, &mut signals);
    };
    let host_counter = |name: &str| {
        serde_json::to_value(f.stats()).unwrap()["host"][name]
            .as_u64()
            .unwrap()
    };
    from_host(OLD);
    assert_eq!(g.rx_frames().len(), 1);
    // Bridged frames from other stations, unicast and group sources alike.
    for src in [EXT, NEW, BCAST] {
        from_host(src);
    }
    assert_eq!(g.rx_frames().len(), 1, "{}", f.stats_json());
    assert_eq!(host_counter("rx_spoofed"), 3);
    assert_eq!(f.table.host_mac(), Some(OLD));
    // `ip link set NAME address NEW`: its frames pass once the interface has been read again
    // (at most every HOST_MAC_READ_EVERY), the old address's no longer.
    host.lock().unwrap().mac = Some(NEW);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while g.rx_frames().len() < 2 && std::time::Instant::now() < deadline {
        from_host(NEW);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(g.rx_frames().len(), 2, "{}", f.stats_json());
    assert_eq!(f.table.host_mac(), Some(NEW));
    let spoofed = host_counter("rx_spoofed");
    from_host(OLD);
    assert_eq!(g.rx_frames().len(), 2);
    assert_eq!(host_counter("rx_spoofed"), spoofed + 1);
    // A guest's unicast to the new address goes to the host port.
    g.send(&[frame(NEW, mac(0), IP, 60)]);
    drain(f, 0, &mem, &mut g);
    assert_eq!(host.lock().unwrap().sent.len(), 1, "{}", f.stats_json());
}

/// `--mtu` holds on every path: a guest frame with more than MTU bytes after its Ethernet
/// header, or a segmentation request whose segments would have, is dropped and counted
/// (`oversize`) whether it is for another guest, the uplink or everyone; frames from a link
/// longer than that reach no guest (`rx_oversize`). Frames of exactly the MTU pass.
#[test]
fn frames_longer_than_the_mtu_go_nowhere() {
    const MTU: u16 = 68;
    let mem = memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let mut cfg = config(&[None, None], Mode::Bridge);
    cfg.mtu = MTU;
    let (up, up_log) = fake_link("up", SendOutcome::Sent);
    let f = Fabric::new(&cfg, up, None);
    let mut g: Vec<Guest<'_>> = (0..2).map(|i| Guest::new(&mem, &atomic, i)).collect();
    g[1].post_rx(32, 2048);
    attach(&f, &g[1..2], 1, &atomic);
    let max = usize::from(MTU) + 14;
    // A TCP/IPv4 segmentation request for EXT: IPv4 and TCP headers of 20 bytes each.
    let tso = |gso_size: u16| {
        let mut fr = frame(EXT, mac(0), IP, 2000);
        let hdr = NetHdr {
            flags: 1, // NEEDS_CSUM
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        fr[..HDR_LEN_LEGACY].copy_from_slice(&hdr.to_bytes()[..HDR_LEN_LEGACY]);
        fr[HDR + 14] = 0x45;
        fr[HDR + 34 + 12] = 5 << 4;
        fr
    };
    g[0].send(&[
        frame(mac(1), mac(0), IP, max),
        frame(EXT, mac(0), IP, max),
        frame(mac(1), mac(0), IP, max + 1),
        frame(mac(1), mac(0), IP, 1514),
        frame(EXT, mac(0), IP, 9000),
        frame(BCAST, mac(0), IP, 1514),
        tso(usize::from(MTU) as u16 - 40),
        tso(usize::from(MTU) as u16 - 39),
    ]);
    drain(&f, 0, &mem, &mut g[0]);
    let sent: Vec<usize> = up_log
        .lock()
        .unwrap()
        .sent
        .iter()
        .map(|s| s.len() - HDR_LEN_LEGACY)
        .collect();
    assert_eq!(sent, [max, 2000], "{}", f.stats_json());
    let got: Vec<usize> = g[1]
        .rx_frames()
        .iter()
        .map(|(_, b)| b.len() - HDR)
        .collect();
    assert_eq!(got, [max], "{}", f.stats_json());
    assert_eq!(drops(&f, 0, "oversize"), 5, "{}", f.stats_json());
    // From the uplink: the same limit, plain or coalesced by the kernel (no checksum request:
    // the L4 header is found after the IP header).
    let mut signals = Signals::default();
    for len in [max, max + 1, 1514] {
        let mut data = frame(mac(1), EXT, IP, len)[HDR..].to_vec();
        f.forward_from_link(
            Link::Uplink,
            NetHdr::default(),
            None,
            &mut data,
            &mut signals,
        );
    }
    let gro = |gso_size: u16| NetHdr {
        gso_type: GSO_TCPV4,
        gso_size,
        ..Default::default()
    };
    for gso_size in [MTU - 40, MTU - 39] {
        let mut data = tso(0)[HDR..].to_vec();
        data[..6].copy_from_slice(&mac(1).0);
        data[6..12].copy_from_slice(&EXT.0);
        f.forward_from_link(Link::Uplink, gro(gso_size), None, &mut data, &mut signals);
    }
    let doc = serde_json::to_value(f.stats()).unwrap();
    assert_eq!(doc["uplink"]["rx_oversize"], 3, "{}", f.stats_json());
    // The frame of exactly the MTU; the coalesced one that fits meets the next rule: this
    // guest did not accept TSO.
    assert_eq!(g[1].rx_frames().len(), 2, "{}", f.stats_json());
    assert_eq!(drops(&f, 1, "rx_offload"), 1, "{}", f.stats_json());
}
