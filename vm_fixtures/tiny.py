"""The ``tiny`` fixture: a busybox-static rootfs for fast boot and merge tests.

Contents:

- ``/bin/busybox`` (a copy of the host's busybox-static, checked to have no ELF interpreter)
  and an absolute symlink to it for every applet of ``busybox --list-full`` except
  ``/sbin/init`` and ``/linuxrc``;
- standard directories (``/tmp`` and ``/var/tmp`` 1777, ``/root`` 0700), ``/dev/console`` and
  ``/dev/null`` (only when built as root: mke2fs -d copies them into an image);
- ``/etc``: passwd, group, shadow (0640, root locked), hostname ``tiny``, hosts, motd,
  os-release (``NAME="unionimg tiny"``), fstab, profile, shells;
- ``/etc/tiny/``: text files for 3-way-merge tests (``services.conf`` 24 lines,
  ``network.conf``, ``app.ini``), a binary ``data.bin`` (256 bytes) and a symlink
  ``current.conf -> services.conf``;
- ``/etc/unionimg-boot.d/`` (empty apart from a non-executable README): executables placed there
  are run by init at every boot;
- ``/sbin/init``: the guest's PID 1 (busybox sh), see :data:`INIT`. It prints on the console::

      unionimg-guest: start kernel KVER hostname tiny
      unionimg-guest: nic NAME mac MAC          (one per NIC, lo excluded)
      unionimg-guest: root <the / line of /proc/mounts>
      unionimg-guest: hook NAME / hook NAME rc N (per boot hook)
      unionimg-guest: boot N                    (N = lines of /var/log/boots, this boot included)

  then ``sync`` and ``poweroff -f``. With ``unionimg.shell`` on the kernel command line it starts
  a login shell on the console instead, and powers off when that shell exits.

Measured on the lab machine (2 cores), 2026-11-23: populate 0.05 s, whole CLI build 0.2 s,
2.1 MB allocated, 306 inodes (as root); a cached call ~0.03 s in-process. Booted under
User-Mode Linux as plain ext4 root: kernel start to power off ~1.7 s.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from unionimg.errors import MissingCapability
from unionimg.runner import run

from .cache import Recipe, say
from .tree import Node, apply, describe, directory, symlink, text

NAME = "tiny"
BUSYBOX = Path("/bin/busybox")
LAYOUT_VERSION = 1
"""Bump when the build steps change in a way the node list does not show."""

PT_INTERP = 3


def elf_interpreter(path: Path) -> bool | None:
    """True if the ELF file ``path`` has a PT_INTERP header (dynamically linked), False if
    not (static), None if it is not an ELF file."""
    with path.open("rb") as fh:
        ident = fh.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            return None
        end = "<" if ident[5] == 1 else ">"
        if ident[4] == 2:  # 64-bit
            (phoff,) = struct.unpack_from(end + "Q", ident, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", ident, 54)
        else:
            (phoff,) = struct.unpack_from(end + "I", ident, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", ident, 42)
        for index in range(phnum):
            fh.seek(phoff + index * phentsize)
            raw = fh.read(4)
            if len(raw) < 4:
                return None
            if struct.unpack(end + "I", raw)[0] == PT_INTERP:
                return True
    return False


def static_busybox(path: Path = BUSYBOX) -> Path:
    """``path`` if it is a statically linked busybox, else a clear error."""
    if not path.is_file():
        raise MissingCapability(
            f"{path} not found; install busybox-static (apt-get install busybox-static)"
        )
    if elf_interpreter(path.resolve()) is not False:
        raise MissingCapability(
            f"{path} is not a static ELF binary; install busybox-static "
            "(it replaces the dynamic busybox package)"
        )
    return path


def applets(busybox: Path) -> list[str]:
    """Absolute paths of busybox's applets, from ``busybox --list-full``."""
    out = run([str(busybox), "--list-full"], what="listing busybox applets").stdout
    paths = sorted({"/" + line.strip().lstrip("/") for line in out.splitlines() if line.strip()})
    if not paths:
        raise MissingCapability(f"{busybox} --list-full printed no applets")
    return paths


