//! The split-ring path every backend takes (`devshare_common::ring::Ring` and the
//! `GuestBuffers` it builds), fed random descriptor tables, indirect tables, avail rings and
//! guest memory layouts (several regions, gaps, rings and buffers straddling regions), then a
//! random sequence of ring operations interleaved with the guest rewriting its rings.
//!
//! Checked, against a walk of the same descriptors written here from the virtio spec (1.2,
//! 2.7), not from the ring code:
//! - a chain the ring accepts is one the spec's walk can follow; it never holds more buffers
//!   than the queue size, every buffer lies inside guest memory, device-readable buffers come
//!   before device-writable ones, and the lengths, bytes and host addresses the ring hands
//!   out are exactly those of the descriptors;
//! - a chain that is plainly valid (no loop, no nesting, non-empty buffers inside memory,
//!   within the queue size) is accepted; a refused one leaves nothing behind in the batch;
//! - `pop` hands out the avail entries in order, and refuses an avail index more than the
//!   ring size ahead;
//! - the used index advances by exactly the chains pushed (heads the guest invented are
//!   dropped), each used element holds what was pushed, interrupts follow used_event or
//!   NO_INTERRUPT, and `enable_kicks` stores avail_event (or clears NO_NOTIFY);
//! - the device writes guest memory only in the used ring and in the writable buffers it was
//!   asked to fill.

use std::fs::File;
use std::num::Wrapping;
use std::sync::OnceLock;

use devshare_common::chain::{GuestBuffers, MAX_CHAIN_BYTES, MAX_CHAIN_SEGMENTS};
use devshare_common::ring::{Ring, Signalled};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{Guest, GuestAddr, Layout};
use crate::{seed_enum, seed_struct};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
/// Largest queue the target builds (the table is then 16 KiB).
const MAX_QUEUE_LOG2: u8 = 10;
/// Pages per region at most.
const MAX_PAGES: u8 = 16;
/// Chains kept for the byte-moving operations.
const MAX_KEPT: usize = 16;
/// Byte-for-byte comparisons stop at this size (chains may name the same memory many times
/// over, up to a gigabyte).
const COMPARE_MAX: usize = 1 << 20;

seed_enum! {
    /// A descriptor length: small, medium, any, or that of an indirect table of `entries`.
    pub enum Len {
        Small { len: u8 },
        Medium { len: u16 },
        Raw { len: u32 },
        Table { entries: u16 },
    }
}

impl Len {
    fn value(&self) -> u32 {
        match *self {
            Len::Small { len } => u32::from(len),
            Len::Medium { len } => u32::from(len),
            Len::Raw { len } => len,
            Len::Table { entries } => u32::from(entries) * 16,
        }
    }
}

seed_struct! {
    /// One descriptor as the guest writes it.
    pub struct Desc {
        pub addr: GuestAddr,
        pub len: Len,
        pub flags: u16,
        pub next: u16,
    }
}

seed_struct! {
    /// An indirect table the guest writes somewhere.
    pub struct Table {
        pub at: GuestAddr,
        pub descs: Vec<Desc>,
    }
}

seed_enum! {
    /// One step: a ring operation, a byte-moving operation on a kept chain, or the guest
    /// changing its rings meanwhile.
    pub enum Op {
        Pop,
        /// `chain` of the last head popped.
        Chain,
        /// `chain_into` the batch, of the last head popped.
        ChainInto,
        /// `chain` of any head.
        ChainOf { head: u16 },
        /// `push_used` of the last head popped.
        PushUsed { len: u32 },
        PushUsedHead { head: u16, len: u32 },
        Publish,
        NeedsInterrupt,
        EnableKicks,
        DisableKicks,
        /// Back to where this batch started.
        Rewind,
        /// `pending`: chains announced and not taken.
        Pending,
        /// `skip` of up to `n` chains.
        Skip { n: u16 },
        /// `walk` of any head, collecting the buffers it visits.
        Walk { head: u16 },
        /// `finish`, then `open` again.
        Reopen,
        GuestDesc { index: u16, desc: Desc },
        GuestAvail { slot: u16, head: u16 },
        GuestAvailIdx { idx: u16 },
        GuestUsedEvent { event: u16 },
        GuestAvailFlags { flags: u16 },
        ReadAt { chain: u8, offset: u16, len: u16 },
        WriteAt { chain: u8, offset: u16, len: u16, seed: u8 },
        CopyTo { from: u8, to: u8, src_offset: u16, dst_offset: u16 },
        IoSlices { chain: u8, offset: u16, max: u16 },
        WriteToDevNull { chain: u8, offset: u16 },
        ReadFromDevZero { chain: u8, offset: u16, max: u16 },
    }
}

seed_struct! {
    /// A whole input: memory, the queue, what the guest wrote, then the steps.
    pub struct Input {
        pub layout: Layout,
        pub size_log2: u8,
        pub desc_table: GuestAddr,
        pub avail: GuestAddr,
        pub used: GuestAddr,
        pub event_idx: bool,
        pub next_avail: u16,
        pub next_used: u16,
        /// The avail index; by default, just past the heads below.
        pub avail_idx: Option<u16>,
        pub avail_flags: u16,
        pub used_event: u16,
        /// Descriptor i of the table.
        pub descs: Vec<Desc>,
        /// Avail entries from `next_avail` on.
        pub heads: Vec<u16>,
        pub tables: Vec<Table>,
        pub ops: Vec<Op>,
    }
}

