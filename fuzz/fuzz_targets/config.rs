//! Config files and command-line specs of both backends: see `devshare_fuzz::config` for
//! the input format and what is checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devshare_fuzz::config::run(data));