INIT = r"""#!/bin/sh
# PID 1 of the unionimg "tiny" test guest (busybox sh). Written by vm_fixtures.
# Prints "unionimg-guest: ..." lines on the console, counts boots in /var/log/boots,
# runs /etc/unionimg-boot.d/*, then powers off (kernel cmdline "unionimg.shell": a shell first).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=linux
umask 022
say() { echo "unionimg-guest: $*"; }

[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
[ -d /sys/class ] || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
awk '$2 == "/dev" { m = 1 } END { exit !m }' /proc/mounts ||
    mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev 2>/dev/null
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

[ -s /etc/hostname ] && hostname -F /etc/hostname
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null
say "start kernel $(uname -r) hostname $(hostname)"

for dev in /sys/class/net/*; do
    [ -e "$dev/address" ] || continue
    name=${dev##*/}
    [ "$name" = lo ] && continue
    say "nic $name mac $(cat "$dev/address")"
done
say "root $(awk '$2 == "/" { line = $0 } END { print line }' /proc/mounts)"

mkdir -p /var/log 2>/dev/null
if ! date -u '+%Y-%m-%dT%H:%M:%SZ' >>/var/log/boots 2>/dev/null; then
    say "warning: cannot append to /var/log/boots (read-only root?)"
fi
for hook in /etc/unionimg-boot.d/*; do
    [ -f "$hook" ] && [ -x "$hook" ] || continue
    say "hook ${hook##*/}"
    "$hook"
    say "hook ${hook##*/} rc $?"
done
boots=0
[ -r /var/log/boots ] && boots=$(($(wc -l </var/log/boots)))
say "boot $boots"
sync

case " $(cat /proc/cmdline) " in
*" unionimg.shell "* | *" unionimg.shell="*)
    say "shell (exit it to power off)"
    sh -l
    sync
    ;;
esac
poweroff -f
while :; do sleep 60; done
"""

SERVICES = """\
# /etc/tiny/services.conf: services of the tiny guest (name port state workers)
# A line per service, so base and VM edits on different lines merge cleanly.
sshd        22    enabled   1
httpd       80    enabled   4
httpsd      443   enabled   4
ntpd        123   enabled   1
syslogd     514   enabled   1
crond       0     enabled   1
dnsmasq     53    disabled  1
dhcpd       67    disabled  1
tftpd       69    disabled  1
snmpd       161   disabled  1
ldapd       389   disabled  2
smtpd       25    enabled   2
imapd       143   disabled  2
pop3d       110   disabled  1
mysqld      3306  disabled  8
pgsqld      5432  enabled   8
redisd      6379  disabled  2
memcached   11211 disabled  2
rsyncd      873   disabled  1
nfsd        2049  disabled  4
# end of services
"""

NETWORK = """\
# /etc/tiny/network.conf
[lo]
address = 127.0.0.1/8

[eth0]
method = dhcp
mtu = 1500
dns = 10.0.2.3

[routes]
default = eth0
"""

APP_INI = """\
; /etc/tiny/app.ini: an application's settings
[main]
name = tiny-app
log_level = info
threads = 4

[storage]
path = /var/lib/tiny-app
max_size_mb = 64

[features]
metrics = off
tracing = off
"""

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""

GROUP = """\
root:x:0:
daemon:x:1:
adm:x:4:
tty:x:5:
disk:x:6:
users:x:100:
nogroup:x:65534:
"""

SHADOW = """\
root:*:19000:0:99999:7:::
daemon:*:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
"""

OS_RELEASE = """\
NAME="unionimg tiny"
PRETTY_NAME="unionimg tiny (busybox)"
ID=unionimg-tiny
VERSION_ID="1"
"""

