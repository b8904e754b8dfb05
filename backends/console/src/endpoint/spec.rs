//! Endpoint spec strings (command line and TOML) and their parser.
//!
//! | spec | endpoint |
//! |---|---|
//! | `pty`, `pty:LINK` | new PTY pair, slave path logged; LINK becomes a symlink to the slave |
//! | `unix:PATH[,mode=0600][,group=NAME]` | Unix stream listener, one client at a time; socket mode and group of its own (default 0600, the process's group) |
//! | `tcp:PORT`, `tcp:ADDR:PORT` | TCP listener (default address 127.0.0.1), one client at a time |
//! | `file:PATH[,timestamps][,max-size=SIZE][,keep=N]` | log of guest output, rotated at SIZE (default 2M; 0: never) keeping N old files (default 3) |
//! | `serial:DEV[,baud=N][,data=5-8][,parity=none/odd/even][,stop=1/2][,flow=none/hw/sw][,reopen=DURATION]` | serial device, default 115200 8N1, no flow control, reopened 1s after it went away |

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use devshare_common::config::{parse_decimal, parse_size};
use devshare_common::listen::{parse_group, parse_mode, SocketOptions};

use serialport::{DataBits, FlowControl, Parity, StopBits};

use super::EndpointError;

/// Line settings of a serial endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSettings {
    /// Device path, e.g. `/dev/ttyUSB0` (a PTY slave works too).
    pub device: PathBuf,
    /// Baud rate in bits per second.
    pub baud: u32,
    /// Bits per character.
    pub data_bits: DataBits,
    /// Parity bit.
    pub parity: Parity,
    /// Stop bits.
    pub stop_bits: StopBits,
    /// Flow control.
    pub flow: FlowControl,
    /// How long after the device went away (hang-up, unplug) the first attempt to open it
    /// again is made; later attempts come at doubling delays up to 30 s.
    pub reopen: Duration,
}

impl SerialSettings {
    /// Settings for `device` with the defaults: 115200 8N1, no flow control, reopened 1 s
    /// after it went away.
    pub fn new(device: impl Into<PathBuf>) -> Self {
        SerialSettings {
            device: device.into(),
            baud: 115_200,
            data_bits: DataBits::Eight,
            parity: Parity::None,
            stop_bits: StopBits::One,
            flow: FlowControl::None,
            reopen: super::reopen::DEFAULT_INTERVAL,
        }
    }

    /// The line part in the usual short form, e.g. `115200 8N1 flow=none`.
    pub fn line(&self) -> String {
        let parity = match self.parity {
            Parity::None => 'N',
            Parity::Odd => 'O',
            Parity::Even => 'E',
        };
        format!(
            "{} {}{}{} flow={}",
            self.baud,
            data_bits_number(self.data_bits),
            parity,
            stop_bits_number(self.stop_bits),
            flow_name(self.flow)
        )
    }
}

fn data_bits_number(bits: DataBits) -> u8 {
    match bits {
        DataBits::Five => 5,
        DataBits::Six => 6,
        DataBits::Seven => 7,
        DataBits::Eight => 8,
    }
}

fn stop_bits_number(bits: StopBits) -> u8 {
    match bits {
        StopBits::One => 1,
        StopBits::Two => 2,
    }
}

fn parity_name(parity: Parity) -> &'static str {
    match parity {
        Parity::None => "none",
        Parity::Odd => "odd",
        Parity::Even => "even",
    }
}

fn flow_name(flow: FlowControl) -> &'static str {
    match flow {
        FlowControl::None => "none",
        FlowControl::Hardware => "hw",
        FlowControl::Software => "sw",
    }
}

/// Size bounds of a log file: rotated as virtlogd does (`PATH` -> `PATH.1` -> ... ->
/// `PATH.keep`, the oldest dropped) before it would grow past `max_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Largest size of the file in bytes; 0 means no limit (for an external logrotate).
    pub max_size: u64,
    /// Rotated files kept beside it; 0 empties the file instead.
    pub keep: u32,
}

impl LogLimits {
    /// virtlogd's defaults (`max_size = 2097152`, `max_backups = 3`): at most 8 MiB in all.
    pub const DEFAULT: LogLimits = LogLimits {
        max_size: 2 << 20,
        keep: 3,
    };
    /// Most rotated files one log may keep.
    pub const MAX_KEEP: u32 = 1000;
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits::DEFAULT
    }
}

