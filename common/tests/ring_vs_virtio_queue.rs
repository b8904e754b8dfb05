//! Differential test of the ring path: `devshare_common::ring::Ring` (its chain walk plus
//! `GuestBuffers`' buffer checks) against virtio-queue's `DescriptorChain` on the same random
//! rings.
//!
//! virtio-queue walks a chain and stops (without saying why) on a loop, a link past its table,
//! a nested or malformed indirect table or 4 GiB of buffers. It checks nothing about the
//! buffers themselves. The expected result of a chain is therefore virtio-queue's walk with
//! the rules below applied to the buffers it yields, in chain order; each rule is stated here
//! and every case that trips it is checked, not skipped:
//!
//! - `TRUNCATED`: virtio-queue stopped early (its last buffer still says NEXT, or it yielded
//!   nothing): refused as `Broken` (or `TooLong`, when ours stopped at the queue-size rule at
//!   the same place).
//! - `TOO_LONG` (ours only, virtio 1.2 2.7.13.1): more buffers than the queue size, counting a
//!   direct prefix and an indirect table together (virtio-queue restarts its count at an
//!   indirect table): refused as `TooLong` at the buffer past the limit.
//! - `OVERSIZE_TABLE` (ours only): an indirect table with more entries than the queue size:
//!   refused as `Broken` where the walk reaches it. The generator gives every entry of such a
//!   table a buffer in a marker range no other descriptor uses, which is how the expectation
//!   knows the walk went through one.
//! - `READABLE_AFTER_WRITABLE` (virtio 1.2, 2.7.4.2), `TOO_LARGE` (over 1 GiB in total),
//!   `ZERO_LENGTH` (QEMU refuses empty buffers too; virtio-queue does not) and
//!   `OUTSIDE_MEMORY`: the buffer checks, in `GuestBuffers::push_buffer`'s order.
//!
//! A chain both accept must give the same buffers (address, length, direction) and map to the
//! same bytes. `DEVSHARE_DIFF_SEED` and `DEVSHARE_DIFF_CASES` change the seed and the number of
//! random rings.

use std::collections::BTreeMap;

use devshare_common::chain::{ChainError, Memory, MAX_CHAIN_BYTES};
use devshare_common::ring::{Buffer, Ring, Signalled};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Guest memory: two adjacent regions, a gap, a third region.
const REGIONS: [(u64, u64); 3] = [(0, 0x8_0000), (0x8_0000, 0x8_0000), (0x20_0000, 0x4_0000)];
const GAP: (u64, u64) = (0x10_0000, 0x20_0000);
const DESC_TABLE: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
/// Indirect tables, 0x2000 bytes (512 entries) apart.
const TABLES: u64 = 0x1_0000;
const TABLE_SLOTS: u64 = 8;
/// Buffers of oversize indirect tables, and nothing else, lie here.
const MARKER: (u64, u64) = (0x7_0000, 0x7_8000);

/// One refusal rule of the expectation (see the module doc); named in the coverage report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rule {
    Truncated,
    TooLong,
    OversizeTable,
    ReadableAfterWritable,
    TooLarge,
    ZeroLength,
    OutsideMemory,
}

/// What a chain should give.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Buffers(Vec<Buffer>),
    Refused(Rule, Option<ChainError>),
}

struct Gen {
    rng: SmallRng,
    size: u16,
}

impl Gen {
    fn chance(&mut self, percent: u32) -> bool {
        self.rng.random_range(0..100) < percent
    }

    /// A buffer address and length: mostly fine, sometimes empty, outside memory, straddling
    /// regions (adjacent ones are fine, the gap is not), huge or wrapping.
    fn buffer(&mut self) -> (u64, u32) {
        let len = match self.rng.random_range(0..100) {
            0..=4 => 0,
            5..=7 => self.rng.random_range(0x4000_0000..=u32::MAX),
            8..=9 => self.rng.random_range(0x10_0000..0x20_0000),
            _ => self.rng.random_range(1..=4096),
        };
        let addr = match self.rng.random_range(0..100) {
            0..=59 => self.rng.random_range(0x2_0000..0x6_0000),
            60..=69 => self.rng.random_range(0x8_0000..0xf_0000),
            70..=74 => 0x8_0000 - self.rng.random_range(1..=u64::from(len.clamp(1, 4096))),
            75..=79 => GAP.0 - self.rng.random_range(1..=u64::from(len.clamp(1, 4096))),
            80..=84 => self.rng.random_range(GAP.0..GAP.1),
            85..=89 => self.rng.random_range(0x20_0000..0x24_0000),
            90..=94 => 0x24_0000 - self.rng.random_range(0..=64),
            _ => u64::MAX - self.rng.random_range(0..=8192),
        };
        (addr, len)
    }

