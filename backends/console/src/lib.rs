//! `vhost-user-console`: a virtio-console device served over vhost-user (multiport, named
//! ports, resize) plus a plain stream mode for QEMU's `-chardev socket`, bridging every guest
//! port to a host endpoint or to a port of another VM.

pub mod config;
pub mod control;
pub mod device;
pub mod endpoint;
pub mod event_loop;
pub mod failpoint;
pub mod group;
pub mod link;
pub mod paths;
pub mod port;
pub mod qemu_args;
pub mod queue;
pub mod reactor;
pub mod spool;
pub mod stats;
pub mod stream;
pub mod vhu_console;
pub mod virtio_console;

#[cfg(test)]
mod testing;
