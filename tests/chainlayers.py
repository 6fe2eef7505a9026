"""TEST FIXTURE: a chain base -> A -> XA of layer images made by hand (issue 13, item 1).

Until a test goes through the layer store, the boot tests make their layers here the way the
shared design says a layer image is: a directory tree in overlayfs's upper format (whiteouts
are 0:0 character devices, opaque directories carry ``trusted.overlay.opaque=y``) put into a
raw ext4 image with ``mkfs.ext4 -d``, labeled ``L`` + the first 15 hex digits of its digest.
Making whiteouts and ``trusted.*`` xattrs needs root.

The chain (what a guest must see through it):

- the base gets :func:`add_base_files`: ``/etc/chain/base.txt``, ``gone.txt``, ``shared.txt``
  ("from BASE") and ``/opq/x``, ``/opq/y``;
- layer A adds ``/etc/chain/a.txt`` and overrides ``shared.txt`` ("from A"), and holds the
  probe: ``/sbin/chain-probe`` (prints ``unionimg-guest: chain ...`` lines), ``/sbin/chain-init``
  (probe, then power off: an ``init=`` for a bare guest) and the boot hook
  ``/etc/unionimg-boot.d/20-chain`` (runs the probe in the tiny fixture's guest);
- layer XA overrides ``shared.txt`` ("from XA"), whites out ``gone.txt`` and makes ``/opq``
  opaque with only ``/opq/z`` in it.

So through U -> XA -> A -> BASE the guest sees base.txt from BASE, a.txt from A, shared.txt
from XA, no gone.txt, and only z in /opq (:data:`EXPECTED`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from unionimg.runner import run

PROBE = """#!/bin/busybox sh
B=/bin/busybox
for f in base.txt gone.txt shared.txt a.txt; do
    if [ -e /etc/chain/$f ]; then
        echo "unionimg-guest: chain $f $($B cat /etc/chain/$f)"
    else
        echo "unionimg-guest: chain $f absent"
    fi
done
echo "unionimg-guest: chain opq $($B ls /opq | $B tr '\\n' ' ')"
echo "unionimg-guest: chain uptime $($B cut -d' ' -f1 /proc/uptime)"
$B grep ' / ' /proc/mounts | $B sed 's/^/unionimg-guest: chain root /'
"""

CHAIN_INIT = """#!/bin/busybox sh
/sbin/chain-probe
/bin/busybox sync
/bin/busybox poweroff -f
"""

HOOK = """#!/bin/sh
exec /sbin/chain-probe
"""

#: The probe's lines a guest must print when its union holds the whole chain.
EXPECTED = (
    "unionimg-guest: chain base.txt from BASE",
    "unionimg-guest: chain gone.txt absent",
    "unionimg-guest: chain shared.txt from XA",
    "unionimg-guest: chain a.txt from A",
    "unionimg-guest: chain opq z",
)


def label_of(digest: str) -> str:
    """The filesystem label of a layer image: ``L`` + the first 15 hex digits of its digest."""
    return "L" + digest[:15]


@dataclass(frozen=True)
class Layer:
    name: str
    tree: Path
    image: Path
    digest: str  # sha256 of the name and tree listing: stands in for the diff_id here

    @property
    def label(self) -> str:
        return label_of(self.digest)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def whiteout(path: Path) -> None:
    """An overlayfs whiteout at ``path``: a 0:0 character device (root only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(0, 0))


def opaque(directory: Path) -> None:
    """Mark ``directory`` opaque for overlayfs (root only: a trusted.* xattr)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.setxattr(directory, "trusted.overlay.opaque", b"y")


def add_base_files(root: Path) -> None:
    """The base's part of the chain, added to a rootfs directory before its BASE is made."""
    for name in ("base.txt", "gone.txt", "shared.txt"):
        _write(root / "etc/chain" / name, "from BASE\n")
    for name in ("x", "y"):
        _write(root / "opq" / name, f"{name}\n")


def make_image(layer_tree: Path, image: Path, label: str, size: str = "8M") -> Path:
    """A raw ext4 layer image of ``layer_tree`` labeled ``label`` (mkfs.ext4 -d, no mount)."""
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-d", str(layer_tree), str(image), size])
    image.chmod(0o444)
    return image


def _layer(where: Path, name: str) -> Layer:
    tree = where / f"{name}.tree"
    listing = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    digest = hashlib.sha256(f"{name}\n{listing}".encode()).hexdigest()
    image = make_image(tree, where / f"{name}.img", label_of(digest))
    return Layer(name, tree, image, digest)


def write_a(root: Path) -> None:
    """Layer A's changes, written into ``root`` (a layer tree, or a VM's mounted union)."""
    _write(root / "etc/chain/a.txt", "from A\n")
    _write(root / "etc/chain/shared.txt", "from A\n")
    _write(root / "sbin/chain-probe", PROBE, 0o755)
    _write(root / "sbin/chain-init", CHAIN_INIT, 0o755)
    _write(root / "etc/unionimg-boot.d/20-chain", HOOK, 0o755)


def write_xa_through_union(root: Path) -> None:
    """Layer XA's changes made through a VM's mounted union (over BASE and A): overlayfs
    itself writes the whiteout and the opaque directory into the upper layer."""
    _write(root / "etc/chain/shared.txt", "from XA\n")
    (root / "etc/chain/gone.txt").unlink()
    for child in (root / "opq").iterdir():
        child.unlink()
    (root / "opq").rmdir()
    _write(root / "opq/z", "z\n")


def make_chain(where: Path) -> tuple[Layer, Layer]:
    """Layers A and XA under ``where`` (``A.tree``/``A.img``, ``XA.tree``/``XA.img``).
    Returns them top first: (XA, A)."""
    write_a(where / "A.tree")
    xa = where / "XA.tree"
    _write(xa / "etc/chain/shared.txt", "from XA\n")
    whiteout(xa / "etc/chain/gone.txt")
    opaque(xa / "opq")
    _write(xa / "opq/z", "z\n")
    return _layer(where, "XA"), _layer(where, "A")


def extra_layer(where: Path, name: str) -> Layer:
    """A layer that changes nothing the probe looks at (one file of its own), for deeper
    chains in measurements."""
    _write(where / f"{name}.tree/etc/chain-extra/{name}", f"{name}\n")
    return _layer(where, name)


def lowers(layers: tuple[Layer, ...] | list[Layer]) -> str:
    """The kernel argument naming ``layers`` (top first) above BASE."""
    return "unionimg.lowers=" + ",".join([*(layer.label for layer in layers), "BASE"])
