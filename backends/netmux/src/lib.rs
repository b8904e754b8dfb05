//! vhost-user-netmux: one process that serves several guests, each on its own vhost-user-net
//! socket, and switches their frames to and from one host link (the uplink).
//!
//! Layout: [`config`] (what to serve), [`switch`] (where a frame goes, pure logic),
//! [`virtio_net`] (wire formats and offload rules), [`frame`] (a frame in flight and the host
//! copy of its headers), [`port`] (a guest port and its RX side), [`uplink`] (AF_PACKET and
//! TAP links), [`fabric`] (the running switch: TX passes and link receive), [`stats`]
//! (counters and the stats document), [`vhu_net`] (the vhost-user device of one connection).

pub mod config;
pub mod fabric;
pub mod frame;
pub mod port;
pub mod stats;
pub mod switch;
#[cfg(test)]
mod testing;
pub mod uplink;
pub mod vhu_net;
pub mod virtio_net;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use devshare_common::daemon::ServeOptions;
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
    #[error("cannot serve statistics on {path}: {source}")]
    Stats {
        /// Socket path.
        path: std::path::PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
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
        UplinkSpec::Tap(n) => Box::new(Tap::open(n)?),
    })
}

/// Opens the host port's TAP and finds the MAC the host's stack uses on it. Refuses a MAC an
/// untagged guest has (the kernel's pick is only known here; a configured one was checked by
/// [`Config::validate`] already).
pub fn open_host_port(
    config: &Config,
    spec: &HostPortConfig,
) -> Result<(Tap, MacAddr), NetmuxError> {
    let err = |reason: String| NetmuxError::HostPort {
        name: spec.name.clone(),
        reason,
    };
    let tap = Tap::open_with_mac(&spec.name, spec.mac).map_err(|e| err(e.to_string()))?;
    let mac = tap
        .mac()
        .map_err(|e| err(format!("cannot read its MAC: {e}")))?;
    if let Some(p) = config.untagged_port_with(mac) {
        return Err(err(format!("its MAC {mac} is port {}'s", p.name)));
    }
    Ok((tap, mac))
}

/// Runs the switch until the process is killed: the uplink receive thread, the stats socket
/// and one vhost-user daemon per guest port. Returns only if a port's socket cannot be served.
pub fn run(config: Config) -> Result<(), NetmuxError> {
    let uplink = open_uplink(&config.uplink)?;
    log::info!(
        "uplink {}, {} port(s), {:?} mode, anti-spoofing {}",
        uplink.describe(),
        config.ports.len(),
        config.mode,
        if config.anti_spoof { "on" } else { "off" }
    );
    let host = match &config.host_port {
        Some(spec) => {
            let (tap, mac) = open_host_port(&config, spec)?;
            log::info!("host port {} (host MAC {mac})", tap.describe());
            Some((Box::new(tap) as Box<dyn Uplink>, mac))
        }
        None => None,
    };
    let fabric = Arc::new(Fabric::new(&config, uplink, host));
    if let Some(path) = &config.stats_socket {
        let f = fabric.clone();
        devshare_common::stats::serve_json(path, move || f.stats_json()).map_err(|source| {
            NetmuxError::Stats {
                path: path.clone(),
                source,
            }
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
    let mut workers = Vec::new();
    for (i, pc) in config.ports.iter().enumerate() {
        let f = fabric.clone();
        let mut opts = ServeOptions::new(pc.name.clone(), pc.transport.clone());
        // QEMU's vhost-user-net counts queue pairs here, and refuses a netdev asking for
        // more with an error that says so.
        opts.queue_num = Some(u64::from(pc.queue_pairs));
        let handle = thread::Builder::new()
            .name(format!("port-{}", pc.name))
            .spawn(move || serve_port(&f, i, &opts))
            .map_err(NetmuxError::Thread)?;
        workers.push(handle);
    }
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => log::error!("a port thread panicked"),
        }
    }
    Ok(())
}

/// Serves one port's socket for good. A failure to listen at all is returned; anything else
/// is logged and retried, so one port's trouble never stops the others.
fn serve_port(fabric: &Arc<Fabric>, index: usize, opts: &ServeOptions) -> Result<(), NetmuxError> {
    let Some(port) = fabric.port(index).cloned() else {
        return Ok(());
    };
    loop {
        let res = serve(
            opts,
            || NetBackend::new(fabric.clone(), index).map_err(|e| e.to_string()),
            || {
                port.mark_disconnected();
                log::info!("{}: guest gone; other ports unaffected", port.config.name);
            },
        );
        match res {
            Ok(()) => return Ok(()),
            Err(e @ DaemonError::Listen { .. }) => {
                return Err(NetmuxError::Port {
                    port: port.config.name.clone(),
                    source: e,
                })
            }
            Err(e) => {
                log::error!("{}: {e}; serving again in 1 s", port.config.name);
                port.mark_disconnected();
                thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
