//! Configuration: which VMs the process serves, their ports and where each port goes.
//!
//! Built from a TOML file or from the command line (see `main.rs`), then validated once:
//! names are unique, links point at ports that exist and point back, sizes are sane.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use devshare_common::config::{parse_size, ConfigError};
use devshare_common::listen::SocketOptions;
use serde::Deserialize;

use crate::endpoint::EndpointSpec;

/// Most ports one virtio VM may have: with MULTIPORT, 31 ports take 64 queues, the most one
/// vhost-user worker serves ([`crate::virtio_console::MAX_QUEUES`]). The Linux driver allows
/// more; QEMU's virtio-serial has the same default (`max_ports=31`).
pub const MAX_PORTS: usize = 31;

const _: () = assert!(
    crate::virtio_console::queue_count(MAX_PORTS, true) <= crate::virtio_console::MAX_QUEUES
);
/// Default size of a port's output buffer.
pub const DEFAULT_BUFFER: u64 = 1 << 20;

/// How the VM's guest side reaches this process.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// vhost-user virtio-console (`vhost-user-test-device-pci,virtio-id=3`).
    #[default]
    Virtio,
    /// Plain bytes on QEMU's `-chardev socket` (`-serial chardev:ID`, virtconsole, ...).
    Stream,
}

/// Who listens on the VM's socket.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocketMode {
    /// This process listens; QEMU connects (use `reconnect-ms` on QEMU's side).
    #[default]
    Listen,
    /// QEMU listens (`server=on`); this process connects and reconnects.
    Connect,
}

/// Where a port's data goes on the host side.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A host endpoint (PTY, socket, file, serial device).
    Endpoint(EndpointSpec),
    /// A port of another VM served by this process: `vm:VM/PORT`.
    Link {
        /// The other VM.
        vm: String,
        /// Its port.
        port: String,
    },
}

impl FromStr for Target {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("vm:") {
            let (vm, port) = rest.split_once('/').ok_or_else(|| {
                ConfigError::Invalid(format!("link '{s}' must look like vm:OTHERVM/PORT"))
            })?;
            if vm.is_empty() || port.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "link '{s}' must look like vm:OTHERVM/PORT"
                )));
            }
            return Ok(Target::Link {
                vm: vm.to_owned(),
                port: port.to_owned(),
            });
        }
        s.parse::<EndpointSpec>()
            .map(Target::Endpoint)
            .map_err(|e| ConfigError::Invalid(format!("endpoint '{s}': {e}")))
    }
}

impl fmt::Display for Target {
    /// The spec string as written in a config file; parses back to the same target.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Endpoint(e) => write!(f, "{e}"),
            Target::Link { vm, port } => write!(f, "vm:{vm}/{port}"),
        }
    }
}

/// One port as written in a config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortFile {
    /// Name the guest sees (`/dev/virtio-ports/NAME`).
    pub name: String,
    /// Endpoint or `vm:OTHER/PORT`.
    pub endpoint: String,
    /// Output buffer for this port (default: the global `buffer_size`).
    pub buffer_size: Option<String>,
}

/// One VM as written in a config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmFile {
    /// Name used in logs, links and file names.
    pub name: String,
    /// vhost-user (or stream) socket path.
    pub socket: PathBuf,
    /// `listen` (default) or `connect`.
    #[serde(default)]
    pub mode: SocketMode,
    /// `virtio` (default) or `stream`.
    #[serde(default)]
    pub kind: DeviceKind,
    /// Ports; the first one of a virtio VM is its console (`/dev/hvc0`).
    #[serde(rename = "port", default)]
    pub ports: Vec<PortFile>,
}

/// The config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Default output buffer per port, e.g. "1M".
    pub buffer_size: Option<String>,
    /// Directory for buffers that must survive a restart of this process.
    pub state_dir: Option<PathBuf>,
    /// Unix socket serving the counters as JSON.
    pub stats_socket: Option<PathBuf>,
    /// Octal mode of every socket this process creates (default "0600").
    pub socket_mode: Option<String>,
    /// Group (name or number) of every socket this process creates.
    pub socket_group: Option<String>,
    /// The VMs.
    #[serde(rename = "vm", default)]
    pub vms: Vec<VmFile>,
}

/// A validated port.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Name the guest sees.
    pub name: String,
    /// Where the data goes.
    pub target: Target,
    /// Output buffer size in bytes.
    pub buffer_size: usize,
    /// The console port (hvc): never back-pressures the guest, keeps the newest output.
    pub console: bool,
}

/// A validated VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name.
    pub name: String,
    /// Socket path.
    pub socket: PathBuf,
    /// Who listens.
    pub mode: SocketMode,
    /// Virtio or stream.
    pub kind: DeviceKind,
    /// Ports in guest order.
    pub ports: Vec<PortConfig>,
}

impl VmConfig {
    /// Whether the device uses MULTIPORT: always, except for a lone console port.
    pub fn multiport(&self) -> bool {
        self.kind == DeviceKind::Virtio && self.ports.len() > 1
    }
}