/// One buffer of a chain as the spec's walk finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Buf {
    addr: u64,
    len: u32,
    write: bool,
}

/// What the spec's walk makes of a chain.
#[derive(Debug)]
enum Walk {
    /// The walk cannot be followed: a link or head past its table, a loop, a nested or
    /// malformed indirect table, a table outside memory. Must be refused.
    Broken(&'static str),
    /// The buffers in chain order, and whether the chain is plainly valid (must be accepted).
    Buffers { bufs: Vec<Buf>, valid: bool },
}

/// Walks chain `head` of the table at `table` (`size` entries) from the spec alone.
fn spec_walk(g: &Guest, table: u64, size: u16, head: u16) -> Walk {
    let read = |at: u64| -> Option<(u64, u32, u16, u16)> {
        let mut b = [0u8; 16];
        g.mem.read_slice(&mut b, GuestAddress(at)).ok()?;
        let u =
            |r: std::ops::Range<usize>| b[r].iter().rev().fold(0u64, |a, &x| a << 8 | u64::from(x));
        Some((u(0..8), u(8..12) as u32, u(12..14) as u16, u(14..16) as u16))
    };
    let (mut base, mut entries, mut index) = (table, u32::from(size), head);
    let mut indirect = false;
    let mut valid = true;
    let mut bufs = Vec::new();
    // A walk that visits more descriptors of a table than it holds visits one twice: a loop.
    let mut visited = 0u32;
    loop {
        if u32::from(index) >= entries {
            return Walk::Broken("index past its table");
        }
        visited += 1;
        if visited > entries {
            return Walk::Broken("loop");
        }
        let Some((addr, len, flags, next)) = base.checked_add(16 * u64::from(index)).and_then(read)
        else {
            return Walk::Broken("descriptor outside memory");
        };
        if flags & INDIRECT != 0 {
            if indirect {
                return Walk::Broken("nested indirect table");
            }
            if len == 0 || len % 16 != 0 {
                return Walk::Broken("indirect table length");
            }
            if !g.contains(addr, u64::from(len)) {
                return Walk::Broken("indirect table outside memory");
            }
            // Spec: no NEXT with INDIRECT; no table longer than the queue.
            if flags & NEXT != 0 || len / 16 > u32::from(size) {
                valid = false;
            }
            (base, entries, index, indirect, visited) = (addr, len / 16, 0, true, 0);
            continue;
        }
        bufs.push(Buf {
            addr,
            len,
            write: flags & WRITE != 0,
        });
        if flags & NEXT == 0 {
            let valid = valid && plainly_valid(g, &bufs, size);
            return Walk::Buffers { bufs, valid };
        }
        index = next;
    }
}

/// The checks on buffers a driver that follows the spec always passes.
fn plainly_valid(g: &Guest, bufs: &[Buf], size: u16) -> bool {
    let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
    let pieces = |write: bool| -> usize {
        bufs.iter()
            .filter(|b| b.write == write)
            .map(|b| g.pieces(b.addr, u64::from(b.len)))
            .sum()
    };
    bufs.len() <= usize::from(size)
        && bufs
            .iter()
            .all(|b| b.len > 0 && g.contains(b.addr, u64::from(b.len)))
        && bufs.windows(2).all(|w| !w[0].write || w[1].write)
        && total <= MAX_CHAIN_BYTES as u64
        && pieces(false) <= MAX_CHAIN_SEGMENTS
        && pieces(true) <= MAX_CHAIN_SEGMENTS
}

/// The guest ranges `[offset, offset + n)` of the readable or writable part of `bufs` covers.
fn spans(bufs: &[Buf], write: bool, offset: usize, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut skip, mut left) = (offset as u64, n as u64);
    for b in bufs.iter().filter(|b| b.write == write) {
        let len = u64::from(b.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        if left == 0 {
            break;
        }
        let take = (len - skip).min(left);
        out.push((b.addr + skip, take));
        left -= take;
        skip = 0;
    }
    out
}

fn part_len(bufs: &[Buf], write: bool) -> usize {
    bufs.iter()
        .filter(|b| b.write == write)
        .map(|b| b.len as usize)
        .sum()
}

fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter()
        .any(|&(x, xl)| b.iter().any(|&(y, yl)| x < y + yl && y < x + xl))
}

/// The bytes of `spans`, in order.
fn bytes_of(g: &Guest, spans: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(a, l) in spans {
        match g.read(a, l as usize) {
            Some(b) => v.extend_from_slice(&b),
            None => panic!("a buffer of an accepted chain is not guest memory: {a:#x}+{l}"),
        }
    }
    v
}

fn dev(path: &'static str, cell: &'static OnceLock<File>) -> &'static File {
    cell.get_or_init(|| match File::options().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => panic!("cannot open {path}: {e}"),
    })
}

