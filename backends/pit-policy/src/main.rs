//! `kvm-pit-policy`: choose, check and prove KVM's in-kernel PIT lost-tick policy.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use devshare_common::pit::{qemu_args, LostTickPolicy};
use devshare_common::qemu::QemuVersion;
use kvm_pit_policy::cmdline::{option_missing_value, read_pit, PitVerdict};
use kvm_pit_policy::inspect::{inspect_all, inspect_pid, QemuPit};
use kvm_pit_policy::lab::{run_lab, LabConfig};
use kvm_pit_policy::plot::write_png;
use kvm_pit_policy::stall::{parse_duration, StallPattern};

/// Choose, check and measure what KVM does with PIT timer ticks a guest misses.
///
/// Guests that keep time by counting PIT (i8254) ticks -- older Linux, some Windows
/// versions, many RTOSes -- fall behind when their vCPU is descheduled. KVM's in-kernel PIT
/// can keep the missed ticks and deliver them later ("delay", reinjection on, QEMU's
/// default) or drop them ("discard"). QEMU chooses once, at start.
#[derive(Parser, Debug)]
#[command(name = "kvm-pit-policy", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the QEMU options that set the policy; warn if the rest of the command line
    /// makes them moot.
    ///
    /// Example: kvm-pit-policy qemu-args --policy delay -- -accel kvm -M q35
    QemuArgs {
        /// The policy to set.
        #[arg(long, value_enum)]
        policy: LostTickPolicy,
        /// Exit with status 2 when there is a warning.
        #[arg(long)]
        strict: bool,
        /// Check the rest of the command line by the rules of this QEMU version (e.g. 7.2
        /// still takes -no-hpet, 11.1 refuses it) [default: 11.1, the newest tested]. The
        /// printed option is the same for every QEMU since 3.0.
        #[arg(long, value_name = "X.Y", conflicts_with = "qemu_binary")]
        qemu_version: Option<QemuVersion>,
        /// Take that version from `PATH --version`.
        #[arg(long = "qemu", value_name = "PATH")]
        qemu_binary: Option<PathBuf>,
        /// The rest of the QEMU command line (after `--`), to check that the option applies.
        #[arg(last = true)]
        qemu: Vec<String>,
    },
    /// Report the policy in effect in running QEMUs (all of them, or --pid), or why they
    /// have no in-kernel PIT.
    ///
    /// The command line is read from /proc and checked against the kernel: a KVM VM fd
    /// shows KVM is in use, a `kvm-pit/<pid>` kernel thread shows the in-kernel PIT exists.
    Inspect {
        /// A QEMU process id; repeat for several. Default: every running qemu-system-*.
        #[arg(long)]
        pid: Vec<u32>,
        /// Print JSON (an array, one object per process) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the experiment: a tiny guest on /dev/kvm counts PIT ticks while its vCPU is
    /// withheld; once per policy, side by side.
    ///
    /// Needs /dev/kvm with the in-kernel irqchip and PIT. Numbers come from the guest's own
    /// tick counter; "expected" is wall-clock time times the programmed PIT rate.
    Lab {
        /// PIT rate to program, in Hz (the 16-bit divisor rounds it; KVM caps periodic PIT
        /// timers near 5 kHz).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(19..=5000))]
        rate: u32,
        /// When to withhold the vCPU: STALL/PERIOD (e.g. 50ms/150ms: 50 ms of every 150 ms),
        /// random:MIN-MAX/RUNMIN-RUNMAX (stalls of MIN..MAX after runs of RUNMIN..RUNMAX),
        /// or none.
        #[arg(long, default_value = "50ms/150ms")]
        stall: StallPattern,
        /// How long the stall pattern runs (e.g. 3s, 1500ms).
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        duration: Duration,
        /// How long the guest runs undisturbed afterwards, to catch up.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        settle: Duration,
        /// Seed for random stall patterns (both policies get the same stalls).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Run only this policy (default: both).
        #[arg(long, value_enum)]
        policy: Option<LostTickPolicy>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Also draw ticks over time for each policy into this PNG file.
        #[arg(long, value_name = "FILE.png")]
        plot: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    devshare_common::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::QemuArgs {
            policy,
            strict,
            qemu_version,
            qemu_binary,
            qemu,
        } => match QemuVersion::chosen(qemu_version, qemu_binary.as_deref()) {
            Ok(version) => {
                if let Some(warning) = version.untested_warning() {
                    eprintln!("kvm-pit-policy: {warning}");
                }
                qemu_args_command(policy, strict, version, qemu)
            }
            Err(e) => {
                eprintln!("kvm-pit-policy: {e}");
                ExitCode::from(2)
            }
        },
        Command::Inspect { pid, json } => inspect_command(&pid, json),
        Command::Lab {
            rate,
            stall,
            duration,
            settle,
            seed,
            policy,
            json,
            plot,
        } => {
            let config = LabConfig {
                rate_hz: rate,
                duration,
                settle,
                pattern: stall.clone(),
                seed,
                ..LabConfig::default()
            };
            let policies = policy.map_or(LostTickPolicy::ALL.to_vec(), |p| vec![p]);
            lab_command(&config, &stall.to_string(), &policies, json, plot)
        }
    }
}

