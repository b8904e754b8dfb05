//! Finds the workspace's built binaries (the backends) from an integration test.
//!
//! A test executable lives in `<target>/<profile>/deps/`; the binaries it drives are built into
//! `<target>/<profile>/`. `scripts/test.sh` builds them (`cargo build --workspace --bins`) before
//! `cargo test`, because cargo only builds the binaries of the package under test.

use std::path::{Path, PathBuf};

/// Errors finding a binary. `Debug` prints the `Display` text, for readable `unwrap()`s.
#[derive(thiserror::Error)]
pub enum BinaryError {
    /// The binary is not in any of the places looked at.
    #[error("binary {name} not found (looked in {searched}): build it with `cargo build --workspace --bins`")]
    NotFound {
        /// The binary's name.
        name: String,
        /// The directories searched, comma separated.
        searched: String,
    },
}

impl std::fmt::Debug for BinaryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The path of the workspace binary `name` (e.g. `vhost-user-console`), built in the same
/// profile as the running test. `DEVSHARE_BIN_DIR` overrides where to look.
pub fn binary(name: &str) -> Result<PathBuf, BinaryError> {
    let dirs = candidate_dirs();
    dirs.iter()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| BinaryError::NotFound {
            name: name.to_string(),
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn candidate_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("DEVSHARE_BIN_DIR").filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let mut profile = "debug".to_string();
    if let Some(dir) = exe_dir {
        // Test executables sit in <target>/<profile>/deps; binaries one level up.
        let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
            dir.parent().map(Path::to_path_buf)
        } else {
            Some(dir)
        };
        if let Some(profile_dir) = profile_dir {
            if let Some(name) = profile_dir.file_name() {
                profile = name.to_string_lossy().into_owned();
            }
            dirs.push(profile_dir);
        }
    }
    // When the test executable was moved elsewhere: the target dir cargo would use.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let fallback = target.join(profile);
    if !dirs.contains(&fallback) {
        dirs.push(fallback);
    }
    dirs
}
