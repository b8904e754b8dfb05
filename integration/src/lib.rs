//! Test harnesses.
pub mod frontend;
pub mod qemu;
pub mod workspace;
