//! Frames with random virtio-net, Ethernet, VLAN and IP headers through netmux's switch: see
//! `devshare_fuzz::net` for what is checked.

#![no_main]

use devshare_fuzz::net::{run, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| run(&input));
