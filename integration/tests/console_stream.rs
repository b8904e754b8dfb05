//! Stream mode's pacing of guest output, with the real backend process and the test playing
//! QEMU's `-chardev socket`: bytes an attached client is ready to take are never dropped
//! (QEMU's side writes 8 MiB as fast as it can while a client reads as fast as it can:
//! every byte arrives, nothing is counted as dropped), and a client that stops reading holds
//! the guest back only for a while: then the newest bytes are kept and the drop is counted.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;

use devshare_integration::console_backend::{Console, WAIT};
use devshare_integration::testdata::pattern;
use sha2::{Digest, Sha256};

fn unix_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Reads exactly `len` bytes as fast as it can and returns their SHA-256.
fn read_hashed(mut s: UnixStream, len: usize) -> Vec<u8> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len());
        let n = s.read(&mut buf[..want]).unwrap();
        assert!(n > 0, "stream ended with {left} of {len} bytes missing");
        h.update(&buf[..n]);
        left -= n;
    }
    h.finalize().to_vec()
}

#[test]
fn fast_reader_gets_every_byte_and_nothing_is_counted_as_dropped() {
    let c = Console::start(
        "stream-fast-reader",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
        ],
        &["s.sock", "c.sock"],
    );
    let client = unix_client(&c.path("c.sock"));
    c.wait_stat("s", "serial", "attached", 1);
    const LEN: usize = 8 << 20;
    let data = pattern(LEN, 77);
    let reader = thread::spawn(move || read_hashed(client, LEN));
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(&data).unwrap();
    let got = reader.join().unwrap();
    assert!(got == sha256(&data), "the client got other bytes");
    c.wait_stat("s", "serial", "to_host_bytes", LEN as u64);
    assert_eq!(c.stat("s", "serial", "dropped_bytes"), 0);
    assert_eq!(c.stat("s", "serial", "buffered_bytes"), 0);
}

#[test]
fn a_client_that_stops_reading_holds_the_guest_back_only_for_a_while() {
    let c = Console::start(
        "stream-stalled-reader",
        &[
            "--vm",
            "s={dir}/s.sock,stream",
            "-p",
            "s/serial=unix:{dir}/c.sock",
            "--buffer-size",
            "256K",
        ],
        &["s.sock", "c.sock"],
    );
    let mut client = unix_client(&c.path("c.sock"));
    c.wait_stat("s", "serial", "attached", 1);
    const LEN: usize = 4 << 20;
    let data = pattern(LEN, 78);
    // The client reads nothing: writing must still complete (the guest is not stalled for
    // good), the backend keeping the newest bytes.
    let mut qemu = unix_client(&c.path("s.sock"));
    qemu.write_all(&data).unwrap();
    c.wait_stat_by("s", "serial", "dropped_bytes", "> 0", |d| d > 0);
    c.wait_log("keeping the newest bytes");
    // Everything written is accounted for once the backend has read it all.
    let n = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap_or_default();
    let p = c.wait_port("s", "serial", "every byte accounted for", |p| {
        n(p, "to_host_bytes") + n(p, "dropped_bytes") + n(p, "buffered_bytes") == LEN as u64
    });
    let delivered = n(&p, "to_host_bytes") as usize;
    let buffered = n(&p, "buffered_bytes") as usize;
    // What reached the socket is the oldest output; the buffer holds the newest.
    let mut early = vec![0u8; delivered];
    client.read_exact(&mut early).unwrap();
    assert!(
        early == data[..delivered],
        "delivered bytes are not the oldest"
    );
    let mut newest = vec![0u8; buffered];
    client.read_exact(&mut newest).unwrap();
    assert!(
        newest == data[LEN - buffered..],
        "the buffer did not keep the newest bytes"
    );
    // A client that reads again holds the guest back again rather than losing bytes.
    let dropped = c.stat("s", "serial", "dropped_bytes");
    let more = pattern(2 << 20, 79);
    let reader = thread::spawn(move || read_hashed(client, 2 << 20));
    qemu.write_all(&more).unwrap();
    assert!(reader.join().unwrap() == sha256(&more));
    assert_eq!(c.stat("s", "serial", "dropped_bytes"), dropped);
}
