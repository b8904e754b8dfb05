//! The vhost-user control channel: what QEMU says to a backend over its Unix socket.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::memory::GuestRam;
use super::queue::{DriverQueue, QueueConfig};
use super::Error;

/// How long [`Connection::connect`] keeps retrying while the backend's socket is not there yet.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Entries per indirect table that [`Connection::start_queue`] sets up when INDIRECT_DESC is on.
pub const DEFAULT_INDIRECT_MAX: u16 = 32;

/// Queue indices the vhost crate lets through before GET_QUEUE_NUM narrows it: generous, so a
/// test can address queues the device does not have.
const UNCHECKED_QUEUE_LIMIT: u64 = 256;

/// Feature bit: the transport speaks vhost-user protocol features (bit 30).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// What [`Connection::handshake`] agreed with the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Feature bits the backend offered (GET_FEATURES).
    pub device_features: u64,
    /// Feature bits sent with SET_FEATURES (wanted & offered).
    pub acked_features: u64,
    /// Protocol features the backend offered, if it offered protocol features at all.
    pub device_protocol: Option<VhostUserProtocolFeatures>,
    /// Protocol features sent with SET_PROTOCOL_FEATURES.
    pub acked_protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM's answer, when MQ was negotiated.
    pub queue_num: Option<u64>,
}

impl Negotiated {
    /// Whether feature bit number `bit` was acked (e.g. `VIRTIO_RING_F_EVENT_IDX`).
    pub fn has(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1u64 << bit) != 0
    }
}

/// One vhost-user connection to a backend, as the VMM holds it.
///
/// Each request method sends one message (and waits for the reply or, with REPLY_ACK, the
/// ack). [`handshake`](Self::handshake), [`start_queue`](Self::start_queue) and
/// [`attach_queue`](Self::attach_queue) bundle the sequences QEMU uses.
pub struct Connection {
    frontend: Frontend,
    /// Cleared by a successful handshake-time SET_FEATURES; SET_VRING_ENABLE needs it.
    protocol_features_acked: bool,
    acked_features: u64,
    /// The device answers GET_QUEUE_NUM in queue pairs (see
    /// [`Connection::device_counts_queue_pairs`]).
    queue_num_in_pairs: bool,
}

impl Connection {
    /// Connect to a backend listening on `path`, retrying for [`DEFAULT_CONNECT_TIMEOUT`] while
    /// the socket does not exist yet or refuses.
    pub fn connect(path: impl AsRef<Path>) -> Result<Connection, Error> {
        Connection::connect_timeout(path, DEFAULT_CONNECT_TIMEOUT)
    }

    /// Like [`connect`](Self::connect) with a chosen retry window.
    pub fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Connection, Error> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(Connection::from_stream(stream)),
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(Error::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }

    /// Wrap an already connected socket (e.g. one end of a `UnixStream::pair`).
    pub fn from_stream(stream: UnixStream) -> Connection {
        Connection {
            frontend: Frontend::from_stream(stream, UNCHECKED_QUEUE_LIMIT),
            protocol_features_acked: false,
            acked_features: 0,
            queue_num_in_pairs: false,
        }
    }

    /// Reads GET_QUEUE_NUM as a count of queue pairs, as QEMU's vhost-user-net does (a
    /// virtio-net device has an RX and a TX queue per pair). The vhost crate lets only queue
    /// indices below the answer through; after GET_QUEUE_NUM [`handshake`](Self::handshake)
    /// then goes on over a fresh endpoint on the same socket, repeating GET_FEATURES and the
    /// protocol-feature exchange as QEMU does for each queue pair, with indices up to twice
    /// the answer allowed.
    pub fn device_counts_queue_pairs(&mut self) {
        self.queue_num_in_pairs = true;
    }

