"""The framed stream a migration's sender writes to the receiver (``migrate-in push``'s
stdin, over SSH).

The whole stream is one zstd stream (flushed as it goes, so what arrived can be used); inside
it, a frame is one type byte, a 4-byte big-endian header length, a JSON header, an 8-byte
big-endian payload length and the payload. The stream starts with :data:`MAGIC`, then:

- ``H`` the offer (:class:`~unionimg.store.migrate_records.MigrateOffer`), no payload;
- ``L`` a layer blob: header ``{"diff_id"}``, payload the layer's zstd tar blob;
- ``O`` a file content: header ``{"sha256", "size"}``, payload the content;
- ``D`` a file content as a delta (:mod:`.delta`): header ``{"sha256", "size", "base"}``,
  payload a zstd frame made with the base content as its dictionary;
- ``C`` a file content as content-defined chunks (:mod:`.cdc`): header ``{"sha256",
  "size"}``, payload its recipe against the chunk list the receiver answered;
- ``E`` the end: header ``{"objects": N, "layers": N}`` (what was announced), then nothing.

The reader bounds everything before reading it: a header of at most :data:`MAX_HEADER`
bytes, a payload of at most what the caller allows for its frame type; a stream that ends
inside a frame, a frame of an unknown type, or a byte after ``E`` is refused.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from unionimg.errors import GuestDataRefused

MAGIC = b"UNIONIMG-MIGRATE-1\n"
MAX_HEADER = 256 << 20
TYPES = (b"H", b"L", b"O", b"D", b"C", b"E")
_HEAD = struct.Struct(">cI")
NAMES = {
    b"H": "offer",
    b"L": "layer",
    b"O": "content",
    b"D": "delta",
    b"C": "chunked content",
    b"E": "end",
}
_LEN = struct.Struct(">Q")


class StreamRefused(GuestDataRefused):
    """The stream broke the framing: refused, nothing made from it (exit 8)."""


class StreamEnded(StreamRefused):
    """The stream ended inside a frame or before ``E`` (a broken link, a killed sender)."""


def frame_head(kind: bytes, header: dict[str, object], payload_len: int) -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return _HEAD.pack(kind, len(head)) + head + _LEN.pack(payload_len)


class Reader:
    """Reads frames from ``raw``; :meth:`frames` yields (type, header) and the caller must
    consume the payload with :meth:`payload` (in bounded chunks) before the next frame."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.left = 0
        self.bytes_read = 0
        self.at_end = False  # the end frame was read

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.raw.read(n - len(out))
            if not chunk:
                raise StreamEnded(
                    "migration stream ended early (the link broke or the sender stopped); "
                    "what arrived and was verified is kept: run the migration again"
                )
            out += chunk
        self.bytes_read += n
        return bytes(out)

    def start(self) -> None:
        got = self._exact(len(MAGIC))
        if got != MAGIC:
            raise StreamRefused("migration refused: the stream is not a unionimg migration")

    def next(self, limits: dict[bytes, int]) -> tuple[bytes, dict[str, object]]:
        """The next frame's type and header; its payload length is checked against
        ``limits[type]`` (its bytes are then read with :meth:`payload`)."""
        if self.left:
            raise StreamRefused("migration refused: a payload was not consumed")
        kind, hlen = _HEAD.unpack(self._exact(_HEAD.size))
        if kind not in TYPES:
            raise StreamRefused(f"migration refused: unknown frame type {kind!r}")
        if hlen > MAX_HEADER:
            raise StreamRefused(f"migration refused: a {NAMES[kind]} header of {hlen} bytes")
        try:
            header = json.loads(self._exact(hlen))
        except ValueError:
            raise StreamRefused("migration refused: a frame header is not JSON") from None
        if not isinstance(header, dict):
            raise StreamRefused("migration refused: a frame header is not a JSON object")
        (plen,) = _LEN.unpack(self._exact(_LEN.size))
        if plen > limits.get(kind, 0):
            raise StreamRefused(
                f"migration refused: a {NAMES[kind]} frame carries {plen} bytes, more than "
                f"announced or allowed ({limits.get(kind, 0)})"
            )
        self.left = plen
        return kind, header

    def payload(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        while self.left:
            n = min(chunk, self.left)
            data = self._exact(n)
            self.left -= n
            yield data

    def end(self) -> None:
        """After ``E``: the stream must end here."""
        self.at_end = True
        if self.raw.read(1):
            raise StreamRefused("migration refused: data after the end of the stream")


Write = Callable[[bytes], None]
