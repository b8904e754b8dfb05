#!/bin/bash
# Prepares this machine for devshare's end-to-end tests and demo:
#   - the Debian packages the scripts and tests use,
#   - QEMU: the default one (the host's if >= 10.2, else 11.1) and every version of the README's
#     compatibility table that DEVSHARE_QEMU_VERSIONS names, each in its own Debian root file
#     system kept in the cache (the host's packages are not touched):
#       7.2   bookworm
#       10.0  bookworm-backports
#       11.1  trixie-backports
#   - a guest: a Debian cloud kernel and a busybox initramfs whose /init runs a test's /test.sh.
# It finishes by writing $DEVSHARE_CACHE/env: DEVSHARE_QEMU (the default QEMU), one
# DEVSHARE_QEMU_<MAJOR>_<MINOR> per version set up (e.g. DEVSHARE_QEMU_7_2), DEVSHARE_KERNEL
# and DEVSHARE_INITRD.
#
# Idempotent: every finished piece leaves a stamp file and is skipped on the next run; a piece
# whose stamp is missing is rebuilt from scratch. Run as root on Debian 12 (bookworm).
#
# Usage: scripts/setup.sh [--quiet] [--help]
#   --quiet   print only the final summary (and errors)
# Environment:
#   DEVSHARE_CACHE          where QEMU and the guest are kept (default /var/cache/devshare)
#   DEVSHARE_QEMU_VERSIONS  QEMU versions to set up, e.g. "7.2,10.0,11.1" (default 11.1; each
#                           new one takes about a minute and 500 MB once)
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

QUIET=0
for arg in "$@"; do
    case "$arg" in
        --quiet | -q) QUIET=1 ;;
        --help | -h) usage; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

CACHE=${DEVSHARE_CACHE:-/var/cache/devshare}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"

# QEMU older than this has no user-creatable vhost-user-test-device-pci: the host's QEMU serves
# as the default only from this version on.
QEMU_MIN_MAJOR=10
QEMU_MIN_MINOR=2

say() { [ "$QUIET" = 1 ] || echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# Runs a long, chatty command; with --quiet its output is shown only if it fails.
run_logged() {
    if [ "$QUIET" = 1 ]; then
        local log
        log=$(mktemp)
        if ! "$@" >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            rm -f "$log"
            die "command failed: $*"
        fi
        rm -f "$log"
    elif ! "$@" 2>&1 | sed 's/^/    /'; then
        die "command failed: $*"
    fi
}

[ "$(id -u)" = 0 ] || die "run me as root (apt-get, debootstrap and chroot need it)"
command -v apt-get >/dev/null || die "this script expects a Debian system with apt-get"

export DEBIAN_FRONTEND=noninteractive
T0=$(date +%s)
mkdir -p "$CACHE"
# One setup at a time per cache (the demo and the tests may both call it).
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------------------------------------
# 1. Host packages
# ---------------------------------------------------------------------------------------------
# debootstrap: the trixie rootfs for QEMU; cpio/gzip/busybox-static: the initramfs;
# iproute2/socat: network namespaces and socket plumbing in tests and the demo;
# python3/pkg-config: helper scripts and -sys crates; gcc/libc6-dev: rustc's linker.
HOST_PACKAGES=(debootstrap cpio gzip busybox-static iproute2 socat python3 pkg-config
    ca-certificates gcc libc6-dev)

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        run_logged apt-get update
        APT_UPDATED=1
    fi
}

missing=()
for pkg in "${HOST_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    say "installing ${missing[*]}"
    run_logged apt-get install -y --no-install-recommends "${missing[@]}"
else
    say "host packages present"
fi

# ---------------------------------------------------------------------------------------------
# 2. QEMU: the default one and every version DEVSHARE_QEMU_VERSIONS names
# ---------------------------------------------------------------------------------------------
# The QEMU builds the README's compatibility table names: VERSION, the Debian suite of its root
# file system, and the release apt installs qemu-system-x86 from.
QEMU_BUILDS=(
    "7.2 bookworm bookworm"
    "10.0 bookworm bookworm-backports"
    "11.1 trixie trixie-backports"
)
# The version the other tests and the demo run (DEVSHARE_QEMU) unless the host has a new enough one.
QEMU_DEFAULT_VERSION=11.1

