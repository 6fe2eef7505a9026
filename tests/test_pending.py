"""Pending conflicts stay visible, policy ``fail`` holds a VM with conflicts ``resolve`` can
settle, ``reconcile --undo`` says what changed, and ``base gc`` never breaks an undo.

Real store, real ext4 images, overlay mounts and Mercurial (the scenario of
:mod:`tests.scenario`); the last test does it on the Debian fixture and boots the VM."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, need
from tests.scenario import TEXT, build, edit, upper_state

pytestmark = pytest.mark.usefixtures("root")


def show(cli: Cli, vm: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli.ok("instance", "show", vm, "--json").output)
    return data


def conflicts(cli: Cli, vm: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(cli.ok("conflicts", vm, "--json").output)
    return rows


def read_in(cli: Cli, vm: str, tmp: Path, rel: str) -> bytes:
    mnt = tmp / f"look-{vm}"
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        return (mnt / rel).read_bytes()
    finally:
        cli.ok("umount", str(mnt))


# -- item 8: pending conflicts are visible -----------------------------------------------------
def test_pending_count_in_list_show_and_reconcile(cli: Cli, tmp_path: Path) -> None:
    build(cli, tmp_path)
    assert show(cli, "vm1")["pending_conflicts"] == 0
    assert "pending" not in cli.ok("instance", "list").output
    res = cli("reconcile", "vm1")
    assert res.exit_code == 1
    n = len(conflicts(cli, "vm1"))
    assert n >= 5
    # the first run names its own conflicts, none is "still pending" yet
    assert f"{n} conflict(s)" in res.output and "still pending" not in res.output
    assert show(cli, "vm1")["pending_conflicts"] == n
    rows = json.loads(cli.ok("instance", "list", "--json").output)
    assert [(r["name"], r["pending_conflicts"]) for r in rows] == [("vm1", n)]
    line = cli.ok("instance", "list").output.strip()
    assert line.endswith(f"\t{n} conflict(s) pending"), line
    assert f"pending_conflicts: {n}" in cli.ok("instance", "show", "vm1").output
    # the reconcile that has nothing to do still says so
    again = cli("reconcile", "vm1")
    assert again.exit_code == 1
    assert again.output.strip() == (
        f"vm1: generation 2, nothing to do; {n} conflict(s) still pending "
        "(see 'unionimg conflicts vm1')"
    )
    # boot warns before anything else (xen only renders here: the boot itself is refused)
    res = cli("boot", "vm1", "--hypervisor", "xen")
    assert res.exit_code != 0 and res.stderr.splitlines()[0] == (
        f"unionimg: warning: vm1 has {n} reconcile conflict(s) still pending; it boots with "
        "its own version of those paths (list them: unionimg conflicts vm1)"
    ), res.stderr
    res = cli("switch", "vm1", "--to", "xen", "--boot")
    assert res.stderr.startswith(f"unionimg: warning: vm1 has {n} reconcile"), res.stderr
    # one resolved: one fewer everywhere
    cli.ok("resolve", "vm1", "/c09/file", "--take", "local")
    assert show(cli, "vm1")["pending_conflicts"] == n - 1
    assert f"{n - 1} conflict(s) still pending" in cli("reconcile", "vm1").output


def test_reconcile_that_changes_counts_new_and_pending_apart(cli: Cli, tmp_path: Path) -> None:
    build(cli, tmp_path)
    assert cli("reconcile", "vm1").exit_code == 1
    n = len(conflicts(cli, "vm1"))
    patch = tmp_path / "patch"
    (patch / "c02").mkdir(parents=True)
    (patch / "c02/file").write_text("case 2 changed by the base too\n")
    cli.ok("base", "update", "os", "--apply-dir", str(patch))
    res = cli("reconcile", "vm1")
    assert res.exit_code == 1
    first = res.output.splitlines()[0]
    assert first == (
        f"vm1: generation 2 -> 3: change 0 path(s), 1 conflict(s); {n} conflict(s) still "
        "pending (see 'unionimg conflicts vm1')"
    ), res.output
    assert res.output.splitlines()[1].startswith("  conflict /c02/file: ")
    assert len(res.output.splitlines()) == 2  # the pending ones are counted, not relisted
    assert show(cli, "vm1")["pending_conflicts"] == n + 1


def test_policy_fail_holds_conflicts_resolve_settles(cli: Cli, tmp_path: Path) -> None:
    build(cli, tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "".join(
            f'[[rule]]\nglob = "{g}"\naction = "fail"\n\n' for g in ("/c06/*", "/c07/*", "/c09/*")
        )
    )
    before = upper_state(cli.store, "vm1")
    res = cli("reconcile", "vm1", "--policy", str(policy), "--json")
    assert res.exit_code == 10
    report = json.loads(res.output)["instances"][0]
    assert report["status"] == "error" and "stays on generation 1" in report["error"]
    assert show(cli, "vm1")["generation"] == 1
    assert upper_state(cli.store, "vm1") == before  # held whole on B0
    held = {c["path"]: c for c in conflicts(cli, "vm1")}
    assert set(held) == {"/c06/text", "/c07/data.bin", "/c09/file"}
    assert all(c["held"] is True and c["generation"] == 2 for c in held.values())
    assert held["/c06/text"]["files"] == ["base-new", "base-old", "local", "merged"]
    assert held["/c07/data.bin"]["files"] == ["base-new", "base-old", "local"]  # binary
    aside = Path(held["/c06/text"]["dir"])
    assert (aside / "local").read_text() == edit(TEXT, 5, "line 05 as the VM wants it")
    assert (aside / "base-new").read_text() == edit(TEXT, 5, "line 05 as the base wants it")
    assert b"<<<<<<< local" in (aside / "merged").read_bytes()
    assert show(cli, "vm1")["pending_conflicts"] == 3
    # a second failing run records them again, not twice
    assert cli("reconcile", "vm1", "--policy", str(policy)).exit_code == 10
    assert sorted(c["path"] for c in conflicts(cli, "vm1")) == sorted(held)

    mine = tmp_path / "mine.txt"
    mine.write_text("settled by hand\n")
    out = cli.ok("resolve", "vm1", "/c06/text", "--file", str(mine)).output
    assert "applied by 'unionimg reconcile vm1 --to-generation 2'" in out
    cli.ok("resolve", "vm1", "/c07/data.bin", "--take", "base")
    cli.ok("resolve", "vm1", "/c09/file", "--take", "local")
    assert conflicts(cli, "vm1") == []
    assert show(cli, "vm1")["generation"] == 1  # nothing moves before the reconcile

    # the same failing policy now passes: the resolutions decide the three paths
    res = cli("reconcile", "vm1", "--policy", str(policy), "--json")
    assert res.exit_code == 1, res.output  # the scenario's other conflicts
    report = json.loads(res.output)["instances"][0]
    assert report["status"] == "conflicts" and report["applied"] is True
    assert show(cli, "vm1")["generation"] == 2
    left = {c["path"] for c in conflicts(cli, "vm1")}
    assert not left & set(held) and not any(c.get("held") for c in conflicts(cli, "vm1"))
    assert not (cli.store / "instances/vm1/held-resolutions.json").exists()
    assert read_in(cli, "vm1", tmp_path, "c06/text") == b"settled by hand\n"
    assert read_in(cli, "vm1", tmp_path, "c07/data.bin") == b"\x00\x01binary-v2-base\x00"
    assert read_in(cli, "vm1", tmp_path, "c09/file") == b"case 9 local edit\n"
    reasons = {a["path"]: a["reason"] for a in report["actions"]}
    assert "by rule 0 (/c07/data.bin): resolved, took base" in reasons["/c07/data.bin"]


def test_policy_fail_held_conflicts_drop_once_reconciled_past(cli: Cli, tmp_path: Path) -> None:
    build(cli, tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nglob = "/c09/*"\naction = "fail"\n')
    assert cli("reconcile", "vm1", "--policy", str(policy)).exit_code == 10
    assert [c["path"] for c in conflicts(cli, "vm1")] == ["/c09/file"]
    assert cli("reconcile", "vm1").exit_code == 1  # the default policy: no longer held
    assert not any(c.get("held") for c in conflicts(cli, "vm1"))


def test_undo_refusal_names_what_changed(cli: Cli, tmp_path: Path) -> None:
    build(cli, tmp_path)
    assert cli("reconcile", "vm1").exit_code == 1
    mnt = tmp_path / "m"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        for i in range(4):
            (mnt / f"etc-new-{i}").write_text("after the reconcile\n")
        (mnt / "\x1b[31mred").write_text("a guest's name: shown escaped\n")
    finally:
        cli.ok("umount", str(mnt))
    state = upper_state(cli.store, "vm1")
    res = cli.fails("reconcile", "--undo", "vm1", code=4)  # one line (no ESC reaches it)
    named = "(/\\e[31mred, /etc-new-0, /etc-new-1 and 2 more)"
    assert f"changed since its reconcile {named}" in res.output, res.output
    assert "\x1b" not in res.output
    cli.ok("commit", "vm1", "-m", "kept")  # committed: still named (since the reconcile)
    res = cli.fails("reconcile", "--undo", "vm1", code=4)
    assert named in res.output, res.output
    assert upper_state(cli.store, "vm1") == state and show(cli, "vm1")["generation"] == 2


# -- item 9: gc never breaks undo --------------------------------------------------------------
def test_gc_keeps_the_undo_generation_and_undo_refuses_when_gone(cli: Cli, tmp_path: Path) -> None:
    build(cli, tmp_path)  # os 1 and 2, vm1 on 1
    assert cli("reconcile", "vm1").exit_code == 1  # vm1 on 2; undo returns to 1
    patch = tmp_path / "patch"
    patch.mkdir()
    for i in (3, 4):
        (patch / "g").write_text(f"{i}\n")
        # --full: whole images, so generation 3 is needed by nothing (a delta 4 would lie
        # on it; gc keeping that is tested in test_generation_layers.py)
        cli.ok("base", "update", "os", "--apply-dir", str(patch), "--full")

    def numbers() -> list[int]:
        return [
            g["number"]
            for g in json.loads(cli.ok("base", "show", "os", "--json").output)["generations"]
        ]

    dry = json.loads(cli.ok("base", "gc", "--dry-run", "--json").output)
    assert dry["dry_run"] is True
    assert dry["would_remove"] == [{"base": "os", "generation": 3}]
    why = {k["generation"]: k["why"] for k in dry["keep"]}
    assert why == {
        1: "'reconcile --undo vm1' returns to it",
        2: "used by instance(s) vm1",
        4: "the latest generation",
    }
    text = cli.ok("base", "gc", "--dry-run").output
    assert "would remove os generation 3\n" in text
    assert "keep os generation 1: 'reconcile --undo vm1' returns to it\n" in text
    assert numbers() == [1, 2, 3, 4]  # a dry run removes nothing

    res = cli.ok("base", "gc", "--json")
    assert json.loads(res.stdout) == [{"base": "os", "generation": 3}]
    assert "kept os generation 1: 'reconcile --undo vm1' returns to it" in res.stderr
    assert numbers() == [1, 2, 4]
    assert cli.ok("base", "gc").output == (
        "kept os generation 1: 'reconcile --undo vm1' returns to it\nnothing to remove\n"
    )

    # a generation lost another way (an older gc, a hand-made removal): undo refuses, with
    # nothing changed, and the undo record stays for when the generation comes back
    state = upper_state(cli.store, "vm1")
    gen1 = cli.store / "bases/os/generations/1"
    aside = tmp_path / "gen1-aside"
    shutil.move(gen1, aside)
    try:
        res = cli.fails("reconcile", "--undo", "vm1", code=3)
        assert "generation 1 it would return to was removed" in res.output
        assert "stays on generation 2" in res.output
        assert show(cli, "vm1")["generation"] == 2
        assert upper_state(cli.store, "vm1") == state
        assert (cli.store / "instances/vm1/last-reconcile.json").is_file()
        # the VM still works on 2 (a reconcile to the latest would make a new undo record)
        assert cli("reconcile", "vm1", "--to-generation", "2").exit_code == 1
    finally:
        shutil.move(aside, gen1)
    cli.ok("reconcile", "--undo", "vm1")
    assert show(cli, "vm1")["generation"] == 1
    # no undo record any more: generation 2 only stays while used
    assert json.loads(cli.ok("base", "gc", "--json").output) == [{"base": "os", "generation": 2}]


# -- the Debian fixture ------------------------------------------------------------------------
@pytest.mark.slow
def test_debian_vm_with_pending_conflict_shows_it_and_boot_warns(cli: Cli, tmp_path: Path) -> None:
    """A real Debian VM: its own /etc/motd edit and the base's overlap; the conflict is
    counted by 'instance show', and 'boot' warns with the count — then boots it."""
    from tests.test_boot_real import cleanup_guest, guest_lines, need_guests

    need_guests()
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build as build_fixture

    cli.ok("base", "create", "deb", "--from-dir", str(build_fixture("debian")))
    cli.ok("instance", "create", "d1", "--base", "deb", "--memory", "768")
    try:
        mnt = tmp_path / "m"
        mnt.mkdir()
        cli.ok("mount", "d1", str(mnt))
        try:
            (mnt / "etc/issue").write_text("Local VM d1 \\n \\l\n")
        finally:
            cli.ok("umount", str(mnt))
        patch = tmp_path / "patch"
        (patch / "etc").mkdir(parents=True)
        (patch / "etc/issue").write_text("Patched base \\n \\l\n")
        cli.ok("base", "update", "deb", "--apply-dir", str(patch))
        res = cli("reconcile", "d1")
        assert res.exit_code == 1, res.output
        assert [c["path"] for c in conflicts(cli, "d1")] == ["/etc/issue"]
        assert show(cli, "d1")["pending_conflicts"] == 1
        assert "1 conflict(s) still pending" in cli("reconcile", "d1").output
        res = cli.ok("boot", "d1", "--append", "unionimg.selftest=1", "--wait", "--timeout", "600")
        assert (
            "unionimg: warning: d1 has 1 reconcile conflict(s) still pending; it boots with "
            "its own version of those paths (list them: unionimg conflicts d1)"
        ) in res.stderr.splitlines(), res.stderr
        assert any(ln.startswith("unionimg-guest: boot ") for ln in guest_lines(cli, "d1"))
    finally:
        cleanup_guest(cli, "d1")


def test_held_resolution_decides_exactly_its_path() -> None:
    """A resolution becomes a rule for its literal path: a guest's file name holding glob
    characters never widens it to other paths; another generation's resolution is unused."""
    from unionimg.reconcile.apply import with_held
    from unionimg.reconcile.policy import Policy
    from unionimg.store.reconcile_records import HeldResolution

    odd = "/etc/*[x]?\\**"
    held = [HeldResolution(odd, "keep-local", 3, "local", "now")]
    policy = with_held(Policy(), held, 3)
    assert policy.action_for(odd) == "keep-local"
    for other in ("/etc/ab", "/etc/x", "/etc/*[x]?", "/etc/a/b", "/etc/*[x]?\\**/y"):
        assert policy.action_for(other) == "merge", other
    assert with_held(Policy(), held, 4) == Policy()
