#!/bin/bash
# Runs every check and test of devshare, the same way locally and in CI (.ci/run calls it).
# Every step runs even when an earlier one failed (except setup); the exit code is 0 only if all
# passed:
#   1. scripts/setup.sh       Debian packages, the QEMUs, guest kernel + initramfs (cached)
#   2. cargo fmt --check      formatting
#   3. cargo clippy           lints, warnings are errors
#   4. cargo doc              the API docs, rustdoc warnings (broken links...) are errors
#   5. cargo build --bins     the backends the end-to-end tests start
#   6. cargo test --workspace unit tests, frontend-driven tests, real QEMU guests
#   7. scripts/fuzz.sh        every fuzz target for DEVSHARE_FUZZ_SECONDS (30) seconds, from
#                             the committed corpora; a crash fails the step
# (fmt and clippy cover the fuzz crate too, which has its own workspace under fuzz/.)
#
# Usage: scripts/test.sh [--help] [-- CARGO_TEST_ARGS...]
#   Arguments after `--` go to `cargo test` (e.g. `-- boot` to run only matching tests).
# Environment:
#   DEVSHARE_TEST_PROFILE  `debug` (default) or `release`: the cargo profile of steps 4 and 5.
#                          Debug keeps overflow checks on in the tests; the guests run under TCG,
#                          which is far slower than a debug backend, so debug is fast enough.
#   DEVSHARE_TEST_TIMEOUT  time limit of `cargo test` in seconds (default 3000)
#   DEVSHARE_ACCEL         QEMU accelerator of the guests (default tcg)
#   DEVSHARE_CACHE         setup.sh's cache (default /var/cache/devshare)
#   DEVSHARE_REQUIRE_KVM   1: KVM lab tests fail instead of skipping without /dev/kvm
#                          (set by default when CI=true)
#   DEVSHARE_QEMU_VERSIONS the QEMU versions of the compatibility matrix to set up and test
#                          (default 7.2,10.0,11.1, every version of the README's table). A
#                          version named here but missing fails its tests.
#   DEVSHARE_FUZZ_SECONDS  seconds per fuzz target in step 7 (default 30; 0 skips the step)
#   CARGO_TARGET_DIR       honoured as usual
set -euo pipefail

case "${1:-}" in
    --help | -h) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --) shift ;;
    "") ;;
    *) echo "test.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PROFILE=${DEVSHARE_TEST_PROFILE:-debug}
case "$PROFILE" in
    debug) PROFILE_ARGS=() ;;
    release) PROFILE_ARGS=(--release) ;;
    *) echo "test.sh: DEVSHARE_TEST_PROFILE must be debug or release, not '$PROFILE'" >&2; exit 2 ;;
esac

TEST_TIMEOUT=${DEVSHARE_TEST_TIMEOUT:-3000}
# CI machines here have a /dev/kvm that runs the PIT lab: a lab test that skips there is a
# failure, not a skip.
if [ "${CI:-}" = true ]; then
    export DEVSHARE_REQUIRE_KVM=${DEVSHARE_REQUIRE_KVM:-1}
fi
# Every test means every QEMU of the README's table: each root takes about half a minute and
# 350 MB once, then is cached.
export DEVSHARE_QEMU_VERSIONS=${DEVSHARE_QEMU_VERSIONS:-7.2,10.0,11.1}

STEP_TIMES=()
step_start=0
step() {
    step_end
    CURRENT_STEP=$1
    step_start=$(date +%s)
    echo
    echo "=== $1"
}
step_end() {
    if [ "$step_start" != 0 ]; then
        STEP_TIMES+=("$(printf '%-9s %4d s' "$CURRENT_STEP" $(($(date +%s) - step_start)))")
    fi
    step_start=0
}
die() { echo "test.sh: error: $*" >&2; exit 1; }
T0=$(date +%s)

step setup
if [ "$(id -u)" = 0 ]; then
    scripts/setup.sh --quiet
elif [ -r "${DEVSHARE_CACHE:-/var/cache/devshare}/env" ]; then
    echo "not root: using the existing test bed in ${DEVSHARE_CACHE:-/var/cache/devshare}"
else
    die "run as root once (scripts/setup.sh needs apt-get and debootstrap)"
fi

step toolchain
# rustup installs cargo into ~/.cargo/bin, which a non-login shell may not have on PATH.
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain with rustup"
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "installing the $component component"
        rustup component add "$component" || die "cargo $component is missing and 'rustup component add $component' failed"
    fi
done
cargo --version

# fmt and clippy findings do not stop the run: the tests still run and report, and the
# script fails at the end.
FAILED=()
step fmt
cargo fmt --all -- --check || FAILED+=(fmt)
cargo fmt --manifest-path fuzz/Cargo.toml -- --check || FAILED+=(fmt-fuzz)

step clippy
cargo clippy --workspace --all-targets -- -D warnings || FAILED+=(clippy)
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings || FAILED+=(clippy-fuzz)

step doc
RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings" cargo doc --workspace --no-deps || FAILED+=(doc)

step build
cargo build --workspace --bins "${PROFILE_ARGS[@]}" || FAILED+=(build)

step test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: one failing test binary must not hide the results of the others. The time
# limit turns a hung test into a failure well inside CI's budget; timeout(1) signals the whole
# process group, and the guests die with the test threads that spawned them.
timeout --kill-after=30 "$TEST_TIMEOUT" \
    cargo test --workspace --no-fail-fast "${PROFILE_ARGS[@]}" -- "$@" 2>&1 | tee "$log" ||
    FAILED+=(test)

FUZZ_SECONDS=${DEVSHARE_FUZZ_SECONDS:-30}
if [ "$FUZZ_SECONDS" != 0 ]; then
    step fuzz
    # Builds the targets (release, AddressSanitizer; installs cargo-fuzz if missing), then runs
    # each from its committed corpus; prints executions and coverage per target.
    scripts/fuzz.sh --seconds "$FUZZ_SECONDS" || FAILED+=(fuzz)
fi
step_end

echo
echo "=== summary"
printf '%s\n' "${STEP_TIMES[@]}"
printf '%-9s %4d s\n' total $(($(date +%s) - T0))
# One closing line over every test binary (cargo prints one "test result:" per binary).
totals=$(awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) passed += $(i - 1)
            if ($(i) ~ /^failed;?$/) failed += $(i - 1)
            if ($(i) ~ /^ignored;?$/) ignored += $(i - 1)
        }
        results++
    }
    END {
        if (results == 0) { print "no test results found in the output of cargo test"; exit }
        printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored
    }' "$log")
# The QEMU version matrix, one line per version and case (tests named qemu_<version>::<case>;
# a test that printed "SKIPPED <name>:" passed without running).
matrix=$(awk '
    /^SKIPPED qemu_[0-9_]+::/ { name = $2; sub(/:$/, "", name); skipped[name] = 1 }
    /^test qemu_[0-9_]+::[a-z0-9_]+ \.\.\. / { result[$2] = $4 }
    END {
        for (name in result) {
            split(name, part, "::"); v = part[1]; sub(/^qemu_/, "", v); sub(/_/, ".", v)
            printf "  %-5s %-8s %s\n", v, (name in skipped) ? "skipped" : result[name], part[2]
        }
    }' "$log" | sort -V)
if [ -n "$matrix" ]; then
    echo "QEMU matrix:"
    printf '%s\n' "$matrix"
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED steps: ${FAILED[*]}"
    echo "$totals"
    exit 1
fi
echo "all steps passed"
echo "$totals"
