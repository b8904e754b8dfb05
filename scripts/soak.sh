#!/bin/bash
# Soak: SIGKILL and restart each backend N times under traffic, then restart its front-ends
# N times with the backend staying up, and check what survived (docs/soak.md).
#
# Usage: scripts/soak.sh [--iterations N] [--only console|netmux|qemu] [--help] [-- DRIVER ARGS]
#   --iterations N   kills of each backend, and front-end restarts after them (default 100)
#   --only PART      console, netmux or qemu (default: all three, in that order)
#   -- ARGS          passed to the driver of the part chosen with --only (soak_console or
#                    soak_netmux --help)
#
# console  vhost-user-console with --state-dir, a stream-mode VM written by a player of QEMU's
#          -chardev socket,reconnect-ms and a virtio VM driven by the frontend harness, each
#          port read by a client: every byte the backend accepted must reach the client
#          exactly once and in order; only what was written but not yet read when it died
#          may be lost (the stream's QEMU side loses it too).
# netmux   vhost-user-netmux on a veth uplink whose far end sits in a namespace of its own,
#          two harness guests sending each other numbered frames: after every kill every
#          guest reconnects and traffic resumes both ways; frames in flight may be lost.
# qemu     the console's stream VM with a real QEMU (reconnect-ms) and a TCG guest printing
#          the same lines to its serial port: QEMU redials every time, lines arrive in order
#          and never twice, and data goes missing only across a kill (kills only).
# All: the backend's descriptors, resident memory and threads, and the surviving side's (the
# driver, QEMU), printed per kill and summarised (first, last, min, max); growth beyond the
# stated bound fails. Waits are on readiness (a socket, a counter, data arriving), never
# fixed sleeps.
#
# Takes about 1 minute per part at 100 iterations on 2 cores (3 to 4 minutes in all with the
# release build). Not part of scripts/test.sh. Needs root for netmux (namespace, veth) and
# qemu (scripts/setup.sh, run first, cached). Results as JSON in target/soak/. Exit status
# non-zero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ITERATIONS=100
ONLY=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --iterations)
            [ $# -ge 2 ] || { echo "soak.sh: --iterations needs a number" >&2; exit 2; }
            ITERATIONS=$2; shift 2 ;;
        --only)
            [ $# -ge 2 ] || { echo "soak.sh: --only needs console, netmux or qemu" >&2; exit 2; }
            ONLY=$2; shift 2 ;;
        --help | -h) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "soak.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
case "$ITERATIONS" in
    '' | *[!0-9]*) echo "soak.sh: --iterations takes a whole number, not '$ITERATIONS'" >&2; exit 2 ;;
esac
case "$ONLY" in
    "" | console | netmux | qemu) ;;
    *) echo "soak.sh: --only takes console, netmux or qemu, not '$ONLY'" >&2; exit 2 ;;
esac
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
if { want netmux || want qemu; } && [ "$(id -u)" != 0 ]; then
    echo "soak.sh: the netmux and qemu parts need root (namespace and veth; scripts/setup.sh); --only console runs without" >&2
    exit 2
fi
if want qemu; then
    scripts/setup.sh --quiet
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
echo "building (release)"
cargo build --release -q -p vhost-user-console -p vhost-user-netmux -p devshare-integration \
    --bin vhost-user-console --bin vhost-user-netmux --bin soak_console --bin soak_netmux
OUT=$ROOT/target/soak
mkdir -p "$OUT"
export DEVSHARE_BIN_DIR=$TARGET/release

NS=""
VETH=""
cleanup() {
    [ -n "$VETH" ] && ip link del "$VETH" 2>/dev/null || true
    [ -n "$NS" ] && ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT

failed=()
start=$(date +%s)

if want console; then
    echo "=== console: $ITERATIONS kills, then $ITERATIONS front-end restarts"
    t0=$(date +%s)
    if "$TARGET"/release/soak_console --iterations "$ITERATIONS" \
        --frontend-restarts "$ITERATIONS" --json "$OUT/console.json" "${EXTRA[@]}"; then
        echo "=== console: passed in $(( $(date +%s) - t0 )) s"
    else
        echo "=== console: FAILED after $(( $(date +%s) - t0 )) s" >&2
        failed+=(console)
    fi
fi

if want netmux; then
    # The uplink: a veth whose far end sits in a namespace of its own, silent (no IPv6
    # chatter), so the guests' frames are the only traffic.
    NS=devsoak$$
    VETH=dsoak$$
    peer=dsoakp$$
    ip netns add "$NS"
    ip link add "$VETH" type veth peer name "$peer"
    ip link set "$peer" netns "$NS"
    sysctl -qw "net.ipv6.conf.$VETH.disable_ipv6=1"
    ip netns exec "$NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip link set "$VETH" up
    ip netns exec "$NS" ip link set "$peer" up
    echo "=== netmux: $ITERATIONS kills, then $ITERATIONS front-end restarts"
    t0=$(date +%s)
    if "$TARGET"/release/soak_netmux --uplink "af-packet:$VETH" --iterations "$ITERATIONS" \
        --frontend-restarts "$ITERATIONS" --json "$OUT/netmux.json" "${EXTRA[@]}"; then
        echo "=== netmux: passed in $(( $(date +%s) - t0 )) s"
    else
        echo "=== netmux: FAILED after $(( $(date +%s) - t0 )) s" >&2
        failed+=(netmux)
    fi
fi

if want qemu; then
    echo "=== qemu: $ITERATIONS kills of vhost-user-console under a real QEMU's stream VM"
    t0=$(date +%s)
    if "$TARGET"/release/soak_console --qemu --iterations "$ITERATIONS" \
        --json "$OUT/qemu.json" "${EXTRA[@]}"; then
        echo "=== qemu: passed in $(( $(date +%s) - t0 )) s"
    else
        echo "=== qemu: FAILED after $(( $(date +%s) - t0 )) s" >&2
        failed+=(qemu)
    fi
fi

echo "soak: $(( $(date +%s) - start )) s in all; results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
    echo "soak: FAILED: ${failed[*]} (see the problems listed above)" >&2
    exit 1
fi
echo "soak: passed"
