#!/bin/bash
# The devshare demo: boots two small Linux guests under QEMU whose devices are served by the
# devshare backends, shows the traffic, then cleans everything up.
#
#   guest A                                   guest B
#   /dev/hvc0 ----------> vhost-user-console <---------- /dev/hvc0
#      (each console goes to its own PTY, printed here with a [console A/B] prefix)
#   /dev/virtio-ports/link <---- guest-to-guest link ----> /dev/virtio-ports/link
#   eth0 ---------------> vhost-user-netmux <----------- eth0
#                               |  (af-packet uplink on a veth whose far end sits in the
#                               |   network namespace devshare-demo: 10.77.0.1;
#                               |   host port: TAP dshost0, 10.77.0.100 on this host)
#
# Then kvm-pit-policy measures lost timer ticks with and without KVM's PIT reinjection (when
# /dev/kvm can run its lab).
#
# Usage (as root): scripts/demo.sh [--keep] [--accel tcg|kvm]
#   --keep       leave the work directory (logs) behind
#   --accel A    QEMU accelerator of the guests (default tcg)
# It runs scripts/setup.sh first (installs QEMU 11, the guest kernel and initramfs once).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

KEEP=0
ACCEL=${DEVSHARE_ACCEL:-tcg}
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --accel) ACCEL=$2; shift ;;
        --help | -h) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (network namespace, setup)" >&2; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "setting up (QEMU, guest kernel and initramfs; cached after the first run)"
scripts/setup.sh --quiet
# shellcheck disable=SC1091
. "${DEVSHARE_CACHE:-/var/cache/devshare}/env"

say "building the backends (release)"
cargo build --release --bins --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

