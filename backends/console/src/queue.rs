//! A VM's virtqueues as the console reads and writes them: one pass over a ring per batch
//! through [`devshare_common::ring::Ring`] (one avail-index read, used entries published once,
//! EVENT_IDX / NO_INTERRUPT decided by `Ring`), under the vring's lock for the batch only.
//!
//! Every event (a kick, an endpoint's readiness) has a work [`Budget`]: chains taken,
//! descriptors read and bytes moved, in every ring the event touches (a guest-to-guest link
//! reaches into the peer's). A guest that keeps a ring full, or fills it with the longest
//! chains the spec allows (as many tiny buffers as the queue size, through indirect tables),
//! then holds its thread and its group's lock for a bounded time: when the budget is spent,
//! the loop stops between chains, and the ring it stopped on is kicked ([`kick`]) so its
//! worker comes back to it after whatever else is ready (the other queues of the VM, its
//! endpoints, the other VMs of its group). Nothing is lost: what was not taken stays in the
//! ring or the spool.

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::RwLockWriteGuard;

use devshare_common::chain::{ChainError, GuestBuffers, Memory, MemoryAtomic};
use devshare_common::log_limited;
use devshare_common::ratelimit::RateLimit;
use devshare_common::ring::{Ring, RingError};
use vhost_user_backend::{VringRwLock, VringState, VringT};

/// The vring type of the console: vhost-user-backend's, with the ring's interrupt record.
pub type Vring = devshare_common::vring::Vring<VringRwLock<MemoryAtomic>>;

/// The guest side of a live vhost-user connection: its vrings (known from the first event on
/// them) and its memory (from the last memory table).
#[derive(Default)]
pub struct GuestRings {
    /// Every vring of the device, in queue order.
    pub vrings: Option<Vec<Vring>>,
    /// Guest memory.
    pub mem: Option<MemoryAtomic>,
    /// Queues found unusable (a bit per queue), so that is logged once, not on every kick.
    broken: u64,
}

impl GuestRings {
    /// Queue `q`'s vring and the memory to map it in, if both are known.
    pub fn get(&self, q: usize) -> Option<(Vring, MemoryAtomic)> {
        let vr = self.vrings.as_ref()?.get(q)?.clone();
        Some((vr, self.mem.clone()?))
    }

    /// Records whether queue `q` could be used and logs the changes only, through `limit` (the
    /// VM's limit): a guest that keeps kicking a broken ring, or breaks and repairs it again
    /// and again, must not flood the log.
    pub fn note(&mut self, vm: &str, limit: &RateLimit, q: usize, result: Result<(), &RingError>) {
        // One bit per queue: a device has at most 64 (`virtio_console::MAX_QUEUES`).
        let Some(bit) = u32::try_from(q).ok().and_then(|q| 1u64.checked_shl(q)) else {
            return;
        };
        match result {
            Ok(()) if self.broken & bit != 0 => {
                self.broken &= !bit;
                log_limited!(log::Level::Info, limit, "{vm}: queue {q} is usable again");
            }
            Ok(()) => {}
            // Not set up yet (or reset): nothing the guest did wrong.
            Err(RingError::NotReady) => {}
            Err(e) if self.broken & bit == 0 => {
                self.broken |= bit;
                // "Iterator error" is what operators (and tests) know this as from virtio-queue.
                log_limited!(
                    log::Level::Warn,
                    limit,
                    "{vm}: queue {q}: Iterator error: {e}; nothing is taken from it until the driver repairs it"
                );
            }
            Err(_) => {}
        }
    }
}

/// Which way a port queue carries data, for [`Batch::chain_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Guest to host: the chain must offer bytes to read.
    Transmit,
    /// Host to guest: the chain must offer room to write.
    Receive,
}

/// Why a chain was refused by [`Batch::chain_for`].
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The descriptors are malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A transmit chain with only device-writable buffers.
    #[error("transmit chain has only device-writable buffers")]
    NothingToRead,
    /// A receive chain without a device-writable buffer.
    #[error("receive chain has no device-writable buffer")]
    NothingToWrite,
}

/// Chains one event takes at most: a ring's worth at the largest queue size offered.
pub const PASS_CHAINS: usize = 1024;
/// Descriptors one event reads at most (refused chains count too): sixteen chains as long as
/// the largest queue allows, while ordinary chains of one or two buffers reach
/// [`PASS_CHAINS`] first.
pub const PASS_DESCRIPTORS: usize = 16 * 1024;
/// Bytes one event moves at most between guests and spools or endpoints (about a
/// millisecond of copying; a single chain is never split for it).
pub const PASS_BYTES: usize = 4 << 20;

/// The work one event has done, against its limits (see the module docs). Shared by the
/// rings an event touches, so it lives in cells: one event runs at a time under the group's
/// lock.
#[derive(Debug)]
pub struct Budget {
    limits: [usize; 3],
    spent: [Cell<usize>; 3],
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(PASS_CHAINS, PASS_DESCRIPTORS, PASS_BYTES)
    }
}

impl Budget {
    /// A budget of `chains`, `descriptors` and `bytes` per event.
    pub fn new(chains: usize, descriptors: usize, bytes: usize) -> Budget {
        Budget {
            limits: [chains, descriptors, bytes],
            spent: Default::default(),
        }
    }

    /// A new event begins: nothing spent.
    pub fn refill(&self) {
        for s in &self.spent {
            s.set(0);
        }
    }

    /// Whether any of the limits is reached: the event must stop taking chains.
    pub fn spent(&self) -> bool {
        self.spent
            .iter()
            .zip(self.limits)
            .any(|(s, limit)| s.get() >= limit)
    }