/// The whole validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// VMs in declaration order.
    pub vms: Vec<VmConfig>,
    /// Where buffers are kept across restarts (None: in memory only).
    pub state_dir: Option<PathBuf>,
    /// Mode and group of the front-end (QEMU) sockets the process creates: vhost-user and
    /// stream `--vm` sockets; set by `main` from `--socket-mode` / `--socket-group` or the
    /// file's keys. Not `unix:` endpoints (their own `mode=`/`group=`), not the stats socket
    /// (0600).
    pub socket: SocketOptions,
}

impl TryFrom<ConfigFile> for Config {
    type Error = ConfigError;

    fn try_from(file: ConfigFile) -> Result<Self, Self::Error> {
        let default_buf = match &file.buffer_size {
            Some(s) => parse_size(s)?,
            None => DEFAULT_BUFFER,
        };
        let mut vms = Vec::new();
        for vm in file.vms {
            let mut ports = Vec::new();
            for (i, p) in vm.ports.iter().enumerate() {
                let buffer_size = match &p.buffer_size {
                    Some(s) => parse_size(s)?,
                    None => default_buf,
                };
                if !(1..=(1 << 30)).contains(&buffer_size) {
                    return Err(ConfigError::Invalid(format!(
                        "port {}/{}: buffer size must be between 1 byte and 1 GiB",
                        vm.name, p.name
                    )));
                }
                ports.push(PortConfig {
                    name: p.name.clone(),
                    target: p.endpoint.parse()?,
                    buffer_size: buffer_size as usize,
                    console: i == 0,
                });
            }
            vms.push(VmConfig {
                name: vm.name,
                socket: vm.socket,
                mode: vm.mode,
                kind: vm.kind,
                ports,
            });
        }
        let cfg = Config {
            vms,
            state_dir: file.state_dir,
            socket: SocketOptions::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vms.is_empty() {
            return bad("no VM configured: give --socket/--vm or a config file".into());
        }
        let mut names = HashMap::new();
        let mut sockets = HashMap::new();
        for vm in &self.vms {
            if vm.name.is_empty()
                || vm.name.contains(['/', ':', ',', '='])
                || vm.name.contains(char::is_control)
            {
                return bad(format!(
                    "VM name {:?} must be non-empty without / : , = or control characters",
                    vm.name
                ));
            }
            if names.insert(vm.name.as_str(), vm).is_some() {
                return bad(format!("VM name '{}' is used twice", vm.name));
            }
            if let Some(other) = sockets.insert(vm.socket.clone(), &vm.name) {
                return bad(format!(
                    "VMs '{other}' and '{}' share the socket {}",
                    vm.name,
                    vm.socket.display()
                ));
            }
            if vm.ports.is_empty() {
                return bad(format!("VM '{}' has no port", vm.name));
            }
            if vm.kind == DeviceKind::Stream && vm.ports.len() != 1 {
                return bad(format!(
                    "VM '{}' is a stream device and carries exactly one port",
                    vm.name
                ));
            }
            if vm.ports.len() > MAX_PORTS {
                return bad(format!("VM '{}' has more than {MAX_PORTS} ports", vm.name));
            }
            let mut pn = HashMap::new();
            for p in &vm.ports {
                if p.name.is_empty() || p.name.contains('/') || p.name.contains(char::is_control) {
                    return bad(format!(
                        "port name {:?} of VM '{}' must be non-empty without / or control \
                         characters",
                        p.name, vm.name
                    ));
                }
                if pn.insert(p.name.as_str(), ()).is_some() {
                    return bad(format!("VM '{}' has two ports named '{}'", vm.name, p.name));
                }
            }
        }
        for vm in &self.vms {
            for p in &vm.ports {
                if let Target::Link {
                    vm: ovm,
                    port: oport,
                } = &p.target
                {
                    let Some(other) = names.get(ovm.as_str()) else {
                        return bad(format!(
                            "{}/{} links to unknown VM '{ovm}'",
                            vm.name, p.name
                        ));
                    };
                    if other.kind != DeviceKind::Virtio || vm.kind != DeviceKind::Virtio {
                        return bad(format!(
                            "{}/{}: guest-to-guest links join virtio ports only",
                            vm.name, p.name
                        ));
                    }
                    if ovm == &vm.name {
                        return bad(format!("{}/{} links to its own VM", vm.name, p.name));
                    }
                    let Some(op) = other.ports.iter().find(|q| &q.name == oport) else {
                        return bad(format!(
                            "{}/{} links to unknown port '{oport}' of VM '{ovm}'",
                            vm.name, p.name
                        ));
                    };
                    match &op.target {
                        Target::Link { vm: bvm, port: bport }
                            if bvm == &vm.name && bport == &p.name => {}
                        _ => {
                            return bad(format!(
                                "{}/{} links to {ovm}/{oport}, which must link back with endpoint vm:{}/{}",
                                vm.name, p.name, vm.name, p.name
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Looks a VM up by name.
    pub fn vm_index(&self, name: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.name == name)
    }
}

/// Parses `--vm NAME=SOCKET[,connect][,stream]`.
pub fn parse_vm_arg(s: &str) -> Result<VmFile, ConfigError> {
    let (name, rest) = s.split_once('=').ok_or_else(|| {
        ConfigError::Invalid(format!(
            "--vm '{s}' must look like NAME=SOCKET[,connect][,stream]"
        ))
    })?;
    let mut parts = rest.split(',');
    let socket = PathBuf::from(parts.next().unwrap_or_default());
    if socket.as_os_str().is_empty() {
        return Err(ConfigError::Invalid(format!(
            "--vm '{s}' has no socket path"
        )));
    }
    let mut vm = VmFile {
        name: name.to_owned(),
        socket,
        mode: SocketMode::Listen,
        kind: DeviceKind::Virtio,
        ports: Vec::new(),
    };
    for opt in parts {
        match opt {
            "connect" => vm.mode = SocketMode::Connect,
            "listen" => vm.mode = SocketMode::Listen,
            "stream" => vm.kind = DeviceKind::Stream,
            "virtio" => vm.kind = DeviceKind::Virtio,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "--vm '{s}': unknown option '{other}' (connect, listen, stream, virtio)"
                )))
            }
        }
    }
    Ok(vm)
}

/// Parses `--port [VM/]NAME=ENDPOINT` into (vm, port).
pub fn parse_port_arg(s: &str) -> Result<(Option<String>, PortFile), ConfigError> {
    let (lhs, endpoint) = s.split_once('=').ok_or_else(|| {
        ConfigError::Invalid(format!("--port '{s}' must look like [VM/]NAME=ENDPOINT"))
    })?;
    let (vm, name) = match lhs.split_once('/') {
        Some((vm, name)) => (Some(vm.to_owned()), name),
        None => (None, lhs),
    };
    Ok((
        vm,
        PortFile {
            name: name.to_owned(),
            endpoint: endpoint.to_owned(),
            buffer_size: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<Config, ConfigError> {
        let f: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Config::try_from(f)
    }

    #[test]
    fn links_must_point_back() {
        let ok = r#"
            [[vm]]
            name = "a"
            socket = "/tmp/a.sock"
            port = [{ name = "console", endpoint = "pty" }, { name = "l", endpoint = "vm:b/l" }]
            [[vm]]
            name = "b"
            socket = "/tmp/b.sock"
            port = [{ name = "console", endpoint = "pty" }, { name = "l", endpoint = "vm:a/l" }]
        "#;
        let c = cfg(ok).unwrap();
        assert!(c.vms[0].multiport());
        assert!(c.vms[0].ports[0].console && !c.vms[0].ports[1].console);
        let one_way = ok.replace("vm:a/l", "pty");
        let e = cfg(&one_way).unwrap_err().to_string();
        assert!(e.contains("must link back"), "{e}");
        let unknown = ok.replace("vm:b/l", "vm:c/l");
        assert!(cfg(&unknown)
            .unwrap_err()
            .to_string()
            .contains("unknown VM 'c'"));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(cfg("[[vm]]\nname='a'\nsocket='/x'\n")
            .unwrap_err()
            .to_string()
            .contains("no port"));
        assert!(cfg("bogus = 1").is_err());
        assert!(parse_vm_arg("a=/x,frob").is_err());
        assert!(parse_vm_arg("novalue").is_err());
        let (vm, p) = parse_port_arg("a/data=unix:/tmp/x").unwrap();
        assert_eq!(vm.as_deref(), Some("a"));
        assert_eq!(p.name, "data");
        assert!("vm:nope".parse::<Target>().is_err());
    }

    // Names go into log lines: a control character in one would forge or break them.
    #[test]
    fn names_with_control_characters_are_refused() {
        let two = |a: &str, pa: &str| {
            format!(
                "[[vm]]\nname=\"{a}\"\nsocket='/tmp/1.sock'\nport=[{{name=\"{pa}\", endpoint='pty'}}]\n"
            )
        };
        assert!(cfg(&two("vm1", "x")).is_ok());
        for bad in ["a\\nb", "a\\tb", "a\\u001bb"] {
            assert!(cfg(&two(bad, "x")).is_err(), "VM {bad:?} accepted");
            assert!(cfg(&two("vm1", bad)).is_err(), "port {bad:?} accepted");
        }
    }

    // Found by the config fuzz target: an endpoint target printed as its Debug form.
    #[test]
    fn a_port_target_prints_as_it_is_written() {
        for spec in [
            "pty",
            "pty:/run/a.pty",
            "unix:/run/b.sock",
            "tcp:127.0.0.1:4555",
            "file:/var/log/a.log,timestamps",
            "serial:/dev/ttyS0,baud=9600,data=7,parity=even,stop=2,flow=hw",
            "vm:b/link",
        ] {
            let t: Target = spec.parse().unwrap();
            assert_eq!(t.to_string(), spec);
            assert_eq!(t.to_string().parse::<Target>().unwrap(), t);
        }
    }
}
