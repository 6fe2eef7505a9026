"""The window between a host's confirmation and the VM's removal here (issue 14).

A migration's last steps run on two machines: the host makes the VM and says so, then the
sender keeps the VM's contents for its way back and removes it. A sender stopped between the
two (killed, SSH cut after the host's final rename) would leave the VM on both stores, with
the same MAC, and nothing to say which one is the live one. So:

- before its stream, the sender writes a :class:`Pending` record into the VM's instance
  directory (``migrate-pending.json``: the host, the offer's digest, the MAC, the digest of
  U's tree as sent), written durably (temporary file, fsync, rename, fsync of the directory);
  while it exists the VM does not boot here (:func:`unionimg.boot.control.boot` refuses it in
  one line: run the migration again);
- the host records the offer's digest in the instance it makes (``migrated.json``,
  :class:`Arrival`, inside the directory that appears by one rename);
- ``migrate-in status NAME MAC DIGEST`` (:func:`status`) says whether the host holds that
  very VM: an instance of that name and MAC, made from that offer;
- a sender that finds the record asks the host: if it holds the VM, the migration is
  finished (contents kept for the way back, the VM removed here), provided U's tree is still
  the one sent; otherwise the record is dropped and the migration runs normally.

The record goes with the instance directory when the VM is removed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Self

from unionimg.errors import NotFound, UsageError
from unionimg.layers import instance as inst_mod
from unionimg.names import check_name, parse_mac
from unionimg.store.layout import Store, now_iso, read_record, write_record
from unionimg.store.migrate_records import TreeEntry
from unionimg.store.records import Fields, JsonObject, Record

_SHA_RE = re.compile(r"[0-9a-f]{64}")


class Pending(Record, frozen=True):
    """``migrate-pending.json`` in a VM's instance directory on the sender: a migration
    whose stream was (or was being) sent; the VM does not boot here while it exists."""

    WHAT = "pending migration"
    FILE = inst_mod.PENDING_MIGRATION  # boot and mount refuse the VM while it exists

    host: str
    offer_digest: str
    mac: str
    u_digest: str  # the digest of U's tree as offered (tree_digest)
    started: str

    def to_json(self) -> JsonObject:
        return {
            "host": self.host,
            "offer_digest": self.offer_digest,
            "mac": self.mac,
            "u_digest": self.u_digest,
            "started": self.started,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            host=f.text("host"),
            offer_digest=f.text("offer_digest"),
            mac=f.text("mac"),
            u_digest=f.text("u_digest"),
            started=f.text("started"),
        )


class Arrival(Record, frozen=True):
    """``migrated.json`` in an instance directory a migration made: the digest of the offer
    it was made from (what a sender's :class:`Pending` names), the sender's store."""

    WHAT = "migration arrival"
    FILE = "migrated.json"

    offer_digest: str
    sender: str
    arrived: str

    def to_json(self) -> JsonObject:
        return {"offer_digest": self.offer_digest, "sender": self.sender, "arrived": self.arrived}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            offer_digest=f.text("offer_digest"),
            sender=f.text("sender", ""),
            arrived=f.text("arrived", ""),
        )


class Status(Record, frozen=True):
    """``migrate-in status``'s answer: whether the host holds that very VM, and why not."""

    WHAT = "migration status"

    holds: bool
    why: str = ""

    def to_json(self) -> JsonObject:
        return {"holds": self.holds, "why": self.why}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(holds=f.flag("holds"), why=f.text("why", ""))


def tree_digest(entries: Iterable[TreeEntry]) -> str:
    """The sha256 of a tree manifest (every entry's JSON, in order): equal for two scans of
    an unchanged tree (contents, metadata, xattrs)."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps(e.to_json(), sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def read(store: Store, name: str) -> Pending | None:
    path = store.instance_dir(name) / Pending.FILE
    try:
        return read_record(path, Pending)
    except FileNotFoundError:
        return None


def write(store: Store, name: str, rec: Pending) -> None:
    """Durably (fsynced file and directory): it must outlive a crash right after."""
    write_record(store.instance_dir(name) / Pending.FILE, rec)


def clear(store: Store, name: str) -> None:
    (store.instance_dir(name) / Pending.FILE).unlink(missing_ok=True)


def arrival(offer_digest: str, sender: str) -> Arrival:
    return Arrival(offer_digest=offer_digest, sender=sender, arrived=now_iso())


def status(store: Store, name: str, mac: str, offer_digest: str) -> Status:
    """Whether this store holds instance ``name`` with ``mac``, made from the offer of
    ``offer_digest`` (the host's side of ``migrate-in status``); the arguments are checked
    as input."""
    check_name(name, "instance")
    want = parse_mac(mac, of=f" for instance {name}")
    if not _SHA_RE.fullmatch(offer_digest):
        raise UsageError(f"offer digest {offer_digest[:80]!r} is not a sha256")
    try:
        inst = inst_mod.load(store, name)
    except NotFound:
        return Status(False, f"no instance {name} here")
    if inst.mac != want:
        return Status(False, f"instance {name} here has MAC {inst.mac}")
    try:
        got = read_record(store.instance_dir(name) / Arrival.FILE, Arrival)
    except FileNotFoundError:
        return Status(False, f"instance {name} here was not made by a migration")
    if got.offer_digest != offer_digest:
        return Status(False, f"instance {name} here was made by another migration")
    return Status(True, "")
