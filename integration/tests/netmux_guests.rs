//! vhost-user-netmux end to end: real QEMU, real Linux guests (TCG), a veth pair whose far end
//! sits in a network namespace as the "NIC". Needs root and `scripts/setup.sh`.
//!
//! The ping and the checksummed transfer run once per QEMU of the version matrix
//! (`qemu_7_2::...`, `qemu_10_0::...`, `qemu_11_1::...`, see `devshare_integration::matrix`);
//! the other tests run on the default QEMU.

mod netmux_common;

use std::os::unix::process::ExitStatusExt;

use devshare_integration::matrix::MatrixQemu;
use devshare_integration::qemu::QemuError;
use devshare_integration::qemu_matrix;
use netmux_common::*;

/// Script for guest `i`: reach every address in `targets`, show the ARP entries of `peers`,
/// report, then stay up so the others can reach it.
fn reach_script(targets: &[String], peers: &[String]) -> String {
    let mut s = String::from("fail=0\n");
    for t in targets {
        s.push_str(&format!(
            "if reach {t}; then echo \"NETMUX reach {t} ok\"; else echo \"NETMUX reach {t} FAIL\"; fail=1; fi\n"
        ));
    }
    for p in peers {
        s.push_str(&format!("echo \"NETMUX neigh $(ip neigh show {p})\"\n"));
    }
    s.push_str("echo \"NETMUX-DONE fail=$fail\"\nsleep 1000\n");
    s
}

/// Three guests ping each other and the namespace through netmux; ARP resolves through the
/// switch. Runs on every QEMU of the matrix.
fn three_guests_reach_each_other_and_the_namespace(qemu: &MatrixQemu) {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..3).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-three", &ns.host_if, &ports, &[]);
    let mut guests = Vec::new();
    for p in &ports {
        let peers: Vec<String> = (0..3).filter(|&j| j != p.index).map(guest_ip).collect();
        let mut targets = peers.clone();
        targets.push(NS_IP.to_string());
        let g = matrix_guest_builder(&nm, p, &reach_script(&targets, &peers), qemu)
            .spawn()
            .expect("spawn guest");
        guests.push(g);
    }
    for (i, g) in guests.iter_mut().enumerate() {
        let done = expect_line(g, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
        let console = g.console_output();
        assert!(
            done.contains("fail=0"),
            "guest {i} could not reach everyone:\n{console}\n--- netmux ---\n{}",
            nm.log()
        );
        // ARP went through the switch: each peer's IP resolved to that peer's MAC.
        for j in (0..3).filter(|&j| j != i) {
            let want = format!("{} dev eth0 lladdr {}", guest_ip(j), guest_mac(j));
            assert!(
                console
                    .lines()
                    .any(|l| l.contains("NETMUX neigh") && l.contains(&want)),
                "guest {i}: no ARP entry '{want}':\n{console}"
            );
        }
    }
    // The far side reaches every guest too.
    for i in 0..3 {
        ns.exec_ok(&format!("busybox ping -c 2 -W 5 {}", guest_ip(i)));
    }
    let ns_neigh = ns.exec_ok("ip neigh show");
    for i in 0..3 {
        assert!(
            ns_neigh.contains(&guest_mac(i)),
            "namespace did not learn guest {i}'s MAC: {ns_neigh}"
        );
        assert!(nm.port_counter(i, "rx_packets") > 0);
        assert!(nm.port_counter(i, "tx_packets") > 0);
        assert_eq!(nm.port_counter(i, "drops/spoofed"), 0);
    }
}

/// Retries `nc HOST PORT < FILE` until a listener takes it (the peer may still be booting).
const SEND_FN: &str = r#"
send() {
    n=0
    until nc "$1" "$2" < "$3"; do
        n=$((n+1)); [ $n -gt 90 ] && return 1
        sleep 1
    done
}
"#;

fn value_after<'a>(console: &'a str, tag: &str) -> &'a str {
    console
        .lines()
        .rev()
        .find_map(|l| l.split_once(tag).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no '{tag}' line in:\n{console}"))
}

