//! What one netmux process serves: the uplink, the guest ports and the switching policy, read
//! from the command line or a TOML file and checked before anything is opened.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use devshare_common::config::parse_decimal;
use devshare_common::daemon::Transport;
use devshare_common::files::normalize;
use devshare_common::listen::SocketOptions;
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A MAC address did not parse.
    #[error("'{0}' is not a MAC address (expected six hex bytes like 52:54:00:12:34:56)")]
    Mac(String),
    /// A port MAC is not a unicast address.
    #[error("port {port}: MAC {mac} is multicast or all zeros; a guest needs a unicast MAC")]
    MacNotUnicast {
        /// Port name.
        port: String,
        /// The address.
        mac: MacAddr,
    },
    /// An interface name (of the uplink or the host port) is one the kernel would refuse.
    #[error(
        "{option}: {name:?} is not an interface name: {reason} (Linux interface names are 1 to \
         15 bytes, not '.' or '..', without '/', ':', '%' or whitespace)"
    )]
    IfName {
        /// The option that named it: "uplink" or "host port".
        option: &'static str,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The uplink spec did not parse.
    #[error("'{0}' is not an uplink (expected af-packet:IFACE or tap:NAME)")]
    Uplink(String),
    /// A `--port` spec did not parse.
    #[error("port spec '{spec}': {reason}")]
    PortSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A port name is empty or holds control characters.
    #[error("port name {0:?} must be non-empty, without control characters")]
    PortName(String),
    /// Two ports would share a MAC in the same VLAN (frames could not be told apart).
    #[error("ports {first} and {second} both use MAC {mac} in the same VLAN")]
    DuplicateMac {
        /// First port.
        first: String,
        /// Second port.
        second: String,
        /// The shared MAC.
        mac: MacAddr,
    },
    /// A port's socket is the stats socket too.
    #[error("port {port}'s socket {path} is the stats socket too; give each its own path")]
    StatsSocket {
        /// The port.
        port: String,
        /// The path.
        path: PathBuf,
    },
    /// Two ports use the same socket path or the same name.
    #[error("two ports use the same {what} '{value}'")]
    Duplicate {
        /// "socket" or "name".
        what: &'static str,
        /// The repeated value.
        value: String,
    },
    /// A VLAN id is outside 1..=4094.
    #[error("port {port}: VLAN id {vlan} is outside 1..=4094")]
    Vlan {
        /// Port name.
        port: String,
        /// The id.
        vlan: u16,
    },
    /// A queue-pair count is outside the supported range.
    #[error("port {port}: queues={queues} is outside 1..={max}")]
    Queues {
        /// Port name.
        port: String,
        /// Requested queue pairs.
        queues: u16,
        /// Largest supported.
        max: u16,
    },
    /// The MTU is outside what Ethernet and virtio-net can carry.
    #[error("mtu {0} is outside 68..=65535")]
    Mtu(u32),
    /// No guest port was configured.
    #[error("no guest port configured (give at least one --port or [[port]] table)")]
    NoPorts,
    /// The host port is misconfigured.
    #[error("host port: {0}")]
    HostPort(String),
    /// No uplink was configured.
    #[error("no uplink configured (give --uplink af-packet:IFACE or tap:NAME)")]
    NoUplink,
    /// The TOML file could not be used.
    #[error(transparent)]
    File(#[from] FileError),
}

/// Wraps the common TOML loader's error so [`ConfigError`] can compare equal in tests.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FileError(pub String);

impl PartialEq for FileError {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for FileError {}

/// Most queue pairs one guest port may have (one worker thread each).
pub const MAX_QUEUE_PAIRS: u16 = 8;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group (multicast or broadcast) addresses have the low bit of the first byte set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Reads the address from the first six bytes of `b`.
    pub fn from_slice(b: &[u8]) -> Option<MacAddr> {
        let a: [u8; 6] = b.get(..6)?.try_into().ok()?;
        Some(MacAddr(a))
    }
}

impl FromStr for MacAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Mac(s.into());
        // Six bytes of exactly two hex digits, one separator (':' or '-') throughout, as QEMU,
        // ip(8) and libvirt write them. from_str_radix alone would take "+f" for 0x0f.
        let separator = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(separator);
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// The one host-side link all guests share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UplinkSpec {
    /// A raw packet socket on an existing interface, put in promiscuous mode.
    AfPacket(String),
    /// A TAP device (created if missing) with a virtio-net header and offloads.
    Tap(String),
}

