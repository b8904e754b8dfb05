//! The vhost-user-net device of one guest connection: feature negotiation, configuration space,
//! and the TX worker that takes frames from the guest's rings and hands them to the switch.
//!
//! A fresh [`NetBackend`] is built for every connection; what must survive a reconnect (the
//! port's counters and identity) lives in its [`Port`]. Each queue pair gets its own worker
//! thread.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devshare_common::chain::{GuestBuffers, MemoryAtomic};
use devshare_common::daemon::connection_start_event;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::fabric::{Fabric, LocalBatch, Outbox};
use crate::port::{Port, RxPath, Vring};
use crate::virtio_net::{config_space, device_features, Negotiated};
use devshare_common::ring::Ring;

/// Ring size offered to the front-end.
pub const QUEUE_SIZE: usize = 1024;
/// Frames taken from a TX ring before the batch is sent and completed.
const TX_BATCH: usize = 64;

struct Shared {
    fabric: Arc<Fabric>,
    port: Arc<Port>,
    features: Arc<AtomicU64>,
    mem: Mutex<Option<MemoryAtomic>>,
    /// This connection's RX vrings by queue pair, each seen at its worker's connection-start
    /// event (a worker is handed only its own pair's vrings).
    rx_vrings: Mutex<Vec<Option<Vring>>>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    mtu: u16,
}

/// The vhost-user backend of one connection to one guest port.
#[derive(Clone)]
pub struct NetBackend(Arc<Shared>);

impl NetBackend {
    /// A backend for a new connection to `fabric.ports[port]`.
    pub fn new(fabric: Arc<Fabric>, port: usize, mtu: u16) -> io::Result<NetBackend> {
        let port = fabric
            .ports
            .get(port)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("no port {port}")))?;
        let exits = (0..port.config.queue_pairs)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let rx_vrings = Mutex::new(vec![None; usize::from(port.config.queue_pairs)]);
        Ok(NetBackend(Arc::new(Shared {
            fabric,
            port,
            features: Arc::new(AtomicU64::new(0)),
            mem: Mutex::new(None),
            rx_vrings,
            exits,
            mtu,
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

    /// Gives the port its receive side once both the vrings and the guest memory are known, so
    /// frames for this guest land as soon as its RX ring runs (not only after its first kick).
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

    /// Takes every frame the guest queued on TX virtqueue `vring` (queue pair `pair`).
    fn process_tx(&self, pair: usize, vring: &Vring) -> io::Result<()> {
        let Some(atomic) = self.memory() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let hdr_len = Negotiated(self.0.features.load(Ordering::Acquire)).hdr_len();
        let fabric = &self.0.fabric;
        let port = &self.0.port;
        let mut outbox = Outbox::default();
        // Parsed chains borrow `mem`; kept until the batch is forwarded, then completed.
        let mut parsed: Vec<GuestBuffers<'_>> = Vec::with_capacity(TX_BATCH);
        let mut heads = [0u16; TX_BATCH];
        let mut state = vring.get_mut();
        let mut ring = match Ring::open(state.get_queue(), &mem) {
            Ok(r) => r,
            Err(e) => {
                port.stats.drop_bad_chain.inc();
                log::debug!("{}: TX ring unusable: {e}", port.config.name);
                return Ok(());
            }
        };
        // Kicks off while draining; re-armed below, then re-checked for frames that raced in.
        ring.disable_kicks();
        let mut broken = None;
        loop {
            let mut n = 0;
            while n < TX_BATCH {
                match ring.pop() {
                    Ok(Some(head)) => {
                        heads[n] = head;
                        n += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
            }
            if n > 0 {
                for &head in &heads[..n] {
                    let usable = match ring.chain_into(head, &mut parsed) {
                        Ok(()) if parsed.last().is_some_and(|b| b.writable_len() == 0) => true,
                        Ok(()) => {
                            // A device-writable part on a transmit chain.
                            parsed.pop();
                            false
                        }
                        Err(_) => false,
                    };
                    if !usable {
                        port.stats.drop_bad_chain.inc();
                    }
                }
                let mut local = LocalBatch::default();
                for b in &parsed {
                    fabric.forward_from_guest(port.index, b, hdr_len, &mut outbox, &mut local);
                }
                fabric.deliver_local(pair, &mut local, &mut outbox.signals);
                drop(local);
                fabric.flush_links(&mut outbox);
                parsed.clear();
                for &head in &heads[..n] {
                    // A head past the ring, which the guest invented and which was counted as
                    // a bad chain above, is not returned.
                    ring.push_used(head, 0);
                }
                ring.publish_used();
                outbox.signals.flush(&fabric.ports);
                if ring.needs_interrupt() {
                    let _ = state.signal_used_queue();
                }
            }
            if broken.is_some() {
                break;
            }
            if n == TX_BATCH {
                continue;
            }
            match ring.enable_kicks() {
                Ok(true) => ring.disable_kicks(),
                Ok(false) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = broken {
            // A corrupt avail index: nothing sensible can be taken from this ring until the
            // guest resets it.
            port.stats.drop_bad_chain.inc();
            log::debug!("{}: TX ring unusable: {e}", port.config.name);
        }
        ring.finish(state.get_queue_mut());
        Ok(())
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

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.0.port.detach();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = config_space(
            self.0.port.config.mac,
            self.0.port.config.queue_pairs,
            self.0.mtu,
        );
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        if start >= cfg.len() || end > cfg.len() {
            // Out of range: an empty answer makes the front-end's request fail cleanly.
            return Vec::new();
        }
        cfg[start..end].to_vec()
    }

    fn update_memory(&self, mem: MemoryAtomic) -> io::Result<()> {
        *self.0.mem.lock().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        self.0.port.mark_connected();
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
            if let (Some(rx), Some(slot)) = (
                vrings.first(),
                self.0
                    .rx_vrings
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_mut(pair),
            ) {
                *slot = Some(rx.clone());
            }
            self.attach_rx();
            return Ok(());
        }
        let q = usize::from(device_event);
        if q >= vrings.len() {
            return Ok(());
        }
        // After a device reset the receive side is attached again at the next ring event.
        self.attach_rx();
        if q == 1 {
            self.process_tx(pair, &vrings[q])?;
        }
        // An RX kick only means new buffers: frames are never queued here waiting for them.
        Ok(())
    }
}
