//! A front-end that declares a guest memory region larger than the file behind it must not
//! kill the backend (a SIGBUS on the first access past the end of the file would take every
//! VM of the process with it): the table is refused, only that connection ends, the other
//! VMs keep moving data, and the same front-end can come back with a good table. The same
//! holds for memory that the front-end could still shrink after the check (a memfd without
//! F_SEAL_SHRINK): refused unless the operator passed `--allow-unsealed-memory`.

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

/// A console process serving VMs `a` and `b`, each with a `unix:` console endpoint.
fn two_vms(dir: &ScratchDir, extra: &[&str]) -> BackendProcess {
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
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
    backend
}

fn handshake(c: &mut Connection) {
    c.handshake(
        1 << VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
}

/// Waits until the backend's log holds `line`, failing if the backend dies first.
fn wait_for_log(backend: &mut BackendProcess, line: &str) {
    let deadline = Instant::now() + WAIT;
    while !backend.log().contains(line) {
        assert!(
            backend.is_running(),
            "the backend died (SIGBUS); log:\n{}",
            backend.log()
        );
        assert!(
            Instant::now() < deadline,
            "no {line:?} in the log:\n{}",
            backend.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn oversized_memory_region_is_refused_and_every_vm_keeps_being_served() {
    let dir = ScratchDir::new("memregion").unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let mut backend = two_vms(&dir, &[]);

    // VM b moves data all along.
    let mut b = ConsoleGuest::connect(p("b.sock"), opts()).unwrap();
    let mut b_client = client(&p("b-con.sock"));
    moves_data(&mut b, &mut b_client, b"b before\n");

    // VM a's front-end declares its 4 MiB memfd as an 8 MiB region.
    let mut bad = Connection::connect(p("a.sock")).unwrap();
    handshake(&mut bad);
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
                // Kick by the eventfd alone: the driver's own kick reads the ring first.
                let _ = tx.kick_fd().write(1);
            }
        }
    }
    wait_for_log(&mut backend, "ends past the end of its");
    let log = backend.log();
    assert!(
        log.contains("memory region 0") && log.contains("SET_MEM_TABLE"),
        "the refusal does not name the region: {log}"
    );
    drop(bad);
    others_served_and_a_back(&mut backend, &dir, (&mut b, &mut b_client), b"a is back\n");
}

/// After VM a's refused front-end left: the process runs, VM b (`b`) still moves data, and a
/// front-end with a good table for VM a is served (it moves `a_msg`).
fn others_served_and_a_back(
    backend: &mut BackendProcess,
    dir: &ScratchDir,
    b: (&mut ConsoleGuest, &mut UnixStream),
    a_msg: &[u8],
) {
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    assert!(backend.is_running());
    moves_data(b.0, b.1, b"b after\n");
    let mut a = ConsoleGuest::connect(p("a.sock"), opts()).unwrap();
    let mut a_client = client(&p("a-con.sock"));
    moves_data(&mut a, &mut a_client, a_msg);
    assert!(backend.is_running());
}

/// The attack: a memfd without F_SEAL_SHRINK passes the size check, then the front-end cuts
/// it to 0 bytes and kicks; the backend's next access would raise SIGBUS and end every VM.
/// Such memory is refused up front, naming the region and what to give QEMU instead.
#[test]
fn memory_that_can_still_shrink_is_refused_and_every_vm_keeps_being_served() {
    let dir = ScratchDir::new("memunsealed").unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let mut backend = two_vms(&dir, &[]);
    let mut b = ConsoleGuest::connect(p("b.sock"), opts()).unwrap();
    let mut b_client = client(&p("b-con.sock"));
    moves_data(&mut b, &mut b_client, b"b before\n");

    let mut bad = Connection::connect(p("a.sock")).unwrap();
    handshake(&mut bad);
    let ram = GuestRam::unsealed(RAM).unwrap();
    if bad.set_mem_table(&ram).is_ok() {
        std::mem::forget(bad.start_queue(&ram, 0, 64));
        if let Ok(mut tx) = bad.start_queue(&ram, 1, 64) {
            let buf = ram.alloc(64).unwrap();
            ram.fill(buf, b"x").unwrap();
            if tx.add_chain(&[Segment::readable(buf)]).is_ok() {
                // Shrink the memfd under the mapping before the backend reads the ring.
                for region in vm_memory::GuestMemoryBackend::iter(ram.memory()) {
                    if let Some(fo) = vm_memory::GuestMemoryRegion::file_offset(region) {
                        fo.file().set_len(0).unwrap();
                    }
                }
                // Kick by the eventfd alone: the driver's own kick reads the ring first.
                let _ = tx.kick_fd().write(1);
            }
            // The harness must not touch the cut memory either (it would get the SIGBUS).
            std::mem::forget(tx);
        }
    }
    std::mem::forget(ram);
    wait_for_log(&mut backend, "can still shrink");
    let log = backend.log();
    assert!(
        log.contains("memory region 0")
            && log.contains("SET_MEM_TABLE")
            && log.contains("memory-backend-memfd")
            && log.contains("--allow-unsealed-memory"),
        "the refusal does not say which region and what to do: {log}"
    );
    drop(bad);
    // QEMU's default, a sealed memfd (the harness seals like QEMU's seal=on), is served.
    others_served_and_a_back(&mut backend, &dir, (&mut b, &mut b_client), b"a sealed\n");
}

/// With `--allow-unsealed-memory` the operator accepts such memory (and the risk that a
/// front-end which shrinks it crashes the process): it is served, with a warning.
#[test]
fn allow_unsealed_memory_accepts_it_with_a_warning() {
    let dir = ScratchDir::new("memallow").unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let mut backend = two_vms(&dir, &["--allow-unsealed-memory"]);
    let mut a = Connection::connect(p("a.sock")).unwrap();
    handshake(&mut a);
    let ram = GuestRam::unsealed(RAM).unwrap();
    a.set_mem_table(&ram).unwrap();
    let _rx = a.start_queue(&ram, 0, 64).unwrap();
    let _tx = a.start_queue(&ram, 1, 64).unwrap();
    wait_for_log(&mut backend, "accepted by --allow-unsealed-memory");
    assert!(
        !backend.log().contains("can still shrink"),
        "{}",
        backend.log()
    );
    assert!(backend.is_running());

    // Both binaries take the flag and explain it.
    for bin in ["vhost-user-console", "vhost-user-netmux"] {
        let help =
            std::process::Command::new(devshare_integration::workspace::binary(bin).unwrap())
                .arg("--help")
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(text.contains("--allow-unsealed-memory"), "{bin}: {text}");
    }
}
