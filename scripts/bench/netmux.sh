#!/bin/bash
# Benchmark of vhost-user-netmux beside DPDK's vhost-user backend, under the same load.
#
# Usage: scripts/bench/netmux.sh [--seconds N] [--only netmux|dpdk] [--case NAME] [--help]
#
# The load generator (integration/src/bin/netmux_load.rs, built on the frontend harness) plays
# two guests that poll their rings: a sender that keeps its TX ring full of one frame and, for
# guest-to-guest runs, a receiver that keeps its RX ring full of buffers. Cases:
#   g2g-64, g2g-1500   guest to guest, 64- and 1500-byte Ethernet frames (counted as received)
#   g2g-tso            guest to guest, 64 KiB TCP segmentation (TSO) frames (received)
#   g2u-64, g2u-1500   guest to uplink: out through a veth whose far end sits in a private
#                      network namespace (counted as taken from the sender's ring)
# --case NAME runs only that case (repeatable), e.g. --case g2g-64 for quick comparisons.
# The same cases run against
#   netmux   vhost-user-netmux (release build), uplink af-packet on the veth
#   dpdk     dpdk-testpmd in io forwarding: two net_vhost vdevs for guest to guest, net_vhost
#            plus net_af_packet on the same veth for guest to uplink
# Reported per run: Mpps, Gbps, the backend's CPU seconds per million frames (user + system,
# from /proc), and netmux's ratio to DPDK. A table is printed; JSON goes to
# target/bench/netmux.json. Needs root (namespace, veth, apt-get for dpdk-dev and jq).
# This measures; it does not pass or fail. On a 2-core machine the generator's two polling
# threads and the backend share the cores, for both backends alike.
# NETMUX_BENCH_BIN_DIR=DIR uses DIR/vhost-user-netmux and DIR/netmux_load instead of building
# them: to compare two builds run for run, e.g. before and after a change.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

SECONDS_PER_RUN=10
ONLY=""
ONLY_CASES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --case) ONLY_CASES+=("$2"); shift 2 ;;
        --help | -h) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "netmux.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "netmux.sh: needs root (network namespace, veth, apt-get)" >&2; exit 1; }

need_apt() { # command package
    command -v "$1" >/dev/null && return 0
    echo "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null
}
need_apt jq jq
[ "$ONLY" = netmux ] || need_apt dpdk-testpmd dpdk-dev

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -n "${NETMUX_BENCH_BIN_DIR:-}" ]; then
    NETMUX=$NETMUX_BENCH_BIN_DIR/vhost-user-netmux
    LOAD=$NETMUX_BENCH_BIN_DIR/netmux_load
    [ -x "$NETMUX" ] && [ -x "$LOAD" ] || { echo "netmux.sh: no vhost-user-netmux and netmux_load in $NETMUX_BENCH_BIN_DIR" >&2; exit 1; }
    echo "using $NETMUX_BENCH_BIN_DIR"
else
    echo "building (release)"
    cargo build --release -q -p vhost-user-netmux -p devshare-integration \
        --bin vhost-user-netmux --bin netmux_load
    NETMUX=$TARGET/release/vhost-user-netmux
    LOAD=$TARGET/release/netmux_load
fi
OUT=$ROOT/target/bench
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/netmux-bench.XXXXXX)
NS=nmxbench$$
VETH=nmxb$$
PEER=nmxq$$
BACKEND_PID=""

