//! What a careless or hostile local user can give the three binaries on the command line or in
//! a config file: every such input ends in a clear error or a clean exit, never a hang, a
//! panic, or a write through a planted link.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use devshare_integration::workspace::binary;

/// A scratch directory of this test process.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cli-hard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What a finished run left: its status and its output.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Waits for `child` to exit; a child still running after `limit` is killed and the test
/// fails (the limit is a bound on a hang, far above what the run needs).
fn finish(mut child: Child, limit: Duration, what: &str) -> Finished {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {limit:?} (hangs); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn spawn(bin: &str, args: &[&str]) -> Child {
    Command::new(binary(bin).unwrap())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

const BACKENDS: [&str; 2] = ["vhost-user-console", "vhost-user-netmux"];

#[test]
fn config_files_that_never_end_or_never_open_are_refused() {
    let d = scratch("config");
    let fifo = d.join("fifo.toml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = d.join("big.toml");
    // Valid TOML (a comment) of 2 MiB: refused for its size, not its syntax.
    let mut text = String::from("# padding\n");
    while text.len() < 2 << 20 {
        text.push_str("# ................................................................\n");
    }
    std::fs::write(&big, text).unwrap();
    for bin in BACKENDS {
        for path in [
            PathBuf::from("/dev/zero"),
            fifo.clone(),
            big.clone(),
            d.clone(),
        ] {
            let p = path.display().to_string();
            let out = finish(
                spawn(bin, &["--config", &p]),
                Duration::from_secs(60),
                &format!("{bin} --config {p}"),
            );
            assert!(
                !out.status.success() && out.status.code() != Some(101),
                "{bin} {p}: {:?} {}",
                out.status,
                out.stderr
            );
            assert!(out.stderr.contains(&p), "{bin} {p}: {}", out.stderr);
            assert!(
                !out.stderr.contains("panicked"),
                "{bin} {p}: {}",
                out.stderr
            );
            assert!(out.stdout.is_empty(), "{bin} {p}: {}", out.stdout);
        }
    }
}
