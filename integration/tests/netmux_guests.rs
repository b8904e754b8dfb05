//! vhost-user-netmux end to end: real QEMU, real Linux guests (TCG), a veth pair whose far end
//! sits in a network namespace as the "NIC". Needs root and `scripts/setup.sh`.

mod netmux_common;

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

#[test]
fn three_guests_reach_each_other_and_the_namespace() {
    let ns = NetNs::new();
    let ports: Vec<PortSpec> = (0..3).map(PortSpec::new).collect();
    let nm = Netmux::start("netmux-three", &ns.host_if, &ports, &[]);
    let mut guests = Vec::new();
    for p in &ports {
        let peers: Vec<String> = (0..3).filter(|&j| j != p.index).map(guest_ip).collect();
        let mut targets = peers.clone();
        targets.push(NS_IP.to_string());
        let g = guest_builder(&nm, p, &reach_script(&targets, &peers))
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
