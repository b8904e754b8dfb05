//! `vhost-user-console`: serve virtio consoles and serial streams of QEMU guests and bridge
//! each guest port to a PTY, a socket, a log file, a serial device or another guest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use clap::Parser;
use devshare_common::config::{load_toml, parse_guest_memory, parse_size, qemu_size, ConfigError};
use devshare_common::daemon::{serve, FrontendSocket, ServeOptions, Transport};
use devshare_common::files::{ensure_private_dir, StateDirLock};
use devshare_common::listen::SocketOptions;
use devshare_common::mem_table::UnsealedMemory;
use devshare_common::pit::LostTickPolicy;
use devshare_common::qemu::QemuVersion;
use devshare_common::signals::{install_signal_handlers, ProcessStats, SignalActions};
use vhost_user_console::config::{
    parse_port_arg, parse_vm_arg, Config, ConfigFile, DeviceKind, SocketMode, VmFile,
};
use vhost_user_console::event_loop::run_home;
use vhost_user_console::group::{self, Group};
use vhost_user_console::qemu_args::qemu_args;
use vhost_user_console::stats::{PortReport, Report};
use vhost_user_console::vhu_console::{reactor_event, VhuConsole};

const AFTER_HELP: &str = "\
ENDPOINTS (what a port is bridged to):
  pty[:LINK]                      new PTY; its path is logged, LINK becomes a symlink to it
  unix:PATH[,mode=0600][,group=G] Unix socket listener (one client at a time); only the
                                  owner may connect unless mode=/group= say otherwise
  tcp:[ADDR:]PORT                 TCP listener, 127.0.0.1 unless ADDR (a numeric IPv4 or
                                  IPv6 address, not a host name) is given; NO ACCESS
                                  CONTROL: any local user (any host, with ADDR 0.0.0.0) who
                                  connects first gets the port; prefer unix: for consoles
  file:PATH[,timestamps][,max-size=SIZE][,keep=N]
                                  log of guest output, rotated before it grows past SIZE
                                  (default 2M; 0: never) into PATH.1 .. PATH.N (default 3)
  serial:DEV[,baud=N][,data=8][,parity=none|odd|even][,stop=1|2][,flow=none|hw|sw][,reopen=1s]
                                  a serial device (default 115200 8N1); when it goes away
                                  (unplugged) it is reopened after reopen=, then less often
  vm:OTHERVM/PORT                 a port of another VM served by this process; the other
                                  port must link back (guest-to-guest serial link)

EXAMPLES:
  One VM, console on a PTY and a named port on a Unix socket:
    vhost-user-console --socket /run/vm1.sock -p console=pty:/run/vm1.pty \\
        -p org.example.data=unix:/run/vm1-data.sock
    vhost-user-console --socket /run/vm1.sock -p console=pty -p org.example.data=unix:/run/d.sock \\
        --print-qemu-args
  Two VMs whose 'link' ports are wired to each other:
    vhost-user-console --vm a=/run/a.sock --vm b=/run/b.sock \\
        -p a/console=pty -p b/console=pty -p a/link=vm:b/link -p b/link=vm:a/link
  Any QEMU, any serial device (stream mode, guest side is ttyS0):
    vhost-user-console --vm old=/run/old.sock,stream -p old/serial=tcp:5555

The first port of a virtio VM is its console (/dev/hvc0); the others appear in the guest
as /dev/virtio-ports/NAME. Output with nothing attached is buffered (--buffer-size) and
replayed when a client attaches; a full buffer holds data ports back and makes the console
keep its newest bytes (never bytes an attached client is ready to take).

Sockets are created 0600. --socket-mode, --socket-group open the front-end (QEMU) sockets to
QEMU's group, and only those: a unix: endpoint is a guest's console, opened to others only by
its own mode=/group=; the stats socket stays 0600. A socket
another running process serves is never taken over, and a file that is not a socket is never
removed.

SIGNALS:
  SIGTERM, SIGINT  stop accepting, keep the port buffers (--state-dir: synced to disk),
                   remove this process's sockets and PTY links, exit 0
  SIGHUP           reopen every file: log (for logrotate: mv PATH PATH.1, then SIGHUP);
                   nothing else changes, no client is dropped";

/// Serve virtio-console devices (vhost-user) and serial streams to QEMU guests, bridging
/// every guest port to a host endpoint or to a port of another guest.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, after_help = AFTER_HELP)]
struct Args {
    /// TOML configuration file (see README); command-line VMs and ports are added to it. A
    /// regular file: pipes and FIFOs (`--config <(generate)`) are refused.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Serve one VM (named "vm0") on this vhost-user socket.
    #[arg(long, value_name = "PATH", conflicts_with = "vm")]
    socket: Option<PathBuf>,

