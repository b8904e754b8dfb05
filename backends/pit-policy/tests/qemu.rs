//! `inspect` and `qemu-args` against real QEMU processes started here with `-accel kvm` and
//! `-S` (the machine, with its PIT, exists; no guest code runs), once per QEMU of the version
//! matrix (`qemu_7_2::...`, `qemu_10_0::...`, `qemu_11_1::...`, see
//! `devshare_integration::matrix`). QEMU's own `info qtree` is the reference: `kvm-pit` with
//! its `lost_tick_policy`, or `isa-pit`; and whether QEMU starts at all is the reference for
//! what the tool says QEMU would refuse.

mod common;

use common::{kvm_or_skip, tool, Qemu};
use devshare_common::pit::LostTickPolicy;
use devshare_integration::matrix::MatrixQemu;
use devshare_integration::qemu_matrix;
use kvm_pit_policy::inspect::inspect_pid;

const Q35_KVM: [&str; 4] = ["-accel", "kvm", "-machine", "q35"];

/// The matrix test's full name, `qemu_7_2::test`, for skip messages.
fn named(qemu: &MatrixQemu, test: &str) -> String {
    format!("qemu_{}::{test}", qemu.name.replace('.', "_"))
}

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = Q35_KVM.to_vec();
    args.extend_from_slice(extra);
    args
}

