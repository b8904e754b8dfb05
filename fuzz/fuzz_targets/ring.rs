//! Descriptor-chain parsing over the ring path, with random tables, indirect descriptors,
//! avail indices and memory layouts: see `devshare_fuzz::ring` for what is checked.

#![no_main]

use devshare_fuzz::ring::{run, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| run(&input));
