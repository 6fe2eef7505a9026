"""Base generations as layers (issue 13, item 1): a generation is a full image or a delta
layer over its parent, and everything that needs a generation's tree sees its whole chain.

The module's store holds two bases made from the same inputs: ``gl`` (generations 2 and 3
become delta layers on their own) and ``glf`` (``--full`` every time: what generations were
before). Generation 2 changes, deletes, replaces a directory, removes a whole directory, adds
a boot hook; generation 3 lays a directory over 2. Checked with tools other than unionimg's
own writer: debugfs and blkid on the delta image, the kernel's overlayfs mounting the chain,
the layer store's tar digest of the image, a guest booting through the chain under UML and
under QEMU (kvm driver, TCG).
"""

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

from tests.conftest import Cli, make_tree
from tests.test_boot_real import cleanup_guest, guest_lines, need_guests
from unionimg.entries import Entry
from unionimg.fs.manifest import Manifest, scan_tree
from unionimg.fs.mounts import mountinfo, unmount_tree
from unionimg.layers import base, layerstore
from unionimg.store.layout import Store
from unionimg.store.records import GenerationMeta, RecordError

pytestmark = pytest.mark.usefixtures("root")

HOOK = """#!/bin/sh
for f in keep.txt change.txt gone.txt new.txt three.txt; do
    if [ -e /etc/gl/$f ]; then
        echo "unionimg-guest: gl $f $(cat /etc/gl/$f)"
    else
        echo "unionimg-guest: gl $f absent"
    fi
done
echo "unionimg-guest: gl opq $(ls /opq | tr '\\n' ' ')"
echo "unionimg-guest: gl olddir $([ -e /olddir ] && echo present || echo absent)"
echo "unionimg-guest: gl local $(cat /etc/gl/local.txt 2>/dev/null || echo absent)"
"""


