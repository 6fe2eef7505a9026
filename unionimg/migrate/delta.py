"""Changed files sent as deltas: zstd with the receiver's older version as a raw-content
dictionary (zstd's "patch from" mode: the new file compressed with the old one as the
window's prefix, so every part the two share is a back-reference).

The sender knows the older version without asking: a changed file of the VM's upper layer
at ``upper/P`` has the VM's base generation's ``/P`` below it, and the receiver holds that
generation (a migration requires it); the offer names those base contents (``bases``) and
the receiver says which it can read (its index). A delta is used when it is smaller than
the file compressed alone (:func:`encode` says so); files larger than :data:`MAX_SIZE` are
sent whole (both sides hold a delta's base and result in memory).

The receiver decodes with bounds (:func:`decode`): the base is checked against its sha256
first; the output may not exceed the announced size (a frame claiming more is refused before
it is read whole), and its sha256 must be the announced one.
"""

from __future__ import annotations

import hashlib

import zstandard

from unionimg.migrate.plan import Refused

MAX_SIZE = 64 << 20
MIN_SIZE = 1024
MAX_WINDOW_LOG = 27


def _window_log(base: int, new: int) -> int:
    return min(MAX_WINDOW_LOG, max(20, (base + new).bit_length() + 1))


def _dict(base: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode(base: bytes, new: bytes, level: int) -> bytes | None:
    """``new`` as a delta on ``base``, or None when compressing it alone is as small."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=_window_log(len(base), len(new))
    )
    delta = zstandard.ZstdCompressor(dict_data=_dict(base), compression_params=params).compress(new)
    alone = zstandard.ZstdCompressor(level=level).compress(new)
    return delta if len(delta) < len(alone) * 9 // 10 else None


def decode(base: bytes, base_sha: str, payload: bytes, size: int, sha: str) -> bytes:
    """The content a delta makes from ``base``, checked: ``size`` bytes of sha256 ``sha``."""
    if hashlib.sha256(base).hexdigest() != base_sha:
        raise Refused(f"migration refused: the delta base {base_sha[:16]} read here is damaged")
    dctx = zstandard.ZstdDecompressor(dict_data=_dict(base), max_window_size=1 << MAX_WINDOW_LOG)
    try:
        reader = dctx.stream_reader(payload)
        out = bytearray()
        while len(out) <= size:
            chunk = reader.read(min(1 << 20, size + 1 - len(out)))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:
        raise Refused(f"migration refused: a delta for {sha[:16]} is not valid ({exc})") from None
    if len(out) != size or hashlib.sha256(out).hexdigest() != sha:
        raise Refused(
            f"migration refused: the delta for {sha[:16]}... does not make its announced "
            f"content ({size} bytes, that sha256); nothing was made"
        )
    return bytes(out)
