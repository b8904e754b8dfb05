//! `vhost-user-netmux`: share one host NIC among several QEMU guests over vhost-user-net.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use devshare_common::config::{load_toml, parse_guest_memory, warn_deprecated};
use devshare_common::listen::SocketOptions;
use devshare_common::mem_table::UnsealedMemory;
use devshare_common::pit::LostTickPolicy;
use devshare_common::qemu::QemuVersion;
use devshare_common::signals::{install_signal_handlers, SignalActions};
use vhost_user_netmux::config::{
    Config, ConfigError, ConfigFile, FileError, HostPortConfig, Mode, PortConfig, UplinkSpec,
};
use vhost_user_netmux::qemu_args::{caveats, qemu_args};

const AFTER_HELP: &str = "\
Each guest gets its own vhost-user socket and MAC. Frames for a guest's MAC go to that guest,
broadcast and multicast go to every port but the sender, anything else leaves via the uplink.

Example: two guests sharing eth0

  vhost-user-netmux --uplink af-packet:eth0 \\
      --port name=vm1,socket=/run/vm1.sock,mac=52:54:00:00:00:01 \\
      --port name=vm2,socket=/run/vm2.sock,mac=52:54:00:00:00:02,queues=2 \\
      --stats-socket /run/netmux.stats --socket-group kvm --socket-mode 0660

  vhost-user-netmux --uplink af-packet:eth0 --port ... --host-port nmhost0 # host reaches guests
  vhost-user-netmux --uplink af-packet:eth0 --port ... --print-qemu-args   # QEMU options
  vhost-user-netmux stats --socket /run/netmux.stats                       # counters (JSON)

A TOML file (--config) may hold the same settings:

  uplink = \"af-packet:eth0\"
  host_port = \"nmhost0\"     # optional: a TAP through which the host reaches the guests
  mode = \"bridge\"            # or \"private\"
  stats_socket = \"/run/netmux.stats\"
  socket_mode = \"0660\"       # default 0600: only this user may connect
  socket_group = \"kvm\"       # the group QEMU or libvirt runs as (must exist: getent group kvm)
  [[port]]
  name = \"vm1\"
  socket = \"/run/vm1.sock\"
  mac = \"52:54:00:00:00:01\"
  vlan = 10                  # optional: tagged on the uplink
  queues = 2                 # optional: queue pairs (QEMU queues=2)
  connect = false            # true: connect to a QEMU started with server=on

Port sockets are created 0600 (--socket-mode, --socket-group open them to QEMU's group; the
stats socket stays 0600). A socket
another running process serves is never taken over, and a file that is not a socket is never
removed. SIGTERM/SIGINT remove this process's sockets and exit 0; SIGHUP is logged and counted.

RUST_LOG=debug shows per-frame refusals.";

