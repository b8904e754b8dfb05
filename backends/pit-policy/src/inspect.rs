//! Inspect running QEMUs: read their command line from /proc, and check the reading against
//! what the kernel shows: a KVM VM fd (`anon_inode:kvm-vm`) says KVM is really in use, and a
//! kernel worker thread `kvm-pit/<pid>` says KVM created an in-kernel PIT for that process.
//!
//! The policy itself cannot be read back from outside: `KVM_REINJECT_CONTROL` is write-only
//! and only the VM's creator may call it. It comes from the command line, read by the rules of
//! the QEMU version the process runs ([`crate::binary`] reads it from the mapped executable).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use devshare_common::pit::LostTickPolicy;
use serde::Serialize;

use crate::binary::process_qemu_version;
use crate::cmdline::{read_pit, split_qemu_argv, PitReading, PitVerdict};
use devshare_common::qemu::QemuVersion;

/// Why a process could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// No such process (or it ended).
    #[error("no process {0}")]
    NoProcess(u32),
    /// /proc could not be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        /// The file.
        path: String,
        /// The failure.
        source: io::Error,
    },
    /// The process is not a QEMU system emulator.
    #[error("process {pid} is not a QEMU system emulator (command line: {cmdline})")]
    NotQemu {
        /// The process.
        pid: u32,
        /// Its command line, space-joined, shortened.
        cmdline: String,
    },
}

/// What the kernel shows about a QEMU process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelEvidence {
    /// The process holds a KVM VM fd.
    pub kvm_vm_fd: bool,
    /// The pid of its `kvm-pit/<pid>` kernel worker, if one exists.
    pub pit_worker: Option<u32>,
}

/// The report on one QEMU process.
#[derive(Debug, Clone, Serialize)]
pub struct QemuPit {
    /// The process id.
    pub pid: u32,
    /// The QEMU binary.
    pub binary: String,
    /// The version of the QEMU binary the process runs, when it could be read; the command
    /// line is read by that version's rules (else by the newest tested version's).
    pub qemu_version: Option<String>,
    /// The lost-tick policy in effect, or `None` when there is no in-kernel PIT.
    pub policy: Option<LostTickPolicy>,
    /// Whether KVM emulates this guest's PIT.
    pub in_kernel_pit: bool,
    /// Whether the policy was set on the command line (else QEMU's default).
    pub explicit: bool,
    /// Why there is no in-kernel PIT, or why the reading is doubtful.
    pub reason: Option<String>,
    /// Whether the kernel's evidence agrees with the command line (`None`: cannot tell).
    pub confirmed: Option<bool>,
    /// What the kernel shows.
    pub evidence: KernelEvidence,
    /// The command-line reading behind the answer.
    pub reading: PitReading,
}

impl QemuPit {
    /// One line for humans, control characters escaped (the binary's name and the reasons
    /// come from a command line any local user writes).
    pub fn summary(&self) -> String {
        devshare_common::output::escape_text(&self.summary_raw())
    }

    fn summary_raw(&self) -> String {
        let name = self.binary.rsplit('/').next().unwrap_or(&self.binary);
        let version = match &self.qemu_version {
            Some(v) => format!(" {v}"),
            None => String::new(),
        };
        let mut line = format!("pid {} ({name}{version}): ", self.pid);
        match self.policy {
            Some(policy) => {
                line.push_str(&format!(
                    "lost_tick_policy={policy} ({}), reinjection {}",
                    if self.explicit {
                        "set with -global"
                    } else {
                        "QEMU's default"
                    },
                    if policy.reinject() { "on" } else { "off" }
                ));
            }
            None => line.push_str("no in-kernel PIT"),
        }
        if let Some(reason) = &self.reason {
            line.push_str(&format!(": {reason}"));
        }
        match (self.confirmed, self.evidence.pit_worker) {
            (Some(true), Some(worker)) => {
                line.push_str(&format!(" [kernel: kvm-pit worker thread {worker}]"))
            }
            (Some(true), None) => line.push_str(" [kernel: no kvm-pit worker]"),
            (Some(false), _) => line.push_str(" [kernel evidence disagrees, see reason]"),
            (None, _) => {}
        }
        line
    }
}