    /// A descriptor for a table of `table_len` entries at position `at`; `indirect` lists
    /// the indirect tables a pointer may name: (address, entries).
    fn desc(&mut self, at: u16, table_len: u16, indirect: &[(u64, u16)]) -> Descriptor {
        if !indirect.is_empty() && self.chance(8) {
            let (addr, entries) = indirect[self.rng.random_range(0..indirect.len())];
            let len = match self.rng.random_range(0..100) {
                // An oversize table is always named whole: its marker buffers then always mean
                // that the walk went through a table larger than the queue.
                _ if entries > self.size => u32::from(entries) * 16,
                0..=79 => u32::from(entries) * 16,
                80..=84 => 0,
                85..=92 => u32::from(entries) * 16 + self.rng.random_range(1..16),
                _ => self.rng.random_range(1..=u32::from(entries.max(1)) * 16),
            };
            let addr = if self.chance(5) { GAP.0 } else { addr };
            let flags = INDIRECT | if self.chance(20) { NEXT | WRITE } else { 0 };
            return Descriptor::new(addr, len, flags, self.rng.random_range(0..=u16::MAX));
        }
        let (addr, len) = self.buffer();
        let mut flags = 0;
        if self.chance(65) {
            flags |= NEXT;
        }
        if self.chance(35) {
            flags |= WRITE;
        }
        let next = match self.rng.random_range(0..100) {
            // Forward links make long proper chains likely; any link makes loops likely.
            0..=49 => (at + 1).min(table_len.saturating_sub(1)),
            50..=92 => self.rng.random_range(0..table_len.max(1)),
            _ => self.rng.random_range(table_len..=u16::MAX),
        };
        Descriptor::new(addr, len, flags, next)
    }

    /// Overwrites `descs` from `from` on with a proper chain: readable buffers, then writable,
    /// linked forward, ending without NEXT.
    fn proper_chain(&mut self, descs: &mut [Descriptor], from: usize) {
        let n = self.rng.random_range(1..=(descs.len() - from).min(40));
        let writable_from = self.rng.random_range(0..=n);
        for k in 0..n {
            let i = from + k;
            let addr = self.rng.random_range(0x2_0000..0x6_0000);
            let len = self.rng.random_range(1..=2048);
            let mut flags = if k + 1 < n { NEXT } else { 0 };
            if k >= writable_from {
                flags |= WRITE;
            }
            descs[i] = Descriptor::new(addr, len, flags, (i + 1) as u16);
        }
    }
}

fn memory() -> Memory {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = Memory::from_ranges(&ranges).unwrap();
    // A pattern, so the bytes a chain maps can be compared with what lies at its addresses.
    for &(a, l) in &REGIONS {
        let bytes: Vec<u8> = (a..a + l).map(pattern).collect();
        mem.write_slice(&bytes, GuestAddress(a)).unwrap();
    }
    mem
}

fn pattern(addr: u64) -> u8 {
    (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn write_descs(mem: &Memory, at: u64, descs: &[Descriptor]) {
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(at + 16 * i as u64)).unwrap();
    }
}

/// A ready queue of `size` entries over the fixed ring addresses, with `head` made available.
fn queue(mem: &Memory, size: u16, head: u16) -> Queue {
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4))
        .unwrap();
    q
}

fn inside_memory(mem: &Memory, addr: u64, len: u32) -> bool {
    addr.checked_add(u64::from(len)).is_some() && mem.check_range(GuestAddress(addr), len as usize)
}