/// `kvm-pit-policy qemu-args --policy POLICY --qemu QEMU -- LINE`: (exit code, stdout,
/// stderr).
fn qemu_args(qemu: &MatrixQemu, policy: &str, line: &[&str]) -> (Option<i32>, String, String) {
    let out = tool()
        .args(["qemu-args", "--strict", "--policy", policy])
        .arg("--qemu")
        .arg(qemu.path())
        .arg("--")
        .args(line)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inspect_reports_each_policy_of_running_qemus(qemu: &MatrixQemu) {
    if !kvm_or_skip(&named(qemu, "inspect_reports_each_policy_of_running_qemus")) {
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
        let mut running = Qemu::start(qemu.path(), &with(extra));
        // What QEMU itself says it built.
        assert_eq!(
            running.pit_device(),
            ("kvm-pit".to_owned(), Some(policy.to_string())),
            "{extra:?}"
        );
        let report = inspect_pid(running.pid()).expect("inspect");
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
        // The version was read from the binary the process runs (behind the launcher's
        // dynamic loader), and the command line was read by its rules.
        assert_eq!(
            report.qemu_version.as_deref(),
            Some(qemu.version.to_string().as_str()),
            "{}",
            report.summary()
        );
        assert_eq!(report.reading.qemu_version, qemu.version.to_string());
    }
}

fn inspect_reports_no_in_kernel_pit_with_split_irqchip_or_tcg(qemu: &MatrixQemu) {
    if !kvm_or_skip(&named(
        qemu,
        "inspect_reports_no_in_kernel_pit_with_split_irqchip_or_tcg",
    )) {
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
        let mut running = Qemu::start(qemu.path(), args);
        assert_eq!(running.pit_device().0, "isa-pit", "{args:?}");
        let report = inspect_pid(running.pid()).expect("inspect");
        assert_eq!(report.policy, None, "{}", report.summary());
        assert!(!report.in_kernel_pit);
        let reason = report.reason.clone().unwrap_or_default();
        assert!(reason.contains(why), "{reason}");
        assert_eq!(report.evidence.pit_worker, None);
        assert_eq!(report.confirmed, Some(true), "{}", report.summary());
    }
}

fn inspect_command_lists_running_qemus_as_json(qemu: &MatrixQemu) {
    if !kvm_or_skip(&named(qemu, "inspect_command_lists_running_qemus_as_json")) {
        return;
    }
    let discard = Qemu::start(
        qemu.path(),
        &with(&["-global", "kvm-pit.lost_tick_policy=discard"]),
    );
    let split = Qemu::start(
        qemu.path(),
        &["-accel", "kvm", "-machine", "q35,kernel-irqchip=split"],
    );

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
    assert_eq!(d["qemu_version"], qemu.version.to_string());
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
    assert!(text.contains(&qemu.version.to_string()), "{text}");

    // Not a QEMU: a clear error and a failing exit status.
    let out = tool()
        .args(["inspect", "--pid", &std::process::id().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a QEMU"));
}

fn qemu_accepts_what_qemu_args_prints(qemu: &MatrixQemu) {
    if !kvm_or_skip(&named(qemu, "qemu_accepts_what_qemu_args_prints")) {
        return;
    }
    for policy in LostTickPolicy::ALL {
        let (code, printed, warnings) = qemu_args(qemu, policy.as_str(), &Q35_KVM);
        assert_eq!(code, Some(0), "{warnings}");
        assert!(warnings.is_empty(), "unexpected warning: {warnings}");
        let mut args: Vec<&str> = Q35_KVM.to_vec();
        args.extend(printed.split_whitespace());
        let mut running = Qemu::start(qemu.path(), &args);
        assert_eq!(
            running.pit_device(),
            ("kvm-pit".to_owned(), Some(policy.to_string())),
            "QEMU {} did not apply {printed}",
            qemu.version
        );
    }

    // The control: QEMU does check the value, so acceptance above means something.
    let refused = Qemu::try_start(
        qemu.path(),
        &with(&["-global", "kvm-pit.lost_tick_policy=bogus"]),
    );
    match refused {
        Ok(_) => panic!("QEMU {} took lost_tick_policy=bogus", qemu.version),
        Err(output) => assert!(output.contains("lost_tick_policy"), "{output}"),
    }
}

fn qemu_args_warns_when_the_command_line_makes_it_moot(qemu: &MatrixQemu) {
    if !kvm_or_skip(&named(
        qemu,
        "qemu_args_warns_when_the_command_line_makes_it_moot",
    )) {
        return;
    }
    let split = ["-accel", "kvm", "-machine", "q35,kernel-irqchip=split"];
    let (code, printed, warning) = qemu_args(qemu, "discard", &split);
    assert_eq!(code, Some(2));
    assert!(
        warning.contains("moot") && warning.contains("split"),
        "{warning}"
    );
    // And QEMU agrees: the PIT is QEMU's own, the option went nowhere.
    let mut args = split.to_vec();
    args.extend(printed.split_whitespace());
    let mut running = Qemu::start(qemu.path(), &args);
    assert_eq!(running.pit_device().0, "isa-pit");
}

/// One command line whose fate differs between QEMU versions, or does not: what each QEMU of
/// the matrix does with it (`None`: refuses to start; `Some(device, policy)`: the PIT it
/// builds).
struct Case {
    line: &'static [&'static str],
    on_7_2: Option<(&'static str, Option<&'static str>)>,
    on_10_and_11: Option<(&'static str, Option<&'static str>)>,
}

const KVM_PIT_DELAY: Option<(&str, Option<&str>)> = Some(("kvm-pit", Some("delay")));
const KVM_PIT_DISCARD: Option<(&str, Option<&str>)> = Some(("kvm-pit", Some("discard")));
/// QEMU's own PIT has no lost-tick policy.
const ISA_PIT: Option<(&str, Option<&str>)> = Some(("isa-pit", None));

const CASES: [Case; 7] = [
    // The old flag: gone since QEMU 3.0, refused by all three.
    Case {
        line: &["-accel", "kvm", "-M", "q35", "-no-kvm-pit-reinjection"],
        on_7_2: None,
        on_10_and_11: None,
    },
    // Its replacement works on all three.
    Case {
        line: &[
            "-accel",
            "kvm",
            "-M",
            "q35",
            "-global",
            "kvm-pit.lost_tick_policy=discard",
        ],
        on_7_2: KVM_PIT_DISCARD,
        on_10_and_11: KVM_PIT_DISCARD,
    },
    Case {
        line: &[
            "-accel",
            "kvm",
            "-M",
            "q35",
            "-global",
            "driver=kvm-pit,property=lost_tick_policy,value=discard",
        ],
        on_7_2: KVM_PIT_DISCARD,
        on_10_and_11: KVM_PIT_DISCARD,
    },
    // Options 7.2 still knows and 9.0 removed.
    Case {
        line: &["-accel", "kvm", "-M", "q35", "-no-hpet"],
        on_7_2: KVM_PIT_DELAY,
        on_10_and_11: None,
    },
    Case {
        line: &[
            "-accel",
            "kvm",
            "-M",
            "q35",
            "-no-acpi",
            "-global",
            "kvm-pit.lost_tick_policy=discard",
        ],
        on_7_2: KVM_PIT_DISCARD,
        on_10_and_11: None,
    },
    // The userspace local APIC: deprecated in 7.2, refused from 8.0, except on isapc.
    Case {
        line: &["-accel", "kvm", "-M", "q35,kernel-irqchip=off"],
        on_7_2: ISA_PIT,
        on_10_and_11: None,
    },
    Case {
        line: &["-accel", "kvm", "-M", "isapc,kernel-irqchip=off"],
        on_7_2: ISA_PIT,
        on_10_and_11: ISA_PIT,
    },
];

/// For each command line of [`CASES`]: this QEMU accepts or refuses it as recorded (the
/// record is what the README states), `qemu-args --qemu` says "would refuse" exactly when
/// QEMU refuses, and for a running QEMU `inspect` reports the PIT QEMU built.
fn command_lines_are_read_by_the_running_versions_rules(qemu: &MatrixQemu) {
    if !kvm_or_skip(&named(
        qemu,
        "command_lines_are_read_by_the_running_versions_rules",
    )) {
        return;
    }
    for case in CASES {
        let expected = if qemu.version.at_least(10, 0) {
            case.on_10_and_11
        } else {
            case.on_7_2
        };
        let started = Qemu::try_start(qemu.path(), case.line);
        let (_, _, warnings) = qemu_args(qemu, "discard", case.line);
        let tool_refuses = warnings.contains("would refuse");
        match (started, expected) {
            (Err(output), None) => {
                assert!(
                    tool_refuses,
                    "QEMU {} refuses {:?} but qemu-args does not say so: {warnings}\n{output}",
                    qemu.version, case.line
                );
            }
            (Ok(mut running), Some((device, policy))) => {
                assert_eq!(
                    running.pit_device(),
                    (device.to_owned(), policy.map(str::to_owned)),
                    "QEMU {}: {:?}",
                    qemu.version,
                    case.line
                );
                assert!(
                    !tool_refuses,
                    "QEMU {} runs {:?} but qemu-args says it would refuse: {warnings}",
                    qemu.version, case.line
                );
                let report = inspect_pid(running.pid()).expect("inspect");
                assert_eq!(
                    report.in_kernel_pit,
                    device == "kvm-pit",
                    "QEMU {} {:?}: {}",
                    qemu.version,
                    case.line,
                    report.summary()
                );
                if device == "kvm-pit" {
                    assert_eq!(
                        report.policy.map(|p| p.to_string()).as_deref(),
                        policy,
                        "{}",
                        report.summary()
                    );
                }
                assert_eq!(report.confirmed, Some(true), "{}", report.summary());
            }
            (Err(output), Some(_)) => panic!(
                "QEMU {} refuses {:?}, which it should take:\n{output}",
                qemu.version, case.line
            ),
            (Ok(mut running), None) => panic!(
                "QEMU {} takes {:?} (PIT {:?}), which it should refuse",
                qemu.version,
                case.line,
                running.pit_device()
            ),
        }
    }
}

qemu_matrix! {
    qemu_7_2("7.2"): [
        inspect_reports_each_policy_of_running_qemus,
        inspect_reports_no_in_kernel_pit_with_split_irqchip_or_tcg,
        inspect_command_lists_running_qemus_as_json,
        qemu_accepts_what_qemu_args_prints,
        qemu_args_warns_when_the_command_line_makes_it_moot,
        command_lines_are_read_by_the_running_versions_rules,
    ];
    qemu_10_0("10.0"): [
        inspect_reports_each_policy_of_running_qemus,
        inspect_reports_no_in_kernel_pit_with_split_irqchip_or_tcg,
        inspect_command_lists_running_qemus_as_json,
        qemu_accepts_what_qemu_args_prints,
        qemu_args_warns_when_the_command_line_makes_it_moot,
        command_lines_are_read_by_the_running_versions_rules,
    ];
    qemu_11_1("11.1"): [
        inspect_reports_each_policy_of_running_qemus,
        inspect_reports_no_in_kernel_pit_with_split_irqchip_or_tcg,
        inspect_command_lists_running_qemus_as_json,
        qemu_accepts_what_qemu_args_prints,
        qemu_args_warns_when_the_command_line_makes_it_moot,
        command_lines_are_read_by_the_running_versions_rules,
    ];
}