/// What the model knows of the ring between operations.
struct Model {
    next_avail: Wrapping<u16>,
    /// The avail index as the ring last read it.
    avail_cache: Wrapping<u16>,
    next_used: Wrapping<u16>,
    published: Wrapping<u16>,
    signalled: Wrapping<u16>,
    /// Whether the ring's interrupt record is known (false at a ring start: the first
    /// decision with something published says yes).
    known: bool,
    batch_start: u16,
    last_head: Option<u16>,
}

/// Runs one input.
pub fn run(input: &Input) {
    let g = input.layout.build(MAX_PAGES);
    let size = 1u16 << (input.size_log2 % (MAX_QUEUE_LOG2 + 1));
    let n = u64::from(size);
    let desc_table = g.addr(&input.desc_table) & !15;
    let avail = g.addr(&input.avail) & !1;
    let used = g.addr(&input.used) & !3;
    let mem = &g.mem;

    // The guest's side: indirect tables, the descriptor table, the avail ring.
    let put_desc = |at: u64, d: &Desc| {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&g.addr(&d.addr).to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.value().to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(at));
    };
    let put_u16 = |at: u64, v: u16| {
        let _ = mem.write_slice(&v.to_le_bytes(), GuestAddress(at));
    };
    for t in input.tables.iter().take(8) {
        let at = g.addr(&t.at) & !15;
        for (i, d) in t.descs.iter().take(usize::from(size) + 8).enumerate() {
            put_desc(at.wrapping_add(16 * i as u64), d);
        }
    }
    for (i, d) in input.descs.iter().take(usize::from(size)).enumerate() {
        put_desc(desc_table.wrapping_add(16 * i as u64), d);
    }
    let heads = &input.heads[..input.heads.len().min(usize::from(size))];
    for (i, &h) in heads.iter().enumerate() {
        let slot = (input.next_avail as usize + i) % usize::from(size);
        put_u16(avail.wrapping_add(4 + 2 * slot as u64), h);
    }
    put_u16(avail, input.avail_flags);
    let avail_idx = input
        .avail_idx
        .unwrap_or(input.next_avail.wrapping_add(heads.len() as u16));
    put_u16(avail.wrapping_add(2), avail_idx);
    put_u16(avail.wrapping_add(4 + 2 * n), input.used_event);
    put_u16(used.wrapping_add(2), input.next_used);

    let mut queue = match Queue::new(1 << MAX_QUEUE_LOG2) {
        Ok(q) => q,
        Err(e) => panic!("cannot make a queue: {e:?}"),
    };
    let set = [
        queue.try_set_size(size).is_ok(),
        queue
            .try_set_desc_table_address(GuestAddress(desc_table))
            .is_ok(),
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .is_ok(),
        queue.try_set_used_ring_address(GuestAddress(used)).is_ok(),
    ];
    assert!(set.iter().all(|&ok| ok), "queue set-up refused: {set:?}");
    queue.set_ready(true);
    queue.set_event_idx(input.event_idx);
    queue.set_next_avail(input.next_avail);
    queue.set_next_used(input.next_used);

    // The record of a ring that just started.
    let signalled = Signalled::default();
    let ring_fits = g.contains(desc_table, 16 * n)
        && g.contains(avail, 6 + 2 * n)
        && g.contains(used, 6 + 8 * n);
    let mut ring = match Ring::open(&queue, mem, &signalled) {
        Ok(r) => r,
        Err(e) => {
            assert!(!ring_fits, "a ring inside guest memory was refused: {e}");
            return;
        }
    };
    assert!(ring_fits, "a ring outside guest memory was opened");

    // The device may write the used ring, and the writable buffers it fills.
    let mut shadow = g.snapshot();
    let mut allowed: Vec<(u64, u64)> = vec![(used, 6 + 8 * n)];
    let mut m = Model {
        next_avail: Wrapping(input.next_avail),
        avail_cache: Wrapping(input.next_avail),
        next_used: Wrapping(input.next_used),
        published: Wrapping(input.next_used),
        signalled: Wrapping(input.next_used),
        known: false,
        batch_start: input.next_avail,
        last_head: None,
    };
    let mut kept: Vec<(GuestBuffers<'_>, Vec<Buf>)> = Vec::new();
    let mut batch: Vec<GuestBuffers<'_>> = Vec::new();
    let read_u16 = |at: u64| -> u16 {
        let mut b = [0u8; 2];
        match mem.read_slice(&mut b, GuestAddress(at)) {
            Ok(()) => u16::from_le_bytes(b),
            Err(e) => panic!("ring field at {at:#x} unreadable after open: {e}"),
        }
    };
    let guest_u16 = |shadow: &mut Vec<Vec<u8>>, at: u64, v: u16| {
        put_u16(at, v);
        g.sync(shadow, at, 2);
    };

    for op in input.ops.iter().take(96) {
        match op {
            Op::Pop => {
                let mut expect_err = false;
                let mut expect_none = false;
                if m.next_avail == m.avail_cache {
                    let idx = Wrapping(read_u16(avail + 2));
                    if (idx - m.next_avail).0 > size {
                        expect_err = true;
                    } else {
                        m.avail_cache = idx;
                        expect_none = idx == m.next_avail;
                    }
                }
                let slot = u64::from(m.next_avail.0 % size);
                let entry = read_u16(avail + 4 + 2 * slot);
                match ring.pop() {
                    Err(e) => assert!(expect_err, "pop failed: {e}"),
                    Ok(None) => assert!(
                        expect_none,
                        "pop found nothing though chains were announced"
                    ),
                    Ok(Some(h)) => {
                        assert!(
                            !expect_err && !expect_none,
                            "pop took an entry not announced"
                        );
                        assert_eq!(h, entry, "pop returned another head than the avail entry");
                        m.next_avail += 1;
                        m.last_head = Some(h);
                    }
                }
                assert_eq!(ring.next_avail(), m.next_avail.0);
            }
            Op::Chain | Op::ChainInto | Op::ChainOf { .. } => {
                let head = match op {
                    Op::ChainOf { head } => *head,
                    _ => match m.last_head {
                        Some(h) => h,
                        None => continue,
                    },
                };
                let walk = spec_walk(&g, desc_table, size, head);
                let read_before = ring.descriptors_read();
                let got = if matches!(op, Op::ChainInto) {
                    let before = batch.len();
                    let r = ring.chain_into(head, &mut batch);
                    match &r {
                        Ok(()) => {
                            assert_eq!(batch.len(), before + 1, "chain_into appended no chain");
                            assert_eq!(batch.last().map(|b| b.head()), Some(head));
                        }
                        Err(_) => {
                            assert_eq!(batch.len(), before, "a refused chain was left in the batch")
                        }
                    }
                    r.map(|()| None)
                } else {
                    ring.chain(head).map(Some)
                };
                let read = ring.descriptors_read() - read_before;
                assert!(
                    read <= usize::from(size) + 1,
                    "one chain cost {read} descriptor reads in a queue of {size}"
                );
                match (got, walk) {
                    (Err(e), Walk::Buffers { valid: true, bufs }) => {
                        panic!("a valid chain was refused ({e}): {bufs:x?}")
                    }
                    (Err(_), _) => {}
                    (Ok(_), Walk::Broken(why)) => panic!("a broken chain was accepted ({why})"),
                    (Ok(bufs), Walk::Buffers { bufs: spec, .. }) => {
                        let chain = match bufs.as_ref() {
                            Some(c) => c,
                            None => match batch.last() {
                                Some(c) => c,
                                None => unreachable!("checked above"),
                            },
                        };
                        check_chain(&g, chain, &spec, size);
                        if let Some(c) = bufs {
                            if kept.len() < MAX_KEPT {
                                kept.push((c, spec));
                            }
                        }
                    }
                }
            }
            Op::PushUsed { len } | Op::PushUsedHead { len, .. } => {
                let head = match op {
                    Op::PushUsedHead { head, .. } => *head,
                    _ => match m.last_head {
                        Some(h) => h,
                        None => continue,
                    },
                };
                let idx_before = read_u16(used + 2);
                ring.push_used(head, *len);
                if head < size {
                    let slot = u64::from(m.next_used.0 % size);
                    let at = used + 4 + 8 * slot;
                    let id = u32::from(read_u16(at)) | u32::from(read_u16(at + 2)) << 16;
                    let l = u32::from(read_u16(at + 4)) | u32::from(read_u16(at + 6)) << 16;
                    assert_eq!((id, l), (u32::from(head), *len), "used element {slot}");
                    m.next_used += 1;
                }
                assert_eq!(
                    read_u16(used + 2),
                    idx_before,
                    "push_used moved the used index"
                );
            }
            Op::Publish => {
                ring.publish_used();
                if m.published != m.next_used {
                    assert_eq!(
                        read_u16(used + 2),
                        m.next_used.0,
                        "used index after publish"
                    );
                    m.published = m.next_used;
                }
            }
            Op::NeedsInterrupt => {
                let (old, new) = (m.signalled, m.published);
                let expect = if old == new {
                    false
                } else if !m.known {
                    true
                } else if input.event_idx {
                    let event = Wrapping(read_u16(avail + 4 + 2 * n));
                    new - event - Wrapping(1) < new - old
                } else {
                    read_u16(avail) & 1 == 0
                };
                assert_eq!(ring.needs_interrupt(), expect, "needs_interrupt");
                assert!(
                    signalled.is_known() || old == new,
                    "record after a decision"
                );
                m.known |= old != new;
                m.signalled = new;
            }
            Op::EnableKicks => {
                let r = ring.enable_kicks();
                let idx = Wrapping(read_u16(avail + 2));
                if input.event_idx {
                    assert_eq!(read_u16(used + 4 + 8 * n), m.next_avail.0, "avail_event");
                } else {
                    assert_eq!(read_u16(used), 0, "used flags after enable_kicks");
                }
                match r {
                    Ok(more) => {
                        assert!((idx - m.next_avail).0 <= size);
                        assert_eq!(more, idx != m.next_avail, "enable_kicks: chains pending");
                        m.avail_cache = idx;
                    }
                    Err(_) => assert!((idx - m.next_avail).0 > size, "enable_kicks failed"),
                }
            }
            Op::DisableKicks => {
                ring.disable_kicks();
                if !input.event_idx {
                    assert_eq!(read_u16(used), 1, "used flags after disable_kicks");
                }
            }
            Op::Rewind => {
                ring.rewind(m.batch_start);
                m.next_avail = Wrapping(m.batch_start);
            }
            Op::Pending | Op::Skip { .. } => {
                let idx = Wrapping(read_u16(avail + 2));
                let ahead = (idx - m.next_avail).0;
                let r = match op {
                    Op::Skip { n } => ring.skip(*n),
                    _ => ring.pending(),
                };
                match r {
                    Err(_) => assert!(ahead > size, "pending/skip failed with {ahead} ahead"),
                    Ok(k) => {
                        assert!(ahead <= size, "{ahead} chains ahead were taken as pending");
                        m.avail_cache = idx;
                        match op {
                            Op::Skip { n } => {
                                assert_eq!(k, ahead.min(*n), "skip");
                                m.next_avail += Wrapping(k);
                            }
                            _ => assert_eq!(k, ahead, "pending"),
                        }
                    }
                }
                assert_eq!(ring.next_avail(), m.next_avail.0);
            }
            Op::Walk { head } => {
                let read_before = ring.descriptors_read();
                let mut seen = Vec::new();
                let r = ring.walk(*head, |b| {
                    seen.push(Buf {
                        addr: b.addr,
                        len: b.len,
                        write: b.write,
                    });
                    Ok(())
                });
                assert!(
                    ring.descriptors_read() - read_before <= usize::from(size) + 1,
                    "one walk read {} descriptors of a queue of {size}",
                    ring.descriptors_read() - read_before
                );
                match (r, spec_walk(&g, desc_table, size, *head)) {
                    (Ok(()), Walk::Broken(why)) => panic!("walk followed a broken chain ({why})"),
                    (Ok(()), Walk::Buffers { bufs, .. }) => {
                        assert_eq!(
                            seen, bufs,
                            "walk visited other buffers than the spec's walk"
                        );
                        assert!(
                            bufs.len() <= usize::from(size),
                            "walk: a chain longer than the queue"
                        );
                    }
                    (Err(_), _) => {}
                }
            }
            Op::Reopen => {
                ring.finish(&mut queue);
                if m.published != m.next_used {
                    assert_eq!(read_u16(used + 2), m.next_used.0, "used index after finish");
                }
                assert_eq!(
                    (queue.next_avail(), queue.next_used()),
                    (m.next_avail.0, m.next_used.0)
                );
                ring = match Ring::open(&queue, mem, &signalled) {
                    Ok(r) => r,
                    Err(e) => panic!("the same ring could not be opened again: {e}"),
                };
                m.published = m.next_used;
                m.signalled = m.next_used;
                m.avail_cache = m.next_avail;
                m.batch_start = m.next_avail.0;
            }
            Op::GuestDesc { index, desc } => {
                let at = desc_table + 16 * u64::from(index % size);
                put_desc(at, desc);
                g.sync(&mut shadow, at, 16);
            }
            Op::GuestAvail { slot, head } => {
                guest_u16(&mut shadow, avail + 4 + 2 * u64::from(slot % size), *head)
            }
            Op::GuestAvailIdx { idx } => guest_u16(&mut shadow, avail + 2, *idx),
            Op::GuestUsedEvent { event } => guest_u16(&mut shadow, avail + 4 + 2 * n, *event),
            Op::GuestAvailFlags { flags } => guest_u16(&mut shadow, avail, *flags),
            Op::ReadAt { chain, offset, len } => {
                let Some((c, spec)) = kept.get(usize::from(*chain) % kept.len().max(1)) else {
                    continue;
                };
                let (offset, len) = (usize::from(*offset), usize::from(*len));
                let mut out = vec![0u8; len];
                let got = c.read_at(offset, &mut out);
                let want = len.min(part_len(spec, false).saturating_sub(offset));
                assert_eq!(got, want, "read_at length");
                assert_eq!(
                    out[..got],
                    bytes_of(&g, &spans(spec, false, offset, got))[..],
                    "read_at bytes"
                );
            }
            Op::WriteAt {
                chain,
                offset,
                len,
                seed,
            } => {
                let Some((c, spec)) = kept.get(usize::from(*chain) % kept.len().max(1)) else {
                    continue;
                };
                let (offset, len) = (usize::from(*offset), usize::from(*len));
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                    .collect();
                let got = c.write_at(offset, &data);
                assert_eq!(
                    got,
                    len.min(part_len(spec, true).saturating_sub(offset)),
                    "write_at length"
                );
                let s = spans(spec, true, offset, got);
                allowed.extend_from_slice(&s);
                if !self_overlapping(&s) {
                    assert_eq!(bytes_of(&g, &s), data[..got], "write_at bytes");
                }
            }
            Op::CopyTo {
                from,
                to,
                src_offset,
                dst_offset,
            } => {
                let k = kept.len().max(1);
                let (Some((a, sa)), Some((b, sb))) = (
                    kept.get(usize::from(*from) % k),
                    kept.get(usize::from(*to) % k),
                ) else {
                    continue;
                };
                let (so, dof) = (usize::from(*src_offset), usize::from(*dst_offset));
                let want = part_len(sa, false)
                    .saturating_sub(so)
                    .min(part_len(sb, true).saturating_sub(dof));
                let src = spans(sa, false, so, want);
                let dst = spans(sb, true, dof, want);
                let before = bytes_of(&g, &src);
                assert_eq!(a.copy_to(so, b, dof), want, "copy_to length");
                allowed.extend_from_slice(&dst);
                if !overlap(&src, &dst) && !self_overlapping(&dst) {
                    assert_eq!(bytes_of(&g, &dst), before, "copy_to bytes");
                }
            }
            Op::IoSlices { chain, offset, max } => {
                let Some((c, spec)) = kept.get(usize::from(*chain) % kept.len().max(1)) else {
                    continue;
                };
                let offset = usize::from(*offset);
                let rest = part_len(spec, false).saturating_sub(offset);
                let slices = c.readable_io_slices(offset);
                let mut joined = Vec::new();
                for s in &slices {
                    assert!(
                        g.host_range_inside(s.as_ptr(), s.len()),
                        "an I/O slice lies outside guest memory"
                    );
                    if rest <= COMPARE_MAX {
                        joined.extend_from_slice(s);
                    }
                }
                if rest <= COMPARE_MAX {
                    let want = bytes_of(&g, &spans(spec, false, offset, rest));
                    assert_eq!(joined, want, "readable_io_slices bytes");
                }
                let max = usize::from(*max);
                let iov = c.readable_iovecs(offset, max);
                let mut total = 0;
                for v in &iov {
                    assert!(
                        g.host_range_inside(v.iov_base as *const u8, v.iov_len),
                        "an iovec lies outside guest memory"
                    );
                    total += v.iov_len;
                }
                assert_eq!(total, rest.min(max), "readable_iovecs length");
            }
            Op::WriteToDevNull { chain, offset } => {
                static NULL: OnceLock<File> = OnceLock::new();
                let Some((c, spec)) = kept.get(usize::from(*chain) % kept.len().max(1)) else {
                    continue;
                };
                let rest = part_len(spec, false).saturating_sub(usize::from(*offset));
                match c.write_readable_to(dev("/dev/null", &NULL), usize::from(*offset)) {
                    Ok(n) => assert_eq!(n, rest, "write_readable_to /dev/null"),
                    Err(e) => panic!("write_readable_to /dev/null: {e}"),
                }
            }
            Op::ReadFromDevZero { chain, offset, max } => {
                static ZERO: OnceLock<File> = OnceLock::new();
                let Some((c, spec)) = kept.get(usize::from(*chain) % kept.len().max(1)) else {
                    continue;
                };
                let (offset, max) = (usize::from(*offset), usize::from(*max));
                let want = part_len(spec, true).saturating_sub(offset).min(max);
                let got = match c.read_writable_from(dev("/dev/zero", &ZERO), offset, max) {
                    Ok(n) => n,
                    Err(e) => panic!("read_writable_from /dev/zero: {e}"),
                };
                assert_eq!(got, want, "read_writable_from /dev/zero");
                let s = spans(spec, true, offset, got);
                allowed.extend_from_slice(&s);
                assert!(
                    bytes_of(&g, &s).iter().all(|&b| b == 0),
                    "read_writable_from bytes"
                );
            }
        }
    }
    ring.finish(&mut queue);
    if m.published != m.next_used {
        assert_eq!(read_u16(used + 2), m.next_used.0, "used index after finish");
    }
    drop(kept);
    drop(batch);
    let now = g.snapshot();
    for (addr, len) in g.changes(&shadow, &now) {
        let inside = (addr..addr + len).all(|a| allowed.iter().any(|&(s, l)| a >= s && a < s + l));
        assert!(inside, "the device wrote guest memory at {addr:#x}+{len}, outside the used ring and the buffers it filled");
    }
}

