//! What both soak drivers' mains share: the bounds and the results file they take on the
//! command line, the watch on the backend's descriptors, the scratch directory with the
//! verdict, and the exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::series::UsageSeries;
use super::usage::{fd_growth, fd_targets};

/// Command-line options of every driver: how far the processes may grow over the soak, and
/// where the results go (flattened into each driver's `Args`).
#[derive(clap::Args, Debug, Clone)]
pub struct Bounds {
    /// Bound: descriptors may exceed the first sample by this many.
    #[arg(long, default_value_t = 2)]
    pub fd_slack: u64,
    /// Bound: resident memory may exceed the first sample by this many KiB.
    #[arg(long, default_value_t = 12288)]
    pub rss_slack_kib: u64,
    /// Bound: threads may exceed the first sample by this many.
    #[arg(long, default_value_t = 0)]
    pub thread_slack: u64,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl Bounds {
    /// What each of `series` broke of the bounds, one problem a line.
    pub fn check(&self, series: &[&UsageSeries]) -> Vec<String> {
        series
            .iter()
            .flat_map(|s| s.check_flat(self.fd_slack, self.rss_slack_kib, self.thread_slack))
            .collect()
    }

    /// Prints the summary of each of `series`, then the bounds.
    pub fn print(&self, series: &[&UsageSeries]) {
        for s in series {
            println!("{}", s.summary());
        }
        println!(
            "bounds: fds first + {}, RSS first + {} KiB, threads first + {}",
            self.fd_slack, self.rss_slack_kib, self.thread_slack
        );
    }

    /// Writes `doc` into the `--json` file, if one was named.
    pub fn write_json(&self, doc: &serde_json::Value) -> Result<(), String> {
        let Some(path) = &self.json else {
            return Ok(());
        };
        std::fs::write(path, serde_json::to_string_pretty(doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Remembers the backend's descriptors at the first sample, to tell what a growth is made of.
#[derive(Default)]
pub struct FdWatch {
    first: Option<(u64, Vec<String>)>,
    reported: bool,
}

impl FdWatch {
    /// Notes a sample of process `pid` with `fds` descriptors; the first time the count
    /// exceeds the first sample's by more than `slack`, says what the new descriptors are.
    pub fn sample(&mut self, pid: Option<u32>, fds: u64, slack: u64) -> Option<String> {
        let pid = pid?;
        let Some((n0, list0)) = &self.first else {
            self.first = Some((fds, fd_targets(pid).ok()?));
            return None;
        };
        if self.reported || fds <= n0 + slack {
            return None;
        }
        self.reported = true;
        let now = fd_targets(pid).ok()?;
        Some(format!(
            "descriptors {n0} -> {fds}: {}",
            fd_growth(list0, &now)
        ))
    }
}

/// A driver's scratch directory (sockets, logs): the one given, or a new one of its own
/// under the temporary directory, removed after a run that passed.
pub struct Scratch {
    path: PathBuf,
    own: bool,
}

impl Scratch {
    /// `given`, or `devshare-soak-NAME.PID` in the temporary directory; created if missing.
    pub fn new(given: Option<&Path>, name: &str) -> Result<Scratch, String> {
        let scratch = match given {
            Some(p) => Scratch {
                path: p.to_owned(),
                own: false,
            },
            None => Scratch {
                path: std::env::temp_dir()
                    .join(format!("devshare-soak-{name}.{}", std::process::id())),
                own: true,
            },
        };
        std::fs::create_dir_all(&scratch.path)
            .map_err(|e| format!("{}: {e}", scratch.path.display()))?;
        Ok(scratch)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run's verdict: with `problems`, an error listing them (the directory is kept to
    /// look into); without, a directory of its own is removed.
    pub fn verdict(self, problems: &[String]) -> Result<(), String> {
        if !problems.is_empty() {
            return Err(format!(
                "{} problem(s):\n  {}\n(scratch directory kept: {})",
                problems.len(),
                problems.join("\n  "),
                self.path.display()
            ));
        }
        if self.own {
            let _ = std::fs::remove_dir_all(&self.path);
        }
        Ok(())
    }
}

/// A driver's `main`: sets up logging, runs `soak`, prints `NAME soak: PASSED` or
/// `NAME soak: FAILED: why` and returns the exit status.
pub fn main(name: &str, soak: impl FnOnce() -> Result<(), String>) -> ExitCode {
    env_logger::init();
    match soak() {
        Ok(()) => {
            println!("{name} soak: PASSED");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name} soak: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