/// Prints `text` (a closed pipe is no failure, see [`devshare_common::output`]); false, after
/// saying why, when stdout cannot be written.
fn print(text: &str) -> bool {
    match devshare_common::output::print(text) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("kvm-pit-policy: cannot write to stdout: {e}");
            false
        }
    }
}

fn qemu_args_command(
    policy: LostTickPolicy,
    strict: bool,
    version: QemuVersion,
    mut qemu: Vec<String>,
) -> ExitCode {
    let ours = qemu_args(policy);
    // One quoted string is taken as a whole command line.
    if qemu.len() == 1 && qemu[0].contains(char::is_whitespace) {
        qemu = qemu[0].split_whitespace().map(str::to_owned).collect();
    }
    // Tolerate the binary itself at the front.
    if qemu.first().is_some_and(|a| {
        a.rsplit('/')
            .next()
            .unwrap_or(a)
            .starts_with("qemu-system-")
    }) {
        qemu.remove(0);
    }
    if let Some(opt) = option_missing_value(&qemu) {
        // The options appended below would become its value (-global as the machine type).
        eprintln!(
            "kvm-pit-policy: the QEMU command line ends with {opt}, which is missing its value"
        );
        return ExitCode::from(2);
    }
    if !print(&format!("{}\n", ours.join(" "))) {
        return ExitCode::FAILURE;
    }
    if qemu.is_empty() {
        return ExitCode::SUCCESS;
    }
    let mut warnings = Vec::new();
    let before = read_pit(&qemu, version);
    if let Some(existing) = &before.policy_option {
        if existing != policy.as_str() {
            warnings.push(format!(
                "the command line already sets kvm-pit.lost_tick_policy={existing}: put these \
                 options after it (the last -global wins) or remove it"
            ));
        }
    }
    qemu.extend(ours);
    let reading = read_pit(&qemu, version);
    match &reading.verdict {
        PitVerdict::InKernel { .. } => {}
        PitVerdict::NoInKernelPit { reason } => warnings.push(format!(
            "the option is moot with this command line: {reason}"
        )),
        PitVerdict::Rejected { reason } => warnings.push(format!(
            "QEMU {version} would refuse this command line: {reason}"
        )),
    }
    for w in &warnings {
        eprintln!("kvm-pit-policy: warning: {w}");
    }
    // The moot warning already says the option goes nowhere; other notes still matter.
    let notes: Vec<&String> = reading
        .notes
        .iter()
        .filter(|n| !n.contains("has no effect"))
        .collect();
    for n in &notes {
        eprintln!("kvm-pit-policy: note: {n}");
    }
    if strict && !(warnings.is_empty() && notes.is_empty()) {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn inspect_command(pids: &[u32], json: bool) -> ExitCode {
    let mut reports: Vec<QemuPit> = Vec::new();
    let mut failed = false;
    if pids.is_empty() {
        match inspect_all() {
            Ok(all) => reports = all,
            Err(e) => {
                eprintln!("kvm-pit-policy: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        for &pid in pids {
            match inspect_pid(pid) {
                Ok(r) => reports.push(r),
                Err(e) => {
                    eprintln!("kvm-pit-policy: {e}");
                    failed = true;
                }
            }
        }
    }
    let text = if json {
        match serde_json::to_string_pretty(&reports) {
            Ok(text) => format!("{text}\n"),
            Err(e) => {
                eprintln!("kvm-pit-policy: cannot encode JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if reports.is_empty() && pids.is_empty() {
        "no running QEMU (qemu-system-*) found\n".to_string()
    } else {
        let mut text = String::new();
        for r in &reports {
            text.push_str(&format!("{}\n", r.summary()));
            for note in &r.reading.notes {
                let note = devshare_common::output::escape_text(note);
                text.push_str(&format!("    note: {note}\n"));
            }
        }
        text
    };
    if !print(&text) || failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn lab_command(
    config: &LabConfig,
    pattern: &str,
    policies: &[LostTickPolicy],
    json: bool,
    plot: Option<PathBuf>,
) -> ExitCode {
    // Before the measurement, not after it: a path that cannot take the plot is an error now.
    if let Some(path) = &plot {
        if let Err(e) = devshare_common::files::check_replaceable(path) {
            eprintln!("kvm-pit-policy: cannot write the plot: {e}");
            return ExitCode::FAILURE;
        }
    }
    let report = match run_lab(config, pattern, policies) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvm-pit-policy: lab failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let text = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => format!("{text}\n"),
            Err(e) => {
                eprintln!("kvm-pit-policy: cannot encode JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        report.table()
    };
    if !print(&text) {
        return ExitCode::FAILURE;
    }
    if let Some(path) = plot {
        if let Err(e) = write_png(&report, &path) {
            eprintln!("kvm-pit-policy: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("plot written to {}", path.display());
    }
    ExitCode::SUCCESS
}
