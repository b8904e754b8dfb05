//! Test harnesses.
pub mod console_guest;
pub mod frontend;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod testdata;
pub mod workspace;
