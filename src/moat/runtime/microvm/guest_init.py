"""The guest's /init (a busybox sh script), kept as a constant so it is packaged with the code.

Trust domain: sandbox. It runs as guest root before any untrusted code, inside the VM, and
only prepares the guest: it has no authority over the host beyond the devices QEMU gives it.
"""

from __future__ import annotations

#: Where the initramfs keeps moat's own guest tools (root-only use; never in PATH).
TOOLS = "/.moat"
#: Marker stage-2 writes on the agent port once it waits for its per-sandbox configuration.
BOOT_MARKER = b"MOAT-BOOT-WAITING 1\n"

INIT_SCRIPT = f"""#!{TOOLS}/bin/busybox sh
# moat microVM init: mount the basics, load the virtio modules in dependency order, mount the
# read-only /usr image, then run stage 2 (guest_boot.py) which waits for its configuration on
# the agent port and becomes the agent. Any failure powers the VM off (the host sees EOF).
B={TOOLS}/bin/busybox
die() {{ $B echo "moat-init: $1" >/dev/ttyS0 2>/dev/null; $B poweroff -f; }}
$B mount -t proc -o nosuid,nodev,noexec proc /proc || die proc
$B mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || die sys
$B mount -t devtmpfs -o nosuid,noexec devtmpfs /dev || die dev
for m in virtio_ring virtio virtio_mmio virtio_console virtio_blk; do
  $B insmod {TOOLS}/modules/$m.ko || die "insmod $m"
done
i=0
while [ ! -b /dev/vda ] || [ ! -c /dev/vport0p1 ]; do
  i=$((i+1)); [ $i -gt 2500 ] && die devices
  $B usleep 2000
done
# nosuid: the image mirrors the host's /usr, set-uid binaries included; they stay inert here.
$B mount -t ext4 -o ro,noload,nosuid,nodev /dev/vda /usr || die usr
$B mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || die cgroup
$B mkdir -p /dev/shm /dev/pts
$B mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=64m shm /dev/shm
$B mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666 devpts /dev/pts
$B ln -sf pts/ptmx /dev/ptmx
$B ln -sf /proc/self/fd /dev/fd
# Stage 2 starts with the flags and locale of the agent's own argv and environment (so the
# in-process warm start in guest_boot.py behaves as the exec'd agent would).
$B env -i LANG=C.UTF-8 LC_ALL=C.UTF-8 PATH=/usr/bin:/bin /usr/bin/python3 -I {TOOLS}/boot.py
$B poweroff -f
"""
