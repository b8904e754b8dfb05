//! The control-queue conversation of a MULTIPORT device (virtio 1.2, 5.3.6.2): the driver
//! says DEVICE_READY, the device announces every port (DEVICE_ADD), the driver says
//! PORT_READY per port and the device names it (PORT_NAME), marks the console (CONSOLE_PORT,
//! then its size with RESIZE) and opens its side (PORT_OPEN); the driver's PORT_OPEN tells
//! whether a program in the guest has the port open.
//!
//! Messages to the driver wait in a queue until it posts control receive buffers. The queue
//! holds at most one message per port and event: a newer one replaces the one waiting (a
//! RESIZE carries the newer size; the other events say the same again), so a driver that
//! repeats DEVICE_READY or PORT_READY without posting buffers cannot make it grow.

use std::collections::VecDeque;

use devshare_common::ratelimit::RateLimit;
use devshare_common::ring::RingError;
use devshare_common::warn_limited;

use crate::port::Port;
use crate::queue::{Batch, Budget, Pass};
use crate::virtio_console as vc;

/// What the device must do after a driver message.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing more.
    None,
    /// A program in the guest opened port `n`: host input (and a linked peer's output) may
    /// flow into it now.
    Opened(usize),
}

/// The device's side of the conversation: the messages waiting for the driver.
///
/// What the driver does wrong is logged through the VM's limit (`limit` below): it outlives
/// the connection, so a front-end that reconnects does not get a fresh burst of lines.
#[derive(Debug, Default)]
pub struct ControlChannel {
    out: VecDeque<Vec<u8>>,
}

