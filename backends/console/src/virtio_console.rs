//! virtio-console definitions (virtio 1.2, section 5.3) used by the device.

use vm_memory::ByteValued;

/// Console size in the config space is valid; resize messages are sent.
pub const F_SIZE: u64 = 1 << 0;
/// Several ports and the control queues.
pub const F_MULTIPORT: u64 = 1 << 1;
/// Emergency write through the config space.
pub const F_EMERG_WRITE: u64 = 1 << 2;

/// Driver is ready to take port announcements.
pub const DEVICE_READY: u16 = 0;
/// Device announces a port.
pub const DEVICE_ADD: u16 = 1;
/// Device removes a port.
pub const DEVICE_REMOVE: u16 = 2;
/// Driver has set up a port.
pub const PORT_READY: u16 = 3;
/// The port is a console (hvc).
pub const CONSOLE_PORT: u16 = 4;
/// Console size changed.
pub const RESIZE: u16 = 5;
/// A side opened (value 1) or closed (value 0) the port.
pub const PORT_OPEN: u16 = 6;
/// The port's name follows the header.
pub const PORT_NAME: u16 = 7;

/// Header of every control message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Control {
    /// Port number.
    pub id: u32,
    /// One of the event constants above.
    pub event: u16,
    /// Event argument.
    pub value: u16,
}

// SAFETY: plain little-endian integers with no padding (4 + 2 + 2 bytes); any byte pattern is
// a valid value.
unsafe impl ByteValued for Control {}

impl Control {
    /// Encodes the header in guest (little-endian) byte order, followed by `payload`.
    pub fn encode(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + payload.len());
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&event.to_le_bytes());
        v.extend_from_slice(&value.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Decodes a header from guest bytes.
    pub fn decode(b: &[u8]) -> Option<Control> {
        if b.len() < 8 {
            return None;
        }
        Some(Control {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }
}

/// Size of the config space: cols, rows, max_nr_ports, emerg_wr.
pub const CONFIG_SIZE: usize = 12;
/// Offset of `emerg_wr` in the config space.
pub const CONFIG_EMERG_WR: u32 = 8;

/// The config space, little-endian.
pub fn config_bytes(cols: u16, rows: u16, max_ports: u32) -> [u8; CONFIG_SIZE] {
    let mut b = [0u8; CONFIG_SIZE];
    b[0..2].copy_from_slice(&cols.to_le_bytes());
    b[2..4].copy_from_slice(&rows.to_le_bytes());
    b[4..8].copy_from_slice(&max_ports.to_le_bytes());
    b
}

/// Queue indexes of a port: (receiveq, transmitq). Port 0 uses 0/1, the control queues are
/// 2/3, port n>0 uses 2+2n / 3+2n.
pub fn port_queues(port: usize) -> (usize, usize) {
    if port == 0 {
        (0, 1)
    } else {
        (2 + 2 * port, 3 + 2 * port)
    }
}

/// Control receiveq (device to driver).
pub const CONTROL_RX: usize = 2;
/// Control transmitq (driver to device).
pub const CONTROL_TX: usize = 3;

/// Number of virtqueues for `ports` ports.
pub const fn queue_count(ports: usize, multiport: bool) -> usize {
    if multiport {
        4 + 2 * ports.saturating_sub(1)
    } else {
        2
    }
}

/// Most virtqueues one device may have: vhost-user-backend hands each worker thread its queues
/// as the bits of a `u64` (`queues_per_thread`), and every queue of a VM is served by one
/// worker. 64 queues are 31 ports with MULTIPORT, QEMU's default `max_ports` of virtio-serial.
pub const MAX_QUEUES: usize = 64;

/// The worker's queue mask for a device of `queues` queues: one bit per queue, all of them
/// for `MAX_QUEUES` (where `1 << queues` would overflow).
pub fn queue_mask(queues: usize) -> u64 {
    match u32::try_from(queues).ok().and_then(|n| 1u64.checked_shl(n)) {
        Some(bit) => bit - 1,
        None => u64::MAX,
    }
}

/// What a queue index is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// Host to guest data of a port.
    Receive(usize),
    /// Guest to host data of a port.
    Transmit(usize),
    /// Control messages to the driver.
    ControlReceive,
    /// Control messages from the driver.
    ControlTransmit,
}

/// Maps a queue index to its role.
pub fn queue_role(q: usize) -> QueueRole {
    match q {
        0 => QueueRole::Receive(0),
        1 => QueueRole::Transmit(0),
        CONTROL_RX => QueueRole::ControlReceive,
        CONTROL_TX => QueueRole::ControlTransmit,
        n if n % 2 == 0 => QueueRole::Receive((n - 2) / 2),
        n => QueueRole::Transmit((n - 3) / 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_layout_round_trips() {
        for p in 0..8 {
            let (rx, tx) = port_queues(p);
            assert_eq!(queue_role(rx), QueueRole::Receive(p));
            assert_eq!(queue_role(tx), QueueRole::Transmit(p));
        }
        assert_eq!(queue_count(3, true), 8);
        assert_eq!(queue_count(1, false), 2);
    }

    #[test]
    fn queue_masks_cover_every_queue_up_to_the_largest_device() {
        assert_eq!(queue_mask(2), 0b11);
        assert_eq!(queue_mask(6), 0x3f);
        assert_eq!(queue_mask(63), u64::MAX >> 1);
        assert_eq!(queue_mask(MAX_QUEUES), u64::MAX);
        let largest = queue_count(crate::config::MAX_PORTS, true);
        assert_eq!(largest, MAX_QUEUES);
        assert_eq!(queue_mask(largest).count_ones() as usize, largest);
        // Every queue of the largest device has a role.
        let (rx, tx) = port_queues(crate::config::MAX_PORTS - 1);
        assert_eq!(tx, MAX_QUEUES - 1);
        assert_eq!(queue_role(rx), QueueRole::Receive(30));
    }

    #[test]
    fn control_codec() {
        let b = Control::encode(3, PORT_NAME, 1, b"x");
        assert_eq!(b.len(), 9);
        let c = Control::decode(&b).unwrap();
        assert_eq!((c.id, c.event, c.value), (3, PORT_NAME, 1));
        assert!(Control::decode(&b[..7]).is_none());
    }
}
