//! Everything an operator types: the console's TOML file and its `--vm`, `--port` and endpoint
//! spec strings, netmux's TOML file and its `--port`, `--uplink` and host-port specs, sizes,
//! socket modes and groups, the PIT lost-tick policy, QEMU version strings (as given and as
//! `qemu --version` prints them), and what kvm-pit-policy reads: QEMU command lines (of any
//! process it inspects) and its stall patterns.
//!
//! The input is text, not a structure: its first byte picks the parser, the rest is the text
//! (so libFuzzer's dictionary and comparison tricks work on it directly, and the seeds are
//! the README's own examples). Checked: no parser panics, whatever the text; what parses
//! keeps the promises its type makes (unicast MACs, VLAN ids and queue counts in range, sizes
//! that are whole MiB where asked); and where a type has a `Display`, what it prints parses
//! back to the same value.

use std::str::FromStr;

use devshare_common::config::{parse_guest_memory, parse_size, qemu_size};
use devshare_common::listen::{parse_group, parse_mode, SocketOptions};
use devshare_common::pit::LostTickPolicy;
use devshare_common::qemu::QemuVersion;
use kvm_pit_policy::{cmdline, stall};
use vhost_user_console::config as console;
use vhost_user_console::endpoint::EndpointSpec;
use vhost_user_netmux::config as netmux;
use vhost_user_netmux::qemu_args as netmux_qemu;

/// The parsers, in the order the input's first byte picks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parser {
    Size,
    LostTickPolicy,
    SocketMode,
    SocketGroup,
    Mac,
    Uplink,
    NetmuxPort,
    HostPort,
    NetmuxToml,
    Endpoint,
    ConsoleTarget,
    ConsoleVm,
    ConsolePort,
    ConsoleToml,
    QemuCommandLine,
    StallPattern,
    QemuVersion,
}

const PARSERS: [Parser; 17] = [
    Parser::Size,
    Parser::LostTickPolicy,
    Parser::SocketMode,
    Parser::SocketGroup,
    Parser::Mac,
    Parser::Uplink,
    Parser::NetmuxPort,
    Parser::HostPort,
    Parser::NetmuxToml,
    Parser::Endpoint,
    Parser::ConsoleTarget,
    Parser::ConsoleVm,
    Parser::ConsolePort,
    Parser::ConsoleToml,
    Parser::QemuCommandLine,
    Parser::StallPattern,
    Parser::QemuVersion,
];

/// The input for `parser` with `text`.
pub fn input(parser: Parser, text: &str) -> Vec<u8> {
    let index = PARSERS.iter().position(|&p| p == parser).unwrap_or(0);
    let mut v = vec![index as u8];
    v.extend_from_slice(text.as_bytes());
    v
}

