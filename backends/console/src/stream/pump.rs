//! Stream-mode pumping: guest output from QEMU's socket into the port, and host input from
//! the endpoint to QEMU, only as fast as QEMU takes it.
//!
//! Guest output goes to the attached client first and into the port's buffer only for what
//! the client cannot take now. A guest's serial port must never stall for good, so the
//! buffer keeps the newest bytes when it is full; but bytes a client is ready to take are
//! never dropped for that:
//!
//! - with a client attached (a socket client, a PTY, a serial device: anything that can be
//!   slower than the guest), QEMU's output is read only as far as the buffer has room, and
//!   not at all while the buffer is nearly full ("held"): QEMU's socket fills up and QEMU
//!   holds the guest's UART back, as a real UART with flow control would;
//! - the client taking bytes again releases the hold;
//! - a client that takes nothing for [`STALL_LIMIT`] no longer holds the guest back: output
//!   is read again and the buffer keeps the newest bytes (counted in `dropped_bytes`) until
//!   the client takes some;
//! - with nothing attached (or a log file, which takes everything), output is read as it
//!   comes and the buffer keeps the newest bytes, as before.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use devshare_common::log_limited_or_debug;

use super::{StreamEvent, StreamGuest};
use crate::device::{Device, Guest};
use crate::port::{Host, Port};

/// Bytes taken from QEMU's socket per peek.
const OUT_CHUNK: usize = 64 * 1024;
/// Bytes read from the endpoint per system call.
const IN_CHUNK: usize = 16 * 1024;
/// How long a client that takes nothing may hold the guest's output back.
pub const STALL_LIMIT: Duration = Duration::from_millis(500);

/// How much guest output may be read now.
enum Pace {
    /// Up to this many bytes.
    Read(usize),
    /// None: a slow client is catching up.
    Held,
}

/// Decides how much of QEMU's output to read at `now` for `port`, updating the hold state.
fn pace(s: &mut StreamGuest, port: &Port, now: Instant) -> Pace {
    let (free, capacity) = (port.buffer_free(), port.buffer_capacity());
    let slow_client = port.host_can_wait();
    // Room for a useful read: half the buffer, at most a chunk.
    let low = (capacity / 2).clamp(1, OUT_CHUNK);
    if !slow_client || free >= low {
        s.held_since = None;
        s.gave_up = false;
        return Pace::Read(if slow_client {
            free.min(OUT_CHUNK)
        } else {
            OUT_CHUNK
        });
    }
    if s.gave_up {
        return Pace::Read(OUT_CHUNK);
    }
    match s.held_since {
        None => {
            s.held_since = Some(now);
            Pace::Held
        }
        Some(t) if now.duration_since(t) >= STALL_LIMIT => {
            s.held_since = None;
            s.gave_up = true;
            log_limited_or_debug!(
                log::Level::Info,
                s.events,
                "{}: the client took no output for {} ms; keeping the newest bytes until it does",
                port.label,
                STALL_LIMIT.as_millis()
            );
            Pace::Read(OUT_CHUNK)
        }
        Some(_) => Pace::Held,
    }
}

impl Device {
    /// Whether QEMU's output is held back now (see the module docs).
    pub fn stream_held(&self) -> bool {
        matches!(&self.guest, Guest::Stream(s) if s.held_since.is_some())
    }

    /// One of the stream socket's fds is ready.
    pub fn stream_ready(&mut self, fd: RawFd, ev: EventSet) {
        let name = self.cfg.name.clone();
        let Guest::Stream(s) = &mut self.guest else {
            return;
        };
        match s.on_ready(fd, ev) {
            Ok(StreamEvent::Connected) => {
                log_limited_or_debug!(
                    log::Level::Info,
                    s.events,
                    "{name}: QEMU connected (stream)"
                );
                self.stream_in();
            }
            Ok(StreamEvent::Disconnected) => log_limited_or_debug!(
                log::Level::Info,
                s.events,
                "{name}: QEMU disconnected (stream)"
            ),
            Ok(StreamEvent::Output) => self.stream_out(false),
            Ok(StreamEvent::Drain) => self.stream_out(true),
            Ok(StreamEvent::Writable) => self.stream_in(),
            Ok(StreamEvent::Nothing) => {}
            Err(e) => log::warn!("{name}: {e}"),
        }
    }

    /// Guest output on a stream device: socket -> the port's buffer -> endpoint, as far as
    /// the endpoint takes it (see `port::output` for why through the buffer). With `drain`
    /// (QEMU hung up), everything is read.
    pub fn stream_out(&mut self, drain: bool) {
        let Guest::Stream(s) = &mut self.guest else {
            return;
        };
        let Some(port) = self.ports.first_mut() else {
            return;
        };
        let now = Instant::now();
        loop {
            let limit = match pace(s, port, now) {
                _ if drain => OUT_CHUNK,
                Pace::Read(n) => n,
                Pace::Held => break,
            };
            let n = port.take_peeked(limit, s);
            let before = port.stats.to_host_bytes.get();
            port.flush(None);
            if port.stats.to_host_bytes.get() > before {
                // The client takes bytes again: it may hold the guest back again.
                s.gave_up = false;
            }
            if n == 0 {
                break;
            }
        }
        self.sync(0);
        self.sync_stream();
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
                // A client that went away has been dropped by the endpoint already (and
                // logged there).
                Err(_) => break,
            }
        }
        self.sync_stream();
        self.sync(0);
    }

    /// Periodic work: client mode dials QEMU when due; a hold on guest output is checked
    /// against the stall limit (500 ms).
    pub fn stream_tick(&mut self) {
        let Guest::Stream(s) = &mut self.guest else {
            return;
        };
        if s.tick() {
            log::info!("{}: connected to QEMU (stream)", self.cfg.name);
            self.stream_in();
        }
        if self.stream_held() {
            self.stream_out(false);
        }
        self.sync_stream();
    }
}
