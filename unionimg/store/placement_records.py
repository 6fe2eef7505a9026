"""Records of spare-image placement (issue 15): the placement applied to hosts
(``placement/applied.json``), imported only by the placement commands."""

from __future__ import annotations

from typing import Self

from unionimg.store.records import Fields, JsonObject, Record


class PlacedHost(Record, frozen=True):
    """The layers (diff_ids) a placement keeps on one host."""

    WHAT = "placed host"

    host: str
    layers: tuple[str, ...]

    def to_json(self) -> JsonObject:
        return {"host": self.host, "layers": list(self.layers)}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(host=f.text("host"), layers=f.texts("layers"))


class PlannedRecovery(Record, frozen=True):
    """When ``failed`` fails, VM ``vm`` recovers on ``target``, ``bytes`` sent to it."""

    WHAT = "planned recovery"

    failed: str
    vm: str
    target: str
    bytes: int

    def to_json(self) -> JsonObject:
        return {"failed": self.failed, "vm": self.vm, "target": self.target, "bytes": self.bytes}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            failed=f.text("failed"),
            vm=f.text("vm"),
            target=f.text("target"),
            bytes=f.integer("bytes"),
        )


class PlacementApplied(Record, frozen=True):
    """``placement/applied.json``: the placement of system node ``system``'s layers over the
    hosts (``servers``: the servers file it was planned from, to plan again after a
    recovery), as ``apply placement`` made it; ``recovered``: VMs recovered since, VM@HOST."""

    WHAT = "placement record"
    FILE = "applied.json"

    system: str
    registry: str
    created: str
    method: str
    status: str
    worst: int
    total: int
    servers: str
    hosts: tuple[PlacedHost, ...]
    recovery: tuple[PlannedRecovery, ...]
    recovered: tuple[str, ...] = ()

    def to_json(self) -> JsonObject:
        return {
            "system": self.system,
            "registry": self.registry,
            "created": self.created,
            "method": self.method,
            "status": self.status,
            "worst": self.worst,
            "total": self.total,
            "servers": self.servers,
            "hosts": [h.to_json() for h in self.hosts],
            "recovery": [r.to_json() for r in self.recovery],
            "recovered": list(self.recovered),
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            system=f.text("system"),
            registry=f.text("registry"),
            created=f.text("created"),
            method=f.text("method"),
            status=f.text("status"),
            worst=f.integer("worst"),
            total=f.integer("total"),
            servers=f.text("servers"),
            hosts=f.records("hosts", PlacedHost),
            recovery=f.records("recovery", PlannedRecovery),
            recovered=f.maybe_texts("recovered") or (),
        )
