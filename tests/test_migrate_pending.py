"""The window between a host's confirmation and the VM's removal on the sender (issue 14),
without root: the pending record refuses a boot, the host's ``migrate-in status`` answer,
the receiver's digest of an offer sent whole, and what the sender does when its push fails
after the record was written (the host asked; its answer decides). The real kill between
confirmation and removal: ``tests/test_migrate_real.py::test_killed_after_the_hosts_confirmation``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from unionimg.boot import control
from unionimg.errors import Conflict, ToolFailed, UnionimgError, UsageError
from unionimg.migrate import pending, receive, send
from unionimg.store.layout import Store, write_record
from unionimg.store.migrate_records import PROTOCOL, MigrateOffer, TreeEntry
from unionimg.store.records import Instance

MAC = "52:54:00:14:0a:01"
DIGEST = "ab" * 32


def instance(name: str = "web", mac: str = MAC) -> Instance:
    return Instance(name, "tiny", 1, mac, "uml", 64 << 20, 96, 1, "2026-01-01T00:00:00Z")


def make(store: Store, inst: Instance, arrival: str | None = None) -> None:
    d = store.instance_dir(inst.name)
    d.mkdir(parents=True)
    write_record(d / Instance.FILE, inst)
    if arrival is not None:
        write_record(d / pending.Arrival.FILE, pending.arrival(arrival, "/sender"))


def record(host: str = "h1") -> pending.Pending:
    return pending.Pending(host, DIGEST, MAC, "cd" * 32, "2026-01-01T00:00:00Z")


def test_the_boot_check_reads_the_senders_record_by_its_name(tmp_path: Path) -> None:
    assert control.PENDING_MIGRATION == pending.Pending.FILE
    store = Store(tmp_path / "st")
    make(store, instance())
    control.refuse_pending_migration(store, "web")  # no record: boots
    pending.write(store, "web", record())
    with pytest.raises(Conflict) as exc:
        control.refuse_pending_migration(store, "web")
    msg = exc.value.message
    assert "does not boot here" in msg and "'unionimg migrate web --to h1' again" in msg
    assert "\n" not in msg and exc.value.exit_code == 4
    assert pending.read(store, "web") == record()
    pending.clear(store, "web")
    control.refuse_pending_migration(store, "web")
    assert pending.read(store, "web") is None


def test_status_holds_only_that_very_vm(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    assert not pending.status(store, "web", MAC, DIGEST).holds  # no such instance
    make(store, instance("web"), arrival=DIGEST)
    make(store, instance("db", "52:54:00:14:0a:02"))  # made here, not migrated
    assert pending.status(store, "web", MAC.upper(), DIGEST) == pending.Status(True, "")
    other = pending.status(store, "web", MAC, "ef" * 32)
    assert not other.holds and "another migration" in other.why
    assert "MAC" in pending.status(store, "web", "52:54:00:14:0a:09", DIGEST).why
    assert "not made by a migration" in pending.status(store, "db", "52:54:00:14:0a:02", DIGEST).why
    for bad in (("../x", MAC, DIGEST), ("web", "nomac", DIGEST), ("web", MAC, "xyz")):
        with pytest.raises(UsageError):
            pending.status(store, *bad)


def test_the_receiver_names_an_offer_sent_whole_as_the_sender_does() -> None:
    entries = (
        TreeEntry("upper", "dir", 0o755, 0, 0, 1),
        TreeEntry("upper/ä b", "file", 0o644, 0, 0, 5, 3, "ab" * 32, xattrs=(("user.x", "00"),)),
    )
    offer = MigrateOffer(PROTOCOL, instance(), (), entries, sender="/st", bases=("cd" * 32,))
    header = json.loads(json.dumps(offer.to_json()))  # what the frame header decodes to
    assert receive._text_digest(header) == send.offer_digest(offer)


def test_tree_digest_sees_any_change() -> None:
    a = [TreeEntry("upper", "dir", 0o755, 0, 0, 1), TreeEntry("upper/f", "file", 0o644, 0, 0, 5)]
    same = [e.replace() for e in a]
    assert pending.tree_digest(a) == pending.tree_digest(same)
    assert pending.tree_digest(a) != pending.tree_digest([a[0], a[1].replace(mtime_ns=6)])
    assert pending.tree_digest(a) != pending.tree_digest(a[:1])


class FakeHost:
    name = "h1"

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[list[str]] = []

    def run(self, args: list[str], *, what: str = "") -> str:
        self.asked.append(args)
        if isinstance(self.answer, UnionimgError):
            raise self.answer
        return json.dumps(self.answer)


def test_a_failed_push_asks_the_host(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    inst = instance()
    make(store, inst)
    cut = ToolFailed("host h1: the link broke")

    # the host made it all the same: the caller finishes; the record stays until removal
    pending.write(store, "web", record())
    host: Any = FakeHost({"holds": True, "why": ""})
    send._after_failed_push(store, inst, host, DIGEST, cut)
    assert host.asked == [["migrate-in", "status", "web", MAC, DIGEST]]
    assert pending.read(store, "web") is not None

    # it did not: the record goes (the VM boots here again), the push's error stands
    host = FakeHost({"holds": False, "why": "no instance web here"})
    with pytest.raises(ToolFailed) as exc:
        send._after_failed_push(store, inst, host, DIGEST, cut)
    assert exc.value is cut and pending.read(store, "web") is None

    # it cannot be asked: the record stays, the error says to run the migration again
    pending.write(store, "web", record())
    host = FakeHost(ToolFailed("host h1: ssh: connect timed out"))
    with pytest.raises(ToolFailed) as exc:
        send._after_failed_push(store, inst, host, DIGEST, cut)
    msg = exc.value.message
    assert msg.startswith("host h1: the link broke; whether host h1 made instance web")
    assert "'unionimg migrate web --to h1' again" in msg and "\n" not in msg
    assert pending.read(store, "web") is not None

    # an answer that is not one
    host = FakeHost(["no"])
    with pytest.raises(ToolFailed, match="gave no answer"):
        send.ask_status(host, "web", MAC, DIGEST)
