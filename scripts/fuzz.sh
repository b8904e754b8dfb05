#!/bin/bash
# Coverage-guided fuzzing of devshare's parsers and guest-facing paths (cargo-fuzz: libFuzzer
# with AddressSanitizer), on the stable toolchain (RUSTC_BOOTSTRAP=1 lets it take the
# sanitizer flags). The targets live in fuzz/fuzz_targets/, their corpora in fuzz/corpus/.
#
# Usage: scripts/fuzz.sh [--seconds N] [--target NAME]... [-- LIBFUZZER_ARGS...]
#   --seconds N      run each target for N seconds (default 30)
#   --target NAME    run only this target (repeatable; default: every target)
#   --list           print the targets and exit
#   --update-corpus  after the runs, merge what they found into fuzz/corpus/<target>/ and
#                    minimize it to the inputs that cover its edges (cargo fuzz cmin), keeping
#                    the named seed-* and regression-* inputs; review and commit the result
#   --write-seeds    check the seed inputs (cargo test in fuzz/) and write them into
#                    fuzz/corpus/<target>/seed-*, then exit
#   --help           this text
# Arguments after `--` go to libFuzzer (e.g. `-- -max_len=8192 -seed=1`).
#
# Targets (what each checks is written at the top of fuzz/src/<target>.rs):
#   relay    the front-end message relay: random vhost-user message streams with real file
#            descriptors over a socketpair, against a model of what must pass and what ends it
#   ring     descriptor chains over the split ring: random tables, indirect tables, avail
#            indices and guest memory layouts, against a walk of the spec
#   net      frames with random virtio-net, Ethernet, VLAN and IP headers through netmux's
#            TX path: no forged source, no guest-made tag, no link-local frame leaves; the
#            counters add up
#   control  the console's control-queue conversation with a hostile driver: the reply queue
#            stays bounded, every reply is well-formed
#   config   config files and command-line specs of both backends, sizes, QEMU versions and
#            command lines: no panic, and what prints parses back
#
# Targets run one after the other, with fuzz/dict/<target>.dict as libFuzzer's dictionary
# when there is one. New inputs go to fuzz/target/corpus/<target>/, so a run
# never changes the committed corpus unless asked to. For each target the script prints the
# executions, exec/s, libFuzzer's final coverage (cov: edges, ft: features), the corpus size
# and whether it crashed; a crash, a timeout (an input taking over 10 s) or a leak fails the
# run, and the reproducer's path is printed (fuzz/artifacts/<target>/...); so does a file the
# target leaves in its temporary directory (each run gets its own TMPDIR). Reproduce with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz TARGET ARTIFACT
# and shrink it with `cargo fuzz tmin` the same way.
#
# cargo-fuzz is installed (cargo install) when missing. Environment:
#   CARGO_FUZZ_VERSION   version installed when missing (default 0.13.2)
set -euo pipefail