WORK=$(mktemp -d /tmp/devshare-demo.XXXXXX)
NS=devshare-demo
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    ip link del dsdemo0 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    if [ "$KEEP" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

say "the shared NIC: a veth pair, far end in namespace $NS (10.77.0.1)"
ip netns del "$NS" 2>/dev/null || true
ip link del dsdemo0 2>/dev/null || true
ip netns add "$NS"
ip link add dsdemo0 type veth peer name dsdemo1
ip link set dsdemo1 netns "$NS"
ip -n "$NS" addr add 10.77.0.1/24 dev dsdemo1
ip -n "$NS" link set dsdemo1 up
ip -n "$NS" link set lo up
ip link set dsdemo0 up

CONSOLE_ARGS=(--vm "a=$WORK/a-console.sock" --vm "b=$WORK/b-console.sock"
    -p "a/console=pty:$WORK/a-console" -p "b/console=pty:$WORK/b-console"
    -p a/link=vm:b/link -p b/link=vm:a/link
    --stats-socket "$WORK/console.stats")
NETMUX_ARGS=(--uplink af-packet:dsdemo0
    --port "name=a,socket=$WORK/a-net.sock,mac=52:54:00:de:00:0a"
    --port "name=b,socket=$WORK/b-net.sock,mac=52:54:00:de:00:0b"
    --host-port dshost0
    --stats-socket "$WORK/netmux.stats")

say "starting vhost-user-console and vhost-user-netmux"
echo "vhost-user-console ${CONSOLE_ARGS[*]}"
"$BIN/vhost-user-console" "${CONSOLE_ARGS[@]}" 2>"$WORK/console.log" &
PIDS+=($!)
echo "vhost-user-netmux ${NETMUX_ARGS[*]}"
"$BIN/vhost-user-netmux" "${NETMUX_ARGS[@]}" 2>"$WORK/netmux.log" &
PIDS+=($!)
for f in a-console.sock b-console.sock a-net.sock b-net.sock a-console b-console netmux.stats; do
    for _ in $(seq 100); do [ -e "$WORK/$f" ] && break; sleep 0.1; done
    [ -e "$WORK/$f" ] || { echo "backend did not create $f"; cat "$WORK"/*.log; exit 1; }
done
# The host port: this host reaches the guests through it (it goes away with netmux).
ip addr add 10.77.0.100/24 dev dshost0

# The QEMU options each backend prints for guest $1, minus the memory options given once below.
device_args() {
    { "$BIN/vhost-user-console" "${CONSOLE_ARGS[@]}" --print-qemu-args |
        awk -v vm="# $1" '/^# /{on=($0==vm); next} on'
      "$BIN/vhost-user-netmux" "${NETMUX_ARGS[@]}" --print-qemu-args |
        awk -v vm="$1" '/^# /{on=($5==vm); next} on'; } |
        sed -e 's/\\$//' -e 's/^ *//' | grep -v -e memory-backend -e '^-machine'
}

# Guest scripts, appended to the base initramfs as /test.sh.
cat >"$WORK/a.sh" <<'EOF'
ip addr add 10.77.0.11/24 dev eth0 && ip link set eth0 up
echo "guest A up; eth0 10.77.0.11" >/dev/hvc0
exec 3<>/dev/virtio-ports/link
for i in 1 2 3; do
    echo "hello $i from guest A" >&3
    read -r reply <&3
    echo "A received over the link: $reply" >/dev/hvc0
done
sleep 1
ping -c 3 -W 5 10.77.0.12 >/dev/hvc0 2>&1
ping -c 2 -W 5 10.77.0.1 >/dev/hvc0 2>&1
if ping -c 2 -W 5 10.77.0.100 >/dev/null 2>&1; then
    echo "A reached this host (10.77.0.100) through the host port" >/dev/hvc0
else
    echo "A did not reach this host through the host port" >/dev/hvc0
fi
echo "guest A done" >/dev/hvc0
sleep 1
EOF
cat >"$WORK/b.sh" <<'EOF'
ip addr add 10.77.0.12/24 dev eth0 && ip link set eth0 up
echo "guest B up; eth0 10.77.0.12" >/dev/hvc0
exec 3<>/dev/virtio-ports/link
for i in 1 2 3; do
    read -r msg <&3
    echo "B received over the link: $msg" >/dev/hvc0
    echo "reply $i from guest B" >&3
done
ping -c 3 -W 5 10.77.0.11 >/dev/hvc0 2>&1
echo "guest B done" >/dev/hvc0
sleep 6
EOF

make_initrd() { # $1 = guest name
    local d="$WORK/$1-root"
    mkdir -p "$d"
    cp "$WORK/$1.sh" "$d/test.sh"
    (cd "$d" && echo test.sh | cpio -o -H newc --quiet | gzip) >"$WORK/$1-extra.cpio.gz"
    cat "$DEVSHARE_INITRD" "$WORK/$1-extra.cpio.gz" >"$WORK/$1-initrd"
}

boot() { # $1 = guest name
    make_initrd "$1"
    local args
    mapfile -t args < <(device_args "$1" | tr ' ' '\n' | grep -v '^$')
    scripts/qemu -nodefaults -no-user-config -display none -no-reboot -accel "$ACCEL" \
        -m 256M -object memory-backend-memfd,id=mem,size=256M,share=on \
        -machine q35,memory-backend=mem \
        -kernel "$DEVSHARE_KERNEL" -initrd "$WORK/$1-initrd" \
        -append "console=ttyS0 quiet panic=-1 no_timer_check" -serial "file:$WORK/$1-serial.log" \
        "${args[@]}" 2>"$WORK/$1-qemu.log" &
    PIDS+=($!)
    GUEST_PID[$1]=$!
}

say "the guests' consoles (PTYs $WORK/a-console, $WORK/b-console):"
sed -u 's/^/  [console A] /' <"$WORK/a-console" 2>/dev/null | tee -a "$WORK/consoles.txt" &
PIDS+=($!)
sed -u 's/^/  [console B] /' <"$WORK/b-console" 2>/dev/null | tee -a "$WORK/consoles.txt" &
PIDS+=($!)

declare -A GUEST_PID
say "booting guests A and B under $ACCEL (a few seconds each)"
boot b
boot a
# The host pings guest B once B is up (B stays up a few seconds after its own pings).
(
    for _ in $(seq 900); do grep -q "guest B up" "$WORK/consoles.txt" 2>/dev/null && break; sleep 0.2; done
    busybox ping -c 3 -W 5 10.77.0.12
) >"$WORK/host-ping.txt" 2>&1 &
PIDS+=($!)
status=0
for g in a b; do
    if ! timeout 180 tail --pid="${GUEST_PID[$g]}" -f /dev/null; then
        echo "guest $g did not finish in time"; status=1
    fi
done
sleep 0.5

say "counters"
echo "vhost-user-console:"
python3 - "$WORK/console.stats" <<'EOF' || echo "  (stats socket not readable)"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
doc = json.loads(s.makefile().read())
for p in doc["ports"]:
    print(f"  {p['vm']}/{p['port']}: to host {p['to_host_bytes']} B, to guest {p['to_guest_bytes']} B,"
          f" dropped {p['dropped_bytes']} B, bad chains {p['bad_chains']}")
EOF
echo "vhost-user-netmux (full JSON: vhost-user-netmux stats --socket ...):"
"$BIN/vhost-user-netmux" stats --socket "$WORK/netmux.stats" | python3 -c '
import json, sys
doc = json.load(sys.stdin)
for p in doc["ports"]:
    why = ", ".join("%s %d" % (k, v) for k, v in p["drops"].items() if v)
    print("  port %s: rx %d pkts, tx %d pkts, drops: %s" % (p["name"], p["rx_packets"], p["tx_packets"], why or "none"))
u = doc["uplink"]
print("  uplink %s: rx %d pkts, tx %d pkts" % (u["name"], u["rx_packets"], u["tx_packets"]))
h = doc.get("host")
if h:
    print("  host port %s (%s): rx %d pkts, tx %d pkts" % (h["name"], h["mac"], h["rx_packets"], h["tx_packets"]))
' || true
echo "this host pinging guest B through the host port:"
sed 's/^/  /' "$WORK/host-ping.txt"

say "checks"
check() { # $1 = what, $2 = pattern expected in the consoles
    if grep -q -- "$2" "$WORK/consoles.txt"; then echo "  ok    $1"; else echo "  FAIL  $1"; status=1; fi
}
check "guest-to-guest serial link, A -> B" "B received over the link: hello 3 from guest A"
check "guest-to-guest serial link, B -> A" "A received over the link: reply 3 from guest B"
check "A pings B through netmux" "console A.*3 packets transmitted, 3 packets received"
check "B pings A through netmux" "console B.*3 packets transmitted, 3 packets received"
check "A pings the NIC's far end" "console A.*2 packets transmitted, 2 packets received"
check "A pings this host (host port)" "A reached this host"
if grep -q "3 packets received" "$WORK/host-ping.txt"; then
    echo "  ok    this host pings B (host port)"
else
    echo "  FAIL  this host pings B (host port)"; status=1
fi

if [ -e /dev/kvm ]; then
    say "KVM PIT lost-tick policy: 1/3 of the time the vCPU is withheld"
    RUST_LOG=warn "$BIN/kvm-pit-policy" lab --duration 2s || echo "(the lab needs a working /dev/kvm)"
fi

say "done"
exit "$status"