/// Longest interface name: IFNAMSIZ (16) less the terminating NUL.
const IFNAME_MAX: usize = 15;

/// Checks an interface name by the kernel's rules (`dev_valid_name`): 1 to 15 bytes, not "."
/// or "..", no '/', ':', '%' (a template to the kernel) or whitespace (and no NUL, which a C string cannot carry). A name the
/// kernel would refuse fails here, naming `option`, before anything is opened.
fn check_ifname(option: &'static str, name: &str) -> Result<(), ConfigError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > IFNAME_MAX {
        "it is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "'.' and '..' name directories under /sys/class/net"
    } else if name.contains(['/', ':']) {
        "it contains '/' or ':'"
    } else if name.contains('%') {
        // The kernel takes a name with '%' as a template ("up%d" creates "up0"), so the
        // interface would not have the name given.
        "it contains '%', which the kernel replaces by a number"
    } else if name.contains(|c: char| c.is_ascii_whitespace() || c == '\x0b' || c == '\0') {
        "it contains whitespace or NUL"
    } else {
        return Ok(());
    };
    Err(ConfigError::IfName {
        option,
        name: name.into(),
        reason,
    })
}

impl UplinkSpec {
    /// The interface's name.
    pub fn ifname(&self) -> &str {
        match self {
            UplinkSpec::AfPacket(i) | UplinkSpec::Tap(i) => i,
        }
    }
}

impl FromStr for UplinkSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Uplink(s.into());
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        let spec = match kind {
            "af-packet" | "af_packet" | "packet" => UplinkSpec::AfPacket(name.into()),
            "tap" => UplinkSpec::Tap(name.into()),
            _ => return Err(bad()),
        };
        check_ifname("uplink", name)?;
        Ok(spec)
    }
}

impl fmt::Display for UplinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkSpec::AfPacket(i) => write!(f, "af-packet:{i}"),
            UplinkSpec::Tap(i) => write!(f, "tap:{i}"),
        }
    }
}

/// Who guests may reach directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Guests reach each other through the switch and the uplink.
    #[default]
    Bridge,
    /// Guests reach only the uplink; frames between guests are dropped and counted.
    Private,
}

/// One guest's port, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Name used in logs and statistics.
    pub name: String,
    /// Where the guest's QEMU meets this port.
    pub transport: Transport,
    /// The guest's MAC: frames to it are delivered here, frames from it must carry it.
    pub mac: MacAddr,
    /// 802.1Q VLAN id the port's frames carry on the uplink; `None` means untagged.
    pub vlan: Option<u16>,
    /// Queue pairs offered to the guest (virtio-net MQ), one worker thread each.
    pub queue_pairs: u16,
}

/// The host port: a TAP device through which the host's own network stack reaches the
/// (untagged) guests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPortConfig {
    /// TAP device name (created if missing).
    pub name: String,
    /// MAC to give the host's end; `None` keeps the one the kernel chose.
    pub mac: Option<MacAddr>,
}

impl HostPortConfig {
    /// Checks a host port's name and MAC as given on the command line or in the file.
    pub fn new(name: &str, mac: Option<&str>) -> Result<HostPortConfig, ConfigError> {
        check_ifname("host port", name)?;
        let mac = mac.map(str::parse::<MacAddr>).transpose()?;
        if let Some(m) = mac {
            if m.is_multicast() || m == MacAddr::default() {
                return Err(ConfigError::HostPort(format!(
                    "MAC {m} is multicast or all zeros"
                )));
            }
        }
        Ok(HostPortConfig {
            name: name.into(),
            mac,
        })
    }
}

/// The validated configuration of the whole process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The shared host link.
    pub uplink: UplinkSpec,
    /// The host port, if any.
    pub host_port: Option<HostPortConfig>,
    /// Guest ports, in the order given.
    pub ports: Vec<PortConfig>,
    /// Bridge or private switching.
    pub mode: Mode,
    /// Drop frames whose source MAC is not the sending port's.
    pub anti_spoof: bool,
    /// MTU for the guests: QEMU offers it (`host_mtu=` in [`crate::qemu_args::qemu_args`]).
    pub mtu: u16,
    /// Unix socket serving JSON counters, if any.
    pub stats_socket: Option<PathBuf>,
    /// Mode and group of the port (vhost-user) sockets; the stats socket is always 0600.
    pub socket: SocketOptions,
    /// Whether guest memory whose file can still shrink is refused (the default) or accepted
    /// (`--allow-unsealed-memory`).
    pub unsealed_memory: devshare_common::mem_table::UnsealedMemory,
}

