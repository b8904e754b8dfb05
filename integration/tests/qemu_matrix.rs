//! Every QEMU of the version matrix takes, at once, everything the backends print for it with
//! `--print-qemu-args --qemu PATH --pit-policy discard`: netmux's NIC, the console's stream
//! port and, where the QEMU can plug one, its vhost-user virtio-console. QEMU starts stopped
//! (`-S`) with the backends running, builds every device (its `info qtree` is the proof), takes
//! no deprecated spelling, and quits cleanly. The guests the other matrix tests boot prove the
//! options work; this proves all of them are accepted together, the PIT option included.

mod netmux_common;

use std::fs::OpenOptions;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devshare_integration::matrix::MatrixQemu;
use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::ScratchDir;
use devshare_integration::qemu_matrix;
use devshare_integration::qmp::Qmp;
use devshare_integration::testdata::printed_qemu_args;
use netmux_common::{guest_mac, Netmux, PortSpec};
use serde_json::json;

const UP: Duration = Duration::from_secs(30);

/// QEMU, killed and reaped on drop (a failing assertion must not leave it running).
struct RunningQemu(Child);

impl RunningQemu {
    /// Everything QEMU wrote on stderr (call once it has exited).
    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.0.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for RunningQemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether QEMU can use KVM here (the PIT policy only exists with KVM). Under
/// `DEVSHARE_REQUIRE_KVM=1` it must.
fn kvm_usable() -> bool {
    let usable = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable && std::env::var("DEVSHARE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("DEVSHARE_REQUIRE_KVM=1 but /dev/kvm cannot be opened");
    }
    usable
}

fn printed_options_are_accepted_together(qemu: &MatrixQemu) {
    let dir = ScratchDir::new("qemu-accepts").unwrap();
    let print: Vec<String> = qemu
        .print_args()
        .into_iter()
        .chain(["--pit-policy".to_string(), "discard".to_string()])
        .collect();

    // netmux, on a TAP uplink of its own (the name is unique per test process).
    let tap = format!(
        "dq{}v{}{}",
        std::process::id() % 1_000_000,
        qemu.version.major,
        qemu.version.minor
    );
    let nm = Netmux::start_on(
        "qemu-accepts-nm",
        &format!("tap:{tap}"),
        &[PortSpec::new(0)],
        &[],
    );
    let (mut args, _notes) = nm.qemu_args_with(0, &print);

    // The console: a stream VM always, a virtio VM where this QEMU can plug it.
    let stream_sock = dir.path().join("stream.sock");
    let virtio_sock = dir.path().join("virtio.sock");
    let virtio = qemu.version.generic_vhost_user_device().is_some();
    let mut console_args: Vec<String> = vec![
        "--vm".into(),
        format!("s={},stream", stream_sock.display()),
        "-p".into(),
        format!("s/serial=unix:{}", dir.path().join("serial.sock").display()),
    ];
    if virtio {
        console_args.extend([
            "--vm".into(),
            format!("v={}", virtio_sock.display()),
            "-p".into(),
            format!("v/console=file:{}", dir.path().join("v.log").display()),
        ]);
    }
    let mut console = BackendProcess::spawn(
        "vhost-user-console",
        &console_args,
        &dir.path().join("console.log"),
    )
    .unwrap();
    console.wait_for_path(&stream_sock, UP).unwrap();
    if virtio {
        console.wait_for_path(&virtio_sock, UP).unwrap();
    }
    let mut console_print = console_args.clone();
    console_print.extend(print.iter().cloned());
    args.extend(printed_qemu_args(
        "vhost-user-console",
        &console_print,
        |_| true,
    ));

    let kvm = kvm_usable();
    let qmp = dir.path().join("qmp.sock");
    let child = Command::new(qemu.path())
        .args(["-S", "-display", "none", "-nodefaults", "-no-user-config"])
        .args(["-accel", if kvm { "kvm" } else { "tcg" }])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-machine", "q35,memory-backend=mem", "-m", "256M"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = RunningQemu(child);
    let mut monitor = Qmp::connect(&qmp, UP).unwrap_or_else(|e| {
        let _ = running.0.kill();
        panic!(
            "QEMU {} did not start with {args:?}: {e}\n{}",
            qemu.version,
            running.stderr()
        )
    });
    let tree = monitor
        .execute(
            "human-monitor-command",
            json!({ "command-line": "info qtree" }),
        )
        .unwrap();
    let tree = tree.as_str().unwrap_or_default().to_owned();
    let has = |what: &str| tree.contains(what);
    assert!(
        has("dev: virtio-net-pci") && has(&format!("mac = \"{}\"", guest_mac(0))),
        "QEMU {}: no netmux NIC in\n{tree}",
        qemu.version
    );
    if virtio {
        assert!(
            has("dev: vhost-user-test-device-pci"),
            "QEMU {}: no vhost-user console in\n{tree}",
            qemu.version
        );
    }
    // Every chardev the backends printed is open by the device it was printed for.
    let chardevs = monitor.execute("query-chardev", json!({})).unwrap();
    let mut wanted = vec!["nm0c", "console-s"];
    if virtio {
        wanted.push("console-v");
    }
    for label in wanted {
        let open = chardevs
            .as_array()
            .and_then(|all| all.iter().find(|c| c["label"] == label))
            .map(|c| c["frontend-open"] == true);
        assert_eq!(
            open,
            Some(true),
            "QEMU {}: chardev {label} missing or not open: {chardevs}",
            qemu.version
        );
    }
    if kvm {
        let pit = &tree[tree
            .find("dev: kvm-pit")
            .unwrap_or_else(|| panic!("QEMU {}: no kvm-pit in\n{tree}", qemu.version))..];
        assert!(
            pit.lines()
                .take(8)
                .any(|l| l.trim() == "lost_tick_policy = \"discard\""),
            "QEMU {} did not apply the printed PIT policy:\n{pit}",
            qemu.version
        );
    }

    let _ = monitor.execute("quit", json!({}));
    let deadline = Instant::now() + UP;
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU {} did not quit",
            qemu.version
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = running.stderr();
    assert!(
        status.success(),
        "QEMU {}: {status}\n{stderr}",
        qemu.version
    );
    // No spelling this QEMU merely tolerates.
    assert!(
        !stderr.contains("deprecated") && !stderr.contains("Invalid parameter"),
        "QEMU {} complained about the printed options:\n{stderr}",
        qemu.version
    );
    assert!(
        nm.log().contains("front-end connected"),
        "netmux never saw QEMU {}:\n{}",
        qemu.version,
        nm.log()
    );
}

qemu_matrix! {
    qemu_7_2("7.2"): [printed_options_are_accepted_together];
    qemu_10_0("10.0"): [printed_options_are_accepted_together];
    qemu_11_1("11.1"): [printed_options_are_accepted_together];
}
