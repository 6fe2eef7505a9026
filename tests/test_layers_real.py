"""The image tree on real images (issue 13, item 1): ``instance snapshot`` freezes a VM's
upper layer into a layer over its image node and the VM goes on with a fresh U; ``instance
create --from`` makes a VM on any node; the union shows the whole chain; ``layer
list|show|tree|gc``.

Root, loop devices, overlayfs, mke2fs, Mercurial: the small tree of ``tests.conftest``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UNIONIMG, Cli
from unionimg.faults import POINTS
from unionimg.fs.mounts import mountinfo

pytestmark = pytest.mark.usefixtures("root")


def js(cli: Cli, *args: str) -> Any:
    return json.loads(cli.ok(*args, "--json").output)


def write(cli: Cli, vm: str, mnt: Path, files: dict[str, str | None]) -> None:
    """Write (or with None remove) files through VM's mounted union."""
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt))
    try:
        for rel, text in files.items():
            path = mnt / rel
            if text is None:
                if path.is_dir():
                    subprocess.run(["rm", "-rf", str(path)], check=True)
                else:
                    path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    finally:
        cli.ok("umount", str(mnt))


def read_union(cli: Cli, vm: str, mnt: Path) -> dict[str, str | None]:
    """What VM's union shows of the test's paths (None: absent)."""
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        out: dict[str, str | None] = {}
        for rel in PATHS:
            p = mnt / rel
            out[rel] = p.read_text() if p.is_file() else ("<dir>" if p.is_dir() else None)
        out["etc/app:list"] = ",".join(sorted(os.listdir(mnt / "etc/app")))
        return out
    finally:
        cli.ok("umount", str(mnt))


PATHS = ("etc/hostname", "etc/motd", "etc/a-file", "etc/xa-file", "etc/u-file", "etc/app/new")


def upper_listing(cli: Cli, vm: str) -> list[str]:
    img = js(cli, "instance", "show", vm)["upper_image"]
    out = subprocess.run(
        ["debugfs", "-R", "ls -p /upper", img], capture_output=True, text=True, check=True
    ).stdout
    names = [f.split("/")[5] for f in out.splitlines() if f.count("/") >= 6]
    return sorted(n for n in names if n not in (".", ".."))


@pytest.fixture
def tree(cli: Cli, src_tree: Path) -> Cli:
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    cli.ok("instance", "create", "vm1", "--base", "deb")
    return cli


def test_snapshot_makes_a_layer_and_the_vm_goes_on(tree: Cli, tmp_path: Path) -> None:
    cli = tree
    mnt = tmp_path / "mnt"
    write(cli, "vm1", mnt, {
        "etc/hostname": "vm1\n", "etc/motd": None, "etc/a-file": "in A\n",
        "etc/app": None, "etc/app/new": "opaque\n",
    })  # fmt: skip
    assert upper_listing(cli, "vm1") == ["etc"]
    # refused while mounted: one line, exit 4, nothing made
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", "vm1", str(mnt))
    cli.fails("instance", "snapshot", "vm1", code=4)
    cli.ok("umount", str(mnt))
    assert js(cli, "layer", "list") == []
    snap = js(cli, "instance", "snapshot", "vm1", "-m", "A")
    assert snap["new"] and snap["label"] == "L" + snap["layer"][7:22]
    rows = {r["diff_id"]: r for r in js(cli, "layer", "list")}
    a = rows[snap["layer"]]
    assert a["kind"] == "snapshot" and a["instance"] == "vm1" and a["message"] == "A"
    # its parent: the generation's layer (a whole base, adopted: the image is base.img)
    gen = rows[snap["parent"]]
    assert a["parent"] == gen["diff_id"] and gen["kind"] == "base" and gen["parent"] is None
    assert (gen["base"], gen["generation"]) == ("deb", 1)
    base_img = Path(js(cli, "base", "show", "deb")["generations"][0]["image"])
    assert os.stat(gen["image"]).st_ino == base_img.stat().st_ino
    inst = js(cli, "instance", "show", "vm1")
    assert inst["layers"] == [a["diff_id"]] and inst["generation"] == 1
    assert upper_listing(cli, "vm1") == []  # a fresh upper layer
    log = cli.ok("log", "vm1").output
    assert f"snapshot {a['label']}: A" in log and "the upper layer starts again" in log
    # the VM goes on: base + snapshot + its new U content in one union
    write(cli, "vm1", mnt, {"etc/u-file": "in U\n"})
    seen = read_union(cli, "vm1", mnt)
    assert seen["etc/hostname"] == "vm1\n" and seen["etc/motd"] is None
    assert seen["etc/a-file"] == "in A\n" and seen["etc/u-file"] == "in U\n"
    assert seen["etc/app:list"] == "new"  # the opaque directory hides the base's app.conf
    assert upper_listing(cli, "vm1") == ["etc"]
    # nothing changed since: no new layer
    again = tmp_path / "again"
    cli.ok("instance", "snapshot", "vm1")  # takes u-file
    out = cli.ok("instance", "snapshot", "vm1", "-m", "nothing").output
    assert "nothing changed" in out and "no new layer" in out
    assert len(js(cli, "layer", "list")) == 3
    assert not again.exists()


