//! What the binaries print on stdout for a user or a script (`--print-qemu-args`, `stats`,
//! reports): written through one lock, with a reader that went away treated as the end of the
//! job rather than a failure.
//!
//! A Rust program ignores SIGPIPE, so `println!` into a closed pipe (`... | head -4`) panics
//! ("failed printing to stdout") and exits with status 101. A filter whose reader is gone has
//! nothing left to do: [`print()`] reports that as success, and the caller finishes normally.

use std::io::{self, Write};

/// Writes `text` to stdout under one lock and flushes it.
///
/// # Errors
/// Any write error except a closed pipe (`EPIPE`), which is success: the reader took what it
/// wanted. A full disk or a bad descriptor is an error the caller reports.
pub fn print(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// `text` with every control character (escape sequences, carriage returns, newlines, DEL,
/// C1 controls) written as a Rust escape (`\u{1b}`, `\r`, `\n`), so that text from another
/// process or from the system (a command line, a process name, a socket's reply, a name in
/// an error) cannot drive the operator's terminal or forge lines. Other characters, quotes
/// and backslashes included, are kept as they are.
pub fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_text;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape_text("qemu-system-\u{1b}[2J\r\nroot\u{7f}\u{9b}"),
            "qemu-system-\\u{1b}[2J\\r\\nroot\\u{7f}\\u{9b}"
        );
        assert_eq!(escape_text("vm \"a\\b\" é"), "vm \"a\\b\" é");
    }
}
