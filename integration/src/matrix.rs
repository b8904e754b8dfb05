//! The QEMU version matrix: the QEMU versions the README's compatibility table names, where
//! `scripts/setup.sh` put each of them, and what a test does on a version that is not there.
//!
//! `setup.sh` provides each version named in `DEVSHARE_QEMU_VERSIONS` in its own root file
//! system and writes its launcher into the env file as `DEVSHARE_QEMU_<MAJOR>_<MINOR>` (e.g.
//! `DEVSHARE_QEMU_7_2`); without that key, the default QEMU (`DEVSHARE_QEMU`) stands in when it
//! is that version. A matrix test on a version that is not set up fails when
//! `DEVSHARE_QEMU_VERSIONS` names that version (setup was asked for it: `scripts/test.sh` sets
//! it under CI), and otherwise prints `SKIPPED <test>: ...` and passes, the way the KVM tests
//! treat `DEVSHARE_REQUIRE_KVM`.
//!
//! [`qemu_matrix!`](crate::qemu_matrix) turns a test function taking a [`MatrixQemu`] into one
//! test per version, named `qemu_7_2::<test>` and so on, so a failure says which QEMU failed.

use std::io::Write;
use std::path::{Path, PathBuf};

use devshare_common::qemu::QemuVersion;

use crate::qemu::{QemuError, TestBed};

/// The versions of the README's compatibility table, oldest first.
pub const VERSIONS: [&str; 3] = ["7.2", "10.0", "11.1"];

/// One QEMU of the matrix, found and checked.
#[derive(Debug, Clone)]
pub struct MatrixQemu {
    /// The version as the matrix names it (`7.2`).
    pub name: &'static str,
    /// The launcher `setup.sh` wrote for it.
    pub path: PathBuf,
    /// What the binary itself reports (`7.2.22`).
    pub version: QemuVersion,
}

impl MatrixQemu {
    /// The test bed (guest kernel and initramfs) with this QEMU.
    pub fn bed(&self) -> TestBed {
        match TestBed::locate() {
            Ok(bed) => bed.with_qemu(self.path.clone()),
            Err(e) => panic!("QEMU {}: {e}", self.name),
        }
    }

    /// The arguments that make a backend's `--print-qemu-args` spell its options for this
    /// QEMU: `--qemu PATH`, so the backend asks the binary itself.
    pub fn print_args(&self) -> Vec<String> {
        vec!["--qemu".into(), self.path.display().to_string()]
    }

    /// The launcher's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The env-file key of a version: `DEVSHARE_QEMU_7_2` for `7.2`.
pub fn env_key(version: &str) -> String {
    format!("DEVSHARE_QEMU_{}", version.replace('.', "_"))
}

/// Whether `DEVSHARE_QEMU_VERSIONS` (comma- or space-separated) names `version`.
pub fn required(version: &str) -> bool {
    std::env::var("DEVSHARE_QEMU_VERSIONS")
        .is_ok_and(|list| list.split([',', ' ']).map(str::trim).any(|v| v == version))
}

/// QEMU `version` (one of [`VERSIONS`]) for test `test`, checked to report that version.
/// Returns `None` after printing `SKIPPED <test>: ...` when it is not set up and not
/// [`required`]; panics when it is required but missing, or reports another version.
pub fn qemu_or_skip(version: &'static str, test: &str) -> Option<MatrixQemu> {
    let key = env_key(version);
    let missing = |why: String| -> Option<MatrixQemu> {
        if required(version) {
            panic!(
                "{test}: DEVSHARE_QEMU_VERSIONS names QEMU {version} but {why}: run \
                 DEVSHARE_QEMU_VERSIONS={version} scripts/setup.sh"
            );
        }
        // Straight to fd 2: the test harness captures eprintln! of passing tests, and a skip
        // must be visible.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: QEMU {version} is not set up ({why}; \
             DEVSHARE_QEMU_VERSIONS={version} scripts/setup.sh provides it)"
        );
        None
    };
    let wanted: QemuVersion = version.parse().unwrap_or_else(|e| panic!("{test}: {e}"));
    let path = match TestBed::setting(&key) {
        Ok(Some(path)) => PathBuf::from(path),
        // The default QEMU may be this version (setup.sh's 11.1, or the host's).
        Ok(None) => match default_qemu_if(wanted) {
            Some(path) => path,
            None => return missing(format!("{key} is not set")),
        },
        Err(e @ QemuError::File { .. }) => return missing(e.to_string()),
        Err(e) => panic!("{test}: {e}"),
    };
    if !path.exists() {
        return missing(format!("{key}={} does not exist", path.display()));
    }
    let reported = QemuVersion::of_binary(&path).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(
        reported.major == wanted.major && reported.minor == wanted.minor,
        "{test}: {key}={} reports QEMU {reported}, not {version}",
        path.display()
    );
    Some(MatrixQemu {
        name: version,
        path,
        version: reported,
    })
}

/// The default QEMU (`DEVSHARE_QEMU`) when it reports `wanted`'s major.minor.
fn default_qemu_if(wanted: QemuVersion) -> Option<PathBuf> {
    let path = PathBuf::from(TestBed::setting("DEVSHARE_QEMU").ok()??);
    let v = QemuVersion::of_binary(&path).ok()?;
    (v.major == wanted.major && v.minor == wanted.minor).then_some(path)
}

/// One `#[test]` per QEMU version and test function: for each `module ("X.Y"): [tests]`
/// entry, `module::test` runs `test(&MatrixQemu)` (a function of the calling test crate)
/// with QEMU X.Y, or skips/fails as [`qemu_or_skip`] says.
///
/// ```ignore
/// devshare_integration::qemu_matrix! {
///     qemu_7_2("7.2"): [stream_mode_serial_port_carries_both_ways];
///     qemu_11_1("11.1"): [stream_mode_serial_port_carries_both_ways];
/// }
/// ```
#[macro_export]
macro_rules! qemu_matrix {
    ($($module:ident ($version:literal): [$($test:ident),* $(,)?]);* $(;)?) => {
        $(
            mod $module {
                $(
                    #[test]
                    fn $test() {
                        let name = concat!(stringify!($module), "::", stringify!($test));
                        if let Some(qemu) = $crate::matrix::qemu_or_skip($version, name) {
                            super::$test(&qemu);
                        }
                    }
                )*
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_major_and_minor() {
        assert_eq!(env_key("7.2"), "DEVSHARE_QEMU_7_2");
        assert_eq!(env_key("10.0"), "DEVSHARE_QEMU_10_0");
        for v in VERSIONS {
            assert!(v.parse::<QemuVersion>().is_ok(), "{v}");
        }
    }
}