/// A `[[port]]` table of the TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortFile {
    /// Port name (defaults to `port<N>`).
    pub name: Option<String>,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Guest MAC.
    pub mac: String,
    /// VLAN id on the uplink.
    pub vlan: Option<u16>,
    /// Queue pairs.
    pub queues: Option<u16>,
    /// Connect to a listening QEMU (`server=on`) instead of listening.
    #[serde(default)]
    pub connect: bool,
    /// Deprecated spelling of `connect`.
    #[serde(default)]
    pub client: bool,
}

/// The TOML configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `af-packet:IFACE` or `tap:NAME`.
    pub uplink: Option<String>,
    /// Name of the host port's TAP device.
    pub host_port: Option<String>,
    /// MAC of the host port's host end.
    pub host_mac: Option<String>,
    /// `bridge` or `private`.
    pub mode: Option<Mode>,
    /// Source-MAC checking (default on).
    pub anti_spoof: Option<bool>,
    /// MTU offered to guests.
    pub mtu: Option<u32>,
    /// Stats socket path.
    pub stats_socket: Option<PathBuf>,
    /// Octal mode of the sockets (default "0600").
    pub socket_mode: Option<String>,
    /// Group of the sockets (name or number).
    pub socket_group: Option<String>,
    /// Guest ports.
    #[serde(default)]
    pub port: Vec<PortFile>,
}

impl PortConfig {
    /// Parses a command-line port spec:
    /// `socket=PATH,mac=MAC[,name=NAME][,vlan=ID][,queues=N][,connect]` (`client`, the old
    /// spelling of `connect`, is still accepted with a warning).
    pub fn parse_spec(spec: &str, index: usize) -> Result<PortConfig, ConfigError> {
        let err = |reason: String| ConfigError::PortSpec {
            spec: spec.into(),
            reason,
        };
        let mut file = PortFile {
            name: None,
            socket: PathBuf::new(),
            mac: String::new(),
            vlan: None,
            queues: None,
            connect: false,
            client: false,
        };
        let mut have_socket = false;
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            let need = |v: Option<&'_ str>| -> Result<String, ConfigError> {
                v.map(str::to_string)
                    .ok_or_else(|| err(format!("'{key}' needs a value")))
            };
            match key {
                "socket" | "path" => {
                    file.socket = PathBuf::from(need(value)?);
                    have_socket = true;
                }
                "mac" => file.mac = need(value)?,
                "name" => file.name = Some(need(value)?),
                "vlan" => {
                    file.vlan = Some(
                        parse_decimal(&need(value)?)
                            .ok_or_else(|| err("vlan must be a number from 1 to 4094".into()))?,
                    )
                }
                "queues" => {
                    file.queues = Some(
                        parse_decimal(&need(value)?)
                            .ok_or_else(|| err("queues must be a number".into()))?,
                    )
                }
                "connect" if value.is_none() => file.connect = true,
                "client" if value.is_none() => file.client = true,
                other => return Err(err(format!("unknown key '{other}'"))),
            }
        }
        if !have_socket {
            return Err(err("socket=PATH is required".into()));
        }
        if file.mac.is_empty() {
            return Err(err("mac=MAC is required".into()));
        }
        PortConfig::from_file(file, index)
    }

    /// Checks one `[[port]]` table; `index` names unnamed ports.
    pub fn from_file(f: PortFile, index: usize) -> Result<PortConfig, ConfigError> {
        let name = f.name.unwrap_or_else(|| format!("port{index}"));
        // The name goes into every log line and the stats: a control character would forge
        // or break them.
        if name.is_empty() || name.contains(char::is_control) {
            return Err(ConfigError::PortName(name));
        }
        let mac: MacAddr = f.mac.parse()?;
        if mac.is_multicast() || mac == MacAddr::default() {
            return Err(ConfigError::MacNotUnicast { port: name, mac });
        }
        if let Some(v) = f.vlan {
            if !(1..=4094).contains(&v) {
                return Err(ConfigError::Vlan {
                    port: name,
                    vlan: v,
                });
            }
        }
        let queues = f.queues.unwrap_or(1);
        if !(1..=MAX_QUEUE_PAIRS).contains(&queues) {
            return Err(ConfigError::Queues {
                port: name,
                queues,
                max: MAX_QUEUE_PAIRS,
            });
        }
        if f.client {
            devshare_common::config::warn_deprecated(
                &format!("port {name}: 'client'"),
                "'connect'",
            );
        }
        let transport = if f.connect || f.client {
            Transport::Connect(f.socket)
        } else {
            Transport::Listen(f.socket)
        };
        Ok(PortConfig {
            name,
            transport,
            mac,
            vlan: f.vlan,
            queue_pairs: queues,
        })
    }
}

