//! Reads a QEMU (x86) command line the way the QEMU that runs it does, as far as the PIT is
//! concerned: which accelerator, machine type, `kernel-irqchip` mode and `pit` setting it gets,
//! and so whether an in-kernel (KVM) PIT exists and which lost-tick policy it runs with.
//!
//! Checked against QEMU 7.2, 10.0 and 11.1 (`info qtree` shows `kvm-pit` vs `isa-pit`; the
//! version-matrix tests in `tests/qemu.rs` hold every rule below against each binary):
//! - the default accelerator is TCG; `-enable-kvm`, `-accel kvm` or `-machine accel=kvm`
//!   select KVM; `-accel` and `-machine accel=` together make QEMU refuse to start;
//! - with KVM, `kernel-irqchip` defaults to `on` (in-kernel PIT) for `pc`/`q35`/`isapc` and to
//!   `split` for `microvm`; `split` puts the PIT in QEMU (`isa-pit`). `off` does too where QEMU
//!   still takes it: from 8.0 QEMU refuses it for machines whose CPUs have a local APIC ("KVM
//!   does not support userspace APIC"), 7.2 takes it with a deprecation warning, and `isapc`
//!   takes it everywhere;
//! - `-accel kvm,kernel-irqchip=` takes only the dashed spelling, `-machine` both; values
//!   are exactly `on`, `off`, `split`; the machine's `pit` is `on`/`off`/`auto`;
//! - `-global kvm-pit.lost_tick_policy=` (or `driver=kvm-pit,property=...,value=...`) sets
//!   the policy, the last one wins, values are exactly `delay` or `discard` (default `delay`);
//! - options QEMU removed are refused ("invalid option") from the version that removed them
//!   on: `-no-kvm-pit` (2.12), `-no-kvm-pit-reinjection` and `-no-kvm-irqchip` (3.0),
//!   `-no-kvm` (5.2), `-no-hpet` and `-no-acpi` (9.0). 7.2 still takes the last two; all
//!   three versions refuse `-no-kvm-pit-reinjection`.

use std::collections::BTreeMap;
use std::fmt;

use devshare_common::pit::{LostTickPolicy, QEMU_DEVICE, QEMU_PROPERTY};
use devshare_common::qemu::QemuVersion;
use serde::Serialize;

/// How the guest's interrupt controllers (and with them the PIT) are split between KVM and
/// QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelIrqchip {
    /// PIC, IOAPIC and PIT in KVM.
    On,
    /// Only the LAPIC in KVM; PIC, IOAPIC and PIT in QEMU.
    Split,
    /// Everything in QEMU.
    Off,
}

impl fmt::Display for KernelIrqchip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelIrqchip::On => "on",
            KernelIrqchip::Split => "split",
            KernelIrqchip::Off => "off",
        })
    }
}

/// What the command line means for the PIT's lost-tick policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PitVerdict {
    /// KVM emulates the PIT and the policy applies.
    InKernel {
        /// The policy in effect.
        policy: LostTickPolicy,
        /// Whether the command line sets it (else it is QEMU's default).
        explicit: bool,
    },
    /// There is no in-kernel PIT, so the policy option has no effect.
    NoInKernelPit {
        /// Why.
        reason: String,
    },
    /// The QEMU the reading is for refuses to start with this command line.
    Rejected {
        /// QEMU's objection.
        reason: String,
    },
}

/// The PIT-relevant reading of one QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PitReading {
    /// The QEMU version whose rules were applied (`7.2.22`).
    pub qemu_version: String,
    /// Accelerators in the order QEMU tries them.
    pub accelerators: Vec<String>,
    /// Machine type (QEMU's default `pc` when none is given).
    pub machine: String,
    /// `kernel-irqchip` mode when KVM is used.
    pub kernel_irqchip: Option<KernelIrqchip>,
    /// The `lost_tick_policy` value as written, if any.
    pub policy_option: Option<String>,
    /// The verdict.
    pub verdict: PitVerdict,
    /// Caveats worth telling the user.
    pub notes: Vec<String>,
}

