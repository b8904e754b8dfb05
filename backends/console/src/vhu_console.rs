//! The vhost-user side of one VM: a `VhostUserBackend` per front-end connection that hands
//! every event to the VM's [`Group`](crate::group::Group), locking only that group.

use std::io;
use std::sync::Arc;

use devshare_common::chain::Memory;
use devshare_common::daemon::connection_start_event;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::group::VmRef;
use crate::queue::Vring;
use crate::virtio_console as vc;

/// The `device_event` of the VM's reactor in its worker's epoll set, for a device with
/// `queues` queues (past the events vhost-user-backend and the daemon use).
pub fn reactor_event(queues: usize) -> u16 {
    connection_start_event(queues) + 1
}

/// Largest queue the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The virtio features offered for a VM with `multiport` set or not.
pub fn device_features(multiport: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | vc::F_SIZE
        | vc::F_EMERG_WRITE;
    if multiport {
        f |= vc::F_MULTIPORT;
    }
    f
}

struct Inner {
    vm: VmRef,
    queues: usize,
    multiport: bool,
    exit: (EventConsumer, EventNotifier),
}

/// The backend of one VM for one front-end connection.
#[derive(Clone)]
pub struct VhuConsole(Arc<Inner>);

impl VhuConsole {
    /// A backend for the VM `vm`; registers the connection with it.
    pub fn new(vm: VmRef) -> io::Result<VhuConsole> {
        let (queues, multiport) = {
            let mut vms = vm.group.lock();
            let d = &mut vms.devices[vm.dev];
            d.attach();
            (
                vc::queue_count(d.ports.len(), d.cfg.multiport()),
                d.cfg.multiport(),
            )
        };
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        // From now on this connection's worker serves the VM's endpoints (the reactor is in
        // its epoll set, see `ServeOptions::worker_fds`): one thread for kicks and endpoints.
        vm.release_home();
        Ok(VhuConsole(Arc::new(Inner {
            vm,
            queues,
            multiport,
            exit,
        })))
    }
}

impl VhostUserBackend for VhuConsole {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device_features(self.0.multiport)
    }

    fn acked_features(&self, features: u64) {
        self.0.with(|d| d.set_features(features));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.0.with(|d| {
            d.detach();
            d.attach();
        });
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queues know: vhost-user-backend sets it on each of them, and the ring code
        // reads it from there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.0.with(|d| d.config_space());
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        let mut out = cfg[start..end].to_vec();
        // Reads past the end see zeroes rather than an error, as on a PCI config space.
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Writes to the read-only fields are ignored (write_config logs them), as on a PCI
        // device: an error here would make the vhost crate drop the whole connection.
        self.0
            .vm
            .group
            .lock()
            .write_config(self.0.vm.dev, offset, buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Memory>) -> io::Result<()> {
        self.0.with(|d| d.set_memory(mem));
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per VM: the group's lock serialises the work anyway.
        vec![vc::queue_mask(self.0.queues)]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = &self.0.exit;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        if device_event == reactor_event(self.0.queues) {
            self.0.vm.group.lock().serve_events(self.0.vm.dev);
        } else if (device_event as usize) < self.0.queues {
            let mut vms = self.0.vm.group.lock();
            vms.devices[self.0.vm.dev].set_vrings(vrings);
            vms.on_queue_event(self.0.vm.dev, device_event as usize);
        }
        Ok(())
    }
}

impl Inner {
    /// Runs `f` on this VM under its group's lock.
    fn with<R>(&self, f: impl FnOnce(&mut crate::device::Device) -> R) -> R {
        let mut vms = self.vm.group.lock();
        f(&mut vms.devices[self.vm.dev])
    }
}