/// virtio-queue's walk of `head`, with this file's rules applied to what it yields.
fn expect(mem: &Memory, size: u16, head: u16) -> Expect {
    let mut q = queue(mem, size, head);
    let chain = q
        .pop_descriptor_chain(mem)
        .expect("the avail ring holds one entry");
    let descs: Vec<Descriptor> = chain.collect();
    let truncated = descs.last().is_none_or(|d| d.has_next());
    let mut out = Vec::new();
    let (mut total, mut seen_writable) = (0usize, false);
    for (i, d) in descs.iter().enumerate() {
        let (addr, len, write) = (d.addr().0, d.len(), d.is_write_only());
        if (MARKER.0..MARKER.1).contains(&addr) {
            return Expect::Refused(Rule::OversizeTable, Some(ChainError::Broken { head }));
        }
        if i >= usize::from(size) {
            let e = ChainError::TooLong { head, max: size };
            return Expect::Refused(Rule::TooLong, Some(e));
        }
        if write {
            seen_writable = true;
        } else if seen_writable {
            let e = ChainError::ReadableAfterWritable { head };
            return Expect::Refused(Rule::ReadableAfterWritable, Some(e));
        }
        total += len as usize;
        if total > MAX_CHAIN_BYTES {
            return Expect::Refused(Rule::TooLarge, Some(ChainError::TooLarge { head }));
        }
        if len == 0 {
            let e = ChainError::ZeroLength { head, addr };
            return Expect::Refused(Rule::ZeroLength, Some(e));
        }
        if !inside_memory(mem, addr, len) {
            let e = ChainError::OutsideMemory { head, addr, len };
            return Expect::Refused(Rule::OutsideMemory, Some(e));
        }
        out.push(Buffer { addr, len, write });
    }
    if truncated {
        // Ours may stop at the queue-size rule at the very place virtio-queue stopped.
        return Expect::Refused(Rule::Truncated, None);
    }
    Expect::Buffers(out)
}

/// What the ring path gives for `head`: the walk's buffers if `Ring::chain` accepts it.
fn ours(ring: &Ring<'_>, mem: &Memory, head: u16) -> Result<Vec<Buffer>, ChainError> {
    let chain = ring.chain(head)?;
    let mut walked = Vec::new();
    ring.walk(head, |b| {
        walked.push(b);
        Ok(())
    })
    .expect("an accepted chain walks again");
    let readable: usize = walked
        .iter()
        .filter(|b| !b.write)
        .map(|b| b.len as usize)
        .sum();
    let writable: usize = walked
        .iter()
        .filter(|b| b.write)
        .map(|b| b.len as usize)
        .sum();
    assert_eq!(
        (chain.readable_len(), chain.writable_len()),
        (readable, writable)
    );
    // The mapped readable bytes are the ones at the buffers' addresses.
    let want: Vec<u8> = walked
        .iter()
        .filter(|b| !b.write)
        .flat_map(|b| (b.addr..b.addr + u64::from(b.len)).map(pattern))
        .take(8192)
        .collect();
    let mut got = vec![0u8; want.len()];
    assert_eq!(chain.read_at(0, &mut got), want.len());
    assert_eq!(got, want, "chain {head} maps other bytes");
    let _ = mem;
    Ok(walked)
}