    /// Connect to QEMU (which listens with server=on) instead of listening (with --socket).
    #[arg(long, requires = "socket")]
    connect: bool,

    /// A VM: NAME=SOCKET, optionally followed by ",connect" (QEMU listens) and/or ",stream"
    /// (plain bytes on -chardev socket instead of vhost-user). Repeat for several VMs.
    #[arg(long, value_name = "NAME=SOCKET[,OPTS]")]
    vm: Vec<String>,

    /// A port: [VM/]NAME=ENDPOINT (VM may be left out when there is one VM). Repeatable; the
    /// first port of a VM is its console.
    #[arg(short, long, value_name = "[VM/]NAME=ENDPOINT")]
    port: Vec<String>,

    /// Output kept per port while nothing is attached, e.g. 64K, 1M.
    #[arg(long, value_name = "SIZE")]
    buffer_size: Option<String>,

    /// Keep port buffers in files here so output survives a restart of this process.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Serve per-port counters as JSON on this Unix socket.
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,

    /// Permission bits (octal) of the front-end sockets: vhost-user and stream --vm sockets
    /// [default: 0600]. E.g. 0660 with --socket-group to let QEMU or libvirt's group connect.
    /// unix: endpoints have their own mode=/group=; the stats socket stays 0600.
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,

    /// Group (name or number; it must exist) given to the front-end sockets.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,

    /// Accept guest memory whose file can still shrink: a memfd without F_SEAL_SHRINK (QEMU's
    /// memory-backend-memfd with seal=off) or a file on tmpfs or hugetlbfs (memory-backend-file).
    /// Refused by default, because a front-end that shrinks such a file while it is mapped
    /// crashes this process (SIGBUS) and with it every guest it serves. QEMU's
    /// `-object memory-backend-memfd,...,share=on` is sealed and needs no flag.
    #[arg(long)]
    allow_unsealed_memory: bool,

    /// Print the QEMU options for each VM and exit.
    #[arg(long)]
    print_qemu_args: bool,

    /// Guest RAM size used in --print-qemu-args output, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_guest_memory)]
    memory: u64,

    /// With --print-qemu-args: also print the option that sets KVM's PIT lost-tick policy
    /// (see kvm-pit-policy).
    #[arg(long, value_name = "POLICY", value_enum)]
    pit_policy: Option<LostTickPolicy>,

    /// With --print-qemu-args: spell the options for this QEMU version (e.g. 7.2: reconnect=
    /// instead of reconnect-ms=; before 10.2 a virtio VM is refused, use stream mode)
    /// [default: 11.1, the newest tested].
    #[arg(long, value_name = "X.Y", conflicts_with = "qemu")]
    qemu_version: Option<QemuVersion>,

    /// With --print-qemu-args: take the QEMU version from `PATH --version`.
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
}

/// What the process needs besides the VMs: who may use its sockets, and where counters go.
struct ProcessConfig {
    socket: SocketOptions,
    stats_socket: Option<PathBuf>,
    unsealed_memory: UnsealedMemory,
}

impl TryFrom<&Args> for ProcessConfig {
    type Error = ConfigError;

    /// The command line wins over the config file's keys.
    fn try_from(args: &Args) -> Result<Self, Self::Error> {
        let file = args
            .config
            .as_deref()
            .map(load_toml::<ConfigFile>)
            .transpose()?;
        let key = |f: fn(&ConfigFile) -> Option<&str>| file.as_ref().and_then(f);
        Ok(ProcessConfig {
            socket: SocketOptions::parse(
                args.socket_mode
                    .as_deref()
                    .or(key(|f| f.socket_mode.as_deref())),
                args.socket_group
                    .as_deref()
                    .or(key(|f| f.socket_group.as_deref())),
            )
            .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            stats_socket: args
                .stats_socket
                .clone()
                .or_else(|| file.as_ref().and_then(|f| f.stats_socket.clone())),
            unsealed_memory: if args.allow_unsealed_memory {
                UnsealedMemory::Allow
            } else {
                UnsealedMemory::Refuse
            },
        })
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let mut file = match &args.config {
            Some(p) => load_toml::<ConfigFile>(p)?,
            None => ConfigFile {
                buffer_size: None,
                state_dir: None,
                stats_socket: None,
                socket_mode: None,
                socket_group: None,
                vms: Vec::new(),
            },
        };
        if let Some(b) = args.buffer_size {
            parse_size(&b)?;
            file.buffer_size = Some(b);
        }
        if args.state_dir.is_some() {
            file.state_dir = args.state_dir;
        }
        if let Some(socket) = args.socket {
            file.vms.push(VmFile {
                name: "vm0".into(),
                socket,
                mode: if args.connect {
                    SocketMode::Connect
                } else {
                    SocketMode::Listen
                },
                kind: DeviceKind::Virtio,
                ports: Vec::new(),
            });
        }
        for v in &args.vm {
            file.vms.push(parse_vm_arg(v)?);
        }
        for p in &args.port {
            let (vm, port) = parse_port_arg(p)?;
            let idx = match vm {
                Some(name) => file
                    .vms
                    .iter()
                    .position(|v| v.name == name)
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!("--port '{p}': no VM named '{name}'"))
                    })?,
                None if file.vms.len() == 1 => 0,
                None => {
                    return Err(ConfigError::Invalid(format!(
                        "--port '{p}': say which VM (VM/NAME=ENDPOINT) when there are several"
                    )))
                }
            };
            file.vms[idx].ports.push(port);
        }
        Config::try_from(file)
    }
}

