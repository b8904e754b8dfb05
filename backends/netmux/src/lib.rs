//! vhost-user-netmux: one process that serves several guests, each on its own vhost-user-net
//! socket, and switches their frames to and from one host link (the uplink).
//!
//! Layout: [`config`] (what to serve), [`switch`] (where a frame goes, pure logic),
//! [`virtio_net`] (wire formats and offload rules), [`frame`] (a frame in flight and the host
//! copy of its headers), [`port`] (a guest port and its RX side), [`uplink`] (AF_PACKET and
//! TAP links), [`fabric`] (the running switch: TX passes and link receive), [`stats`]
//! (counters and the stats document), [`vhu_net`] (the vhost-user device of one connection),
//! [`qemu_args`] (the QEMU options of a port).

pub mod config;
pub mod fabric;
pub mod frame;
pub mod port;
pub mod qemu_args;
pub mod stats;
pub mod switch;
#[cfg(test)]
mod testing;
pub mod uplink;
pub mod vhu_net;
pub mod virtio_net;

use std::sync::Arc;
use std::thread;

use devshare_common::daemon::{FrontendSocket, ServeOptions, Transport};
use devshare_common::listen::check_free;
use devshare_common::signals::ProcessStats;
use devshare_common::stats::StatsError;
use vmm_sys_util::eventfd::EventFd;

use crate::fabric::Link;

use crate::config::{Config, HostPortConfig, MacAddr, UplinkSpec};
use crate::fabric::Fabric;
use crate::uplink::{AfPacket, Tap, Uplink, UplinkError};
use crate::vhu_net::NetBackend;
use devshare_common::daemon::{serve, DaemonError};

/// Why the switch could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetmuxError {
    /// The uplink could not be opened.
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    /// The host port could not be set up.
    #[error("host port {name}: {reason}")]
    HostPort {
        /// TAP name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// The stats socket could not be created.
    #[error("cannot serve statistics: {0}")]
    Stats(#[from] devshare_common::stats::StatsError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// A guest port was given the uplink interface's own MAC: the frames for this host would
    /// reach that guest too.
    #[error(
        "port {port}: MAC {mac} is the uplink {uplink}'s own (frames for this host would reach \
         the guest); give the guest another one"
    )]
    PortHasUplinkMac {
        /// Port name.
        port: String,
        /// The MAC both have.
        mac: MacAddr,
        /// The uplink interface.
        uplink: String,
    },
    /// A port's socket could not be served.
    #[error("port {port}: {source}")]
    Port {
        /// Port name.
        port: String,
        /// Underlying error.
        source: DaemonError,
    },
}

/// Opens the configured uplink.
pub fn open_uplink(spec: &UplinkSpec) -> Result<Box<dyn Uplink>, UplinkError> {
    Ok(match spec {
        UplinkSpec::AfPacket(i) => Box::new(AfPacket::open(i)?),
        UplinkSpec::Tap(n) => {
            if !may_be_tap(n) {
                return Err(UplinkError::Setup {
                    name: n.clone(),
                    what: "the interface exists and is not a TAP device (use af-packet: for it)",
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                });
            }
            Box::new(Tap::open(n)?)
        }
    })
}

/// False when `name` is an existing interface that is not a TUN/TAP device (the kernel would
/// refuse TUNSETIFF with a bare EINVAL): only those have `tun_flags` in sysfs.
fn may_be_tap(name: &str) -> bool {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    !dir.exists() || dir.join("tun_flags").exists()
}

/// Opens the host port's TAP and finds the MAC the host's stack uses on it. Refuses a MAC a
/// guest has (the kernel's pick is only known here; a configured one was checked by
/// [`Config::validate`] already) or the uplink's interface has (`uplink_mac`): guests' frames
/// for the uplink host's own address would go to the TAP instead.
pub fn open_host_port(
    config: &Config,
    spec: &HostPortConfig,
    uplink_mac: Option<MacAddr>,
) -> Result<(Tap, MacAddr), NetmuxError> {
    let err = |reason: String| NetmuxError::HostPort {
        name: spec.name.clone(),
        reason,
    };
    if let (Some(mac), Some(up)) = (spec.mac, uplink_mac) {
        if mac == up {
            return Err(err(format!(
                "MAC {mac} is the uplink {}'s own; give the host port another one",
                config.uplink.ifname()
            )));
        }
    }
    if !may_be_tap(&spec.name) {
        return Err(err(
            "an interface of that name exists and is not a TAP device".into(),
        ));
    }
    let tap = Tap::open_with_mac(&spec.name, spec.mac).map_err(|e| err(e.to_string()))?;
    let mac = tap
        .mac()
        .map_err(|e| err(format!("cannot read its MAC: {e}")))?;
    if let Some(p) = config.port_with(mac) {
        return Err(err(format!("its MAC {mac} is port {}'s", p.name)));
    }
    if uplink_mac == Some(mac) {
        return Err(err(format!(
            "its MAC {mac} is the uplink {}'s own",
            config.uplink.ifname()
        )));
    }
    Ok((tap, mac))
}

