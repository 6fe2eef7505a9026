"""The ``debian`` fixture: a minimal Debian 12 (bookworm) rootfs with systemd, udev and a kernel.

Made by ``mmdebstrap --mode=root --variant=minbase`` from THE HOST'S apt sources (only its Debian
bookworm ``main`` entries; third-party repositories are dropped, no mirror is named here), plus:

- systemd + systemd-sysv (``/sbin/init``), udev, iproute2, kmod, linux-image-amd64
  (``/boot/vmlinuz-*``, ``/lib/modules/*``); no Recommends; man pages, info and docs (except
  copyright files) and message catalogs
  (/usr/share/locale) are not unpacked; apt lists and caches removed.
- no Debian initramfs (``INITRD=No`` and any ``/boot/initrd.img-*`` removed): unionimg builds
  its own union initramfs from the kernel's modules.
- hostname ``debian-fixture``; empty ``/etc/machine-id`` (each VM gets its own);
  ``systemd-firstboot`` masked so a first boot never waits for console input.
- ``unionimg-selftest.service`` (enabled for multi-user.target) runs only when the kernel
  command line has ``unionimg.selftest=1``: waits for udev to settle, prints on /dev/console
  ``unionimg-guest: nic NAME mac MAC`` per NIC (not lo), ``unionimg-guest: root ...``, appends
  the time to /var/log/boots, runs every executable in /etc/unionimg-boot.d/, prints
  ``unionimg-guest: boot N`` and powers off (starts poweroff.target, as ``systemctl poweroff``
  does, without its D-Bus call to logind: minbase has no dbus).
- root has no password (locked, as mmdebstrap leaves it); no autologin.

Measured on the lab machine (2 cores, Debian 12 host, its Debian mirror over the network),
2026-11-23: build 48-56 s cold (three builds; every build downloads its ~140 packages again),
617 MB allocated (567 MiB apparent), 12,408 inodes, of which kernel modules are 388 MiB
(linux-image 6.1.0-56-amd64). A cached call: ~0.1 s for the whole CLI. Booted under
User-Mode Linux as plain ext4 root with ``unionimg.selftest=1``: kernel start to power off
~2 s, NIC/boot lines printed, boot count persisted; without it the guest stays in
multi-user.target.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from unionimg.errors import MissingCapability
from unionimg.runner import run

from .cache import Recipe, say
from .tree import Node, apply, describe, directory, symlink, text

NAME = "debian"
SUITE = "bookworm"
VARIANT = "minbase"
HOSTNAME = "debian-fixture"
PACKAGES = ("systemd", "systemd-sysv", "udev", "iproute2", "kmod", "linux-image-amd64")
DEBIAN_COMPONENTS = frozenset({"main", "contrib", "non-free", "non-free-firmware"})
KEEP_COMPONENT = "main"
APT_OPTIONS = ('APT::Install-Recommends "false"', 'APT::Install-Suggests "false"')
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
)
BUILD_TIMEOUT = 3600.0
LAYOUT_VERSION = 1
"""Bump when the build steps change in a way the recipe data does not show."""

SOURCES_LIST = Path("/etc/apt/sources.list")
SOURCES_DIR = Path("/etc/apt/sources.list.d")


@dataclass(frozen=True)
class Source:
    """One apt source entry, normalised (deb822 fields)."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""

    def deb822(self) -> str:
        lines = [
            "Types: deb",
            f"URIs: {' '.join(self.uris)}",
            f"Suites: {' '.join(self.suites)}",
            f"Components: {' '.join(self.components)}",
        ]
        if self.signed_by:
            lines.append(f"Signed-By: {self.signed_by}")
        return "\n".join(lines) + "\n"


