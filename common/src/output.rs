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