# Everything below runs from main(), called on the last line (with the exit): bash has then
# read the whole file, so editing it while a long run goes on cannot change what that run does.
main() {
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "fuzz.sh: $*" >&2; exit 2; }
# Merges what a run found (work corpus) into the committed corpus and minimizes it to the
# inputs that cover its edges (cargo fuzz cmin with -use_counters=0: hit counts do not keep an
# input, which keeps the committed corpus small). Named inputs (seed-*, regression-*) stay.
update_corpus() {
    local t=$1 corpus=$2 work=$3 log=$4 keep
    echo "merging new inputs into $corpus and minimizing it"
    keep=$(mktemp -d)
    find "$corpus" -maxdepth 1 -type f \( -name 'seed-*' -o -name 'regression-*' \) \
        -exec mv {} "$keep/" \;
    if ! "${FUZZ[@]}" run --fuzz-dir fuzz "$t" "$corpus" "$work" -- -merge=1 >>"$log" 2>&1 ||
        ! "${FUZZ[@]}" cmin --fuzz-dir fuzz "$t" "$corpus" -- -use_counters=0 >>"$log" 2>&1; then
        mv "$keep"/* "$corpus/" 2>/dev/null || true
        rmdir "$keep"
        echo "fuzz.sh: updating the corpus of $t failed (see $log)" >&2
        return 1
    fi
    mv "$keep"/* "$corpus/" 2>/dev/null || true
    rmdir "$keep"
    echo "$corpus: $(find "$corpus" -type f | wc -l) files, $(corpus_kb "$corpus") KB"
}

# Bytes of the inputs in a corpus directory, in KB (rounded up), not the blocks they occupy.
corpus_kb() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d", (s + 1023) / 1024 }'; }

SECONDS_EACH=30
TARGETS=()
LIST=0
UPDATE=0
SEEDS=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --help | -h) usage; exit 0 ;;
        --seconds)
            [ $# -ge 2 ] || die "--seconds needs a number"
            [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || die "--seconds takes a positive number, not '$2'"
            SECONDS_EACH=$2; shift 2 ;;
        --seconds=*) SECONDS_EACH=${1#--seconds=}; shift
            [[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] && [ "$SECONDS_EACH" -gt 0 ] || die "--seconds takes a positive number" ;;
        --target)
            [ $# -ge 2 ] || die "--target needs a name (see --list)"
            TARGETS+=("$2"); shift 2 ;;
        --target=*) TARGETS+=("${1#--target=}"); shift ;;
        --list) LIST=1; shift ;;
        --update-corpus) UPDATE=1; shift ;;
        --write-seeds) SEEDS=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done

# rustup installs cargo into ~/.cargo/bin, which a non-login shell may not have on PATH.
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain with rustup"
if ! cargo fuzz --version >/dev/null 2>&1; then
    version=${CARGO_FUZZ_VERSION:-0.13.2}
    echo "installing cargo-fuzz $version (cargo install, about a minute)"
    cargo install --locked cargo-fuzz --version "$version" ||
        die "cargo install cargo-fuzz failed"
fi

# cargo-fuzz passes -Zsanitizer and friends; the stable compiler takes them with this.
export RUSTC_BOOTSTRAP=1
FUZZ=(cargo fuzz)

ALL=()
while IFS= read -r t; do ALL+=("$t"); done < <("${FUZZ[@]}" list --fuzz-dir fuzz)
[ "${#ALL[@]}" -gt 0 ] || die "no fuzz targets found in fuzz/"
if [ "$LIST" = 1 ]; then
    printf '%s\n' "${ALL[@]}"
    exit 0
fi
if [ "$SEEDS" = 1 ]; then
    (cd fuzz && cargo test --lib && cargo run --example write_seeds)
    echo "seeds written under fuzz/corpus/"
    exit 0
fi
if [ "${#TARGETS[@]}" = 0 ]; then
    TARGETS=("${ALL[@]}")
fi
for t in "${TARGETS[@]}"; do
    printf '%s\n' "${ALL[@]}" | grep -qx -- "$t" || die "no fuzz target '$t' (targets: ${ALL[*]})"
done

echo "=== building the fuzz targets (release, AddressSanitizer)"
t0=$(date +%s)
"${FUZZ[@]}" build --fuzz-dir fuzz || { echo "fuzz.sh: the fuzz targets do not build" >&2; exit 1; }
echo "built in $(($(date +%s) - t0)) s"

LOGDIR=fuzz/target/logs
mkdir -p "$LOGDIR"
ROWS=()
FAILED=()
for t in "${TARGETS[@]}"; do
    corpus=fuzz/corpus/$t
    work=fuzz/target/corpus/$t
    mkdir -p "$corpus" "$work" "fuzz/artifacts/$t"
    log=$LOGDIR/$t.log
    echo
    echo "=== $t: ${SECONDS_EACH} s"
    status=0
    dict=()
    [ -f "fuzz/dict/$t.dict" ] && dict=(-dict="fuzz/dict/$t.dict")
    # A temporary directory of the run's own: whatever a target leaves in it is a leak that
    # would pile up in /tmp run after run, and fails the run.
    run_tmp=$(mktemp -d "${TMPDIR:-/tmp}/devshare-fuzz-$t.XXXXXX")
    # New inputs land in the first directory (the work corpus); both are read.
    TMPDIR=$run_tmp "${FUZZ[@]}" run --fuzz-dir fuzz "$t" "$work" "$corpus" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 \
        "${dict[@]}" "${EXTRA[@]}" >"$log" 2>&1 || status=$?
    left=$(find "$run_tmp" -mindepth 1 -maxdepth 1 -printf '%f ')
    rm -rf "$run_tmp"
    if [ "$status" = 0 ] && [ -n "$left" ]; then
        echo "$t left files in its temporary directory: $left" | tee -a "$log"
        status=1
    fi
    # The last status line carries the final coverage: "#N DONE cov: C ft: F corp: U/S ...".
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 || true)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")
    execs=$(sed -nE 's/^stat::number_of_executed_units: +([0-9]+)/\1/p' "$log" | tail -n 1)
    rate=$(sed -nE 's/^stat::average_exec_per_sec: +([0-9]+)/\1/p' "$log" | tail -n 1)
    if [ -z "$execs" ]; then
        execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")
    fi
    artifact=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
    if [ "$status" = 0 ]; then
        result=ok
    else
        result="FAILED (exit $status)"
        [ -n "$artifact" ] && result="FOUND $(basename "$artifact" | cut -d- -f1)"
        FAILED+=("$t")
        # The report: what went wrong and where (the sanitizer's or the panic's lines).
        grep -E 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|SUMMARY|^thread ' "$log" | head -n 20 || true
        [ -n "$artifact" ] && echo "reproducer: $artifact"
        echo "full log: $log"
    fi
    files=$(find "$corpus" -type f | wc -l)
    kb=$(corpus_kb "$corpus")
    printf '%s: %s execs, %s exec/s, cov %s, ft %s, corpus %s (committed: %s files, %s KB): %s\n' \
        "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$files" "$kb" "$result"
    ROWS+=("$(printf '%-9s %10s %8s %7s %7s %12s %10s  %s' "$t" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "${ft:-?}" "${corp:-?}" "$files/${kb}K" "$result")")
    if [ "$UPDATE" = 1 ] && [ "$status" = 0 ]; then
        update_corpus "$t" "$corpus" "$work" "$log" || FAILED+=("$t-corpus")
    fi
done

echo
echo "=== fuzz summary (${SECONDS_EACH} s per target)"
printf '%-9s %10s %8s %7s %7s %12s %10s  %s\n' target execs exec/s cov ft corpus committed result
printf '%s\n' "${ROWS[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "no crashes"
}

# On one line with the call: bash has read it before main runs, so nothing after it is read.
main "$@"; exit $?