/// 16 MiB over TCP guest to guest and each way with the namespace, SHA-256 equal at both
/// ends. Runs on every QEMU of the matrix.
fn sixteen_mib_tcp_between_guests_and_with_the_namespace(qemu: &MatrixQemu) {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-tcp", &ns.host_if, &ports, &[]);
    let scratch = devshare_integration::qemu::ScratchDir::new("netmux-tcp-ns").unwrap();
    let ns_blob = scratch.path().join("blob");
    let ns_sum = ns.exec_ok(&format!(
        "dd if=/dev/urandom of={} bs=1M count=16 2>/dev/null && sha256sum {} | cut -d' ' -f1",
        ns_blob.display(),
        ns_blob.display()
    ));
    // The namespace receives guest 0's file.
    let hold = scratch.path().join("hold");
    let ns_rx = ns.spawn(&format!(
        "mkfifo {h} && busybox nc -l -p 5001 <>{h} | sha256sum | cut -d' ' -f1",
        h = hold.display()
    ));

    let sender = format!(
        "{SEND_FN}
dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null
echo \"NETMUX sum $(sha256sum /tmp/blob | cut -d' ' -f1)\"
reach {g1}; reach {NS_IP}
send {g1} 5000 /tmp/blob && echo NETMUX sent-g2g
send {NS_IP} 5001 /tmp/blob && echo NETMUX sent-ns
echo NETMUX-DONE
sleep 1000
",
        g1 = guest_ip(1)
    );
    // A listener whose stdin ends shuts its side down at once, and busybox nc on the other end
    // then quits mid-transfer: give listeners a stdin that never ends (a FIFO opened read-write).
    let receiver = "
mkfifo /tmp/hold
nc -l -p 5000 <>/tmp/hold > /tmp/got
echo \"NETMUX got-g2g $(sha256sum /tmp/got | cut -d' ' -f1)\"
rm /tmp/got
echo NETMUX listening-ns
nc -l -p 5002 <>/tmp/hold > /tmp/got
echo \"NETMUX got-ns $(sha256sum /tmp/got | cut -d' ' -f1)\"
echo NETMUX-DONE
sleep 1000
";
    let mut g1 = matrix_guest_builder(&nm, &ports[1], receiver, qemu)
        .spawn()
        .unwrap();
    let mut g0 = matrix_guest_builder(&nm, &ports[0], &sender, qemu)
        .spawn()
        .unwrap();

    expect_line(&mut g1, &nm, "NETMUX listening-ns", GUEST_TIMEOUT);
    // Guest 1 now listens for the namespace's file.
    ns.exec_ok(&format!(
        "n=0; until busybox nc {} 5002 < {}; do n=$((n+1)); [ $n -gt 60 ] && exit 1; sleep 1; done",
        guest_ip(1),
        ns_blob.display()
    ));
    expect_line(&mut g1, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    expect_line(&mut g0, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    let c0 = g0.console_output();
    let c1 = g1.console_output();
    let sent_sum = value_after(&c0, "NETMUX sum ");
    assert!(
        c0.contains("NETMUX sent-g2g") && c0.contains("NETMUX sent-ns"),
        "{c0}"
    );
    assert_eq!(
        value_after(&c1, "NETMUX got-g2g "),
        sent_sum,
        "guest-to-guest copy differs: {}\n{c1}",
        nm.stats()
    );
    let out = ns_rx.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sent_sum,
        "guest-to-namespace copy differs"
    );
    assert_eq!(
        value_after(&c1, "NETMUX got-ns "),
        ns_sum.trim(),
        "namespace-to-guest copy differs"
    );
    // 16 MiB each way went through the counters.
    assert!(nm.port_counter(0, "tx_bytes") > 32 << 20);
    assert!(nm.port_counter(1, "rx_bytes") > 32 << 20);
}

#[test]
fn private_mode_blocks_guest_to_guest_but_not_the_uplink() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start(
        "netmux-private",
        &ns.host_if,
        &ports,
        &["--mode", "private"],
    );
    let mut guests = Vec::new();
    for p in &ports {
        let other = 1 - p.index;
        let script = format!(
            "
if reach {NS_IP}; then echo NETMUX uplink ok; else echo NETMUX uplink FAIL; fi
if ping -c 5 -W 1 {oip} >/dev/null 2>&1; then echo NETMUX peer REACHED; else echo NETMUX peer blocked; fi
echo \"NETMUX neigh $(ip neigh show {oip})\"
echo NETMUX-DONE
sleep 1000
",
            oip = guest_ip(other),
        );
        guests.push(guest_builder(&nm, p, &script).spawn().unwrap());
    }
    for g in guests.iter_mut() {
        expect_line(g, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
        let c = g.console_output();
        assert!(c.contains("NETMUX uplink ok"), "{c}");
        assert!(c.contains("NETMUX peer blocked"), "{c}");
    }
    // Not even ARP crossed: neither guest learned the other's MAC.
    for (i, g) in guests.iter().enumerate() {
        let c = g.console_output();
        assert!(
            !c.contains(&guest_mac(1 - i)),
            "guest {i} saw its peer:\n{c}"
        );
    }
}

#[test]
fn forged_source_mac_never_reaches_the_others() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-spoof", &ns.host_if, &ports, &[]);
    const FORGED: &str = "52:54:00:77:00:99";
    let watcher = format!(
        "
reach {NS_IP}
echo NETMUX ready
while :; do echo \"NETMUX neigh $(ip neigh show {g0})\"; sleep 1; done
",
        g0 = guest_ip(0)
    );
    let forger = format!(
        "
reach {NS_IP}
ip neigh flush dev eth0
ip link set eth0 down
ip link set eth0 address {FORGED}
ip link set eth0 up
if ping -c 5 -W 1 {g1} >/dev/null 2>&1; then echo NETMUX forged REACHED; else echo NETMUX forged lost; fi
if ping -c 5 -W 1 {NS_IP} >/dev/null 2>&1; then echo NETMUX forged-ns REACHED; else echo NETMUX forged-ns lost; fi
echo NETMUX forged-done
ip link set eth0 down
ip link set eth0 address {real}
ip link set eth0 up
if reach {g1}; then echo NETMUX real ok; else echo NETMUX real FAIL; fi
echo NETMUX-DONE
sleep 1000
",
        g1 = guest_ip(1),
        real = guest_mac(0)
    );
    let mut g1 = guest_builder(&nm, &ports[1], &watcher).spawn().unwrap();
    expect_line(&mut g1, &nm, "NETMUX ready", GUEST_TIMEOUT);
    let mut g0 = guest_builder(&nm, &ports[0], &forger).spawn().unwrap();
    expect_line(&mut g0, &nm, "NETMUX forged-done", GUEST_TIMEOUT);
    let dropped = nm.port_counter(0, "drops/spoofed");
    expect_line(&mut g0, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    let c0 = g0.console_output();
    assert!(c0.contains("NETMUX forged lost"), "{c0}");
    assert!(c0.contains("NETMUX forged-ns lost"), "{c0}");
    assert!(c0.contains("NETMUX real ok"), "{c0}");
    // ARP requests and pings with the forged source: 10 pings' worth at least.
    assert!(dropped >= 5, "spoofed drops: {dropped}\n{}", nm.stats());
    // Neither the other guest nor the namespace ever saw the forged address.
    let c1 = g1.console_output();
    assert!(
        !c1.contains(FORGED),
        "guest 1 learned the forged MAC:\n{c1}"
    );
    let ns_neigh = ns.exec_ok("ip neigh show");
    assert!(
        !ns_neigh.contains(FORGED),
        "namespace learned it: {ns_neigh}"
    );
}

/// Each of the steady guest's pings must be answered (a lost frame is a FAIL tick); the 30 s
/// reply bound only ever runs out for a lost frame, not for a busy machine.
#[test]
fn a_restarted_guest_does_not_disturb_the_others() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-restart", &ns.host_if, &ports, &[]);
    let steady = format!(
        "
reach {NS_IP}
echo NETMUX ready
while :; do
    if ping -c 1 -W 30 {NS_IP} >/dev/null 2>&1; then echo NETMUX tick ok; else echo NETMUX tick FAIL; fi
    sleep 1
done
"
    );
    let flaky = format!(
        "
if reach {g0} && reach {NS_IP}; then echo NETMUX up ok; else echo NETMUX up FAIL; fi
sleep 1000
",
        g0 = guest_ip(0)
    );
    let mut g0 = guest_builder(&nm, &ports[0], &steady).spawn().unwrap();
    expect_line(&mut g0, &nm, "NETMUX ready", GUEST_TIMEOUT);
    let mut g1 = guest_builder(&nm, &ports[1], &flaky).spawn().unwrap();
    assert!(expect_line(&mut g1, &nm, "NETMUX up", GUEST_TIMEOUT).contains("ok"));
    g1.kill().unwrap();
    drop(g1);
    assert!(
        eventually(std::time::Duration::from_secs(30), || nm
            .port_counter(1, "disconnects")
            >= 1),
        "netmux did not notice the guest going away: {}",
        nm.stats()
    );
    let mut g1 = guest_builder(&nm, &ports[1], &flaky).spawn().unwrap();
    assert!(expect_line(&mut g1, &nm, "NETMUX up", GUEST_TIMEOUT).contains("ok"));
    for _ in 0..3 {
        expect_line(&mut g0, &nm, "NETMUX tick", GUEST_TIMEOUT);
    }
    let c0 = g0.console_output();
    assert!(
        !c0.contains("NETMUX tick FAIL"),
        "steady guest lost traffic:\n{c0}"
    );
    assert!(nm.port_counter(1, "connects") >= 2);
    assert_eq!(nm.port_counter(0, "disconnects"), 0);
}