impl Config {
    /// Checks the parts taken together: at least one port, no shared MAC within a VLAN, no
    /// shared socket or name, a sane MTU.
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.ports.is_empty() {
            return Err(ConfigError::NoPorts);
        }
        if !(68..=65535).contains(&u32::from(self.mtu)) {
            return Err(ConfigError::Mtu(self.mtu.into()));
        }
        let mut sockets = HashSet::new();
        let mut names = HashSet::new();
        let stats = self.stats_socket.as_deref().map(normalize);
        for (i, p) in self.ports.iter().enumerate() {
            let socket = normalize(p.transport.path());
            if stats.as_ref() == Some(&socket) {
                return Err(ConfigError::StatsSocket {
                    port: p.name.clone(),
                    path: p.transport.path().to_owned(),
                });
            }
            if !sockets.insert(socket) {
                return Err(ConfigError::Duplicate {
                    what: "socket",
                    value: p.transport.path().display().to_string(),
                });
            }
            if !names.insert(p.name.clone()) {
                return Err(ConfigError::Duplicate {
                    what: "name",
                    value: p.name.clone(),
                });
            }
            if let Some(q) = self.ports[..i]
                .iter()
                .find(|q| q.mac == p.mac && q.vlan == p.vlan)
            {
                return Err(ConfigError::DuplicateMac {
                    first: q.name.clone(),
                    second: p.name.clone(),
                    mac: p.mac,
                });
            }
        }
        if let Some(h) = &self.host_port {
            if h.name == self.uplink.ifname() {
                return Err(ConfigError::HostPort(format!(
                    "'{}' is the uplink's interface too",
                    h.name
                )));
            }
            if let Some(p) = h.mac.and_then(|mac| self.port_with(mac)) {
                return Err(ConfigError::HostPort(format!(
                    "MAC {} is port {}'s",
                    p.mac, p.name
                )));
            }
        }
        Ok(self)
    }

    /// The guest port with `mac`, if any, in any VLAN: the host port must not share it. For
    /// an untagged guest frames for the two could not be told apart; a tagged guest never
    /// meets the host port, but one MAC for two stations only confuses whoever reads ARP
    /// tables, captures and the stats.
    pub fn port_with(&self, mac: MacAddr) -> Option<&PortConfig> {
        self.ports.iter().find(|p| p.mac == mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_errors() {
        let m: MacAddr = "52:54:00:aB:0c:ff".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0x0c, 0xff]);
        assert_eq!(m.to_string(), "52:54:00:ab:0c:ff");
        assert!(!m.is_multicast());
        assert!(MacAddr::BROADCAST.is_multicast());
        for bad in [
            "",
            "52:54:00:ab:0c",
            "52:54:00:ab:0c:ff:00",
            "52:54:00:ab:0c:fg",
            "525:4:00:ab:0c:ff",
            // u8::from_str_radix takes a leading '+': two characters but one hex digit.
            "+f:54:00:ab:0c:ff",
            "52:54:00:ab:0c:+f",
            // One digit per byte is not the notation QEMU, ip(8) or libvirt write.
            "52:54:0:ab:c:ff",
            // One separator throughout.
            "52:54-00:ab:0c:ff",
            " 52:54:00:ab:0c:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let dashed: MacAddr = "52-54-00-ab-0c-ff".parse().unwrap();
        assert_eq!(dashed, m);
    }

    /// `up%d` would make the kernel create `up0`: refused for both interfaces.
    #[test]
    fn interface_name_templates_are_refused() {
        for bad in ["up%d", "%d", "hp%"] {
            let e = format!("tap:{bad}").parse::<UplinkSpec>().unwrap_err();
            assert!(e.to_string().contains("'%'"), "uplink {bad:?}: {e}");
            let e = HostPortConfig::new(bad, None).unwrap_err();
            assert!(e.to_string().contains("'%'"), "host port {bad:?}: {e}");
        }
    }

    #[test]
    fn interface_names_follow_the_kernels_rules() {
        // What the kernel's dev_valid_name refuses: empty, longer than IFNAMSIZ - 1, "." and
        // "..", '/', ':' and whitespace.
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "eth0\n",
            " eth0",
            "0123456789abcdef",
            "a\0b",
        ] {
            let e = format!("tap:{bad}").parse::<UplinkSpec>().unwrap_err();
            assert!(
                matches!(
                    &e,
                    ConfigError::IfName {
                        option: "uplink",
                        ..
                    }
                ),
                "uplink {bad:?}: {e}"
            );
            let e = HostPortConfig::new(bad, None).unwrap_err();
            assert!(
                matches!(
                    &e,
                    ConfigError::IfName {
                        option: "host port",
                        ..
                    }
                ),
                "host port {bad:?}: {e}"
            );
            assert!(e.to_string().starts_with("host port: "), "{e}");
        }
        for good in ["eth0", "a", "...", "0123456789abcde", "br-lan.10", "nm@x"] {
            assert!(
                format!("af-packet:{good}").parse::<UplinkSpec>().is_ok(),
                "{good}"
            );
            assert!(HostPortConfig::new(good, None).is_ok(), "{good}");
        }
    }

    #[test]
    fn vlan_and_queue_numbers_are_digits_only_and_names_printable() {
        for bad in [
            "vlan=+10",
            "vlan=0",
            "vlan=4095",
            "vlan= 10",
            "queues=+2",
            "queues=0x2",
        ] {
            let spec = format!("socket=/tmp/q.sock,mac=52:54:00:00:00:03,{bad}");
            assert!(PortConfig::parse_spec(&spec, 0).is_err(), "{bad} accepted");
        }
        for bad in ["name=", "name=a\nb", "name=a\u{1b}[2Jb"] {
            let spec = format!("socket=/tmp/q.sock,mac=52:54:00:00:00:03,{bad}");
            assert!(
                PortConfig::parse_spec(&spec, 0).is_err(),
                "{bad:?} accepted"
            );
        }
        let p = PortConfig::parse_spec("socket=/tmp/q.sock,mac=52:54:00:00:00:03,vlan=4094", 0);
        assert_eq!(p.unwrap().vlan, Some(4094));
    }

    #[test]
    fn uplink_specs() {
        assert_eq!(
            "af-packet:veth0".parse::<UplinkSpec>().unwrap(),
            UplinkSpec::AfPacket("veth0".into())
        );
        assert_eq!(
            "tap:nm0".parse::<UplinkSpec>().unwrap(),
            UplinkSpec::Tap("nm0".into())
        );
        for bad in [
            "veth0",
            "af-packet:",
            "tap:a/b",
            "foo:eth0",
            "tap:0123456789abcdef",
        ] {
            assert!(bad.parse::<UplinkSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn connect_and_its_old_spelling_client_both_dial_qemu() {
        for word in ["connect", "client"] {
            let p = PortConfig::parse_spec(
                &format!("socket=/tmp/c.sock,mac=52:54:00:00:00:03,{word}"),
                0,
            )
            .unwrap();
            assert_eq!(p.transport, Transport::Connect("/tmp/c.sock".into()));
        }
        let f: ConfigFile = toml::from_str(
            "uplink = \"tap:x\"\nsocket_mode = \"0660\"\nsocket_group = \"kvm\"\n\
             [[port]]\nsocket = \"/a\"\nmac = \"52:54:00:00:00:01\"\nconnect = true\n",
        )
        .unwrap();
        assert_eq!(f.socket_mode.as_deref(), Some("0660"));
        let p = PortConfig::from_file(f.port.into_iter().next().unwrap(), 0).unwrap();
        assert!(matches!(p.transport, Transport::Connect(_)));
    }

    #[test]
    fn port_specs() {
        let p = PortConfig::parse_spec(
            "socket=/tmp/a.sock,mac=52:54:00:00:00:01,vlan=10,queues=2,name=vm1",
            0,
        )
        .unwrap();
        assert_eq!(p.name, "vm1");
        assert_eq!(p.vlan, Some(10));
        assert_eq!(p.queue_pairs, 2);
        assert_eq!(p.transport, Transport::Listen("/tmp/a.sock".into()));
        let c =
            PortConfig::parse_spec("socket=/tmp/b.sock,mac=52:54:00:00:00:02,client", 3).unwrap();
        assert_eq!(c.name, "port3");
        assert_eq!(c.transport, Transport::Connect("/tmp/b.sock".into()));
        for bad in [
            "mac=52:54:00:00:00:01",
            "socket=/tmp/a",
            "socket=/tmp/a,mac=01:00:5e:00:00:01",
            "socket=/tmp/a,mac=52:54:00:00:00:01,vlan=4095",
            "socket=/tmp/a,mac=52:54:00:00:00:01,queues=0",
            "socket=/tmp/a,mac=52:54:00:00:00:01,queues=9",
            "socket=/tmp/a,mac=52:54:00:00:00:01,colour=red",
        ] {
            assert!(PortConfig::parse_spec(bad, 0).is_err(), "{bad}");
        }
    }

    fn config(ports: &[&str]) -> Config {
        Config {
            uplink: UplinkSpec::AfPacket("eth0".into()),
            host_port: None,
            ports: ports
                .iter()
                .enumerate()
                .map(|(i, s)| PortConfig::parse_spec(s, i).unwrap())
                .collect(),
            mode: Mode::Bridge,
            anti_spoof: true,
            mtu: 1500,
            stats_socket: None,
            socket: SocketOptions::default(),
            unsealed_memory: Default::default(),
        }
    }

    #[test]
    fn whole_config_checks() {
        assert_eq!(config(&[]).validate(), Err(ConfigError::NoPorts));
        let ok = config(&[
            "socket=/a,mac=52:54:00:00:00:01",
            "socket=/b,mac=52:54:00:00:00:01,vlan=5",
        ]);
        assert!(ok.validate().is_ok(), "same MAC in different VLANs is fine");
        let dup = config(&[
            "socket=/a,mac=52:54:00:00:00:01",
            "socket=/b,mac=52:54:00:00:00:01",
        ]);
        assert!(matches!(
            dup.validate(),
            Err(ConfigError::DuplicateMac { .. })
        ));
        let dup_sock = config(&[
            "socket=/a,mac=52:54:00:00:00:01",
            "socket=/a,mac=52:54:00:00:00:02",
        ]);
        assert!(matches!(
            dup_sock.validate(),
            Err(ConfigError::Duplicate { .. })
        ));
        // One path spelled two ways is one path.
        let dup_sock = config(&[
            "socket=/tmp/a,mac=52:54:00:00:00:01",
            "socket=/tmp/./a,mac=52:54:00:00:00:02",
        ]);
        assert!(matches!(
            dup_sock.validate(),
            Err(ConfigError::Duplicate { .. })
        ));
        // A port socket at the stats socket.
        let mut stats = config(&["socket=/tmp/s,mac=52:54:00:00:00:01"]);
        stats.stats_socket = Some("/tmp/../tmp/s".into());
        let e = stats.validate().unwrap_err();
        assert!(matches!(e, ConfigError::StatsSocket { .. }), "{e}");
        let mut bad_mtu = config(&["socket=/a,mac=52:54:00:00:00:01"]);
        bad_mtu.mtu = 10;
        assert_eq!(bad_mtu.validate(), Err(ConfigError::Mtu(10)));
    }

    #[test]
    fn host_port_checks() {
        let h = HostPortConfig::new("nmhost0", Some("02:00:00:00:00:aa")).unwrap();
        assert_eq!(h.mac, Some(MacAddr([2, 0, 0, 0, 0, 0xaa])));
        assert_eq!(HostPortConfig::new("nmhost0", None).unwrap().mac, None);
        for (name, mac) in [
            ("", None),
            ("a/b", None),
            ("0123456789abcdef", None),
            ("nmhost0", Some("01:00:5e:00:00:01")),
            ("nmhost0", Some("00:00:00:00:00:00")),
            ("nmhost0", Some("nonsense")),
        ] {
            assert!(HostPortConfig::new(name, mac).is_err(), "{name} {mac:?}");
        }
        let mut c = config(&[
            "socket=/a,mac=52:54:00:00:00:01",
            "socket=/b,mac=52:54:00:00:00:02,vlan=5",
        ]);
        c.host_port = Some(HostPortConfig::new("eth0", None).unwrap());
        assert!(matches!(
            c.clone().validate(),
            Err(ConfigError::HostPort(_))
        ));
        c.host_port = Some(HostPortConfig::new("nmhost0", Some("52:54:00:00:00:01")).unwrap());
        assert!(matches!(
            c.clone().validate(),
            Err(ConfigError::HostPort(_))
        ));
        // Not a tagged guest's either.
        c.host_port = Some(HostPortConfig::new("nmhost0", Some("52:54:00:00:00:02")).unwrap());
        assert!(matches!(
            c.clone().validate(),
            Err(ConfigError::HostPort(_))
        ));
        c.host_port = Some(HostPortConfig::new("nmhost0", Some("52:54:00:00:00:03")).unwrap());
        assert!(c.validate().is_ok());
    }
}