    /// The vhost crate's frontend, for messages this type does not wrap (RESET_OWNER,
    /// GET_INFLIGHT_FD, ...).
    pub fn frontend_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// The QEMU start-up sequence: GET_FEATURES; if offered and wanted, GET_PROTOCOL_FEATURES
    /// and SET_PROTOCOL_FEATURES (wanted & offered), GET_QUEUE_NUM when MQ is agreed; SET_OWNER;
    /// SET_FEATURES (wanted & offered). With REPLY_ACK agreed, every later request asks for an
    /// ack so a backend's refusal shows up as an error.
    ///
    /// `features` should include `VIRTIO_F_VERSION_1` and [`VHOST_USER_F_PROTOCOL_FEATURES`].
    pub fn handshake(
        &mut self,
        features: u64,
        protocol: VhostUserProtocolFeatures,
    ) -> Result<Negotiated, Error> {
        let device_features = self.get_features()?;
        let acked_features = features & device_features;
        let mut device_protocol = None;
        let mut acked_protocol = VhostUserProtocolFeatures::empty();
        let mut queue_num = None;
        if acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = self.get_protocol_features()?;
            device_protocol = Some(offered);
            acked_protocol = protocol & offered;
            self.set_protocol_features(acked_protocol)?;
            if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = self.get_queue_num()?;
                queue_num = Some(n);
                if self.queue_num_in_pairs {
                    self.reopen_endpoint(2 * n)?;
                    self.get_features()?;
                    self.get_protocol_features()?;
                    self.set_protocol_features(acked_protocol)?;
                }
            }
        }
        self.set_owner()?;
        self.set_features(acked_features)?;
        Ok(Negotiated {
            device_features,
            acked_features,
            device_protocol,
            acked_protocol,
            queue_num,
        })
    }

    /// Replaces the vhost crate's endpoint by a fresh one on the same socket that lets queue
    /// indices below `queue_limit` through (its negotiation state starts empty).
    fn reopen_endpoint(&mut self, queue_limit: u64) -> Result<(), Error> {
        // SAFETY: dup() of the open socket descriptor the endpoint owns; the result is checked.
        let fd = unsafe { libc::dup(self.frontend.as_raw_fd()) };
        if fd < 0 {
            return Err(Error::DupSocket(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor of a connected Unix stream socket, owned by no one
        // else.
        let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        self.frontend = Frontend::from_stream(stream, queue_limit);
        Ok(())
    }

    /// GET_FEATURES.
    pub fn get_features(&mut self) -> Result<u64, Error> {
        self.frontend.get_features().map_err(req("GET_FEATURES"))
    }

    /// SET_FEATURES with exactly `features` (nothing is masked: a test may ack what was not
    /// offered).
    pub fn set_features(&mut self, features: u64) -> Result<(), Error> {
        self.frontend
            .set_features(features)
            .map_err(req("SET_FEATURES"))?;
        self.acked_features = features;
        self.protocol_features_acked = features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        Ok(())
    }

    /// GET_PROTOCOL_FEATURES (needs GET_FEATURES first, offering protocol features).
    pub fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures, Error> {
        self.frontend
            .get_protocol_features()
            .map_err(req("GET_PROTOCOL_FEATURES"))
    }

    /// SET_PROTOCOL_FEATURES; turns on NEED_REPLY for later requests if REPLY_ACK is in it.
    pub fn set_protocol_features(
        &mut self,
        features: VhostUserProtocolFeatures,
    ) -> Result<(), Error> {
        self.frontend
            .set_protocol_features(features)
            .map_err(req("SET_PROTOCOL_FEATURES"))?;
        if features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        } else {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        Ok(())
    }

    /// GET_QUEUE_NUM (needs MQ). Afterwards queue indices at or above the answer are refused
    /// locally.
    pub fn get_queue_num(&mut self) -> Result<u64, Error> {
        self.frontend.get_queue_num().map_err(req("GET_QUEUE_NUM"))
    }

    /// SET_OWNER.
    pub fn set_owner(&mut self) -> Result<(), Error> {
        self.frontend.set_owner().map_err(req("SET_OWNER"))
    }

    /// RESET_OWNER (deprecated in the spec, still sent by some VMMs).
    pub fn reset_owner(&mut self) -> Result<(), Error> {
        self.frontend.reset_owner().map_err(req("RESET_OWNER"))
    }

    /// GET_CONFIG of `size` bytes at `offset` (needs the CONFIG protocol feature).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, Error> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .map_err(req("GET_CONFIG"))?;
        Ok(payload)
    }

    /// SET_CONFIG of `data` at `offset` (needs the CONFIG protocol feature).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), Error> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(req("SET_CONFIG"))
    }

    /// SET_MEM_TABLE with all of `ram`'s regions (their memfds go along as SCM_RIGHTS).
    pub fn set_mem_table(&mut self, ram: &GuestRam) -> Result<(), Error> {
        let regions = ram.region_infos()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(req("SET_MEM_TABLE"))?;
        Ok(())
    }

    /// SET_MEM_TABLE as a broken or hostile front-end might send it: region `index` of `ram`
    /// declared `extra` bytes larger than the memfd behind it, so its end lies past the end of
    /// the file (a backend that maps it dies of SIGBUS on the first access there). The guest
    /// addresses `[end of region, end + extra)` are then "in" the region for the backend only.
    pub fn set_mem_table_oversized(
        &mut self,
        ram: &GuestRam,
        index: usize,
        extra: u64,
    ) -> Result<(), Error> {
        let mut regions = ram.region_infos()?;
        let region = regions
            .get_mut(index)
            .ok_or_else(|| Error::MemoryLayout(format!("no region {index} to make oversized")))?;
        region.memory_size += extra;
        self.frontend
            .set_mem_table(&regions)
            .map_err(req("SET_MEM_TABLE"))?;
        Ok(())
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&mut self, index: u16, num: u16) -> Result<(), Error> {
        self.frontend
            .set_vring_num(usize::from(index), num)
            .map_err(req("SET_VRING_NUM"))
    }

    /// SET_VRING_BASE (the avail index the device starts from).
    pub fn set_vring_base(&mut self, index: u16, base: u16) -> Result<(), Error> {
        self.frontend
            .set_vring_base(usize::from(index), base)
            .map_err(req("SET_VRING_BASE"))
    }

    /// SET_VRING_ADDR with guest-physical addresses translated to this process's mapping, as
    /// QEMU sends its own virtual addresses. Any address inside `ram` may be given.
    pub fn set_vring_addr(
        &mut self,
        ram: &GuestRam,
        index: u16,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), Error> {
        let va = |gpa: u64| ram.host_ptr(gpa, 1).map(|p| p as u64);
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: va(desc)?,
            used_ring_addr: va(used)?,
            avail_ring_addr: va(avail)?,
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(usize::from(index), &config)
            .map_err(req("SET_VRING_ADDR"))
    }

    /// SET_VRING_KICK with this queue's kick eventfd.
    pub fn set_vring_kick(&mut self, queue: &DriverQueue) -> Result<(), Error> {
        self.frontend
            .set_vring_kick(usize::from(queue.index()), queue.kick_fd())
            .map_err(req("SET_VRING_KICK"))
    }

    /// SET_VRING_CALL with this queue's call eventfd.
    pub fn set_vring_call(&mut self, queue: &DriverQueue) -> Result<(), Error> {
        self.frontend
            .set_vring_call(usize::from(queue.index()), queue.call_fd())
            .map_err(req("SET_VRING_CALL"))
    }

    /// SET_VRING_ENABLE (only valid once VHOST_USER_F_PROTOCOL_FEATURES was acked).
    pub fn set_vring_enable(&mut self, index: u16, enable: bool) -> Result<(), Error> {
        self.frontend
            .set_vring_enable(usize::from(index), enable)
            .map_err(req("SET_VRING_ENABLE"))
    }

    /// GET_VRING_BASE: stops the queue in the backend and returns its next avail index.
    pub fn get_vring_base(&mut self, index: u16) -> Result<u16, Error> {
        let base = self
            .frontend
            .get_vring_base(usize::from(index))
            .map_err(req("GET_VRING_BASE"))?;
        // The spec's vring state is 32 bits; split rings only use the low 16.
        Ok(base as u16)
    }

    /// Build a queue in `ram` matching the negotiated features (EVENT_IDX; INDIRECT_DESC with
    /// [`DEFAULT_INDIRECT_MAX`] entries) and [`attach`](Self::attach_queue) it.
    pub fn start_queue(
        &mut self,
        ram: &GuestRam,
        index: u16,
        size: u16,
    ) -> Result<DriverQueue, Error> {
        let indirect = self.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        let cfg = QueueConfig {
            index,
            size,
            event_idx: self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            indirect_max: if indirect { DEFAULT_INDIRECT_MAX } else { 0 },
        };
        let mut queue = DriverQueue::new(ram, cfg)?;
        self.attach_queue(&mut queue)?;
        Ok(queue)
    }

    /// Hand an existing queue to the backend, in QEMU's order: SET_VRING_NUM, SET_VRING_BASE
    /// ([`DriverQueue::resume_base`]), SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, and
    /// SET_VRING_ENABLE(1) if protocol features were acked. Used for a new queue and for
    /// resuming one on a new connection after a reconnect (SET_MEM_TABLE first).
    pub fn attach_queue(&mut self, queue: &mut DriverQueue) -> Result<(), Error> {
        let index = queue.index();
        let layout = queue.layout();
        self.set_vring_num(index, queue.size())?;
        self.set_vring_base(index, queue.resume_base())?;
        let ram = queue.ram().clone();
        self.set_vring_addr(
            &ram,
            index,
            queue.size(),
            layout.desc,
            layout.avail,
            layout.used,
        )?;
        self.set_vring_kick(queue)?;
        self.set_vring_call(queue)?;
        if self.protocol_features_acked {
            self.set_vring_enable(index, true)?;
        }
        queue.set_stopped_base(None);
        Ok(())
    }

    /// Stop a queue as QEMU does when the VM stops: GET_VRING_BASE. The answer is kept in the
    /// queue for [`attach_queue`](Self::attach_queue) after a reconnect, and returned.
    pub fn stop_queue(&mut self, queue: &mut DriverQueue) -> Result<u16, Error> {
        let base = self.get_vring_base(queue.index())?;
        queue.set_stopped_base(Some(base));
        Ok(base)
    }

    /// Close the connection (shut the socket down both ways, so the backend sees EOF at once).
    /// Stop the queues first with [`stop_queue`](Self::stop_queue) for a clean, QEMU-like
    /// shutdown; dropping a `Connection` also closes it.
    pub fn disconnect(self) {
        let fd = self.frontend.as_raw_fd();
        // SAFETY: fd is the connection's socket, open as long as self (dropped right after);
        // shutdown() does not close it or touch memory.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// The harness listening for a backend that connects to it (a backend's client mode, like
/// QEMU's `-chardev socket,server=on`). Removes the socket file when dropped.
pub struct FrontendListener {
    listener: UnixListener,
    path: PathBuf,
}

impl FrontendListener {
    /// Listen on `path` (a stale socket file there is removed first).
    pub fn bind(path: impl AsRef<Path>) -> Result<FrontendListener, Error> {
        let path = path.as_ref().to_path_buf();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| Error::Listen {
            path: path.clone(),
            source,
        })?;
        Ok(FrontendListener { listener, path })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait up to `timeout` for a backend to connect.
    pub fn accept(&self, timeout: Duration) -> Result<Connection, Error> {
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::AcceptTimeout {
                    path: self.path.clone(),
                    timeout,
                });
            }
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: pfd is a valid pollfd array of length 1 that outlives the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Listen {
                    path: self.path.clone(),
                    source: e,
                });
            }
            if r > 0 {
                let (stream, _) = self.listener.accept().map_err(|source| Error::Listen {
                    path: self.path.clone(),
                    source,
                })?;
                return Ok(Connection::from_stream(stream));
            }
        }
    }
}

impl Drop for FrontendListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn req(request: &'static str) -> impl Fn(vhost::Error) -> Error {
    move |source| Error::Request { request, source }
}
