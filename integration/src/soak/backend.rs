//! The backend under test: started from the workspace's binaries, killed with SIGKILL (a
//! crash, as far as its front-ends and clients can tell) and started again with the same
//! command line. Its log accumulates in one file across all runs.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::usage::Usage;
use crate::process::BackendProcess;

/// A backend process that can be crashed and started again.
pub struct Backend {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    process: BackendProcess,
    started: Instant,
}

impl Backend {
    /// Starts workspace binary `name` with `args`, logging (stdout and stderr) to `log`.
    ///
    /// # Errors
    /// The binary is not built or cannot be started.
    pub fn start(name: &str, args: Vec<String>, log: &Path) -> io::Result<Backend> {
        let process = BackendProcess::spawn(name, &args, log)?;
        Ok(Backend {
            name: name.to_string(),
            args,
            log: log.to_owned(),
            process,
            started: Instant::now(),
        })
    }

    /// Process id of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// When the running process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether it is still running (a backend that exits by itself is a finding).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the same command line again (after [`kill`](Self::kill)).
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn start_again(&mut self) -> io::Result<()> {
        self.process.kill();
        self.process = BackendProcess::spawn(&self.name, &self.args, &self.log)?;
        self.started = Instant::now();
        Ok(())
    }

    /// Descriptors, memory and threads of the running process.
    ///
    /// # Errors
    /// It is not running.
    pub fn usage(&self) -> io::Result<Usage> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other(format!("{} is not running", self.name)))?;
        Usage::of(pid)
    }

    /// The last `n` lines of the log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.process.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The JSON document served on a stats socket, or None while nothing answers there.
pub fn stats(path: &Path) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}
