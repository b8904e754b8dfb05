//! The TAP uplink: a TAP device (created if missing) with a virtio-net header and offloads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::sys::{cvt, ifreq_name, ioctl_socket, is_would_block, setup_err};
use super::{RxBatch, SendOutcome, TxBatch, Uplink, UplinkError};
use crate::config::MacAddr;
use crate::virtio_net::HDR_LEN_LEGACY;

vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, b'T' as u32, 208, libc::c_uint);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);

/// A TAP device with IFF_VNET_HDR; frames are read one by one and written with `writev`.
pub struct Tap {
    name: String,
    file: File,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct ifreq` holding a hardware address (SIOCGIFHWADDR / SIOCSIFHWADDR).
#[repr(C)]
struct IfReqHwAddr {
    name: [u8; libc::IFNAMSIZ],
    family: libc::sa_family_t,
    data: [u8; 14],
    _pad: [u8; 8],
}

impl Tap {
    /// Opens (creating if needed) TAP device `name` and brings it up.
    pub fn open(name: &str) -> Result<Tap, UplinkError> {
        Tap::open_with_mac(name, None)
    }

    /// Like [`Tap::open`], first giving the host's end of the TAP the address `mac` if set.
    pub fn open_with_mac(name: &str, mac: Option<MacAddr>) -> Result<Tap, UplinkError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(setup_err(name, "open /dev/net/tun"))?;
        let mut req = IfReq {
            name: ifreq_name(name),
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        let fd = file.as_raw_fd();
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` has its size and layout.
        cvt(unsafe { libc::ioctl(fd, TUNSETIFF(), &mut req) })
            .map_err(setup_err(name, "TUNSETIFF"))?;
        let hdr = HDR_LEN_LEGACY as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        cvt(unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ(), &hdr) })
            .map_err(setup_err(name, "TUNSETVNETHDRSZ"))?;
        let offloads = libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_USO4
            | libc::TUN_F_USO6;
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD(), offloads as libc::c_ulong) } < 0 {
            // Kernels without USO: keep the TCP offloads.
            let tcp_only =
                libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
            // SAFETY: as above.
            cvt(unsafe { libc::ioctl(fd, TUNSETOFFLOAD(), tcp_only as libc::c_ulong) })
                .map_err(setup_err(name, "TUNSETOFFLOAD"))?;
        }
        let tap = Tap {
            name: name.into(),
            file,
        };
        if let Some(mac) = mac {
            tap.set_mac(mac)
                .map_err(setup_err(name, "set the MAC address"))?;
        }
        tap.set_up()
            .map_err(setup_err(name, "bring the interface up"))?;
        Ok(tap)
    }

    /// The MAC address of the host's end of the TAP.
    pub fn mac(&self) -> io::Result<MacAddr> {
        let s = ioctl_socket()?;
        let mut req = self.hwaddr_req();
        // SAFETY: SIOCGIFHWADDR fills the sockaddr of an ifreq-sized buffer; `req` is one.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
        MacAddr::from_slice(&req.data).ok_or_else(|| io::Error::other("short hardware address"))
    }

    fn set_mac(&self, mac: MacAddr) -> io::Result<()> {
        let s = ioctl_socket()?;
        let mut req = self.hwaddr_req();
        req.family = libc::ARPHRD_ETHER;
        req.data[..6].copy_from_slice(&mac.0);
        // SAFETY: SIOCSIFHWADDR reads the sockaddr of an ifreq-sized buffer; `req` is one.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFHWADDR, &req) })?;
        Ok(())
    }

    fn hwaddr_req(&self) -> IfReqHwAddr {
        IfReqHwAddr {
            name: ifreq_name(&self.name),
            family: 0,
            data: [0; 14],
            _pad: [0; 8],
        }
    }

    fn set_up(&self) -> io::Result<()> {
        let s = ioctl_socket()?;
        let mut req = IfReq {
            name: ifreq_name(&self.name),
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: SIOCGIFFLAGS fills `flags` of an ifreq-sized buffer.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads an ifreq-sized buffer.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
        Ok(())
    }
}

impl Uplink for Tap {
    fn describe(&self) -> String {
        format!("tap:{}", self.name)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&self, batch: &mut TxBatch) {
        let iovs = batch.frame_iovecs();
        batch.outcomes.clear();
        for v in &iovs {
            // SAFETY: the iovecs cover host header bytes in `batch` and guest memory the
            // caller keeps mapped for this call; the kernel only reads them.
            let r =
                unsafe { libc::writev(self.file.as_raw_fd(), v.as_ptr(), v.len() as libc::c_int) };
            let outcome = if r >= 0 {
                SendOutcome::Sent
            } else if is_would_block(&io::Error::last_os_error()) {
                SendOutcome::Busy
            } else {
                SendOutcome::Refused
            };
            batch.outcomes.push(outcome);
        }
    }

    fn recv(&self, batch: &mut RxBatch) -> io::Result<usize> {
        batch.count = 0;
        for i in 0..batch.bufs.len() {
            let buf = &mut batch.bufs[i];
            // SAFETY: reads at most `buf.len()` bytes into the exclusively borrowed buffer.
            let r =
                unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if is_would_block(&e) {
                    break;
                }
                if batch.count == 0 {
                    return Err(e);
                }
                break;
            }
            batch.lens[i] = r as usize;
            batch.tags[i] = None;
            batch.count += 1;
        }
        Ok(batch.count)
    }
}
