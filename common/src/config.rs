//! Configuration helpers: TOML files with errors that name the file, and human sizes.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this program.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// Reads and parses a TOML configuration file.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Parses a number written in decimal digits only, as users write ports, ids and counts.
///
/// `str::parse` also takes a leading `+` ("+23"), which no one means and which lets two
/// spellings name one value; this refuses it, and refuses empty text, signs, spaces and
/// anything `T` cannot hold.
///
/// Returns `None` for anything but `[0-9]+` that fits in `T`.
pub fn parse_decimal<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses a byte size such as `4096`, `64K`, `64KiB`, `16M` or `1G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError::Invalid(format!("'{s}' is not a size (try 4096, 64K, 16M)")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(ConfigError::Invalid(format!(
                "unknown size unit '{other}' in '{s}' (use K, M or G)"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::Invalid(format!("size '{s}' is too large")))
}

/// Parses a guest RAM size for `--memory` (the syntax of [`parse_size`], e.g. `512M`, `2G`)
/// and returns it in bytes: a whole, non-zero number of MiB, as QEMU's memory backends need.
///
/// # Errors
/// [`ConfigError::Invalid`] for a bad size, zero, or a size that is not a whole number of MiB.
pub fn parse_guest_memory(s: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(s)?;
    if bytes == 0 || bytes % (1 << 20) != 0 {
        return Err(ConfigError::Invalid(format!(
            "guest memory '{s}' must be a whole, non-zero number of MiB (e.g. 512M, 2G)"
        )));
    }
    Ok(bytes)
}

/// Renders a byte count the way QEMU's `size=` options read it: `512M`, `2G`, or plain bytes.
pub fn qemu_size(bytes: u64) -> String {
    if bytes != 0 && bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else if bytes != 0 && bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else {
        bytes.to_string()
    }
}

/// Logs (at warn level) that `old`, an option or key still accepted, has been renamed to `new`.
/// Called while the configuration is read, so the warning appears once, at start.
pub fn warn_deprecated(old: &str, new: &str) {
    log::warn!("{old} is deprecated and will be removed; use {new}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("+5M").is_err());
        assert_eq!(parse_decimal::<u16>("0023"), Some(23));
        for bad in ["", "+23", "-1", " 23", "23 ", "0x17", "65536"] {
            assert_eq!(parse_decimal::<u16>(bad), None, "{bad:?}");
        }
        assert!(parse_size("5 M").is_ok());
    }

    #[test]
    fn guest_memory() {
        assert_eq!(parse_guest_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_guest_memory("1G").unwrap(), 1 << 30);
        assert!(parse_guest_memory("0").is_err());
        assert!(parse_guest_memory("1000K").is_err());
        assert_eq!(qemu_size(512 << 20), "512M");
        assert_eq!(qemu_size(2 << 30), "2G");
        assert_eq!(qemu_size(4096), "4096");
    }
}