#[test]
fn ring_walk_matches_virtio_queue_on_random_rings() {
    let seed: u64 = std::env::var("DEVSHARE_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_de75_4a7e);
    let cases: usize = std::env::var("DEVSHARE_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let mem = memory();
    let mut gen = Gen {
        rng: SmallRng::seed_from_u64(seed),
        size: 1,
    };
    let mut tally: BTreeMap<Rule, usize> = BTreeMap::new();
    let (mut accepted, mut chains, mut indirect_ok) = (0usize, 0usize, 0usize);
    let start = std::time::Instant::now();
    for case in 0..cases {
        gen.size = [1u16, 2, 4, 8, 16, 32, 64, 128, 256][gen.rng.random_range(0..9)];
        let size = gen.size;
        // Indirect tables: mostly at most the queue size, some larger (their buffers in the
        // marker range), some with nested pointers.
        let mut tables = Vec::new();
        for slot in 0..gen.rng.random_range(0..=TABLE_SLOTS) {
            let addr = TABLES + slot * 0x2000;
            let oversize = size < 256 && gen.chance(15);
            let entries: u16 = if oversize {
                gen.rng.random_range(size + 1..=(size * 2 + 2).min(512))
            } else {
                gen.rng.random_range(1..=size)
            };
            let mut descs: Vec<Descriptor> = (0..entries)
                .map(|i| {
                    if oversize {
                        let a = gen.rng.random_range(MARKER.0..MARKER.1 - 64);
                        let f = if i + 1 < entries { NEXT } else { 0 };
                        Descriptor::new(a, 64, f, i + 1)
                    } else {
                        // No pointers to tables yet to be written: nested ones get added below.
                        gen.desc(i, entries, &[])
                    }
                })
                .collect();
            if !oversize && gen.chance(60) {
                gen.proper_chain(&mut descs, 0);
            }
            if !oversize && gen.chance(10) {
                // A nested pointer (to this very table).
                let i = gen.rng.random_range(0..descs.len());
                descs[i] = Descriptor::new(addr, u32::from(entries) * 16, INDIRECT, 0);
            }
            write_descs(&mem, addr, &descs);
            tables.push((addr, entries));
        }
        let mut descs: Vec<Descriptor> = (0..size).map(|i| gen.desc(i, size, &tables)).collect();
        for _ in 0..gen.rng.random_range(0..=3) {
            let from = gen.rng.random_range(0..usize::from(size));
            gen.proper_chain(&mut descs, from);
        }
        // A direct prefix ending in a pointer to a table: together often longer than the
        // queue, which virtio-queue accepts and ours does not.
        let fitting: Vec<(u64, u16)> = tables.iter().copied().filter(|t| t.1 <= size).collect();
        if size > 1 && !fitting.is_empty() && gen.chance(40) {
            let (addr, entries) = fitting[gen.rng.random_range(0..fitting.len())];
            let from = gen.rng.random_range(0..usize::from(size) - 1);
            let n = gen.rng.random_range(1..usize::from(size) - from);
            for (i, d) in descs.iter_mut().enumerate().skip(from).take(n) {
                let a = gen.rng.random_range(0x2_0000..0x6_0000);
                *d = Descriptor::new(a, 100, NEXT, (i + 1) as u16);
            }
            descs[from + n] = Descriptor::new(addr, u32::from(entries) * 16, INDIRECT, 0);
        }
        write_descs(&mem, DESC_TABLE, &descs);

        let q = queue(&mem, size, 0);
        let signalled = Signalled::default();
        let ring = Ring::open(&q, &mem, &signalled).unwrap();
        // Every head of small rings; a sample (and the start of every proper chain is
        // likely among them) of large ones; and heads past the table.
        let heads: Vec<u16> = if size <= 16 {
            (0..size).collect()
        } else {
            (0..16).map(|_| gen.rng.random_range(0..size)).collect()
        };
        let heads = heads.into_iter().chain([size, size + 7, u16::MAX]);
        for head in heads {
            chains += 1;
            let want = expect(&mem, size, head);
            let got = ours(&ring, &mem, head);
            let ctx = || format!("seed {seed:#x}, case {case}, size {size}, head {head}");
            match (&want, &got) {
                (Expect::Buffers(w), Ok(g)) => {
                    assert_eq!(w, g, "{}", ctx());
                    accepted += 1;
                    let via_table = descs
                        .get(usize::from(head))
                        .is_some_and(|d| d.refers_to_indirect_table());
                    indirect_ok += usize::from(via_table);
                }
                (Expect::Refused(Rule::Truncated, _), Err(e)) => {
                    assert!(
                        matches!(e, ChainError::Broken { .. } | ChainError::TooLong { .. }),
                        "{}: virtio-queue stopped early, ours said {e:?}",
                        ctx()
                    );
                    *tally.entry(Rule::Truncated).or_default() += 1;
                }
                (Expect::Refused(rule, Some(w)), Err(e)) => {
                    assert_eq!(w, e, "{}: rule {rule:?}", ctx());
                    *tally.entry(*rule).or_default() += 1;
                }
                _ => panic!("{}: expected {want:?}, ours gave {got:?}", ctx()),
            }
        }
    }
    let elapsed = start.elapsed();
    eprintln!(
        "{cases} rings, {chains} chains in {elapsed:?}: {accepted} accepted \
         ({indirect_ok} through an indirect table), refused by rule: {tally:?}"
    );
    // The generator must reach every rule, and plenty of good chains, or the comparison says
    // little.
    let rules = [
        Rule::Truncated,
        Rule::TooLong,
        Rule::OversizeTable,
        Rule::ReadableAfterWritable,
        Rule::TooLarge,
        Rule::ZeroLength,
        Rule::OutsideMemory,
    ];
    for rule in rules {
        let n = tally.get(&rule).copied().unwrap_or(0);
        assert!(n >= cases / 100, "rule {rule:?} was tripped only {n} times");
    }
    assert!(
        accepted >= chains / 20,
        "only {accepted} of {chains} chains were accepted"
    );
    assert!(
        indirect_ok >= cases / 100,
        "only {indirect_ok} indirect chains accepted"
    );
}