FSTAB = """\
# / is the overlayfs union of LABEL=BASE (ro) and LABEL=U (rw), set up by the initramfs.
proc      /proc  proc      nosuid,nodev,noexec  0 0
sysfs     /sys   sysfs     nosuid,nodev,noexec  0 0
devtmpfs  /dev   devtmpfs  nosuid,mode=0755     0 0
"""

PROFILE = """\
# /etc/profile of the tiny guest
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='\\u@\\h:\\w\\$ '
umask 022
[ -r /etc/motd ] && cat /etc/motd
"""

HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\ttiny
::1\tlocalhost ip6-localhost ip6-loopback
"""

BOOT_README = """\
Executables here are run by /sbin/init at every boot, in name order, after the boot has been
counted in /var/log/boots. Their output goes to the console. This README is not executable.
"""

DIRS: tuple[tuple[str, int], ...] = (
    ("/", 0o755),
    ("/bin", 0o755),
    ("/sbin", 0o755),
    ("/usr", 0o755),
    ("/usr/bin", 0o755),
    ("/usr/sbin", 0o755),
    ("/etc", 0o755),
    ("/etc/tiny", 0o755),
    ("/etc/unionimg-boot.d", 0o755),
    ("/proc", 0o555),
    ("/sys", 0o555),
    ("/dev", 0o755),
    ("/tmp", 0o1777),
    ("/run", 0o755),
    ("/root", 0o700),
    ("/var", 0o755),
    ("/var/log", 0o755),
    ("/var/tmp", 0o1777),
    ("/mnt", 0o755),
    ("/home", 0o755),
)


def nodes(busybox: Path = BUSYBOX) -> list[Node]:
    """Everything the tiny rootfs contains, in creation order."""
    out = [directory(path, mode) for path, mode in DIRS]
    out.append(Node("/bin/busybox", "copy", 0o755, source=str(busybox)))
    out += [
        symlink(path, "/bin/busybox")
        for path in applets(busybox)
        if path not in ("/bin/busybox", "/sbin/init", "/linuxrc")
    ]
    out += [
        Node("/dev/console", "char", 0o600, major=5, minor=1),
        Node("/dev/null", "char", 0o666, major=1, minor=3),
        text("/etc/passwd", PASSWD),
        text("/etc/group", GROUP),
        text("/etc/shadow", SHADOW, 0o640),
        text("/etc/hostname", "tiny\n"),
        text("/etc/hosts", HOSTS),
        text("/etc/motd", "unionimg tiny guest: busybox on a BASE + U overlayfs union.\n"),
        text("/etc/os-release", OS_RELEASE),
        text("/etc/fstab", FSTAB),
        text("/etc/profile", PROFILE),
        text("/etc/shells", "/bin/sh\n/bin/ash\n"),
        text("/etc/tiny/services.conf", SERVICES),
        text("/etc/tiny/network.conf", NETWORK),
        text("/etc/tiny/app.ini", APP_INI),
        Node(
            "/etc/tiny/data.bin", "file", 0o644, data=bytes((i * 37 + 11) % 256 for i in range(256))
        ),
        symlink("/etc/tiny/current.conf", "services.conf"),
        text("/etc/unionimg-boot.d/README", BOOT_README),
        text("/sbin/init", INIT, 0o755),
    ]
    return out


def recipe() -> Recipe:
    busybox = static_busybox()
    tree = nodes(busybox)
    as_root = os.geteuid() == 0  # a non-root build lacks device nodes: a different result
    key: dict[str, object] = {
        "layout": LAYOUT_VERSION,
        "as_root": as_root,
        "nodes": [describe(n) for n in tree],
    }

    def populate(rootfs: Path) -> dict[str, object]:
        rootfs.mkdir(mode=0o755)
        skipped = apply(rootfs, tree, as_root=as_root)
        if skipped:
            say(f"not root: device nodes skipped ({', '.join(skipped)})")
        return {"device_nodes_skipped": skipped, "built_as_root": as_root}

    return Recipe(NAME, key, populate)
