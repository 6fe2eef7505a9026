"""Bases on real ext4 images, read back without trusting our own code (blkid, debugfs, hg)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Cli, need_programs

pytestmark = pytest.mark.usefixtures("root")
HG = str(REPO / ".venv" / "bin" / "hg")


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def show(cli: Cli, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli.ok("base", "show", name, "--json").output)
    return data


def test_create_keeps_everything(cli: Cli, src_tree: Path) -> None:
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    data = show(cli, "deb")
    assert data["name"] == "deb" and data["latest"] == 1
    gen = data["generations"][0]
    assert gen["number"] == 1 and gen["size"] >= 64 << 20 and gen["created"]
    image = Path(gen["image"])
    assert image.stat().st_mode & 0o777 == 0o600
    label = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "LABEL", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert label == "BASE"
    st = debugfs(image, "stat /bin/tool")
    assert "Mode:  04755" in st
    conf = debugfs(image, "stat /etc/app/app.conf")
    assert "User:   123   Group:   456" in conf
    assert "user.unionimg-test" in debugfs(image, "ea_list /etc/app/app.conf")
    assert 'Fast link dest: "../etc/hostname"' in debugfs(image, "stat /bin/hostlink")
    assert "01:03" in debugfs(image, "stat /dev/null")
    assert "Mode:  01777" in debugfs(image, "stat /empty")
    assert "n\\xc3\\xa4me.txt" in debugfs(image, 'ls -l "/dir with space"')
    hard = debugfs(image, "stat /etc/motd")
    assert "Links: 2" in hard
    # history: plain hg works, one changeset, sidecar keeps what hg drops
    hist = data["history"]
    log = subprocess.run(
        [HG, "-R", hist, "log", "-T", "{rev}:{desc}\\n"], capture_output=True, text=True, check=True
    ).stdout
    assert log.strip() == f"0:deb generation 1: created from {src_tree}"
    side = subprocess.run(
        [HG, "-R", hist, "cat", "-r", "tip", f"{hist}/.unionimg/manifest.jsonl"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    dev = [json.loads(line) for line in side.splitlines() if '"/dev/null"' in line]
    assert dev and dev[0]["kind"] == "chr"
    assert any('"/empty"' in line for line in side.splitlines())


def test_update_three_ways_never_touch_old_generation(
    cli: Cli, src_tree: Path, tmp_path: Path
) -> None:
    busybox = Path("/bin/busybox")
    if busybox.exists():
        (src_tree / "bin" / "busybox").write_bytes(busybox.read_bytes())
        os.chmod(src_tree / "bin" / "busybox", 0o755)
        os.symlink("busybox", src_tree / "bin" / "sh")
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    g1 = Path(show(cli, "deb")["generations"][0]["image"])
    before = sha(g1)

    patch = tmp_path / "patch"
    (patch / "etc").mkdir(parents=True)
    (patch / "etc" / "hostname").write_text("patched\n")
    (patch / "etc" / "added").write_text("new\n")
    cli.ok("base", "update", "deb", "--apply-dir", str(patch))
    d = json.loads(cli.ok("base", "diff", "deb", "--json").output)
    assert d["from"] == 1 and d["to"] == 2
    assert d["added"] == ["/etc/added"] and d["modified"] == ["/etc/hostname"]
    assert d["deleted"] == []

    if busybox.exists():
        cli.ok("base", "update", "deb", "--run", "echo ran > /etc/ran; rm /etc/motd.hard")
        d = json.loads(cli.ok("base", "diff", "deb", "--json").output)
        assert d["added"] == ["/etc/ran"] and d["deleted"] == ["/etc/motd.hard"]
        bad = cli.fails("base", "update", "deb", "--run", "exit 7")
        assert "exit status 7" in bad.output

    exact = tmp_path / "exact"
    (exact / "etc").mkdir(parents=True)
    (exact / "etc" / "only").write_text("x\n")
    cli.ok("base", "update", "deb", "--from-dir", str(exact))
    data = show(cli, "deb")
    last = data["generations"][-1]
    d = json.loads(cli.ok("base", "diff", "deb", "--from", "1", "--json").output)
    assert "/etc/only" in d["added"] and "/etc/hostname" in d["deleted"]
    assert sha(g1) == before, "generation 1 was modified"
    log = json.loads(cli.ok("base", "log", "deb", "--json").output)
    assert len(log) == last["number"] == len(data["generations"])


def test_gc_and_remove(cli: Cli, src_tree: Path, tmp_path: Path) -> None:
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    cli.ok("instance", "create", "vm1", "--base", "deb")
    patch = tmp_path / "p"
    patch.mkdir()
    (patch / "f").write_text("1")
    cli.ok("base", "update", "deb", "--apply-dir", str(patch))
    # whole: a delta generation 3 would keep 2 (test_generation_layers)
    cli.ok("base", "update", "deb", "--apply-dir", str(patch), "--full")
    out = json.loads(cli.ok("base", "gc", "--json").output)
    assert out == [{"base": "deb", "generation": 2}]  # 1 is used by vm1, 3 is the latest
    assert [g["number"] for g in show(cli, "deb")["generations"]] == [1, 3]
    res = cli.fails("base", "remove", "deb")
    assert "used by instance(s) vm1" in res.output
    cli.ok("instance", "remove", "vm1")
    cli.ok("base", "remove", "deb")
    assert json.loads(cli.ok("base", "list", "--json").output) == []


def test_instances_made_at_once_get_one_name_and_distinct_macs(cli: Cli, src_tree: Path) -> None:
    """U images are made outside the store lock (a deploy makes its VMs at once): the lock
    still decides the name and the MAC when each is put in place. Four processes make vm1
    at once: one makes it, three are refused in one line; four make vm2..vm5 with derived
    MACs at once: four distinct MACs. Nothing is left in the store's scratch space."""
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    base = [str(REPO / ".venv" / "bin" / "unionimg"), "--store", str(cli.store)]

    def together(names: list[str]) -> list[subprocess.CompletedProcess[str]]:
        procs = [
            subprocess.Popen(
                [*base, "instance", "create", n, "--base", "deb"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in names
        ]
        done = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done

    same = together(["vm1"] * 4)
    assert sorted(r.returncode for r in same) == [0, 4, 4, 4], [r.stderr for r in same]
    for r in same:
        if r.returncode:
            # (before it, maybe a line saying it waits for the store lock)
            assert r.stderr.strip().splitlines()[-1] == (
                "unionimg: error: instance 'vm1' already exists; remove it first or pick "
                "another name"
            )
    others = together(["vm2", "vm3", "vm4", "vm5"])
    assert [r.returncode for r in others] == [0] * 4, [r.stderr for r in others]
    macs = {i["name"]: i["mac"] for i in json.loads(cli.ok("instance", "list", "--json").output)}
    assert sorted(macs) == ["vm1", "vm2", "vm3", "vm4", "vm5"]
    assert len(set(macs.values())) == 5, macs
    assert list((cli.store / "tmp").iterdir()) == []


def test_a_generation_removed_while_an_instance_is_made_is_a_conflict(
    cli: Cli, src_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The U image is made outside the store lock, so a 'base gc' may run meanwhile and
    remove the (not yet used) generation the instance is made on: putting the instance in
    place then finds it gone and refuses, in one line, with nothing made."""
    from unionimg.fs.image import make_ext4

    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    patch = tmp_path / "p"
    patch.mkdir()
    (patch / "f").write_text("1")
    cli.ok("base", "update", "deb", "--apply-dir", str(patch), "--full")

    def make_then_gc(*args: Any, **kwargs: Any) -> None:
        make_ext4(*args, **kwargs)
        assert json.loads(cli.ok("base", "gc", "--json").output) == [
            {"base": "deb", "generation": 1}
        ]

    monkeypatch.setattr("unionimg.layers.instance.make_ext4", make_then_gc)
    res = cli.fails("instance", "create", "vm1", "--base", "deb", "--generation", "1", code=4)
    assert "generation 1 was removed while instance 'vm1' was being made" in res.output
    monkeypatch.undo()
    assert json.loads(cli.ok("instance", "list", "--json").output) == []
    assert list((cli.store / "tmp").iterdir()) == []
    cli.ok("instance", "create", "vm1", "--base", "deb")  # on generation 2: still there


def tree_listing(root: Path) -> list[tuple[str, int]]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.name.endswith(".lock"):
                continue
            out.append((str(p.relative_to(root)), p.stat().st_size))
    return sorted(out)


def test_bad_input_leaves_store_unchanged(cli: Cli, src_tree: Path, tmp_path: Path) -> None:
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    cli.ok("instance", "create", "vm1", "--base", "deb", "--mac", "52:54:00:00:00:01")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        snapshot = tree_listing(cli.store)
        huge = tmp_path / "huge"
        huge.mkdir()
        (huge / "big").write_bytes(b"\1" * (40 << 20))
        bad = [
            (("base", "create", "a/b", "--from-dir", str(src_tree)), "not allowed"),
            (("base", "create", "..", "--from-dir", str(src_tree)), "not allowed"),
            (("base", "create", "has space", "--from-dir", str(src_tree)), "not allowed"),
            (("base", "create", "ctl\x07", "--from-dir", str(src_tree)), "not allowed"),
            (("base", "create", "x" * 65, "--from-dir", str(src_tree)), "at most 64"),
            (("base", "create", "deb", "--from-dir", str(src_tree)), "already exists"),
            (("base", "create", "new", "--from-dir", str(tmp_path / "missing")), "does not exist"),
            (("base", "create", "new", "--from-dir", str(huge), "--size", "20M"), "too small"),
            (
                (
                    "base",
                    "create",
                    "new",
                    "--from-dir",
                    str(src_tree),
                    "--kernel",
                    str(tmp_path / "vmlinuz"),
                ),
                "kernel",
            ),
            (("base", "update", "deb"), "exactly one"),
            (("base", "update", "nope", "--apply-dir", str(src_tree)), "does not exist"),
            (
                ("instance", "create", "vm2", "--base", "deb", "--mac", "01:00:5e:00:00:01"),
                "multicast",
            ),
            (
                ("instance", "create", "vm2", "--base", "deb", "--mac", "52:54:00:zz:00:01"),
                "malformed",
            ),
            (
                ("instance", "create", "vm2", "--base", "deb", "--mac", "52:54:00:00:00:01"),
                "already used by instance 'vm1'",
            ),
            (
                ("instance", "create", "vm2", "--base", "deb", "--hypervisor", "vmware"),
                "unknown hypervisor",
            ),
            (("instance", "create", "vm2", "--base", "nope"), "does not exist"),
            (
                ("instance", "create", "vm2", "--base", "deb", "--generation", "9"),
                "no generation 9",
            ),
            (("instance", "create", "vm2", "--base", "deb", "--size", "1M"), "too small"),
            (("instance", "create", "vm1", "--base", "deb"), "already exists"),
            (("base", "remove", "deb"), "used by instance"),
            (("mount", "vm1", str(tmp_path)), "already mounted"),
            (("instance", "remove", "vm1"), "mounted"),
            (("umount", str(tmp_path)), "not a unionimg mount"),
            (("status", "ghost"), "does not exist"),
        ]
        for args, expected in bad:
            res = cli.fails(*args)
            assert expected in res.output, (args, res.output)
            assert tree_listing(cli.store) == snapshot, f"store changed by {args}"
    finally:
        cli.ok("umount", str(mnt))


def test_debug_shows_traceback(cli: Cli) -> None:
    res = cli.runner.invoke(
        __import__("unionimg.cli").cli.main,
        ["--store", str(cli.store), "--debug", "instance", "show", "ghost"],
    )
    assert res.exit_code != 0 and res.exception is not None


def busybox_base(cli: Cli, root: Path) -> None:
    """Base 'b' from a tiny tree whose /bin/sh is busybox (for --run)."""
    need_programs("busybox", "unshare", "setpriv")
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(Path(shutil.which("busybox") or "").read_bytes())
    os.chmod(root / "bin" / "busybox", 0o755)
    os.symlink("busybox", root / "bin" / "sh")
    (root / "etc" / "hostname").write_text("tiny\n")
    cli.ok("base", "create", "b", "--from-dir", str(root))


def numbers(cli: Cli) -> list[int]:
    return [g["number"] for g in show(cli, "b")["generations"]]


def test_run_output_is_streamed_and_kept(cli: Cli, tmp_path: Path) -> None:
    """--run's stdout and stderr reach the admin's terminal and stay with the generation
    (run.log, listed by base show); other generations have none."""
    busybox_base(cli, tmp_path / "src")
    res = cli.ok(
        "base", "update", "b", "--run", "echo to-stdout; echo to-stderr >&2; echo x > /etc/x"
    )
    assert "to-stdout\n" in res.stdout and "to-stderr\n" in res.stderr, res.output
    assert "made base b generation 2" in res.stdout
    gens = show(cli, "b")["generations"]
    assert gens[0]["run_log"] is None
    log = Path(gens[1]["run_log"])
    assert log == Path(gens[1]["image"]).with_name("run.log")
    assert log.read_text() == "to-stdout\nto-stderr\n"
    assert log.stat().st_mode & 0o777 == 0o600
    assert f"--run output: {log}" in cli.ok("base", "show", "b").output
    # --apply-dir makes no log
    patch = tmp_path / "p"
    patch.mkdir()
    (patch / "f").write_text("1")
    cli.ok("base", "update", "b", "--apply-dir", str(patch))
    assert show(cli, "b")["generations"][2]["run_log"] is None


def test_run_output_arrives_while_it_runs(tmp_path: Path) -> None:
    """The first line is on the admin's terminal before the command ends (not collected
    and printed at the end): read from a real unionimg process through a pipe."""
    from tests.conftest import UNIONIMG

    store = tmp_path / "store"
    cli = Cli(store)
    busybox_base(cli, tmp_path / "src")
    proc = subprocess.Popen(
        [
            str(UNIONIMG),
            "--store",
            str(store),
            "base",
            "update",
            "b",
            "--run",
            "echo first; sleep 3; echo second > /etc/second",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        start = time.monotonic()
        first = proc.stdout.readline()
        took = time.monotonic() - start
        assert first == b"first\n" and proc.poll() is None, (first, took)
        assert took < 2.5, f"the first line came only after {took:.1f} s"
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_that_changes_nothing_makes_no_generation(cli: Cli, tmp_path: Path) -> None:
    """A command that leaves the tree as it was (nothing at all; only a copy-up by a
    timestamp change; the same bytes written back) makes no generation, says so, exits 0
    and leaves no staging; the next real change gets the next number."""
    busybox_base(cli, tmp_path / "src")
    before = tree_listing(cli.store / "bases")
    for command in (
        "true",
        "touch -a /etc/hostname",
        "cp /etc/hostname /tmp/h && cat /tmp/h > /etc/hostname && rm /tmp/h",
    ):
        res = cli.ok("base", "update", "b", "--run", command)
        assert res.output.strip().splitlines()[-1] == "no change: base b stays at generation 1"
        assert numbers(cli) == [1]
        assert tree_listing(cli.store / "bases") == before
        assert os.listdir(cli.store / "tmp") == []
    log = json.loads(cli.ok("base", "log", "b", "--json").output)
    assert len(log) == 1
    cli.ok("base", "update", "b", "--run", "chmod 600 /etc/hostname")  # metadata is a change
    assert numbers(cli) == [1, 2]
    assert json.loads(cli.ok("base", "diff", "b", "--json").output)["metadata_only"] == [
        "/etc/hostname"
    ]
    # --size is a change even when the tree is not
    cli.ok("base", "update", "b", "--run", "true", "--size", "80M")
    assert numbers(cli) == [1, 2, 3]


def test_failing_run_shows_its_output(cli: Cli, tmp_path: Path) -> None:
    busybox_base(cli, tmp_path / "src")
    before = tree_listing(cli.store / "bases")
    res = cli("base", "update", "b", "--run", "echo step one; echo it broke >&2; exit 3")
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[:2] == ["step one", "it broke"], lines
    assert lines[-1] == (
        "unionimg: error: command 'echo step one; echo it broke >&2; exit 3' failed in the "
        "base with exit status 3: it broke; no generation was made"
    )
    assert "Traceback" not in res.output
    assert tree_listing(cli.store / "bases") == before and os.listdir(cli.store / "tmp") == []
