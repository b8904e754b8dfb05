//! `file:` log endpoints with the real backend process: bounded by default and rotated by size
//! as virtlogd does (`PATH`, `PATH.1` ... `PATH.N`, the oldest dropped), created 0600, never
//! written through a planted symlink (at `PATH` or `PATH.N`), rotation never moving anything
//! but our own regular files, and reopened by name on SIGHUP
//! after an external logrotate moved them, without dropping any client or front-end.
//!
//! The guest side is a stream VM whose `-chardev socket` the test plays, so the bytes of a
//! log are exactly what the test wrote.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use devshare_integration::console_backend::{spawn, Console, WAIT};
use devshare_integration::console_guest::{ConsoleGuest, GuestOptions};
use devshare_integration::qemu::ScratchDir;

fn unix_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn read_n(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).unwrap();
    v
}

/// `L<i>` lines, `first..=last`, padded to `width` bytes each (newline included).
fn lines(first: u32, last: u32, width: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in first..=last {
        let mut l = format!("L{i:06}-");
        while l.len() < width - 1 {
            l.push('x');
        }
        l.push('\n');
        out.extend_from_slice(l.as_bytes());
    }
    out
}

fn numbered(path: &Path, i: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{i}"));
    PathBuf::from(p)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The log and its rotated files, oldest first.
fn all_files(path: &Path, keep: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for i in (1..=keep).rev() {
        out.extend(read(&numbered(path, i)));
    }
    out.extend(read(path));
    out
}

/// A stream VM whose serial port logs to `guest.log` in `dir` (at `log`) does not start, and
/// its error names `log` and says `why`.
fn refused_at_start(dir: &ScratchDir, log: &std::path::Path, why: &str) {
    let mut p = spawn(
        dir,
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=file:{dir}/guest.log",
        ],
        "backend.log",
    );
    let status = p.wait_exit(WAIT).unwrap();
    assert!(!status.success());
    let out = p.log();
    assert!(
        out.contains(&log.display().to_string()) && out.contains(why),
        "{out}"
    );
}

#[test]
fn logs_are_bounded_and_rotate_by_size_keeping_n_files() {
    let c = Console::start(
        "log-rotate",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=file:{dir}/guest.log,max-size=4K,keep=2",
            "--vm",
            "d={dir}/d.sock,stream",
            "-p",
            "d/serial=file:{dir}/default.log",
        ],
        &["s.sock", "d.sock"],
    );
    let log = c.path("guest.log");
    // 100-byte lines: 40 fit a 4 KiB file.
    let data = lines(1, 500, 100);
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(&data).unwrap();
    c.wait_stat("s", "serial", "to_host_bytes", data.len() as u64);
    // 500 lines = 50000 bytes: 12 full files of 40 lines and 20 lines in the current one (a
    // line is cut between files only where it arrived in pieces just at a file's end).
    assert!(c.stat("s", "serial", "rotations") >= 12);
    for p in [log.clone(), numbered(&log, 1), numbered(&log, 2)] {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.is_file(), "{}", p.display());
        assert!(m.len() <= 4096, "{} has {} bytes", p.display(), m.len());
        assert_eq!(m.mode() & 0o777, 0o600, "{}", p.display());
    }
    assert!(!numbered(&log, 3).exists(), "more than keep=2 old files");
    // The newest output, in order, nothing lost in between.
    let kept = all_files(&log, 2);
    assert!(kept.len() >= 4000 + 2000, "kept only {} bytes", kept.len());
    assert!(
        data.ends_with(&kept),
        "the rotated files are not the newest output"
    );

    // Bounded without options too: 2 MiB per file, 3 old files.
    let big = lines(1, 30_000, 100); // 3 MB
    let mut qemu = unix_client(&c.path("d.sock"));
    qemu.write_all(&big).unwrap();
    c.wait_stat("d", "serial", "to_host_bytes", big.len() as u64);
    let d = c.path("default.log");
    assert_eq!(c.stat("d", "serial", "rotations"), 1);
    assert!(read(&numbered(&d, 1)).len() <= 2 << 20);
    assert!(read(&d).len() <= 2 << 20);
    assert!(
        all_files(&d, 1) == big,
        "default rotation lost or cut lines"
    );
}