/// `Display` of `v` must parse back to `v`.
fn round_trip<T>(what: &str, v: &T)
where
    T: FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
    T::Err: std::fmt::Display,
{
    let shown = v.to_string();
    match shown.parse::<T>() {
        Ok(back) => assert_eq!(&back, v, "{what}: {shown:?} parses to another value"),
        Err(e) => panic!("{what}: {v:?} prints as {shown:?}, which does not parse: {e}"),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let parser = PARSERS[usize::from(selector) % PARSERS.len()];
    let text = String::from_utf8_lossy(rest);
    let t = text.as_ref();
    match parser {
        Parser::Size => {
            if let Ok(n) = parse_size(t) {
                let shown = qemu_size(n);
                assert_eq!(
                    parse_size(&shown).ok(),
                    Some(n),
                    "size {n} prints as {shown:?}"
                );
            }
            if let Ok(b) = parse_guest_memory(t) {
                assert!(b > 0 && b % (1 << 20) == 0, "guest memory {b} from {t:?}");
            }
        }
        Parser::LostTickPolicy => {
            if let Ok(p) = t.parse::<LostTickPolicy>() {
                round_trip("lost-tick policy", &p);
                assert_eq!(LostTickPolicy::from_reinject(p.reinject()), p);
            }
        }
        Parser::SocketMode => {
            if let Ok(m) = parse_mode(t) {
                assert!(m <= 0o777, "mode {m:o} from {t:?}");
                assert_eq!(parse_mode(&format!("{m:o}")).ok(), Some(m));
            }
            let _ = SocketOptions::parse(Some(t), None);
        }
        Parser::SocketGroup => {
            let _ = parse_group(t);
        }
        Parser::Mac => {
            if let Ok(m) = t.parse::<netmux::MacAddr>() {
                round_trip("MAC", &m);
            }
        }
        Parser::Uplink => {
            if let Ok(u) = t.parse::<netmux::UplinkSpec>() {
                round_trip("uplink", &u);
                let name = u.ifname();
                assert!(!name.is_empty() && name.len() <= 15, "interface {name:?}");
            }
        }
        Parser::NetmuxPort => {
            if let Ok(p) = netmux::PortConfig::parse_spec(t, 3) {
                check_netmux_port(&p);
            }
        }
        Parser::HostPort => {
            let (name, mac) = match t.split_once('\n') {
                Some((n, m)) => (n, Some(m)),
                None => (t, None),
            };
            if let Ok(h) = netmux::HostPortConfig::new(name, mac) {
                assert!(!h.name.is_empty() && h.name.len() <= 15);
                if let Some(m) = h.mac {
                    assert!(!m.is_multicast() && m != netmux::MacAddr::default());
                }
            }
        }
        Parser::NetmuxToml => {
            if let Ok(file) = toml::from_str::<netmux::ConfigFile>(t) {
                if let Ok(c) = netmux_config(file) {
                    assert!(!c.ports.is_empty() && c.mtu >= 68);
                    for p in &c.ports {
                        check_netmux_port(p);
                    }
                    for (i, p) in c.ports.iter().enumerate() {
                        for v in [QemuVersion::OLDEST_TESTED, QemuVersion::NEWEST_TESTED] {
                            let args = netmux_qemu::qemu_args(p, i, c.mtu, 512, v);
                            assert!(args.iter().any(|a| a.starts_with("-netdev vhost-user")));
                        }
                    }
                }
            }
        }
        Parser::Endpoint => {
            if let Ok(e) = t.parse::<EndpointSpec>() {
                round_trip("endpoint", &e);
            }
        }
        Parser::ConsoleTarget => {
            if let Ok(target) = t.parse::<console::Target>() {
                round_trip("port target", &target);
            }
        }
        Parser::ConsoleVm => {
            if let Ok(vm) = console::parse_vm_arg(t) {
                assert!(!vm.socket.as_os_str().is_empty());
            }
        }
        Parser::ConsolePort => {
            if let Ok((_, port)) = console::parse_port_arg(t) {
                let _ = port.endpoint.parse::<console::Target>();
            }
        }
        Parser::QemuCommandLine => {
            // A QEMU version on the first line, then the command line as /proc/PID/cmdline
            // gives it: arguments separated by NULs.
            let (version, line) = t.split_once('\n').unwrap_or(("", t));
            let qemu = version.parse().unwrap_or(QemuVersion::NEWEST_TESTED);
            let argv: Vec<String> = line.split('\0').map(str::to_owned).collect();
            let _ = cmdline::split_qemu_argv(&argv);
            let _ = cmdline::read_pit(&argv, qemu);
        }
        Parser::QemuVersion => {
            if let Ok(v) = t.parse::<QemuVersion>() {
                round_trip("QEMU version", &v);
                let _ = v.untested_warning();
            }
            if let Some(v) = QemuVersion::from_version_output(t) {
                round_trip("QEMU version", &v);
            }
        }
        Parser::StallPattern => {
            let _ = stall::parse_duration(t);
            if let Ok(p) = t.parse::<stall::StallPattern>() {
                round_trip("stall pattern", &p);
                // The lab asks for a few seconds of windows: at most one per shortest cycle.
                let w = p.windows(std::time::Duration::from_secs(2), 1);
                let most = (2_000_000 / stall::MIN_CYCLE.as_micros()) as usize + 1;
                assert!(
                    w.len() <= most,
                    "{p} makes {} stall windows in 2 s",
                    w.len()
                );
            }
        }
        Parser::ConsoleToml => {
            if let Ok(file) = toml::from_str::<console::ConfigFile>(t) {
                if let Ok(c) = console::Config::try_from(file) {
                    check_console_config(&c);
                }
            }
        }
    }
}

fn check_netmux_port(p: &netmux::PortConfig) {
    assert!(
        !p.mac.is_multicast() && p.mac != netmux::MacAddr::default(),
        "port {} has MAC {}",
        p.name,
        p.mac
    );
    if let Some(v) = p.vlan {
        assert!((1..=4094).contains(&v), "VLAN {v}");
    }
    assert!((1..=netmux::MAX_QUEUE_PAIRS).contains(&p.queue_pairs));
}

/// The configuration `vhost-user-netmux --config FILE` builds, with no other option given.
fn netmux_config(file: netmux::ConfigFile) -> Result<netmux::Config, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let uplink: netmux::UplinkSpec = file
        .uplink
        .as_deref()
        .ok_or("no uplink")?
        .parse()
        .map_err(|x| e(&x))?;
    let host_port = match (file.host_port.as_deref(), file.host_mac.as_deref()) {
        (Some(name), mac) => Some(netmux::HostPortConfig::new(name, mac).map_err(|x| e(&x))?),
        (None, Some(_)) => return Err("host_mac without host_port".into()),
        (None, None) => None,
    };
    let mut ports = Vec::new();
    for (i, p) in file.port.into_iter().enumerate() {
        ports.push(netmux::PortConfig::from_file(p, i).map_err(|x| e(&x))?);
    }
    let socket = SocketOptions::parse(file.socket_mode.as_deref(), file.socket_group.as_deref())
        .map_err(|x| e(&x))?;
    let mtu = file.mtu.unwrap_or(1500);
    let mtu = u16::try_from(mtu).map_err(|x| e(&x))?;
    netmux::Config {
        uplink,
        host_port,
        ports,
        mode: file.mode.unwrap_or_default(),
        anti_spoof: file.anti_spoof.unwrap_or(true),
        mtu,
        stats_socket: file.stats_socket,
        socket,
        unsealed_memory: Default::default(),
    }
    .validate()
    .map_err(|x| e(&x))
}

