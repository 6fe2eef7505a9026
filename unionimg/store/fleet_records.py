"""Records of the fleet: systems, their VMs, deployments and hosts (a part of
:mod:`unionimg.store.records`, imported only by the fleet's commands)."""

from __future__ import annotations

from typing import Self

from unionimg.store.records import Fields, JsonObject, Record


class SystemVM(Record, frozen=True):
    """One VM of a system node: the image-tree node it boots (its top layer) and what makes
    it the same machine on every host (MAC, NIC name, hypervisor, resources, U size)."""

    WHAT = "system VM"

    name: str
    layer: str  # the top layer's diff_id, sha256:HEX
    mac: str
    hypervisor: str
    memory: int
    vcpus: int
    size: int  # the U image's size
    nic_name: str = "eth0"

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "layer": self.layer,
            "mac": self.mac,
            "hypervisor": self.hypervisor,
            "memory": self.memory,
            "vcpus": self.vcpus,
            "size": self.size,
            "nic_name": self.nic_name,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            name=f.text("name"),
            layer=f.text("layer"),
            mac=f.text("mac"),
            hypervisor=f.text("hypervisor"),
            memory=f.integer("memory"),
            vcpus=f.integer("vcpus"),
            size=f.integer("size"),
            nic_name=f.text("nic_name", "eth0"),
        )


class SystemMeta(Record, frozen=True):
    """``systems/NAME/system.json``: one node of the system tree (immutable once made); also
    the config blob of a system node in a registry (:mod:`unionimg.systems`)."""

    WHAT = "system record"
    FILE = "system.json"

    name: str
    parent: str | None  # the parent node's name; None for a root
    created: str
    message: str
    vms: tuple[SystemVM, ...]

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "parent": self.parent,
            "created": self.created,
            "message": self.message,
            "vms": [vm.to_json() for vm in self.vms],
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            name=f.text("name"),
            parent=f.maybe_text("parent"),
            created=f.text("created"),
            message=f.text("message", ""),
            vms=f.records("vms", SystemVM),
        )


class Deployment(Record, frozen=True):
    """``systems/NAME/deployed.json`` on a host: system node NAME was materialized here
    (its VMs belong to it; a redeploy of another node of the tree replaces them)."""

    WHAT = "deployment record"
    FILE = "deployed.json"

    system: str
    digest: str  # the system node's manifest digest ("" when made from the local record)
    vms: tuple[str, ...]
    deployed: str

    def to_json(self) -> JsonObject:
        return {
            "system": self.system,
            "digest": self.digest,
            "vms": list(self.vms),
            "deployed": self.deployed,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            system=f.text("system"),
            digest=f.text("digest"),
            vms=f.texts("vms"),
            deployed=f.text("deployed"),
        )


class HostMeta(Record, frozen=True):
    """``hosts/NAME/host.json``: a host reached over SSH (:mod:`unionimg.hosts`)."""

    WHAT = "host record"
    FILE = "host.json"

    name: str
    user: str
    addr: str
    port: int
    store: str  # the host's store directory
    unionimg: str  # the unionimg program there
    created: str

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "user": self.user,
            "addr": self.addr,
            "port": self.port,
            "store": self.store,
            "unionimg": self.unionimg,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            name=f.text("name"),
            user=f.text("user"),
            addr=f.text("addr"),
            port=f.integer("port"),
            store=f.text("store"),
            unionimg=f.text("unionimg"),
            created=f.text("created"),
        )
