"""Reconcile through the CLI on real images, overlay mounts and hg: every case of the table."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Cli, need_root
from tests.scenario import SPACE_NAME, TEXT, build, edit
from unionimg.fs.mounts import mountinfo, unmount_tree

HG = str(REPO / ".venv" / "bin" / "hg")


@dataclass
class Applied:
    cli: Cli
    dry: dict[str, Any]
    report: dict[str, Any]
    code: int
    union: Path  # the instance's union after reconcile, mounted read-only
    upper: Path  # its upper directory (the U image mounted under the store's run dir)

    def action(self, path: str) -> dict[str, Any] | None:
        acts = [a for a in self.report["actions"] if a["path"] == path]
        return acts[0] if acts else None


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Applied]:
    need_root()
    tmp = tmp_path_factory.mktemp("reconcile")
    cli = Cli(tmp / "store")
    build(cli, tmp)
    res = cli("reconcile", "vm1", "--dry-run", "--json")
    dry = json.loads(res.output)
    res = cli("reconcile", "vm1", "--json")
    report = json.loads(res.output)
    union = tmp / "after"
    union.mkdir()
    cli.ok("mount", "vm1", str(union), "--readonly")
    try:
        yield Applied(
            cli,
            dry,
            report["instances"][0],
            res.exit_code,
            union,
            cli.store / "run" / "vm1" / "u" / "upper",
        )
    finally:
        cli("umount", str(union))
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


def test_exit_code_and_report_shape(applied: Applied) -> None:
    r = applied.report
    assert applied.code == 1  # conflicts pending
    assert r["status"] == "conflicts" and r["error"] is None
    assert (r["from_generation"], r["to_generation"]) == (1, 2)
    assert all({"path", "case", "action"} <= set(a) for a in r["actions"])
    assert all(a["path"].startswith("/") for a in r["actions"])


def test_dry_run_prints_the_plan_apply_executed(applied: Applied) -> None:
    dry = applied.dry["instances"][0]
    assert applied.dry["dry_run"] is True and dry["applied"] is False
    strip = [{k: a[k] for k in ("path", "case", "action")} for a in dry["actions"]]
    done = [{k: a[k] for k in ("path", "case", "action")} for a in applied.report["actions"]]
    assert strip == done
    assert dry["conflicts"] == applied.report["conflicts"]


def test_generation_advanced_and_history_names_b1(applied: Applied) -> None:
    show = json.loads(applied.cli.ok("instance", "show", "vm1", "--json").output)
    assert show["generation"] == 2
    log = json.loads(applied.cli.ok("log", "vm1", "--json").output)
    msgs = [c["message"] for c in log]
    assert msgs[0].startswith("reconcile vm1: base os generation 1 -> 2")
    assert msgs[1].startswith("local state of vm1 before reconcile")


def test_history_holds_the_whole_result(applied: Applied) -> None:
    """The post-reconcile commit looks only at the paths the plan touched: nothing else may
    be left uncommitted, and the committed sidecar is that of the upper layer as it is."""
    from unionimg.entries import sidecar_text
    from unionimg.fs.manifest import scan_tree

    u = applied.upper.parent
    status = subprocess.run(
        [HG, "-R", str(u), "--cwd", str(u), "status", "-amrd"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout == ""
    committed = subprocess.run(
        [HG, "-R", str(u), "--cwd", str(u), "cat", "-r", "tip", ".unionimg/manifest.jsonl"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert committed == sidecar_text(scan_tree(applied.upper, hash_files=False))


def test_case_01_base_change_not_in_u(applied: Applied) -> None:
    assert (applied.union / "c01/file").read_text() == "case 1 patched by the base\n"
    assert not (applied.upper / "c01").exists()
    assert (applied.union / "new/nested/deep/file").read_text().startswith("case 1")
    assert applied.action("/c01/file") is None and applied.report["unaffected"] >= 2


def test_case_02_only_u_changed(applied: Applied) -> None:
    assert (applied.union / "c02/file").read_text() == "case 2 local edit\n"


def test_case_03_accidental_copy_up_dropped(applied: Applied) -> None:
    a = applied.action("/c03/file")
    assert a is not None and (a["case"], a["action"]) == (3, "drop")
    assert not (applied.upper / "c03/file").exists()
    assert (applied.union / "c03/file").read_text() == "case 3 patched by the base\n"


def test_case_04_same_change_dropped(applied: Applied) -> None:
    a = applied.action("/c04/file")
    assert a is not None and (a["case"], a["action"]) == (4, "drop")
    assert not (applied.upper / "c04/file").exists()


def test_case_05_clean_line_merge(applied: Applied) -> None:
    path = f"/c05/{SPACE_NAME}"
    a = applied.action(path)
    assert a is not None and (a["case"], a["action"]) == (5, "write")
    want = edit(edit(TEXT, 3, "line 03 edited by the VM"), 25, "line 25 patched by the base")
    assert (applied.union / path[1:]).read_text() == want


def test_case_06_overlap_conflict_kept_aside(applied: Applied) -> None:
    a = applied.action("/c06/text")
    assert a is not None and (a["case"], a["action"]) == (6, "conflict")
    live = (applied.union / "c06/text").read_text()
    assert live == edit(TEXT, 5, "line 05 as the VM wants it")
    assert "<<<<<<<" not in live
    conflicts = json.loads(applied.cli.ok("conflicts", "vm1", "--json").output)
    c = next(c for c in conflicts if c["path"] == "/c06/text")
    aside = Path(c["dir"])
    assert "<<<<<<<" in (aside / "merged").read_text()
    assert (aside / "base-new").read_text() == edit(TEXT, 5, "line 05 as the base wants it")
    assert (aside / "base-old").read_text() == TEXT


def test_case_07_binary_conflict(applied: Applied) -> None:
    a = applied.action("/c07/data.bin")
    assert a is not None and (a["case"], a["action"]) == (7, "conflict")
    assert (applied.union / "c07/data.bin").read_bytes() == b"\x00\x01binary-v2-local\x00"


def test_case_08_base_deleted_unmodified_copy(applied: Applied) -> None:
    a = applied.action("/c08/file")
    assert a is not None and (a["case"], a["action"]) == (8, "drop")
    assert not (applied.union / "c08/file").exists()


def test_case_09_base_deleted_u_modified(applied: Applied) -> None:
    a = applied.action("/c09/file")
    assert a is not None and (a["case"], a["action"]) == (9, "conflict")
    assert (applied.union / "c09/file").read_text() == "case 9 local edit\n"


def test_case_10_whiteout_kept(applied: Applied) -> None:
    st = os.lstat(applied.upper / "c10/file")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (applied.union / "c10/file").exists()


def test_case_11_whiteout_vs_base_change(applied: Applied) -> None:
    a = applied.action("/c11/file")
    assert a is not None and (a["case"], a["action"]) == (11, "conflict")
    assert not (applied.union / "c11/file").exists()


def test_case_12_u_metadata_base_content(applied: Applied) -> None:
    a = applied.action("/c12/file")
    assert a is not None and (a["case"], a["action"]) == (12, "write")
    p = applied.union / "c12/file"
    assert p.read_text() == "case 12 new base content\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_case_13_metadata_both_sides(applied: Applied) -> None:
    a = applied.action("/c13/file")
    assert a is not None and (a["case"], a["action"]) == (13, "conflict")
    assert stat.S_IMODE((applied.union / "c13/file").stat().st_mode) == 0o600


def test_case_14_symlinks(applied: Applied) -> None:
    assert os.readlink(applied.union / "c14/a") == "target-local"
    a = applied.action("/c14/b")
    assert a is not None and (a["case"], a["action"]) == (14, "conflict")
    assert os.readlink(applied.union / "c14/b") == "target-local"


def test_case_15_type_change_conflict(applied: Applied) -> None:
    a = applied.action("/c15/x")
    assert a is not None and (a["case"], a["action"]) == (15, "conflict")
    assert (applied.union / "c15/x/inside").is_file()


def test_case_16_opaque_dir_hides_additions(applied: Applied) -> None:
    a = applied.action("/c16/dir")
    assert a is not None and (a["case"], a["action"]) == (16, "report")
    assert "/c16/dir/added" in a["reason"]
    assert not (applied.union / "c16/dir/added").exists()
    assert (applied.union / "c16/dir/mine").is_file()


def test_case_17_second_run_is_noop(applied: Applied) -> None:
    applied.cli.ok("umount", str(applied.union))
    try:
        res = applied.cli("reconcile", "vm1", "--json")
    finally:
        applied.cli.ok("mount", "vm1", str(applied.union), "--readonly")
    assert res.exit_code == 1  # the conflicts of the first run are still pending
    again = json.loads(res.output)["instances"][0]
    assert again["from_generation"] == again["to_generation"] == 2
    assert again["actions"] == [] and again["status"] == "conflicts"
    pending = {c["path"] for c in again["conflicts"]}
    assert pending == {c["path"] for c in applied.report["conflicts"]}
    assert all(c["reason"].startswith("pending since generation 2") for c in again["conflicts"])


def test_special_files_reported_and_left(applied: Applied) -> None:
    for path in ("/special/fifo", "/special/null", "/special/a-link"):
        a = applied.action(path)
        assert a is not None and a["action"] == "report", path
    assert stat.S_ISFIFO(os.lstat(applied.upper / "special/fifo").st_mode)
    one = os.lstat(applied.upper / "special/a")
    two = os.lstat(applied.upper / "special/a-link")
    assert (one.st_ino, one.st_nlink) == (two.st_ino, two.st_nlink)


def test_reports_kept_in_store(applied: Applied) -> None:
    reports = sorted((applied.cli.store / "reports").glob("reconcile-*.json"))
    assert len(reports) >= 2
    log = (applied.cli.store / "reports" / "reconcile.log").read_text()
    assert "vm1 1->2 conflicts" in log


# -- one instance per test below ------------------------------------------------------------
@pytest.fixture
def scenario(cli: Cli, tmp_path: Path, root: None) -> Cli:
    build(cli, tmp_path)
    return cli


def test_resolve_each_way_and_history(scenario: Cli, tmp_path: Path) -> None:
    cli = scenario
    assert cli("reconcile", "vm1").exit_code == 1
    conflicts = {c["path"] for c in json.loads(cli.ok("conflicts", "vm1", "--json").output)}
    assert {"/c06/text", "/c07/data.bin", "/c09/file", "/c13/file"} <= conflicts
    mine = tmp_path / "mine.txt"
    mine.write_text("resolved by hand\n")
    cli.ok("resolve", "vm1", "/c06/text", "--file", str(mine))
    cli.ok("resolve", "vm1", "/c07/data.bin", "--take", "base")
    cli.ok("resolve", "vm1", "/c09/file", "--take", "local")
    res = cli.fails("resolve", "vm1", "/c13/file", "--take", "merged")
    assert "no merged file" in res.output
    res = cli.fails("resolve", "vm1", "/nope", "--take", "local")
    assert "no conflict at /nope" in res.output
    left = {c["path"] for c in json.loads(cli.ok("conflicts", "vm1", "--json").output)}
    assert left == conflicts - {"/c06/text", "/c07/data.bin", "/c09/file"}
    mnt = tmp_path / "check"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt), "--readonly")
    try:
        assert (mnt / "c06/text").read_text() == "resolved by hand\n"
        assert (mnt / "c07/data.bin").read_bytes() == b"\x00\x01binary-v2-base\x00"
        assert (mnt / "c09/file").read_text() == "case 9 local edit\n"
    finally:
        cli.ok("umount", str(mnt))
    msgs = [c["message"] for c in json.loads(cli.ok("log", "vm1", "--json").output)]
    assert msgs[:3] == [
        "resolve /c09/file in vm1: took local",
        "resolve /c07/data.bin in vm1: took base",
        f"resolve /c06/text in vm1: took file {mine}",
    ]


def test_merged_resolution_needs_markers_removed(scenario: Cli, tmp_path: Path) -> None:
    cli = scenario
    cli("reconcile", "vm1")
    c = next(
        c
        for c in json.loads(cli.ok("conflicts", "vm1", "--json").output)
        if c["path"] == "/c06/text"
    )
    res = cli.fails("resolve", "vm1", "/c06/text", "--take", "merged")
    assert "still holds conflict markers" in res.output
    merged = Path(c["dir"]) / "merged"
    merged.write_text(edit(TEXT, 5, "line 05 settled"))
    cli.ok("resolve", "vm1", "/c06/text", "--take", "merged")


def test_undo_restores_upper_and_generation(scenario: Cli) -> None:
    from tests.scenario import upper_state

    cli = scenario
    before = upper_state(cli.store, "vm1")
    assert cli("reconcile", "vm1").exit_code == 1
    assert upper_state(cli.store, "vm1") != before
    cli.ok("reconcile", "--undo", "vm1")
    assert upper_state(cli.store, "vm1") == before
    show = json.loads(cli.ok("instance", "show", "vm1", "--json").output)
    assert show["generation"] == 1
    assert json.loads(cli.ok("conflicts", "vm1", "--json").output) == []
    assert "no reconcile to undo" in cli.fails("reconcile", "--undo", "vm1").output
    assert cli("reconcile", "vm1").exit_code == 1  # and it can be redone


def test_policy_overrides(scenario: Cli, tmp_path: Path) -> None:
    cli = scenario
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[rule]]\nglob = "/c06/*"\naction = "keep-local"\n\n'
        '[[rule]]\nglob = "/c07/**"\naction = "take-base"\n\n'
        '[[rule]]\nglob = "/c09/*"\naction = "fail"\n'
    )
    res = cli("reconcile", "vm1", "--policy", str(policy), "--json")
    assert res.exit_code == 10
    r = json.loads(res.output)["instances"][0]
    assert r["status"] == "error" and "/c09/file" in r["error"]
    assert json.loads(cli.ok("instance", "show", "vm1", "--json").output)["generation"] == 1
    policy.write_text(policy.read_text().replace('"fail"', '"keep-local"'))
    res = cli("reconcile", "vm1", "--policy", str(policy), "--json")
    r = json.loads(res.output)["instances"][0]
    paths = {c["path"] for c in r["conflicts"]}
    assert not paths & {"/c06/text", "/c07/data.bin", "/c09/file"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nglob = "/x"\naction = "explode"\n')
    res = cli.fails("reconcile", "vm1", "--policy", str(bad))
    assert "rule 1" in res.output


def test_multi_generation_skip_and_fleet(cli: Cli, tmp_path: Path, root: None) -> None:
    base = tmp_path / "b"
    (base / "etc").mkdir(parents=True)
    (base / "etc/conf").write_text(TEXT)
    cli.ok("base", "create", "os", "--from-dir", str(base))
    for vm in ("a", "b", "c"):
        cli.ok("instance", "create", vm, "--base", "os")
    mnt = tmp_path / "m"
    mnt.mkdir()
    cli.ok("mount", "a", str(mnt))
    (mnt / "etc/conf").write_text(edit(TEXT, 2, "local line 2"))
    cli.ok("umount", str(mnt))
    for gen, line in ((2, 10), (3, 20)):
        patch = tmp_path / f"p{gen}"
        (patch / "etc").mkdir(parents=True)
        prev = patch.parent / f"p{gen - 1}" / "etc/conf"
        (patch / "etc/conf").write_text(
            edit(prev.read_text() if prev.exists() else TEXT, line, f"base line {line}")
        )
        cli.ok("base", "update", "os", "--apply-dir", str(patch))
    deltas = cli.store / "bases" / "os" / "deltas"
    assert sorted(p.name for p in deltas.iterdir()) == ["1-2.json", "2-3.json"]  # by update
    cli.ok("mount", "c", str(mnt))
    try:
        res = cli("reconcile", "--all", "--jobs", "2", "--json")
    finally:
        cli.ok("umount", str(mnt))
    # generations skipped: 1 -> 3 computed once for the fleet, and kept
    assert sorted(p.name for p in deltas.iterdir()) == ["1-2.json", "1-3.json", "2-3.json"]
    saved = json.loads((deltas / "1-3.json").read_text())
    assert [c["path"] for c in saved] == ["/etc/conf"]
    reports = {r["name"]: r for r in json.loads(res.output)["instances"]}
    assert res.exit_code == 10  # c was mounted: an error that does not stop a and b
    assert reports["c"]["status"] == "error" and "mounted" in reports["c"]["error"]
    assert reports["a"]["status"] == "clean" and reports["a"]["to_generation"] == 3
    assert reports["b"]["actions"] == []
    cli.ok("mount", "a", str(mnt), "--readonly")
    try:
        want = edit(edit(edit(TEXT, 2, "local line 2"), 10, "base line 10"), 20, "base line 20")
        assert (mnt / "etc/conf").read_text() == want
    finally:
        cli.ok("umount", str(mnt))
    res = cli("reconcile", "--all")
    assert res.exit_code == 0


def test_redirect_upper_refused(cli: Cli, tmp_path: Path, root: None) -> None:
    build(cli, tmp_path)
    u = tmp_path / "u"
    u.mkdir()
    img = cli.store / "instances/vm1/upper.img"
    subprocess.run(["mount", "-o", "loop", str(img), str(u)], check=True)
    try:
        (u / "upper/redir").mkdir(exist_ok=True)
        os.setxattr(u / "upper/redir", "trusted.overlay.redirect", b"/elsewhere")
    finally:
        subprocess.run(["umount", str(u)], check=True)
    res = cli("reconcile", "vm1", "--json")
    assert res.exit_code == 10
    r = json.loads(res.output)["instances"][0]
    assert "redirect" in r["error"] and "/redir" in r["error"]


def test_refuses_mounted_and_reports_lock_holder(cli: Cli, tmp_path: Path, root: None) -> None:
    build(cli, tmp_path)
    mnt = tmp_path / "m2"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        res = cli("reconcile", "vm1")
        assert res.exit_code == 10 and "umount it before reconciling" in res.output
    finally:
        cli.ok("umount", str(mnt))
    shutil.rmtree(mnt)


def test_each_u_is_released_when_its_instance_is_done(cli: Cli, tmp_path: Path, root: None) -> None:
    """The long-lived hg command server must not pin U filesystems (Mercurial mmaps its
    branch cache unless told not to): each U image is detached as soon as its instance is
    reconciled, not when the whole run ends."""
    from unionimg.fs.mounts import loop_users
    from unionimg.reconcile.apply import InstanceReport, Reconciler
    from unionimg.reconcile.policy import load_policy
    from unionimg.store.layout import Store

    build(cli, tmp_path)
    cli.ok("instance", "create", "vm2", "--base", "os", "--generation", "1")
    pinned: list[str] = []

    def check(report: InstanceReport) -> None:
        if loop_users(cli.store / "instances" / report.name / "upper.img"):
            pinned.append(report.name)

    store = Store(cli.store)
    store.init()
    reports = Reconciler(store, load_policy(None), progress=check).run(["vm1", "vm2"], jobs=1)
    assert [r.status for r in reports] == ["conflicts", "clean"]
    assert pinned == []