/// Splits a QEMU option value into its `key=value` parts. A first part without `=` gets
/// `implied_key` (QEMU's "implied" key: `type` for `-machine`, `accel` for `-accel`).
/// `,,` is QEMU's escape for a literal comma.
fn option_parts(value: &str, implied_key: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars().peekable();
    let mut pieces = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                pieces.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    pieces.push(current);
    for (i, piece) in pieces.into_iter().enumerate() {
        match piece.split_once('=') {
            Some((k, v)) => parts.push((k.to_owned(), v.to_owned())),
            None if i == 0 => parts.push((implied_key.to_owned(), piece)),
            // A bare flag `foo` means `foo=on` in QEMU's option syntax.
            None => parts.push((piece, "on".to_owned())),
        }
    }
    parts
}

/// A parsed `-global`: (driver, property, value).
fn parse_global(value: &str) -> Option<(String, String, String)> {
    if value.starts_with("driver=") {
        let parts: BTreeMap<String, String> = option_parts(value, "driver").into_iter().collect();
        return Some((
            parts.get("driver")?.clone(),
            parts.get("property")?.clone(),
            parts.get("value")?.clone(),
        ));
    }
    let (lhs, v) = value.split_once('=')?;
    let (driver, property) = lhs.rsplit_once('.')?;
    Some((driver.to_owned(), property.to_owned(), v.to_owned()))
}

fn parse_irqchip(value: &str) -> Option<KernelIrqchip> {
    match value {
        "on" => Some(KernelIrqchip::On),
        "split" => Some(KernelIrqchip::Split),
        "off" => Some(KernelIrqchip::Off),
        _ => None,
    }
}

/// Options QEMU removed: (option without dash, the version that removed it, what replaces
/// it), from QEMU's docs/about/removed-features.rst.
const REMOVED_OPTIONS: [(&str, (u32, u32), &str); 6] = [
    ("no-kvm-pit", (2, 12), "-machine kernel-irqchip=split"),
    (
        "no-kvm-pit-reinjection",
        (3, 0),
        "-global kvm-pit.lost_tick_policy=discard",
    ),
    ("no-kvm-irqchip", (3, 0), "-machine kernel-irqchip=off"),
    ("no-kvm", (5, 2), "-accel tcg"),
    ("no-hpet", (9, 0), "-machine hpet=off"),
    ("no-acpi", (9, 0), "-machine acpi=off"),
];

/// QEMU options that take a value (the next argument): those read here and the common others
/// (from QEMU's option table, `HAS_ARG`), so an option missing its value is found wherever it
/// is and a value is never taken for an option.
const VALUE_OPTIONS: &[&str] = &[
    "accel",
    "machine",
    "M",
    "global",
    "readconfig",
    "m",
    "smp",
    "cpu",
    "drive",
    "blockdev",
    "device",
    "netdev",
    "nic",
    "net",
    "chardev",
    "object",
    "kernel",
    "append",
    "initrd",
    "dtb",
    "bios",
    "L",
    "name",
    "uuid",
    "serial",
    "parallel",
    "monitor",
    "mon",
    "qmp",
    "qmp-pretty",
    "display",
    "vga",
    "boot",
    "numa",
    "rtc",
    "incoming",
    "pidfile",
    "D",
    "d",
    "trace",
    "overcommit",
    "sandbox",
    "msg",
    "fsdev",
    "virtfs",
    "add-fd",
    "k",
    "audiodev",
    "icount",
    "smbios",
    "acpitable",
    "fw_cfg",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "cdrom",
    "fda",
    "fdb",
    "mtdblock",
    "sd",
    "pflash",
    "watchdog-action",
    "action",
    "option-rom",
    "plugin",
    "run-with",
    "compat",
    "iscsi",
    "debugcon",
    "spice",
    "loadvm",
    "gdb",
    "chroot",
    "runas",
    "async-teardown",
    "mem-path",
    "semihosting-config",
    "tpmdev",
    "usbdevice",
    "set",
];