/// SIGHUP: every `file:` log is opened again by its name, so output goes to a fresh file
/// after an external rotation (`mv PATH PATH.1`, then SIGHUP). Nothing else changes: no
/// client is dropped, no port is reset, every VM keeps being served.
fn on_reload(groups: &[Arc<Group>]) {
    let mut reopened = 0;
    for g in groups {
        let mut vms = g.lock();
        for d in &mut vms.devices {
            for port in &mut d.ports {
                let label = port.label.clone();
                let Some(ep) = port.endpoint() else { continue };
                match ep.reload() {
                    Ok(true) => reopened += 1,
                    Ok(false) => {}
                    Err(e) => log::warn!("{label}: {e}"),
                }
            }
        }
        // A log that could not be opened is retried on ticks: arm them.
        for dev in 0..vms.devices.len() {
            for p in 0..vms.devices[dev].ports.len() {
                vms.devices[dev].sync(p);
            }
        }
    }
    log::info!("SIGHUP: {reopened} log files reopened");
}

/// SIGTERM/SIGINT, after this process's sockets were removed (no new client or front-end can
/// connect) and before it exits 0: every group's lock is taken and kept until exit, so no
/// guest output is taken in that the next process would not find; each port's buffer goes to
/// its endpoint as far as that takes it without waiting, and with `--state-dir` the buffer
/// files are synced to disk; log files are synced; the PTY links this process made are
/// removed (a link that points elsewhere now is not ours and stays).
fn on_shutdown(groups: &[Arc<Group>]) {
    for g in groups {
        let mut vms = g.lock();
        for d in &mut vms.devices {
            for port in &mut d.ports {
                port.shut_down();
            }
        }
        std::mem::forget(vms);
    }
}

