//! `kvm-pit-policy`: choose, check and measure KVM's in-kernel PIT lost-tick policy.
//!
//! - [`cmdline`] reads a QEMU command line and says which policy is in effect, or why
//!   there is no in-kernel PIT for it to apply to.
//! - [`inspect`] finds running QEMUs in /proc and checks that reading against the kernel's
//!   own evidence (KVM VM fds, the `kvm-pit/<pid>` worker thread); [`binary`] reads which
//!   QEMU version a process runs, whose rules the reading follows.
//! - [`lab`] runs a tiny real-mode guest on `/dev/kvm` that counts PIT ticks while the host
//!   withholds its vCPU, once per policy ([`reinject`] sets it, [`guest`] is the program,
//!   [`stall`] the withholding pattern); [`plot`] draws the result as a PNG.

pub mod binary;
pub mod cmdline;
pub mod guest;
pub mod inspect;
pub mod lab;
pub mod plot;
pub mod png;
pub mod reinject;
pub mod stall;
