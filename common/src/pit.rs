//! KVM in-kernel PIT lost-tick policy: the value type and the QEMU options that set it.
//!
//! When a vCPU is descheduled, the periodic ticks of the in-kernel i8254 PIT that fall into
//! that gap cannot be delivered. KVM can count them and re-inject them once the vCPU runs
//! again ("catch-up", `pit_reinject = 1`, QEMU's `delay`) or drop them (`discard`). Guests
//! that keep time by counting PIT ticks lose time with `discard`.
//!
//! QEMU picks the policy once, at start, through the `kvm-pit` device's
//! `lost_tick_policy` property. [`qemu_args`] renders those options so every backend's
//! `--print-qemu-args` output can include them:
//!
//! ```
//! use devshare_common::pit::{qemu_args, LostTickPolicy};
//!
//! let policy: LostTickPolicy = "discard".parse().unwrap();
//! assert_eq!(
//!     qemu_args(policy),
//!     ["-global", "kvm-pit.lost_tick_policy=discard"]
//! );
//! ```
//!
//! The option only takes effect with KVM and the in-kernel irqchip (QEMU's default for
//! `pc`/`q35` under KVM); `kvm-pit-policy qemu-args` warns when a command line makes it moot.

use std::fmt;
use std::str::FromStr;

/// The QEMU device whose property carries the policy.
pub const QEMU_DEVICE: &str = "kvm-pit";
/// The property of [`QEMU_DEVICE`] that carries the policy.
pub const QEMU_PROPERTY: &str = "lost_tick_policy";

/// What KVM does with PIT ticks that fell due while the vCPU could not take them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LostTickPolicy {
    /// Keep the missed ticks and inject them later (KVM `pit_reinject = 1`). QEMU's default.
    #[default]
    Delay,
    /// Drop the missed ticks (KVM `pit_reinject = 0`).
    Discard,
}

impl LostTickPolicy {
    /// Both policies, in the order they are usually shown.
    pub const ALL: [LostTickPolicy; 2] = [LostTickPolicy::Delay, LostTickPolicy::Discard];

    /// The value QEMU's `lost_tick_policy` property takes for this policy.
    pub fn as_str(self) -> &'static str {
        match self {
            LostTickPolicy::Delay => "delay",
            LostTickPolicy::Discard => "discard",
        }
    }

    /// The `pit_reinject` value of `struct kvm_reinject_control` for this policy.
    pub fn reinject(self) -> bool {
        matches!(self, LostTickPolicy::Delay)
    }

    /// The policy that a `pit_reinject` value stands for.
    pub fn from_reinject(reinject: bool) -> Self {
        if reinject {
            LostTickPolicy::Delay
        } else {
            LostTickPolicy::Discard
        }
    }
}

impl fmt::Display for LostTickPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no lost-tick policy the in-kernel PIT supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lost-tick policy {0:?}: the in-kernel PIT supports \"delay\" (re-inject missed ticks) or \"discard\"")]
pub struct UnknownPolicy(pub String);

impl FromStr for LostTickPolicy {
    type Err = UnknownPolicy;

    /// Parses QEMU's spelling, `delay` or `discard`: lower case only, as QEMU itself
    /// refuses `DISCARD`. This is the one parser of the policy: the command lines of every
    /// binary use it through [`clap::ValueEnum`], and QEMU command lines are read with it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LostTickPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// Lets every binary take the policy as a clap argument (`#[arg(long, value_enum)]`), with the
/// values and their meaning listed in `--help`.
impl clap::ValueEnum for LostTickPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &LostTickPolicy::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let help = match self {
            LostTickPolicy::Delay => {
                "re-inject timer ticks a descheduled vCPU missed (QEMU's default)"
            }
            LostTickPolicy::Discard => "drop the missed ticks",
        };
        Some(clap::builder::PossibleValue::new(self.as_str()).help(help))
    }

    fn from_str(input: &str, _ignore_case: bool) -> Result<Self, String> {
        input.parse().map_err(|e: UnknownPolicy| e.to_string())
    }
}

/// The `-global` option value that sets `policy`, e.g. `kvm-pit.lost_tick_policy=delay`.
pub fn qemu_global(policy: LostTickPolicy) -> String {
    format!("{QEMU_DEVICE}.{QEMU_PROPERTY}={policy}")
}

/// The QEMU command-line arguments that set `policy`, ready to append to an argv:
/// `["-global", "kvm-pit.lost_tick_policy=<policy>"]`.
pub fn qemu_args(policy: LostTickPolicy) -> [String; 2] {
    ["-global".to_owned(), qemu_global(policy)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_spellings_and_rejects_others() {
        assert_eq!("delay".parse(), Ok(LostTickPolicy::Delay));
        assert_eq!("discard".parse(), Ok(LostTickPolicy::Discard));
        assert!("Discard".parse::<LostTickPolicy>().is_err());
        // QEMU's generic LostTickPolicy also has "slew", which kvm-pit refuses.
        assert!("slew".parse::<LostTickPolicy>().is_err());
        assert!("".parse::<LostTickPolicy>().is_err());
    }

    #[test]
    fn clap_takes_the_same_spellings() {
        use clap::ValueEnum;
        for p in LostTickPolicy::ALL {
            assert_eq!(
                <LostTickPolicy as ValueEnum>::from_str(p.as_str(), false),
                Ok(p)
            );
        }
        assert!(<LostTickPolicy as ValueEnum>::from_str("slew", false).is_err());
        assert!(<LostTickPolicy as ValueEnum>::from_str("DELAY", true).is_err());
    }

    #[test]
    fn renders_global_option() {
        assert_eq!(
            qemu_args(LostTickPolicy::Delay),
            ["-global", "kvm-pit.lost_tick_policy=delay"]
        );
        for p in LostTickPolicy::ALL {
            assert_eq!(p.to_string().parse(), Ok(p));
            assert_eq!(LostTickPolicy::from_reinject(p.reinject()), p);
        }
    }
}
