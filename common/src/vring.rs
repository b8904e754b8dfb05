//! The vring type of every backend: one of vhost-user-backend's vrings plus the ring code's
//! memory of one ring's life ([`Signalled`]), forgotten whenever the front-end (re)starts the
//! ring.
//!
//! The ring code decides at the end of each batch whether the guest wants an interrupt
//! (EVENT_IDX: has the used index passed the guest's used_event since the last decision?).
//! That is only right if the last decision was ours. After a ring starts it may not have been:
//! a backend process that was killed between publishing used entries and interrupting left a
//! guest waiting for an interrupt with its used_event already passed, and no later entry
//! "passes" it again. So the first decision after a start interrupts unconditionally, as
//! Linux's vhost does (`signalled_used_valid`) and QEMU's virtio after a vhost stop.
//!
//! A ring starts with SET_VRING_BASE, SET_VRING_ADDR and the kick/call descriptors that make
//! vhost-user-backend mark its queue ready (vhost-user spec, "Starting and stopping rings");
//! each of those setters here forgets the record, once the setter is done (it waits for a batch
//! in flight, whose decision is about the ring as it was). A new connection builds new vrings,
//! whose records start forgotten. A ring that is running after such a message is also
//! interrupted at once, for the guest that waits on entries already published when nothing
//! new will come to be decided on.

use std::fs::File;
use std::io;
use std::sync::Arc;

use vhost_user_backend::{VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use virtio_queue::QueueT;

use crate::chain::MemoryAtomic;
use crate::ring::Signalled;

/// A vring (`V`: `VringRwLock` or `VringMutex` over [`MemoryAtomic`]) with its [`Signalled`]
/// record. Clones share both, like the library's vrings.
#[derive(Clone)]
pub struct Vring<V> {
    inner: V,
    signalled: Arc<Signalled>,
}

impl<V> Vring<V> {
    /// The interrupt record of this ring's current life, for [`crate::ring::Ring::open`].
    pub fn signalled(&self) -> &Signalled {
        &self.signalled
    }
}

impl<V: VringT<MemoryAtomic>> Vring<V> {
    /// Applies `restart`, a front-end message that (re)starts the ring, then forgets the
    /// record. In that order: the message waits for the vring's lock, which a batch in flight
    /// holds until it has decided on its interrupt, and that decision (sent to the old call
    /// descriptor, or made from the old indices) must not use up the forgetting meant for the
    /// ring as the message leaves it.
    ///
    /// Then, if the ring now runs and has a call descriptor, interrupts the guest once: the
    /// last owner may have published entries it never told the guest of, and nothing new may
    /// ever come to pass used_event (a TX ring it drained: the guest sleeps until its chains
    /// come back). A driver must handle spurious interrupts (virtio 1.2, 2.7.7, split rings),
    /// and a front-end gets at most one per message it sends.
    fn restart<R>(&self, restart: impl FnOnce(&V) -> R) -> R {
        let r = restart(&self.inner);
        self.signalled.forget();
        let state = self.inner.get_ref();
        if state.get_queue().ready() {
            if let Err(e) = state.signal_used_queue() {
                log::debug!("cannot interrupt a ring that starts: {e}");
            }
        }
        r
    }
}

impl<'a, V: VringStateGuard<'a, MemoryAtomic>> VringStateGuard<'a, MemoryAtomic> for Vring<V> {
    type G = V::G;
}

impl<'a, V: VringStateMutGuard<'a, MemoryAtomic>> VringStateMutGuard<'a, MemoryAtomic>
    for Vring<V>
{
    type G = V::G;
}

impl<V: VringT<MemoryAtomic>> VringT<MemoryAtomic> for Vring<V> {
    fn new(mem: MemoryAtomic, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(Vring {
            inner: V::new(mem, max_queue_size)?,
            signalled: Arc::new(Signalled::default()),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, MemoryAtomic>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, MemoryAtomic>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.restart(|v| v.set_queue_info(desc_table, avail_ring, used_ring))
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.restart(|v| v.set_queue_next_avail(base))
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.restart(|v| v.set_queue_next_used(idx))
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.restart(|v| v.set_queue_ready(ready))
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        // Interrupts for what was published before went to the old descriptor, if anywhere.
        self.restart(|v| v.set_call(file))
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Memory;
    use vhost_user_backend::VringRwLock;
    use vm_memory::{GuestAddress, GuestMemoryAtomic};

    type TestVring = Vring<VringRwLock<MemoryAtomic>>;
    /// A front-end message's effect on a vring, by name.
    type Setter<'a> = (&'a str, &'a dyn Fn(&TestVring));

    fn vring() -> TestVring {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        Vring::new(GuestMemoryAtomic::new(mem), 16).unwrap()
    }

    /// Every setter with which the front-end (re)starts a ring forgets the record; the others
    /// (kicks, enabling, used entries) keep it.
    #[test]
    fn a_ring_start_forgets_what_was_signalled() {
        let v = vring();
        assert!(!v.signalled().is_known(), "a new ring knows nothing");
        let restarts: [Setter; 5] = [
            ("SET_VRING_BASE", &|v| v.set_queue_next_avail(3)),
            ("SET_VRING_ADDR (used index)", &|v| v.set_queue_next_used(3)),
            ("SET_VRING_ADDR", &|v| {
                v.set_queue_info(0x1000, 0x2000, 0x3000).unwrap()
            }),
            ("ring ready", &|v| v.set_queue_ready(true)),
            ("SET_VRING_CALL", &|v| v.set_call(None)),
        ];
        for (what, restart) in restarts {
            v.signalled().set_known();
            restart(&v);
            assert!(!v.signalled().is_known(), "{what} kept the record");
        }
        v.signalled().set_known();
        v.set_enabled(true);
        v.set_queue_event_idx(true);
        v.set_kick(None);
        assert!(v.signalled().is_known());
        // Clones are the same ring.
        let c = v.clone();
        c.set_queue_next_avail(0);
        assert!(!v.signalled().is_known());
    }

    /// A ring that starts (made ready, or given a call descriptor while it runs) interrupts
    /// the guest once; a ring that does not run is left alone.
    #[test]
    fn a_ring_that_starts_interrupts_once() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        let v = vring();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = call.try_clone().unwrap().into_raw_fd();
        // SAFETY: `fd` is a descriptor of our own eventfd that nothing else owns now
        // (into_raw_fd gave it up); the File takes it over and closes it once.
        let file = unsafe { File::from_raw_fd(fd) };
        v.set_call(Some(file));
        assert!(
            call.read().is_err(),
            "a ring that does not run was interrupted"
        );
        v.set_queue_ready(true);
        assert_eq!(
            call.read().unwrap(),
            1,
            "one interrupt when the ring started"
        );
        v.set_queue_ready(false);
        assert!(call.read().is_err(), "a ring that stops was interrupted");
    }

    /// A front-end message waits for the vring's lock while a batch holds it, and that batch
    /// decides on its interrupt from the ring as it was (its interrupt goes to the old call
    /// descriptor). Its decision must not use up the forgetting the message brings, or the
    /// ring as the message leaves it is never interrupted unconditionally: the message's effect
    /// comes first, then the forgetting.
    #[test]
    fn a_decision_made_while_a_restart_waits_for_the_lock_does_not_use_it_up() {
        let v = vring();
        v.signalled().set_known();
        v.restart(|inner| {
            // The batch in flight decides (the record's take) before the setter gets the lock.
            v.signalled().set_known();
            inner.set_call(None);
        });
        assert!(
            !v.signalled().is_known(),
            "a batch that decided for the old call descriptor used up the restart"
        );
    }
}
