//! `inspect` and `qemu-args` against real QEMU 11 processes started here with `-accel kvm`
//! and `-S` (the machine, with its PIT, exists; no guest code runs). QEMU's own
//! `info qtree` is the reference: `kvm-pit` with its `lost_tick_policy`, or `isa-pit`.

mod common;

use common::{kvm_or_skip, tool, Qemu};
use devshare_common::pit::LostTickPolicy;
use kvm_pit_policy::inspect::inspect_pid;

const Q35_KVM: [&str; 4] = ["-accel", "kvm", "-machine", "q35"];

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = Q35_KVM.to_vec();
    args.extend_from_slice(extra);
    args
}

#[test]
fn inspect_reports_each_policy_of_running_qemus() {
    if !kvm_or_skip("inspect_reports_each_policy_of_running_qemus") {
        return;
    }
    let cases: [(&[&'static str], LostTickPolicy, bool); 3] = [
        (&[], LostTickPolicy::Delay, false),
        (
            &["-global", "kvm-pit.lost_tick_policy=delay"],
            LostTickPolicy::Delay,
            true,
        ),
        (
            &["-global", "kvm-pit.lost_tick_policy=discard"],
            LostTickPolicy::Discard,
            true,
        ),
    ];
    for (extra, policy, explicit) in cases {
        let mut qemu = Qemu::start(&with(extra));
        // What QEMU itself says it built.
        assert_eq!(
            qemu.pit_device(),
            ("kvm-pit".to_owned(), Some(policy.to_string())),
            "{extra:?}"
        );
        let report = inspect_pid(qemu.pid()).expect("inspect");
        assert_eq!(
            report.policy,
            Some(policy),
            "{extra:?}: {}",
            report.summary()
        );
        assert_eq!(report.explicit, explicit, "{}", report.summary());
        assert!(report.in_kernel_pit);
        assert!(report.evidence.kvm_vm_fd, "{}", report.summary());
        assert!(report.evidence.pit_worker.is_some(), "{}", report.summary());
        assert_eq!(report.confirmed, Some(true), "{}", report.summary());
    }
}

#[test]
fn inspect_reports_no_in_kernel_pit_with_split_irqchip_or_tcg() {
    if !kvm_or_skip("inspect_reports_no_in_kernel_pit_with_split_irqchip_or_tcg") {
        return;
    }
    let split = [
        "-accel",
        "kvm",
        "-machine",
        "q35,kernel-irqchip=split",
        "-global",
        "kvm-pit.lost_tick_policy=discard",
    ];
    let tcg = ["-accel", "tcg", "-machine", "q35"];
    for (args, why) in [(&split[..], "kernel-irqchip=split"), (&tcg[..], "tcg")] {
        let mut qemu = Qemu::start(args);
        assert_eq!(qemu.pit_device().0, "isa-pit", "{args:?}");
        let report = inspect_pid(qemu.pid()).expect("inspect");
        assert_eq!(report.policy, None, "{}", report.summary());
        assert!(!report.in_kernel_pit);
        let reason = report.reason.clone().unwrap_or_default();
        assert!(reason.contains(why), "{reason}");
        assert_eq!(report.evidence.pit_worker, None);
        assert_eq!(report.confirmed, Some(true), "{}", report.summary());
    }
}

#[test]
fn inspect_command_lists_running_qemus_as_json() {
    if !kvm_or_skip("inspect_command_lists_running_qemus_as_json") {
        return;
    }
    let discard = Qemu::start(&with(&["-global", "kvm-pit.lost_tick_policy=discard"]));
    let split = Qemu::start(&["-accel", "kvm", "-machine", "q35,kernel-irqchip=split"]);

    // Every QEMU (other tests' QEMUs may show up too: look for ours by pid).
    let out = tool().args(["inspect", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let find = |pid: u32| {
        all.as_array()
            .and_then(|a| a.iter().find(|r| r["pid"] == pid))
            .cloned()
            .unwrap_or_else(|| panic!("pid {pid} missing from {all}"))
    };
    let d = find(discard.pid());
    assert_eq!(d["policy"], "discard");
    assert_eq!(d["in_kernel_pit"], true);
    let s = find(split.pid());
    assert_eq!(s["policy"], serde_json::Value::Null);
    assert_eq!(s["in_kernel_pit"], false);

    // One pid, as text.
    let out = tool()
        .args(["inspect", "--pid", &discard.pid().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lost_tick_policy=discard"), "{text}");
    assert!(text.contains("reinjection off"), "{text}");

    // Not a QEMU: a clear error and a failing exit status.
    let out = tool()
        .args(["inspect", "--pid", &std::process::id().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a QEMU"));
}

#[test]
fn qemu_accepts_what_qemu_args_prints() {
    if !kvm_or_skip("qemu_accepts_what_qemu_args_prints") {
        return;
    }
    for policy in LostTickPolicy::ALL {
        let out = tool()
            .args(["qemu-args", "--strict", "--policy", policy.as_str(), "--"])
            .args(Q35_KVM)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "unexpected warning: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let mut args: Vec<&str> = Q35_KVM.to_vec();
        args.extend(printed.split_whitespace());
        let mut qemu = Qemu::start(&args);
        assert_eq!(
            qemu.pit_device(),
            ("kvm-pit".to_owned(), Some(policy.to_string())),
            "QEMU did not apply {printed}"
        );
    }

    // The control: QEMU does check the value, so acceptance above means something.
    let out = std::process::Command::new(common::qemu_binary())
        .args(Q35_KVM)
        .args(["-global", "kvm-pit.lost_tick_policy=bogus"])
        .args(["-S", "-display", "none", "-nodefaults", "-monitor", "none"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lost_tick_policy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qemu_args_warns_when_the_command_line_makes_it_moot() {
    if !kvm_or_skip("qemu_args_warns_when_the_command_line_makes_it_moot") {
        return;
    }
    let split = ["-accel", "kvm", "-machine", "q35,kernel-irqchip=split"];
    let out = tool()
        .args(["qemu-args", "--strict", "--policy", "discard", "--"])
        .args(split)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("moot") && warning.contains("split"),
        "{warning}"
    );
    // And QEMU agrees: the PIT is QEMU's own, the option went nowhere.
    let printed = String::from_utf8(out.stdout).unwrap();
    let mut args = split.to_vec();
    args.extend(printed.split_whitespace());
    let mut qemu = Qemu::start(&args);
    assert_eq!(qemu.pit_device().0, "isa-pit");
}
