"""A reconcile scenario with one path per case of the docs/design.md table, built for real:
a base made from a directory, an instance whose changes are made through its mounted union
(so the upper layer is exactly what overlayfs writes), and a base update."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from tests.conftest import Cli
from unionimg.fs.manifest import scan_tree
from unionimg.layers.instance import u_layer
from unionimg.store.layout import Store

LINES = [f"line {i:02d} of a config file\n" for i in range(1, 31)]
TEXT = "".join(LINES)
SPACE_NAME = "nämé with space.conf"


def edit(text: str, lineno: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[lineno - 1] = new + "\n"
    return "".join(lines)


def base_tree(root: Path) -> Path:
    """Generation 1."""

    def put(rel: str, content: str | bytes, mode: int = 0o644) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content)
        else:
            p.write_bytes(content)
        os.chmod(p, mode)

    for n in (1, 2, 3, 4, 8, 9, 10, 11, 12, 13):
        put(f"c{n:02d}/file", f"case {n} original\n")
    put(f"c05/{SPACE_NAME}", TEXT)
    put("c06/text", TEXT)
    put("c07/data.bin", b"\x00\x01binary-v1\x00")
    for name in ("a", "b"):
        (root / "c14").mkdir(exist_ok=True)
        os.symlink("target-v1", root / "c14" / name)
    put("c15/x", "file in base\n")
    put("c16/dir/old", "old\n")
    put("c17/file", "never changes\n")
    put("special/a", "hardlinked in U\n")
    put("redir/dir/f", "x\n")
    return root


def base_patch(b1: Path) -> None:
    """Turn a copy of generation 1 into generation 2 (the admin's patch)."""
    for n in (1, 3, 11):
        (b1 / f"c{n:02d}/file").write_text(f"case {n} patched by the base\n")
    (b1 / "c04/file").write_text("same change on both sides\n")
    (b1 / f"c05/{SPACE_NAME}").write_text(edit(TEXT, 25, "line 25 patched by the base"))
    (b1 / "c06/text").write_text(edit(TEXT, 5, "line 05 as the base wants it"))
    (b1 / "c07/data.bin").write_bytes(b"\x00\x01binary-v2-base\x00")
    (b1 / "c08/file").unlink()
    (b1 / "c09/file").unlink()
    (b1 / "c12/file").write_text("case 12 new base content\n")
    os.chmod(b1 / "c13/file", 0o640)
    os.unlink(b1 / "c14/b")
    os.symlink("target-base", b1 / "c14/b")
    (b1 / "c15/x").write_text("file changed in base\n")
    (b1 / "c16/dir/added").write_text("added by base inside a dir U made opaque\n")
    (b1 / "new/nested/deep").mkdir(parents=True)
    (b1 / "new/nested/deep/file").write_text("case 1: brand new nested dirs\n")
    (b1 / "special/a").write_text("base changed a hardlinked file\n")


def local_changes(m: Path) -> None:
    """What the VM does, through its mounted union."""
    (m / "c02/file").write_text("case 2 local edit\n")
    data = (m / "c03/file").read_bytes()
    (m / "c03/file").write_bytes(data)  # accidental copy-up, identical to B0
    (m / "c04/file").write_text("same change on both sides\n")
    p = m / f"c05/{SPACE_NAME}"
    p.write_text(edit(p.read_text(), 3, "line 03 edited by the VM"))
    (m / "c06/text").write_text(edit(TEXT, 5, "line 05 as the VM wants it"))
    (m / "c07/data.bin").write_bytes(b"\x00\x01binary-v2-local\x00")
    (m / "c08/file").write_bytes((m / "c08/file").read_bytes())  # unmodified copy-up
    (m / "c09/file").write_text("case 9 local edit\n")
    (m / "c10/file").unlink()
    (m / "c11/file").unlink()
    os.chmod(m / "c12/file", 0o600)
    os.chmod(m / "c13/file", 0o600)
    os.unlink(m / "c14/a")
    os.symlink("target-local", m / "c14/a")
    os.unlink(m / "c14/b")
    os.symlink("target-local", m / "c14/b")
    (m / "c15/x").unlink()
    (m / "c15/x").mkdir()
    (m / "c15/x/inside").write_text("U made x a directory\n")
    shutil.rmtree(m / "c16/dir")
    (m / "c16/dir").mkdir()  # overlayfs marks it opaque
    (m / "c16/dir/mine").write_text("mine\n")
    os.link(m / "special/a", m / "special/a-link")
    os.mkfifo(m / "special/fifo")
    os.mknod(m / "special/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def build(cli: Cli, tmp: Path, *, name: str = "vm1") -> Path:
    """Base 'os' generations 1 and 2 and instance ``name`` with local changes on 1."""
    g1 = base_tree(tmp / "g1")
    cli.ok("base", "create", "os", "--from-dir", str(g1))
    cli.ok("instance", "create", name, "--base", "os")
    mnt = tmp / f"mnt-{name}"
    mnt.mkdir()
    cli.ok("mount", name, str(mnt))
    try:
        local_changes(mnt)
    finally:
        cli.ok("umount", str(mnt))
    g2 = tmp / "g2"
    shutil.copytree(g1, g2, symlinks=True)
    base_patch(g2)
    cli.ok("base", "update", "os", "--from-dir", str(g2))
    return mnt


def upper_state(store: Path, name: str, *, staging_ok: bool = False) -> dict[str, Any]:
    """Everything of the upper layer that matters, for comparing runs."""
    out: dict[str, Any] = {}
    with u_layer(Store(store), name, write=False) as u:
        for e in scan_tree(u / "upper"):
            out[e.path] = (
                e.kind,
                e.mode,
                e.uid,
                e.gid,
                e.sha256,
                e.target,
                e.rdev,
                e.opaque,
                e.xattrs,
            )
        assert staging_ok or not (u / "upper.new").exists(), "a staging tree was left behind"
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