/// Whether some of `spans` cover the same guest bytes (a chain that names the same memory
/// twice: then the bytes written last win, and are not checked one by one).
fn self_overlapping(spans: &[(u64, u64)]) -> bool {
    spans.iter().enumerate().any(|(i, &(a, al))| {
        spans[i + 1..]
            .iter()
            .any(|&(b, bl)| a < b + bl && b < a + al)
    })
}

/// The invariants of a chain the ring accepted, against the spec's walk of it.
fn check_chain(g: &Guest, c: &GuestBuffers<'_>, spec: &[Buf], size: u16) {
    assert!(
        spec.len() <= usize::from(size),
        "an accepted chain has {} buffers, more than the queue size {size}",
        spec.len()
    );
    for b in spec {
        assert!(
            g.contains(b.addr, u64::from(b.len)),
            "an accepted buffer lies outside guest memory: {b:x?}"
        );
    }
    assert!(
        spec.iter().all(|b| b.len > 0),
        "an accepted chain has an empty buffer"
    );
    assert!(
        spec.windows(2).all(|w| !w[0].write || w[1].write),
        "an accepted chain has a readable buffer after a writable one"
    );
    assert_eq!(c.readable_len(), part_len(spec, false), "readable length");
    assert_eq!(c.writable_len(), part_len(spec, true), "writable length");
    // The host addresses handed out are those of the descriptors' guest addresses, piece by
    // piece (pieces that follow each other in host memory compared as one).
    let iov = c.readable_iovecs(0, usize::MAX);
    let mut got = Vec::new();
    for v in &iov {
        assert!(
            g.host_range_inside(v.iov_base as *const u8, v.iov_len),
            "an iovec lies outside guest memory"
        );
        got.push((v.iov_base as usize, v.iov_len));
    }
    let mut want = Vec::new();
    for (a, l) in spans(spec, false, 0, c.readable_len()) {
        let (mut a, end) = (a, a + l);
        while a < end {
            let Some(&(s, rl)) = g.regions.iter().find(|&&(s, rl)| a >= s && a < s + rl) else {
                panic!("an accepted buffer lies outside guest memory at {a:#x}");
            };
            let take = (s + rl).min(end) - a;
            let Some(p) = g.host(a) else {
                panic!("no host address for guest address {a:#x}");
            };
            want.push((p as usize, take as usize));
            a += take;
        }
    }
    let (got, want) = (coalesce(&got), coalesce(&want));
    if iov.len() < libc::UIO_MAXIOV as usize {
        assert_eq!(got, want, "the readable bytes map to other host addresses");
    }
}

