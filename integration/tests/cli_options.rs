//! Options the two backends share are spelled alike and read alike: `--memory SIZE` with the
//! common size syntax, `--pit-policy` with the one policy parser, and the old spellings still
//! accepted with a deprecation warning.

use std::process::{Command, Output};

use devshare_integration::workspace::binary;

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(binary(bin).unwrap())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

const CONSOLE: &[&str] = &["--socket", "/tmp/cli-opts-a.sock", "-p", "console=pty"];
const NETMUX: &[&str] = &[
    "--uplink",
    "tap:cliopts0",
    "--port",
    "socket=/tmp/cli-opts-g.sock,mac=52:54:00:00:00:01",
];

fn with<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(more).copied().collect()
}

#[test]
fn memory_takes_the_same_size_syntax_in_both_binaries() {
    for (bin, base) in [
        ("vhost-user-console", CONSOLE),
        ("vhost-user-netmux", NETMUX),
    ] {
        let out = run(
            bin,
            &with(base, &["--print-qemu-args", "--memory", "1536MiB"]),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin}: {out:?}");
        assert!(text.contains("size=1536M,share=on"), "{bin}: {text}");
        let out = run(
            bin,
            &with(base, &["--print-qemu-args", "--memory", "1000K"]),
        );
        assert!(
            !out.status.success(),
            "{bin} took a size that is not whole MiB"
        );
    }
}

#[test]
fn netmux_guest_mem_still_works_with_a_deprecation_warning() {
    let out = run(
        "vhost-user-netmux",
        &with(NETMUX, &["--print-qemu-args", "--guest-mem", "256"]),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("size=256M,share=on"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("deprecated") && err.contains("--memory"),
        "{err}"
    );
    let help = run("vhost-user-netmux", &["--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Deprecated: use --memory"));
}

#[test]
fn pit_policy_is_read_the_same_way_everywhere() {
    for (bin, base) in [
        ("vhost-user-console", CONSOLE),
        ("vhost-user-netmux", NETMUX),
    ] {
        let out = run(
            bin,
            &with(base, &["--print-qemu-args", "--pit-policy", "discard"]),
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("kvm-pit.lost_tick_policy=discard"),
            "{bin}: {out:?}"
        );
        let out = run(
            bin,
            &with(base, &["--print-qemu-args", "--pit-policy", "slew"]),
        );
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("[possible values: delay, discard]"),
            "{bin}: {out:?}"
        );
    }
    let out = run("kvm-pit-policy", &["qemu-args", "--policy", "slew"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("[possible values: delay, discard]"));
}
