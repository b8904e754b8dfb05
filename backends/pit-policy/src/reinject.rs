//! `KVM_REINJECT_CONTROL`: switch the in-kernel PIT's catch-up of missed ticks on or off.
//!
//! kvm-ioctls wraps `KVM_CREATE_PIT2` but not this ioctl, so it is issued here directly.

use std::io;
use std::os::fd::AsRawFd;

use devshare_common::pit::LostTickPolicy;
use kvm_bindings::kvm_reinject_control;
use vmm_sys_util::ioctl::ioctl_with_ref;

// The kernel declares it `_IO(KVMIO, 0x71)`: no size is encoded although it takes a struct.
vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// Why KVM refused to change the PIT reinjection policy.
#[derive(Debug, thiserror::Error)]
pub enum ReinjectError {
    /// The VM has no in-kernel PIT (ENXIO).
    #[error(
        "no in-kernel PIT yet: create it with KVM_CREATE_PIT2 first \
         (KVM_REINJECT_CONTROL returned ENXIO)"
    )]
    NoPit,
    /// The calling process is not the one that created the VM (EIO).
    #[error(
        "KVM_REINJECT_CONTROL refused with EIO: only the process that created the VM may \
         change it (for QEMU, choose the policy at start with -global kvm-pit.lost_tick_policy)"
    )]
    NotVmCreator,
    /// The kernel does not know the ioctl or the fd is no VM (ENOTTY/EINVAL).
    #[error("KVM_REINJECT_CONTROL is not supported on this fd/kernel: {0}")]
    Unsupported(io::Error),
    /// Any other failure.
    #[error("KVM_REINJECT_CONTROL failed: {0}")]
    Other(io::Error),
}

/// Sets the PIT lost-tick policy of the VM behind `vm_fd` (a KVM VM file descriptor).
///
/// `Delay` turns reinjection on (the kernel's default), `Discard` turns it off.
pub fn set_pit_reinject(vm_fd: &impl AsRawFd, policy: LostTickPolicy) -> Result<(), ReinjectError> {
    let control = kvm_reinject_control {
        pit_reinject: u8::from(policy.reinject()),
        ..Default::default()
    };
    // SAFETY: KVM_REINJECT_CONTROL reads one `struct kvm_reinject_control`, which `control`
    // is (kvm-bindings checks its 32-byte layout); the kernel does not keep the pointer. A
    // wrong fd only makes the call fail, which is checked below.
    let ret = unsafe { ioctl_with_ref(vm_fd, KVM_REINJECT_CONTROL(), &control) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::ENXIO) => ReinjectError::NoPit,
        Some(libc::EIO) => ReinjectError::NotVmCreator,
        Some(libc::ENOTTY) | Some(libc::EINVAL) => ReinjectError::Unsupported(err),
        _ => ReinjectError::Other(err),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_number_matches_kernel_io_encoding() {
        // _IO(0xAE, 0x71): direction none, size 0.
        assert_eq!(KVM_REINJECT_CONTROL(), 0xAE71);
    }

    #[test]
    fn non_kvm_fd_is_an_error_not_a_panic() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = set_pit_reinject(&file, LostTickPolicy::Delay).unwrap_err();
        assert!(matches!(err, ReinjectError::Unsupported(_)), "{err:?}");
    }
}