fn check_console_config(c: &console::Config) {
    assert!(!c.vms.is_empty());
    for vm in &c.vms {
        assert!(!vm.ports.is_empty() && vm.ports.len() <= console::MAX_PORTS);
        for p in &vm.ports {
            assert!((1..=1 << 30).contains(&p.buffer_size));
            round_trip("port target", &p.target);
            if let console::Target::Link { vm: other, port } = &p.target {
                let Some(o) = c.vms.iter().find(|v| &v.name == other) else {
                    panic!(
                        "{}/{} links to a VM that is not configured",
                        vm.name, p.name
                    );
                };
                assert!(o.ports.iter().any(|q| &q.name == port));
            }
        }
    }
}

/// The README's examples and other realistic inputs.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let console_toml = r#"buffer_size = "1M"
state_dir = "/var/lib/devshare"
stats_socket = "/run/console.stats"
socket_mode = "0660"
socket_group = "kvm"

[[vm]]
name = "a"
socket = "/run/a.sock"
mode = "listen"
kind = "virtio"
port = [
  { name = "console", endpoint = "pty:/run/a.pty" },
  { name = "org.example.log", endpoint = "file:/var/log/a.log,timestamps", buffer_size = "64K" },
  { name = "link", endpoint = "vm:b/link" },
]

