"""Large changed files as content-defined chunks (FastCDC) against the receiver's nearest
version: the rsync model, for when the sender does not hold what the receiver holds.

The receiver chunks its nearest version(s) of a large content it lacks (:mod:`.index`
``nearest``: a broken transfer's partial arrival, the VM's own copy kept when it left, the
same path in a base generation or another VM) with :func:`cut` and answers the list of their
chunk digests (:func:`encode_list`). The sender cuts the new file the same way and writes a
**recipe** (:func:`plan_recipe`, :func:`pieces`): runs of chunks the receiver holds, named by
their place in its list, and the chunks it lacks, whole. The receiver remakes the file
(:class:`Rebuild`) from its own chunks (each hashed again as it is read) and the received
ones, bounded: a recipe that makes more than the announced size, a chunk over
:data:`MAX_CHUNK` or empty, a reference outside the lists, a run whose digests are not
the ones the receiver has there, a chunk that does not hash to its digest — refused in
one line; the caller then drops the partial output (only the whole file's sha256, checked
by the object writer, makes it a content).

A second, finer look (scattered small edits): the sender's changed **regions** (its chunks
the receiver lacks between two runs of the receiver's, :func:`regions`) name the receiver's
chunks they replace; asked again with them, the receiver cuts those finer
(:func:`fine_chunker`, 256 B/1 KiB/4 KiB) and answers their digests; the sender then cuts
each changed region finer too and sends runs of the receiver's fine chunks and only the
fine chunks it lacks (:func:`refine_recipe`).

Pieces of a recipe (the payload of a ``C`` frame, :mod:`.wire`)::

    R  u32 start  u32 count  16-byte check   count chunks of the receiver's list from start;
                                             check = the first 16 bytes of the sha256 of
                                             their digests (the list the sender was answered)
    F  u32 start  u32 count  16-byte check   the same, of the receiver's fine chunks
    N  u32 length 16-byte digest  bytes      a chunk (or fine chunk) the receiver lacks

A chunk's digest is the first :data:`DIGEST` bytes of its sha256 (a collision can only make
the whole file's sha256 fail: refused, never wrong bytes). Sizes measured (docs/migrate.md,
``tests/test_migrate_cdc_measure.py``): 2/8/32 KiB minimum/average/maximum (FastCDC's average
parameter 8 KiB; the real average is about 10 KiB), files of at least :data:`MIN_FILE`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from pyfastcdc import FastCDC

from unionimg.errors import ToolFailed
from unionimg.migrate.plan import Refused

MIN_CHUNK = 2 << 10
AVG_CHUNK = 8 << 10
MAX_CHUNK = 32 << 10
MIN_FILE = 1 << 20
DIGEST = 16
MAX_SEEDS = 3
FINE_MIN = 256
FINE_AVG = 1 << 10
FINE_MAX = 4 << 10
MAX_REFINE = 64  # the host's chunks one changed region may lie on (a second, finer look)
_RUN = struct.Struct(">cII16s")
_NEW = struct.Struct(">cI16s")


def chunker() -> FastCDC:
    return FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)


def fine_chunker() -> FastCDC:
    return FastCDC(FINE_AVG, min_size=FINE_MIN, max_size=FINE_MAX)


def digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()[:DIGEST]


Chunk = tuple[int, int, bytes]
"""(offset, length, digest) of one chunk of a file."""


def cut(fh: BinaryIO) -> Iterator[Chunk]:
    """The chunks of the stream ``fh`` (read in bounded pieces, never whole)."""
    for c in chunker().cut_stream(fh):
        yield c.offset, c.length, digest(c.data)


def encode_list(digests: Iterable[bytes]) -> str:
    return base64.b64encode(b"".join(digests)).decode()


def decode_list(text: str, max_chunks: int) -> list[bytes]:
    """A receiver's chunk list (base64 of the digests one after another), bounded."""
    if len(text) > (max_chunks * DIGEST * 4) // 3 + 8:
        raise Refused("migration refused: a chunk list longer than its files allow")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("migration refused: a chunk list is not base64") from None
    if len(raw) % DIGEST:
        raise Refused("migration refused: a chunk list is ill-formed")
    return [raw[i : i + DIGEST] for i in range(0, len(raw), DIGEST)]


def max_chunks(size: int) -> int:
    """The most chunks FastCDC cuts a file of ``size`` bytes into."""
    return size // MIN_CHUNK + 1


def list_limit(size: int) -> int:
    """The most chunk digests a receiver lists for a file of ``size`` bytes (its nearest
    versions may be larger than the file: up to four times it, or 1 GiB, each)."""
    return MAX_SEEDS * max_chunks(max(4 * size, 1 << 30))


