//! The QEMU options that plug each configured VM into this process (`--print-qemu-args`).

use crate::config::{DeviceKind, SocketMode, VmConfig};
use crate::virtio_console as vc;

/// QEMU options for `vm`, one option and its value per line. `memory` is the guest RAM size
/// in QEMU syntax (e.g. `512M`); vhost-user needs the RAM in shareable memory.
pub fn qemu_args(vm: &VmConfig, memory: &str) -> Vec<String> {
    let id = format!("console-{}", vm.name);
    let path = vm.socket.display();
    let chardev = match (vm.mode, vm.kind) {
        // QEMU 11's generic vhost-user device cannot start on a chardev that reconnects in
        // the background (it finds the socket not yet connected and fails), so QEMU connects
        // once, at start, to a backend that is already listening.
        (SocketMode::Listen, DeviceKind::Virtio) => format!("socket,id={id},path={path}"),
        // A plain byte stream survives backend restarts: QEMU dials again every second.
        (SocketMode::Listen, DeviceKind::Stream) => {
            format!("socket,id={id},path={path},reconnect-ms=1000")
        }
        // QEMU listens and waits for us before it starts the guest.
        (SocketMode::Connect, _) => format!("socket,id={id},path={path},server=on"),
    };
    match vm.kind {
        DeviceKind::Virtio => {
            let queues = vc::queue_count(vm.ports.len(), vm.multiport());
            vec![
                format!("-object memory-backend-memfd,id=mem,size={memory},share=on"),
                "-machine q35,memory-backend=mem".to_string(),
                format!("-chardev {chardev}"),
                format!(
                    "-device vhost-user-test-device-pci,chardev={id},virtio-id=3,num_vqs={queues},config_size={}",
                    vc::CONFIG_SIZE
                ),
            ]
        }
        DeviceKind::Stream => vec![
            format!("-chardev {chardev}"),
            format!("-serial chardev:{id}"),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PortConfig, Target};
    use std::path::PathBuf;

    fn vm(ports: usize, kind: DeviceKind) -> VmConfig {
        VmConfig {
            name: "a".into(),
            socket: PathBuf::from("/run/a.sock"),
            mode: SocketMode::Listen,
            kind,
            ports: (0..ports)
                .map(|i| PortConfig {
                    name: format!("p{i}"),
                    target: Target::Link {
                        vm: "b".into(),
                        port: "x".into(),
                    },
                    buffer_size: 1,
                    console: i == 0,
                })
                .collect(),
        }
    }

    #[test]
    fn queue_counts_follow_multiport() {
        let one = qemu_args(&vm(1, DeviceKind::Virtio), "256M").join(" ");
        assert!(one.contains("num_vqs=2,config_size=12"), "{one}");
        let three = qemu_args(&vm(3, DeviceKind::Virtio), "256M").join(" ");
        assert!(three.contains("num_vqs=8"), "{three}");
        let s = qemu_args(&vm(1, DeviceKind::Stream), "256M").join(" ");
        assert!(
            s.contains("-serial chardev:console-a") && !s.contains("memfd"),
            "{s}"
        );
    }
}