/// Runs the switch until the process is stopped (SIGTERM/SIGINT, handled by
/// `devshare_common::signals`): the uplink receive thread, the stats socket and one vhost-user
/// daemon per guest port. Every socket path is checked first, so a port socket that another
/// running netmux serves (or a file in the way) stops this one before it touches the uplink.
pub fn run(config: Config) -> Result<(), NetmuxError> {
    for pc in &config.ports {
        if let Transport::Listen(path) = &pc.transport {
            check_free(path).map_err(|e| NetmuxError::Port {
                port: pc.name.clone(),
                source: e.into(),
            })?;
        }
    }
    if let Some(path) = &config.stats_socket {
        check_free(path).map_err(StatsError::from)?;
    }
    let uplink = open_uplink(&config.uplink)?;
    log::info!(
        "uplink {}, {} port(s), {:?} mode, anti-spoofing {}",
        uplink.describe(),
        config.ports.len(),
        config.mode,
        if config.anti_spoof { "on" } else { "off" }
    );
    // An uplink that cannot tell its MAC (none is known to fail) is not refused for it.
    let uplink_mac = uplink.hw_addr().ok();
    if let Some(p) = uplink_mac.and_then(|mac| config.port_with(mac)) {
        return Err(NetmuxError::PortHasUplinkMac {
            port: p.name.clone(),
            mac: p.mac,
            uplink: config.uplink.ifname().to_string(),
        });
    }
    let host = match &config.host_port {
        Some(spec) => {
            let (tap, mac) = open_host_port(&config, spec, uplink_mac)?;
            log::info!("host port {} (host MAC {mac})", tap.describe());
            Some((Box::new(tap) as Box<dyn Uplink>, mac))
        }
        None => None,
    };
    let fabric = Arc::new(Fabric::new(&config, uplink, host));
    if let Some(path) = &config.stats_socket {
        let f = fabric.clone();
        // The counters are the operator's: 0600, whatever the port sockets are opened to.
        let private = devshare_common::listen::SocketOptions::default();
        devshare_common::stats::serve_json(path, &private, move || {
            let mut doc = serde_json::to_value(f.stats()).unwrap_or_default();
            if let Some(obj) = doc.as_object_mut() {
                obj.insert(
                    "process".into(),
                    serde_json::to_value(ProcessStats::current()).unwrap_or_default(),
                );
            }
            doc.to_string()
        })?;
    }
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(NetmuxError::Thread)?;
    for link in fabric.links() {
        let name = match link {
            Link::Uplink => "uplink-rx",
            Link::Host => "host-rx",
        };
        let f = fabric.clone();
        let stop = stop.try_clone().map_err(NetmuxError::Thread)?;
        thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = f.run_link_rx(link, &stop) {
                    log::error!("{name} thread stopped: {e}");
                }
            })
            .map_err(NetmuxError::Thread)?;
    }
    // The port sockets appear last: once a socket exists, the switch is ready for its guest.
    let mut sockets = Vec::new();
    for pc in &config.ports {
        let socket = FrontendSocket::open(&pc.transport, &config.socket).map_err(|source| {
            NetmuxError::Port {
                port: pc.name.clone(),
                source,
            }
        })?;
        sockets.push(socket);
    }
    let mut workers = Vec::new();
    for (i, (pc, socket)) in config.ports.iter().zip(sockets).enumerate() {
        let f = fabric.clone();
        let mut opts = ServeOptions::new(pc.name.clone(), pc.transport.clone());
        // QEMU's vhost-user-net counts queue pairs here, and refuses a netdev asking for
        // more with an error that says so.
        opts.queue_num = Some(u64::from(pc.queue_pairs));
        opts.unsealed_memory = config.unsealed_memory;
        let handle = thread::Builder::new()
            .name(devshare_common::thread_name(&format!("port-{}", pc.name)))
            .spawn(move || serve_port(&f, i, &opts, &socket))
            .map_err(NetmuxError::Thread)?;
        workers.push(handle);
    }
    for w in workers {
        if w.join().is_err() {
            log::error!("a port thread panicked");
        }
    }
    Ok(())
}

/// Serves one port's socket for good: failures are logged and retried with a bounded
/// back-off by [`serve`], so one port's trouble never stops the others.
fn serve_port(fabric: &Arc<Fabric>, index: usize, opts: &ServeOptions, socket: &FrontendSocket) {
    let Some(port) = fabric.port(index).cloned() else {
        return;
    };
    serve(
        opts,
        socket,
        || NetBackend::new(fabric.clone(), index).map_err(|e| e.to_string()),
        || {
            port.mark_disconnected();
            log::info!("{}: guest gone; other ports unaffected", port.config.name);
        },
    );
}