#[test]
fn planted_symlinks_at_the_log_or_its_rotated_names_are_never_written_through() {
    let dir = ScratchDir::new("log-symlinks").unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    let log = dir.path().join("guest.log");
    // Links at every rotated name.
    for i in 1..=2 {
        std::os::unix::fs::symlink(&victim, numbered(&log, i)).unwrap();
    }
    let c = Console::start_in(
        dir,
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=file:{dir}/guest.log,max-size=1K,keep=2",
        ],
        &["s.sock"],
    );
    let data = lines(1, 100, 100);
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(&data).unwrap();
    c.wait_stat("s", "serial", "to_host_bytes", data.len() as u64);
    // Rotation moves only regular files of ours: the links stay where they are, and the log
    // is kept bounded by emptying it instead, counted apart from rotations.
    assert_eq!(c.stat("s", "serial", "rotations"), 0);
    assert!(c.stat("s", "serial", "rotation_failures") >= 3);
    assert!(std::fs::metadata(&log).unwrap().len() <= 1024);
    assert_eq!(
        read(&victim),
        b"precious\n",
        "written through a planted link"
    );
    for p in [numbered(&log, 1), numbered(&log, 2)] {
        assert!(std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    // A link at the log's own name, planted after an external rotation: SIGHUP does not
    // follow it; output waits (the console keeps it) and goes to a real file once the link
    // is gone.
    std::fs::rename(&log, c.path("guest.log.old")).unwrap();
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    c.process.signal(libc::SIGHUP).unwrap();
    c.wait_stat("s", "serial", "attached", 0);
    c.wait_log("is a symlink");
    qemu.write_all(b"while the link is there\n").unwrap();
    c.wait_stat("s", "serial", "buffered_bytes", 24);
    assert_eq!(
        read(&victim),
        b"precious\n",
        "written through a planted link"
    );
    std::fs::remove_file(&log).unwrap();
    c.wait_stat("s", "serial", "attached", 1);
    c.wait_stat("s", "serial", "buffered_bytes", 0);
    assert_eq!(read(&log), b"while the link is there\n");
    assert_eq!(read(&victim), b"precious\n");

    // A link at the log's name at start: refused with the path named, the target untouched.
    let dir = ScratchDir::new("log-symlink-start").unwrap();
    let log = dir.path().join("guest.log");
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    refused_at_start(&dir, &log, "is a symlink");
    assert_eq!(read(&victim), b"precious\n");
}

#[test]
fn sighup_after_logrotate_moves_the_log_reopens_it_and_drops_no_client() {
    let c = Console::start(
        "log-sighup",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=file:{dir}/guest.log,timestamps",
            "--vm",
            "u={dir}/u.sock,stream",
            "-p",
            "u/serial=unix:{dir}/u-client.sock",
            "--vm",
            "v={dir}/v.sock",
            "-p",
            "v/console=unix:{dir}/v-con.sock",
            "-p",
            "v/data=file:{dir}/v-data.log",
        ],
        &["s.sock", "u.sock", "v.sock", "u-client.sock"],
    );
    let log = c.path("guest.log");
    let mut qemu = unix_client(&c.path("s.sock"));
    let mut uqemu = unix_client(&c.path("u.sock"));
    let mut uclient = unix_client(&c.path("u-client.sock"));
    c.wait_stat("u", "serial", "attached", 1);
    let mut g = ConsoleGuest::connect(c.path("v.sock"), GuestOptions::default()).unwrap();
    g.bring_up(2).unwrap();
    let mut vcon = unix_client(&c.path("v-con.sock"));
    c.wait_stat("v", "console", "attached", 1);

    qemu.write_all(b"before rotation\n").unwrap();
    g.send(1, b"data before\n", 1).unwrap();
    c.wait_stat("s", "serial", "to_host_bytes", 16);
    // logrotate without copytruncate: rename, then SIGHUP.
    std::fs::rename(&log, c.path("guest.log.1")).unwrap();
    std::fs::rename(c.path("v-data.log"), c.path("v-data.log.1")).unwrap();
    c.process.signal(libc::SIGHUP).unwrap();
    c.wait_stat("s", "serial", "reopens", 1);
    c.wait_stat("v", "data", "reopens", 1);
    assert_eq!(c.stats()["process"]["signals"]["hup"], 1);

    qemu.write_all(b"after rotation\n").unwrap();
    g.send(1, b"data after\n", 1).unwrap();
    c.wait_stat("s", "serial", "to_host_bytes", 31);
    let strip = |text: Vec<u8>| -> String {
        String::from_utf8(text)
            .unwrap()
            .lines()
            .map(|l| l.split_once("] ").map(|(_, r)| r).unwrap_or(l).to_string() + "\n")
            .collect()
    };
    assert_eq!(strip(read(&c.path("guest.log.1"))), "before rotation\n");
    assert_eq!(strip(read(&log)), "after rotation\n");
    assert_eq!(read(&c.path("v-data.log.1")), b"data before\n");
    c.wait_stat("v", "data", "to_host_bytes", 23);
    assert_eq!(read(&c.path("v-data.log")), b"data after\n");
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Nothing else happened: every client and the front-end are still there and served.
    assert_eq!(c.stat("u", "serial", "attached"), 1);
    uqemu.write_all(b"still here\n").unwrap();
    assert_eq!(read_n(&mut uclient, 11), b"still here\n");
    uclient.write_all(b"me too\n").unwrap();
    assert_eq!(read_n(&mut uqemu, 7), b"me too\n");
    g.send(0, b"console still here\n", 1).unwrap();
    assert_eq!(read_n(&mut vcon, 19), b"console still here\n");
    assert_eq!(c.stat("u", "serial", "reopens"), 0);
    assert!(
        c.log_count("front-end connected") == 1,
        "the front-end reconnected"
    );
}