def copy_tree(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # keeps nodes, xattrs, links
    return dst


def show(cli: Cli, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli.ok("base", "show", name, "--json").output)
    return data


def entries_of(manifest: Path) -> dict[str, Entry]:
    with Manifest(manifest) as m:
        return {e.path: e for e in m}


def assert_same_tree(a: dict[str, Entry], b: dict[str, Entry]) -> None:
    """The same paths, each the same type, content, mode, owner and xattrs."""
    assert sorted(a) == sorted(b)
    differ = [p for p in a if not a[p].same(b[p])]
    assert not differ, [(a[p], b[p]) for p in differ[:3]]


@dataclass(frozen=True)
class Gens:
    tmp: Path
    cli: Cli
    store: Store


@pytest.fixture(scope="module")
def gens(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Gens]:
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("genlayers")
    tree = copy_tree(build("tiny"), tmp / "g1")
    gl = tree / "etc" / "gl"
    gl.mkdir()
    (gl / "keep.txt").write_text("keep\n")
    (gl / "same.txt").write_text("never changes\n")  # so /etc/gl is not replaced as a whole
    (gl / "change.txt").write_text("v1\n")
    (gl / "gone.txt").write_text("gone\n")
    for name in ("a", "b"):
        (tree / "opq").mkdir(exist_ok=True)
        (tree / "opq" / name).write_text(name)
    (tree / "olddir" / "x").mkdir(parents=True)
    (tree / "olddir" / "x" / "y").write_text("y")
    (tree / "var" / "lib" / "gl").mkdir(parents=True)
    (tree / "var" / "lib" / "gl" / "big").write_bytes(os.urandom(300_000))
    cli = Cli(tmp / "store")
    cli.ok("base", "create", "gl", "--from-dir", str(tree))
    cli.ok("base", "create", "glf", "--from-dir", str(tree))
    cli.ok("instance", "create", "glvm", "--base", "gl", "--hypervisor", "uml")

    # generation 2: a change, a deletion, a replaced directory, a removed directory, a new
    # file, a mode change, a boot hook that prints what the guest sees
    s2 = copy_tree(tree, tmp / "g2")
    (s2 / "etc/gl/change.txt").write_text("v2\n")
    (s2 / "etc/gl/gone.txt").unlink()
    shutil.rmtree(s2 / "opq")
    (s2 / "opq").mkdir()
    (s2 / "opq" / "z").write_text("z")
    shutil.rmtree(s2 / "olddir")
    (s2 / "etc/gl/new.txt").write_text("new\n")
    os.chmod(s2 / "etc/gl/keep.txt", 0o600)
    hook = s2 / "etc/unionimg-boot.d/30-gl"
    hook.write_text(HOOK)
    os.chmod(hook, 0o755)
    for name in ("gl", "glf"):
        extra = ("--full",) if name == "glf" else ()
        cli.ok("base", "update", name, "--from-dir", str(s2), *extra)
    # generation 3: a directory laid over 2
    a3 = tmp / "a3"
    (a3 / "etc/gl").mkdir(parents=True)
    (a3 / "etc/gl/change.txt").write_text("v3\n")
    (a3 / "etc/gl/three.txt").write_text("three\n")
    for name in ("gl", "glf"):
        extra = ("--full",) if name == "glf" else ()
        cli.ok("base", "update", name, "--apply-dir", str(a3), *extra)
    try:
        yield Gens(tmp, cli, Store(tmp / "store"))
    finally:
        for inst in json.loads(cli.ok("instance", "list", "--json").output):
            cleanup_guest(cli, inst["name"])
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


def test_generations_two_and_three_are_deltas_and_cost_less(gens: Gens) -> None:
    gl, glf = show(gens.cli, "gl")["generations"], show(gens.cli, "glf")["generations"]
    assert [(g["kind"], g["parent"]) for g in gl] == [("full", None), ("delta", 1), ("delta", 2)]
    assert [g["kind"] for g in glf] == ["full", "full", "full"]
    for d, f in zip(gl[1:], glf[1:], strict=True):
        assert Path(d["image"]).name == "layer.img"
        print(f"generation {d['number']}: delta {d['disk_usage']} B, full {f['disk_usage']} B")
        assert d["disk_usage"] * 4 < f["disk_usage"]
        assert d["layer"].startswith("sha256:")
    human = gens.cli.ok("base", "show", "gl").output
    assert "a whole image" in human.splitlines()[1]
    assert "a delta over generation 1" in human.splitlines()[2]
    assert "a delta over generation 2" in human.splitlines()[3]


def test_each_generation_tree_equals_the_full_one(gens: Gens) -> None:
    """Manifests equal generation by generation; and the chain mounted by the kernel scans
    to exactly its manifest (and to the full image's tree)."""
    for n in (1, 2, 3):
        d = base.get_generation(gens.store, "gl", n)
        f = base.get_generation(gens.store, "glf", n)
        assert_same_tree(entries_of(d.manifest_path), entries_of(f.manifest_path))
        with (
            base.generation_tree(gens.store, d, gens.tmp / f"d{n}") as dt,
            base.generation_tree(gens.store, f, gens.tmp / f"f{n}") as ft,
        ):
            dscan = {e.path: e for e in scan_tree(dt, skip_top=("lost+found",))}
            fscan = {e.path: e for e in scan_tree(ft, skip_top=("lost+found",))}
        assert_same_tree(dscan, entries_of(d.manifest_path))
        assert_same_tree(dscan, fscan)
    # what the chain shows of the changes
    g3 = base.get_generation(gens.store, "gl", 3)
    with base.generation_tree(gens.store, g3, gens.tmp / "look") as t:
        assert (t / "etc/gl/change.txt").read_text() == "v3\n"
        assert not (t / "etc/gl/gone.txt").exists()
        assert sorted(os.listdir(t / "opq")) == ["z"]
        assert not (t / "olddir").exists()
        assert stat.S_IMODE((t / "etc/gl/keep.txt").stat().st_mode) == 0o600
        assert len((t / "var/lib/gl/big").read_bytes()) == 300_000
    assert not [m for m in mountinfo() if m.target.startswith(str(gens.tmp / "look"))]


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


def test_delta_image_is_an_overlayfs_upper_layer(gens: Gens) -> None:
    g2 = base.get_generation(gens.store, "gl", 2)
    image = g2.image
    label = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "LABEL", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert g2.layer is not None and label == "L" + g2.layer.removeprefix("sha256:")[:15]
    # whiteouts: 0:0 character devices for a deleted file and a deleted directory
    for path in ("/etc/gl/gone.txt", "/olddir"):
        st = debugfs(image, f"stat {path}")
        assert "Type: character special" in st and "Device major/minor number: 00:00" in st
    # the replaced directory is opaque and holds only its new file; a directory that keeps
    # an unchanged file is not (its deletion is a whiteout, its unchanged file not copied)
    assert 'trusted.overlay.opaque (1) = "y"' in debugfs(image, "ea_list /opq")
    names = debugfs(image, "ls /opq").split()
    assert "z" in names and "a" not in names and "b" not in names
    assert "opaque" not in debugfs(image, "ea_list /etc/gl")
    assert "same.txt" not in debugfs(image, "ls /etc/gl")
    # only what changed: the unchanged big file and busybox are not in the delta
    root = debugfs(image, "ls /").split()
    assert "lost+found" not in root and "bin" not in root
    assert (
        "File not found"
        in debugfs(image, "stat /var/lib/gl/big")
        + subprocess.run(
            ["debugfs", "-R", "stat /var/lib/gl/big", str(image)], capture_output=True, text=True
        ).stderr
    )
    # the image is the layer: its tree gives back the recorded diff_id
    mnt = gens.tmp / "layer2"
    with layerstore.mounted(gens.store, layerstore.get(gens.store, g2.layer), mnt) as t:
        assert layerstore.tree_digest(t, kind="delta").diff_id == g2.layer
    # in the layer store: generation 3 over 2 over a base layer of generation 1, hard links
    g3 = base.get_generation(gens.store, "gl", 3)
    top = base.generation_layer(gens.store, g3)
    chain = layerstore.chain(gens.store, top.diff_id)
    assert [la.meta.kind for la in chain] == ["delta", "delta", "base"]
    assert [la.meta.generation for la in chain] == [3, 2, 1]
    assert [la.meta.label for la in chain] == [g3.label, g2.label, "BASE"]
    assert chain[0].image.stat().st_ino == g3.image.stat().st_ino


def test_a_vm_on_generation_three_reconciles_from_one_and_boots_uml_and_kvm_with_the_chain(
    gens: Gens,
) -> None:
    need_guests()
    cli, vm = gens.cli, "glvm"
    mnt = gens.tmp / "vmmnt"
    mnt.mkdir()
    cli.ok("mount", vm, str(mnt))
    try:
        (mnt / "etc/gl/local.txt").write_text("mine\n")
        (mnt / "etc/gl/keep.txt").write_text("kept by the VM\n")
    finally:
        cli.ok("umount", str(mnt))
    cli.ok("reconcile", vm, "--json")
    assert json.loads(cli.ok("instance", "show", vm, "--json").output)["generation"] == 3
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        assert (mnt / "etc/gl/change.txt").read_text() == "v3\n"
        assert (mnt / "etc/gl/local.txt").read_text() == "mine\n"
        assert (mnt / "etc/gl/keep.txt").read_text() == "kept by the VM\n"
        assert not (mnt / "etc/gl/gone.txt").exists() and not (mnt / "olddir").exists()
        assert sorted(os.listdir(mnt / "opq")) == ["z"]
    finally:
        cli.ok("umount", str(mnt))
    out = json.loads(cli.ok("boot", vm, "--wait", "--timeout", "240", "--json").output)
    assert out["stopped"]
    lines = guest_lines(cli, vm)
    for want in (
        "unionimg-guest: gl change.txt v3",
        "unionimg-guest: gl gone.txt absent",
        "unionimg-guest: gl new.txt new",
        "unionimg-guest: gl three.txt three",
        "unionimg-guest: gl keep.txt kept by the VM",
        "unionimg-guest: gl opq z",
        "unionimg-guest: gl olddir absent",
        "unionimg-guest: gl local mine",
    ):
        assert want in lines, lines
    g3, g2 = (base.get_generation(gens.store, "gl", n) for n in (3, 2))
    console = cli.ok("console", vm).output
    assert f"unionimg-init: layer {g3.label} is /dev/ubd" in console
    assert f"unionimg-init: layer {g2.label} is /dev/ubd" in console
    # the same VM under kvm (QEMU through libvirt): the same chain, as virtio disks
    out = json.loads(cli.ok("switch", vm, "--to", "kvm", "--boot", "--wait", "--json").output)
    assert out["boot"]["stopped"]
    lines = guest_lines(cli, vm)
    assert "unionimg-guest: gl change.txt v3" in lines and "unionimg-guest: gl opq z" in lines
    console = cli.ok("console", vm).output
    assert f"unionimg-init: layer {g3.label} is /dev/vd" in console
    assert f"unionimg-init: layer {g2.label} is /dev/vd" in console


def test_generation_records_made_before_read_as_full() -> None:
    """Format compatibility: a generation.json without kind/parent/layer is a full
    generation; a delta must name its parent."""
    old = {"number": 2, "created": "x", "size": 1, "hg_node": "n", "kernel": None, "files": 3}
    meta = GenerationMeta.from_json(old)
    assert (meta.kind, meta.parent, meta.layer) == ("full", None, None)
    assert meta.to_json() == {**old, "source": ""}  # written back as before
    with pytest.raises(RecordError, match="a delta generation names its parent"):
        GenerationMeta.from_json({**old, "kind": "delta"})
    with pytest.raises(RecordError, match="not 'full' or 'delta'"):
        GenerationMeta.from_json({**old, "kind": "other"})


def test_a_big_change_makes_a_full_image_and_chains_are_bounded(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "store")
    src = make_tree(tmp_path / "src")
    (src / "usr/lib/data").write_bytes(os.urandom(1 << 20))
    cli.ok("base", "create", "b", "--from-dir", str(src))
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(3 << 20))  # over half of the new whole tree
    cli.ok("base", "update", "b", "--apply-dir", str(big))
    small = tmp_path / "small"
    small.mkdir()
    for i in range(base.MAX_DELTA_CHAIN + 1):
        (small / "n").write_text(str(i))
        cli.ok("base", "update", "b", "--apply-dir", str(small))
    kinds = [(g["kind"], g["parent"]) for g in show(cli, "b")["generations"]]
    deltas = [("delta", n) for n in range(2, 2 + base.MAX_DELTA_CHAIN)]
    assert kinds == [("full", None), ("full", None), *deltas, ("full", None)]
    store = Store(tmp_path / "store")
    top = base.get_generation(store, "b", 2 + base.MAX_DELTA_CHAIN)
    assert len(base.chain(store, top)) == base.MAX_DELTA_CHAIN + 1
    # the one line: at most MAX_DELTA_CHAIN deltas (base update --help)
    assert f"at most {base.MAX_DELTA_CHAIN} deltas" in " ".join(
        cli.ok("base", "update", "--help").output.split()
    )