#[test]
fn a_multiqueue_guest_works() {
    let ns = NetNs::new();
    let mut mq = PortSpec::new(0);
    mq.queues = 2;
    let ports = vec![mq, PortSpec::new(1)];
    let nm = Netmux::start("netmux-mq", &ns.host_if, &ports, &[]);
    let mq_script = format!(
        "
echo \"NETMUX queues $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"
echo \"NETMUX cpus $(nproc)\"
if reach {g1} && reach {NS_IP}; then echo NETMUX reach ok; else echo NETMUX reach FAIL; fi
# Many flows, so both queue pairs carry traffic (frames from the uplink pick an RX queue by
# flow hash: the chance that 16 flows all land on one of two queues is 2^-15).
for port in $(seq 10 25); do
    dd if=/dev/zero bs=64k count=4 2>/dev/null | nc {NS_IP} 60$port
done
grep -E 'input[.][01]' /proc/interrupts | sed 's/^/NETMUX irq /'
echo NETMUX-DONE
sleep 1000
",
        g1 = guest_ip(1)
    );
    let scratch = devshare_integration::qemu::ScratchDir::new("netmux-mq-ns").unwrap();
    let listeners: Vec<_> = (10..=25)
        .map(|p| {
            let h = scratch.path().join(format!("hold{p}"));
            ns.spawn(&format!(
                "mkfifo {h} && busybox nc -l -p 60{p} <>{h} | wc -c",
                h = h.display()
            ))
        })
        .collect();
    let peer = "echo NETMUX-DONE; sleep 1000";
    let mut g1 = guest_builder(&nm, &ports[1], peer).spawn().unwrap();
    let mut g0 = guest_builder(&nm, &ports[0], &mq_script).spawn().unwrap();
    expect_line(&mut g0, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    expect_line(&mut g1, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    let c0 = g0.console_output();
    let queues = value_after(&c0, "NETMUX queues ");
    for q in ["rx-0", "rx-1", "tx-0", "tx-1"] {
        assert!(queues.contains(q), "guest sees queues '{queues}'");
    }
    assert!(c0.contains("NETMUX reach ok"), "{c0}");
    for l in listeners {
        let out = l.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "262144",
            "{}\n{c0}",
            nm.stats()
        );
    }
    // Both RX queues interrupted the guest: netmux delivered into both.
    for q in ["input.0", "input.1"] {
        let irqs: u64 = c0
            .lines()
            .filter(|l| l.contains("NETMUX irq") && l.trim_end().ends_with(q))
            .flat_map(|l| l.split_whitespace().filter_map(|w| w.parse::<u64>().ok()))
            .sum();
        assert!(irqs > 0, "no interrupts from RX queue {q}:\n{c0}");
    }
}

#[test]
fn a_restarted_backend_is_reconnected_by_qemu_and_traffic_resumes() {
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    backend_restart_keeps_guests_talking("netmux-backend-restart", &ports);
}

/// Client mode with real QEMUs: netmux dials a QEMU that listens (`server=on`), and after
/// netmux is killed and started again it dials again and traffic resumes.
#[test]
fn a_client_port_redials_its_listening_qemu_after_a_backend_restart() {
    let ports = vec![
        PortSpec {
            client: true,
            ..PortSpec::new(0)
        },
        PortSpec::new(1),
    ];
    backend_restart_keeps_guests_talking("netmux-client-restart", &ports);
}

/// Two guests ping the namespace and each other every second; netmux is SIGKILLed (both see
/// their pings fail), started again, and both guests' pings go through again.
fn backend_restart_keeps_guests_talking(name: &str, ports: &[PortSpec]) {
    let ns = NetNs::new();
    let mut nm = Netmux::start(name, &ns.host_if, ports, &[]);
    let pid_before = nm.process.pid();
    // Each guest pings the namespace and the other guest once a second and says how it went.
    let ticking = |peer: usize| {
        format!(
            "
if reach {NS_IP} && reach {p}; then echo NETMUX ready; else echo NETMUX ready FAIL; fi
while :; do
    if ping -c 1 -W 1 {NS_IP} >/dev/null 2>&1 && ping -c 1 -W 1 {p} >/dev/null 2>&1; then
        echo NETMUX tick ok
    else
        echo NETMUX tick FAIL
    fi
    sleep 1
done
",
            p = guest_ip(peer)
        )
    };
    let mut guests: Vec<_> = ports
        .iter()
        .map(|p| {
            guest_builder(&nm, p, &ticking(1 - p.index))
                .spawn()
                .unwrap()
        })
        .collect();
    for g in guests.iter_mut() {
        let l = expect_line(g, &nm, "NETMUX ready", GUEST_TIMEOUT);
        assert!(!l.contains("FAIL"), "{}", g.console_output());
        expect_line(g, &nm, "NETMUX tick ok", GUEST_TIMEOUT);
    }

    nm.process.kill();
    // Long enough for every guest to notice: its pings time out.
    for g in guests.iter_mut() {
        expect_line(g, &nm, "NETMUX tick FAIL", GUEST_TIMEOUT);
    }
    nm.restart();
    assert_ne!(nm.process.pid(), pid_before);
    // QEMU dials the new process (reconnect-ms) and both guests' pings go through again.
    for g in guests.iter_mut() {
        expect_line(g, &nm, "NETMUX tick ok", GUEST_TIMEOUT);
    }
    for i in 0..2 {
        assert_eq!(nm.port_counter(i, "connects"), 1, "{}", nm.stats());
        assert!(nm.port_counter(i, "rx_packets") > 0, "{}", nm.stats());
        assert!(nm.port_counter(i, "tx_packets") > 0, "{}", nm.stats());
    }
    // Both QEMUs lived through it: they answer from their consoles still.
    for g in guests.iter_mut() {
        expect_line(g, &nm, "NETMUX tick ok", GUEST_TIMEOUT);
    }
}

/// A port with `vlan=N` talks to a station on VLAN N behind the far side's veth (tagged on the
/// wire both ways); an untagged port cannot reach that station, and the tagged port cannot
/// reach the untagged far side. The host kernel here has no 802.1Q support, so the VLAN end
/// is [`VlanStation`] (a raw socket answering ARP and ping only when tagged) instead of a
/// `type vlan` sub-interface.
#[test]
fn a_vlan_port_reaches_only_its_vlan() {
    const VID: u16 = 42;
    const VLAN_NS_IP: &str = "10.78.0.254";
    let ns = NetNs::new();
    let station = VlanStation::start(&ns, VID, [10, 78, 0, 254]);
    let mut tagged = PortSpec::new(0);
    tagged.vlan = Some(VID);
    let ports = vec![tagged, PortSpec::new(1)];
    let nm = Netmux::start("netmux-vlan", &ns.host_if, &ports, &[]);
    let script = |i: usize, mine: &str, other: &str| {
        format!(
            "
ip addr add 10.78.0.{n}/24 dev eth0
if reach {mine}; then echo NETMUX own ok; else echo NETMUX own FAIL; fi
if ping -c 5 -W 1 {other} >/dev/null 2>&1; then echo NETMUX other REACHED; else echo NETMUX other blocked; fi
echo NETMUX-DONE
sleep 1000
",
            n = i + 1
        )
    };
    let mut g0 = guest_builder(&nm, &ports[0], &script(0, VLAN_NS_IP, NS_IP))
        .spawn()
        .expect("spawn tagged guest");
    let mut g1 = guest_builder(&nm, &ports[1], &script(1, NS_IP, VLAN_NS_IP))
        .spawn()
        .expect("spawn untagged guest");
    for (i, g) in [&mut g0, &mut g1].into_iter().enumerate() {
        expect_line(g, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
        let console = g.console_output();
        assert!(
            console.contains("NETMUX own ok"),
            "guest {i} did not reach its own side:\n{console}\n--- netmux ---\n{}",
            nm.log()
        );
        assert!(
            console.contains("NETMUX other blocked"),
            "guest {i} crossed into the other VLAN:\n{console}"
        );
    }
    assert!(station.answered() > 0, "the VLAN station answered nothing");
    // The namespace's untagged side never heard from the tagged guest.
    let untagged = ns.exec_ok(&format!("ip neigh show dev {}", ns.peer));
    assert!(
        !untagged.contains(&guest_mac(0)),
        "guest 0 showed up untagged: {untagged}"
    );
    assert!(nm.port_counter(0, "rx_packets") > 0);
    assert!(nm.port_counter(0, "tx_packets") > 0);
}

/// `--uplink tap:NAME`: netmux creates the TAP, the test moves it into a namespace and puts
/// the far side's address on it; a guest and the namespace ping each other and a file crosses.
#[test]
fn the_tap_uplink_carries_guest_traffic() {
    let ns = NetNs::new();
    // In this test the TAP, not the veth, is the far side.
    ns.exec_ok(&format!("ip addr flush dev {}", ns.peer));
    let tap = format!("nmxt{}", ns.name.trim_start_matches("nmxns"));
    let ports = vec![PortSpec::new(0)];
    // Start returns once the stats socket exists, which is after the TAP was opened.
    let nm = Netmux::start_on("netmux-tap", &format!("tap:{tap}"), &ports, &[]);
    // The TAP lives as long as netmux holds it open; moving it keeps the descriptor attached.
    ns.adopt(&tap);
    ns.exec_ok(&format!(
        "ip addr add {NS_IP}/24 dev {tap} && ip link set {tap} up"
    ));
    let scratch = devshare_integration::qemu::ScratchDir::new("netmux-tap-ns").unwrap();
    let hold = scratch.path().join("hold");
    let ns_rx = ns.spawn(&format!(
        "mkfifo {h} && busybox nc -l -p 5003 <>{h} | sha256sum | cut -d' ' -f1",
        h = hold.display()
    ));
    let script = format!(
        "{SEND_FN}
if reach {NS_IP}; then echo NETMUX reach ok; else echo NETMUX reach FAIL; fi
dd if=/dev/urandom of=/tmp/blob bs=1k count=256 2>/dev/null
echo \"NETMUX sum $(sha256sum /tmp/blob | cut -d' ' -f1)\"
send {NS_IP} 5003 /tmp/blob && echo NETMUX sent
echo NETMUX-DONE
sleep 1000
"
    );
    let mut g = guest_builder(&nm, &ports[0], &script).spawn().unwrap();
    expect_line(&mut g, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    let console = g.console_output();
    assert!(
        console.contains("NETMUX reach ok") && console.contains("NETMUX sent"),
        "guest could not use the TAP uplink:\n{console}\n--- netmux ---\n{}",
        nm.log()
    );
    let out = ns_rx.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        value_after(&console, "NETMUX sum "),
        "file over the TAP differs"
    );
    ns.exec_ok(&format!("busybox ping -c 2 -W 5 {}", guest_ip(0)));
    let stats = nm.stats();
    assert_eq!(stats["uplink"]["name"], format!("tap:{tap}"));
    assert!(
        stats["uplink"]["rx_packets"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert!(
        stats["uplink"]["tx_packets"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
}

/// `--host-port NAME`: the host's own stack (here a second namespace holding the TAP) reaches
/// an untagged guest by ping and TCP both ways, is not bridged to the uplink, and a tagged
/// guest cannot reach it; the MAC given with `--host-mac` is the one the host end carries.
#[test]
fn the_host_port_lets_the_host_reach_its_guests() {
    const HOST_IP: &str = "10.77.0.200";
    const HOST_MAC: &str = "02:77:00:00:00:c8";
    let ns = NetNs::new();
    // A second namespace plays the host; its veth is not used.
    let host = NetNs::new();
    host.exec_ok(&format!("ip addr flush dev {}", host.peer));
    let tap = format!("nmxo{}", host.name.trim_start_matches("nmxns"));
    let ports = vec![
        PortSpec::new(0),
        PortSpec {
            vlan: Some(42),
            ..PortSpec::new(1)
        },
    ];
    let nm = Netmux::start(
        "netmux-host",
        &ns.host_if,
        &ports,
        &["--host-port", &tap, "--host-mac", HOST_MAC],
    );
    host.adopt(&tap);
    host.exec_ok(&format!(
        "ip addr add {HOST_IP}/24 dev {tap} && ip link set {tap} up"
    ));
    let link = host.exec_ok(&format!("ip link show {tap}"));
    assert!(link.contains(HOST_MAC), "--host-mac not applied: {link}");

    let scratch = devshare_integration::qemu::ScratchDir::new("netmux-host-ns").unwrap();
    let blob = scratch.path().join("blob");
    let host_sum = host.exec_ok(&format!(
        "dd if=/dev/urandom of={b} bs=1M count=4 2>/dev/null && sha256sum {b} | cut -d' ' -f1",
        b = blob.display()
    ));
    let hold = scratch.path().join("hold");
    let host_rx = host.spawn(&format!(
        "mkfifo {h} && busybox nc -l -p 5004 <>{h} | sha256sum | cut -d' ' -f1",
        h = hold.display()
    ));
    let g0_script = format!(
        "{SEND_FN}
if reach {HOST_IP}; then echo NETMUX reach-host ok; else echo NETMUX reach-host FAIL; fi
if reach {NS_IP}; then echo NETMUX reach-ns ok; else echo NETMUX reach-ns FAIL; fi
dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null
echo \"NETMUX sum $(sha256sum /tmp/blob | cut -d' ' -f1)\"
send {HOST_IP} 5004 /tmp/blob && echo NETMUX sent
mkfifo /tmp/hold
echo NETMUX listening
nc -l -p 5005 <>/tmp/hold > /tmp/got
echo \"NETMUX got $(sha256sum /tmp/got | cut -d' ' -f1)\"
echo NETMUX-DONE
sleep 1000
"
    );
    // The tagged guest's frames never meet the host port: no answer from the host address.
    let g1_script = format!(
        "if ping -c 5 -W 1 {HOST_IP} >/dev/null 2>&1; then echo NETMUX tagged reached-host; \
         else echo NETMUX tagged no-host; fi
echo NETMUX-DONE
sleep 1000
"
    );
    let mut g0 = guest_builder(&nm, &ports[0], &g0_script).spawn().unwrap();
    let mut g1 = guest_builder(&nm, &ports[1], &g1_script).spawn().unwrap();

    expect_line(&mut g0, &nm, "NETMUX listening", GUEST_TIMEOUT);
    host.exec_ok(&format!("busybox ping -c 2 -W 5 {}", guest_ip(0)));
    host.exec_ok(&format!(
        "n=0; until busybox nc {} 5005 < {}; do n=$((n+1)); [ $n -gt 60 ] && exit 1; sleep 1; done",
        guest_ip(0),
        blob.display()
    ));
    expect_line(&mut g0, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    expect_line(&mut g1, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    let c0 = g0.console_output();
    assert!(
        c0.contains("NETMUX reach-host ok")
            && c0.contains("NETMUX reach-ns ok")
            && c0.contains("NETMUX sent"),
        "{c0}\n--- netmux ---\n{}",
        nm.log()
    );
    let out = host_rx.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        value_after(&c0, "NETMUX sum "),
        "guest-to-host copy differs"
    );
    assert_eq!(
        value_after(&c0, "NETMUX got "),
        host_sum.trim(),
        "host-to-guest copy differs"
    );
    let c1 = g1.console_output();
    assert!(c1.contains("NETMUX tagged no-host"), "{c1}");
    // The host port is not a way onto the uplink.
    let leak = host.exec(&format!("busybox ping -c 2 -W 2 {NS_IP}"));
    assert!(
        !leak.status.success(),
        "the host port reached the uplink's far side"
    );
    // A host whose own address in the guests' subnet sits on its NIC (here the namespace's
    // unused veth end) routes single guests over the host port instead of a second address.
    host.exec_ok(&format!(
        "ip addr flush dev {tap} && ip addr add 10.77.0.5/24 dev {p} && ip link set {p} up && \
         ip route add {g0}/32 dev {tap} && busybox ping -c 2 -W 5 {g0}",
        p = host.peer,
        g0 = guest_ip(0)
    ));
    let stats = nm.stats();
    let h = &stats["host"];
    assert_eq!(h["name"], format!("tap:{tap}"), "{stats}");
    assert_eq!(h["mac"], HOST_MAC, "{stats}");
    assert!(h["rx_bytes"].as_u64().unwrap_or(0) > 4 << 20, "{stats}");
    assert!(h["tx_bytes"].as_u64().unwrap_or(0) > 4 << 20, "{stats}");
    assert_eq!(nm.port_counter(0, "drops/host_busy"), 0);
}

/// Hot-plug: a running guest gets its netmux NIC through QMP (chardev, vhost-user netdev,
/// virtio-net device on a PCIe root port), pings another guest, loses the NIC by hot-unplug
/// (the port sees the front-end go), then gets it back and pings again.
#[test]
fn a_hot_plugged_nic_comes_and_goes() {
    use devshare_integration::qmp::Qmp;
    use serde_json::json;
    use std::time::Duration;

    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-hotplug", &ns.host_if, &ports, &[]);
    let qmp_path = nm.dir.path().join("g0.qmp");
    let g0_script = format!(
        "wait_nic() {{ n=0; while ! ip link show eth0 >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 1200 ] && return 1; sleep 0.25; done; }}
wait_gone() {{ n=0; while ip link show eth0 >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 1200 ] && return 1; sleep 0.25; done; }}
echo NETMUX booted
for round in 1 2; do
    if wait_nic; then echo \"NETMUX plugged $round\"; else echo \"NETMUX no-nic $round\"; fi
    ip link set eth0 up
    ip addr add {ip}/24 dev eth0
    if reach {g1}; then echo \"NETMUX round $round ok\"; else echo \"NETMUX round $round FAIL\"; fi
    if [ $round = 1 ]; then
        if wait_gone; then echo NETMUX unplugged; else echo NETMUX still-there; fi
    fi
done
echo NETMUX-DONE
sleep 1000
",
        ip = guest_ip(0),
        g1 = guest_ip(1)
    );
    let mut g1 = guest_builder(&nm, &ports[1], "echo NETMUX up\nsleep 1000\n")
        .spawn()
        .unwrap();
    // Guest 0 starts without a NIC: a free PCIe root port to plug it into, and QMP.
    let mut g0 = devshare_integration::qemu::Guest::builder()
        .name("netmux-hotplug-g0")
        .args([
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_path.display()),
        ])
        .script(&format!("{}\n{g0_script}", guest_prelude(0)))
        .spawn()
        .unwrap();
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(60)).unwrap();
    expect_line(&mut g0, &nm, "NETMUX booted", GUEST_TIMEOUT);
    expect_line(&mut g1, &nm, "NETMUX up", GUEST_TIMEOUT);

    let socket = Netmux::socket(nm.dir.path(), 0).display().to_string();
    let plug = |qmp: &mut Qmp| {
        qmp.execute(
            "chardev-add",
            json!({"id": "nmc0", "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": socket}},
                "server": false, "reconnect-ms": 1000}}}),
        )
        .unwrap();
        qmp.execute(
            "netdev_add",
            json!({"type": "vhost-user", "id": "nm0", "chardev": "nmc0", "queues": 1}),
        )
        .unwrap();
        qmp.execute(
            "device_add",
            json!({"driver": "virtio-net-pci", "id": "nic0", "netdev": "nm0",
                   "bus": "rp1", "mac": guest_mac(0), "host_mtu": 1500}),
        )
        .unwrap();
    };

    plug(&mut qmp);
    expect_line(&mut g0, &nm, "NETMUX round 1 ", GUEST_TIMEOUT);
    assert_eq!(nm.port_counter(0, "connects"), 1);

    qmp.execute("device_del", json!({"id": "nic0"})).unwrap();
    qmp.wait_event(
        "DEVICE_DELETED",
        &json!({"device": "nic0"}),
        Duration::from_secs(120),
    )
    .unwrap();
    // A vhost-user netdev owns its chardev: deleting the netdev closes and removes both.
    qmp.execute("netdev_del", json!({"id": "nm0"})).unwrap();
    expect_line(&mut g0, &nm, "NETMUX unplugged", GUEST_TIMEOUT);
    assert!(
        eventually(Duration::from_secs(30), || nm
            .port_counter(0, "disconnects")
            == 1),
        "the port did not see the unplugged front-end go: {}",
        nm.stats()
    );
    let rx_before = nm.port_counter(1, "rx_packets");

    plug(&mut qmp);
    expect_line(&mut g0, &nm, "NETMUX-DONE", GUEST_TIMEOUT);
    let console = g0.console_output();
    assert!(
        console.contains("NETMUX round 1 ok") && console.contains("NETMUX round 2 ok"),
        "{console}\n--- netmux ---\n{}",
        nm.log()
    );
    assert_eq!(nm.port_counter(0, "connects"), 2);
    assert!(nm.port_counter(1, "rx_packets") > rx_before);
    assert_eq!(nm.port_counter(0, "drops/bad_chain"), 0);
}