/// What a console port is bridged to on the host, parsed from a spec string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    /// A new PTY pair; `link`, if given, becomes a symlink to the slave.
    Pty {
        /// Symlink to create pointing at the slave.
        link: Option<PathBuf>,
    },
    /// A Unix stream socket listener.
    Unix {
        /// Socket path.
        path: PathBuf,
        /// Who may connect: the endpoint's own `mode=` and `group=` (default 0600, the
        /// process's group), never the front-end sockets' `--socket-mode`/`--socket-group`:
        /// a console endpoint is a guest's console.
        socket: SocketOptions,
    },
    /// A TCP listener at this address.
    Tcp(SocketAddr),
    /// A log file of guest output, appended to and rotated by size.
    File {
        /// Log file path.
        path: PathBuf,
        /// Start each line with an RFC 3339 UTC timestamp.
        timestamps: bool,
        /// Size bound and rotation.
        limits: LogLimits,
    },
    /// A serial device.
    Serial(SerialSettings),
}

impl FromStr for EndpointSpec {
    type Err = EndpointError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| EndpointError::InvalidSpec {
            spec: spec.to_string(),
            reason,
        };
        let (kind, rest) = match spec.split_once(':') {
            Some((kind, rest)) => (kind, Some(rest)),
            None => (spec, None),
        };
        let required = |what: &str| match rest {
            Some(rest) if !rest.is_empty() => Ok(rest),
            _ => Err(invalid(format!("missing {what} after \"{kind}:\""))),
        };
        match kind {
            "pty" => match rest {
                None => Ok(EndpointSpec::Pty { link: None }),
                Some("") => Err(invalid("missing link path after \"pty:\"".into())),
                Some(link) => Ok(EndpointSpec::Pty {
                    link: Some(PathBuf::from(link)),
                }),
            },
            "unix" => {
                let rest = required("socket path")?;
                let mut parts = rest.split(',');
                let path = parts.next().unwrap_or_default();
                if path.is_empty() {
                    return Err(invalid("missing socket path after \"unix:\"".into()));
                }
                let mut socket = SocketOptions::default();
                for option in parts {
                    match option.split_once('=') {
                        Some(("mode", v)) => {
                            socket.mode = parse_mode(v).map_err(|e| invalid(e.to_string()))?
                        }
                        Some(("group", v)) => {
                            socket.group = Some(parse_group(v).map_err(|e| invalid(e.to_string()))?)
                        }
                        _ => {
                            return Err(invalid(format!(
                                "unknown unix option {option:?} (known: mode=OCTAL, group=NAME)"
                            )))
                        }
                    }
                }
                if let Some(w) = socket.world_access() {
                    log::warn!("{spec}: {w}");
                }
                Ok(EndpointSpec::Unix {
                    path: PathBuf::from(path),
                    socket,
                })
            }
            "tcp" => {
                let rest = required("port or address:port")?;
                if let Some(port) = parse_decimal::<u16>(rest) {
                    return Ok(EndpointSpec::Tcp(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        port,
                    )));
                }
                rest.parse::<SocketAddr>()
                    .map(EndpointSpec::Tcp)
                    .map_err(|_| {
                        invalid(format!(
                            "{rest:?} is neither a port (0-65535) nor ADDR:PORT \
                             (IPv6 in brackets: [::1]:PORT)"
                        ))
                    })
            }
            "file" => {
                let rest = required("log file path")?;
                let mut parts = rest.split(',');
                let path = parts.next().unwrap_or_default();
                if path.is_empty() {
                    return Err(invalid("missing log file path after \"file:\"".into()));
                }
                let mut timestamps = false;
                let mut limits = LogLimits::DEFAULT;
                for option in parts {
                    match option.split_once('=') {
                        None if option == "timestamps" => timestamps = true,
                        Some(("max-size", v)) => {
                            limits.max_size = parse_size(v).map_err(|_| {
                                invalid(format!(
                                    "max-size={v:?} is not a size such as 2M, 512K or 0 (no limit)"
                                ))
                            })?
                        }
                        Some(("keep", v)) => {
                            limits.keep = match parse_decimal::<u32>(v) {
                                Some(n) if n <= LogLimits::MAX_KEEP => n,
                                _ => {
                                    return Err(invalid(format!(
                                        "keep={v:?} must be a number of files from 0 to {}",
                                        LogLimits::MAX_KEEP
                                    )))
                                }
                            }
                        }
                        _ => {
                            return Err(invalid(format!(
                                "unknown file option {option:?} (known: timestamps, max-size=SIZE, keep=N)"
                            )))
                        }
                    }
                }
                Ok(EndpointSpec::File {
                    path: PathBuf::from(path),
                    timestamps,
                    limits,
                })
            }
            "serial" => {
                let rest = required("device path")?;
                parse_serial(rest)
                    .map(EndpointSpec::Serial)
                    .map_err(invalid)
            }
            other => Err(invalid(format!(
                "unknown endpoint kind {other:?} (known: pty, unix, tcp, file, serial)"
            ))),
        }
    }
}

