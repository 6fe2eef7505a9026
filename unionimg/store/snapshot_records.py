"""Records of VM snapshots (issue 16, :mod:`unionimg.snapshots`): one manifest per snapshot,
naming the content-addressed chunks of the guest's memory and of its U image.

A manifest is read from the store and also received from another host (``snapshot
receive``): every digest, offset and length is checked here on reading, so a manifest that
names a path instead of a digest, a chunk past the end of the image or a negative size never
reaches the code that rebuilds files from it.
"""

from __future__ import annotations

import re
from typing import Self

from unionimg.store.records import Fields, Instance, JsonObject, Record, RecordError

_HEX = re.compile(r"[0-9a-f]{64}")
#: the largest chunk a manifest may name (memory chunks are at most 64 KiB, disk chunks
#: 64 KiB; a bound for what a received manifest may ask to be read or written)
MAX_CHUNK = 1 << 20
#: the largest memory image or U image a manifest may describe (8 TiB, the U size limit)
MAX_SIZE = 8 << 40
KINDS = ("memory+disk", "disk")


def _memory_ref(text: str, where: str) -> tuple[str, int]:
    digest, _, length = text.partition(":")
    if not _HEX.fullmatch(digest) or not length.isdigit() or not 0 < int(length) <= MAX_CHUNK:
        raise RecordError(f"{where} is {text[:80]!r}, not HEX:LENGTH")
    return digest, int(length)


def _disk_ref(text: str, where: str) -> tuple[int, str, int]:
    offset, _, rest = text.partition(":")
    if not offset.isdigit():
        raise RecordError(f"{where} is {text[:80]!r}, not OFFSET:HEX:LENGTH")
    try:
        digest, length = _memory_ref(rest, where)
    except RecordError:
        raise RecordError(f"{where} is {text[:80]!r}, not OFFSET:HEX:LENGTH") from None
    return int(offset), digest, length


class SnapshotRecord(Record, frozen=True):
    """``snapshots/vms/VM/ID.json``: one snapshot of VM — what it was (its instance record
    and the chain its U lies on), its memory image (kvm) and its U image as chunk digests,
    and what it cost."""

    WHAT = "snapshot record"

    vm: str
    id: int
    created: str
    kind: str  # memory+disk (kvm) | disk (uml: no memory state)
    instance: Instance  # the VM's record when the snapshot was taken
    chain: tuple[str, ...]  # diff_ids its U lies on, top to bottom: snapshot layers, generation
    domain_type: str  # kvm: kvm | qemu (TCG); "" for a disk-only snapshot
    memory_size: int
    memory: tuple[str, ...]  # HEX:LEN, in order (the memory image is their concatenation)
    disk_size: int  # the U image's size (sparse)
    disk: tuple[str, ...]  # OFFSET:HEX:LEN of each data chunk; the rest of U is a hole
    new_bytes: int  # compressed bytes of the chunks this snapshot added to its store
    pause_ms: int  # how long the guest was paused to take it
    ready_line: str = ""  # the guest's readiness line of the boot it runs in (console)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RecordError(f"field 'kind' is {self.kind!r}, not one of {KINDS}")
        if not 0 < self.id < 1 << 31:
            raise RecordError(f"field 'id' is {self.id}, not a snapshot number")
        for key in ("memory_size", "disk_size", "new_bytes", "pause_ms"):
            value = getattr(self, key)
            if not 0 <= value <= MAX_SIZE:
                raise RecordError(f"field '{key}' is {value}, out of range")
        total = 0
        for i, ref in enumerate(self.memory):
            total += _memory_ref(ref, f"field 'memory'[{i}]")[1]
        if total != self.memory_size:
            raise RecordError(
                f"field 'memory' adds up to {total} bytes, not memory_size {self.memory_size}"
            )
        end = 0
        for i, ref in enumerate(self.disk):
            offset, _, length = _disk_ref(ref, f"field 'disk'[{i}]")
            if offset < end or offset + length > self.disk_size:
                raise RecordError(
                    f"field 'disk'[{i}] ({offset}+{length}) overlaps the chunk before it or "
                    f"lies past disk_size {self.disk_size}"
                )
            end = offset + length

    def memory_refs(self) -> list[tuple[str, int]]:
        return [_memory_ref(r, "memory") for r in self.memory]

    def disk_refs(self) -> list[tuple[int, str, int]]:
        return [_disk_ref(r, "disk") for r in self.disk]

    def digests(self) -> set[str]:
        return {d for d, _ in self.memory_refs()} | {d for _, d, _ in self.disk_refs()}

    def to_json(self) -> JsonObject:
        return {
            "vm": self.vm,
            "id": self.id,
            "created": self.created,
            "kind": self.kind,
            "instance": self.instance.to_json(),
            "chain": list(self.chain),
            "domain_type": self.domain_type,
            "memory_size": self.memory_size,
            "memory": list(self.memory),
            "disk_size": self.disk_size,
            "disk": list(self.disk),
            "new_bytes": self.new_bytes,
            "pause_ms": self.pause_ms,
            "ready_line": self.ready_line,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        try:
            instance = Instance.from_json(f.mapping("instance"))
        except RecordError as exc:
            raise RecordError(f"field 'instance': {exc}") from None
        chain = f.texts("chain")
        for i, layer in enumerate(chain):
            if not (layer.startswith("sha256:") and _HEX.fullmatch(layer[7:])):
                raise RecordError(f"field 'chain'[{i}] is not sha256:HEX")
        return cls(
            vm=f.text("vm"),
            id=f.integer("id"),
            created=f.text("created"),
            kind=f.text("kind"),
            instance=instance,
            chain=chain,
            domain_type=f.text("domain_type"),
            memory_size=f.integer("memory_size"),
            memory=f.texts("memory"),
            disk_size=f.integer("disk_size"),
            disk=f.texts("disk"),
            new_bytes=f.integer("new_bytes"),
            pause_ms=f.integer("pause_ms"),
            ready_line=f.text("ready_line", ""),
        )
