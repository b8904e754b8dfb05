//! A front-end that declares a guest memory region larger than the file behind it must not
//! kill the backend (a SIGBUS on the first access past the end of the file would take every
//! VM of the process with it): the table is refused, only that connection ends, the other
//! VMs keep moving data, and the same front-end can come back with a good table.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use devshare_integration::console_guest::{ConsoleGuest, GuestOptions};
use devshare_integration::frontend::{
    Connection, GuestBuffer, GuestRam, Segment, VhostUserProtocolFeatures,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::ScratchDir;

const WAIT: Duration = Duration::from_secs(20);
const RAM: u64 = 4 << 20;

fn opts() -> GuestOptions {
    GuestOptions {
        multiport: false,
        ..GuestOptions::default()
    }
}

fn client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Sends `msg` from the guest on the console port and reads it from the endpoint's client.
fn moves_data(g: &mut ConsoleGuest, c: &mut UnixStream, msg: &[u8]) {
    g.send(0, msg, 1).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

#[test]
fn oversized_memory_region_is_refused_and_every_vm_keeps_being_served() {
    let dir = ScratchDir::new("memregion").unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let mut args: Vec<String> = Vec::new();
    for vm in ["a", "b"] {
        args.push("--vm".into());
        args.push(format!("{vm}={}", p(&format!("{vm}.sock")).display()));
        args.push("-p".into());
        args.push(format!(
            "{vm}/console=unix:{}",
            p(&format!("{vm}-con.sock")).display()
        ));
    }
    let mut backend =
        BackendProcess::spawn("vhost-user-console", &args, &p("backend.log")).unwrap();
    for vm in ["a", "b"] {
        backend
            .wait_for_socket(&p(&format!("{vm}.sock")), WAIT)
            .unwrap();
    }

    // VM b moves data all along.
    let mut b = ConsoleGuest::connect(p("b.sock"), opts()).unwrap();
    let mut b_client = client(&p("b-con.sock"));
    moves_data(&mut b, &mut b_client, b"b before\n");

    // VM a's front-end declares its 4 MiB memfd as an 8 MiB region.
    let mut bad = Connection::connect(p("a.sock")).unwrap();
    bad.handshake(
        1 << VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    let ram = GuestRam::new(RAM).unwrap();
    if bad.set_mem_table_oversized(&ram, 0, RAM).is_ok() {
        // Accepted: show the backend a buffer past the end of the file, as a guest would.
        let _rx = bad.start_queue(&ram, 0, 64);
        if let Ok(mut tx) = bad.start_queue(&ram, 1, 64) {
            let past_eof = GuestBuffer {
                addr: RAM + 4096,
                len: 64,
            };
            if tx.add_chain(&[Segment::readable(past_eof)]).is_ok() {
                let _ = tx.kick();
            }
        }
    }
    let deadline = Instant::now() + WAIT;
    while !backend.log().contains("ends past the end of its") {
        assert!(
            backend.is_running(),
            "the backend died (SIGBUS); log:\n{}",
            backend.log()
        );
        assert!(
            Instant::now() < deadline,
            "the oversized region was never refused; log:\n{}",
            backend.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let log = backend.log();
    assert!(
        log.contains("memory region 0") && log.contains("SET_MEM_TABLE"),
        "the refusal does not name the region: {log}"
    );
    drop(bad);

    // Nothing else noticed.
    assert!(backend.is_running());
    moves_data(&mut b, &mut b_client, b"b after\n");

    // The same VM comes back with a good table and is served.
    let mut a = ConsoleGuest::connect(p("a.sock"), opts()).unwrap();
    let mut a_client = client(&p("a-con.sock"));
    moves_data(&mut a, &mut a_client, b"a is back\n");
    assert!(backend.is_running());
}
