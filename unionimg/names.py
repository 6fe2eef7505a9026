"""Validation of what users type: object names, MAC addresses, NIC names, sizes, counts,
hypervisors. Pure.

Every check matches the WHOLE text (``re.fullmatch``, never ``$``, which also matches before
a trailing newline) with ASCII classes only (``[0-9]``, never ``\\d`` or ``int()`` alone,
which accept any Unicode digit: ``int('1٠')`` is 10). Refused input raises
:class:`UsageError` (exit 2) naming the value, escaped so control characters stay visible.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from unionimg import display
from unionimg.errors import UsageError

HYPERVISORS = ("kvm", "uml", "xen", "virtualbox")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 64


def shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message, escaped (:func:`unionimg.display.shown`) and cut."""
    return display.shown(text, limit)


def check_name(name: str, what: str) -> str:
    """A base or instance name: 1-64 chars of ``A-Za-z0-9._-``, not starting with ``.``/``-``.

    The same name becomes a file name, a libvirt domain name, an xl.cfg value and a shell
    word, so it is restricted to what is safe in all of them.
    """
    if not name:
        raise UsageError(f"{what} name is empty; give a name like 'web1'")
    if len(name) > MAX_NAME:
        raise UsageError(
            f"{what} name '{shown(name, 23)}' is {len(name)} characters; use at most {MAX_NAME}"
        )
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"{what} name '{shown(name)}' is not allowed; use letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-')"
        )
    return name


# -- MAC addresses --------------------------------------------------------------------------
_HEX2 = "[0-9A-Fa-f]{2}"
_MAC_RE = re.compile(rf"{_HEX2}(?P<sep>[:-]){_HEX2}(?:(?P=sep){_HEX2}){{4}}")


def parse_mac(mac: str, of: str = "") -> str:
    """A unicast MAC as six hex pairs separated all by ``:`` or all by ``-`` (any case),
    normalised to lowercase ``aa:bb:cc:dd:ee:ff``.

    Refused: anything else (blanks or a newline anywhere, mixed or other separators, bare
    hex), a multicast address (first octet odd; broadcast ``ff:ff:ff:ff:ff:ff`` is one) and
    the all-zero address: a NIC cannot be given any of those. ``of`` names the object in
    messages (" for instance vm1").
    """
    if not _MAC_RE.fullmatch(mac):
        raise UsageError(
            f"MAC '{shown(mac)}'{of} is malformed; write six hex pairs separated by ':' "
            "like 52:54:00:12:34:56"
        )
    norm = mac.replace("-", ":").lower()
    if norm == "ff:ff:ff:ff:ff:ff":
        raise UsageError(f"MAC '{mac}'{of} is the broadcast address; give a unicast address")
    if int(norm[:2], 16) & 1:
        raise UsageError(
            f"MAC '{mac}'{of} is a multicast address (its first octet is odd); give a unicast "
            "address, e.g. with first octet 52 or 02"
        )
    if norm == "00:00:00:00:00:00":
        raise UsageError(f"MAC '{mac}'{of} is all zeros; give a real unicast address")
    return norm


# -- network interface names ----------------------------------------------------------------
IFNAME_MAX = 15  # IFNAMSIZ - 1
_IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_nic_name(name: str, of: str = "") -> str:
    """A name the guest's kernel and udev/systemd all accept for a NIC (``of``: " for VM").

    The kernel (``dev_valid_name``): 1-15 bytes, not ``.``/``..``, no ``/``, ``:`` or blank.
    systemd (``ifname_valid``) also refuses control and non-ASCII characters, ``%``, names
    that are all digits (they read as interface indexes) and ``all``/``default`` (the
    sysctl directories ``net/ipv4/conf/{all,default}``). The name is also written into a
    udev rule and a ``.link`` file, so only letters, digits, ``_``, ``.`` and ``-`` are
    taken (not starting with ``.`` or ``-``): nothing there needs quoting or substitution.
    """
    if not name:
        raise UsageError(f"NIC name{of} is empty; give a name like eth0")
    if len(name.encode("utf-8", "surrogateescape")) > IFNAME_MAX:
        raise UsageError(
            f"NIC name '{shown(name)}'{of} is longer than {IFNAME_MAX} bytes, the kernel's limit; "
            "give a shorter name like eth0"
        )
    if not _IFNAME_RE.fullmatch(name):
        raise UsageError(
            f"NIC name '{shown(name)}'{of} is not allowed; use letters, digits, '_', '.' and '-' "
            "(not starting with '.' or '-'), like eth0"
        )
    if name.isdigit() or name in ("all", "default"):
        raise UsageError(
            f"NIC name '{name}'{of} is refused by systemd/udev (all digits, 'all' and 'default' "
            "are reserved); give a name like eth0"
        )
    return name


