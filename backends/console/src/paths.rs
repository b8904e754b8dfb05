//! Every path the process will create, checked to be distinct before anything is created.
//!
//! Two uses of one path (a PTY link at a VM's own socket, an endpoint socket at the stats
//! socket, two `file:` ports on one log, a log at another's rotated name `LOG.N`) would make
//! the second creation fail with a misleading error ("is served by another running process"),
//! leave a symlink behind that breaks every later start, or make two logs write into each
//! other's files. Paths are compared as absolute paths with `.` and `..` taken out and the
//! symlinks of an existing parent directory resolved, so `f.log`, `./f.log` and `DIR/f.log`
//! are one path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use devshare_common::files::normalize;

use crate::config::{Config, SocketMode, Target};
use crate::endpoint::EndpointSpec;

/// Why the paths of a configuration cannot all be created.
#[derive(Debug, thiserror::Error)]
#[error("{path} is used twice: as {first} and as {second}; give each its own path")]
pub struct PathClash {
    /// The path, normalized.
    pub path: PathBuf,
    /// Its first use.
    pub first: String,
    /// Its second use.
    pub second: String,
}

/// Checks that every path `cfg` (and the stats socket, if any) will create is distinct: the
/// stats socket, the `--vm` sockets, `unix:` endpoint sockets, PTY links, `file:` logs with
/// their rotated names, and the buffer files in the state directory with the names they are
/// resized through (`NAME.spool.resize`).
pub fn check_distinct(cfg: &Config, stats_socket: Option<&Path>) -> Result<(), PathClash> {
    let mut seen: HashMap<PathBuf, String> = HashMap::new();
    let mut claim = |path: &Path, what: String| match seen.entry(normalize(path)) {
        std::collections::hash_map::Entry::Occupied(e) => Err(PathClash {
            path: e.key().clone(),
            first: e.get().clone(),
            second: what,
        }),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(what);
            Ok(())
        }
    };
    if let Some(p) = stats_socket {
        claim(p, "the stats socket (--stats-socket)".into())?;
    }
    for vm in &cfg.vms {
        let dials = if vm.mode == SocketMode::Connect {
            ", which it dials"
        } else {
            ""
        };
        claim(&vm.socket, format!("VM '{}''s socket{dials}", vm.name))?;
    }
    for vm in &cfg.vms {
        for p in &vm.ports {
            let port = format!("{}/{}", vm.name, p.name);
            if let Some(dir) = &cfg.state_dir {
                let spool = dir.join(format!("{}.{}.spool", vm.name, p.name));
                claim(&spool, format!("{port}'s buffer file"))?;
                // Where a new --buffer-size rebuilds it (spool::file).
                let mut resize = spool.into_os_string();
                resize.push(".resize");
                claim(
                    Path::new(&resize),
                    format!(
                        "{port}'s buffer file resized ({})",
                        Path::new(&resize).display()
                    ),
                )?;
            }
            let Target::Endpoint(spec) = &p.target else {
                continue;
            };
            match spec {
                EndpointSpec::Unix { path, .. } => claim(path, format!("{port}'s unix: socket"))?,
                EndpointSpec::Pty { link: Some(link) } => {
                    claim(link, format!("{port}'s pty: link"))?
                }
                EndpointSpec::File { path, limits, .. } => {
                    claim(path, format!("{port}'s file: log"))?;
                    if limits.max_size > 0 {
                        for n in 1..=limits.keep {
                            let mut rotated = path.as_os_str().to_owned();
                            rotated.push(format!(".{n}"));
                            claim(
                                Path::new(&rotated),
                                format!("{port}'s file: log rotated ({}.{n})", path.display()),
                            )?;
                        }
                    }
                }
                EndpointSpec::Pty { link: None }
                | EndpointSpec::Tcp(_)
                | EndpointSpec::Serial(_) => {}
            }
        }
    }
    Ok(())
}