def _deb822_stanzas(content: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for raw in [*content.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, last = {}, ""
            continue
        if raw[0] in " \t" and last:
            current[last] += "\n" + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if sep:
            last = key.strip().lower()
            current[last] = value.strip()
    return stanzas


def parse_deb822(content: str) -> list[tuple[tuple[str, ...], Source]]:
    """(types, source) of every enabled stanza of a ``.sources`` file."""
    out: list[tuple[tuple[str, ...], Source]] = []
    for stanza in _deb822_stanzas(content):
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        signed_by = stanza.get("signed-by", "")
        if "\n" in signed_by or "BEGIN PGP" in signed_by:
            signed_by = ""  # an inline key: leave trust to the keyrings apt already has
        source = Source(
            uris=tuple(stanza.get("uris", "").split()),
            suites=tuple(stanza.get("suites", "").split()),
            components=tuple(stanza.get("components", "").split()),
            signed_by=signed_by,
        )
        out.append((tuple(stanza.get("types", "").split()), source))
    return out


_ONE_LINE = re.compile(r"^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$")


def parse_one_line(content: str) -> list[tuple[tuple[str, ...], Source]]:
    """(types, source) of every entry of a one-line-style ``sources.list``."""
    out: list[tuple[tuple[str, ...], Source]] = []
    for raw in content.splitlines():
        match = _ONE_LINE.match(raw.split("#", 1)[0].strip())
        if not match:
            continue
        kind, options, uri, suite, components = match.groups()
        signed_by = ""
        for option in (options or "").split():
            key, _, value = option.partition("=")
            if key == "signed-by":
                signed_by = value
        source = Source((uri,), (suite,), tuple(components.split()), signed_by)
        out.append(((kind,), source))
    return out


def _is_debian(types: tuple[str, ...], source: Source) -> bool:
    """A Debian archive entry for bookworm: a ``deb`` entry whose suites are all bookworm or
    bookworm-*, whose components are Debian's, and which is either signed by the Debian archive
    keyring or served from a ``debian``/``debian-security`` path. Third-party repositories
    (their own suites, components or keys) fail at least one of these."""
    if "deb" not in types or not source.uris or not source.suites:
        return False
    if not all(
        s == SUITE or s.startswith(f"{SUITE}-") or s.startswith(f"{SUITE}/") for s in source.suites
    ):
        return False
    if KEEP_COMPONENT not in source.components:
        return False
    if not set(source.components) <= DEBIAN_COMPONENTS:
        return False
    if "debian-archive-keyring" in source.signed_by:
        return True
    if source.signed_by:
        return False
    return all(
        {"debian", "debian-security"} & set(uri.rstrip("/").split("/")[3:]) for uri in source.uris
    )


def host_sources(
    sources_list: Path = SOURCES_LIST, sources_dir: Path = SOURCES_DIR
) -> tuple[str, list[Path]]:
    """The host's Debian bookworm entries as one deb822 text (component ``main`` only), and the
    files they came from. apt reads ``sources.list`` and ``sources.list.d/*.list|*.sources``."""
    files = [sources_list] if sources_list.is_file() else []
    if sources_dir.is_dir():
        files += sorted(
            p for p in sources_dir.iterdir() if p.suffix in (".list", ".sources") and p.is_file()
        )
    stanzas: list[str] = []
    used: list[Path] = []
    for path in files:
        content = path.read_text(errors="replace")
        entries = parse_deb822(content) if path.suffix == ".sources" else parse_one_line(content)
        kept = [
            Source(src.uris, src.suites, (KEEP_COMPONENT,), src.signed_by)
            for types, src in entries
            if _is_debian(types, src)
        ]
        if kept:
            used.append(path)
        for src in kept:
            block = src.deb822()
            if block not in stanzas:
                stanzas.append(block)
    if not stanzas:
        where = ", ".join(str(p) for p in files) or f"{sources_list}, {sources_dir}/"
        raise MissingCapability(
            f"no Debian {SUITE} entry in the host's apt sources ({where}); "
            "the debian fixture is built from the host's Debian mirror"
        )
    return "\n".join(stanzas), used


SELFTEST_SCRIPT = """\
#!/bin/sh
# unionimg-selftest: run by unionimg-selftest.service when the kernel command line has
# unionimg.selftest=1. Prints the guest's NICs and boot count on the console, then powers off.
# Written by vm_fixtures (unionimg test fixture).
exec </dev/null >/dev/console 2>&1
say() { echo "unionimg-guest: $*"; }

udevadm settle --timeout=60 || say "warning: udev did not settle"
for dev in /sys/class/net/*; do
    [ -e "$dev/address" ] || continue
    name=${dev##*/}
    [ "$name" = lo ] && continue
    say "nic $name mac $(cat "$dev/address")"
done
root=""
while read -r line; do
    set -- $line
    [ "$2" = / ] && root=$line
done </proc/mounts
say "root $root"
if ! date -u '+%Y-%m-%dT%H:%M:%SZ' >>/var/log/boots; then
    say "warning: cannot append to /var/log/boots"
fi
for hook in /etc/unionimg-boot.d/*; do
    [ -f "$hook" ] && [ -x "$hook" ] || continue
    say "hook ${hook##*/}"
    "$hook"
    say "hook ${hook##*/} rc $?"
done
boots=0
[ -r /var/log/boots ] && boots=$(wc -l </var/log/boots)
say "boot $boots"
sync
# what "systemctl poweroff" does, minus its attempt to reach logind over D-Bus (no dbus here)
systemctl --no-block --job-mode=replace-irreversibly start poweroff.target
"""

SELFTEST_UNIT = """\
[Unit]
Description=unionimg guest self-test (NICs and boot count on the console, then power off)
ConditionKernelCommandLine=unionimg.selftest=1
After=systemd-udevd.service systemd-udev-trigger.service local-fs.target
Wants=systemd-udev-trigger.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/unionimg-selftest
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

HOSTS = f"""\
127.0.0.1\tlocalhost
127.0.1.1\t{HOSTNAME}
::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""

UNIT_PATH = "/etc/systemd/system/unionimg-selftest.service"


def overlay_nodes() -> list[Node]:
    """What the fixture adds on top of the mmdebstrap tree."""
    return [
        text("/etc/hostname", f"{HOSTNAME}\n"),
        text("/etc/hosts", HOSTS),
        text("/etc/machine-id", ""),
        text("/usr/local/sbin/unionimg-selftest", SELFTEST_SCRIPT, 0o755),
        text(UNIT_PATH, SELFTEST_UNIT),
        directory("/etc/systemd/system/multi-user.target.wants"),
        symlink("/etc/systemd/system/multi-user.target.wants/unionimg-selftest.service", UNIT_PATH),
        symlink("/etc/systemd/system/systemd-firstboot.service", "/dev/null"),
        directory("/etc/unionimg-boot.d"),
    ]


CLEAN_GLOBS = (
    "var/lib/apt/lists/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "var/log/apt/*",
    "var/log/*.log",
    "boot/initrd.img-*",
)


def _clean(rootfs: Path) -> None:
    for pattern in CLEAN_GLOBS:
        for path in rootfs.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    # the /initrd.img symlinks a kernel install may add would now dangle
    for link in ("initrd.img", "initrd.img.old"):
        path = rootfs / link
        if path.is_symlink():
            path.unlink()


def _check(rootfs: Path) -> dict[str, object]:
    kernels = sorted(p.name for p in (rootfs / "boot").glob("vmlinuz-*"))
    modules = sorted(p.name for p in (rootfs / "lib/modules").glob("*") if (p / "kernel").is_dir())
    missing = [
        rel
        for rel in ("sbin/init", "lib/systemd/systemd", "bin/udevadm", "sbin/ip", "sbin/modprobe")
        if not os.path.lexists(rootfs / rel)
    ]
    if not kernels or not modules or missing:
        raise MissingCapability(
            f"the debian fixture in {rootfs} is incomplete (kernels {kernels}, modules "
            f"{modules}, missing {missing}); check the host's Debian apt sources"
        )
    return {"kernels": kernels, "module_dirs": modules}


def recipe() -> Recipe:
    sources, used = host_sources()
    nodes = overlay_nodes()
    key: dict[str, object] = {
        "layout": LAYOUT_VERSION,
        "suite": SUITE,
        "variant": VARIANT,
        "packages": list(PACKAGES),
        "apt_options": list(APT_OPTIONS),
        "dpkg_options": list(DPKG_OPTIONS),
        "sources": sources,
        "clean": list(CLEAN_GLOBS),
        "nodes": [describe(n) for n in nodes],
    }

    def populate(rootfs: Path) -> dict[str, object]:
        if os.geteuid() != 0:
            raise MissingCapability(
                "building the debian fixture needs root (mmdebstrap --mode=root keeps owners "
                "right in a directory); run it as root"
            )
        say(f"mmdebstrap {SUITE} from {', '.join(map(str, used))} (a few minutes)")
        args = [
            "mmdebstrap",
            "--mode=root",
            f"--variant={VARIANT}",
            "--format=directory",
            f"--include={','.join(PACKAGES)}",
            *(f"--aptopt={opt}" for opt in APT_OPTIONS),
            *(f"--dpkgopt={opt}" for opt in DPKG_OPTIONS),
            SUITE,
            str(rootfs),
            "-",
        ]
        run(
            args,
            input=sources,
            env={"INITRD": "No", "LC_ALL": "C.UTF-8"},
            timeout=BUILD_TIMEOUT,
            what=f"building the debian fixture in {rootfs}",
        )
        apply(rootfs, nodes, as_root=True)
        _clean(rootfs)
        facts = _check(rootfs)
        facts["sources_files"] = [str(p) for p in used]
        return facts

    return Recipe(NAME, key, populate)