def test_chain_of_two_snapshots_and_create_from(tree: Cli, tmp_path: Path) -> None:
    cli = tree
    mnt = tmp_path / "mnt"
    write(cli, "vm1", mnt, {"etc/a-file": "in A\n", "etc/motd": None})
    a = js(cli, "instance", "snapshot", "vm1", "-m", "A")["layer"]
    write(cli, "vm1", mnt, {"etc/xa-file": "in XA\n", "etc/a-file": "changed in XA\n"})
    xa = js(cli, "instance", "snapshot", "vm1", "-m", "XA")
    assert xa["parent"] == a
    assert js(cli, "instance", "show", "vm1")["layers"] == [xa["layer"], a]
    chain = js(cli, "layer", "show", xa["layer"][7:19])["chain"]
    assert chain[:2] == [xa["layer"], a] and len(chain) == 3
    cli.ok("instance", "create", "vm2", "--from", a[7:15])
    cli.ok("instance", "create", "vm3", "--from", xa["label"])
    assert js(cli, "instance", "show", "vm2")["layers"] == [a]
    assert js(cli, "instance", "show", "vm3")["layers"] == [xa["layer"], a]
    two = read_union(cli, "vm2", mnt)
    assert two["etc/a-file"] == "in A\n" and two["etc/xa-file"] is None and two["etc/motd"] is None
    three = read_union(cli, "vm3", mnt)
    assert three["etc/a-file"] == "changed in XA\n" and three["etc/xa-file"] == "in XA\n"
    # a VM from the generation's own layer is a plain VM on the generation
    gen_layer = chain[-1]
    cli.ok("instance", "create", "vm4", "--from", gen_layer)
    assert "layers" not in js(cli, "instance", "show", "vm4")
    # the VM made from A goes on on its own: its snapshot is a sibling of XA
    write(cli, "vm2", mnt, {"etc/b-file": "in B\n"})
    b = js(cli, "instance", "snapshot", "vm2", "-m", "B")
    assert b["parent"] == a
    # bad input: one line each, nothing made
    cli.fails("instance", "create", "vm5", "--from", a, "--base", "deb", code=2)
    cli.fails("instance", "create", "vm5", "--from", "0123456789abcdef", code=3)
    cli.fails("instance", "create", "vm5", "--from", "zz", code=2)
    cli.fails("instance", "create", "vm5", code=2)
    cli.fails("instance", "snapshot", "nosuch", code=3)
    assert "vm5" not in cli.ok("instance", "list").output


def test_layer_tree_json_dot(tree: Cli, tmp_path: Path) -> None:
    cli = tree
    mnt = tmp_path / "mnt"
    write(cli, "vm1", mnt, {"etc/a-file": "A\n"})
    a = js(cli, "instance", "snapshot", "vm1", "-m", "A")
    cli.ok("instance", "create", "vm2", "--from", a["layer"])
    write(cli, "vm1", mnt, {"etc/xa-file": "XA\n"})
    xa = js(cli, "instance", "snapshot", "vm1", "-m", "XA")
    nodes = {n["diff_id"]: n for n in js(cli, "layer", "tree")}
    assert nodes[a["parent"]]["children"] == [a["layer"]]
    assert nodes[a["layer"]]["children"] == [xa["layer"]]
    assert nodes[a["layer"]]["instances"] == ["vm2"]
    assert nodes[xa["layer"]]["instances"] == ["vm1"]
    drawn = cli.ok("layer", "tree").output.splitlines()
    ia = next(i for i, ln in enumerate(drawn) if a["layer"][7:19] in ln)
    ix = next(i for i, ln in enumerate(drawn) if xa["layer"][7:19] in ln)
    assert ix > ia and "vm2" in drawn[ia] and "vm1" in drawn[ix]
    assert drawn[ix].index(xa["layer"][7:19]) > drawn[ia].index(a["layer"][7:19])  # indented
    dot = cli.ok("layer", "tree", "--dot").output
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert f'"{a["layer"][7:19]}" -> "{xa["layer"][7:19]}"' in dot
    assert f'"{xa["layer"][7:19]}" -> "vm vm1"' in dot
    if dotbin := subprocess.run(["which", "dot"], capture_output=True, text=True).stdout.strip():
        subprocess.run([dotbin, "-Tsvg"], input=dot, capture_output=True, text=True, check=True)