def test_gc_keeps_the_generations_a_kept_delta_lies_on(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "store")
    src = make_tree(tmp_path / "src")
    (src / "usr/lib/data").write_bytes(os.urandom(1 << 20))
    cli.ok("base", "create", "b", "--from-dir", str(src))
    patch = tmp_path / "p"
    patch.mkdir()
    for i in (2, 3):
        (patch / "f").write_text(str(i))
        cli.ok("base", "update", "b", "--apply-dir", str(patch))
    cli.ok("instance", "create", "vm3", "--base", "b")  # on generation 3, a delta
    (patch / "f").write_text("4")
    cli.ok("base", "update", "b", "--apply-dir", str(patch), "--full")
    kinds = [g["kind"] for g in show(cli, "b")["generations"]]
    assert kinds == ["full", "delta", "delta", "full"]
    dry = json.loads(cli.ok("base", "gc", "--dry-run", "--json").output)
    why = {k["generation"]: k["why"] for k in dry["keep"]}
    assert dry["would_remove"] == []
    assert why[3] == "used by instance(s) vm3"
    assert why[2] == "delta generation(s) 3 lie on it"
    assert why[1] == "delta generation(s) 3 lie on it"  # through 2
    human = cli.ok("base", "gc", "--dry-run").output
    assert "keep b generation 1: delta generation(s) 3 lie on it" in human
    assert json.loads(cli.ok("base", "gc", "--json").output) == []
    cli.ok("instance", "remove", "vm3")
    removed = json.loads(cli.ok("base", "gc", "--json").output)
    assert removed == [{"base": "b", "generation": n} for n in (1, 2, 3)]
    assert [g["number"] for g in show(cli, "b")["generations"]] == [4]


