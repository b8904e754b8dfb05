//! What a process holds, read from `/proc`: the numbers a leak makes grow.

use std::io;

/// Open descriptors, resident memory and threads of one process at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Entries in `/proc/PID/fd`.
    pub fds: u64,
    /// `VmRSS` of `/proc/PID/status`, in KiB (shared memory it touched included: guest RAM
    /// and spool files count once their pages are mapped and used).
    pub rss_kib: u64,
    /// `Threads` of `/proc/PID/status`.
    pub threads: u64,
}

impl Usage {
    /// The usage of process `pid`.
    ///
    /// # Errors
    /// The process is gone or `/proc` cannot be read.
    pub fn of(pid: u32) -> io::Result<Usage> {
        Self::read(&format!("/proc/{pid}"))
    }

    /// The usage of this process.
    ///
    /// # Errors
    /// `/proc/self` cannot be read.
    pub fn own() -> io::Result<Usage> {
        Self::read("/proc/self")
    }

    fn read(dir: &str) -> io::Result<Usage> {
        let fds = std::fs::read_dir(format!("{dir}/fd"))?.count() as u64;
        let status = std::fs::read_to_string(format!("{dir}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Usage {
            fds,
            rss_kib: field("VmRSS:"),
            threads: field("Threads:"),
        })
    }
}

/// What each open descriptor of `pid` refers to (`socket:[123]`, `anon_inode:[eventfd]`,
/// a path...), sorted: to show what a growing descriptor count is made of.
///
/// # Errors
/// The process is gone.
pub fn fd_targets(pid: u32) -> io::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let target = std::fs::read_link(e.path())
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        v.push(target);
    }
    v.sort();
    Ok(v)
}

/// The kinds of descriptor in `targets` with how many of each (`socket` x 12, ...): sockets
/// and pipes lose their inode numbers, so two processes can be compared.
pub fn fd_kinds(targets: &[String]) -> Vec<(String, usize)> {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for t in targets {
        let kind = match t.split_once(":[") {
            Some((k, _)) if k == "socket" || k == "pipe" => k.to_string(),
            _ => t.clone(),
        };
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds
}

/// How `after` differs from `before` by kind, e.g. "socket +12, anon_inode:\[eventfd\] +3".
pub fn fd_growth(before: &[String], after: &[String]) -> String {
    let (b, a) = (fd_kinds(before), fd_kinds(after));
    let mut out = Vec::new();
    for (kind, n) in &a {
        let was = b.iter().find(|(k, _)| k == kind).map_or(0, |(_, n)| *n);
        if *n != was {
            out.push(format!("{kind} {:+}", *n as i64 - was as i64));
        }
    }
    for (kind, n) in &b {
        if !a.iter().any(|(k, _)| k == kind) {
            out.push(format!("{kind} -{n}"));
        }
    }
    if out.is_empty() {
        "same kinds and counts".into()
    } else {
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_sees_a_new_descriptor() {
        let before = Usage::own().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let after = Usage::own().unwrap();
        assert_eq!(after.fds, before.fds + 1);
        assert!(after.rss_kib > 0 && after.threads >= 1);
        drop(f);
    }

    #[test]
    fn growth_is_told_by_kind() {
        let before = vec!["socket:[1]".to_string(), "/dev/null".into()];
        let after = vec![
            "socket:[7]".to_string(),
            "socket:[8]".into(),
            "anon_inode:[eventfd]".into(),
        ];
        assert_eq!(
            fd_growth(&before, &after),
            "socket +1, anon_inode:[eventfd] +1, /dev/null -1"
        );
    }
}
