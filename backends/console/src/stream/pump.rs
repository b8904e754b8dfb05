//! Stream-mode pumping: guest output from QEMU's socket into the port (keeping the newest
//! bytes: a guest's serial port must never stall), and host input from the endpoint to QEMU,
//! only as fast as QEMU takes it.

use std::os::fd::RawFd;

use vmm_sys_util::epoll::EventSet;

use super::StreamEvent;
use crate::device::{Device, Guest};
use crate::port::{Host, Pieces};

/// Bytes read from QEMU's socket per system call.
const OUT_CHUNK: usize = 64 * 1024;
/// Bytes read from the endpoint per system call.
const IN_CHUNK: usize = 16 * 1024;

impl Device {
    /// One of the stream socket's fds is ready.
    pub fn stream_ready(&mut self, fd: RawFd, ev: EventSet) {
        let name = self.cfg.name.clone();
        let Guest::Stream(s) = &mut self.guest else {
            return;
        };
        match s.on_ready(fd, ev) {
            Ok(StreamEvent::Connected) => {
                log::info!("{name}: QEMU connected (stream)");
                self.stream_in();
            }
            Ok(StreamEvent::Disconnected) => log::info!("{name}: QEMU disconnected (stream)"),
            Ok(StreamEvent::Output) => self.stream_out(),
            Ok(StreamEvent::Writable) => self.stream_in(),
            Ok(StreamEvent::Nothing) => {}
            Err(e) => log::warn!("{name}: {e}"),
        }
    }

    /// Guest output on a stream device: socket -> spool -> endpoint.
    fn stream_out(&mut self) {
        let Guest::Stream(s) = &mut self.guest else {
            return;
        };
        let Some(port) = self.ports.first_mut() else {
            return;
        };
        let mut buf = [0u8; OUT_CHUNK];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => port.keep_newest(&Pieces([&buf[..n], &[]]), 0),
            }
        }
        port.flush(None);
        self.sync(0);
    }

    /// Host input for a stream device: endpoint -> socket.
    pub fn stream_in(&mut self) {
        let Guest::Stream(s) = &mut self.guest else {
            return;
        };
        let Some(port) = self.ports.first_mut() else {
            return;
        };
        let Host::Endpoint(ep) = &mut port.host else {
            return;
        };
        let mut buf = [0u8; IN_CHUNK];
        while s.connected() && s.can_take() {
            match ep.read_input(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    port.stats.to_guest_bytes.add(n as u64);
                    s.send(&buf[..n]);
                }
                // A client that went away has been detached by the endpoint already.
                Err(e) => {
                    log::info!("{}: {e}", port.label);
                    break;
                }
            }
        }
        self.sync_stream();
        self.sync(0);
    }

    /// Client mode: dials QEMU when due.
    pub fn stream_tick(&mut self) {
        let Guest::Stream(s) = &mut self.guest else {
            return;
        };
        if s.tick() {
            log::info!("{}: connected to QEMU (stream)", self.cfg.name);
            self.stream_in();
        }
        self.sync_stream();
    }
}