def test_a_delta_whose_parent_is_gone_is_one_line(tmp_path: Path) -> None:
    """A store changed by hand (generation 1 removed under a delta): one line, exit 3,
    nothing mounted."""
    cli = Cli(tmp_path / "store")
    src = make_tree(tmp_path / "src")
    (src / "usr/lib/data").write_bytes(os.urandom(1 << 20))
    cli.ok("base", "create", "b", "--from-dir", str(src))
    patch = tmp_path / "p"
    patch.mkdir()
    (patch / "f").write_text("2")
    cli.ok("base", "update", "b", "--apply-dir", str(patch))
    cli.ok("instance", "create", "vm", "--base", "b")
    gdir = tmp_path / "store" / "bases" / "b" / "generations" / "1"
    gdir.rename(tmp_path / "aside")
    target = tmp_path / "mnt"
    target.mkdir()
    res = cli.fails("mount", "vm", str(target), code=3)
    line = res.output.strip()
    assert line.count("\n") == 0 and "Traceback" not in line
    assert "generation 2 is a delta over generation 1, which is gone" in line
    assert not [m for m in mountinfo() if m.target.startswith(str(tmp_path))]
    res = cli.fails("base", "update", "b", "--apply-dir", str(patch), code=3)
    assert "which is gone" in res.output
    assert [g["number"] for g in show(cli, "b")["generations"]] == [2]


def test_a_delta_that_cannot_be_a_layer_is_stored_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A name starting with '.wh.' cannot be carried by a layer's tar (it would read as a
    whiteout): the update stores the generation whole instead of failing."""
    cli = Cli(tmp_path / "store")
    src = make_tree(tmp_path / "src")
    (src / "usr/lib/data").write_bytes(os.urandom(1 << 20))
    cli.ok("base", "create", "b", "--from-dir", str(src))
    patch = tmp_path / "p"
    (patch / "etc").mkdir(parents=True)
    (patch / "etc/.wh.odd").write_text("a file, not a whiteout\n")
    cli.ok("base", "update", "b", "--apply-dir", str(patch))
    assert "stored whole: its delta cannot be a layer" in caplog.text  # a warning, said
    gen = show(cli, "b")["generations"][-1]
    assert (gen["kind"], Path(gen["image"]).name) == ("full", "base.img")
    assert "a file, not a whiteout" in debugfs(Path(gen["image"]), "cat /etc/.wh.odd")
    assert not list((tmp_path / "store" / "tmp").iterdir())
