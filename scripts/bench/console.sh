#!/bin/bash
# Benchmark of vhost-user-console beside rust-vmm's vhost-device-console, under the same load.
#
# Usage: scripts/bench/console.sh [--seconds N] [--runs N] [--only ours|vdc] [--ours BIN] [--help]
#   --ours BIN  measure this vhost-user-console binary (e.g. an older build) instead of the
#               release build of the tree
#
# First the machine's limit, measured in the same run (integration/src/bin/memcpy_limit.rs):
# memcpy of 64 KiB blocks over buffers larger than the last-level cache ("dram") and over
# buffers that stay in cache ("cache"), in GB/s. Throughput cases are read against these.
#
# The load generator (integration/src/bin/console_load.rs, built on the frontend harness)
# plays the guest's virtio-console driver and polls its rings. Cases:
#   g2e-unix    guest -> Unix endpoint, 64 KiB chains on a data port, MB/s read by a client
#   e2g-unix    Unix endpoint -> guest, 64 KiB client writes into 64 KiB receive buffers
#   g2e-tcp     the same two over a TCP endpoint on 127.0.0.1 (what vhost-device-console
#   e2g-tcp     offers: its only socket endpoint is TCP)
#   g2g-link    guest -> guest over a link (vm:OTHER/PORT), 64 KiB chains, MB/s received
#   rtt-unix-64 64-byte message guest -> Unix endpoint -> echoed -> guest, microseconds
#   rtt-tcp-1   1-byte message over TCP (vhost-device-console breaks on longer input: it
#               returns one used entry per byte of the same chain)
# against
#   ours   vhost-user-console (release build), a fresh process per case
#   vdc    vhost-device-console --backend network (cargo install'ed into
#          ${DEVSHARE_CACHE:-/var/cache/devshare}/cargo on first use); one port (port 0),
#          TCP only, no guest-to-guest links; the generator runs with --lenient because it
#          reports a used length on transmit chains (the bytes it read), which the spec
#          forbids. Cases it cannot do are listed as unsupported, with the reason.
# Queues have 128 entries for both (vhost-device-console's maximum). Every case runs --runs
# times (default 3), ours and vdc alternating case by case, so both see the same load; the
# table shows medians (and how many runs failed). JSON with every run and the medians goes to
# target/bench/console.json. This measures; it does not pass or fail. On a 2-core machine the
# generator's polling threads and the backend share the cores, so other load on the machine
# moves the figures a lot: compare within one run, and note the load average printed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

SECONDS_PER_RUN=5
RUNS=3
ONLY=""
OURS_BIN=""
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --ours) OURS_BIN=$2; shift 2 ;;
        --help | -h) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "console.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

if ! command -v jq >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "console.sh: needs jq (apt-get install jq)" >&2; exit 1; }
    echo "installing jq"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends jq >/dev/null
fi

CARGO_CACHE=${DEVSHARE_CACHE:-/var/cache/devshare}/cargo
VDC=$CARGO_CACHE/bin/vhost-device-console
if [ "$ONLY" != ours ] && [ ! -x "$VDC" ]; then
    echo "installing vhost-device-console into $CARGO_CACHE (once)"
    mkdir -p "$CARGO_CACHE"
    CARGO_TARGET_DIR=$CARGO_CACHE/build cargo install -q --locked vhost-device-console \
        --root "$CARGO_CACHE" || cargo install -q vhost-device-console --root "$CARGO_CACHE"
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
echo "building (release)"
cargo build --release -q -p vhost-user-console --bin vhost-user-console
cargo build --release -q -p devshare-integration --bin console_load --bin memcpy_limit
OURS=${OURS_BIN:-$TARGET/release/vhost-user-console}
LOAD=$TARGET/release/console_load
MEMCPY=$TARGET/release/memcpy_limit
OUT=$ROOT/target/bench
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/console-bench.XXXXXX)
BACKEND_PID=""
# A TCP port of our own for this run (loopback only).
TCP_PORT=$((20000 + $$ % 20000))