impl ControlChannel {
    /// Messages waiting for a control receive buffer.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    fn send(&mut self, msg: Vec<u8>) {
        // The port id and the event: the first six bytes of every message.
        match self.out.iter_mut().find(|m| m.get(..6) == msg.get(..6)) {
            Some(waiting) => *waiting = msg,
            None => self.out.push_back(msg),
        }
    }

    /// Queues a RESIZE of port `port` to `cols` x `rows`.
    pub fn send_resize(&mut self, port: usize, cols: u16, rows: u16) {
        // virtio 1.2 5.3.6.2: struct virtio_console_resize { le16 cols; le16 rows; }. Debian's
        // 6.1 guest kernel reads it that way: with this order `stty size` in the guest shows
        // the host terminal's rows and columns (checked by a QEMU test).
        let mut payload = Vec::with_capacity(4);
        payload.extend_from_slice(&cols.to_le_bytes());
        payload.extend_from_slice(&rows.to_le_bytes());
        self.send(vc::Control::encode(port as u32, vc::RESIZE, 0, &payload));
    }

    /// Reads the messages the driver queued on the control transmitq (`tx`), until the ring
    /// is empty or the event's `budget` is spent (then the caller kicks the queue for the
    /// rest); None stands for a malformed one. Every chain read goes back used. A broken ring
    /// ends the reading early; its error comes back beside the messages read before.
    pub fn receive(
        &mut self,
        vm: &str,
        limit: &RateLimit,
        tx: &mut Batch<'_, '_>,
        budget: &Budget,
    ) -> (Vec<Option<vc::Control>>, Result<Pass, RingError>) {
        let mut msgs = Vec::new();
        loop {
            if budget.spent() {
                return (msgs, Ok(Pass::Yielded));
            }
            let head = match tx.pop() {
                Ok(Some(head)) => head,
                Ok(None) => return (msgs, Ok(Pass::Done)),
                Err(e) => return (msgs, Err(e)),
            };
            match tx.chain(head) {
                Ok(b) => {
                    // The header is copied out of guest memory once and decoded from the
                    // copy: the driver cannot change it between a check and a use.
                    let mut raw = [0u8; 8];
                    msgs.push(if b.read_at(0, &mut raw) == 8 {
                        vc::Control::decode(&raw)
                    } else {
                        None
                    });
                }
                Err(e) => {
                    warn_limited!(limit, "{vm}: refused control chain: {e}");
                    msgs.push(None);
                }
            }
            tx.charge(budget, 8);
            tx.push_used(head, 0);
        }
    }

    /// Writes waiting messages into the driver's control receive buffers (`rx`) while there
    /// are some. A buffer too small for its message loses that message (logged); a malformed
    /// chain is refused and the message kept for the next buffer.
    pub fn flush(&mut self, vm: &str, limit: &RateLimit, rx: &mut Batch<'_, '_>) {
        while let Some(msg) = self.out.pop_front() {
            let Ok(Some(head)) = rx.pop() else {
                self.out.push_front(msg);
                break;
            };
            match rx.chain(head) {
                Ok(b) if b.writable_len() >= msg.len() => {
                    let n = b.write_at(0, &msg);
                    rx.push_used(head, n as u32);
                }
                Ok(_) => {
                    warn_limited!(
                        limit,
                        "{vm}: control buffer too small for a {}-byte message; message dropped",
                        msg.len()
                    );
                    rx.push_used(head, 0);
                }
                Err(e) => {
                    warn_limited!(limit, "{vm}: refused control chain: {e}");
                    self.out.push_front(msg);
                    rx.push_used(head, 0);
                }
            }
        }
    }

    /// A driver message too short to read (logged within limits).
    pub fn malformed(&mut self, vm: &str, limit: &RateLimit) {
        warn_limited!(
            limit,
            "{vm}: malformed control message (shorter than 8 bytes) ignored"
        );
    }

    /// A kick on a queue the device does not use (logged within limits).
    pub fn unused_queue(&mut self, vm: &str, limit: &RateLimit, q: usize) {
        warn_limited!(limit, "{vm}: kick on unused queue {q}");
    }

    /// Answers one driver message about `ports`.
    pub fn answer(
        &mut self,
        vm: &str,
        limit: &RateLimit,
        c: vc::Control,
        ports: &mut [Port],
    ) -> Effect {
        log::debug!("{vm}: control message {c:?}");
        let id = c.id as usize;
        match c.event {
            vc::DEVICE_READY => {
                if c.value != 1 {
                    warn_limited!(limit, "{vm}: guest driver failed to initialise the device");
                    return Effect::None;
                }
                for i in 0..ports.len() {
                    self.send(vc::Control::encode(i as u32, vc::DEVICE_ADD, 1, &[]));
                }
                Effect::None
            }
            vc::PORT_READY if id < ports.len() => {
                if c.value != 1 {
                    warn_limited!(limit, "{vm}: guest failed to set up port {id}");
                    return Effect::None;
                }
                let port = &mut ports[id];
                if port.console {
                    self.send(vc::Control::encode(c.id, vc::CONSOLE_PORT, 1, &[]));
                    if let Some((cols, rows)) = port.winsize {
                        self.send_resize(id, cols, rows);
                    }
                    // The kernel's console port counts as opened by the guest.
                    port.guest_open = true;
                }
                self.send(vc::Control::encode(
                    c.id,
                    vc::PORT_NAME,
                    1,
                    port.name.as_bytes(),
                ));
                // Output is always accepted (buffered when nothing is attached), so the host
                // side is open from the guest's point of view.
                self.send(vc::Control::encode(c.id, vc::PORT_OPEN, 1, &[]));
                Effect::None
            }
            vc::PORT_OPEN if id < ports.len() => {
                let open = c.value == 1;
                let port = &mut ports[id];
                port.guest_open = open || port.console;
                log::debug!(
                    "{vm}: guest {} port {id}",
                    if open { "opened" } else { "closed" }
                );
                if open {
                    port.rx_starved = false;
                    return Effect::Opened(id);
                }
                Effect::None
            }
            vc::PORT_READY | vc::PORT_OPEN => {
                warn_limited!(limit, "{vm}: control message for unknown port {id} ignored");
                Effect::None
            }
            other => {
                warn_limited!(limit, "{vm}: unexpected control event {other} ignored");
                Effect::None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::Rig;
    use crate::virtio_console as vc;

    /// Sends one control message from the driver and returns the device's answers, read
    /// from control receive buffers of 64 bytes posted beforehand.
    fn talk(rig: &mut Rig, id: u32, event: u16, value: u16) -> Vec<vc::Control> {
        rig.post(
            vc::CONTROL_TX,
            &vc::Control::encode(id, event, value, &[]),
            0,
        );
        rig.vms().on_queue_event(0, vc::CONTROL_TX);
        assert_eq!(rig.used(vc::CONTROL_TX).len(), 1);
        answers(rig)
    }

    fn answers(rig: &mut Rig) -> Vec<vc::Control> {
        rig.used(vc::CONTROL_RX)
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(head, len)| {
                let raw = rig.written(vc::CONTROL_RX, head, len);
                vc::Control::decode(&raw).unwrap()
            })
            .collect()
    }

    fn post_buffers(rig: &mut Rig, n: usize, size: u32) {
        for _ in 0..n {
            rig.post(vc::CONTROL_RX, b"", size);
        }
    }

    fn event(c: &[vc::Control]) -> Vec<(u32, u16, u16)> {
        c.iter().map(|c| (c.id, c.event, c.value)).collect()
    }

    #[test]
    fn the_conversation_announces_names_and_opens_every_port() {
        let mut rig = Rig::new("control", "64", vc::F_MULTIPORT);
        post_buffers(&mut rig, 8, 64);
        let got = talk(&mut rig, 0, vc::DEVICE_READY, 1);
        assert_eq!(
            event(&got),
            vec![(0, vc::DEVICE_ADD, 1), (1, vc::DEVICE_ADD, 1)]
        );
        let got = talk(&mut rig, 0, vc::PORT_READY, 1);
        assert_eq!(
            event(&got),
            vec![
                (0, vc::CONSOLE_PORT, 1),
                (0, vc::PORT_NAME, 1),
                (0, vc::PORT_OPEN, 1)
            ]
        );
        assert!(rig.vms().devices[0].ports[0].guest_open);
        let got = talk(&mut rig, 1, vc::PORT_READY, 1);
        assert_eq!(
            event(&got),
            vec![(1, vc::PORT_NAME, 1), (1, vc::PORT_OPEN, 1)]
        );
        // The name follows the header.
        let heads: Vec<u16> = (0..8).collect();
        let name = heads
            .iter()
            .map(|&h| rig.written(vc::CONTROL_RX, h, 12))
            .find(|raw| {
                vc::Control::decode(raw).map(|c| (c.id, c.event)) == Some((1, vc::PORT_NAME))
            })
            .unwrap();
        assert_eq!(&name[8..12], b"data");
        assert!(!rig.vms().devices[0].ports[1].guest_open);
        assert_eq!(talk(&mut rig, 1, vc::PORT_OPEN, 1), vec![]);
        assert!(rig.vms().devices[0].ports[1].guest_open);
        talk(&mut rig, 1, vc::PORT_OPEN, 0);
        assert!(!rig.vms().devices[0].ports[1].guest_open);
        // The console stays open whatever the guest says.
        talk(&mut rig, 0, vc::PORT_OPEN, 0);
        assert!(rig.vms().devices[0].ports[0].guest_open);
    }

    #[test]
    fn answers_wait_for_buffers_and_a_too_small_buffer_loses_only_its_message() {
        let mut rig = Rig::new("control-small", "64", vc::F_MULTIPORT);
        // No receive buffer yet: the answers wait.
        assert_eq!(talk(&mut rig, 0, vc::DEVICE_READY, 1), vec![]);
        rig.post(vc::CONTROL_RX, b"", 4);
        rig.post(vc::CONTROL_RX, b"", 64);
        rig.vms().on_queue_event(0, vc::CONTROL_RX);
        let used = rig.used(vc::CONTROL_RX);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![0, 8]);
        let raw = rig.written(vc::CONTROL_RX, used[1].0, 8);
        let c = vc::Control::decode(&raw).unwrap();
        assert_eq!((c.id, c.event), (1, vc::DEVICE_ADD));
    }

    // Found by the control fuzz target (issue 10: the reply queue grew by one DEVICE_ADD per
    // port for every DEVICE_READY while the driver posted no receive buffers).
    #[test]
    fn a_driver_repeating_itself_without_buffers_cannot_grow_the_reply_queue() {
        let mut rig = Rig::new("control-repeat", "64", vc::F_MULTIPORT);
        for _ in 0..100 {
            assert_eq!(talk(&mut rig, 0, vc::DEVICE_READY, 1), vec![]);
            assert_eq!(talk(&mut rig, 1, vc::PORT_READY, 1), vec![]);
        }
        let pending = rig.vms().devices[0].conn().unwrap().control.pending();
        assert_eq!(
            pending, 4,
            "DEVICE_ADD of both ports, PORT_NAME and PORT_OPEN of port 1"
        );
        // Each waiting message reaches the driver once buffers come.
        post_buffers(&mut rig, 8, 64);
        rig.vms().on_queue_event(0, vc::CONTROL_RX);
        assert_eq!(
            event(&answers(&mut rig)),
            vec![
                (0, vc::DEVICE_ADD, 1),
                (1, vc::DEVICE_ADD, 1),
                (1, vc::PORT_NAME, 1),
                (1, vc::PORT_OPEN, 1)
            ]
        );
    }

    #[test]
    fn malformed_control_messages_are_returned_and_ignored() {
        let mut rig = Rig::new("control-bad", "64", vc::F_MULTIPORT);
        post_buffers(&mut rig, 4, 64);
        // Too short (a DEVICE_READY cut off before its last byte), outside memory, an unknown
        // port, an unknown event: no answer to any.
        let whole = vc::Control::encode(0, vc::DEVICE_READY, 1, &[]);
        rig.post(vc::CONTROL_TX, &whole[..7], 0);
        rig.post_raw(vc::CONTROL_TX, &[(0x1000_0000, 8, 0)]);
        rig.post(
            vc::CONTROL_TX,
            &vc::Control::encode(77, vc::PORT_READY, 1, &[]),
            0,
        );
        rig.post(vc::CONTROL_TX, &vc::Control::encode(0, 0x4242, 1, &[]), 0);
        rig.vms().on_queue_event(0, vc::CONTROL_TX);
        assert_eq!(rig.used(vc::CONTROL_TX).len(), 4);
        assert_eq!(answers(&mut rig), vec![]);
        // The conversation goes on.
        let got = talk(&mut rig, 0, vc::DEVICE_READY, 1);
        assert_eq!(got.len(), 2);
    }
}
