//! Test harnesses.
pub mod frontend;