/// Share one host network link among several QEMU guests, each on its own vhost-user-net
/// socket, switching frames by destination MAC.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-netmux", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the counters of a running netmux (reads its --stats-socket).
    Stats {
        /// The running netmux's stats socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML configuration file; ports given with --port are added to its [[port]] tables and
    /// other options given here override it. A regular file: pipes and FIFOs
    /// (`--config <(generate)`) are refused.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// The shared host link: af-packet:IFACE (an existing interface, put in promiscuous mode)
    /// or tap:NAME (a TAP device, created if missing).
    #[arg(long, value_name = "KIND:NAME")]
    uplink: Option<String>,

    /// A TAP device (created if missing) through which this host itself reaches the guests:
    /// give it an address in the guests' subnet. An af-packet uplink cannot carry the host's
    /// own traffic to its guests; this can. Untagged guests only; not bridged to the uplink.
    #[arg(long, value_name = "NAME")]
    host_port: Option<String>,

    /// MAC address for the host port's interface [default: the one the kernel picks].
    #[arg(long, value_name = "MAC", requires = "host_port")]
    host_mac: Option<String>,

    /// A guest port: socket=PATH,mac=MAC[,name=NAME][,vlan=ID][,queues=N][,connect].
    /// Repeat for each guest. With `connect` the backend connects to a QEMU listening on PATH
    /// (`client` is the deprecated spelling).
    #[arg(long = "port", value_name = "SPEC")]
    ports: Vec<String>,

    /// bridge: guests reach each other and the uplink; private: guests reach only the uplink.
    #[arg(long, value_enum)]
    mode: Option<Mode>,

    /// Accept frames whose source MAC is not the sending guest's (spoofed frames are dropped
    /// and counted by default).
    #[arg(long)]
    no_anti_spoof: bool,

    /// MTU offered to guests [default: 1500].
    #[arg(long)]
    mtu: Option<u32>,

    /// Serve counters as JSON on this Unix socket (read with `vhost-user-netmux stats`).
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,

    /// Permission bits (octal) of the port (vhost-user) sockets [default: 0600]. E.g. 0660
    /// with --socket-group to let QEMU or libvirt's group connect. The stats socket stays 0600.
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,

    /// Group (name or number; it must exist) given to the port sockets.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,

    /// Accept guest memory whose file can still shrink: a memfd without F_SEAL_SHRINK (QEMU's
    /// memory-backend-memfd with seal=off) or a file on tmpfs or hugetlbfs (memory-backend-file).
    /// Refused by default, because a front-end that shrinks such a file while it is mapped
    /// crashes this process (SIGBUS) and with it every guest it serves. QEMU's
    /// `-object memory-backend-memfd,...,share=on` is sealed and needs no flag.
    #[arg(long)]
    allow_unsealed_memory: bool,

    /// Print the QEMU options for each port and exit.
    #[arg(long)]
    print_qemu_args: bool,

    /// Guest RAM size used in --print-qemu-args, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_guest_memory)]
    memory: u64,

    /// Deprecated: use --memory SIZE (this took MiB: --guest-mem 512 is --memory 512M).
    #[arg(long, value_name = "MIB", conflicts_with = "memory", value_parser = parse_guest_mem_mib)]
    guest_mem: Option<u64>,

    /// With --print-qemu-args: also print the option that sets KVM's PIT lost-tick policy
    /// (see kvm-pit-policy).
    #[arg(long, value_name = "POLICY", value_enum)]
    pit_policy: Option<LostTickPolicy>,

    /// With --print-qemu-args: spell the options for this QEMU version (e.g. 7.2: reconnect=
    /// instead of reconnect-ms=) [default: 11.1, the newest tested].
    #[arg(long, value_name = "X.Y", conflicts_with = "qemu")]
    qemu_version: Option<QemuVersion>,

    /// With --print-qemu-args: take the QEMU version from `PATH --version`.
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
}

impl TryFrom<&RunArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: &RunArgs) -> Result<Config, ConfigError> {
        let file = match &a.config {
            Some(path) => load_toml::<ConfigFile>(path).map_err(|e| FileError(e.to_string()))?,
            None => ConfigFile {
                uplink: None,
                host_port: None,
                host_mac: None,
                mode: None,
                anti_spoof: None,
                mtu: None,
                stats_socket: None,
                socket_mode: None,
                socket_group: None,
                port: Vec::new(),
            },
        };
        let uplink: UplinkSpec = a
            .uplink
            .as_deref()
            .or(file.uplink.as_deref())
            .ok_or(ConfigError::NoUplink)?
            .parse()?;
        let host_port = match (
            a.host_port.as_deref().or(file.host_port.as_deref()),
            a.host_mac.as_deref().or(file.host_mac.as_deref()),
        ) {
            (Some(name), mac) => Some(HostPortConfig::new(name, mac)?),
            (None, Some(_)) => {
                return Err(ConfigError::HostPort(
                    "host_mac is set but host_port is not".into(),
                ))
            }
            (None, None) => None,
        };
        let mut ports = Vec::new();
        for (i, p) in file.port.into_iter().enumerate() {
            ports.push(PortConfig::from_file(p, i)?);
        }
        for spec in &a.ports {
            let i = ports.len();
            ports.push(PortConfig::parse_spec(spec, i)?);
        }
        let socket = SocketOptions::parse(
            a.socket_mode.as_deref().or(file.socket_mode.as_deref()),
            a.socket_group.as_deref().or(file.socket_group.as_deref()),
        )
        .map_err(|e| FileError(e.to_string()))?;
        let mtu = a.mtu.or(file.mtu).unwrap_or(1500);
        let mtu = u16::try_from(mtu).map_err(|_| ConfigError::Mtu(mtu))?;
        Config {
            uplink,
            host_port,
            ports,
            mode: a.mode.or(file.mode).unwrap_or_default(),
            anti_spoof: !a.no_anti_spoof && file.anti_spoof.unwrap_or(true),
            mtu,
            stats_socket: a.stats_socket.clone().or(file.stats_socket),
            socket,
            unsealed_memory: if a.allow_unsealed_memory {
                UnsealedMemory::Allow
            } else {
                UnsealedMemory::Refuse
            },
        }
        .validate()
    }
}

