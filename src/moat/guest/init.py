"""The guest's /init (a busybox sh script), kept as a constant so it is packaged with the code.

Trust domain: sandbox. It runs as guest root before any untrusted code, inside the VM, and
only prepares the guest: it has no authority over the host beyond the devices QEMU gives it.

Boot protocol on the agent port (stage 2, boot.py, speaks it; before the agent's framed
protocol starts). The host may write its first line as soon as QEMU starts: the guest's
virtio-serial port does not take data before stage 2 opens it, so the line waits in the host
socket until then.

- guest: ``BOOT_MARKER`` as soon as it has opened the port;
- host: one line, either ``BASE_REQUEST`` (a base VM, booted once to be snapshotted: the
  guest imports the agent's modules, answers ``WARM_MARKER`` and waits for a configuration,
  which arrives after a snapshot restore) or the sandbox's configuration (one JSON object, at
  most 1 MiB): a cold boot skips the warm-up, whose imports the agent then does as it needs
  them.
"""

from __future__ import annotations

#: Where the initramfs keeps moat's own guest tools (root-only use; never in PATH).
TOOLS = "/.moat"
#: Marker stage 2 writes on the agent port once it has opened it.
BOOT_MARKER = b"MOAT-BOOT-WAITING 1\n"
#: The host's first line for a base VM (instead of a configuration). Not a *template*: that
#: word is the user's (a prepared root file system), never this boot-once VM.
BASE_REQUEST = b"MOAT-BASE 1\n"
#: Marker a base VM's stage 2 writes when it is warmed up and waits for its configuration.
WARM_MARKER = b"MOAT-BOOT-WARM 1\n"
#: Stage 2's interpreter flags: exactly the agent's own (``agentdir.agent_argv``), so that
#: the in-process warm start in boot.py behaves as the exec'd agent would.
STAGE2_FLAGS = ("-I", "-S")
#: Stage 2 is imported (not run as a script) so that its byte code, compiled when the
#: initramfs is built, is used instead of compiling the source on every boot.
STAGE2_CODE = f"import sys; sys.path.insert(0, {TOOLS!r}); import boot; boot.run()"

INIT_SCRIPT = f"""#!{TOOLS}/bin/busybox sh
# moat microVM init: mount the basics, load the virtio modules in dependency order, mount the
# read-only /usr image, then run stage 2 (boot.py) which reads its configuration from
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
# nosuid: the image mirrors the host's /usr (or a template's root), set-uid binaries
# included; they stay inert here.
R={TOOLS}/root
$B mkdir -p $R
$B mount -t ext4 -o ro,noload,nosuid,nodev /dev/vda $R || die usr
if [ -d $R/usr/bin ]; then
  # A template's whole root (issue 12): its entries over the initramfs's, read-only, except
  # the paths moat owns (proc, sys, dev, tmp, home, run, the agent in /opt/moat). /etc is the
  # template's with moat's own passwd, group, hostname, hosts, resolv.conf, nsswitch.conf and
  # ssh_config over it (a copy: the root file system is remounted read-only in stage 2).
  # (names other than [A-Za-z0-9._+-] are left out: no quoting games with a template's names)
  for e in "$R"/*; do
    n="${{e##*/}}"
    case "$n" in proc|sys|dev|tmp|home|run|etc|opt|lost+found|*[!A-Za-z0-9._+-]*) continue;; esac
    if [ -L "$e" ]; then
      $B rm -rf "/$n"; $B ln -s "$($B readlink "$e")" "/$n" || die "link $n"
    elif [ -d "$e" ]; then
      $B mkdir -p "/$n"
      $B mount --bind "$e" "/$n" || die "bind $n"
      $B mount -o remount,bind,ro,nosuid,nodev "/$n" || die "remount $n"
    fi
  done
  for e in "$R"/opt/*; do
    n="${{e##*/}}"
    case "$n" in moat|*[!A-Za-z0-9._+-]*) continue;; esac
    [ -d "$e" ] && [ ! -L "$e" ] || continue
    $B mkdir -p "/opt/$n"
    $B mount --bind "$e" "/opt/$n" || die "bind opt"
    $B mount -o remount,bind,ro,nosuid,nodev "/opt/$n" || die "remount opt"
  done
  $B mv /etc {TOOLS}/etc
  $B mkdir -m 0755 /etc
  $B cp -a $R/etc/. /etc/ || die etc
  for f in passwd group hostname hosts resolv.conf nsswitch.conf; do
    $B rm -rf /etc/$f; $B cp {TOOLS}/etc/$f /etc/$f || die "etc $f"
  done
  $B rm -rf /etc/ssh/ssh_config; $B mkdir -p /etc/ssh
  $B cp {TOOLS}/etc/ssh/ssh_config /etc/ssh/ssh_config || die ssh_config
else
  $B mount --move $R /usr || die usr
fi
$B mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || die cgroup
$B mkdir -p /dev/shm /dev/pts
$B mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=64m shm /dev/shm
$B mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666 devpts /dev/pts
$B ln -sf pts/ptmx /dev/ptmx
$B ln -sf /proc/self/fd /dev/fd
# Stage 2 starts with the flags and locale of the agent's own argv and environment (so the
# in-process warm start in boot.py behaves as the exec'd agent would).
$B env -i LANG=C.UTF-8 LC_ALL=C.UTF-8 PATH=/usr/bin:/bin \\
  /usr/bin/python3 {" ".join(STAGE2_FLAGS)} -c "{STAGE2_CODE}"
$B poweroff -f
"""