/// Merges runs that continue each other.
fn coalesce(runs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &(p, l) in runs {
        if l == 0 {
            continue;
        }
        match out.last_mut() {
            Some((q, m)) if *q + *m == p => *m += l,
            _ => out.push((p, l)),
        }
    }
    out
}

fn at(region: u8, offset: u32) -> GuestAddr {
    GuestAddr::In { region, offset }
}

fn d(addr: GuestAddr, len: u16, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len: Len::Medium { len },
        flags,
        next,
    }
}

fn shape(gap_pages: u8, pages: u8) -> crate::guest::RegionShape {
    crate::guest::RegionShape { gap_pages, pages }
}

/// A 256-entry virtio-net TX queue as Linux lays it out (one region of 64 KiB): header and
/// frame in two descriptors, a frame in an indirect table, and a TSO frame over four pages.
fn net_tx() -> Input {
    let table = at(0, 0xc000);
    Input {
        layout: Layout {
            first: shape(0, 15),
            more: vec![],
        },
        size_log2: 8,
        desc_table: at(0, 0),
        avail: at(0, 0x1000),
        used: at(0, 0x2000),
        event_idx: true,
        next_avail: 0,
        next_used: 0,
        avail_idx: None,
        avail_flags: 0,
        used_event: 0,
        descs: vec![
            d(at(0, 0x4000), 12, NEXT, 1),
            d(at(0, 0x4100), 1514, 0, 0),
            Desc {
                addr: table.clone(),
                len: Len::Table { entries: 2 },
                flags: INDIRECT,
                next: 0,
            },
            d(at(0, 0x5000), 12, NEXT, 4),
            d(at(0, 0x6000), 4096, NEXT, 5),
            d(at(0, 0x7000), 4096, NEXT, 6),
            d(at(0, 0x8000), 4096, NEXT, 7),
            d(at(0, 0x9000), 2000, 0, 0),
        ],
        heads: vec![0, 2, 3],
        tables: vec![Table {
            at: table,
            descs: vec![d(at(0, 0xa000), 12, NEXT, 1), d(at(0, 0xa100), 60, 0, 0)],
        }],
        ops: vec![
            Op::Pop,
            Op::ChainInto,
            Op::PushUsed { len: 0 },
            Op::Pop,
            Op::Chain,
            Op::IoSlices {
                chain: 0,
                offset: 12,
                max: 1500,
            },
            Op::WriteToDevNull {
                chain: 0,
                offset: 12,
            },
            Op::PushUsed { len: 0 },
            Op::Pop,
            Op::Chain,
            Op::ReadAt {
                chain: 1,
                offset: 0,
                len: 12,
            },
            Op::PushUsed { len: 0 },
            Op::Publish,
            Op::NeedsInterrupt,
            Op::EnableKicks,
            Op::Pop,
            Op::Rewind,
            Op::Pending,
            Op::Walk { head: 2 },
            Op::Skip { n: 2 },
            Op::Pending,
        ],
    }
}