/// A netdev with more queue pairs than its port is refused by QEMU with the real cause:
/// netmux answers GET_QUEUE_NUM with the port's queue pairs, which is what QEMU's
/// vhost-user-net compares the netdev's `queues` with. And a normal start prints no warning:
/// netmux offers no vhost-user protocol feature QEMU's vhost-user-net does not use (CONFIG
/// made QEMU warn about every netdev).
#[test]
fn qemu_refuses_more_queues_than_the_port_has_and_warns_about_nothing() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..2).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-queue-num", &ns.host_if, &ports, &[]);
    let up = format!(
        "if reach {NS_IP}; then echo NETMUX up ok; else echo NETMUX up FAIL; fi\nsleep 1000"
    );
    let mut g0 = guest_builder(&nm, &ports[0], &up).spawn().unwrap();
    // Port g1 has one queue pair; this QEMU asks for two.
    let args: Vec<String> = guest_net_args(&nm, &ports[1])
        .into_iter()
        .map(|a| {
            if a.starts_with("vhost-user,") {
                a.replace("queues=1", "queues=2")
            } else if a.starts_with("virtio-net-pci,") {
                format!("{a},mq=on,vectors=6")
            } else {
                a
            }
        })
        .collect();
    assert!(args.iter().any(|a| a.contains("queues=2")), "{args:?}");
    let mut g1 = devshare_integration::qemu::Guest::builder()
        .name("netmux-too-many-queues")
        .args(args)
        .script("echo NETMUX booted\nsleep 1000")
        .spawn()
        .unwrap();
    const CAUSE: &str = "you are asking more queues than supported: 1";
    let refused = eventually(GUEST_TIMEOUT, || g1.qemu_stderr().contains(CAUSE));
    let err = g1.qemu_stderr();
    assert!(refused, "QEMU did not name the cause:\n{err}\n{}", nm.log());
    assert!(!err.contains("vring"), "an unrelated vring error:\n{err}");
    assert!(!g1.console_output().contains("NETMUX booted"));
    g1.kill().unwrap();

    let line = expect_line(&mut g0, &nm, "NETMUX up", GUEST_TIMEOUT);
    assert!(line.contains("ok"), "{}", g0.console_output());
    let err = g0.qemu_stderr();
    assert!(
        !err.to_lowercase().contains("warning"),
        "QEMU warned on a normal start:\n{err}"
    );
}