# Prints "MAJOR MINOR" of a qemu-system binary (run through the given command prefix).
qemu_version() {
    "$@" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n 1
}

# The one device the vhost-user console cannot do without.
has_vhost_user_test_device() {
    "$@" -device vhost-user-test-device-pci,help >/dev/null 2>&1
}

version_ok() {
    local major=$1 minor=$2
    [ "$major" -gt "$QEMU_MIN_MAJOR" ] || { [ "$major" -eq "$QEMU_MIN_MAJOR" ] && [ "$minor" -ge "$QEMU_MIN_MINOR" ]; }
}

qemu_known() {
    local build
    for build in "${QEMU_BUILDS[@]}"; do printf '%s ' "${build%% *}"; done
}

# An interrupted debootstrap can leave /proc or /sys mounted inside its target: unmount them
# before deleting the tree, or rm would walk into the host's proc and sys.
remove_tree() {
    local dir=$1 mnt
    [ -e "$dir" ] || return 0
    awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mnt; do
        umount -l "$mnt"
    done
    rm -rf "$dir"
}

# Writes to $2 the launcher of the QEMU in root $1. It runs that QEMU through the root's own
# dynamic loader, so the host's paths (sockets, kernel, initrd) work unchanged and the host's
# libraries stay out. QEMU_MODULE_DIR and -L point into the same root: QEMU loads its modules
# (accelerator ops, devices) and its firmware and option ROMs (SeaBIOS, the NICs' iPXE ROMs)
# from there only, never from the host.
write_launcher() {
    local root=$1 launcher=$2 what=$3 dir firmware=""
    # Debian's QEMU looks for firmware in these directories of its own file system; bookworm
    # keeps the NICs' iPXE ROMs in /usr/lib/ipxe/qemu, trixie in /usr/share/qemu.
    for dir in usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu; do
        [ -d "$root/$dir" ] && firmware+=" -L \"\$ROOT/$dir\""
    done
    mkdir -p "$(dirname "$launcher")"
    cat >"$launcher.tmp" <<EOF
#!/bin/sh
# Generated by devshare's scripts/setup.sh: $what, from the root file system in $root.
ROOT='$root'
QEMU_MODULE_DIR="\$ROOT/usr/lib/x86_64-linux-gnu/qemu"
export QEMU_MODULE_DIR
exec "\$ROOT/lib64/ld-linux-x86-64.so.2" \\
    --library-path "\$ROOT/usr/lib/x86_64-linux-gnu:\$ROOT/lib/x86_64-linux-gnu" \\
    "\$ROOT/usr/bin/qemu-system-x86_64"$firmware "\$@"
EOF
    chmod 755 "$launcher.tmp"
    mv "$launcher.tmp" "$launcher"
}

# Builds root $1: Debian suite $2 (debootstrap minbase), then qemu-system-x86 from release $3
# together with the firmware and ROM packages QEMU only recommends (without the ROMs a NIC
# needs romfile=).
build_qemu_root() {
    local root=$1 suite=$2 target=$3 mirror tmp
    mirror=$(debian_mirror) || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources"
    tmp="$root.partial"
    rm -f "$root.stamp"
    remove_tree "$tmp"
    remove_tree "$root"
    say "building $root (debootstrap $suite from $mirror, qemu-system-x86 from $target)"
    run_logged debootstrap --variant=minbase "$suite" "$tmp" "$mirror"
    if [ "$target" != "$suite" ]; then
        echo "deb $mirror $target main" >"$tmp/etc/apt/sources.list.d/$target.list"
    fi
    # No services may start inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
    # The registry may serve a snapshot whose Release files are past their Valid-Until date.
    run_logged chroot "$tmp" apt-get -o Acquire::Check-Valid-Until=false update
    run_logged chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y \
        --no-install-recommends -t "$target" qemu-system-x86 seabios ipxe-qemu
    chroot "$tmp" apt-get clean
    mv "$tmp" "$root"
}