/// A virtio-net RX queue (writable buffers, header and frame in one) over two adjacent
/// regions, with the descriptor table and the used ring running across the boundary.
fn net_rx_straddling() -> Input {
    Input {
        layout: Layout {
            first: shape(0, 3),
            more: vec![shape(0, 3), shape(2, 7)],
        },
        size_log2: 8,
        desc_table: GuestAddr::FromEnd {
            region: 0,
            back: 0x800,
        },
        avail: at(1, 0x1000),
        used: GuestAddr::FromEnd {
            region: 1,
            back: 0x400,
        },
        event_idx: false,
        next_avail: 0xfffe,
        next_used: 0xfffe,
        avail_idx: None,
        avail_flags: 0,
        used_event: 0,
        descs: vec![
            d(at(2, 0x0), 1526, WRITE, 0),
            d(
                GuestAddr::FromEnd {
                    region: 0,
                    back: 100,
                },
                1526,
                WRITE,
                0,
            ),
            d(at(2, 0x1000), 1526, WRITE, 0),
        ],
        heads: vec![0, 1, 2],
        tables: vec![],
        ops: vec![
            Op::DisableKicks,
            Op::Pop,
            Op::ChainOf { head: 0 },
            Op::WriteAt {
                chain: 0,
                offset: 0,
                len: 74,
                seed: 7,
            },
            Op::PushUsed { len: 74 },
            Op::Pop,
            Op::Chain,
            Op::WriteAt {
                chain: 1,
                offset: 0,
                len: 1526,
                seed: 1,
            },
            Op::CopyTo {
                from: 0,
                to: 1,
                src_offset: 0,
                dst_offset: 12,
            },
            Op::PushUsed { len: 1526 },
            Op::Publish,
            Op::NeedsInterrupt,
            Op::Rewind,
            Op::Pop,
            Op::Reopen,
            Op::EnableKicks,
        ],
    }
}

