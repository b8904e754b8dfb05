//! The console's control-queue conversation driven by a hostile driver: see
//! `devshare_fuzz::control` for what is checked.

#![no_main]

use devshare_fuzz::control::{run, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| run(&input));
