//! Shared pieces of the netmux end-to-end tests: a network namespace with a veth pair standing
//! in for the host NIC, the netmux process, and guests attached to its ports.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use devshare_integration::matrix::MatrixQemu;
use devshare_integration::process::BackendProcess;
use devshare_integration::qemu::{Guest, GuestBuilder, ScratchDir};

/// How long a guest may take to boot and finish its part under TCG on a busy 2-core machine.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(400);

/// Upper bound for a started netmux to create its sockets: a readiness wait that only a
/// failure exhausts, generous for a busy machine paging a fresh binary in.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Address of the namespace's end of the veth (the "far side" of the NIC).
pub const NS_IP: &str = "10.77.0.254";

/// Guest `i`'s MAC and IP address.
pub fn guest_mac(i: usize) -> String {
    format!("52:54:00:77:00:{:02x}", i + 1)
}

/// Guest `i`'s IPv4 address.
pub fn guest_ip(i: usize) -> String {
    format!("10.77.0.{}", i + 1)
}

fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    out
}

fn run_ok(cmd: &str, args: &[&str]) {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace holding one end of a veth pair; the other end, in the root namespace,
/// is the netmux uplink. Both are removed on drop.
pub struct NetNs {
    /// Namespace name.
    pub name: String,
    /// The root-namespace end of the veth (give it to `--uplink af-packet:`).
    pub host_if: String,
    /// The namespace's end of the veth, carrying [`NS_IP`].
    pub peer: String,
    /// What makes this namespace's names unique (the pid and a sequence number).
    id: String,
}

impl NetNs {
    /// Creates the namespace, the veth pair and the address [`NS_IP`]/24 inside.
    pub fn new() -> NetNs {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns = NetNs {
            name: format!("nmxns{id}"),
            host_if: format!("nmxh{id}"),
            peer: format!("nmxp{id}"),
            id,
        };
        let peer = ns.peer.clone();
        run_ok("ip", &["netns", "add", &ns.name]);
        // No IPv6 chatter (router solicitations, MLD) from the far side: tests that count
        // frames must see only their own.
        ns.exec_ok(
            "sysctl -qw net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.all.disable_ipv6=1",
        );
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
        );
        run_ok("ip", &["link", "set", &peer, "netns", &ns.name]);
        run_ok("ip", &["link", "set", &ns.host_if, "up"]);
        ns.exec_ok(&format!(
            "ip addr add {NS_IP}/24 dev {peer} && ip link set {peer} up && ip link set lo up"
        ));
        ns
    }

    /// An interface name unique to this namespace (and test process): `prefix` plus its id.
    /// Keep `prefix` to 4 characters so the name fits IFNAMSIZ.
    pub fn unique_name(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.id)
    }

    /// Moves interface `ifname` from the root namespace into this one.
    pub fn adopt(&self, ifname: &str) {
        run_ok("ip", &["link", "set", ifname, "netns", &self.name]);
    }

    /// Runs `sh -c script` inside the namespace.
    pub fn exec(&self, script: &str) -> Output {
        run("ip", &["netns", "exec", &self.name, "sh", "-c", script])
    }

    /// Like [`NetNs::exec`], failing the test on a non-zero exit.
    pub fn exec_ok(&self, script: &str) -> String {
        let out = self.exec(script);
        assert!(
            out.status.success(),
            "in {}: {script}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Spawns `sh -c script` inside the namespace without waiting.
    pub fn spawn(&self, script: &str) -> std::process::Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn in namespace")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, which takes the pair with it; the
        // explicit delete covers a namespace that never got its end.
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// One guest port as the tests configure it.
#[derive(Clone, Debug)]
pub struct PortSpec {
    /// Index (MAC and IP derive from it).
    pub index: usize,
    /// Queue pairs.
    pub queues: u16,
    /// Backend connects to a listening QEMU.
    pub client: bool,
    /// 802.1Q VLAN the port's frames carry on the uplink.
    pub vlan: Option<u16>,
}

impl PortSpec {
    /// A single-queue, backend-listens port.
    pub fn new(index: usize) -> PortSpec {
        PortSpec {
            index,
            queues: 1,
            client: false,
            vlan: None,
        }
    }
}

/// A running netmux with its scratch directory.
pub struct Netmux {
    /// The process.
    pub process: BackendProcess,
    /// Sockets and logs live here.
    pub dir: ScratchDir,
    /// The ports it serves.
    pub ports: Vec<PortSpec>,
    /// Its command line, for restarts and `--print-qemu-args`.
    pub args: Vec<String>,
}

impl Netmux {
    /// Socket path of port `i`.
    pub fn socket(dir: &Path, i: usize) -> PathBuf {
        dir.join(format!("g{i}.sock"))
    }

    /// The stats socket.
    pub fn stats_path(&self) -> PathBuf {
        self.dir.path().join("stats.sock")
    }

    /// Starts netmux on `uplink_if` with `ports` and `extra` options; waits for the sockets of
    /// ports where it listens.
    pub fn start(name: &str, uplink_if: &str, ports: &[PortSpec], extra: &[&str]) -> Netmux {
        Self::start_on(name, &format!("af-packet:{uplink_if}"), ports, extra)
    }

    /// Like [`Netmux::start`] with a whole `--uplink` value (`af-packet:IF` or `tap:NAME`).
    pub fn start_on(name: &str, uplink: &str, ports: &[PortSpec], extra: &[&str]) -> Netmux {
        let dir = ScratchDir::new(name).expect("scratch dir");
        let mut args: Vec<String> = vec![
            "--uplink".into(),
            uplink.to_string(),
            "--stats-socket".into(),
            dir.path().join("stats.sock").display().to_string(),
        ];
        for p in ports {
            let mut spec = format!(
                "name=g{},socket={},mac={},queues={}",
                p.index,
                Self::socket(dir.path(), p.index).display(),
                guest_mac(p.index),
                p.queues
            );
            if p.client {
                spec.push_str(",client");
            }
            if let Some(v) = p.vlan {
                spec.push_str(&format!(",vlan={v}"));
            }
            args.push("--port".into());
            args.push(spec);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Self::spawn(dir.path(), ports, &args);
        Netmux {
            process,
            dir,
            ports: ports.to_vec(),
            args,
        }
    }

    fn spawn(dir: &Path, ports: &[PortSpec], args: &[String]) -> BackendProcess {
        // Sockets of a killed predecessor must not pass for the new process's.
        for p in ports.iter().filter(|p| !p.client) {
            let _ = std::fs::remove_file(Self::socket(dir, p.index));
        }
        let _ = std::fs::remove_file(dir.join("stats.sock"));
        let log = dir.join("netmux.log");
        let mut process =
            BackendProcess::spawn("vhost-user-netmux", args, &log).expect("start netmux");
        for p in ports.iter().filter(|p| !p.client) {
            process
                .wait_for_path(&Self::socket(dir, p.index), START_TIMEOUT)
                .expect("netmux socket");
        }
        process
            .wait_for_path(&dir.join("stats.sock"), START_TIMEOUT)
            .expect("stats socket");
        process
    }

    /// Kills the process (SIGKILL, a crash as far as QEMU can tell) and starts it again with
    /// the same command line; the log continues in the same file.
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(self.dir.path(), &self.ports, &self.args);
    }

    /// The QEMU options `vhost-user-netmux --print-qemu-args` gives for port `g<i>`, as
    /// separate arguments. The memory options (`-object memory-backend-memfd,...,share=on`
    /// and `-machine q35,memory-backend=mem`) are left out: the QEMU runner sets the same.
    pub fn qemu_args(&self, i: usize) -> Vec<String> {
        self.qemu_args_with(i, &[]).0
    }

    /// Like [`Netmux::qemu_args`] with more `--print-qemu-args` options (`--qemu PATH`), and
    /// what netmux printed on stderr (its notes for that QEMU).
    pub fn qemu_args_with(&self, i: usize, print_options: &[String]) -> (Vec<String>, String) {
        let bin = devshare_integration::workspace::binary("vhost-user-netmux").unwrap();
        let out = Command::new(bin)
            .args(&self.args)
            .arg("--print-qemu-args")
            .args(print_options)
            .output()
            .expect("run --print-qemu-args");
        assert!(
            out.status.success(),
            "--print-qemu-args failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let header = format!("# guest on port g{i} ");
        let block: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with(&header))
            .skip(1)
            .take_while(|l| !l.starts_with('#'))
            .collect();
        let mut args = Vec::new();
        let mut memory = Vec::new();
        for line in block {
            let line = line.trim().trim_end_matches('\\').trim();
            let (opt, value) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("odd line '{line}' in:\n{text}"));
            if opt == "-object" || opt == "-machine" {
                memory.push(value.to_string());
            } else {
                args.push(opt.to_string());
                args.push(value.to_string());
            }
        }
        assert!(
            memory.iter().any(|m| m.contains("share=on")),
            "no shared guest memory in:\n{text}"
        );
        assert!(
            args.len() >= 6,
            "no chardev/netdev/device for g{i} in:\n{text}"
        );
        (args, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The counters, as JSON, read through the `stats` subcommand.
    pub fn stats(&self) -> serde_json::Value {
        self.try_stats().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The stats document, or why it could not be had (for failure reports).
    pub fn try_stats(&self) -> Result<serde_json::Value, String> {
        let bin = devshare_integration::workspace::binary("vhost-user-netmux").unwrap();
        let out = Command::new(bin)
            .args(["stats", "--socket"])
            .arg(self.stats_path())
            .output()
            .map_err(|e| format!("run stats: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "stats failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("stats JSON: {e}"))
    }

    /// Counter `key` (e.g. `rx_packets` or `drops/spoofed`) of port `g<i>`.
    pub fn port_counter(&self, i: usize, key: &str) -> u64 {
        let stats = self.stats();
        let port = stats["ports"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == format!("g{i}")))
            .cloned()
            .unwrap_or_else(|| panic!("no port g{i} in {stats}"));
        let mut v = &port;
        for part in key.split('/') {
            v = &v[part];
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("no counter {key} in {port}"))
    }

    /// The netmux log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// QEMU options attaching a guest to port `p` of `nm`: what netmux itself prints.
pub fn guest_net_args(nm: &Netmux, p: &PortSpec) -> Vec<String> {
    nm.qemu_args(p.index)
}

/// Shell functions every guest script starts with: bring eth0 up with the guest's address,
/// and `reach IP` which pings until the first answer (up to ~90 s).
pub fn guest_prelude(i: usize) -> String {
    format!(
        r#"
ip link set eth0 up
ip addr add {ip}/24 dev eth0
reach() {{
    n=0
    while [ $n -lt 90 ]; do
        ping -c 1 -W 1 "$1" >/dev/null 2>&1 && return 0
        n=$((n+1))
    done
    return 1
}}
"#,
        ip = guest_ip(i)
    )
}

/// A guest on port `p` of `nm` running `script` (after [`guest_prelude`]).
pub fn guest_builder(nm: &Netmux, p: &PortSpec, script: &str) -> GuestBuilder {
    guest_builder_with(p, script, guest_net_args(nm, p), None)
}

/// A guest like [`guest_builder`] on the matrix QEMU `qemu`, with the options netmux prints
/// for that QEMU (`--print-qemu-args --qemu PATH`). Where this QEMU crashes under TCG with
/// MSI-X (before 8.0), netmux prints the workaround, `vectors=0`, in the NIC's options and
/// says why on stderr: both are checked here.
pub fn matrix_guest_builder(
    nm: &Netmux,
    p: &PortSpec,
    script: &str,
    qemu: &MatrixQemu,
) -> GuestBuilder {
    let (args, notes) = nm.qemu_args_with(p.index, &qemu.print_args());
    if qemu.version.vhost_user_net_msix_crashes_under_tcg() && !guests_use_kvm() {
        assert!(
            notes.contains("vectors=0"),
            "netmux gave no workaround for QEMU {}: {notes}",
            qemu.version
        );
        let dev = args
            .iter()
            .find(|a| a.starts_with("virtio-net-pci,"))
            .expect("a virtio-net-pci device");
        assert!(dev.contains(",vectors=0"), "no vectors=0 printed: {dev}");
    }
    guest_builder_with(p, script, args, Some(qemu))
}

/// Whether the guests run under KVM (`DEVSHARE_ACCEL=kvm`) rather than TCG.
pub fn guests_use_kvm() -> bool {
    std::env::var("DEVSHARE_ACCEL").is_ok_and(|a| a.starts_with("kvm"))
}

/// A guest on port `p` with the NIC options `net_args`, on `qemu` or the default QEMU.
pub fn guest_builder_with(
    p: &PortSpec,
    script: &str,
    net_args: Vec<String>,
    qemu: Option<&MatrixQemu>,
) -> GuestBuilder {
    let mut b = Guest::builder()
        .name(&format!("netmux-g{}", p.index))
        .args(net_args)
        .script(&format!("{}\n{script}", guest_prelude(p.index)));
    if let Some(qemu) = qemu {
        b = b.test_bed(qemu.bed());
    }
    if p.queues > 1 {
        b = b.cpus(u32::from(p.queues));
    }
    b
}

/// Waits for a console line with `pattern` and returns it, failing with the netmux log and
/// counters.
pub fn expect_line(g: &mut Guest, nm: &Netmux, pattern: &str, timeout: Duration) -> String {
    match g.wait_for_line(pattern, timeout) {
        Ok(l) => l,
        Err(e) => panic!(
            "{e}\n--- netmux log ---\n{}\n--- netmux stats ---\n{}",
            nm.log(),
            nm.try_stats().map_or_else(|e| e, |v| v.to_string())
        ),
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

/// A station on 802.1Q VLAN `vid` behind the namespace's veth end: it answers ARP requests
/// for its address and ICMP echo requests, but only when they arrive tagged with `vid`, and
/// tags its answers. It stands in for a VLAN sub-interface where the host kernel has no 802.1Q
/// support (no `ip link add ... type vlan`). Runs on its own thread until dropped.
pub struct VlanStation {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const STATION_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x78, 0x00, 0xfe];

impl VlanStation {
    /// Starts the station on `ns`'s veth end with address `ip`.
    pub fn start(ns: &NetNs, vid: u16, ip: [u8; 4]) -> VlanStation {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, a, name, peer) = (
            stop.clone(),
            answered.clone(),
            ns.name.clone(),
            ns.peer.clone(),
        );
        let thread = std::thread::spawn(move || {
            let fd = match station_socket(&name, &peer) {
                Ok(fd) => {
                    let _ = ready_tx.send(Ok(()));
                    fd
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let Some((len, tag)) = recv_tagged(&fd, &mut buf) else {
                    continue;
                };
                if tag != Some(vid) {
                    continue;
                }
                if let Some(reply) = station_answer(&buf[..len], ip) {
                    let mut out = Vec::with_capacity(reply.len() + 4);
                    out.extend_from_slice(&reply[..12]);
                    out.extend_from_slice(&[0x81, 0x00, (vid >> 8) as u8, vid as u8]);
                    out.extend_from_slice(&reply[12..]);
                    // SAFETY: sends `out.len()` bytes of a live buffer on our bound socket.
                    let r = unsafe {
                        libc::send(
                            std::os::fd::AsRawFd::as_raw_fd(&fd),
                            out.as_ptr().cast(),
                            out.len(),
                            0,
                        )
                    };
                    if r > 0 {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        ready_rx
            .recv()
            .expect("station thread")
            .unwrap_or_else(|e| panic!("VLAN station on {}: {e}", ns.peer));
        VlanStation {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Frames answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for VlanStation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An AF_PACKET socket on `ifname` inside namespace `ns`, with VLAN metadata (PACKET_AUXDATA)
/// and a short receive timeout. Only the calling thread enters the namespace.
fn station_socket(ns: &str, ifname: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    packet_socket(Some(ns), ifname)
}

/// Like [`station_socket`]; `None` stays in the calling thread's namespace.
fn packet_socket(ns: Option<&str>, ifname: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    if let Some(ns) = ns {
        let nsfile = std::fs::File::open(format!("/run/netns/{ns}"))?;
        // SAFETY: setns on an open namespace file; affects only this thread.
        if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation, checked below.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let cname = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = all;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: each call passes a live value and its exact size.
    let ok = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) == 0
            && libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ) == 0
    };
    if ifindex == 0 || !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Receives one frame; returns its length and the VLAN it carried (from the kernel's metadata
/// or an inline tag, which is then removed from `buf`).
fn recv_tagged(fd: &std::os::fd::OwnedFd, buf: &mut [u8]) -> Option<(usize, Option<u16>)> {
    use std::os::fd::AsRawFd;
    let mut ctl = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&ctl);
    // SAFETY: `msg` points at `buf` and `ctl`, both live and exclusively borrowed.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    if n < 14 {
        return None;
    }
    let mut len = n as usize;
    let mut tag = None;
    // SAFETY: walks the control buffer the kernel just filled, within msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: non-null cmsg inside the buffer.
        let cm = unsafe { &*c };
        if cm.cmsg_level == libc::SOL_PACKET && cm.cmsg_type == libc::PACKET_AUXDATA {
            // SAFETY: a PACKET_AUXDATA message carries a whole tpacket_auxdata.
            let aux: libc::tpacket_auxdata =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                tag = Some(aux.tp_vlan_tci & 0x0fff);
            }
        }
        // SAFETY: as above; null past the end.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if tag.is_none() && len >= 18 && buf[12] == 0x81 && buf[13] == 0x00 {
        tag = Some(u16::from_be_bytes([buf[14], buf[15]]) & 0x0fff);
        buf.copy_within(16..len, 12);
        len -= 4;
    }
    Some((len, tag))
}

/// The untagged answer to an ARP request for `ip` or an ICMP echo request to `ip`.
fn station_answer(f: &[u8], ip: [u8; 4]) -> Option<Vec<u8>> {
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let mut r = f.to_vec();
    r[..6].copy_from_slice(&f[6..12]);
    r[6..12].copy_from_slice(&STATION_MAC);
    match ethertype {
        // ARP request (opcode 1) whose target protocol address is ours.
        0x0806 if f.len() >= 42 && f[20..22] == [0, 1] && f[38..42] == ip => {
            r[21] = 2;
            r[32..38].copy_from_slice(&f[22..28]);
            r[38..42].copy_from_slice(&f[28..32]);
            r[22..28].copy_from_slice(&STATION_MAC);
            r[28..32].copy_from_slice(&ip);
            Some(r)
        }
        0x0800 if f.len() >= 34 && f[30..34] == ip && f[23] == 1 => {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let icmp = 14 + ihl;
            if f.len() < icmp + 8 || f[icmp] != 8 {
                return None;
            }
            r[26..30].copy_from_slice(&f[30..34]);
            r[30..34].copy_from_slice(&f[26..30]);
            // Echo reply: type 8 -> 0; the checksum grows by 0x0800 (one's complement).
            r[icmp] = 0;
            let sum = u32::from(u16::from_be_bytes([f[icmp + 2], f[icmp + 3]])) + 0x0800;
            let sum = ((sum & 0xffff) + (sum >> 16)) as u16;
            r[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
            Some(r)
        }
        _ => None,
    }
}

/// Sends raw Ethernet frames, tags and all as given, out of a test namespace's veth end: the
/// uplink receives them as it would from the wire.
pub struct WireSender(std::os::fd::OwnedFd);

impl WireSender {
    /// A sender on `ns`'s veth end.
    pub fn new(ns: &NetNs) -> WireSender {
        let (name, peer) = (ns.name.clone(), ns.peer.clone());
        // packet_socket enters the namespace: on a thread of its own, so this one stays out.
        let fd = std::thread::spawn(move || packet_socket(Some(&name), &peer))
            .join()
            .expect("socket thread")
            .unwrap_or_else(|e| panic!("packet socket on {}: {e}", ns.peer));
        WireSender(fd)
    }

    /// A sender on interface `ifname` of this namespace (a host port's TAP, say): what it
    /// sends, the TAP passes to netmux as the host's.
    pub fn on_interface(ifname: &str) -> WireSender {
        WireSender(
            packet_socket(None, ifname)
                .unwrap_or_else(|e| panic!("packet socket on {ifname}: {e}")),
        )
    }

    /// Sends one frame (no virtio-net header).
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sends `frame.len()` bytes of a live buffer on our bound socket.
        let r = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        assert_eq!(
            r,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One frame a [`Capture`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedFrame {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// The 802.1Q VLAN it carried (kernel metadata or an inline tag), if any.
    pub vlan: Option<u16>,
    /// The Ethernet type after any VLAN tag.
    pub ethertype: u16,
    /// The frame without its VLAN tag.
    pub bytes: Vec<u8>,
}

/// Records every frame arriving on an interface (the far end of a veth in a test namespace, or
/// a TAP in this one) whose source MAC starts with `52:54:00:77` (every test guest's, and the
/// forged ones the tests use), on its own thread until dropped.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    frames: std::sync::Arc<std::sync::Mutex<Vec<CapturedFrame>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing on `ifname` inside namespace `ns` (`None`: this process's namespace).
    /// Returns once the socket is bound: every later frame is seen.
    pub fn start(ns: Option<&str>, ifname: &str) -> Capture {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frames = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, f, ns_name, ifname_owned) = (
            stop.clone(),
            frames.clone(),
            ns.map(str::to_string),
            ifname.to_string(),
        );
        let thread = std::thread::spawn(move || {
            let fd = match packet_socket(ns_name.as_deref(), &ifname_owned) {
                Ok(fd) => {
                    let _ = ready_tx.send(Ok(()));
                    fd
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = vec![0u8; 70_000];
            while !s.load(Ordering::Relaxed) {
                let Some((len, vlan)) = recv_tagged(&fd, &mut buf) else {
                    continue;
                };
                if buf[6..10] != [0x52, 0x54, 0x00, 0x77] {
                    continue;
                }
                let frame = CapturedFrame {
                    dst: buf[..6].try_into().unwrap(),
                    src: buf[6..12].try_into().unwrap(),
                    vlan,
                    ethertype: u16::from_be_bytes([buf[12], buf[13]]),
                    bytes: buf[..len].to_vec(),
                };
                f.lock().unwrap().push(frame);
            }
        });
        ready_rx
            .recv()
            .expect("capture thread")
            .unwrap_or_else(|e| panic!("capture on {ifname}: {e}"));
        Capture {
            stop,
            frames,
            thread: Some(thread),
        }
    }

    /// The frames seen so far.
    pub fn frames(&self) -> Vec<CapturedFrame> {
        self.frames.lock().unwrap().clone()
    }

    /// Waits (up to `timeout`, polling) until `f` holds for the frames seen so far.
    pub fn wait_for(&self, timeout: Duration, mut f: impl FnMut(&[CapturedFrame]) -> bool) -> bool {
        eventually(timeout, || f(&self.frames.lock().unwrap()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