/// A virtio-console receive queue: writable 4 KiB buffers filled from a host file.
fn console_rx() -> Input {
    Input {
        layout: Layout {
            first: shape(1, 7),
            more: vec![],
        },
        size_log2: 7,
        desc_table: at(0, 0),
        avail: at(0, 0x800),
        used: at(0, 0xa00),
        event_idx: true,
        next_avail: 5,
        next_used: 5,
        avail_idx: None,
        avail_flags: 0,
        used_event: 5,
        descs: (0..4)
            .map(|i| d(at(0, 0x1000 * (i + 1)), 4096, WRITE, 0))
            .collect(),
        heads: vec![0, 1, 2, 3],
        tables: vec![],
        ops: vec![
            Op::Pop,
            Op::Chain,
            Op::ReadFromDevZero {
                chain: 0,
                offset: 0,
                max: 100,
            },
            Op::PushUsed { len: 100 },
            Op::Publish,
            Op::NeedsInterrupt,
            Op::GuestUsedEvent { event: 7 },
            Op::Pop,
            Op::Chain,
            Op::PushUsed { len: 1 },
            Op::Publish,
            Op::NeedsInterrupt,
            Op::GuestAvailIdx { idx: 20 },
            Op::Pop,
            Op::Pop,
            Op::Pop,
        ],
    }
}

