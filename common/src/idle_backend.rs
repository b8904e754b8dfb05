//! The smallest vhost-user device, for the unit tests of the serving code: one queue, nothing
//! to do, and optionally one worker exit event handed out as copies (as the backends do).

use std::io;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::MemoryAtomic;

/// VERSION_1 and PROTOCOL_FEATURES, the least a front-end needs offered.
const FEATURES: u64 = 1 << 32 | 1 << 30;

/// The device. Without an exit event a connection cannot end (the library joins its
/// workers), so only tests that serve a single connection leave it out.
#[derive(Clone)]
pub(crate) struct Idle(pub(crate) Option<Arc<(EventConsumer, EventNotifier)>>);

impl VhostUserBackend for Idle {
    type Bitmap = ();
    type Vring = VringMutex<MemoryAtomic>;
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, _mem: MemoryAtomic) -> io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        Ok(())
    }
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = &**self.0.as_ref()?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }
}