def max_payload(size: int) -> int:
    """The largest recipe a file of ``size`` bytes may take (a piece per fine chunk, and one
    more per changed region, each with its head)."""
    return size + (2 * (size // FINE_MIN) + 4) * _RUN.size


def run_check(digests: Iterable[bytes]) -> bytes:
    return hashlib.sha256(b"".join(digests)).digest()[:DIGEST]


Piece = tuple[str, int, int, bytes]
"""``("R", start, count, b"")`` (the host's chunks), ``("F", start, count, b"")`` (its fine
chunks, :func:`refine_recipe`) or ``("N", offset, length, digest)`` (sent)."""


@dataclass
class Recipe:
    """A new file against the receiver's list: its :data:`Piece` s in file order."""

    pieces: list[Piece] = field(default_factory=list)
    chunks: int = 0  # chunks of the new file
    sent: int = 0  # of which sent whole
    sent_bytes: int = 0
    payload: int = 0  # bytes of the recipe (the C frame's payload)

    @property
    def reused(self) -> int:
        return self.chunks - self.sent


def plan_recipe(chunks: Iterable[Chunk], have: list[bytes]) -> Recipe:
    """The recipe of a file cut into ``chunks`` for a receiver holding ``have``."""
    where: dict[bytes, int] = {}
    for i, d in enumerate(have):
        where.setdefault(d, i)
    out = Recipe()
    runs: list[list[int]] = []  # [start, count, index in pieces]
    last: list[int] | None = None
    for off, length, d in chunks:
        out.chunks += 1
        at_have = where.get(d)
        if at_have is None:
            last = None
            out.pieces.append(("N", off, length, d))
            out.sent += 1
            out.sent_bytes += length
        elif last is not None and last[0] + last[1] == at_have:
            last[1] += 1
        else:
            last = [at_have, 1, len(out.pieces)]
            runs.append(last)
            out.pieces.append(("R", at_have, 1, b""))
    for start, count, at in runs:
        out.pieces[at] = ("R", start, count, b"")
    out.payload = sum(_RUN.size if p[0] != "N" else _NEW.size + p[2] for p in out.pieces)
    return out


def regions(recipe: Recipe) -> list[tuple[int, int]]:
    """The host's chunks ``(a, b)`` (its list's ``a`` to ``b - 1``) that each changed region
    of the file replaces: a run of sent chunks between two runs of the host's, where those
    are apart by at most :data:`MAX_REFINE` chunks. The host cuts them finer
    (:func:`fine_chunker`) when asked again; the sender then refines (:func:`refine_recipe`)."""
    return regions_and_bytes(recipe)[0]


def regions_and_bytes(recipe: Recipe) -> tuple[list[tuple[int, int]], int]:
    """:func:`regions`, and the bytes of the file's sent chunks in them (what a finer look
    may save part of)."""
    out: list[tuple[int, int]] = []
    after: int | None = None  # the host's chunk after the last run
    gap = 0  # bytes of the sent chunks since the last run
    total = 0
    for p in recipe.pieces:
        if p[0] == "R":
            near = after is not None and 0 < p[1] - after <= MAX_REFINE
            if gap and near and after is not None and (not out or out[-1][1] <= after):
                out.append((after, p[1]))
                total += gap
            after = p[1] + p[2]
            gap = 0
        elif p[0] == "N":
            gap += p[2]
    return out, total


def encode_regions(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}-{b}" for a, b in ranges)


def decode_regions(text: str, chunks: int) -> list[tuple[int, int]]:
    """The regions a sender asks to see finer: increasing, apart, within the host's
    ``chunks``, each at most :data:`MAX_REFINE` chunks."""
    out: list[tuple[int, int]] = []
    if not text:
        return out
    last = 0
    for part in text.split(",")[: chunks + 1]:
        a_text, _, b_text = part.partition("-")
        if not (a_text.isdigit() and b_text.isdigit()) or len(part) > 24:
            raise Refused("migration refused: a region to refine is ill-formed")
        a, b = int(a_text), int(b_text)
        if not last <= a < b <= chunks or b - a > MAX_REFINE:
            raise Refused("migration refused: a region to refine is out of range")
        out.append((a, b))
        last = b
    return out


def refine_recipe(
    recipe: Recipe, fine: list[bytes], read_at: Callable[[int, int], bytes]
) -> Recipe:
    """``recipe`` with each changed region (its sent chunks between two runs, at most
    :data:`MAX_REFINE` chunks of the largest size) cut finer and matched against the host's
    fine chunks ``fine``: what they share becomes runs of ``F``, only the rest is sent."""
    where: dict[bytes, int] = {}
    for i, d in enumerate(fine):
        where.setdefault(d, i)
    out = Recipe(chunks=recipe.chunks)
    ps = recipe.pieces
    i = 0
    while i < len(ps):
        if ps[i][0] != "N":
            out.pieces.append(ps[i])
            i += 1
            continue
        j = i
        while j < len(ps) and ps[j][0] == "N":
            j += 1
        gap = ps[i:j]
        start, end = gap[0][1], gap[-1][1] + gap[-1][2]
        if not where or end - start > MAX_REFINE * MAX_CHUNK:
            for p in gap:
                out.pieces.append(p)
                out.sent += 1
                out.sent_bytes += p[2]
            i = j
            continue
        data = read_at(start, end - start)
        if len(data) != end - start:
            raise ToolFailed("a file changed while it was sent; retry")
        last: list[int] | None = None
        for c in fine_chunker().cut_buf(data):
            d = digest(c.data)
            at = where.get(d)
            if at is None:
                last = None
                out.pieces.append(("N", start + c.offset, c.length, d))
                out.sent_bytes += c.length
            elif last is not None and last[0] + last[1] == at:
                last[1] += 1
                out.pieces[last[2]] = ("F", last[0], last[1], b"")
            else:
                last = [at, 1, len(out.pieces)]
                out.pieces.append(("F", at, 1, b""))
        out.sent += len(gap)  # the coarse chunks that changed (some of them now in part)
        i = j
    out.payload = sum(_RUN.size if p[0] != "N" else _NEW.size + p[2] for p in out.pieces)
    return out


def pieces(
    recipe: Recipe,
    have: list[bytes],
    read_at: Callable[[int, int], bytes],
    fine: list[bytes] | None = None,
) -> Iterator[bytes]:
    """The recipe's bytes; ``read_at(offset, length)`` reads the new file (a chunk that no
    longer hashes to what the plan saw means the file changed meanwhile: ToolFailed)."""
    for p in recipe.pieces:
        if p[0] in ("R", "F"):
            start, count = p[1], p[2]
            listed = have if p[0] == "R" else (fine or [])
            check = run_check(listed[start : start + count])
            yield _RUN.pack(p[0].encode(), start, count, check)
            continue
        _k, off, length, d = p
        data = read_at(off, length)
        if len(data) != length or digest(data) != d:
            raise ToolFailed("a file changed while it was sent; retry")
        yield _NEW.pack(b"N", length, d) + data


class Rebuild:
    """A file remade from a recipe fed in pieces of any size (:meth:`feed`, then
    :meth:`finish`): ``have`` is the receiver's list, ``read(i)`` reads its chunk ``i``
    (checked here against ``have[i]``), ``fine`` and ``read_fine`` the same for its fine
    chunks (:func:`refine_recipe`), ``out`` takes the file's bytes in order, each chunk only
    once verified. ``size`` is the announced size; ``what`` names the content. (The
    caller bounds the recipe's length, :func:`max_payload`: a piece makes at least a byte.)"""

    def __init__(
        self,
        have: list[bytes],
        size: int,
        read: Callable[[int], bytes],
        out: Callable[[bytes], None],
        what: str,
        fine: list[bytes] | None = None,
        read_fine: Callable[[int], bytes] | None = None,
    ) -> None:
        self.lists = {b"R": (have, read), b"F": (fine or [], read_fine or read)}
        self.size = size
        self.out = out
        self.what = what[:16]
        self.made = 0
        self.buf = bytearray()

    def _bad(self, why: str) -> Refused:
        return Refused(
            f"migration refused: chunked content {self.what}...: {why}; nothing was made"
        )

    def _emit(self, data: bytes) -> None:
        n = len(data)
        if self.made + n > self.size:
            raise self._bad(f"the recipe makes more than the announced {self.size} bytes")
        self.made += n
        self.out(data)

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            kind = bytes(self.buf[:1])
            if kind in self.lists:
                if len(self.buf) < _RUN.size:
                    return
                _k, start, count, check = _RUN.unpack_from(self.buf)
                del self.buf[: _RUN.size]
                have, read = self.lists[kind]
                if count < 1 or start + count > len(have):
                    raise self._bad(f"a reference to chunks {start}..{start + count} it lacks")
                if run_check(have[start : start + count]) != check:
                    raise self._bad(
                        "a run of chunks not the ones answered (they changed here since): "
                        "run the migration again"
                    )
                for i in range(start, start + count):
                    chunk = read(i)
                    if len(chunk) > self.size - self.made:
                        raise self._bad(
                            f"the recipe makes more than the announced {self.size} bytes"
                        )
                    if digest(chunk) != have[i]:
                        raise self._bad(f"chunk {i} of its nearest version here is damaged")
                    self._emit(chunk)
            elif kind == b"N":
                if len(self.buf) < _NEW.size:
                    return
                _k, length, d = _NEW.unpack_from(self.buf)
                if not 0 < length <= MAX_CHUNK:
                    raise self._bad(f"a chunk of {length} bytes (at most {MAX_CHUNK})")
                if self.made + length > self.size:
                    raise self._bad(f"the recipe makes more than the announced {self.size} bytes")
                if len(self.buf) < _NEW.size + length:
                    return
                chunk = bytes(self.buf[_NEW.size : _NEW.size + length])
                del self.buf[: _NEW.size + length]
                if digest(chunk) != d:
                    raise self._bad("a chunk does not match its digest")
                self._emit(chunk)
            else:
                raise self._bad(f"an unknown recipe piece {kind!r}")

    def finish(self) -> None:
        if self.buf:
            raise self._bad("the recipe ends inside a piece")
        if self.made != self.size:
            raise self._bad(f"the recipe makes {self.made} bytes, not the announced {self.size}")
