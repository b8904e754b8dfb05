//! The lab on this machine's /dev/kvm: a real-mode guest counts PIT ticks while the host
//! withholds its vCPU 50 ms of every 150 ms. The numbers come from the guest's own counter.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{kvm_or_skip, tool};
use devshare_common::pit::LostTickPolicy;
use kvm_pit_policy::lab::{run_policy, LabConfig, LabVm};
use kvm_pit_policy::reinject::ReinjectError;
use kvm_pit_policy::stall::StallPattern;

/// One VM at a time: two labs side by side on two cores would disturb each other.
static KVM: Mutex<()> = Mutex::new(());

fn one_third_stalls() -> LabConfig {
    LabConfig {
        rate_hz: 1000,
        duration: Duration::from_secs(3),
        settle: Duration::from_millis(500),
        pattern: StallPattern::Periodic {
            stall: Duration::from_millis(50),
            period: Duration::from_millis(150),
        },
        ..LabConfig::default()
    }
}

#[test]
fn lab_reinject_on_loses_at_most_half_a_percent_once_caught_up() {
    if !kvm_or_skip("lab_reinject_on_loses_at_most_half_a_percent_once_caught_up") {
        return;
    }
    let _one = KVM.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_policy(LostTickPolicy::Delay, &one_third_stalls()).expect("lab run");
    eprintln!(
        "delay: expected {} counted {} lost {:.2}% max behind {} catch-up {:?} ms",
        run.expected_ticks,
        run.counted_ticks,
        run.lost_percent,
        run.max_behind_ticks,
        run.catch_up_ms
    );
    // The stalls really happened: 20 of them, and the guest fell ~50 ticks behind in each.
    assert_eq!(run.stalls, 20);
    assert!(
        run.max_behind_ticks >= 40,
        "max behind {}",
        run.max_behind_ticks
    );
    assert!(run.catch_up_ms.is_some(), "never caught up: {run:?}");
    assert!(run.counted_ticks > 0);
    assert!(
        run.lost_percent <= 0.5,
        "reinjection on lost {:.2}% ({} of {})",
        run.lost_percent,
        run.lost_ticks,
        run.expected_ticks
    );
}

#[test]
fn lab_reinject_off_loses_at_least_twenty_percent() {
    if !kvm_or_skip("lab_reinject_off_loses_at_least_twenty_percent") {
        return;
    }
    let _one = KVM.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_policy(LostTickPolicy::Discard, &one_third_stalls()).expect("lab run");
    eprintln!(
        "discard: expected {} counted {} lost {:.2}%",
        run.expected_ticks, run.counted_ticks, run.lost_percent
    );
    assert_eq!(run.stalls, 20);
    assert!(run.counted_ticks > 0);
    assert!(
        run.lost_percent >= 20.0,
        "reinjection off lost only {:.2}% ({} of {})",
        run.lost_percent,
        run.lost_ticks,
        run.expected_ticks
    );
}

#[test]
fn reinject_control_before_the_pit_exists_is_a_clear_error() {
    if !kvm_or_skip("reinject_control_before_the_pit_exists_is_a_clear_error") {
        return;
    }
    let vm = LabVm::new(1193).expect("VM with irqchip");
    let err = vm
        .set_policy(LostTickPolicy::Discard)
        .expect_err("KVM_REINJECT_CONTROL without a PIT must fail");
    assert!(matches!(err, ReinjectError::NoPit), "{err:?}");
    assert!(err.to_string().contains("KVM_CREATE_PIT2"), "{err}");
    // Once the PIT exists the same call succeeds, both ways.
    vm.create_pit().expect("KVM_CREATE_PIT2");
    vm.set_policy(LostTickPolicy::Discard)
        .expect("reinject off");
    vm.set_policy(LostTickPolicy::Delay).expect("reinject on");
}

/// A `--plot` path that cannot take the plot (its directory is missing) is refused before the
/// lab runs: no report, no time spent measuring.
#[test]
fn a_plot_path_that_cannot_be_written_is_refused_before_the_lab_runs() {
    let dir = std::env::temp_dir().join(format!("pit-lab-noplot-{}", std::process::id()));
    let out = tool()
        .args(["lab", "--duration", "600ms", "--settle", "200ms", "--plot"])
        .arg(dir.join("missing/ticks.png"))
        .output()
        .expect("run kvm-pit-policy lab");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "the lab ran first: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn lab_command_prints_json_and_draws_the_plot() {
    if !kvm_or_skip("lab_command_prints_json_and_draws_the_plot") {
        return;
    }
    let _one = KVM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("pit-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("ticks.png");
    let out = tool()
        .args([
            "lab",
            "--duration",
            "600ms",
            "--settle",
            "200ms",
            "--json",
            "--plot",
        ])
        .arg(&png)
        .output()
        .expect("run kvm-pit-policy lab");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let runs = report["runs"].as_array().expect("runs");
    let policies: Vec<&str> = runs.iter().filter_map(|r| r["policy"].as_str()).collect();
    assert_eq!(policies, ["delay", "discard"]);
    for r in runs {
        assert_eq!(r["stalls"], 4, "{r}");
        assert!(r["counted_ticks"].as_u64().unwrap() > 0);
    }
    // Discarding loses more than delaying, in the tool's own output too.
    assert!(runs[1]["lost_ticks"].as_i64() > runs[0]["lost_ticks"].as_i64());
    let bytes = std::fs::read(&png).expect("plot written");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    std::fs::remove_dir_all(&dir).ok();
}