[[vm]]
name = "b"
socket = "/run/b.sock"
port = [
  { name = "console", endpoint = "unix:/run/b-console.sock" },
  { name = "link", endpoint = "vm:a/link" },
]
"#;
    let stream_toml = r#"[[vm]]
name = "s"
socket = "/run/s.sock"
mode = "connect"
kind = "stream"
port = [{ name = "serial0", endpoint = "serial:/dev/ttyUSB0,baud=9600,data=7,parity=even,stop=2,flow=hw" }]
"#;
    let netmux_toml = r#"uplink = "af-packet:eth0"
host_port = "nmhost0"
host_mac = "02:00:00:00:00:fe"
mode = "bridge"
anti_spoof = true
mtu = 9000
stats_socket = "/run/netmux.stats"
socket_mode = "0660"
socket_group = "0"

[[port]]
name = "vm1"
socket = "/run/vm1.sock"
mac = "52:54:00:00:00:01"

[[port]]
name = "vm2"
socket = "/run/vm2.sock"
mac = "52:54:00:00:00:02"
vlan = 10
queues = 2
connect = true
"#;
    vec![
        ("size", input(Parser::Size, "64KiB")),
        ("size-g", input(Parser::Size, "2G")),
        ("policy", input(Parser::LostTickPolicy, "discard")),
        ("mode", input(Parser::SocketMode, "0o660")),
        ("group", input(Parser::SocketGroup, "kvm")),
        ("mac", input(Parser::Mac, "52:54:00:aB:0c:ff")),
        ("uplink", input(Parser::Uplink, "af-packet:eth0")),
        ("uplink-tap", input(Parser::Uplink, "tap:nm0")),
        (
            "netmux-port",
            input(
                Parser::NetmuxPort,
                "name=vm2,socket=/run/vm2.sock,mac=52:54:00:00:00:02,queues=2,vlan=10,connect",
            ),
        ),
        (
            "host-port",
            input(Parser::HostPort, "nmhost0\n02:00:00:00:00:fe"),
        ),
        ("netmux-toml", input(Parser::NetmuxToml, netmux_toml)),
        ("endpoint-tcp6", input(Parser::Endpoint, "tcp:[::1]:4555")),
        (
            "endpoint-serial",
            input(Parser::Endpoint, "serial:/dev/ttyS1,baud=9600,parity=odd"),
        ),
        (
            "endpoint-file",
            input(Parser::Endpoint, "file:/var/log/a.log,timestamps"),
        ),
        ("target-link", input(Parser::ConsoleTarget, "vm:b/link")),
        ("target-pty", input(Parser::ConsoleTarget, "pty")),
        (
            "vm",
            input(Parser::ConsoleVm, "a=/run/a.sock,connect,stream"),
        ),
        ("port", input(Parser::ConsolePort, "a/data=unix:/tmp/x")),
        ("console-toml", input(Parser::ConsoleToml, console_toml)),
        (
            "console-stream-toml",
            input(Parser::ConsoleToml, stream_toml),
        ),
        (
            "qemu-cmdline",
            input(
                Parser::QemuCommandLine,
                "7.2\n/usr/bin/qemu-system-x86_64\x00-accel\x00kvm,kernel-irqchip=split\x00\
                 -machine\x00q35,pit=on\x00-global\x00kvm-pit.lost_tick_policy=discard\x00-m\x00512M",
            ),
        ),
        ("stall-periodic", input(Parser::StallPattern, "50ms/150ms")),
        ("stall-short", input(Parser::StallPattern, "50us/100us")),
        (
            "stall-random",
            input(Parser::StallPattern, "random:10ms-80ms/50ms-200ms"),
        ),
        ("qemu-version", input(Parser::QemuVersion, "11.1")),
        (
            "qemu-version-output",
            input(
                Parser::QemuVersion,
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                 Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass() {
        let _serial = crate::serial();
        for (name, input) in seeds() {
            eprintln!("seed {name}");
            run(&input);
        }
    }
}
