//! Everything one console soak drives: the backend process with its two VMs, the stream
//! writer and its client, the virtio guest and its client, and the readiness waits between
//! them.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::soak::accounting::{account, Accounting};
use devshare_integration::soak::backend::{stats, Backend};
use devshare_integration::soak::lines::{Session, LINE_LEN};

use crate::endpoint_reader::EndpointReader;
use crate::stream_writer::StreamWriter;
use crate::virtio_writer::VirtioWriter;

/// Readiness polling step.
const STEP: Duration = Duration::from_millis(2);
/// The stream VM and its port.
pub const STREAM_PORT: (&str, &str) = ("s", "serial");
/// The virtio VM and its data port.
pub const VIRTIO_PORT: (&str, &str) = ("v", "org.devshare.soak");

/// The sockets of one soak.
pub struct Paths {
    /// The stream VM's socket (QEMU's `-chardev socket` dials it).
    pub stream_sock: PathBuf,
    /// The stream port's `unix:` endpoint.
    pub stream_client: PathBuf,
    /// The virtio VM's vhost-user socket.
    pub virtio_sock: PathBuf,
    /// The virtio data port's `unix:` endpoint.
    pub virtio_client: PathBuf,
    /// The backend's stats socket.
    pub stats: PathBuf,
}

impl Paths {
    /// The paths inside scratch directory `dir`.
    pub fn new(dir: &Path) -> Paths {
        Paths {
            stream_sock: dir.join("s.sock"),
            stream_client: dir.join("s-serial.sock"),
            virtio_sock: dir.join("v.sock"),
            virtio_client: dir.join("v-data.sock"),
            stats: dir.join("stats.sock"),
        }
    }
}

/// The backend's command line: the stream VM, the virtio VM (console and data port) when
/// `virtio`, spool files in `dir/state`, `buffer` bytes per port.
pub fn backend_args(dir: &Path, p: &Paths, virtio: bool, buffer: &str) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mut args = vec![
        "--vm".into(),
        format!("{}={},stream", STREAM_PORT.0, s(&p.stream_sock)),
        "-p".into(),
        format!(
            "{}/{}=unix:{}",
            STREAM_PORT.0,
            STREAM_PORT.1,
            s(&p.stream_client)
        ),
    ];
    if virtio {
        args.extend([
            "--vm".into(),
            format!("{}={}", VIRTIO_PORT.0, s(&p.virtio_sock)),
            "-p".into(),
            format!(
                "{}/console=unix:{}",
                VIRTIO_PORT.0,
                s(&dir.join("v-console.sock"))
            ),
            "-p".into(),
            format!(
                "{}/{}=unix:{}",
                VIRTIO_PORT.0,
                VIRTIO_PORT.1,
                s(&p.virtio_client)
            ),
        ]);
    }
    args.extend([
        "--buffer-size".into(),
        buffer.into(),
        "--state-dir".into(),
        s(&dir.join("state")),
        "--stats-socket".into(),
        s(&p.stats),
    ]);
    args
}

/// Counters the soak reads from the backend (this process's, since it started).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Bytes the stream port dropped (its buffer was full: the newest are kept).
    pub stream_dropped: u64,
    /// Bytes the virtio data port dropped (never: a data port holds the guest back).
    pub virtio_dropped: u64,
    /// Descriptor chains refused, all ports.
    pub bad_chains: u64,
    /// Bytes this process sent again because the one before it died during that write
    /// (`replayed_after_restart_bytes`), the stream port and the virtio ports.
    pub stream_replayed: u64,
    pub virtio_replayed: u64,
}

/// The virtio guest and the client of its data port.
pub struct VirtioPair {
    /// The guest.
    pub guest: VirtioWriter,
    /// The client of its data port.
    pub client: EndpointReader,
}

impl VirtioPair {
    /// The guest's data as one session (it never starts over: unused chains stay in the ring).
    pub fn session(&self) -> Session {
        let st = &self.guest.state;
        Session {
            first_seq: 0,
            written: st.submitted_lines.load(Ordering::Acquire) * LINE_LEN as u64,
            accepted: st.accepted_lines.load(Ordering::Acquire) * LINE_LEN as u64,
            closed: false,
        }
    }