    fn charge(&self, chains: usize, descriptors: usize, bytes: usize) {
        for (s, n) in self.spent.iter().zip([chains, descriptors, bytes]) {
            s.set(s.get().saturating_add(n));
        }
    }
}

/// How a loop over a ring ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// It took what there was to take (or what the host side could take).
    Done,
    /// The event's [`Budget`] ran out: chains may be left, the ring must be kicked.
    Yielded,
}

/// Kicks `vring` as the guest would: the worker serving it comes back to it after the other
/// events that are ready. For a pass that stopped at its [`Budget`]; call it after the
/// ring's [`Batch`] is finished (the batch holds the vring's lock).
pub fn kick(vring: &Vring) {
    let state = vring.get_ref();
    let Some(kick) = state.get_kick() else {
        return;
    };
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes the 8 bytes of a live array to the kick eventfd, which stays open while
    // the vring's lock (`state`) is held; an eventfd takes exactly this write.
    let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n < 0 {
        // Only a counter at its maximum refuses (EAGAIN), and then a kick is pending anyway.
        log::debug!("cannot kick a queue: {}", io::Error::last_os_error());
    }
}

/// One queue opened for a batch: the vring stays locked until [`Batch::finish`].
pub struct Batch<'v, 'm> {
    state: RwLockWriteGuard<'v, VringState<MemoryAtomic>>,
    ring: Ring<'m>,
    /// Descriptors read by the time of the last [`Batch::charge`].
    charged: usize,
}

impl<'v, 'm> Batch<'v, 'm> {
    /// Opens `vring` for a batch, its rings mapped in `mem`.
    pub fn open(vring: &'v Vring, mem: &'m Memory) -> Result<Batch<'v, 'm>, RingError>
    where
        'v: 'm,
    {
        let state = vring.get_mut();
        let ring = Ring::open(state.get_queue(), mem, vring.signalled())?;
        Ok(Batch {
            state,
            ring,
            charged: 0,
        })
    }

    /// Charges one chain, the descriptors read since the last charge and `bytes` moved to
    /// `budget`.
    pub fn charge(&mut self, budget: &Budget, bytes: usize) {
        let read = self.ring.descriptors_read();
        budget.charge(1, read.saturating_sub(self.charged), bytes);
        self.charged = read;
    }

    /// The next available chain head; when the ring is empty, asks the driver to kick for the
    /// next one and looks once more (so a chain added meanwhile is not missed).
    pub fn pop(&mut self) -> Result<Option<u16>, RingError> {
        if let Some(head) = self.ring.pop()? {
            return Ok(Some(head));
        }
        if self.ring.enable_kicks()? {
            return self.ring.pop();
        }
        Ok(None)
    }

    /// The next available chain head, without asking for a kick when there is none (for
    /// callers that decide themselves whether they need one, see [`Batch::want_kicks`]).
    pub fn pop_quiet(&mut self) -> Result<Option<u16>, RingError> {
        self.ring.pop()
    }

    /// Asks the driver to kick for the next chain; true if chains arrived meanwhile.
    pub fn want_kicks(&mut self) -> Result<bool, RingError> {
        self.ring.enable_kicks()
    }

    /// Tells the driver no kick is needed for new chains (with EVENT_IDX: simply not asking).
    pub fn no_kicks(&mut self) {
        self.ring.disable_kicks();
    }

    /// Where the next [`Batch::pop`] starts, to give chains back with [`Batch::rewind`].
    pub fn next_avail(&self) -> u16 {
        self.ring.next_avail()
    }

    /// Gives back every chain popped since [`Batch::next_avail`] returned `to`.
    pub fn rewind(&mut self, to: u16) {
        self.ring.rewind(to);
    }

    /// Maps chain `head` and checks it offers what a queue of direction `dir` needs.
    pub fn chain_for(&self, head: u16, dir: Dir) -> Result<GuestBuffers<'m>, Refused> {
        let b = self.ring.chain(head)?;
        match dir {
            Dir::Transmit if b.writable_len() > 0 && b.readable_len() == 0 => {
                Err(Refused::NothingToRead)
            }
            Dir::Receive if b.writable_len() == 0 => Err(Refused::NothingToWrite),
            _ => Ok(b),
        }
    }

    /// Maps chain `head` without a direction check (control queues).
    pub fn chain(&self, head: u16) -> Result<GuestBuffers<'m>, ChainError> {
        self.ring.chain(head)
    }

    /// Returns chain `head` to the guest with `len` bytes written.
    pub fn push_used(&mut self, head: u16, len: u32) {
        self.ring.push_used(head, len);
    }

    /// Makes the used entries pushed so far visible to the guest now (one store of the used
    /// index), before the batch ends: a chain is accepted the moment it is marked used, so a
    /// process that dies later in the batch does not leave it to be taken again. The
    /// interrupt is still decided once, in [`Batch::finish`].
    pub fn publish_used(&mut self) {
        self.ring.publish_used();
    }

    /// Publishes the used entries, interrupts the guest if it asked for it, and hands the
    /// indices back to the queue.
    pub fn finish(mut self) {
        self.ring.publish_used();
        if self.ring.needs_interrupt() {
            if let Err(e) = self.state.signal_used_queue() {
                log::debug!("cannot signal used queue: {e}");
            }
        }
        self.ring.finish(self.state.get_queue_mut());
    }
}

/// Guest memory pinned for a batch (the front-end may replace the table meanwhile).
pub type MemGuard = vm_memory::GuestMemoryLoadGuard<Memory>;

/// Pins the memory of `mem`.
pub fn pin(mem: &MemoryAtomic) -> MemGuard {
    vm_memory::GuestAddressSpace::memory(mem)
}
