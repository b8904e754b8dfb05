//! Backend processes started by tests: spawned from the workspace binaries, their log kept
//! for failure messages, killed and reaped on drop.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::workspace::binary;

/// A running backend (e.g. `vhost-user-console`).
pub struct BackendProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl BackendProcess {
    /// Starts workspace binary `name` with `args`; its stderr goes to `log`.
    pub fn spawn<I, S>(name: &str, args: I, log: &Path) -> io::Result<BackendProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        BackendProcess::spawn_with_env(name, args, &[], log)
    }

    /// As [`spawn`](Self::spawn), with `env` added to the child's environment only (tests
    /// run in parallel threads of one process: its own environment is shared).
    pub fn spawn_with_env<I, S>(
        name: &str,
        args: I,
        env: &[(&str, &str)],
        log: &Path,
    ) -> io::Result<BackendProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let bin = binary(name).map_err(io::Error::other)?;
        let err = File::options().create(true).append(true).open(log)?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env(
                "RUST_LOG",
                // Clients' and QEMU's comings and goings are logged at a bounded rate at info
                // level and every one at debug level: tests read them as readiness signals.
                std::env::var("RUST_LOG").unwrap_or_else(|_| {
                    "info,vhost_user_console::endpoint=debug,vhost_user_console::stream=debug"
                        .into()
                }),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(err.try_clone()?)
            .stderr(err);
        // SAFETY: runs between fork and exec and only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // The backend must not outlive a test process that dies without cleanup.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok(BackendProcess {
            name: name.to_string(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The backend's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Waits until the Unix socket at `path` accepts connections (the backend is up), or
    /// fails with the backend's log when it exits or `timeout` passes.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if path.exists() && UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    return Err(io::Error::other(format!(
                        "{} exited ({status}) before {} appeared; log:\n{}",
                        self.name,
                        path.display(),
                        self.log()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} did not open {} within {timeout:?}; log:\n{}",
                    self.name,
                    path.display(),
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a file (socket, PTY link) to exist.
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} did not create {}; log:\n{}",
                    self.name,
                    path.display(),
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other(format!("{} is not running", self.name)))?;
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet (`child` is Some).
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the process to exit (its exit is the readiness signal) and reaps it; fails
    /// with the log when it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Err(io::Error::other(format!(
                "{} was reaped already",
                self.name
            )));
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} still running after {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL (a crash, as far as the guest can tell) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
