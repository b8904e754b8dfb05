//! A minimal QMP client: enough to hot-plug and unplug devices in a running QEMU from a test
//! (`-qmp unix:PATH,server=on,wait=off` on the QEMU command line).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// Underlying error.
        source: io::Error,
    },
    /// QEMU sent something that is not a QMP message.
    #[error("QMP: unexpected message {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QMP command {command} failed: {error}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error object.
        error: Value,
    },
    /// An awaited event did not come.
    #[error("QMP: no {0} event in time")]
    Timeout(String),
}

/// A QMP session in command mode.
pub struct Qmp {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen while waiting for command replies, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path` (retrying until `timeout`, as QEMU may still be
    /// starting) and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let name = path.display().to_string();
        let io_err = |source| QmpError::Io {
            path: name.clone(),
            source,
        };
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(io_err(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        // Generous: TCG guests on a busy machine answer slowly, but never forever.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let mut qmp = Qmp {
            path: name,
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim().to_string()))
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(|source| QmpError::Io {
            path: self.path.clone(),
            source,
        })?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    error: e.clone(),
                });
            }
            return Err(QmpError::Protocol(v.to_string()));
        }
    }

    /// Waits for an event named `name` whose `data` contains `matching` (same keys and values),
    /// including events that arrived during earlier commands.
    pub fn wait_event(
        &mut self,
        name: &str,
        matching: &Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let fits = |v: &Value| {
            v["event"] == name
                && matching
                    .as_object()
                    .is_none_or(|m| m.iter().all(|(k, want)| &v["data"][k] == want))
        };
        if let Some(i) = self.events.iter().position(fits) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.read() {
                Ok(v) if fits(&v) => return Ok(v),
                Ok(v) => self.events.push(v),
                Err(QmpError::Io { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Err(QmpError::Timeout(name.to_string()))
    }
}
