//! A rig for unit tests: a real group of VMs built from a configuration (real Unix-socket
//! endpoints in a scratch directory), a connected "front-end" whose vrings live in guest
//! memory, and a driver side that posts chains with virtio-queue's `MockSplitQueue` and reads
//! the used rings back. No QEMU, no vhost-user socket.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};

use devshare_common::chain::Memory;
use vhost_user_backend::VringT;
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{Config, ConfigFile};
use crate::group::{self, Group, Vms};
use crate::queue::Vring;
use crate::virtio_console as vc;

/// Entries per test queue.
pub const QSIZE: u16 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Where the buffers go.
const BUFFERS: u64 = 0x10_0000;

/// One VM "a" with a `console` and a `data` port on Unix sockets, spools of `buffer` bytes.
pub struct Rig {
    pub dir: PathBuf,
    pub group: Arc<Group>,
    /// Guest memory (leaked: the mock queues borrow it for the whole test).
    pub mem: &'static Memory,
    vrings: Vec<Vring>,
    /// The read side of each queue's kick eventfd: the device kicks its own queues when an
    /// event's work budget ran out.
    kicks: Vec<File>,
    /// The driver's view of each queue (creating one resets its avail ring, so one each).
    mocks: Vec<MockSplitQueue<'static, Memory>>,
    /// Next free descriptor per queue, and the used index seen so far.
    next_desc: Vec<u16>,
    seen_used: Vec<u16>,
    next_buf: u64,
}

fn queue_base(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}

fn used_addr(q: usize) -> GuestAddress {
    GuestAddress(queue_base(q) + 0x2000)
}

impl Rig {
    /// Builds the VM and connects a front-end that negotiated `features`.
    pub fn new(label: &str, buffer: &str, features: u64) -> Rig {
        let dir = std::env::temp_dir().join(format!("console-unit-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            r#"
            buffer_size = "{buffer}"
            [[vm]]
            name = "a"
            socket = "{d}/a.sock"
            port = [{{ name = "console", endpoint = "unix:{d}/console.sock" }},
                    {{ name = "data", endpoint = "unix:{d}/data.sock" }}]
            "#,
            d = dir.display()
        );
        let file: ConfigFile = toml::from_str(&text).unwrap();
        let cfg = Config::try_from(file).unwrap();
        let (groups, _) = group::build(&cfg).unwrap();
        let group = groups[0].clone();
        let mem: &'static Memory = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
        ));
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let nq = vc::queue_count(2, true);
        let mocks: Vec<_> = (0..nq)
            .map(|q| MockSplitQueue::create(mem, GuestAddress(queue_base(q)), QSIZE))
            .collect();
        let vrings: Vec<Vring> = mocks
            .iter()
            .enumerate()
            .map(|(q, mq)| {
                let v = Vring::new(atomic.clone(), QSIZE).unwrap();
                v.set_queue_size(QSIZE);
                v.set_queue_info(mq.desc_table_addr().0, mq.avail_addr().0, used_addr(q).0)
                    .unwrap();
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        let kicks = vrings
            .iter()
            .map(|v| {
                // SAFETY: eventfd takes flags only; the result is checked before use.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
                // SAFETY: `fd` is a new descriptor owned by nothing else.
                let kick = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                v.set_kick(Some(kick.try_clone().unwrap()));
                kick
            })
            .collect();
        {
            let mut vms = group.lock();
            let d = &mut vms.devices[0];
            d.attach();
            d.set_memory(atomic);
            d.set_features(features);
            d.set_vrings(&vrings);
        }
        Rig {
            dir,
            group,
            mem,
            vrings,
            kicks,
            mocks,
            next_desc: vec![0; nq],
            seen_used: vec![0; nq],
            next_buf: BUFFERS,
        }
    }

    /// The group's VMs, locked.
    pub fn vms(&self) -> MutexGuard<'_, Vms> {
        self.group.lock()
    }

    /// A client of port `port`'s Unix endpoint.
    pub fn client(&self, port: &str) -> UnixStream {
        let s = UnixStream::connect(self.dir.join(format!("{port}.sock"))).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s
    }

    /// Posts one chain on queue `q`: `bytes` device-readable (if any), then a device-writable
    /// buffer of `room` bytes (if any). Returns its head.
    pub fn post(&mut self, q: usize, bytes: &[u8], room: u32) -> u16 {
        let mut descs = Vec::new();
        if !bytes.is_empty() {
            let at = self.alloc(bytes.len() as u64);
            self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
            descs.push((at, bytes.len() as u32, 0));
        }
        if room > 0 {
            let at = self.alloc(u64::from(room));
            descs.push((at, room, DESC_F_WRITE));
        }
        self.post_raw(q, &descs)
    }

    /// Posts a chain of raw `(addr, len, flags)` descriptors on queue `q`.
    pub fn post_raw(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc[q];
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let (flags, next) = if last {
                    (flags, 0)
                } else {
                    (flags | DESC_F_NEXT, head + i as u16 + 1)
                };
                RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
            })
            .collect();
        self.mocks[q].add_desc_chains(&raw, head).unwrap();
        self.next_desc[q] = (head + n) % QSIZE;
        head
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_buf;
        self.next_buf += len.div_ceil(64) * 64;
        at
    }

    /// Used entries `(head, len)` published on queue `q` since the last call.
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(used_addr(q).unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.seen_used[q] != idx {
            let slot = u64::from(self.seen_used[q] % QSIZE);
            let at = used_addr(q).unchecked_add(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.seen_used[q] = self.seen_used[q].wrapping_add(1);
        }
        out
    }

    /// Reads `len` bytes the device wrote into the writable buffer of chain `head` on `q`.
    pub fn written(&self, q: usize, head: u16, len: u32) -> Vec<u8> {
        let table = self.mocks[q].desc_table();
        let mut d = SplitDesc::from(table.load(head).unwrap());
        while d.flags() & DESC_F_WRITE == 0 {
            d = SplitDesc::from(table.load(d.next()).unwrap());
        }
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, d.addr()).unwrap();
        out
    }

    /// Whether the device kicked queue `q` itself since the last call.
    pub fn kicked(&mut self, q: usize) -> bool {
        let mut count = [0u8; 8];
        (&self.kicks[q]).read(&mut count).is_ok()
    }

    /// Where the device will pop next on queue `q`.
    pub fn next_avail(&self, q: usize) -> u16 {
        self.vrings[q].get_ref().get_queue().next_avail()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// vm_memory's `unchecked_add` on addresses, for the used ring.
trait Offset {
    fn unchecked_add(self, n: u64) -> GuestAddress;
}

impl Offset for GuestAddress {
    fn unchecked_add(self, n: u64) -> GuestAddress {
        GuestAddress(self.0 + n)
    }
}