/// What hostile drivers build: a loop, a nested indirect table, an indirect table longer
/// than the queue, a link past the table, an empty buffer, readable after writable.
fn hostile() -> Input {
    let table = at(0, 0x3000);
    Input {
        layout: Layout {
            first: shape(0, 7),
            more: vec![],
        },
        size_log2: 2,
        desc_table: at(0, 0),
        avail: at(0, 0x100),
        used: at(0, 0x200),
        event_idx: false,
        next_avail: 0,
        next_used: 0,
        avail_idx: None,
        avail_flags: 1,
        used_event: 0,
        descs: vec![
            d(at(0, 0x1000), 8, NEXT, 1),
            d(at(0, 0x1000), 8, NEXT, 0),
            Desc {
                addr: table.clone(),
                len: Len::Table { entries: 6 },
                flags: INDIRECT,
                next: 0,
            },
            d(at(0, 0x1000), 0, WRITE | NEXT, 9),
        ],
        heads: vec![0, 2, 3, 7],
        tables: vec![Table {
            at: table,
            descs: vec![
                d(at(0, 0x1000), 8, NEXT | WRITE, 1),
                d(at(0, 0x1100), 8, NEXT, 2),
                d(at(0, 0x1200), 8, NEXT, 3),
                d(at(0, 0x1300), 8, NEXT, 4),
                d(at(0, 0x1400), 8, NEXT | INDIRECT, 5),
                d(at(0, 0x1500), 8, 0, 0),
            ],
        }],
        ops: vec![
            Op::Pop,
            Op::Chain,
            Op::Pop,
            Op::ChainInto,
            Op::Pop,
            Op::Chain,
            Op::Pop,
            Op::Chain,
            Op::PushUsedHead { head: 900, len: 1 },
            Op::PushUsed { len: 0 },
            Op::Publish,
            Op::NeedsInterrupt,
            Op::GuestAvailIdx { idx: 9 },
            Op::Pop,
            Op::EnableKicks,
        ],
    }
}

/// Realistic inputs to start the corpus from.
pub fn seeds() -> Vec<(&'static str, Input)> {
    vec![
        ("net-tx", net_tx()),
        ("net-rx-straddling", net_rx_straddling()),
        ("console-rx", console_rx()),
        ("hostile", hostile()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::Seed;
    use arbitrary::{Arbitrary, Unstructured};

    #[test]
    fn seeds_decode_to_themselves() {
        for (name, input) in seeds() {
            let bytes = input.to_input();
            let back = Input::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
            assert_eq!(back, input, "seed {name} does not decode to itself");
        }
    }

    #[test]
    fn realistic_seeds_pass() {
        let _serial = crate::serial();
        for (name, input) in seeds() {
            if name != "hostile" {
                eprintln!("seed {name}");
                run(&input);
            }
        }
    }
}