# -- sizes and counts -----------------------------------------------------------------------
_SIZE_RE = re.compile(
    r"(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?(?P<unit>[KMGTkmgt](?:[iI]?[Bb])?|[Bb])?"
)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: The largest image unionimg makes. A store on ext4 holds files up to 16 TiB - 4 KiB (4 KiB
#: blocks); mke2fs writes about 113 MiB of metadata into a sparse 8 TiB image (0.65 s).
MAX_SIZE = 8 << 40
_SIZE_HINT = (
    "write digits 0-9 with an optional unit K, M, G or T (powers of 1024), e.g. 512M, 4G, 1.5G"
)


def parse_size(text: str, what: str = "size", of: str = "") -> int:
    """``512M``, ``4G``, ``1.5GiB``, ``1048576`` → bytes (binary units, ``B``/``iB`` optional,
    any case). ASCII digits only, no blanks; a fraction must come to whole bytes; 1 byte to
    :data:`MAX_SIZE`."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise UsageError(f"{what} '{shown(text)}'{of} is not understood; {_SIZE_HINT}")
    unit = _UNITS[(m.group("unit") or "")[:1].upper()]
    frac = (m.group("frac") or "").rstrip("0")
    if len(m.group("int").lstrip("0")) > 20 or len(frac) > 20:  # int() of huge text is slow
        raise UsageError(f"{what} '{shown(text)}'{of} is too long; give at most 8T, e.g. 4G")
    scaled: int = int(m.group("int") + frac) * unit  # exact integers: no float rounding
    denominator: int = 10 ** len(frac)
    value, rest = divmod(scaled, denominator)
    if rest:
        raise UsageError(f"{what} '{text}'{of} is not a whole number of bytes; {_SIZE_HINT}")
    if value == 0:
        raise UsageError(f"{what} '{text}'{of} is zero; give a size such as 4G")
    if value > MAX_SIZE:
        raise UsageError(
            f"{what} '{text}'{of} is more than {human_size(MAX_SIZE)}, the largest image unionimg "
            "makes (ext4 files end at 16 TiB); give at most 8T"
        )
    return value


_INT_RE = re.compile(r"-?[0-9]+")


def parse_int(
    text: str, what: str, lo: int | None = None, hi: int | None = None, of: str = ""
) -> int:
    """A whole number written in ASCII digits (optionally ``-``), within ``lo``..``hi``."""
    if not _INT_RE.fullmatch(text):
        raise UsageError(f"{what} '{shown(text)}'{of} is not a whole number; write digits 0-9")
    digits = text.lstrip("-").lstrip("0")
    value = int(text) if len(digits) <= 30 else (-1 if text.startswith("-") else 1) * 10**30
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            span = f"give {lo} to {hi}"
        else:
            span = f"give at least {lo}" if lo is not None else f"give at most {hi}"
        raise UsageError(f"{what} {shown(text)}{of} is out of range; {span}")
    return value


_SECONDS_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
MAX_SECONDS = 31 * 86400


def parse_seconds(text: str, what: str) -> float:
    """A duration in seconds: ASCII digits with an optional fraction (``300``, ``0.5``), at
    most :data:`MAX_SECONDS` (31 days). ``float()`` alone also takes ``nan``, ``inf``,
    ``-1``, ``1e9`` and Unicode digits."""
    if not _SECONDS_RE.fullmatch(text):
        raise UsageError(
            f"{what} '{shown(text)}' is not a number of seconds; write digits 0-9, e.g. 300 or 2.5"
        )
    value = float(text)
    if value > MAX_SECONDS:
        raise UsageError(f"{what} {shown(text, 30)} is more than {MAX_SECONDS} seconds (31 days)")
    return value


def check_outside_store(
    path: Path, store_root: Path, what: str, *, may_hold_store: bool = False
) -> None:
    """Refuse a directory given for reading or writing that lies inside the store (it would
    read or overwrite the store's own objects) or, unless ``may_hold_store``, holds the
    store (a base made from it would contain the store, and the base being made)."""
    where, store = os.path.realpath(path), os.path.realpath(store_root)
    if where == store or where.startswith(store + os.sep):
        raise UsageError(
            f"{what} {shown(str(path), 200)} is inside the store {store}; "
            "give a directory outside it"
        )
    if not may_hold_store and store.startswith(where.rstrip(os.sep) + os.sep):
        raise UsageError(
            f"{what} {shown(str(path), 200)} holds the store {store}, which would go into "
            "the base; give a directory that does not contain the store"
        )


def check_hypervisor(name: str) -> str:
    if name not in HYPERVISORS:
        raise UsageError(
            f"unknown hypervisor '{shown(name)}'; choose one of {', '.join(HYPERVISORS)}"
        )
    return name


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