stop_backend() {
    [ -n "$BACKEND_PID" ] || return 0
    kill "$BACKEND_PID" 2>/dev/null || true
    wait "$BACKEND_PID" 2>/dev/null || true
    BACKEND_PID=""
    rm -f "$WORK"/*.sock*
}
cleanup() {
    stop_backend
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_socket() { # path
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "console.sh: $1 did not appear; backend log:" >&2
    cat "$WORK"/backend.log >&2
    exit 1
}

start_ours() { # unix|tcp
    local data="unix:$WORK/a-data.sock"
    [ "$1" = tcp ] && data="tcp:127.0.0.1:$TCP_PORT"
    RUST_LOG=warn "$OURS" --vm "a=$WORK/a.sock" --vm "b=$WORK/b.sock" \
        -p "a/console=unix:$WORK/a-con.sock" -p "a/data=$data" -p a/link=vm:b/link \
        -p "b/console=unix:$WORK/b-con.sock" -p "b/data=unix:$WORK/b-data.sock" \
        -p b/link=vm:a/link >"$WORK"/backend.log 2>&1 &
    BACKEND_PID=$!
    wait_socket "$WORK"/a.sock
    wait_socket "$WORK"/b.sock
}

start_vdc() {
    RUST_LOG=warn "$VDC" --socket-path "$WORK/v.sock" --backend network \
        --tcp-port "$TCP_PORT" >"$WORK"/backend.log 2>&1 &
    BACKEND_PID=$!
    wait_socket "$WORK"/v.sock0
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"

record() { # backend case json
    echo "$3" | jq -c --arg b "$1" --arg c "$2" '. + {backend: $b, case: $c}' >>"$RESULTS"
}

unsupported() { # backend case reason
    record "$1" "$2" "$(jq -cn --arg r "$3" '{unsupported: $r}')"
    echo "  $1 $2: unsupported: $3"
}

run_case() { # backend case mode size endpoint-kind
    local backend=$1 case=$2 mode=$3 size=$4 kind=$5 args line
    if [ "$backend" = ours ]; then
        start_ours "$kind"
        args=(--socket "$WORK/a.sock" --ports 3 --port 1)
        if [ "$kind" = tcp ]; then
            args+=(--endpoint "tcp:127.0.0.1:$TCP_PORT")
        else
            args+=(--endpoint "unix:$WORK/a-data.sock")
        fi
        if [ "$mode" = link ]; then
            args=(--socket "$WORK/a.sock" --peer-socket "$WORK/b.sock" --ports 3 --port 2)
        fi
    else
        start_vdc
        args=(--socket "$WORK/v.sock0" --ports 1 --port 0 --lenient
            --endpoint "tcp:127.0.0.1:$TCP_PORT")
    fi
    line=$(timeout $((SECONDS_PER_RUN + 60)) "$LOAD" --mode "$mode" "${args[@]}" \
        --size "$size" --seconds "$SECONDS_PER_RUN" --pid "$BACKEND_PID" \
        --label "$backend/$case" 2>>"$WORK"/load.log) || true
    stop_backend
    [ -n "$line" ] || line=$(jq -cn '{error: "load generator died or timed out"}')
    record "$backend" "$case" "$line"
    echo "$line" | jq -r --arg b "$backend" --arg c "$case" '
        if .error then "  \($b) \($c): failed: \(.error)"
        elif .mb_per_s then "  \($b) \($c): \(.mb_per_s|round) MB/s"
        else "  \($b) \($c): p50 \(.p50_us|round) us, p99 \(.p99_us|round) us" end'
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
LIMIT=$("$MEMCPY")
echo "$LIMIT" | jq -r '"machine limit, memcpy of 64 KiB blocks: \(.dram_gb_per_s*100|round/100) GB/s from memory (buffers of \(.dram_buffer_bytes/1048576|round) MiB, last-level cache \((.llc_bytes // 0)/1048576|round) MiB), \(.cache_gb_per_s*100|round/100) GB/s in cache"'

# One round: every case once, ours and vdc back to back.
run_round() {
    for backend in ours vdc; do
        [ -z "$ONLY" ] || [ "$ONLY" = "$backend" ] || continue
        if [ "$backend" = ours ]; then
            run_case ours g2e-unix to-endpoint 65536 unix
            run_case ours e2g-unix from-endpoint 65536 unix
        fi
    done
    for c in "g2e-tcp to-endpoint 65536" "e2g-tcp from-endpoint 65536"; do
        for backend in ours vdc; do
            [ -z "$ONLY" ] || [ "$ONLY" = "$backend" ] || continue
            # shellcheck disable=SC2086
            run_case "$backend" $c tcp
        done
    done
    if [ -z "$ONLY" ] || [ "$ONLY" = ours ]; then
        run_case ours g2g-link link 65536 unix
        run_case ours rtt-unix-64 latency 64 unix
    fi
    for backend in ours vdc; do
        [ -z "$ONLY" ] || [ "$ONLY" = "$backend" ] || continue
        run_case "$backend" rtt-tcp-1 latency 1 tcp
    done
}

for round in $(seq "$RUNS"); do
    echo "== round $round of $RUNS (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    run_round
done
if [ -z "$ONLY" ] || [ "$ONLY" = vdc ]; then
    unsupported vdc g2e-unix "no Unix-socket endpoint (TCP or its own stdio only)"
    unsupported vdc e2g-unix "no Unix-socket endpoint (TCP or its own stdio only)"
    unsupported vdc g2g-link "no guest-to-guest links (one VM per socket, each on its own TCP port)"
    unsupported vdc rtt-unix-64 "no Unix-socket endpoint; longer input breaks its receive ring"
fi

jq -s --arg cpus "$(nproc)" --arg kernel "$(uname -r)" --arg secs "$SECONDS_PER_RUN" \
    --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" --argjson limit "$LIMIT" '
    def median: sort | if length == 0 then null elif length % 2 == 1 then .[length/2|floor]
        else (.[length/2-1] + .[length/2]) / 2 end;
    . as $all
    | group_by([.backend, .case])
    | map({backend: .[0].backend, case: .[0].case, runs: length,
           failed: map(select(.error)) | length,
           unsupported: (map(.unsupported // empty) | first),
           errors: (map(.error // empty) | unique),
           mb_per_s: (map(.mb_per_s // empty) | median),
           mb_per_cpu_s: (map(select((.backend_cpu_seconds // 0) > 0)
                              | .bytes / 1e6 / .backend_cpu_seconds) | median),
           p50_us: (map(.p50_us // empty) | median),
           p99_us: (map(.p99_us // empty) | median)}) as $med
    | ($med | map(select(.backend == "vdc")) | map({key: .case, value: .}) | from_entries) as $vdc
    | {machine: {cpus: ($cpus|tonumber), kernel: $kernel, load_average_at_end: $load},
       limit: $limit, seconds_per_run: ($secs|tonumber), target_mb_per_s: 1000,
       medians: ($med | map(. + (if .backend == "ours" and .mb_per_s and (($vdc[.case].mb_per_s // 0) > 0)
                     then {ratio_to_vdc: (.mb_per_s / $vdc[.case].mb_per_s)} else {} end)
                   + (if .mb_per_s then {ratio_to_dram: (.mb_per_s / 1000 / $limit.dram_gb_per_s)}
                     else {} end))),
       runs: $all}
' "$RESULTS" >"$OUT"/console.json

echo
echo "medians of $RUNS runs (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%-7s %-12s %9s %9s %9s %9s %7s %7s %6s  %s\n' backend case "MB/s" "MB/cpu-s" "p50 us" "p99 us" "x vdc" "x dram" failed note
jq -r '.medians | sort_by(.backend != "ours", .case)[] | [.backend, .case,
        (if .mb_per_s then (.mb_per_s|round) else "-" end),
        (if .mb_per_cpu_s then (.mb_per_cpu_s|round) else "-" end),
        (if .p50_us then (.p50_us*10|round/10) else "-" end),
        (if .p99_us then (.p99_us*10|round/10) else "-" end),
        (if .ratio_to_vdc then (.ratio_to_vdc*10|round/10) else "-" end),
        (if .ratio_to_dram then (.ratio_to_dram*100|round/100) else "-" end),
        "\(.failed)/\(.runs)",
        (.unsupported // (.errors | join("; ")))] | @tsv' \
    "$OUT"/console.json | while IFS=$'\t' read -r b c m mc p50 p99 r d f note; do
    printf '%-7s %-12s %9s %9s %9s %9s %7s %7s %6s  %s\n' "$b" "$c" "$m" "$mc" "$p50" "$p99" "$r" "$d" "$f" "$note"
done
echo "MB/cpu-s: bytes moved per second of backend CPU time (the backend's own efficiency,"
echo "less moved by other load on the machine than MB/s)"
echo "targets: g2g-link >= the memory figure above (x dram >= 1); rtt-tcp-1 p50 and p99 no worse than vdc's"
echo "JSON: $OUT/console.json"
