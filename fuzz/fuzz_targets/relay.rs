//! The front-end message relay with real descriptors over real sockets: see
//! `devshare_fuzz::relay` for the inputs and what is checked.

#![no_main]

use devshare_fuzz::relay::{run, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| run(&input));
