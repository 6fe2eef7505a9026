"""Opaque directories a VM made where B0 had nothing (issue 12, item 6): pure planner tests.

overlayfs marks a directory made inside a merged one opaque; once B1 adds that directory,
the marker would hide B1's entries below it for good. The planner makes such a directory
transparent (``set-meta`` with ``opaque`` false); one made over a B0 directory (``rm -rf``
and ``mkdir``) stays opaque and its hidden base changes are reported (case 16).
"""

from __future__ import annotations

from tests.test_plan import Run, Tree, base, run
from unionimg.reconcile.plan import SET_META, Action

APP = b"app: vm\n"


def act(r: Run, path: str) -> Action:
    """The action of ``path`` that is no case-16 report (the set-meta is case 16 too)."""
    found = [a for a in r.plan.actions if a.path == path and a.action != "report"]
    assert len(found) == 1, (path, r.plan.actions)
    return found[0]


def vm_opt(*, opaque: bool = True) -> Tree:
    """U: the VM's own /opt/x (opaque, as overlayfs makes it) with its file."""
    return Tree(upper=True).dir("/opt").dir("/opt/x", opaque=opaque).file("/opt/x/mine", APP)


def test_vm_dir_over_nothing_made_transparent_when_b1_adds_it() -> None:
    b0 = base().dir("/opt")
    b1 = b0.copy().dir("/opt/x").file("/opt/x/y", b"base\n")
    r = run(vm_opt(), b0, b1)
    action = act(r, "/opt/x")
    assert (action.case, action.action) == (16, SET_META)
    assert action.entry is not None and action.entry.opaque is False
    assert "made transparent" in action.reason
    assert r.action("/opt/x/mine").action == "keep"  # the VM's own entry stays
    assert not [a for a in r.plan.actions if a.action == "report"]  # nothing hidden
    assert r.plan.unaffected >= 1  # B1's /opt/x/y shows through
    assert not r.plan.conflicts


def test_name_both_added_is_a_conflict() -> None:
    b0 = base().dir("/opt")
    b1 = b0.copy().dir("/opt/x").file("/opt/x/mine", b"app: base\n")
    r = run(vm_opt(), b0, b1, reads=True)
    assert r.action("/opt/x/mine").action == "conflict"
    assert act(r, "/opt/x").action == SET_META  # still made transparent


def test_same_name_same_content_is_dropped_and_dir_follows() -> None:
    b0 = base().dir("/opt")
    b1 = b0.copy().dir("/opt/x").file("/opt/x/mine", APP)
    r = run(vm_opt(), b0, b1)
    assert r.action("/opt/x/mine").action == "drop"
    assert act(r, "/opt/x").action == "drop"  # emptied: B1's directory shows


def test_opaque_over_a_b0_directory_stays_and_is_reported() -> None:
    """rm -rf /opt/x and mkdir again: the marker hides B0's entries the VM deleted."""
    b0 = base().dir("/opt").dir("/opt/x").file("/opt/x/old", b"old\n")
    b1 = b0.copy().file("/opt/x/y", b"base\n")
    r = run(vm_opt(), b0, b1)
    reports = [a for a in r.plan.actions if a.case == 16 and a.action == "report"]
    assert [a.path for a in reports] == ["/opt/x"]
    assert reports[0].paths == ("/opt/x/y",) and "hides 1 paths" in reports[0].reason
    assert act(r, "/opt/x").action == "keep"


def test_opaque_dir_b1_does_not_add_is_left_alone() -> None:
    b0 = base().dir("/opt")
    b1 = b0.copy().file("/etc/motd", b"new\n")
    r = run(vm_opt(), b0, b1)
    assert act(r, "/opt/x").action == "keep"


def test_non_opaque_vm_dir_needs_nothing() -> None:
    b0 = base().dir("/opt")
    b1 = b0.copy().dir("/opt/x").file("/opt/x/y", b"base\n")
    r = run(vm_opt(opaque=False), b0, b1)
    assert act(r, "/opt/x").action in ("keep", "drop")
    assert act(r, "/opt/x").action != SET_META


def test_b1_adds_a_file_where_the_vm_made_a_dir_is_a_type_conflict() -> None:
    b0 = base().dir("/opt")
    b1 = b0.copy().file("/opt/x", b"file\n")
    r = run(vm_opt(), b0, b1)
    assert (act(r, "/opt/x").case, act(r, "/opt/x").action) == (15, "conflict")


def test_transparent_dir_whose_metadata_conflicts_reports_what_stays_hidden() -> None:
    b0 = base().dir("/opt")
    b1 = b0.copy().dir("/opt/x", mode=0o700).file("/opt/x/y", b"base\n")
    r = run(vm_opt(), b0, b1)  # the VM's 0755 against B1's 0700, no ancestor
    assert act(r, "/opt/x").action == "conflict"
    reports = [a for a in r.plan.actions if a.case == 16 and a.action == "report"]
    assert reports and reports[0].paths == ("/opt/x/y",)
