"""``recover VM --on HOST`` after a re-plan (issue 15): which server failed, what the plan said
and the servers file the next re-plan starts from, on the placement record alone (pure: no
hosts; tests/test_placement_real.py makes the VMs on namespace hosts)."""

from __future__ import annotations

import tomllib

import pytest

from unionimg.errors import NotFound, UsageError
from unionimg.placement.apply import recovery_step
from unionimg.placement.fromstore import Pending, pending_of
from unionimg.store.placement_records import PlacedHost, PlacementApplied, PlannedRecovery

SERVERS = """\
server = [
  { name = "h1", disk = "1G", cpu = 4, memory = "1G", runs = ["web", "db"] },
  { name = "h2", disk = "1G", cpu = 4, memory = "1G", runs = ["dns"] },
  { name = "h3", disk = "1G", cpu = 4, memory = "1G" },
]
"""


def _record(
    servers: str, recovery: list[tuple[str, str, str, int]], recovered: tuple[str, ...] = ()
) -> PlacementApplied:
    names = [s["name"] for s in tomllib.loads(servers)["server"]]
    return PlacementApplied(
        system="lab1",
        registry="http://reg:5000",
        created="2026-01-01T00:00:00Z",
        method="exact",
        status="optimal",
        worst=0,
        total=0,
        servers=servers,
        hosts=tuple(PlacedHost(n, ()) for n in names),
        recovery=tuple(PlannedRecovery(f, v, t, b) for f, v, t, b in recovery),
        recovered=recovered,
    )


def _runs(text: str) -> dict[str, str]:
    doc = tomllib.loads(text)
    return {v: s["name"] for s in doc["server"] for v in s["runs"]}


# the first placement: h1's web to h3, its db to h2 (5 bytes sent); h2's dns to h3
FIRST = _record(SERVERS, [("h1", "web", "h3", 0), ("h1", "db", "h2", 5), ("h2", "dns", "h3", 0)])


def _after_web() -> PlacementApplied:
    """The record after 'recover web --on h3' re-planned: h1 gone, db pending on h2."""
    step = recovery_step(FIRST, "web", "h3")
    return _record(
        step.servers_after,
        [("h2", "db", "h3", 0), ("h2", "dns", "h3", 0), ("h3", "web", "h2", 0)],
        ("web@h3",),
    )


def test_first_recovery_leaves_the_others_pending() -> None:
    step = recovery_step(FIRST, "web", "h3")
    assert (step.failed, step.planned_target, step.planned_bytes) == ("h1", "h3", 0)
    assert not step.was_pending
    doc = tomllib.loads(step.servers_after)
    assert [s["name"] for s in doc["server"]] == ["h2", "h3"]
    assert _runs(step.servers_after) == {"web": "h3", "db": "h2", "dns": "h2"}
    assert pending_of(doc) == {"db": Pending("db", "h1", "h2", 5)}


@pytest.mark.parametrize("host", ["h2", "h3"])
def test_pending_vm_recovers_from_its_failed_server(host: str) -> None:
    """db, pending after web's re-plan, recovers from h1 on its planned target h2 or on h3;
    the healthy h2 stays in the cluster and nothing is pending afterwards."""
    rec = _after_web()
    step = recovery_step(rec, "db", host)
    assert step.was_pending
    assert (step.failed, step.planned_target, step.planned_bytes) == ("h1", "h2", 5)
    doc = tomllib.loads(step.servers_after)
    assert [s["name"] for s in doc["server"]] == ["h2", "h3"]
    assert _runs(step.servers_after) == {"web": "h3", "db": host, "dns": "h2"}
    assert pending_of(doc) == {}


def test_a_second_failure_moves_a_pending_vm_on() -> None:
    """h2 fails while db (of h1) is still pending there: dns recovers on h3, db stays
    pending — from h1, now on the target this plan gives it when h2 fails."""
    step = recovery_step(_after_web(), "dns", "h3")
    assert (step.failed, step.planned_target) == ("h2", "h3")
    doc = tomllib.loads(step.servers_after)
    assert [s["name"] for s in doc["server"]] == ["h3"]
    assert pending_of(doc) == {"db": Pending("db", "h1", "h3", 0)}
    assert _runs(step.servers_after) == {"web": "h3", "db": "h3", "dns": "h3"}


def test_recovery_refused_in_one_line() -> None:
    rec = _after_web()
    with pytest.raises(UsageError, match="already recovered on h3"):
        recovery_step(rec, "web", "h3")
    with pytest.raises(UsageError, match="ran on h2"):
        recovery_step(rec, "dns", "h2")
    with pytest.raises(NotFound, match="host h1 is not a server"):
        recovery_step(rec, "db", "h1")
    with pytest.raises(NotFound, match="VM ghost"):
        recovery_step(rec, "ghost", "h2")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{ vm = "db", failed = "h1", target = "h2" }', "bytes"),
        ('{ vm = "db", failed = "h1", target = "h2", bytes = -1 }', "whole number"),
        ('{ vm = "db", failed = "", target = "h2", bytes = 0 }', "names"),
    ],
)
def test_bad_pending_entry_refused(row: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        pending_of(tomllib.loads(SERVERS + f"pending = [{row}]\n"))