def test_gc_keeps_what_is_referenced(tree: Cli, tmp_path: Path) -> None:
    cli = tree
    mnt = tmp_path / "mnt"
    write(cli, "vm1", mnt, {"etc/a-file": "A\n"})
    a = js(cli, "instance", "snapshot", "vm1", "-m", "A")
    cli.ok("instance", "create", "tmp", "--from", a["layer"])
    write(cli, "tmp", mnt, {"etc/t-file": "T\n"})
    t = js(cli, "instance", "snapshot", "tmp", "-m", "T")
    write(cli, "tmp", mnt, {"etc/t2-file": "T2\n"})
    t2 = js(cli, "instance", "snapshot", "tmp", "-m", "T2")
    assert js(cli, "layer", "gc", "--dry-run")["removed"] == []
    cli.ok("instance", "remove", "tmp")
    dry = js(cli, "layer", "gc", "--dry-run")
    assert dry["dry_run"] and dry["removed"] == [t2["layer"], t["layer"]]
    assert len(js(cli, "layer", "list")) == 4  # nothing removed by a dry run
    done = js(cli, "layer", "gc")
    assert done["removed"] == [t2["layer"], t["layer"]] and done["bytes"] > 0
    left = {r["diff_id"] for r in js(cli, "layer", "list")}
    assert left == {a["layer"], a["parent"]}  # vm1's chain and the generation's layer
    shown = js(cli, "layer", "show", a["layer"])
    assert shown["used_by"] == ["instance vm1"]
    # vm1 still mounts and shows A
    assert read_union(cli, "vm1", mnt)["etc/a-file"] == "A\n"


def test_reconcile_refuses_a_vm_on_snapshot_layers(tree: Cli, tmp_path: Path) -> None:
    cli = tree
    mnt = tmp_path / "mnt"
    write(cli, "vm1", mnt, {"etc/a-file": "A\n"})
    cli.ok("instance", "snapshot", "vm1")
    cli.ok("instance", "create", "plain", "--base", "deb")
    src = tmp_path / "v2"
    subprocess.run(["cp", "-a", str(tree.store.parent / "src"), str(src)], check=True)
    (src / "etc/motd").write_text("welcome to v2\n")
    cli.ok("base", "update", "deb", "--from-dir", str(src))
    res = cli("reconcile", "--all", "--json")
    reports = {r["name"]: r for r in json.loads(res.output)["instances"]}
    assert res.exit_code == 10, res.output  # an instance failed: vm1, in one line
    plain = reports["plain"]
    assert plain["status"] == "clean" and plain["error"] is None and plain["applied"], plain
    assert js(cli, "instance", "show", "plain")["generation"] == 2
    err = reports["vm1"]["error"]
    assert reports["vm1"]["status"] == "error" and "\n" not in err
    assert "lies on snapshot layers" in err and "make a new VM on generation 2" in err
    assert js(cli, "instance", "show", "vm1")["generation"] == 1
    # reconcile to the generation vm1 is on: nothing to merge, nothing refused
    assert cli("reconcile", "vm1", "--to-generation", "1").exit_code == 0