/// Start-up failed after the VMs were set up: what this process created goes (its sockets,
/// its PTY links; buffers are synced as on SIGTERM), since threads it started may hold the
/// groups and destructors do not run at exit.
fn abandon(groups: &[Arc<Group>]) -> ExitCode {
    devshare_common::listen::remove_created_sockets();
    on_shutdown(groups);
    // After the groups let go of them: logs and spools this start created (never older ones).
    devshare_common::files::remove_created_files();
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    // First of all: a SIGHUP or SIGTERM during start-up is held and handled once start-up is
    // done (a reload, or a shutdown that removes what start-up created), never the default
    // (death, leaving sockets behind).
    let pending_signals = match install_signal_handlers() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vhost-user-console: {e}");
            return ExitCode::FAILURE;
        }
    };
    devshare_common::init_logging();
    let args = Args::parse();
    let print = args.print_qemu_args;
    let memory = qemu_size(args.memory);
    let pit_policy = args.pit_policy;
    let (qemu_version, qemu_binary) = (args.qemu_version, args.qemu.clone());
    let loaded = ProcessConfig::try_from(&args).and_then(|p| Ok((Config::try_from(args)?, p)));
    let (cfg, process) = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-user-console: {e}");
            return ExitCode::from(2);
        }
    };
    if print {
        let qemu = match QemuVersion::chosen(qemu_version, qemu_binary.as_deref()) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("vhost-user-console: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(warning) = qemu.untested_warning() {
            eprintln!("vhost-user-console: warning: {warning}");
        }
        let mut refused = false;
        for vm in &cfg.vms {
            match qemu_args(vm, &memory, qemu) {
                Ok(lines) => {
                    let mut lines = lines;
                    if let Some(p) = pit_policy {
                        lines.push(devshare_common::pit::qemu_args(p).join(" "));
                    }
                    // The shape netmux prints: one option per line, shell continuations.
                    let text = format!("# {}\n{}\n", vm.name, lines.join(" \\\n  "));
                    if let Err(e) = devshare_common::output::print(&text) {
                        eprintln!("vhost-user-console: cannot write to stdout: {e}");
                        return ExitCode::FAILURE;
                    }
                }
                Err(e) => {
                    eprintln!("vhost-user-console: {e}");
                    refused = true;
                }
            }
        }
        return if refused {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    // Two uses of one path would fail midway with a misleading error, or write into each
    // other's files: refused before anything is created.
    if let Err(e) = vhost_user_console::paths::check_distinct(&cfg, process.stats_socket.as_deref())
    {
        eprintln!("vhost-user-console: {e}");
        return ExitCode::from(2);
    }
    // Held for the life of the process: a second instance on the same state directory would
    // corrupt the spools.
    let _state_lock = match &cfg.state_dir {
        Some(dir) => match ensure_private_dir(dir).and_then(|()| StateDirLock::acquire(dir)) {
            Ok(lock) => Some(lock),
            Err(e) => {
                eprintln!("vhost-user-console: state directory: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // Refuse a socket path another running instance serves (or a file in the way) before
    // anything is opened: a second instance must not touch the first one's endpoints.
    let listen_paths = cfg
        .vms
        .iter()
        .filter(|vm| vm.mode == SocketMode::Listen)
        .map(|vm| (vm.name.as_str(), &vm.socket))
        .chain(process.stats_socket.iter().map(|p| ("stats", p)));
    for (name, path) in listen_paths {
        if let Err(e) = devshare_common::listen::check_free(path) {
            eprintln!("vhost-user-console: {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut cfg = cfg;
    cfg.socket = process.socket;
    let (groups, vms) = match group::build(&cfg) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vhost-user-console: {e}");
            // What the endpoints and spools built so far created (a log, a spool the file
            // system had no room for) goes with them.
            devshare_common::listen::remove_created_sockets();
            devshare_common::files::remove_created_files();
            return ExitCode::FAILURE;
        }
    };
    let actions = {
        let (reload, shutdown) = (groups.clone(), groups.clone());
        SignalActions {
            on_reload: Box::new(move || on_reload(&reload)),
            on_shutdown: Box::new(move || on_shutdown(&shutdown)),
        }
    };
    if let Err(e) = pending_signals.start(actions) {
        eprintln!("vhost-user-console: {e}");
        return abandon(&groups);
    }
    if let Some(path) = process.stats_socket {
        // Counters are atomics the data path updates: reading them takes no VM's lock. The
        // document keeps the configuration's order (groups are built from it).
        let mut ports: Vec<_> = groups.iter().flat_map(|g| g.lock().stats()).collect();
        let order = |r: &PortReport| cfg.vms.iter().position(|v| v.name == r.vm);
        ports.sort_by_key(|r| order(r));
        let report = Report {
            ports,
            process: ProcessStats::current(),
        };
        let served =
            devshare_common::stats::serve_json(&path, &SocketOptions::default(), move || {
                report.to_json()
            });
        if let Err(e) = served {
            eprintln!("vhost-user-console: {e}");
            return abandon(&groups);
        }
    }
    let mut threads = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let g = g.clone();
        match thread::Builder::new()
            .name(format!("group-{i}"))
            .spawn(move || run_home(g))
        {
            Ok(h) => threads.push(h),
            Err(e) => {
                eprintln!("vhost-user-console: cannot start a thread: {e}");
                return abandon(&groups);
            }
        }
    }
    // The vhost-user sockets appear last: once a socket exists, its VM's endpoints are ready.
    let mut sockets = Vec::new();
    for vm in cfg.vms.iter().filter(|vm| vm.kind == DeviceKind::Virtio) {
        let transport = match vm.mode {
            SocketMode::Listen => Transport::Listen(vm.socket.clone()),
            SocketMode::Connect => Transport::Connect(vm.socket.clone()),
        };
        match FrontendSocket::open(&transport, &process.socket) {
            Ok(s) => sockets.push((transport, s)),
            Err(e) => {
                eprintln!("vhost-user-console: VM {}: {e}", vm.name);
                return abandon(&groups);
            }
        }
    }
    let virtio = cfg
        .vms
        .iter()
        .zip(vms)
        .filter(|(vm, _)| vm.kind == DeviceKind::Virtio);
    for ((vm, vmref), (transport, socket)) in virtio.zip(sockets) {
        let mut opts = ServeOptions::new(vm.name.clone(), transport);
        opts.unsealed_memory = process.unsealed_memory;
        // The VM's reactor joins its worker's epoll set while a front-end is connected.
        let queues =
            vhost_user_console::virtio_console::queue_count(vm.ports.len(), vm.multiport());
        opts.worker_fds = vec![(vmref.reactor_fd(), reactor_event(queues))];
        let spawned = thread::Builder::new()
            .name(devshare_common::thread_name(&format!("vm-{}", vm.name)))
            .spawn(move || {
                serve(
                    &opts,
                    &socket,
                    || VhuConsole::new(vmref.clone()).map_err(|err| err.to_string()),
                    || vmref.disconnected(),
                );
            });
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                eprintln!("vhost-user-console: cannot start a thread: {e}");
                return abandon(&groups);
            }
        }
    }
    devshare_common::files::start_up_done();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}