/// QEMU before 8.0 under TCG, with the options netmux prints (MSI-X on): QEMU dies with
/// SIGSEGV as the guest's virtio-net driver starts the vhost-user NIC, after netmux accepted
/// the connection. This is QEMU's bug (`devshare_common::qemu`: the MSI-X unmask notifier
/// reads KVM's irqfd table, which TCG never allocates; DPDK's vhost backend triggers it the
/// same way). netmux prints the workaround (`vectors=0`) for such a QEMU and says why; this
/// test takes it out again to show the crash it avoids. When a QEMU update fixes the bug
/// this test fails, and the README's compatibility table must change with it.
fn vhost_user_net_with_msix_crashes_qemu_under_tcg(qemu: &MatrixQemu) {
    assert!(qemu.version.vhost_user_net_msix_crashes_under_tcg());
    if guests_use_kvm() {
        eprintln!("SKIPPED: the crash needs TCG, and DEVSHARE_ACCEL asks for KVM");
        return;
    }
    let ns = NetNs::new();
    let ports = [PortSpec::new(0)];
    let nm = Netmux::start("netmux-msix-crash", &ns.host_if, &ports, &[]);
    let (args, notes) = nm.qemu_args_with(0, &qemu.print_args());
    assert!(
        notes.contains("SIGSEGV") && notes.contains("vectors=0"),
        "netmux does not warn about QEMU {}: {notes}",
        qemu.version
    );
    assert!(
        args.iter().any(|a| a.contains(",vectors=0")),
        "printed options do not avoid MSI-X: {args:?}"
    );
    // Without the workaround netmux prints: MSI-X on, as the crash needs.
    let args: Vec<String> = args.iter().map(|a| a.replace(",vectors=0", "")).collect();
    // The crash is expected: no core file of a 256 MiB guest in the test's directory. QEMU
    // inherits the limit.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one valid rlimit; lowering RLIMIT_CORE only affects core dumps.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
    let mut g = guest_builder_with(&ports[0], "echo NETMUX-UP\nsleep 1000\n", args, Some(qemu))
        .spawn()
        .unwrap();
    match g.wait_exit(GUEST_TIMEOUT) {
        Err(QemuError::NoExitCode { status, report, .. }) => {
            assert_eq!(
                status.signal(),
                Some(libc::SIGSEGV),
                "QEMU {} ended otherwise ({status}):\n{report}",
                qemu.version
            );
        }
        other => panic!(
            "QEMU {} did not crash: {other:?}\n--- netmux ---\n{}",
            qemu.version,
            nm.log()
        ),
    }
    // It died on the guest's side of the NIC: netmux had the front-end connected, and the
    // guest never got to use eth0.
    assert!(nm.log().contains("front-end connected"), "{}", nm.log());
    assert!(!g.console_output().contains("NETMUX-UP"));
}

qemu_matrix! {
    qemu_7_2("7.2"): [
        three_guests_reach_each_other_and_the_namespace,
        sixteen_mib_tcp_between_guests_and_with_the_namespace,
        vhost_user_net_with_msix_crashes_qemu_under_tcg,
    ];
    qemu_10_0("10.0"): [
        three_guests_reach_each_other_and_the_namespace,
        sixteen_mib_tcp_between_guests_and_with_the_namespace,
    ];
    qemu_11_1("11.1"): [
        three_guests_reach_each_other_and_the_namespace,
        sixteen_mib_tcp_between_guests_and_with_the_namespace,
    ];
}