# Provides QEMU $1 (e.g. 7.2) in its own root, $CACHE/qemu-$1, run by the launcher
# $CACHE/bin/qemu-$1 (left in LAUNCHER). A root whose stamp names its version is kept.
provide_qemu() {
    local version=$1 build v s t suite="" target="" ver t0
    for build in "${QEMU_BUILDS[@]}"; do
        read -r v s t <<<"$build"
        if [ "$v" = "$version" ]; then
            suite=$s
            target=$t
        fi
    done
    [ -n "$suite" ] || die "unknown QEMU version '$version' in DEVSHARE_QEMU_VERSIONS (known: $(qemu_known))"
    local root="$CACHE/qemu-$version"
    LAUNCHER="$CACHE/bin/qemu-$version"
    # Caches from before the version matrix kept QEMU 11.1 in qemu-root: take it over.
    if [ ! -e "$root" ] && [ -d "$CACHE/qemu-root" ] &&
        [ "$(cat "$CACHE/qemu-root.stamp" 2>/dev/null)" = "${version/./ }" ]; then
        mv "$CACHE/qemu-root" "$root"
        mv "$CACHE/qemu-root.stamp" "$root.stamp"
    fi
    if [ "$(cat "$root.stamp" 2>/dev/null)" = "${version/./ }" ] &&
        [ -x "$root/usr/bin/qemu-system-x86_64" ]; then
        write_launcher "$root" "$LAUNCHER" "QEMU $version ($target)"
        say "QEMU $version present ($root)"
        return 0
    fi
    t0=$(date +%s)
    build_qemu_root "$root" "$suite" "$target"
    write_launcher "$root" "$LAUNCHER" "QEMU $version ($target)"
    ver=$(qemu_version "$LAUNCHER")
    [ -n "$ver" ] || die "QEMU $version from $root does not run ($LAUNCHER --version failed)"
    [ "$ver" = "${version/./ }" ] || die "$target installed QEMU ${ver/ /.} into $root, not $version"
    echo "$ver" >"$root.stamp"
    say "QEMU $version ready in $(($(date +%s) - t0)) s, $(du -sm "$root" | cut -f1) MB"
}

# Which versions to set up: DEVSHARE_QEMU_VERSIONS, comma- or space-separated.
IFS=', ' read -r -a QEMU_VERSIONS <<<"${DEVSHARE_QEMU_VERSIONS:-$QEMU_DEFAULT_VERSION}"

QEMU_SOURCE=rootfs
host_qemu=$(command -v qemu-system-x86_64 || true)
if [ -n "$host_qemu" ] && ver=$(qemu_version "$host_qemu") && [ -n "$ver" ] && version_ok $ver &&
    has_vhost_user_test_device "$host_qemu"; then
    QEMU_SOURCE=host
    DEVSHARE_QEMU=$host_qemu
    say "using the host's QEMU ${ver/ /.} ($host_qemu) as the default"
else
    # The default QEMU is set up whatever the list says: every other test runs it.
    case " ${QEMU_VERSIONS[*]} " in
        *" $QEMU_DEFAULT_VERSION "*) ;;
        *) QEMU_VERSIONS+=("$QEMU_DEFAULT_VERSION") ;;
    esac
fi

# One env line per version (DEVSHARE_QEMU_7_2=...), read by the version-matrix tests.
QEMU_ENV_LINES=""
for version in "${QEMU_VERSIONS[@]}"; do
    [ -n "$version" ] || continue
    provide_qemu "$version"
    QEMU_ENV_LINES+="DEVSHARE_QEMU_${version//./_}=$LAUNCHER"$'\n'
    if [ "$QEMU_SOURCE" = rootfs ] && [ "$version" = "$QEMU_DEFAULT_VERSION" ]; then
        has_vhost_user_test_device "$LAUNCHER" || die "QEMU $version lacks vhost-user-test-device-pci"
        # The default QEMU keeps the launcher path it always had.
        write_launcher "$CACHE/qemu-$version" "$CACHE/bin/qemu-system-x86_64" "QEMU $version, the default"
        DEVSHARE_QEMU="$CACHE/bin/qemu-system-x86_64"
    fi