/// Shortest `reopen=` interval: below the event loop's tick it would only mean "every tick".
const MIN_REOPEN: Duration = Duration::from_millis(10);
/// Longest `reopen=` interval.
const MAX_REOPEN: Duration = Duration::from_secs(3600);

/// Parses `DEVICE[,key=value...]`; errors are the reason only.
fn parse_serial(rest: &str) -> Result<SerialSettings, String> {
    let mut parts = rest.split(',');
    let device = parts.next().unwrap_or_default();
    if device.is_empty() {
        return Err("missing device path after \"serial:\"".into());
    }
    let mut settings = SerialSettings::new(device);
    let mut seen: Vec<&str> = Vec::new();
    for option in parts {
        let Some((key, value)) = option.split_once('=') else {
            return Err(format!(
                "serial option {option:?} is not key=value (keys: baud, data, parity, stop, flow, reopen)"
            ));
        };
        if seen.contains(&key) {
            return Err(format!("serial option {key:?} given twice"));
        }
        seen.push(key);
        match key {
            "baud" => {
                settings.baud = match parse_decimal::<u32>(value) {
                    Some(baud) if baud > 0 => baud,
                    _ => return Err(format!("baud={value:?} is not a positive number")),
                }
            }
            "data" => {
                settings.data_bits = match value {
                    "5" => DataBits::Five,
                    "6" => DataBits::Six,
                    "7" => DataBits::Seven,
                    "8" => DataBits::Eight,
                    _ => return Err(format!("data={value:?} must be 5, 6, 7 or 8")),
                }
            }
            "parity" => {
                settings.parity = match value {
                    "none" => Parity::None,
                    "odd" => Parity::Odd,
                    "even" => Parity::Even,
                    _ => return Err(format!("parity={value:?} must be none, odd or even")),
                }
            }
            "stop" => {
                settings.stop_bits = match value {
                    "1" => StopBits::One,
                    "2" => StopBits::Two,
                    _ => return Err(format!("stop={value:?} must be 1 or 2")),
                }
            }
            "flow" => {
                settings.flow = match value {
                    "none" => FlowControl::None,
                    "hw" => FlowControl::Hardware,
                    "sw" => FlowControl::Software,
                    _ => return Err(format!("flow={value:?} must be none, hw or sw")),
                }
            }
            "reopen" => {
                settings.reopen = match humantime::parse_duration(value) {
                    Ok(d) if d >= MIN_REOPEN && d <= MAX_REOPEN => d,
                    _ => {
                        return Err(format!(
                        "reopen={value:?} must be a duration from 10ms to 1h, such as 1s or 500ms"
                    ))
                    }
                }
            }
            other => {
                return Err(format!(
                "unknown serial option {other:?} (known: baud, data, parity, stop, flow, reopen)"
            ))
            }
        }
    }
    Ok(settings)
}

