//! Guest memory shaped by the fuzzer: a few regions with gaps between them (or none, so that
//! rings and buffers straddle two regions), and guest addresses expressed relative to them so
//! that most land inside memory, some right at a region's end and some anywhere.

use crate::{seed_enum, seed_struct};
use devshare_common::chain::Memory;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Page size the layouts count in.
pub const PAGE: u64 = 4096;

seed_struct! {
    /// One region: the gap before it and its size, in pages.
    pub struct RegionShape {
        pub gap_pages: u8,
        pub pages: u8,
    }
}

seed_struct! {
    /// Up to four regions, each up to `max_pages` pages, after gaps of up to three pages.
    pub struct Layout {
        pub first: RegionShape,
        pub more: Vec<RegionShape>,
    }
}

seed_enum! {
    /// A guest address: inside a region (possibly a little past its end), counted back from
    /// a region's end (a buffer there runs into the next region or off memory), or any value.
    pub enum GuestAddr {
        In { region: u8, offset: u32 },
        FromEnd { region: u8, back: u16 },
        Raw { addr: u64 },
    }
}

/// Built guest memory and where its regions are.
pub struct Guest {
    /// The memory.
    pub mem: Memory,
    /// (start, length) of each region, in address order.
    pub regions: Vec<(u64, u64)>,
}

impl Layout {
    /// Maps the regions (anonymous memory, zeroed). `max_pages` bounds each region.
    pub fn build(&self, max_pages: u8) -> Guest {
        let mut regions = Vec::new();
        let mut at = 0u64;
        for shape in std::iter::once(&self.first).chain(self.more.iter().take(3)) {
            at += u64::from(shape.gap_pages % 4) * PAGE;
            let len = u64::from(shape.pages % max_pages.max(1) + 1) * PAGE;
            regions.push((at, len));
            at += len;
        }
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = match Memory::from_ranges(&ranges) {
            Ok(m) => m,
            Err(e) => panic!("cannot map guest memory {regions:x?}: {e}"),
        };
        Guest { mem, regions }
    }
}

impl Guest {
    /// The guest address `a` stands for.
    pub fn addr(&self, a: &GuestAddr) -> u64 {
        match *a {
            GuestAddr::In { region, offset } => {
                let (start, len) = self.regions[usize::from(region) % self.regions.len()];
                start + u64::from(offset) % (len + 64)
            }
            GuestAddr::FromEnd { region, back } => {
                let (start, len) = self.regions[usize::from(region) % self.regions.len()];
                (start + len).saturating_sub(u64::from(back) % 512)
            }
            GuestAddr::Raw { addr } => addr,
        }
    }

    /// Whether `len` bytes at `addr` are all guest memory (possibly over several regions).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut at = addr;
        while at < end {
            match self.regions.iter().find(|&&(s, l)| at >= s && at < s + l) {
                Some(&(s, l)) => at = s + l,
                None => return false,
            }
        }
        true
    }

    /// Whether the host range `[p, p + len)` lies inside one region's mapping.
    pub fn host_range_inside(&self, p: *const u8, len: usize) -> bool {
        let p = p as usize;
        self.mem.iter().any(|r| {
            let base = r.as_ptr() as usize;
            p >= base
                && p.checked_add(len)
                    .is_some_and(|e| e <= base + r.len() as usize)
        })
    }

    /// The host address of guest address `addr` (which must be guest memory).
    pub fn host(&self, addr: u64) -> Option<*const u8> {
        self.mem
            .get_host_address(GuestAddress(addr))
            .ok()
            .map(|p| p as *const u8)
    }

    /// A copy of every region's bytes, in address order.
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.regions
            .iter()
            .map(|&(s, l)| {
                let mut v = vec![0u8; l as usize];
                if let Err(e) = vm_memory::Bytes::read_slice(&self.mem, &mut v, GuestAddress(s)) {
                    panic!("cannot read region at {s:#x}: {e}");
                }
                v
            })
            .collect()
    }

    /// Guest addresses whose bytes differ between two snapshots, as (start, length) runs.
    pub fn changes(&self, before: &[Vec<u8>], after: &[Vec<u8>]) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for ((&(start, _), b), a) in self.regions.iter().zip(before).zip(after) {
            // Whole pages first (one memcmp each): nearly all are unchanged.
            for (p, (bp, ap)) in b
                .chunks(PAGE as usize)
                .zip(a.chunks(PAGE as usize))
                .enumerate()
            {
                if bp == ap {
                    continue;
                }
                for (i, (x, y)) in bp.iter().zip(ap).enumerate() {
                    if x == y {
                        continue;
                    }
                    let addr = start + (p * PAGE as usize + i) as u64;
                    match runs.last_mut() {
                        Some((s, l)) if *s + *l == addr => *l += 1,
                        _ => runs.push((addr, 1)),
                    }
                }
            }
        }
        runs
    }

    /// Copies the current bytes of `[addr, addr + len)` (where it is guest memory) into
    /// `shadow`, a [`Guest::snapshot`]: after the guest itself wrote there.
    pub fn sync(&self, shadow: &mut [Vec<u8>], addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        for (i, &(start, rlen)) in self.regions.iter().enumerate() {
            let (from, to) = (addr.max(start), end.min(start + rlen));
            if from < to {
                let part = &mut shadow[i][(from - start) as usize..(to - start) as usize];
                let _ = vm_memory::Bytes::read_slice(&self.mem, part, GuestAddress(from));
            }
        }
    }

    /// The bytes of `[addr, addr + len)`, if all of it is guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        if !self.contains(addr, len as u64) {
            return None;
        }
        let mut v = vec![0u8; len];
        vm_memory::Bytes::read_slice(&self.mem, &mut v, GuestAddress(addr)).ok()?;
        Some(v)
    }

    /// How many pieces `[addr, addr + len)` falls into (one per region it touches).
    pub fn pieces(&self, addr: u64, len: u64) -> usize {
        let end = addr.saturating_add(len);
        self.regions
            .iter()
            .filter(|&&(s, l)| addr < s + l && end > s)
            .count()
    }
}
