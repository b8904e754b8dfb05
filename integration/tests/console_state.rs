//! vhost-user-console's `--state-dir` against what the file system and the operator do to it:
//! a file system that is full, a restart with another `--buffer-size`, a state directory that
//! is not private.
//!
//! The backend is the real process; in stream mode the test plays QEMU on the `--vm` socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use devshare_integration::console_backend::{spawn, Console, WAIT};
use devshare_integration::qemu::ScratchDir;

/// A tmpfs of `size` mounted at a directory; unmounted when dropped.
struct SmallFs {
    at: PathBuf,
}

impl SmallFs {
    fn mount(at: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs at {}", at.display());
        SmallFs {
            at: at.to_path_buf(),
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Plays QEMU on the stream socket at `path`: sends `lines` numbered lines, as the repro of
/// the full file system does. Stops quietly when the backend goes away.
fn play_qemu(path: &Path, lines: usize) {
    let Ok(mut s) = UnixStream::connect(path) else {
        return;
    };
    for i in 0..lines {
        if s.write_all(format!("{i:07}\n").as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn a_full_state_dir_file_system_refuses_the_start_with_a_clear_error_and_never_kills_the_process() {
    let scratch = ScratchDir::new("con-state-full").unwrap();
    let d = scratch.path();
    let fs = SmallFs::mount(&d.join("mnt"), "256k");
    let sd = fs.at.join("sd");
    std::fs::create_dir(&sd).unwrap();
    std::fs::set_permissions(&sd, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let args = [
        "--vm",
        "{dir}/fu.sock",
        "-p",
        "fu/serial=unix:{dir}/fud.sock",
        "--state-dir",
    ];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args[1] = "fu={dir}/fu.sock,stream".into();
    args.push(sd.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Twice: the second run meets the file the first one left.
    for run in 0..2 {
        let mut p = spawn(&scratch, &args, &format!("full{run}.log"));
        let sock = d.join("fu.sock");
        // Before the fix the process started with a sparse spool file and, once QEMU's output
        // reached the pages the file system cannot back, died of SIGBUS (a store into them)
        // or dropped QEMU with EFAULT (a read(2) into them), forever; it must instead refuse
        // to start.
        // (Waits for the path only: a connect probe would be a QEMU of its own.)
        let deadline = std::time::Instant::now() + WAIT;
        while p.is_running() && !sock.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if sock.exists() {
            play_qemu(&sock, 200_000);
        }
        let status = p
            .wait_exit(WAIT)
            .unwrap_or_else(|e| panic!("run {run}: expected a refusal to start: {e}"));
        assert!(
            status.code().is_some_and(|c| c != 0),
            "run {run}: {status}, expected a refusal (an exit code, not a signal); log:\n{}",
            p.log()
        );
        let log = p.log();
        assert!(
            log.contains("no room") && log.contains("fu.serial.spool"),
            "run {run}: the error names the file and the cause; log:\n{log}"
        );
    }
    // A buffer that fits is served, and its file has its blocks (a store never meets a full
    // file system): the spool file takes room on the tmpfs at once.
    let mut fitting = args.clone();
    fitting.extend(["--buffer-size", "64K"]);
    let c = Console::start_in(scratch, &fitting, &["fu.sock", "fud.sock"]);
    let spool = sd.join("fu.serial.spool");
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&spool).unwrap());
    assert!(
        blocks * 512 >= 64 * 1024,
        "the spool file is allocated, not sparse ({blocks} blocks)"
    );
    let mut client = UnixStream::connect(c.path("fud.sock")).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let qemu = c.path("fu.sock");
    let writer = std::thread::spawn(move || play_qemu(&qemu, 20_000));
    let mut first = [0u8; 8];
    client.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"0000000\n");
    drop(client);
    let _ = writer.join();
    // Unmounted (lazily) first, so that the scratch directory goes with the backend.
    drop(fs);
    drop(c);
}

/// Starts a stream VM `r` whose port `serial` has a Unix endpoint, its buffer `size` kept in
/// `DIR/state`.
fn start_sized(dir: ScratchDir, size: &str) -> Console {
    Console::start_in(
        dir,
        &[
            "--vm",
            "r={dir}/r.sock,stream",
            "-p",
            "r/serial=unix:{dir}/rd.sock",
            "--state-dir",
            "{dir}/state",
            "--buffer-size",
            size,
        ],
        &["r.sock", "rd.sock"],
    )
}

/// Kills the backend (a crash: nothing is flushed on the way out) and returns its directory.
fn crash(c: Console) -> ScratchDir {
    let Console { dir, mut process } = c;
    process.kill();
    dir
}

#[test]
fn a_new_buffer_size_carries_over_what_an_earlier_run_kept_and_counts_what_does_not_fit() {
    let data = devshare_integration::testdata::pattern(40_000, 7);
    let c = start_sized(ScratchDir::new("con-state-resize").unwrap(), "64K");
    let mut qemu = UnixStream::connect(c.path("r.sock")).unwrap();
    qemu.write_all(&data).unwrap();
    c.wait_stat("r", "serial", "buffered_bytes", 40_000);
    drop(qemu);
    // Larger: everything is kept.
    let c = start_sized(crash(c), "128K");
    assert_eq!(
        c.stat("r", "serial", "buffered_bytes"),
        40_000,
        "{}",
        c.process.log()
    );
    assert_eq!(c.stat("r", "serial", "dropped_bytes"), 0);
    // Smaller: the newest 16 KiB are kept, the rest is counted as dropped and warned about.
    let c = start_sized(crash(c), "16K");
    assert_eq!(
        c.stat("r", "serial", "buffered_bytes"),
        16_384,
        "{}",
        c.process.log()
    );
    assert_eq!(c.stat("r", "serial", "dropped_bytes"), 40_000 - 16_384);
    let log = c.process.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("buffer size changed")
            && l.contains("23616")),
        "{log}"
    );
    let mut client = UnixStream::connect(c.path("rd.sock")).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = vec![0u8; 16_384];
    client.read_exact(&mut got).unwrap();
    assert!(got == data[40_000 - 16_384..], "the newest bytes, in order");
}

#[test]
fn kernel_files_as_logs_and_the_root_directory_as_state_dir_are_refused() {
    let dir = ScratchDir::new("con-state-kernel").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["-p", "k/serial=file:/proc/self/status"],
            "kernel file system",
        ),
        (
            &["-p", "k/serial=file:/sys/kernel/uevent_helper"],
            "kernel file system",
        ),
        (
            &["-p", "k/serial=pty", "--state-dir", "/"],
            "root directory",
        ),
    ];
    for (extra, why) in cases {
        let mut args = vec!["--vm", "k={dir}/k.sock,stream"];
        args.extend_from_slice(extra);
        let mut p = spawn(&dir, &args, "kernel.log");
        let status = p
            .wait_exit(WAIT)
            .unwrap_or_else(|e| panic!("{extra:?} accepted: {e}"));
        assert!(!status.success(), "{extra:?}; log:\n{}", p.log());
        assert!(p.log().contains(why), "{extra:?}; log:\n{}", p.log());
    }
    assert!(std::fs::symlink_metadata("/k.serial.spool").is_err());
}
