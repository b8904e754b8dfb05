#!/bin/sh
# Installed in the guest as /bin/virtio-port-links. There is no udev in the guest, so this makes
# what udev's rule would: /dev/virtio-ports/<name> -> /dev/vportXpY for each named port.
#   virtio-port-links                  scan once
#   virtio-port-links --wait NAME [S]  scan until /dev/virtio-ports/NAME exists (S seconds, default 30)
link_ports() {
    mkdir -p /dev/virtio-ports
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] || continue
        read -r name <"$port/name" || continue
        [ -n "$name" ] || continue
        target="/dev/${port##*/}"
        [ "$(readlink "/dev/virtio-ports/$name" 2>/dev/null)" = "$target" ] ||
            ln -sfn "$target" "/dev/virtio-ports/$name"
    done
    # Drop links whose port went away.
    for link in /dev/virtio-ports/*; do
        [ -L "$link" ] && [ ! -e "$link" ] && rm -f "$link"
    done
    return 0
}

if [ "${1:-}" = --wait ]; then
    name=${2:?usage: virtio-port-links --wait NAME [SECONDS]}
    tries=$(( ${3:-30} * 10 ))
    while [ "$tries" -gt 0 ]; do
        link_ports
        [ -e "/dev/virtio-ports/$name" ] && exit 0
        tries=$((tries - 1))
        sleep 0.1
    done
    echo "virtio-port-links: port $name did not appear" >&2
    exit 1
fi
link_ports