cleanup() {
    exec 7>&- 2>/dev/null || true
    if [ -n "$BACKEND_PID" ]; then kill "$BACKEND_PID" 2>/dev/null || true; wait "$BACKEND_PID" 2>/dev/null || true; fi
    ip link del "$VETH" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The uplink: a veth whose far end sits in a namespace of its own, so frames end there.
ip netns add "$NS"
ip link add "$VETH" type veth peer name "$PEER"
ip link set "$PEER" netns "$NS"
ip link set "$VETH" up
ip netns exec "$NS" ip link set "$PEER" up

MAC0=52:54:00:77:00:01
MAC1=52:54:00:77:00:02
FAR=02:00:00:00:00:99   # no guest: netmux sends it to the uplink

wait_socket() { # path
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "netmux.sh: $1 did not appear; backend log:" >&2
    cat "$WORK"/backend.log >&2
    exit 1
}

stop_backend() {
    [ -n "$BACKEND_PID" ] || return 0
    # TERM, not INT: a background job of a non-interactive shell ignores SIGINT.
    kill -TERM "$BACKEND_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$BACKEND_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BACKEND_PID" 2>/dev/null || true
    wait "$BACKEND_PID" 2>/dev/null || true
    BACKEND_PID=""
    rm -f "$WORK"/*.sock
}

start_netmux() {
    RUST_LOG=warn "$NETMUX" --uplink "af-packet:$VETH" \
        --port "name=g0,socket=$WORK/g0.sock,mac=$MAC0" \
        --port "name=g1,socket=$WORK/g1.sock,mac=$MAC1" >"$WORK"/backend.log 2>&1 &
    BACKEND_PID=$!
    wait_socket "$WORK"/g0.sock
    wait_socket "$WORK"/g1.sock
}

start_dpdk() { # g2g|g2u
    local second
    if [ "$1" = g2g ]; then
        second="net_vhost1,iface=$WORK/g1.sock,queues=1,tso=1"
    else
        second="net_af_packet0,iface=$VETH"
    fi
    # stdin must stay open: testpmd without -i forwards until it reads a line. A FIFO held
    # open read-write by this shell never ends.
    dpdk-testpmd -l 0,1 --main-lcore 0 --no-huge -m 1024 --no-pci \
        --file-prefix "nmxbench$$" \
        --vdev "net_vhost0,iface=$WORK/g0.sock,queues=1,tso=1" --vdev "$second" -- \
        --forward-mode=io --total-num-mbufs=16384 --txq=1 --rxq=1 \
        <"$WORK"/stdin >"$WORK"/backend.log 2>&1 &
    BACKEND_PID=$!
    wait_socket "$WORK"/g0.sock
    [ "$1" = g2u ] || wait_socket "$WORK"/g1.sock
    # Forwarding starts after testpmd's link check; this line comes once it runs.
    for _ in $(seq 300); do grep -q "Press enter to exit" "$WORK"/backend.log && break; sleep 0.1; done
}

mkfifo "$WORK"/stdin
exec 7<>"$WORK"/stdin
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

run_case() { # backend case size
    local backend=$1 case=$2 size=$3 kind=${2%%-*} dst rx=() line
    if [ "$kind" = g2g ]; then dst=$MAC1; rx=(--rx-socket "$WORK/g1.sock"); else dst=$FAR; fi
    if [ "$backend" = netmux ]; then start_netmux; else start_dpdk "$kind"; fi
    line=$("$LOAD" --tx-socket "$WORK/g0.sock" "${rx[@]}" --src-mac "$MAC0" --dst-mac "$dst" \
        --size "$size" --seconds "$SECONDS_PER_RUN" --pid "$BACKEND_PID" 2>>"$WORK"/load.log) || {
        echo "netmux.sh: load generator failed ($backend $case); logs:" >&2
        cat "$WORK"/load.log "$WORK"/backend.log >&2
        stop_backend
        return 0
    }
    stop_backend
    echo "$line" | jq -c --arg b "$backend" --arg c "$case" '. + {backend: $b, case: $c}' >>"$RESULTS"
    echo "$line" | jq -r --arg b "$backend" --arg c "$case" \
        '"  \($b) \($c): \(.mpps*1000|round/1000) Mpps, \(.gbps*100|round/100) Gbps"'
}

CASES=("g2g-64 64" "g2g-1500 1500" "g2g-tso 65536" "g2u-64 64" "g2u-1500 1500")
for backend in netmux dpdk; do
    [ -z "$ONLY" ] || [ "$ONLY" = "$backend" ] || continue
    echo "== $backend"
    for c in "${CASES[@]}"; do
        if [ ${#ONLY_CASES[@]} -gt 0 ] && [[ ! " ${ONLY_CASES[*]} " == *" ${c%% *} "* ]]; then
            continue
        fi
        # shellcheck disable=SC2086
        run_case "$backend" $c
    done
done

jq -s --arg cpus "$(nproc)" --arg kernel "$(uname -r)" --arg secs "$SECONDS_PER_RUN" '
    (map(select(.backend == "dpdk")) | map({key: .case, value: .}) | from_entries) as $dpdk
    | {machine: {cpus: ($cpus|tonumber), kernel: $kernel}, seconds_per_run: ($secs|tonumber),
       runs: map(. + (if .backend == "netmux" and $dpdk[.case] and $dpdk[.case].mpps > 0
                     then {ratio_to_dpdk: (.mpps / $dpdk[.case].mpps)} else {} end))}
' "$RESULTS" >"$OUT"/netmux.json

echo
printf '%-8s %-9s %8s %8s %12s %9s %11s\n' backend case Mpps Gbps "CPU s/Mpkt" "x DPDK" "ingest Mpps"
jq -r '.runs[] | [.backend, .case, (.mpps*1000|round/1000), (.gbps*100|round/100),
        (if .cpu_s_per_mpkt then (.cpu_s_per_mpkt*1000|round/1000) else "-" end),
        (if .ratio_to_dpdk then (.ratio_to_dpdk*100|round/100) else "-" end),
        (.ingest_mpps*1000|round/1000)] | @tsv' \
    "$OUT"/netmux.json | while IFS=$'\t' read -r b c m g cpu r i; do
    printf '%-8s %-9s %8s %8s %12s %9s %11s\n' "$b" "$c" "$m" "$g" "$cpu" "$r" "$i"
done
echo "Mpps/Gbps: frames the receiving guest got (g2g) or the backend took from the sender (g2u);"
echo "ingest: frames the backend took from the sender's ring."
echo "JSON: $OUT/netmux.json"
