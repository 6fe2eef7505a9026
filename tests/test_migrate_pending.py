"""The window between a host's confirmation and the VM's removal on the sender (issue 14),
without root: the pending record refuses a boot, the host's ``migrate-in status`` answer,
the receiver's digest of an offer sent whole, and what the sender does when its push fails
after the record was written (the host asked; its answer decides). The real kill between
confirmation and removal: ``tests/test_migrate_real.py::test_killed_after_the_hosts_confirmation``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from unionimg import hosts as hosts_mod
from unionimg import ops
from unionimg.errors import Conflict, ToolFailed, UnionimgError, UsageError
from unionimg.layers import instance as inst_mod
from unionimg.layers import union
from unionimg.migrate import index, pending, receive, send, tree
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
    assert inst_mod.PENDING_MIGRATION == pending.Pending.FILE
    store = Store(tmp_path / "st")
    make(store, instance())
    inst_mod.refuse_pending_migration(store, "web", "boot")  # no record: boots
    pending.write(store, "web", record())
    with pytest.raises(Conflict) as exc:
        inst_mod.refuse_pending_migration(store, "web", "boot")
    msg = exc.value.message
    assert "does not boot here" in msg and "'unionimg migrate web --to h1' again" in msg
    assert "\n" not in msg and exc.value.exit_code == 4
    assert pending.read(store, "web") == record()
    pending.clear(store, "web")
    inst_mod.refuse_pending_migration(store, "web", "boot")
    assert pending.read(store, "web") is None


def test_mount_is_refused_too_while_the_record_is_there(tmp_path: Path) -> None:
    store = Store(tmp_path / "st")
    make(store, instance())
    pending.write(store, "web", record())
    with pytest.raises(Conflict) as exc:
        union.mount(store, "web", tmp_path / "mnt")
    assert "does not mount read-write here" in exc.value.message
    assert "--to h1" in exc.value.message and "\n" not in exc.value.message
    assert not (tmp_path / "mnt").exists()
    # a read-only look is not refused for that reason (here: no such directory to mount on)
    with pytest.raises(UnionimgError) as other:
        union.mount(store, "web", tmp_path / "mnt", readonly=True)
    assert "migrat" not in other.value.message


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


class Sender:
    """A sender's store holding VM web (its U a plain directory standing for the mounted
    image), its host h1 a :class:`FakeHost`, and the VM's removal recorded instead of run."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, answer: Any) -> None:
        self.store = Store(tmp / "st")
        make(self.store, instance())
        self.u = tmp / "u"
        (self.u / "upper" / "srv").mkdir(parents=True)
        self.data = os.urandom(5000)
        (self.u / "upper" / "srv" / "k.bin").write_bytes(self.data)
        self.host = FakeHost(answer)
        self.removed: list[str] = []

        @contextlib.contextmanager
        def u_layer(_store: Store, _name: str, *, write: bool) -> Iterator[Path]:
            assert not write
            yield self.u

        def remove(_store: Store, name: str) -> None:
            assert pending.read(self.store, name) is not None  # the record goes with the VM
            self.removed.append(name)

        monkeypatch.setattr(inst_mod, "u_layer", u_layer)
        monkeypatch.setattr(hosts_mod, "get", lambda _s, _n: self.host)
        monkeypatch.setattr(ops, "remove_instance", remove)
        monkeypatch.setattr(send, "running_on", lambda _s, _n: None)
        entries = tuple(tree.scan(self.u, skip_top=send.SKIP_TOP))
        pending.write(self.store, "web", record().replace(u_digest=pending.tree_digest(entries)))

    def kept(self) -> bool:
        return index.has_object(self.store, hashlib.sha256(self.data).hexdigest())


def test_a_rerun_finishes_when_the_host_holds_that_very_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Sender(tmp_path, monkeypatch, {"holds": True, "why": ""})
    dry = send.migrate(s.store, "web", "h1", dry_run=True)
    assert dry.finished_earlier and dry.dry_run and not s.removed and not s.kept()
    out = send.migrate(s.store, "web", "h1")
    assert s.host.asked[-1] == ["migrate-in", "status", "web", MAC, DIGEST]
    assert out.finished_earlier and out.wire_bytes == 0 and out.done is None
    assert s.removed == ["web"] and s.kept() and out.kept == 1
    assert out.to_json()["plan"]["by_reason"] == {"vm": {"contents": 1, "bytes": 5000}}


def test_a_rerun_removes_nothing_when_the_vm_changed_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Sender(tmp_path, monkeypatch, {"holds": True, "why": ""})
    (s.u / "upper" / "srv" / "new").write_text("written after the kill\n")
    with pytest.raises(Conflict) as exc:
        send.migrate(s.store, "web", "h1")
    assert "changed here" in exc.value.message and "nothing was removed" in exc.value.message
    assert not s.removed and pending.read(s.store, "web") is not None


def test_a_rerun_to_another_host_while_the_first_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Sender(tmp_path, monkeypatch, {"holds": True, "why": ""})
    other = FakeHost({"holds": False})
    other.name = "h2"
    monkeypatch.setattr(hosts_mod, "get", lambda _s, n: s.host if n == "h1" else other)
    with pytest.raises(Conflict, match=r"on host h1 already.*--to h1"):
        send.migrate(s.store, "web", "h2")
    assert not s.removed and pending.read(s.store, "web") is not None


def test_a_rerun_the_host_does_not_hold_drops_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Sender(tmp_path, monkeypatch, {"holds": False, "why": "no instance web here"})
    seen: list[bool] = []

    def proceed(*_a: Any, **_k: Any) -> send.Outcome:
        seen.append(pending.read(s.store, "web") is None)
        raise ToolFailed("host h1: the offer stage (stands for the normal migration)")

    monkeypatch.setattr(send, "_migrate", proceed)
    with pytest.raises(ToolFailed, match="offer stage"):
        send.migrate(s.store, "web", "h1", dry_run=True)
    assert seen == [False]  # a dry run keeps the record
    with pytest.raises(ToolFailed, match="offer stage"):
        send.migrate(s.store, "web", "h1")
    assert seen == [False, True] and not s.removed and not s.kept()