@pytest.mark.parametrize("hostile", ["device", "whiteout-name"])
def test_hostile_upper_refused_in_one_line(tree: Cli, tmp_path: Path, hostile: str) -> None:
    """What a guest put in its upper layer that a layer cannot carry: exit 8, one line naming
    the VM and the path, nothing changed (no layer, the record and the upper as they were)."""
    cli = tree
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        (mnt / "etc/kept").write_text("kept\n")
        if hostile == "device":
            os.mknod(mnt / "etc/sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
        else:
            (mnt / "etc/.wh.passwd").write_text("not a whiteout\n")
    finally:
        cli.ok("umount", str(mnt))
    before = js(cli, "instance", "show", "vm1")
    res = cli.fails("instance", "snapshot", "vm1", code=8)
    assert "instance 'vm1'" in res.output and "/etc/" in res.output
    # no snapshot layer (the generation's own layer, its digest cached, may be recorded)
    assert [r["kind"] for r in js(cli, "layer", "list")] in ([], ["base"])
    after = js(cli, "instance", "show", "vm1")
    assert "layers" not in after and after["generation"] == before["generation"]
    assert upper_listing(cli, "vm1") == ["etc"]
    assert read_union(cli, "vm1", mnt)["etc/hostname"] == "base\n"
    assert cli.ok("log", "vm1").output.strip() == ""  # no changeset recorded


def cat_union(cli: Cli, vm: str, mnt: Path, *paths: str) -> list[bytes | None]:
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        return [(mnt / p).read_bytes() if (mnt / p).is_file() else None for p in paths]
    finally:
        cli.ok("umount", str(mnt))


def test_identity_stays_with_the_vm_and_out_of_the_layer(cli: Cli, tmp_path: Path) -> None:
    """A VM's machine-id and SSH host keys stay in its U, never in a layer: a VM with nothing
    but its identity has nothing to snapshot, twice in a row; a VM made from the layer gets
    its own."""
    from tests.test_identity import identity_tree

    cli.ok("base", "create", "deb", "--from-dir", str(identity_tree(tmp_path / "src", sshd=True)))
    cli.ok("instance", "create", "vm1", "--base", "deb")
    ident = ("etc/machine-id", "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_rsa_key.pub")
    mnt = tmp_path / "mnt"
    mine = cat_union(cli, "vm1", mnt, *ident)
    assert all(mine), mine  # instance create gave vm1 its own
    assert "nothing changed" in cli.ok("instance", "snapshot", "vm1").output
    write(cli, "vm1", mnt, {"etc/a-file": "A\n"})
    snap = js(cli, "instance", "snapshot", "vm1", "-m", "A")
    assert snap["new"]
    blob = js(cli, "layer", "show", snap["layer"])["blob"]
    names = subprocess.run(
        ["tar", "--zstd", "-tf", blob], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "etc/a-file" in names and not [n for n in names if "machine-id" in n or "ssh_host" in n]
    assert cat_union(cli, "vm1", mnt, *ident) == mine  # the VM keeps its identity
    assert "nothing changed" in cli.ok("instance", "snapshot", "vm1").output
    cli.ok("instance", "create", "vm2", "--from", snap["layer"])
    theirs = cat_union(cli, "vm2", mnt, *ident, "etc/a-file")
    assert theirs[3] == b"A\n" and all(theirs)
    assert all(a != b for a, b in zip(theirs[:3], mine, strict=True))


def test_guest_sparse_file_refused(cli: Cli, src_tree: Path, tmp_path: Path) -> None:
    """A guest's ``truncate -s 2T``: a snapshot would read and hash every zero; refused in one
    line (a layer reads at most 16 times the U image's size), nothing made."""
    cli.ok("base", "create", "deb", "--from-dir", str(src_tree))
    cli.ok("instance", "create", "vm1", "--base", "deb", "--size", "64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.ok("mount", "vm1", str(mnt))
    try:
        with open(mnt / "big", "wb") as fh:
            fh.truncate(2 << 40)
    finally:
        cli.ok("umount", str(mnt))
    res = cli.fails("instance", "snapshot", "vm1", code=8)
    assert "sparse" in res.output and "instance 'vm1'" in res.output
    assert "layers" not in js(cli, "instance", "show", "vm1")


@pytest.mark.parametrize(
    "step",
    [f"snapshot:{p}" for p in POINTS["snapshot"]]
    + [f"layer-import:{p}" for p in POINTS["layer-import"]],
)
def test_snapshot_killed_at_every_step(tree: Cli, tmp_path: Path, step: str) -> None:
    """SIGKILL at each step of a snapshot (and while its layer's new image is mounted in
    staging): the VM's union shows the same files at once (the layer holds what the upper
    held until the swap), nothing stays mounted, and the next snapshot finishes the job: one
    layer, an empty upper, then nothing more to freeze."""
    cli = tree
    mnt = tmp_path / "mnt"
    write(cli, "vm1", mnt, {"etc/a-file": "A\n", "etc/motd": None, "etc/hostname": "vm1\n"})
    before = read_union(cli, "vm1", mnt)
    env = dict(os.environ, UNIONIMG_CRASH_AT=step)
    proc = subprocess.run(
        [str(UNIONIMG), "--store", str(cli.store), "instance", "snapshot", "vm1"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, f"{step} was not reached: {proc.stderr}"
    assert read_union(cli, "vm1", mnt) == before  # sweeps the dead command's mounts too
    assert [m.target for m in mountinfo() if m.target.startswith(str(cli.store))] == []
    out = cli.ok("instance", "snapshot", "vm1", "--json").output
    layers = js(cli, "instance", "show", "vm1").get("layers", [])
    assert len(layers) == 1, (step, out)
    assert sorted(r["kind"] for r in js(cli, "layer", "list")) == ["base", "snapshot"]
    assert upper_listing(cli, "vm1") == []
    assert read_union(cli, "vm1", mnt) == before
    assert "nothing changed" in cli.ok("instance", "snapshot", "vm1").output