    /// What arrived, held against what was written.
    pub fn check(&self, complete: bool) -> Accounting {
        let runs = self.client.state.check().runs(true);
        account(&[self.session()], &runs, complete)
    }
}

/// Everything the soak drives.
pub struct Rig {
    /// The backend under test.
    pub backend: Backend,
    /// Its sockets.
    pub paths: Paths,
    /// QEMU's side of the stream VM.
    pub writer: StreamWriter,
    /// The stream port's client.
    pub reader: EndpointReader,
    /// The virtio VM's guest and client.
    pub virtio: Option<VirtioPair>,
    /// Longest wait for anything.
    pub timeout: Duration,
}

impl Rig {
    /// Polls `ready` until it holds; fails with the backend's log after the timeout, or as soon
    /// as the virtio guest gave up.
    pub fn wait(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&mut Rig) -> bool,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            if ready(self) {
                return Ok(start.elapsed());
            }
            if let Some(e) = self
                .virtio
                .as_ref()
                .and_then(|v| v.guest.state.error().clone())
            {
                return Err(format!("{what}: the virtio guest gave up: {e}"));
            }
            if start.elapsed() > self.timeout {
                return Err(format!(
                    "{what}: not within {:?}\n--- backend log (tail) ---\n{}",
                    self.timeout,
                    self.backend.log_tail(30)
                ));
            }
            thread::sleep(STEP);
        }
    }

    /// Waits for the backend's stats socket to answer: the process is up.
    pub fn wait_serving(&mut self) -> Result<Duration, String> {
        let path = self.paths.stats.clone();
        self.wait("the backend serves its stats socket", |_| {
            stats(&path).is_some()
        })
    }

    /// The line the stream client's data continues with.
    pub fn stream_next(&self) -> u64 {
        self.reader.state.check().next_seq()
    }

    /// The line the virtio client's data continues with (MAX without a virtio VM).
    pub fn virtio_next(&self) -> u64 {
        self.virtio
            .as_ref()
            .map_or(u64::MAX, |v| v.client.state.check().next_seq())
    }

    /// The backend's counters now.
    pub fn counters(&self) -> Result<Counters, String> {
        let doc = stats(&self.paths.stats).ok_or("the stats socket does not answer")?;
        let mut c = Counters::default();
        for p in doc["ports"].as_array().cloned().unwrap_or_default() {
            let dropped = p["dropped_bytes"].as_u64().unwrap_or(0);
            let replayed = p["replayed_after_restart_bytes"].as_u64().unwrap_or(0);
            let port = (p["vm"].as_str(), p["port"].as_str());
            if port == (Some(STREAM_PORT.0), Some(STREAM_PORT.1)) {
                c.stream_dropped += dropped;
                c.stream_replayed += replayed;
            } else {
                c.virtio_dropped += dropped;
                c.virtio_replayed += replayed;
            }
            c.bad_chains += p["bad_chains"].as_u64().unwrap_or(0);
        }
        Ok(c)
    }

    /// The writers stop; both clients get everything written.
    pub fn drain(&mut self) -> Result<Duration, String> {
        self.writer.state.pause.store(true, Ordering::Release);
        if let Some(v) = &self.virtio {
            v.guest.state.pause.store(true, Ordering::Release);
        }
        self.wait("the clients receive everything written", |r| {
            let written = r.writer.state.end();
            let got = r
                .reader
                .state
                .check()
                .runs(true)
                .last()
                .map_or(0, |x| x.end);
            let stream_done = got == written && r.writer.state.connected.load(Ordering::Acquire);
            let virtio_done = r.virtio.as_ref().is_none_or(|v| {
                let s = v.session();
                let got = v
                    .client
                    .state
                    .check()
                    .runs(true)
                    .last()
                    .map_or(0, |x| x.end);
                s.accepted == s.written && got == s.written
            });
            stream_done && virtio_done
        })
    }

    /// The writers go on.
    pub fn resume(&self) {
        self.writer.state.pause.store(false, Ordering::Release);
        if let Some(v) = &self.virtio {
            v.guest.state.pause.store(false, Ordering::Release);
        }
    }
}