/// `--guest-mem MIB`, checked as `--memory MIBM` is (non-zero, no overflow); in bytes.
fn parse_guest_mem_mib(s: &str) -> Result<u64, String> {
    let mib: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of MiB"))?;
    parse_guest_memory(&format!("{mib}M")).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // First of all: a SIGHUP or SIGTERM during start-up is held and handled once start-up is
    // done (see devshare_common::signals), never the default (death, sockets left behind).
    let pending_signals = match install_signal_handlers() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vhost-user-netmux: {e}");
            return ExitCode::FAILURE;
        }
    };
    devshare_common::init_logging();
    let cli = Cli::parse();
    if let Some(Command::Stats { socket }) = &cli.command {
        // Nothing to clean up: Ctrl-C or SIGTERM during the query just ends it.
        if let Err(e) = pending_signals.start(SignalActions::none()) {
            eprintln!("vhost-user-netmux: {e}");
            return ExitCode::FAILURE;
        }
        return match devshare_common::stats::query(socket) {
            Ok(doc) => {
                // Whatever listens on the socket wrote this: only JSON is printed (pretty, so
                // with every control character escaped), anything else is refused.
                let pretty = match serde_json::from_str::<serde_json::Value>(&doc)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!(
                            "cannot read stats from {}: the answer is not JSON ({e}); is this \
                             a vhost-user-netmux stats socket?",
                            socket.display()
                        );
                        return ExitCode::FAILURE;
                    }
                };
                match devshare_common::output::print(&format!("{pretty}\n")) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("vhost-user-netmux: cannot write to stdout: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("cannot read stats from {}: {e}", socket.display());
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::try_from(&cli.run) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-user-netmux: {e}");
            return ExitCode::from(2);
        }
    };
    let memory_mib = match cli.run.guest_mem {
        Some(bytes) => {
            warn_deprecated("--guest-mem MIB", "--memory SIZE (e.g. --memory 512M)");
            bytes >> 20
        }
        None => cli.run.memory >> 20,
    };
    if cli.run.print_qemu_args {
        let qemu = match QemuVersion::chosen(cli.run.qemu_version, cli.run.qemu.as_deref()) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("vhost-user-netmux: {e}");
                return ExitCode::from(2);
            }
        };
        let warnings = qemu.untested_warning().into_iter().chain(caveats(qemu));
        for w in warnings {
            eprintln!("vhost-user-netmux: note: {w}");
        }
        let mut text = String::new();
        for (i, p) in config.ports.iter().enumerate() {
            text.push_str(&format!("# guest on port {} ({})\n", p.name, p.mac));
            let mut args = qemu_args(p, i, config.mtu, memory_mib, qemu);
            if let Some(policy) = cli.run.pit_policy {
                args.push(devshare_common::pit::qemu_args(policy).join(" "));
            }
            text.push_str(&args.join(" \\\n  "));
            text.push('\n');
        }
        return match devshare_common::output::print(&text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vhost-user-netmux: cannot write to stdout: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let actions = SignalActions {
        on_reload: Box::new(|| log::info!("SIGHUP: netmux has nothing to reload")),
        on_shutdown: Box::new(|| {}),
    };
    if let Err(e) = pending_signals.start(actions) {
        log::error!("{e}");
        return ExitCode::FAILURE;
    }
    match vhost_user_netmux::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