/// The first option of `args` that takes a value and has none (it is the last argument), as
/// written: `-machine` in `... -machine`. Options appended after it would become its value.
pub fn option_missing_value(args: &[String]) -> Option<&str> {
    let mut i = 0;
    while i < args.len() {
        let opt = args[i].strip_prefix('-').unwrap_or(&args[i]);
        let opt = opt.strip_prefix('-').unwrap_or(opt);
        if args[i].starts_with('-') && VALUE_OPTIONS.contains(&opt) {
            if i + 1 == args.len() {
                return Some(&args[i]);
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    None
}

/// Reads the QEMU arguments `args` (everything after the binary) by the rules of QEMU
/// `qemu`.
pub fn read_pit(args: &[String], qemu: QemuVersion) -> PitReading {
    let mut accel_opts: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut machine: BTreeMap<String, String> = BTreeMap::new();
    let mut policy_option: Option<String> = None;
    let mut rejected: Vec<String> = Vec::new();
    let mut notes = Vec::new();

    let mut i = 0;
    while i < args.len() {
        // QEMU accepts `--opt` as well as `-opt`.
        let opt = args[i].strip_prefix('-').unwrap_or(&args[i]);
        let opt = opt.strip_prefix('-').unwrap_or(opt);
        let value = args.get(i + 1).map(String::as_str);
        let mut takes_value = false;
        if args[i].starts_with('-') {
            match opt {
                "accel" => {
                    takes_value = true;
                    if let Some(v) = value {
                        let parts = option_parts(v, "accel");
                        let name = parts
                            .iter()
                            .find(|(k, _)| k == "accel")
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default();
                        accel_opts.push((name, parts));
                    }
                }
                "enable-kvm" => accel_opts.push(("kvm".into(), vec![])),
                "machine" | "M" => {
                    takes_value = true;
                    if let Some(v) = value {
                        for (k, v) in option_parts(v, "type") {
                            // Later -machine options override earlier keys, as in QEMU.
                            machine.insert(k.replace('_', "-"), v);
                        }
                    }
                }
                "global" => {
                    takes_value = true;
                    if let Some((driver, property, v)) = value.and_then(parse_global) {
                        if driver == QEMU_DEVICE && property == QEMU_PROPERTY {
                            policy_option = Some(v);
                        }
                    }
                }
                _ if REMOVED_OPTIONS.iter().any(|(o, _, _)| *o == opt) => {
                    if let Some((_, (major, minor), instead)) = REMOVED_OPTIONS
                        .iter()
                        .find(|(o, (major, minor), _)| *o == opt && qemu.at_least(*major, *minor))
                    {
                        rejected.push(format!(
                            "{} was removed in QEMU {major}.{minor} (\"invalid option\"); use \
                             {instead}",
                            args[i]
                        ));
                    } else if opt == "no-kvm-pit-reinjection" {
                        // Before 3.0 it was sugar for the -global below.
                        policy_option = Some(LostTickPolicy::Discard.to_string());
                    }
                }
                "readconfig" => {
                    takes_value = true;
                    notes.push("settings inside -readconfig files are not read".into());
                }
                _ => {}
            }
        }
        if takes_value && value.is_none() {
            rejected.push(format!("{} is missing its value", args[i]));
        }
        i += if takes_value { 2 } else { 1 };
    }

    let machine_type = machine.get("type").cloned().unwrap_or_else(|| "pc".into());
    let machine_accels: Vec<String> = machine
        .get("accel")
        .map(|a| a.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    if !accel_opts.is_empty() && !machine_accels.is_empty() {
        rejected.push("the -accel and \"-machine accel=\" options are incompatible".into());
    }
    let accelerators: Vec<String> = if !accel_opts.is_empty() {
        accel_opts.iter().map(|(n, _)| n.clone()).collect()
    } else if !machine_accels.is_empty() {
        machine_accels
    } else {
        vec!["tcg".into()]
    };
    if accelerators.len() > 1 {
        notes.push(format!(
            "QEMU tries {} in turn; this reading assumes the first one starts",
            accelerators.join(", then ")
        ));
    }
    let kvm = accelerators.first().map(String::as_str) == Some("kvm");

    // kernel-irqchip: -accel kvm's own property (dashed only), else -machine's.
    let mut irqchip_text: Option<String> = machine.get("kernel-irqchip").cloned();
    if let Some((_, parts)) = accel_opts.iter().find(|(n, _)| n == "kvm") {
        for (k, v) in parts {
            match k.as_str() {
                "kernel-irqchip" => irqchip_text = Some(v.clone()),
                "kernel_irqchip" => rejected
                    .push("-accel kvm has no property kernel_irqchip: write kernel-irqchip".into()),
                _ => {}
            }
        }
    }
    let is_microvm = machine_type == "microvm";
    let kernel_irqchip = match irqchip_text.as_deref() {
        Some(text) => match parse_irqchip(text) {
            Some(mode) => Some(mode),
            None => {
                rejected.push(format!(
                    "kernel-irqchip does not accept {text:?} (on, off or split)"
                ));
                None
            }
        },
        None if is_microvm => Some(KernelIrqchip::Split),
        None => Some(KernelIrqchip::On),
    };
    // QEMU 8.0 removed the userspace local APIC under KVM; isapc's CPUs have none.
    if kvm && kernel_irqchip == Some(KernelIrqchip::Off) && machine_type != "isapc" {
        if qemu.at_least(8, 0) {
            rejected.push(
                "kernel-irqchip=off: KVM does not support userspace APIC (removed in QEMU 8.0; \
                 kernel-irqchip=split keeps the PIT in QEMU too)"
                    .into(),
            );
        } else {
            notes.push(format!(
                "kernel-irqchip=off with KVM is deprecated in QEMU {qemu} (userspace local APIC)"
            ));
        }
    }

    let pit = machine.get("pit").map(String::as_str).unwrap_or("auto");
    if !matches!(pit, "on" | "off" | "auto") {
        rejected.push(format!(
            "the machine's pit does not accept {pit:?} (on, off or auto)"
        ));
    }
    let has_pit_device = machine_type == "isapc"
        || machine_type.starts_with("pc")
        || machine_type.starts_with("q35")
        || is_microvm;
    if !has_pit_device && machine_type != "none" {
        notes.push(format!(
            "machine type {machine_type:?} is not one this tool knows"
        ));
    }

    let policy = match policy_option.as_deref() {
        None => Ok(LostTickPolicy::Delay),
        Some(v) => v.parse::<LostTickPolicy>().map_err(|e| e.to_string()),
    };

    let no_pit = |reason: String| PitVerdict::NoInKernelPit { reason };
    let verdict = if !rejected.is_empty() {
        PitVerdict::Rejected {
            reason: rejected.join("; "),
        }
    } else if !kvm {
        no_pit(format!(
            "the accelerator is {}, not KVM: QEMU emulates the PIT itself (isa-pit), KVM's \
             reinjection does not apply",
            accelerators.first().map(String::as_str).unwrap_or("tcg")
        ))
    } else if !has_pit_device {
        no_pit(format!("machine type {machine_type:?} has no PIT"))
    } else if pit == "off" {
        no_pit("the machine option pit=off removes the PIT".into())
    } else if kernel_irqchip != Some(KernelIrqchip::On) {
        no_pit(format!(
            "kernel-irqchip={}{}: the PIT is emulated in QEMU (isa-pit), not in KVM",
            kernel_irqchip.map_or("?".into(), |m| m.to_string()),
            if irqchip_text.is_none() {
                " (microvm's default)"
            } else {
                ""
            }
        ))
    } else {
        match policy {
            Ok(policy) => PitVerdict::InKernel {
                policy,
                explicit: policy_option.is_some(),
            },
            Err(e) => PitVerdict::Rejected {
                reason: format!("QEMU refuses kvm-pit.lost_tick_policy: {e}"),
            },
        }
    };
    if policy_option.is_some() && matches!(verdict, PitVerdict::NoInKernelPit { .. }) {
        notes.push("the kvm-pit.lost_tick_policy option is given but has no effect".into());
    }

    PitReading {
        qemu_version: qemu.to_string(),
        accelerators,
        machine: machine_type,
        kernel_irqchip: kvm.then_some(kernel_irqchip).flatten(),
        policy_option,
        verdict,
        notes,
    }
}

/// Finds a QEMU system emulator in a process's argv and returns its path and the QEMU
/// arguments. Handles QEMU started directly and through a dynamic loader
/// (`ld-linux-x86-64.so.2 --library-path ... /path/qemu-system-x86_64 ...`).
pub fn split_qemu_argv(argv: &[String]) -> Option<(String, Vec<String>)> {
    let basename = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
    let is_qemu = |s: &str| basename(s).starts_with("qemu-system-");
    let first = argv.first()?;
    if is_qemu(first) {
        return Some((first.clone(), argv[1..].to_vec()));
    }
    if basename(first).starts_with("ld-") {
        // The loader's own options come before the program it runs.
        let pos = argv.iter().position(|a| is_qemu(a))?;
        return Some((argv[pos].clone(), argv[pos + 1..].to_vec()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(line: &str) -> PitReading {
        read_for(line, "11.1")
    }

    fn read_for(line: &str, qemu: &str) -> PitReading {
        let args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        read_pit(&args, qemu.parse().unwrap())
    }

    fn rejected(r: &PitReading) -> bool {
        matches!(r.verdict, PitVerdict::Rejected { .. })
    }

    fn in_kernel(policy: LostTickPolicy, explicit: bool) -> PitVerdict {
        PitVerdict::InKernel { policy, explicit }
    }

    #[test]
    fn kvm_defaults_to_delay() {
        assert_eq!(
            read("-accel kvm -M q35").verdict,
            in_kernel(LostTickPolicy::Delay, false)
        );
        assert_eq!(
            read("-enable-kvm").verdict,
            in_kernel(LostTickPolicy::Delay, false)
        );
        assert_eq!(read("-enable-kvm").machine, "pc");
    }

    #[test]
    fn global_sets_policy_and_last_wins() {
        let r = read("-machine q35,accel=kvm -global kvm-pit.lost_tick_policy=delay --global kvm-pit.lost_tick_policy=discard");
        assert_eq!(r.verdict, in_kernel(LostTickPolicy::Discard, true));
        let r = read("-accel kvm -global driver=kvm-pit,property=lost_tick_policy,value=discard");
        assert_eq!(r.verdict, in_kernel(LostTickPolicy::Discard, true));
        // Other devices' lost_tick_policy (the RTC's) is a different thing.
        let r = read("-accel kvm -global mc146818rtc.lost_tick_policy=slew");
        assert_eq!(r.verdict, in_kernel(LostTickPolicy::Delay, false));
    }

    #[test]
    fn no_in_kernel_pit_cases() {
        for line in [
            "-M q35 -global kvm-pit.lost_tick_policy=discard",
            "-accel tcg",
            "-accel kvm -M q35,kernel_irqchip=split",
            "-accel kvm,kernel-irqchip=split",
            "-accel kvm -machine isapc,kernel-irqchip=off",
            "-accel kvm -M pc,pit=off",
            "-accel kvm -M microvm",
            "-accel kvm -M none",
        ] {
            assert!(
                matches!(read(line).verdict, PitVerdict::NoInKernelPit { .. }),
                "{line}: {:?}",
                read(line)
            );
        }
        assert_eq!(
            read("-accel kvm -M microvm,kernel-irqchip=on").verdict,
            in_kernel(LostTickPolicy::Delay, false)
        );
    }

    #[test]
    fn what_qemu_refuses() {
        for line in [
            "-accel kvm -no-kvm-pit-reinjection",
            "-accel kvm -machine accel=kvm",
            "-accel kvm,kernel_irqchip=split",
            "-accel kvm,kernel-irqchip=true",
            "-accel kvm -M pc,pit=no",
            "-accel kvm -global kvm-pit.lost_tick_policy=slew",
            "-accel kvm -global kvm-pit.lost_tick_policy=DISCARD",
        ] {
            assert!(
                matches!(read(line).verdict, PitVerdict::Rejected { .. }),
                "{line}: {:?}",
                read(line)
            );
        }
    }

    #[test]
    fn removed_options_follow_the_qemu_version() {
        for qemu in ["7.2", "10.0", "11.1"] {
            for line in [
                "-accel kvm -no-kvm-pit-reinjection",
                "-accel kvm -no-kvm-pit",
                "-accel kvm -no-kvm-irqchip",
                "-accel kvm -no-kvm",
            ] {
                assert!(rejected(&read_for(line, qemu)), "QEMU {qemu}: {line}");
            }
        }
        let r = read_for("-accel kvm -no-kvm-pit-reinjection", "7.2");
        assert!(
            matches!(&r.verdict, PitVerdict::Rejected { reason }
                if reason.contains("removed in QEMU 3.0")
                    && reason.contains("-global kvm-pit.lost_tick_policy=discard")),
            "{r:?}"
        );
        // Before 3.0 the flag meant discard.
        assert_eq!(
            read_for("-accel kvm -no-kvm-pit-reinjection", "2.12").verdict,
            in_kernel(LostTickPolicy::Discard, true)
        );
        // 7.2 still takes -no-hpet and -no-acpi; 9.0 removed them.
        for line in ["-accel kvm -M q35 -no-hpet", "-accel kvm -M q35 -no-acpi"] {
            assert_eq!(
                read_for(line, "7.2").verdict,
                in_kernel(LostTickPolicy::Delay, false),
                "{line}"
            );
            assert!(rejected(&read_for(line, "9.0")), "{line}");
            assert!(rejected(&read_for(line, "11.1")), "{line}");
        }
        assert_eq!(read_for("-M q35", "7.2").qemu_version, "7.2");
    }

    #[test]
    fn userspace_apic_went_away_in_8_0() {
        let off = "-accel kvm -M q35,kernel-irqchip=off -global kvm-pit.lost_tick_policy=discard";
        let old = read_for(off, "7.2");
        assert!(
            matches!(&old.verdict, PitVerdict::NoInKernelPit { reason } if reason.contains("off")),
            "{old:?}"
        );
        assert!(
            old.notes.iter().any(|n| n.contains("deprecated")),
            "{old:?}"
        );
        for qemu in ["8.0", "10.0", "11.1"] {
            let r = read_for(off, qemu);
            assert!(
                matches!(&r.verdict, PitVerdict::Rejected { reason }
                    if reason.contains("userspace APIC")),
                "QEMU {qemu}: {r:?}"
            );
        }
        // isapc's CPUs have no local APIC: off is fine everywhere, and leaves no in-kernel PIT.
        for qemu in ["7.2", "11.1"] {
            let r = read_for("-accel kvm -M isapc,kernel-irqchip=off", qemu);
            assert!(
                matches!(r.verdict, PitVerdict::NoInKernelPit { .. }),
                "QEMU {qemu}: {r:?}"
            );
        }
        // Under TCG the option is moot and QEMU does not check it against KVM.
        assert!(!rejected(&read_for(
            "-accel tcg -M q35,kernel-irqchip=off",
            "11.1"
        )));
    }

    #[test]
    fn an_option_missing_its_value_is_found() {
        let args = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            option_missing_value(&args("-m 1G -machine")),
            Some("-machine")
        );
        assert_eq!(
            option_missing_value(&args("-enable-kvm --global")),
            Some("--global")
        );
        assert_eq!(option_missing_value(&args("-machine q35 -m")), Some("-m"));
        // A value that looks like an option is a value.
        assert_eq!(option_missing_value(&args("-name -machine")), None);
        assert_eq!(
            option_missing_value(&args("-machine q35 -enable-kvm")),
            None
        );
        assert!(rejected(&read("-accel kvm -machine")));
    }

    #[test]
    fn option_values_are_not_options() {
        // A value that looks like an option is still the value of the option before it.
        let r = read("-global -enable-kvm");
        assert_eq!(r.accelerators, ["tcg"]);
        assert_eq!(
            option_parts("q35,,x,accel=kvm:tcg,usb", "type"),
            [
                ("type".to_owned(), "q35,x".to_owned()),
                ("accel".to_owned(), "kvm:tcg".to_owned()),
                ("usb".to_owned(), "on".to_owned())
            ]
        );
        let r = read("-machine accel=kvm:tcg");
        assert_eq!(r.accelerators, ["kvm", "tcg"]);
        assert_eq!(r.notes.len(), 1);
    }

    #[test]
    fn finds_qemu_behind_a_loader() {
        let argv: Vec<String> = [
            "/r/lib64/ld-linux-x86-64.so.2",
            "--library-path",
            "/r/usr/lib",
            "/r/usr/bin/qemu-system-x86_64",
            "-accel",
            "kvm",
        ]
        .map(str::to_owned)
        .to_vec();
        let (bin, args) = split_qemu_argv(&argv).unwrap();
        assert_eq!(bin, "/r/usr/bin/qemu-system-x86_64");
        assert_eq!(args, ["-accel", "kvm"]);
        assert!(
            split_qemu_argv(&["bash".into(), "-c".into(), "qemu-system-x86_64 -S".into()])
                .is_none()
        );
    }
}