impl fmt::Display for EndpointSpec {
    /// The canonical spec string; parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointSpec::Pty { link: None } => write!(f, "pty"),
            EndpointSpec::Pty { link: Some(link) } => write!(f, "pty:{}", link.display()),
            EndpointSpec::Unix { path, socket } => {
                write!(f, "unix:{}", path.display())?;
                if socket.mode != SocketOptions::default().mode {
                    write!(f, ",mode={:04o}", socket.mode)?;
                }
                if let Some(g) = socket.group {
                    write!(f, ",group={g}")?;
                }
                Ok(())
            }
            EndpointSpec::Tcp(addr) => write!(f, "tcp:{addr}"),
            EndpointSpec::File {
                path,
                timestamps,
                limits,
            } => {
                write!(f, "file:{}", path.display())?;
                if *timestamps {
                    write!(f, ",timestamps")?;
                }
                if limits.max_size != LogLimits::DEFAULT.max_size {
                    write!(f, ",max-size={}", limits.max_size)?;
                }
                if limits.keep != LogLimits::DEFAULT.keep {
                    write!(f, ",keep={}", limits.keep)?;
                }
                Ok(())
            }
            EndpointSpec::Serial(s) => {
                write!(
                    f,
                    "serial:{},baud={},data={},parity={},stop={},flow={}",
                    s.device.display(),
                    s.baud,
                    data_bits_number(s.data_bits),
                    parity_name(s.parity),
                    stop_bits_number(s.stop_bits),
                    flow_name(s.flow)
                )?;
                if s.reopen != super::reopen::DEFAULT_INTERVAL {
                    write!(f, ",reopen={}", humantime::format_duration(s.reopen))?;
                }
                Ok(())
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for EndpointSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spec = String::deserialize(deserializer)?;
        spec.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for EndpointSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: &str) -> String {
        match spec.parse::<EndpointSpec>() {
            Ok(parsed) => panic!("{spec:?} parsed as {parsed:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn ok(spec: &str) -> EndpointSpec {
        match spec.parse::<EndpointSpec>() {
            Ok(parsed) => parsed,
            Err(e) => panic!("{spec:?}: {e}"),
        }
    }

    #[test]
    fn parses_good_specs() {
        assert_eq!(ok("pty"), EndpointSpec::Pty { link: None });
        assert_eq!(
            ok("pty:/tmp/vm1-console"),
            EndpointSpec::Pty {
                link: Some("/tmp/vm1-console".into())
            }
        );
        assert_eq!(
            ok("unix:/run/c.sock"),
            EndpointSpec::Unix {
                path: "/run/c.sock".into(),
                socket: SocketOptions::default()
            }
        );
        assert_eq!(
            ok("tcp:4555"),
            EndpointSpec::Tcp("127.0.0.1:4555".parse().unwrap())
        );
        assert_eq!(
            ok("tcp:0.0.0.0:23"),
            EndpointSpec::Tcp("0.0.0.0:23".parse().unwrap())
        );
        assert_eq!(
            ok("tcp:[::1]:23"),
            EndpointSpec::Tcp("[::1]:23".parse().unwrap())
        );
        assert_eq!(
            ok("file:/var/log/vm.log"),
            EndpointSpec::File {
                path: "/var/log/vm.log".into(),
                timestamps: false,
                limits: LogLimits {
                    max_size: 2 << 20,
                    keep: 3
                }
            }
        );
        assert_eq!(
            ok("file:/var/log/vm.log,timestamps"),
            EndpointSpec::File {
                path: "/var/log/vm.log".into(),
                timestamps: true,
                limits: LogLimits::DEFAULT
            }
        );
        assert_eq!(
            ok("file:/var/log/vm.log,max-size=64K,keep=0,timestamps"),
            EndpointSpec::File {
                path: "/var/log/vm.log".into(),
                timestamps: true,
                limits: LogLimits {
                    max_size: 64 << 10,
                    keep: 0
                }
            }
        );
        let EndpointSpec::File { limits, .. } = ok("file:/l,max-size=0") else {
            panic!("not a file")
        };
        assert_eq!(limits.max_size, 0, "0 means no limit");
        assert_eq!(
            ok("serial:/dev/ttyUSB0"),
            EndpointSpec::Serial(SerialSettings::new("/dev/ttyUSB0"))
        );
        assert_eq!(
            ok("serial:/dev/ttyS1,baud=9600,data=7,parity=even,stop=2,flow=hw"),
            EndpointSpec::Serial(SerialSettings {
                device: "/dev/ttyS1".into(),
                baud: 9600,
                data_bits: DataBits::Seven,
                parity: Parity::Even,
                stop_bits: StopBits::Two,
                flow: FlowControl::Hardware,
                reopen: Duration::from_secs(1),
            })
        );
        let EndpointSpec::Serial(replug) = ok("serial:/dev/ttyUSB0,reopen=250ms") else {
            panic!("not serial")
        };
        assert_eq!(replug.reopen, Duration::from_millis(250));
        let sw = ok("serial:/dev/ttyS1,flow=sw,parity=odd,data=5");
        let EndpointSpec::Serial(sw) = sw else {
            panic!("not serial: {sw:?}")
        };
        assert_eq!(sw.flow, FlowControl::Software);
        assert_eq!(sw.parity, Parity::Odd);
        assert_eq!(sw.data_bits, DataBits::Five);
        assert_eq!(sw.baud, 115_200);
    }

    // str::parse takes a leading '+': "tcp:+23" is not how anyone writes a port.
    #[test]
    fn numbers_are_digits_only() {
        assert!(err("tcp:+23").contains("is neither a port"));
        assert!(err("file:/x.log,keep=+3").contains("keep=\"+3\" must be a number"));
        assert!(err("serial:/dev/ttyS0,baud=+9600").contains("is not a positive number"));
        assert_eq!(ok("tcp:23"), ok("tcp:127.0.0.1:23"));
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        assert_eq!(
            err("telnet:23"),
            "invalid endpoint \"telnet:23\": unknown endpoint kind \"telnet\" \
             (known: pty, unix, tcp, file, serial)"
        );
        assert_eq!(
            err("unix:"),
            "invalid endpoint \"unix:\": missing socket path after \"unix:\""
        );
        assert_eq!(
            err("unix"),
            "invalid endpoint \"unix\": missing socket path after \"unix:\""
        );
        assert_eq!(
            err("pty:"),
            "invalid endpoint \"pty:\": missing link path after \"pty:\""
        );
        assert!(err("tcp:70000").contains("\"70000\" is neither a port"));
        assert!(err("tcp:localhost:23").contains("is neither a port"));
        assert!(err("file:/x.log,stamps").contains("unknown file option \"stamps\""));
        assert!(err("file:/x.log,max-size=big").contains("max-size=\"big\" is not a size"));
        assert!(err("file:/x.log,keep=-1").contains("keep=\"-1\" must be a number"));
        assert!(err("file:/x.log,keep=1001").contains("from 0 to 1000"));
        assert!(err("serial:/dev/ttyS0,reopen=soon").contains("reopen=\"soon\" must be a duration"));
        assert!(err("serial:/dev/ttyS0,reopen=1ms").contains("from 10ms to 1h"));
        assert!(err("file:,timestamps").contains("missing log file path"));
        assert!(err("serial:").contains("missing device path"));
        assert!(err("serial:/dev/ttyS0,baud=0").contains("baud=\"0\" is not a positive number"));
        assert!(err("serial:/dev/ttyS0,baud=fast").contains("baud=\"fast\""));
        assert!(err("serial:/dev/ttyS0,data=9").contains("data=\"9\" must be 5, 6, 7 or 8"));
        assert!(err("serial:/dev/ttyS0,parity=mark").contains("must be none, odd or even"));
        assert!(err("serial:/dev/ttyS0,stop=3").contains("stop=\"3\" must be 1 or 2"));
        assert!(err("serial:/dev/ttyS0,flow=rts").contains("flow=\"rts\" must be none, hw or sw"));
        assert!(err("serial:/dev/ttyS0,speed=9600").contains("unknown serial option \"speed\""));
        assert!(err("serial:/dev/ttyS0,9600").contains("\"9600\" is not key=value"));
        assert!(err("serial:/dev/ttyS0,baud=1,baud=2").contains("\"baud\" given twice"));
        assert!(err("unix:/a.sock,mode=0").contains("owner"));
        assert!(err("unix:/a.sock,mode=10777").contains("0777"));
        assert!(err("unix:/a.sock,group=99999").contains("99999"));
        assert!(err("unix:/a.sock,perm=0600").contains("unknown unix option"));
    }

    #[test]
    fn unix_endpoints_have_their_own_mode_and_group() {
        assert_eq!(
            ok("unix:/run/a.sock,mode=0660,group=root"),
            EndpointSpec::Unix {
                path: "/run/a.sock".into(),
                socket: SocketOptions {
                    mode: 0o660,
                    group: Some(0)
                }
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for spec in [
            "pty",
            "pty:/tmp/l",
            "unix:/run/a.sock",
            "unix:/run/a.sock,mode=0660,group=0",
            "tcp:127.0.0.1:99",
            "tcp:[::1]:99",
            "file:/a.log",
            "file:/a.log,timestamps",
            "file:/a.log,timestamps,max-size=65536,keep=7",
            "file:/a.log,max-size=0",
            "serial:/dev/ttyS0,baud=9600,data=7,parity=odd,stop=2,flow=sw",
            "serial:/dev/ttyS0,baud=9600,data=7,parity=odd,stop=2,flow=sw,reopen=250ms",
        ] {
            assert_eq!(ok(spec).to_string(), spec);
            assert_eq!(ok(&ok(spec).to_string()), ok(spec));
        }
        assert_eq!(ok("tcp:7").to_string(), "tcp:127.0.0.1:7");
    }

    #[test]
    fn deserializes_from_toml_strings() {
        #[derive(serde::Deserialize)]
        struct Port {
            endpoint: EndpointSpec,
        }
        let port: Port = toml::from_str("endpoint = \"tcp:4555\"").unwrap();
        assert_eq!(
            port.endpoint,
            EndpointSpec::Tcp("127.0.0.1:4555".parse().unwrap())
        );
        let bad = toml::from_str::<Port>("endpoint = \"serial:/dev/ttyS0,stop=4\"")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(bad.contains("stop=\"4\" must be 1 or 2"), "{bad}");
    }
}
