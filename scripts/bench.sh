#!/bin/bash
# Benchmarks of devshare (not tests: they measure, they do not pass or fail).
#
# Usage: scripts/bench.sh [console|netmux|all] [-- ARGS for the part]
#   console   guest-to-endpoint / endpoint-to-guest MB/s and round-trip latency of
#             vhost-user-console through the frontend harness, beside vhost-device-console
#             (rust-vmm's backend, installed with cargo install) under the same load
#   netmux    guest-to-guest and guest-to-uplink Mpps/Gbps of vhost-user-netmux beside
#             DPDK's vhost-user backend (dpdk-testpmd) under the same load
#   all       both (default)
# Results are printed as tables and written as JSON under target/bench/.
# Release builds are used; peers are installed on first use.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
what=${1:-all}
shift || true
[ "${1:-}" = "--" ] && shift
case "$what" in
    --help | -h) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    console) exec scripts/bench/console.sh "$@" ;;
    netmux) exec scripts/bench/netmux.sh "$@" ;;
    all) scripts/bench/console.sh "$@"; scripts/bench/netmux.sh "$@" ;;
    *) echo "bench.sh: unknown part '$what' (console, netmux or all)" >&2; exit 2 ;;
esac