/// Another user plants a directory at a rotated name in a shared directory before the
/// console starts: rotation moves only regular files of ours, so the directory stays where
/// it is, the log is emptied instead (bounded), and that is counted apart from rotations,
/// with the bytes emptied in `dropped_bytes`, and logged at a bounded rate.
#[test]
fn a_directory_planted_at_a_rotated_name_is_never_moved_and_the_failure_is_counted() {
    let dir = ScratchDir::new("log-planted-dir").unwrap();
    let log = dir.path().join("r.log");
    let planted = numbered(&log, 1);
    std::fs::create_dir(&planted).unwrap();
    std::fs::write(planted.join("theirs"), b"x").unwrap();
    // Owned by another user, as it would be in a world-writable directory.
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let c = Console::start_in(
        dir,
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=file:{dir}/r.log,max-size=100,keep=2",
        ],
        &["s.sock"],
    );
    // 100 lines of 10 bytes: 9 files' worth.
    let data = lines(1, 100, 10);
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(&data).unwrap();
    c.wait_stat("s", "serial", "to_host_bytes", data.len() as u64);
    // The directory was not moved, nor anything in it.
    assert!(std::fs::symlink_metadata(&planted).unwrap().is_dir());
    assert_eq!(std::fs::read(planted.join("theirs")).unwrap(), b"x");
    assert!(std::fs::symlink_metadata(numbered(&log, 2)).is_err());
    let failures = c.stat("s", "serial", "rotation_failures");
    assert!(failures >= 9, "{failures}");
    assert_eq!(c.stat("s", "serial", "rotations"), 0);
    let kept = std::fs::metadata(&log).unwrap().len();
    assert_eq!(
        c.stat("s", "serial", "dropped_bytes") + kept,
        data.len() as u64,
        "every byte is in the log or counted as dropped"
    );
    // Said, at a bounded rate.
    let said = c.log_count("cannot rotate");
    assert!(
        (1..=6).contains(&said),
        "{said} lines for {failures} failures; log:\n{}",
        c.process.log()
    );
    assert!(c
        .process
        .log()
        .contains("is a directory, not a log file of ours"));
}

/// Another user's file at the log's path (planted in a shared directory, or put there after
/// a logrotate) would receive the guest's output and could be read or cut by its owner: it
/// is refused at start with the path and the owner named, and on SIGHUP output waits in the
/// port's buffer until the file is gone. An existing file of ours is made 0600.
#[test]
fn another_users_file_at_the_log_path_is_refused_at_start_and_on_sighup() {
    const NOBODY: u32 = 65534;
    let plant = |path: &Path| {
        std::fs::write(path, b"").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    };

    // At start.
    let dir = ScratchDir::new("log-theirs-start").unwrap();
    let log = dir.path().join("guest.log");
    plant(&log);
    refused_at_start(&dir, &log, "belongs to uid 65534");
    assert_eq!(read(&log), b"");

    // On SIGHUP, after a rotation left the name free for someone else.
    let dir = ScratchDir::new("log-theirs-hup").unwrap();
    let log = dir.path().join("guest.log");
    std::fs::write(&log, b"").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = Console::start_in(
        dir,
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=file:{dir}/guest.log",
        ],
        &["s.sock"],
    );
    assert_eq!(
        std::fs::metadata(&log).unwrap().mode() & 0o7777,
        0o600,
        "an existing log of ours was left readable by others"
    );
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(b"before\n").unwrap();
    c.wait_stat("s", "serial", "to_host_bytes", 7);
    std::fs::rename(&log, c.path("guest.log.1")).unwrap();
    plant(&log);
    c.process.signal(libc::SIGHUP).unwrap();
    c.wait_stat("s", "serial", "attached", 0);
    c.wait_log("belongs to uid 65534");
    qemu.write_all(b"secret\n").unwrap();
    c.wait_stat("s", "serial", "buffered_bytes", 7);
    assert_eq!(
        read(&log),
        b"",
        "guest output went into another user's file"
    );
    std::fs::remove_file(&log).unwrap();
    c.wait_stat("s", "serial", "attached", 1);
    c.wait_stat("s", "serial", "buffered_bytes", 0);
    assert_eq!(read(&log), b"secret\n");
    let ours = std::fs::metadata(c.path("s.sock")).unwrap().uid();
    assert_eq!(std::fs::metadata(&log).unwrap().uid(), ours);
}