fn proc_error(path: &Path, source: io::Error) -> InspectError {
    InspectError::Proc {
        path: path.display().to_string(),
        source,
    }
}

/// A process's argv from `/proc/PID/cmdline`.
fn read_argv(proc_root: &Path, pid: u32) -> Result<Vec<String>, InspectError> {
    let path = proc_root.join(pid.to_string()).join("cmdline");
    let raw = fs::read(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => InspectError::NoProcess(pid),
        _ => proc_error(&path, e),
    })?;
    Ok(raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

fn holds_kvm_vm(proc_root: &Path, pid: u32) -> bool {
    let Ok(fds) = fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .any(|target| target.as_os_str() == "anon_inode:kvm-vm")
}

fn pids(proc_root: &Path) -> Result<Vec<u32>, InspectError> {
    let entries = fs::read_dir(proc_root).map_err(|e| proc_error(proc_root, e))?;
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// Kernel `kvm-pit/<creator pid>` worker threads, by creator pid.
fn pit_workers(proc_root: &Path) -> Result<BTreeMap<u32, u32>, InspectError> {
    let mut workers = BTreeMap::new();
    for pid in pids(proc_root)? {
        let Ok(comm) = fs::read_to_string(proc_root.join(pid.to_string()).join("comm")) else {
            continue;
        };
        if let Some(owner) = comm.trim().strip_prefix("kvm-pit/") {
            if let Ok(owner) = owner.parse() {
                workers.insert(owner, pid);
            }
        }
    }
    Ok(workers)
}

fn judge(
    pid: u32,
    binary: String,
    qemu_version: Option<QemuVersion>,
    reading: PitReading,
    evidence: KernelEvidence,
) -> QemuPit {
    let mut report = QemuPit {
        pid,
        binary,
        qemu_version: qemu_version.map(|v| v.to_string()),
        policy: None,
        in_kernel_pit: false,
        explicit: false,
        reason: None,
        confirmed: None,
        evidence: evidence.clone(),
        reading: reading.clone(),
    };
    match reading.verdict {
        PitVerdict::InKernel { policy, explicit } => {
            if !evidence.kvm_vm_fd {
                report.reason = Some(
                    "the command line asks for KVM but the process holds no KVM VM: QEMU fell \
                     back to another accelerator (or has not created the VM yet)"
                        .into(),
                );
                report.confirmed = Some(false);
            } else {
                report.policy = Some(policy);
                report.explicit = explicit;
                report.in_kernel_pit = true;
                report.confirmed = Some(evidence.pit_worker.is_some());
                if evidence.pit_worker.is_none() {
                    report.reason = Some(
                        "the kernel shows no kvm-pit worker for this process (a PID namespace \
                         can hide it)"
                            .into(),
                    );
                    report.confirmed = None;
                }
            }
        }
        PitVerdict::NoInKernelPit { reason } => {
            if let Some(worker) = evidence.pit_worker {
                // The kernel knows better: an in-kernel PIT exists.
                let policy = reading
                    .policy_option
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_default();
                report.policy = Some(policy);
                report.explicit = reading.policy_option.is_some();
                report.in_kernel_pit = true;
                report.confirmed = Some(false);
                report.reason = Some(format!(
                    "the command line suggests none ({reason}), but kernel thread {worker} is \
                     this process's in-kernel PIT"
                ));
            } else {
                report.reason = Some(reason);
                report.confirmed = Some(true);
            }
        }
        PitVerdict::Rejected { reason } => {
            // It runs, so QEMU took it: this tool's rules for the version are wrong, or the
            // version is not the one the rules were applied for.
            report.reason = Some(format!(
                "QEMU {} should have refused this command line ({reason}), yet it runs: this \
                 reading is doubtful",
                reading.qemu_version
            ));
        }
    }
    report
}

/// Inspects process `pid` under `proc_root` (normally `/proc`).
pub fn inspect_pid_in(proc_root: &Path, pid: u32) -> Result<QemuPit, InspectError> {
    let argv = read_argv(proc_root, pid)?;
    let Some((binary, args)) = split_qemu_argv(&argv) else {
        let mut cmdline = argv.join(" ");
        if cmdline.len() > 120 {
            let cut = (0..=117)
                .rev()
                .find(|&i| cmdline.is_char_boundary(i))
                .unwrap_or(0);
            cmdline.truncate(cut);
            cmdline.push_str("...");
        }
        // Any local user writes a command line: no control character reaches a terminal.
        let cmdline = devshare_common::output::escape_text(&cmdline);
        return Err(InspectError::NotQemu { pid, cmdline });
    };
    let evidence = KernelEvidence {
        kvm_vm_fd: holds_kvm_vm(proc_root, pid),
        pit_worker: pit_workers(proc_root)?.get(&pid).copied(),
    };
    let version = process_qemu_version(proc_root, pid);
    let rules = version.as_ref().map_or(QemuVersion::NEWEST_TESTED, |v| *v);
    let mut reading = read_pit(&args, rules);
    if let Err(e) = &version {
        reading.notes.push(format!(
            "the QEMU version could not be read ({e}): QEMU {rules}'s rules applied"
        ));
    }
    Ok(judge(pid, binary, version.ok(), reading, evidence))
}

/// Inspects process `pid`.
pub fn inspect_pid(pid: u32) -> Result<QemuPit, InspectError> {
    inspect_pid_in(Path::new("/proc"), pid)
}

/// Inspects every running QEMU system emulator.
pub fn inspect_all() -> Result<Vec<QemuPit>, InspectError> {
    let proc_root = Path::new("/proc");
    let mut out = Vec::new();
    for pid in pids(proc_root)? {
        match inspect_pid_in(proc_root, pid) {
            Ok(report) => out.push(report),
            // Not QEMU, or gone meanwhile: not ours to report.
            Err(InspectError::NotQemu { .. } | InspectError::NoProcess(_)) => {}
            Err(InspectError::Proc { .. }) => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(line: &str) -> PitReading {
        read_pit(
            &line
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            QemuVersion::NEWEST_TESTED,
        )
    }

    #[test]
    fn kvm_fallback_is_caught_by_missing_vm_fd() {
        let r = judge(
            1,
            "qemu-system-x86_64".into(),
            None,
            reading("-machine accel=kvm:tcg"),
            KernelEvidence::default(),
        );
        assert_eq!(r.policy, None);
        assert_eq!(r.confirmed, Some(false));
    }

    #[test]
    fn kernel_worker_confirms_policy() {
        let r = judge(
            7,
            "q".into(),
            Some(QemuVersion::new(11, 1, 3)),
            reading("-accel kvm -global kvm-pit.lost_tick_policy=discard"),
            KernelEvidence {
                kvm_vm_fd: true,
                pit_worker: Some(9),
            },
        );
        assert_eq!(r.policy, Some(LostTickPolicy::Discard));
        assert!(r.explicit && r.in_kernel_pit);
        assert_eq!(r.confirmed, Some(true));
        assert!(
            r.summary().contains("lost_tick_policy=discard"),
            "{}",
            r.summary()
        );
        assert!(r.summary().contains("(q 11.1.3)"), "{}", r.summary());
    }

    #[test]
    fn non_qemu_process_is_a_clear_error() {
        let err = inspect_pid(std::process::id()).unwrap_err();
        assert!(matches!(err, InspectError::NotQemu { .. }), "{err}");
    }
}
