//! The QEMU options that attach a guest to one port (`--print-qemu-args`), spelled for the
//! operator's QEMU version (see [`devshare_common::qemu`] for what differs).

use devshare_common::daemon::Transport;
use devshare_common::qemu::{option_line, option_value, QemuVersion};

use crate::config::PortConfig;

/// The QEMU options that attach a guest to `port` (the `index`-th port, which names the QEMU
/// ids), one option and its value per line: shared guest memory of `mem_mib` MiB, the
/// vhost-user chardev and netdev, and a virtio-net-pci NIC with the port's MAC and `mtu`.
pub fn qemu_args(
    port: &PortConfig,
    index: usize,
    mtu: u16,
    mem_mib: u64,
    qemu: QemuVersion,
) -> Vec<String> {
    let id = format!("nm{index}");
    let path = option_value(&port.transport.path().display().to_string());
    let server = match port.transport {
        // The backend listens: QEMU is the client and should come back after a restart.
        Transport::Listen(_) => format!(",{}", qemu.chardev_reconnect()),
        Transport::Connect(_) => ",server=on,wait=off".to_string(),
    };
    let mut dev = format!("virtio-net-pci,netdev={id},mac={},host_mtu={mtu}", port.mac);
    if qemu.vhost_user_net_msix_crashes_under_tcg() {
        // No MSI-X: this QEMU dies under TCG otherwise (see caveats()).
        if port.queue_pairs > 1 {
            dev.push_str(",mq=on");
        }
        dev.push_str(",vectors=0");
    } else if port.queue_pairs > 1 {
        // One MSI-X vector per queue plus config and control queue.
        dev.push_str(&format!(",mq=on,vectors={}", 2 * port.queue_pairs + 2));
    }
    vec![
        option_line(
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        ),
        option_line("-machine", "q35,memory-backend=mem"),
        option_line("-chardev", &format!("socket,id={id}c,path={path}{server}")),
        option_line(
            "-netdev",
            &format!(
                "vhost-user,id={id},chardev={id}c,queues={}",
                port.queue_pairs
            ),
        ),
        option_line("-device", &dev),
    ]
}

/// What an operator of `qemu` must know about the printed options, one sentence each
/// (printed on stderr, so the options on stdout stay pasteable).
pub fn caveats(qemu: QemuVersion) -> Vec<String> {
    let mut notes = Vec::new();
    if qemu.vhost_user_net_msix_crashes_under_tcg() {
        notes.push(format!(
            "QEMU {qemu} without KVM (-accel tcg) dies with SIGSEGV when the guest's \
             virtio-net driver starts a vhost-user NIC that uses MSI-X (a QEMU bug, fixed in \
             8.0; DPDK's vhost backend triggers it too), so -device virtio-net-pci carries \
             vectors=0 (legacy INTx interrupts instead of MSI-X); under KVM you may remove it"
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(spec: &str, index: usize) -> PortConfig {
        PortConfig::parse_spec(spec, index).unwrap()
    }

    fn render(spec: &str, index: usize, qemu: &str) -> String {
        qemu_args(&port(spec, index), index, 1500, 256, qemu.parse().unwrap()).join(" ")
    }

    #[test]
    fn qemu_args_name_the_socket_and_mac() {
        let a = render("socket=/a,mac=52:54:00:00:00:01", 0, "11.1");
        assert!(a.contains("path=/a,reconnect-ms=1000"), "{a}");
        assert!(a.contains("mac=52:54:00:00:00:01"), "{a}");
        assert!(a.contains("size=256M,share=on"), "{a}");
        let b = render("socket=/b,mac=52:54:00:00:00:02,queues=2,client", 1, "11.1");
        assert!(b.contains("id=nm1c,path=/b,server=on,wait=off"), "{b}");
        assert!(b.contains("queues=2"), "{b}");
        assert!(b.contains("mq=on,vectors=6"), "{b}");
    }

    #[test]
    fn reconnect_follows_the_qemu_version() {
        let spec = "socket=/a,mac=52:54:00:00:00:01";
        assert_eq!(
            render(spec, 0, "7.2"),
            "-object memory-backend-memfd,id=mem,size=256M,share=on \
             -machine q35,memory-backend=mem \
             -chardev socket,id=nm0c,path=/a,reconnect=1 \
             -netdev vhost-user,id=nm0,chardev=nm0c,queues=1 \
             -device virtio-net-pci,netdev=nm0,mac=52:54:00:00:00:01,host_mtu=1500,vectors=0"
        );
        assert!(render(spec, 0, "9.1.3").contains(",reconnect=1 "));
        assert!(render(spec, 0, "9.2").contains(",reconnect-ms=1000 "));
        assert!(render(spec, 0, "10.0.2").contains(",reconnect-ms=1000 "));
        // QEMU listening: the same chardev on every version.
        let client = "socket=/b,mac=52:54:00:00:00:02,client";
        let chardev = |q: &str| {
            render(client, 0, q)
                .split(" -")
                .find(|o| o.starts_with("chardev"))
                .unwrap()
                .to_string()
        };
        assert_eq!(chardev("7.2"), chardev("11.1"));
    }

    #[test]
    fn paths_with_commas_and_spaces_stay_one_value() {
        // A config file can name such a path (the command-line spec cannot hold a comma).
        let mut p = port("socket=/x,mac=52:54:00:00:00:01", 0);
        p.transport = Transport::Listen("/tmp/a b,c.sock".into());
        let a = qemu_args(&p, 0, 1500, 256, "11.1".parse().unwrap()).join(" ");
        assert!(
            a.contains("'socket,id=nm0c,path=/tmp/a b,,c.sock,reconnect-ms=1000'"),
            "{a}"
        );
    }

    #[test]
    fn caveats_name_the_msix_crash_before_8_0() {
        let notes = caveats("7.2".parse().unwrap());
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("QEMU 7.2") && notes[0].contains("vectors=0"),
            "{notes:?}"
        );
        assert!(caveats("8.0".parse().unwrap()).is_empty());
        // And the printed line itself carries the workaround, only where it is needed.
        let spec = "socket=/a,mac=52:54:00:00:00:01,queues=2";
        let old = render(spec, 0, "7.2");
        assert!(old.contains(",mq=on,vectors=0"), "{old}");
        assert!(render(spec, 0, "8.0").contains(",mq=on,vectors=6"));
        assert!(caveats("11.1".parse().unwrap()).is_empty());
    }
}
