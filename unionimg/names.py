"""Validation of what users type: object names, MAC addresses, sizes, hypervisors. Pure."""

from __future__ import annotations

import re

from .errors import UsageError

HYPERVISORS = ("kvm", "uml", "xen", "virtualbox")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME = 64


def check_name(name: str, what: str) -> str:
    """A base or instance name: 1-64 chars of ``A-Za-z0-9._-``, not starting with ``.``/``-``.

    The same name becomes a file name, a libvirt domain name, an xl.cfg value and a shell
    word, so it is restricted to what is safe in all of them.
    """
    if not name:
        raise UsageError(f"{what} name is empty; give a name like 'web1'")
    if len(name) > MAX_NAME:
        raise UsageError(
            f"{what} name '{name[:20]}...' is {len(name)} characters; use at most {MAX_NAME}"
        )
    if not _NAME_RE.match(name):
        shown = name.encode("unicode_escape").decode("ascii")
        raise UsageError(
            f"{what} name '{shown}' is not allowed; use letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-')"
        )
    return name


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")


def parse_mac(mac: str) -> str:
    """Normalise a unicast MAC to ``aa:bb:cc:dd:ee:ff``; reject malformed and multicast."""
    if not _MAC_RE.match(mac):
        raise UsageError(f"MAC '{mac}' is malformed; write six hex pairs like 52:54:00:12:34:56")
    norm = mac.replace("-", ":").lower()
    first = int(norm[:2], 16)
    if first & 1:
        raise UsageError(f"MAC '{mac}' is a multicast address; the first octet must be even")
    if norm == "00:00:00:00:00:00":
        raise UsageError(f"MAC '{mac}' is all zeros; give a real unicast address")
    return norm


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``4G``, ``1.5GiB``, ``1048576`` → bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"size '{text}' is not understood; write e.g. 512M, 4G or 1073741824")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value)


def check_hypervisor(name: str) -> str:
    if name not in HYPERVISORS:
        raise UsageError(f"unknown hypervisor '{name}'; choose one of {', '.join(HYPERVISORS)}")
    return name


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
