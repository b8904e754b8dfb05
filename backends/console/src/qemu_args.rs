//! The QEMU options that plug each configured VM into this process (`--print-qemu-args`),
//! spelled for the operator's QEMU version (see [`devshare_common::qemu`] for what differs).

use devshare_common::qemu::{option_line, option_value, qemu_id, QemuVersion};

use crate::config::{DeviceKind, SocketMode, VmConfig};
use crate::virtio_console as vc;

/// Why a VM cannot be plugged into the given QEMU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QemuArgsError {
    /// A vhost-user virtio-console needs a user-creatable generic vhost-user device.
    #[error(
        "VM '{vm}': QEMU {qemu} cannot plug a vhost-user virtio-console: it has no \
         user-creatable generic vhost-user device (vhost-user-test-device-pci came with QEMU \
         10.2). Serve this VM in stream mode instead (--vm {vm}=SOCKET,stream): its first port \
         becomes a serial port of the guest, which works with every QEMU"
    )]
    NoGenericDevice {
        /// The VM's name.
        vm: String,
        /// The QEMU version asked for.
        qemu: QemuVersion,
    },
}

/// QEMU options for `vm`, one option and its value per line, for QEMU `qemu`. `memory` is the
/// guest RAM size in QEMU syntax (e.g. `512M`); vhost-user needs the RAM in shareable memory.
pub fn qemu_args(
    vm: &VmConfig,
    memory: &str,
    qemu: QemuVersion,
) -> Result<Vec<String>, QemuArgsError> {
    // A VM name may hold what a QEMU id may not (quotes, braces, spaces).
    let id = qemu_id("console-", &vm.name);
    let path = option_value(&vm.socket.display().to_string());
    let chardev = match (vm.mode, vm.kind) {
        // QEMU 11's generic vhost-user device cannot start on a chardev that reconnects in
        // the background (it finds the socket not yet connected and fails), so QEMU connects
        // once, at start, to a backend that is already listening.
        (SocketMode::Listen, DeviceKind::Virtio) => format!("socket,id={id},path={path}"),
        // A plain byte stream survives backend restarts: QEMU dials again every second.
        (SocketMode::Listen, DeviceKind::Stream) => {
            format!("socket,id={id},path={path},{}", qemu.chardev_reconnect())
        }
        // QEMU listens and waits for us before it starts the guest.
        (SocketMode::Connect, _) => format!("socket,id={id},path={path},server=on"),
    };
    match vm.kind {
        DeviceKind::Virtio => {
            let device =
                qemu.generic_vhost_user_device()
                    .ok_or_else(|| QemuArgsError::NoGenericDevice {
                        vm: vm.name.clone(),
                        qemu,
                    })?;
            let queues = vc::queue_count(vm.ports.len(), vm.multiport());
            Ok(vec![
                option_line(
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
                ),
                option_line("-machine", "q35,memory-backend=mem"),
                option_line("-chardev", &chardev),
                option_line(
                    "-device",
                    &format!(
                        "{device},chardev={id},virtio-id=3,num_vqs={queues},config_size={}",
                        vc::CONFIG_SIZE
                    ),
                ),
            ])
        }
        DeviceKind::Stream => Ok(vec![
            option_line("-chardev", &chardev),
            option_line("-serial", &format!("chardev:{id}")),
        ]),
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

    fn render(vm: &VmConfig, qemu: &str) -> Result<String, QemuArgsError> {
        qemu_args(vm, "256M", qemu.parse().unwrap()).map(|lines| lines.join(" "))
    }

    #[test]
    fn queue_counts_follow_multiport() {
        let one = render(&vm(1, DeviceKind::Virtio), "11.1").unwrap();
        assert!(one.contains("num_vqs=2,config_size=12"), "{one}");
        let three = render(&vm(3, DeviceKind::Virtio), "11.1").unwrap();
        assert!(three.contains("num_vqs=8"), "{three}");
        let s = render(&vm(1, DeviceKind::Stream), "11.1").unwrap();
        assert!(
            s.contains("-serial chardev:console-a") && !s.contains("memfd"),
            "{s}"
        );
    }

    #[test]
    fn stream_reconnect_follows_the_qemu_version() {
        let stream = vm(1, DeviceKind::Stream);
        assert_eq!(
            render(&stream, "7.2").unwrap(),
            "-chardev socket,id=console-a,path=/run/a.sock,reconnect=1 -serial chardev:console-a"
        );
        assert_eq!(
            render(&stream, "9.1").unwrap(),
            render(&stream, "7.2").unwrap()
        );
        for qemu in ["9.2", "10.0", "11.1"] {
            assert_eq!(
                render(&stream, qemu).unwrap(),
                "-chardev socket,id=console-a,path=/run/a.sock,reconnect-ms=1000 \
                 -serial chardev:console-a",
                "QEMU {qemu}"
            );
        }
        // QEMU listening: no reconnect option on any version.
        let mut listening = stream.clone();
        listening.mode = SocketMode::Connect;
        assert!(render(&listening, "7.2").unwrap().contains("server=on"));
        assert!(!render(&listening, "7.2").unwrap().contains("reconnect"));
    }

    #[test]
    fn odd_names_and_paths_make_valid_ids_and_one_value() {
        let mut odd = vm(1, DeviceKind::Stream);
        odd.name = "a\"{b}".into();
        odd.socket = PathBuf::from("/tmp/x,y z.sock");
        let s = render(&odd, "11.1").unwrap();
        assert_eq!(
            s,
            "-chardev 'socket,id=console-a__b_,path=/tmp/x,,y z.sock,reconnect-ms=1000' \
             -serial chardev:console-a__b_"
        );
    }

    #[test]
    fn virtio_needs_the_generic_device_of_10_2() {
        let virtio = vm(2, DeviceKind::Virtio);
        for qemu in ["7.2", "10.0", "10.1"] {
            let err = render(&virtio, qemu).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("QEMU {qemu} cannot plug"))
                    && text.contains("stream mode")
                    && text.contains("--vm a=SOCKET,stream"),
                "{text}"
            );
        }
        for qemu in ["10.2", "11.1"] {
            let args = render(&virtio, qemu).unwrap();
            assert!(
                args.contains("-device vhost-user-test-device-pci,chardev=console-a,virtio-id=3"),
                "{args}"
            );
        }
    }
}
