//! Small pieces several end-to-end tests share: deterministic test data and the QEMU options a
//! backend prints with `--print-qemu-args`.

use std::process::Command;

use crate::workspace::binary;

/// `len` bytes of deterministic, incompressible-looking data (xorshift), different per `seed`.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Runs workspace binary `bin` with `args` and `--print-qemu-args`, and returns the QEMU
/// arguments of the section whose `# ` header satisfies `section` (the header without `# `),
/// minus the memory options (the QEMU runner sets those itself). Each printed line is
/// `-option value`, possibly ending with a shell line continuation.
///
/// Panics with the backend's output when it fails or prints no such section: this is test
/// set-up, and the message is what a failing test should show.
pub fn printed_qemu_args(
    bin: &str,
    args: &[String],
    section: impl Fn(&str) -> bool,
) -> Vec<String> {
    let path = binary(bin).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(path)
        .args(args)
        .arg("--print-qemu-args")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} --print-qemu-args failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut selected = false;
    let mut qemu = Vec::new();
    for line in text.lines() {
        if let Some(header) = line.strip_prefix("# ") {
            selected = section(header);
            continue;
        }
        let line = line.trim().trim_end_matches('\\').trim();
        if !selected
            || line.is_empty()
            || line.contains("memory-backend")
            || line.starts_with("-machine")
        {
            continue;
        }
        match line.split_once(' ') {
            Some((opt, val)) => {
                qemu.push(opt.to_string());
                qemu.push(val.trim().to_string());
            }
            None => qemu.push(line.to_string()),
        }
    }
    assert!(!qemu.is_empty(), "no QEMU options selected from:\n{text}");
    qemu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seeded() {
        assert_eq!(pattern(64, 1), pattern(64, 1));
        assert_ne!(pattern(64, 1), pattern(64, 2));
        assert_ne!(pattern(64, 0), vec![0u8; 64]);
    }
}
