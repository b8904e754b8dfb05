#!/bin/sh
# /init of devshare's test guest (busybox initramfs built by scripts/setup.sh).
# Loads the virtio drivers, names the virtio-serial ports like udev would, then runs /test.sh
# (added by a test as an extra cpio archive) and reports its exit code on the console as
#   DEVSHARE-TEST-EXIT=<code>
# before powering off. Without /test.sh it gives a shell on the console.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname devshare-guest

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || echo "init: could not load $mod" >&2
done </etc/modules-order

# virtio-console ports are announced over the device's control queue after the driver has
# loaded, so wait until their number settles (only when a console device exists at all).
has_console=0
for dev in /sys/bus/virtio/devices/*; do
    [ "$(cat "$dev/device" 2>/dev/null)" = 0x0003 ] && has_console=1
done
if [ "$has_console" = 1 ]; then
    last=-1
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
        set -- /sys/class/virtio-ports/*
        [ -e "$1" ] || set --
        [ "$#" = "$last" ] && [ "$#" -gt 0 ] && break
        last=$#
        sleep 0.2
    done
fi
virtio-port-links
# Ports may still come and go later (multiport hot-add): keep the links current.
(while :; do sleep 0.5; virtio-port-links; done) &

ip link set lo up

if [ -f /test.sh ]; then
    cd /root
    sh /test.sh </dev/null
    code=$?
    sync
    printf '\nDEVSHARE-TEST-EXIT=%d\n' "$code"
    poweroff -f
fi

echo "devshare guest ready: no /test.sh, starting a shell (exit it to power off)"
setsid cttyhack sh -l
poweroff -f
