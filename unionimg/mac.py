"""Deterministic MAC addresses for instances. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def derive_mac(name: str, taken: Iterable[str] = ()) -> str:
    """A unicast, locally administered MAC derived from ``name``, not in ``taken``.

    The first octet has bit 0 clear (unicast) and bit 1 set (locally administered), so the
    address can never collide with a vendor-assigned one. On a collision in the store the
    name is hashed again with a counter, so the result is still a pure function of
    (name, taken).
    """
    used = {m.lower() for m in taken}
    counter = 0
    while True:
        seed = name if counter == 0 else f"{name}#{counter}"
        digest = hashlib.sha256(seed.encode("utf-8")).digest()
        octets = bytearray(digest[:6])
        octets[0] = (octets[0] & 0xFC) | 0x02
        mac = ":".join(f"{b:02x}" for b in octets)
        if mac not in used:
            return mac
        counter += 1
