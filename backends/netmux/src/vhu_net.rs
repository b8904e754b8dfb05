//! The vhost-user-net device of one guest connection: feature negotiation and the glue from
//! vhost-user events to the switch ([`Fabric::transmit`] on TX kicks; the port's receive
//! side attached once its rings and memory are known).
//!
//! A fresh [`NetBackend`] is built for every connection; what must survive a reconnect (the
//! port's counters and identity) lives in its [`Port`]. Each queue pair gets its own worker
//! thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use devshare_common::chain::MemoryAtomic;
use devshare_common::daemon::connection_start_event;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringState, VringT};
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::fabric::{Fabric, TxEnd, TxQueue};
use crate::port::{Port, RxPath, Vring};
use crate::virtio_net::{device_features, Negotiated};

/// Ring size offered to the front-end.
pub const QUEUE_SIZE: usize = 1024;

/// How long a new connection's SET_MEM_TABLE waits for the worker threads to report their
/// vrings (see [`NetBackend::update_memory`]). They do so at once unless the machine is
/// starved; past this the connection goes on and the receive side attaches when they do.
const WORKER_START_WAIT: Duration = Duration::from_secs(30);

struct Shared {
    fabric: Arc<Fabric>,
    index: usize,
    port: Arc<Port>,
    features: Arc<AtomicU64>,
    mem: Mutex<Option<MemoryAtomic>>,
    /// This connection's RX vrings by queue pair, each reported at its worker's
    /// connection-start event (a worker is handed only its own pair's vrings).
    rx_vrings: Mutex<Vec<Option<Vring>>>,
    /// Signalled whenever a worker reported its RX vring.
    rx_vrings_reported: Condvar,
    exits: Vec<(EventConsumer, EventNotifier)>,
}

/// The vhost-user backend of one connection to one guest port.
#[derive(Clone)]
pub struct NetBackend(Arc<Shared>);

impl NetBackend {
    /// A backend for a new connection to port `index` of `fabric`.
    pub fn new(fabric: Arc<Fabric>, index: usize) -> io::Result<NetBackend> {
        let port = fabric
            .port(index)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("no port {index}")))?;
        let exits = (0..port.config.queue_pairs)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let rx_vrings = Mutex::new(vec![None; usize::from(port.config.queue_pairs)]);
        Ok(NetBackend(Arc::new(Shared {
            fabric,
            index,
            port,
            features: Arc::new(AtomicU64::new(0)),
            mem: Mutex::new(None),
            rx_vrings,
            rx_vrings_reported: Condvar::new(),
            exits,
        })))
    }

    fn pairs(&self) -> usize {
        usize::from(self.0.port.config.queue_pairs)
    }

    fn memory(&self) -> Option<MemoryAtomic> {
        self.0
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Gives the port its receive side once both the vrings and the guest memory are known.
    fn attach_rx(&self) {
        // Runs at every ring event: once attached, nothing below is done.
        self.0.port.ensure_attached(|| {
            let mem = self.memory()?;
            let rx = self
                .0
                .rx_vrings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned()
                .collect::<Option<Vec<Vring>>>()?;
            Some(RxPath::new(rx, mem, self.0.features.clone()))
        });
    }

    /// Waits until every worker thread has reported its RX vring (bounded).
    fn wait_for_workers(&self) {
        let slots = self
            .0
            .rx_vrings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (slots, waited) = self
            .0
            .rx_vrings_reported
            .wait_timeout_while(slots, WORKER_START_WAIT, |s| s.iter().any(Option::is_none))
            .unwrap_or_else(PoisonError::into_inner);
        if waited.timed_out() && slots.iter().any(Option::is_none) {
            log::warn!(
                "{}: worker threads have not started after {} s; frames for this guest are \
                 dropped until they do",
                self.0.port.config.name,
                WORKER_START_WAIT.as_secs()
            );
        }
    }

    /// One TX pass over queue pair `pair`'s TX vring.
    fn transmit(&self, pair: usize, vring: &Vring) -> TxEnd {
        let Some(atomic) = self.memory() else {
            return TxEnd::Idle;
        };
        let mem = atomic.memory();
        let hdr_len = Negotiated(self.0.features.load(Ordering::Acquire)).hdr_len();
        let mut state = vring.get_mut();
        self.0.fabric.transmit(
            self.0.index,
            pair,
            hdr_len,
            &mem,
            vring.signalled(),
            &mut *state,
        )
    }
}

impl TxQueue for VringState<MemoryAtomic> {
    fn queue_mut(&mut self) -> &mut Queue {
        self.get_queue_mut()
    }

    fn interrupt(&mut self) {
        let _ = self.signal_used_queue();
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.pairs()
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device_features(self.0.port.config.queue_pairs)
    }

    fn acked_features(&self, features: u64) {
        self.0.features.store(features, Ordering::Release);
    }

    /// Only what this device uses: MQ (GET_QUEUE_NUM, answered in queue pairs by the daemon's
    /// relay, see `crate::run`) and REPLY_ACK. Not CONFIG: QEMU's vhost-user-net takes the
    /// configuration space (MAC, MTU) from its own `-device` options and warns about a
    /// back-end that offers it.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.0.port.detach();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    /// Takes the guest's memory and attaches the port's receive side. On a new connection
    /// this first waits for the worker threads to report their vrings: so once SET_MEM_TABLE
    /// is answered, frames for this guest land as soon as its RX ring runs. (Without the wait
    /// a worker thread scheduled late, on a busy host, made the first frames after the guest
    /// enabled its rings count as `rx_down`.) The connection-start events the workers wait
    /// for are sent before any front-end message is relayed (see
    /// `devshare_common::daemon`), so this cannot wait on itself.
    fn update_memory(&self, mem: MemoryAtomic) -> io::Result<()> {
        *self.0.mem.lock().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        self.0.port.mark_connected();
        self.wait_for_workers();
        self.attach_rx();
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs()).map(|p| 0b11u64 << (2 * p)).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.0.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Worker `thread_id` serves queue pair `thread_id` (see `queues_per_thread`) and is
        // handed that pair's vrings only: [RX, TX], indexed by `device_event`.
        let pair = thread_id;
        if device_event == connection_start_event(self.num_queues()) {
            let mut slots = self
                .0
                .rx_vrings
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let (Some(rx), Some(slot)) = (vrings.first(), slots.get_mut(pair)) {
                *slot = Some(rx.clone());
            }
            drop(slots);
            self.0.rx_vrings_reported.notify_all();
            self.attach_rx();
            return Ok(());
        }
        let q = usize::from(device_event);
        if q >= vrings.len() {
            return Ok(());
        }
        // After a device reset the receive side is attached again at the next ring event.
        self.attach_rx();
        if q == 1 && self.transmit(pair, &vrings[1]) == TxEnd::Yielded {
            // The pass stopped at its budget: come back after whatever else is waiting.
            if let Err(e) = kick(&vrings[1]) {
                log::warn!("{}: cannot re-kick TX queue: {e}", self.0.port.config.name);
            }
        }
        // An RX kick only means new buffers: frames are never queued here waiting for them.
        Ok(())
    }
}

/// Kicks `vring` as the guest would: its worker's event loop calls the backend for it again,
/// after the other events that are ready.
fn kick(vring: &Vring) -> io::Result<()> {
    let state = vring.get_ref();
    let Some(kick) = state.get_kick() else {
        return Ok(());
    };
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes the 8 bytes of a live array to the kick eventfd, which stays open while
    // the vring's lock (`state`) is held; an eventfd takes exactly this write.
    let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