done
# Versions set up by an earlier run stay in the env file: a run that asks for fewer must not
# hide them from the matrix tests.
for build in "${QEMU_BUILDS[@]}"; do
    version=${build%% *}
    case " ${QEMU_VERSIONS[*]} " in *" $version "*) continue ;; esac
    root="$CACHE/qemu-$version"
    if [ "$(cat "$root.stamp" 2>/dev/null)" = "${version/./ }" ] && [ -x "$root/usr/bin/qemu-system-x86_64" ]; then
        write_launcher "$root" "$CACHE/bin/qemu-$version" "QEMU $version"
        QEMU_ENV_LINES+="DEVSHARE_QEMU_${version//./_}=$CACHE/bin/qemu-$version"$'\n'
    fi
done

# ---------------------------------------------------------------------------------------------
# 3. Guest kernel
# ---------------------------------------------------------------------------------------------
GUEST="$CACHE/guest"
KERNEL_DIR="$GUEST/kernel"
# The virtio drivers the guest needs; their dependencies are found and ordered at build time.
GUEST_MODULES=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_console failover net_failover virtio_net)

fetch_kernel() {
    local pkg tmp deb
    apt_update_once
    # The newest bookworm cloud kernel the registry offers (highest ABI number).
    pkg=$(apt-cache pkgnames linux-image-6.1.0- | grep -E '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' |
        sort -V | tail -n 1)
    [ -n "$pkg" ] || die "no linux-image-6.1.0-*-cloud-amd64-unsigned package found by apt-cache"
    say "fetching guest kernel $pkg"
    rm -rf "$KERNEL_DIR" "$KERNEL_DIR.partial" "$KERNEL_DIR.stamp"
    mkdir -p "$KERNEL_DIR.partial/download"
    tmp="$KERNEL_DIR.partial"
    # apt's download sandbox user must be able to write here.
    chmod 777 "$tmp/download"
    (cd "$tmp/download" && run_logged apt-get download "$pkg")
    deb=$(ls "$tmp"/download/*.deb)
    dpkg-deb -x "$deb" "$tmp/root"
    rm -rf "$tmp/download"
    mv "$tmp" "$KERNEL_DIR"
    echo "$pkg" >"$KERNEL_DIR.stamp"
}

if [ ! -f "$KERNEL_DIR.stamp" ]; then
    fetch_kernel
else
    say "guest kernel present ($(cat "$KERNEL_DIR.stamp"))"
fi
KVER=$(ls "$KERNEL_DIR/root/lib/modules" | head -n 1)
DEVSHARE_KERNEL="$KERNEL_DIR/root/boot/vmlinuz-$KVER"
[ -f "$DEVSHARE_KERNEL" ] || die "kernel image missing: $DEVSHARE_KERNEL (delete $KERNEL_DIR.stamp and re-run)"

# ---------------------------------------------------------------------------------------------
# 4. Base initramfs
# ---------------------------------------------------------------------------------------------
INITRD="$GUEST/initrd.cpio.gz"
# The stamp records what went in; a change of kernel, busybox, /init or this script rebuilds it.
initrd_inputs() {
    echo "kernel $KVER"
    sha256sum /bin/busybox "$SCRIPT_DIR/setup.sh" "$SCRIPT_DIR/lib/guest-init.sh" \
        "$SCRIPT_DIR/lib/guest-ports.sh" | cut -d' ' -f1
    echo "${GUEST_MODULES[*]}"
}

# The modules' load order: each after the modules its `depends=` field names (a module pulled
# in as a dependency is included too); modules built into the kernel are skipped.
MODULE_ORDER=()
resolve_module() {
    local mod=$1 moddir=$2 tree=$3 path dep
    case " ${MODULE_ORDER[*]} " in *" $mod "*) return 0 ;; esac
    path=$(find "$moddir/kernel" -name "$mod.ko" -print -quit)
    if [ -z "$path" ]; then
        if grep -q "/$mod.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
            say "module $mod is built into $KVER"
            return 0
        fi
        die "module $mod is neither a module nor built into $KVER"
    fi
    for dep in $(tr '\0' '\n' <"$path" | sed -n 's/^depends=//p' | tr ',' ' '); do
        resolve_module "$dep" "$moddir" "$tree"
    done
    MODULE_ORDER+=("$mod")
    cp "$path" "$tree/lib/modules/$mod.ko"
}

build_initrd() {
    local tree moddir mod
    tree="$GUEST/initrd.tree"
    rm -rf "$tree"
    mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,lib/modules}
    cp /bin/busybox "$tree/bin/busybox"
    # One symlink per applet, at the path busybox itself names for it.
    /bin/busybox --list-full | while read -r applet; do
        [ -e "$tree/$applet" ] || ln -s /bin/busybox "$tree/$applet"
    done
    moddir="$KERNEL_DIR/root/lib/modules/$KVER"
    MODULE_ORDER=()
    for mod in "${GUEST_MODULES[@]}"; do
        resolve_module "$mod" "$moddir" "$tree"
    done
    printf '%s\n' "${MODULE_ORDER[@]}" >"$tree/etc/modules-order"
    install -m 755 "$SCRIPT_DIR/lib/guest-init.sh" "$tree/init"
    install -m 755 "$SCRIPT_DIR/lib/guest-ports.sh" "$tree/bin/virtio-port-links"
    echo "root:x:0:0:root:/root:/bin/sh" >"$tree/etc/passwd"
    echo "root:x:0:" >"$tree/etc/group"
    (cd "$tree" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9) >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$tree"
}

want=$(initrd_inputs)
if [ ! -f "$INITRD" ] || [ "$(cat "$INITRD.stamp" 2>/dev/null)" != "$want" ]; then
    say "building the guest initramfs"
    rm -f "$INITRD.stamp"
    build_initrd
    echo "$want" >"$INITRD.stamp"
else
    say "guest initramfs present"
fi
DEVSHARE_INITRD=$INITRD

# ---------------------------------------------------------------------------------------------
# 5. Env file and summary
# ---------------------------------------------------------------------------------------------
{
    cat <<EOF
# Written by devshare's scripts/setup.sh; read by scripts/qemu and integration/src/qemu.rs.
DEVSHARE_QEMU=$DEVSHARE_QEMU
DEVSHARE_KERNEL=$DEVSHARE_KERNEL
DEVSHARE_INITRD=$DEVSHARE_INITRD
DEVSHARE_QEMU_SOURCE=$QEMU_SOURCE
EOF
    printf '%s' "$QEMU_ENV_LINES"
} >"$CACHE/env.tmp"
mv "$CACHE/env.tmp" "$CACHE/env"

T1=$(date +%s)
if [ "$QUIET" = 1 ]; then
    echo "setup: ready in $((T1 - T0)) s (env: $CACHE/env)"
else
    cat <<EOF
setup: ready in $((T1 - T0)) s
  QEMU      $DEVSHARE_QEMU ($QEMU_SOURCE: $(qemu_version "$DEVSHARE_QEMU" | tr ' ' .))
  kernel    $DEVSHARE_KERNEL
  initrd    $DEVSHARE_INITRD
  env file  $CACHE/env   (source it, or let scripts/qemu and the tests read it)
EOF
    printf '%s' "$QEMU_ENV_LINES" | sed 's/^DEVSHARE_QEMU_\([0-9]*\)_\([0-9]*\)=\(.*\)/\1.\2 \3/' |
        while read -r v path; do printf '  QEMU %-5s%s\n' "$v" "$path"; done
fi
