//! Test harnesses.
pub mod frontend;
pub mod process;
pub mod qemu;
pub mod workspace;
