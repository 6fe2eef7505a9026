"""Bases: named OS images made of immutable, numbered generations with Mercurial history.

A generation is built entirely in staging (``tmp/``) — image, manifest, kernel, metadata,
and its changeset in the base's history — and appears by one ``rename(2)``. A crash before
the rename leaves at most a history changeset that no generation names; the next update
strips it before committing (:func:`_repair_history`).
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import glob
import itertools
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unionimg.entries import (
    Change,
    Entry,
    changes_from_json,
    changes_to_json,
    mark_outside,
    outside_roots,
    sidecar_text,
)
from unionimg.errors import (
    Conflict,
    NotFound,
    StoreFull,
    ToolFailed,
    UnionimgError,
    UsageError,
)
from unionimg.faults import checkpoint
from unionimg.fs.image import default_size, disk_usage, make_ext4, usage_of
from unionimg.fs.manifest import Manifest, diff_manifests, scan_tree, write_manifest
from unionimg.fs.mounts import (
    is_mounted,
    mount_image,
    mount_overlay,
    require_root,
    umount,
    unmount_tree,
)
from unionimg.fs.space import (
    SPACE_MARGIN,
    WriteWatch,
    free_space,
    full_message,
    require_space,
    sync_store,
)
from unionimg.layers import history, identity, sandbox
from unionimg.names import check_name, check_outside_store, human_size, shown
from unionimg.runner import stream
from unionimg.store.layout import Store, now_iso, read_record, write_atomic, write_record
from unionimg.store.records import BaseMeta, GenerationMeta, JsonObject

if TYPE_CHECKING:
    from unionimg.layers import gendelta, layerstore
    from unionimg.layers.layer import BlobInfo

# The layer cache (layerstore, layer: zstandard and the layer records) and the delta planner
# are imported by the functions that make or adopt a generation's layer, not at module level:
# reading generations is on every command's path (an 'instance create' among them, timed by
# bench/provision.py) and needs neither.

_log = logging.getLogger(__name__)
RESERVED_TOP = (".unionimg", ".hg")
RUN_LOG = "run.log"  # in a generation's directory: what its --run command printed
RUN_LOG_LIMIT = 16 << 20  # bytes of it kept; the terminal sees all of it
#: ``echo(fd, data)``: where ``--run``'s output goes as it comes (1: stdout, 2: stderr)
Echo = Callable[[int, bytes], None]


@dataclass(frozen=True)
class Generation:
    base: str
    number: int
    dir: Path
    created: str
    size: int
    node: str
    kernel: str | None
    files: int
    source: str
    kind: str = "full"  # full: base.img holds the whole tree; delta: layer.img over parent
    parent: int | None = None  # the generation a delta lies over
    layer: str | None = None  # the diff_id of its layer (sha256:HEX), once known

    @property
    def image(self) -> Path:
        """The generation's own image: its whole tree (``base.img``, label BASE) or, for a
        delta, its changes from ``parent`` (``layer.img``, label :attr:`label`)."""
        return self.dir / ("layer.img" if self.kind == "delta" else "base.img")

    @property
    def label(self) -> str:
        """The filesystem label of :attr:`image`: BASE, or ``L`` + 15 hex digits of the
        delta layer's diff_id (what the guest's initramfs finds it by)."""
        if self.kind != "delta":
            return "BASE"
        return layer_label(self.layer or "")

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.sqlite"

    def manifest(self) -> Manifest:
        return Manifest(self.manifest_path)

    @property
    def run_log(self) -> Path | None:
        """The output of the ``--run`` command that made this generation, if one did."""
        path = self.dir / RUN_LOG
        return path if path.is_file() else None

    @property
    def kernel_path(self) -> Path | None:
        return self.dir / "vmlinuz" if self.kernel else None

    def to_json(self) -> JsonObject:
        """What ``base show --json`` says of the generation."""
        return {
            "number": self.number,
            "image": str(self.image),
            "kind": self.kind,
            "parent": self.parent,
            "layer": self.layer,
            "created": self.created,
            "size": self.size,
            "disk_usage": disk_usage(self.image),
            "files": self.files,
            "hg_node": self.node,
            "kernel": str(self.kernel_path) if self.kernel_path else None,
            "kernel_version": self.kernel,
            "source": self.source,
            "run_log": str(self.run_log) if self.run_log else None,
        }


def hg_template(store: Store) -> Path:
    """The store's empty Mercurial repository, made by ``hg init`` the first time: a new
    repository (a base's history, an instance's) is a copy of it, a few small files,
    instead of a Mercurial start-up each."""
    return store.publish(store.root / "templates" / "hg-empty", history.init_repo)


def layer_label(diff_id: str) -> str:
    """``L`` + the first 15 hex digits of a layer's diff_id (ext4 labels hold 16 chars)."""
    return "L" + diff_id.removeprefix("sha256:")[:15]


def _load_generation(base: str, gdir: Path) -> Generation:
    meta = read_record(gdir / GenerationMeta.FILE, GenerationMeta)
    return Generation(
        base=base,
        number=meta.number,
        dir=gdir,
        created=meta.created,
        size=meta.size,
        node=meta.hg_node,
        kernel=meta.kernel,
        files=meta.files,
        source=meta.source,
        kind=meta.kind,
        parent=meta.parent,
        layer=meta.layer,
    )


def list_bases(store: Store) -> list[str]:
    if not store.bases_dir.is_dir():
        return []
    return sorted(p.name for p in store.bases_dir.iterdir() if (p / BaseMeta.FILE).is_file())


def generations(store: Store, name: str) -> list[Generation]:
    bdir = store.base_dir(name)
    if not (bdir / BaseMeta.FILE).is_file():
        raise NotFound(f"base '{name}' does not exist; see 'unionimg base list'")
    gens = []
    for gdir in (bdir / "generations").iterdir():
        if gdir.name.isdigit() and (gdir / GenerationMeta.FILE).is_file():
            gens.append(_load_generation(name, gdir))
    return sorted(gens, key=lambda g: g.number)


def get_generation(store: Store, name: str, number: int | None = None) -> Generation:
    gens = generations(store, name)
    if not gens:
        raise NotFound(f"base '{name}' has no generation")
    if number is None:
        return gens[-1]
    for g in gens:
        if g.number == number:
            return g
    have = ", ".join(str(g.number) for g in gens)
    raise NotFound(f"base '{name}' has no generation {number} (it has {have})")


# -- generation chains ---------------------------------------------------------------------
#: a new generation is stored as a delta layer over its parent when that layer holds less than
#: this share of the bytes a full image of the generation holds. Below half, the delta saves
#: at least half an image per update; above it, the saving is small while the delta keeps its
#: parent's whole image alive (gc must keep every generation a kept delta lies on) and adds a
#: layer to every lookup, mount and boot: a full image is the better buy.
DELTA_MAX_SHARE = 0.5
#: at most this many delta generations lie over one full image (the next update makes a full
#: one): every layer of a chain is a disk of each VM on it (UML attaches at most 16 ubd
#: disks, beside U and the VM's own snapshot layers) and one more lower per overlay lookup.
MAX_DELTA_CHAIN = 6


def chain(store: Store, gen: Generation) -> list[Generation]:
    """``gen`` and the generations its tree is made of, top to bottom: itself, then (for a
    delta) its parent's chain, down to a full generation. A full generation is its own chain."""
    out = [gen]
    while out[-1].kind == "delta":
        below = out[-1]
        assert below.parent is not None  # GenerationMeta refuses a delta without one
        try:
            parent = get_generation(store, gen.base, below.parent)
        except NotFound:
            raise NotFound(
                f"base '{gen.base}' generation {below.number} is a delta over generation "
                f"{below.parent}, which is gone (the store was changed by hand?); "
                "restore it from a backup"
            ) from None
        if parent.number >= below.number or len(out) > 4 * MAX_DELTA_CHAIN:
            raise NotFound(
                f"base '{gen.base}' generation {below.number} names generation "
                f"{below.parent} as its parent, which cannot be (a loop); restore the base "
                "from a backup"
            )
        out.append(parent)
    return out


def delta_dependents(store: Store, kept: list[Generation]) -> dict[int, list[int]]:
    """Generation number → the kept delta generations (of ``kept``) whose chain holds it:
    what ``base gc`` must keep with them, and why."""
    out: dict[int, list[int]] = {}
    for g in kept:
        for below in chain(store, g)[1:]:
            out.setdefault(below.number, []).append(g.number)
    return {n: sorted(v) for n, v in out.items()}


def chain_images(store: Store, gen: Generation) -> tuple[list[Generation], Generation]:
    """(the delta generations of ``gen``'s chain, top to bottom; the full one at its bottom,
    whose image is labeled BASE): what a VM on ``gen`` boots with."""
    gens = chain(store, gen)
    return gens[:-1], gens[-1]


def mount_layers(store: Store, gen: Generation, where: Path) -> list[Path]:
    """Mount every image of ``gen``'s chain read-only below ``where`` (``where/0`` the top,
    ``where/N`` the full image): the lower directories, top to bottom, of an overlay that
    shows the generation's whole tree. A full generation is mounted at ``where`` itself
    (one lower, as before generations had deltas). Undone by :func:`unmount_layers`."""
    gens = chain(store, gen)
    if len(gens) == 1:
        mount_image(gen.image, where, readonly=True, exclusive=False)
        return [where]
    out: list[Path] = []
    try:
        for i, g in enumerate(gens):
            mount_image(g.image, where / str(i), readonly=True, exclusive=False)
            out.append(where / str(i))
    except BaseException:
        unmount_layers(where)
        raise
    return out


def unmount_layers(where: Path) -> None:
    """Undo :func:`mount_layers` or :func:`mount_generation` (deepest mount first)."""
    unmount_tree(where)
    if where.is_dir() and not is_mounted(where):
        for sub in where.iterdir():
            if sub.is_dir() and not is_mounted(sub):
                with contextlib.suppress(OSError):
                    sub.rmdir()


def mount_generation(store: Store, gen: Generation, where: Path) -> Path:
    """Mount ``gen``'s whole tree read-only below ``where``; returns its root (``where``
    for a full generation; for a delta, ``where/tree``: a read-only overlay of its chain).
    Undone by :func:`unmount_layers` (``where``)."""
    lowers = mount_layers(store, gen, where)
    if len(lowers) == 1:
        return lowers[0]
    tree = where / "tree"  # longer than each layer's "N": unmount_tree takes it first
    try:
        mount_overlay(lowers, None, None, tree)
    except BaseException:
        unmount_layers(where)
        raise
    return tree


@contextlib.contextmanager
def generation_tree(store: Store, gen: Generation, where: Path) -> Iterator[Path]:
    """``gen``'s whole tree, read-only, while the context lasts (:func:`mount_generation`)."""
    root = mount_generation(store, gen, where)
    try:
        yield root
    finally:
        unmount_layers(where)


def _origin(gen: Generation) -> layerstore.Origin:
    from unionimg.layers import layerstore  # deferred on purpose (see above)

    return layerstore.Origin(
        text=f"base {gen.base} generation {gen.number}", base=gen.base, generation=gen.number
    )


def _adopt(store: Store, gen: Generation, info: BlobInfo, parent: str | None) -> layerstore.Layer:
    from unionimg.layers import layerstore  # deferred on purpose (see above)

    return layerstore.adopt_image(
        store,
        gen.image,
        diff_id=info.diff_id,
        tar_size=info.tar_size,
        entries=info.entries,
        parent=parent,
        kind="delta" if gen.kind == "delta" else "base",
        label=gen.label,
        origin=_origin(gen),
    )


def _adopted(store: Store, gen: Generation) -> layerstore.Layer | None:
    """The layer adopted for ``gen``: named for it and its image ``gen``'s own (the same
    inode), so a layer left by a removed base of the same name never stands in for it."""
    from unionimg.layers import layerstore  # deferred on purpose (see above)

    try:
        st = gen.image.stat()
    except OSError:
        return None
    for layer in layerstore.list_layers(store):
        m = layer.meta
        if m.kind in ("base", "delta") and (m.base, m.generation) == (gen.base, gen.number):
            try:
                ls = layer.image.stat()
            except OSError:
                continue
            if (ls.st_dev, ls.st_ino) == (st.st_dev, st.st_ino):
                return layer
    return None


def generation_layer(store: Store, gen: Generation) -> layerstore.Layer:
    """The layer of generation ``gen`` in the store's layer cache (kind ``base`` for a full
    generation, ``delta`` over its parent's layer for a delta one), adopted on first ask: its
    image hard-linked, never copied. A full generation's diff_id costs one read of its tree
    (its tar's sha256: 5.5 s for the 760 MiB Debian fixture), paid once, when a delta, a
    snapshot or a push first needs it; a delta's was computed when it was made."""
    from unionimg.layers import layerstore  # deferred on purpose (see above)

    found = _adopted(store, gen)
    if found is not None:
        return found
    if gen.kind == "delta":
        assert gen.parent is not None and gen.layer is not None
        parent = generation_layer(store, get_generation(store, gen.base, gen.parent))
        with store.staging(f"layer-{gen.base}-{gen.number}") as stage:
            mnt = stage / "layer"
            mount_image(gen.image, mnt, readonly=True, exclusive=False)
            try:
                info = layerstore.tree_digest(mnt, kind="delta")
            finally:
                umount(mnt)
        if info.diff_id != gen.layer:
            raise ToolFailed(
                f"base '{gen.base}' generation {gen.number}'s layer image holds "
                f"{info.diff_id}, not the {gen.layer} it was made as: restore the base "
                "from a backup"
            )
        return _adopt(store, gen, info, parent.diff_id)
    with store.staging(f"layer-{gen.base}-{gen.number}") as stage:
        mnt = stage / "base"
        mount_image(gen.image, mnt, readonly=True, exclusive=False)
        try:
            info = layerstore.tree_digest(mnt, kind="base")
        finally:
            umount(mnt)
    return _adopt(store, gen, info, None)


# -- building -----------------------------------------------------------------------------
def _check_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist; give an existing directory")
    if not path.is_dir():
        raise UsageError(f"{what} {path} is not a directory")
    return path.resolve()


#: x86 boot protocol (Documentation/arch/x86/boot.rst): the setup header of a bzImage.
_BOOT_FLAG_AT, _HDRS_AT, _PROTOCOL_AT, _VERSION_PTR_AT = 0x1FE, 0x202, 0x206, 0x20E
_MIN_PROTOCOL = 0x0200  # an initrd needs boot protocol 2.00 or later


def _bzimage_version(head: bytes) -> str | None:
    """The version banner a bzImage's setup header points at, or None when ``head`` (its
    first 64 KiB) has no x86 boot header: boot flag 0xAA55, magic ``HdrS``, protocol ≥ 2.00."""
    if len(head) < _VERSION_PTR_AT + 2 or head[_HDRS_AT : _HDRS_AT + 4] != b"HdrS":
        return None
    if int.from_bytes(head[_BOOT_FLAG_AT : _BOOT_FLAG_AT + 2], "little") != 0xAA55:
        return None
    if int.from_bytes(head[_PROTOCOL_AT : _PROTOCOL_AT + 2], "little") < _MIN_PROTOCOL:
        return None
    ptr = int.from_bytes(head[_VERSION_PTR_AT : _VERSION_PTR_AT + 2], "little")
    banner = head[ptr + 0x200 : ptr + 0x200 + 256].split(b"\0", 1)[0] if ptr else b""
    text = banner.decode("ascii", "replace").split(" ", 1)[0]
    return text if text.isprintable() and text else ""


def _check_kernel(kernel: Path | None) -> Path | None:
    """``--kernel``: an x86 bzImage (a ``vmlinuz``), what QEMU, Xen and SYSLINUX (VirtualBox)
    boot directly. An ELF (an uncompressed ``vmlinux`` or a UML kernel) is refused by name."""
    if kernel is None:
        return None
    shown_path = shown(str(kernel), 200)
    if not kernel.exists():
        raise UsageError(f"kernel {shown_path} does not exist; give the path of a vmlinuz file")
    if kernel.is_dir():
        raise UsageError(
            f"kernel {shown_path} is a directory; give the path of a vmlinuz file in it"
        )
    if not kernel.is_file():
        raise UsageError(f"kernel {shown_path} is not a regular file; give a vmlinuz file")
    try:
        with open(kernel, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise UsageError(f"kernel {shown_path} cannot be read: {exc.strerror}") from None
    if not head:
        raise UsageError(f"kernel {shown_path} is empty; give the path of a vmlinuz file")
    if head.startswith(b"\x7fELF"):
        raise UsageError(
            f"kernel {shown_path} is an ELF file (an uncompressed vmlinux or a UML kernel), "
            "not a bootable x86 kernel image; give a bzImage such as /boot/vmlinuz-VERSION"
        )
    if _bzimage_version(head) is None:
        raise UsageError(
            f"kernel {shown_path} is not a bootable x86 kernel image (no bzImage boot "
            "header, 'HdrS' at 0x202); give a vmlinuz file such as /boot/vmlinuz-VERSION"
        )
    return kernel.resolve()


def _kernel_version(vmlinuz: Path) -> str:
    """``6.1.0-28-amd64`` from ``vmlinuz-6.1.0-28-amd64``, else the kernel's own banner."""
    name = vmlinuz.name
    if name.startswith("vmlinuz-"):
        return name[len("vmlinuz-") :]
    with open(vmlinuz, "rb") as fh:
        return _bzimage_version(fh.read(1 << 16)) or "unknown"


def _tree_kernel(tree: Path) -> Path | None:
    found = sorted(glob.glob(str(tree / "boot" / "vmlinuz-*")))
    return Path(found[-1]) if found else None


@contextlib.contextmanager
def _staging_tree(store: Store, stage: Path, lowers: list[Path]) -> Iterator[Path]:
    """An overlay over ``lowers`` with a private upper in ``stage``: the generation's tree,
    writable without touching the source directory or the previous generation."""
    upper, work, tree = stage / "upper", stage / "work", stage / "tree"
    for d in (upper, work, tree):
        d.mkdir(mode=0o755)
    mount_overlay(lowers, upper, work, tree)
    try:
        yield tree
    finally:
        umount(tree)


def _build_generation(
    store: Store,
    name: str,
    number: int,
    tree: Path,
    gdir: Path,
    *,
    size: int | None,
    kernel: Path | None,
    source: str,
    parent: Generation | None,
    repo: Path,
    message: str,
    unless_unchanged: bool = False,
    full: bool = False,
) -> tuple[Generation, BlobInfo | None] | None:
    """Make the generation of ``tree`` in ``gdir`` (and the digests of its delta layer, when
    it is one); with ``unless_unchanged``, None (nothing made) when it would equal
    ``parent``: the same entries, image size and kernel."""
    op = "base-create" if parent is None else "base-update"
    checkpoint(f"{op}:staged")
    identity.scrub_base(tree)  # per-VM identity never enters a generation (identity.py)
    clock = [time.monotonic()]
    entries = list(scan_tree(tree, skip_top=("lost+found",)))
    clock.append(time.monotonic())
    for e in entries:
        if e.path.split("/")[1] in RESERVED_TOP and e.path != "/":
            raise UsageError(
                f"the tree holds {e.path}, a name unionimg reserves for its history; "
                "remove it from the source directory"
            )
    used, inodes = usage_of(entries)
    if size is None:
        size = max(default_size(used, inodes), parent.size if parent else 0)
    elif size < used:
        raise UsageError(
            f"size {human_size(size)} is too small for {source} "
            f"({human_size(used)} of files); give a larger --size"
        )
    if unless_unchanged and parent is not None and _unchanged(entries, size, kernel, tree, parent):
        return None
    plan = None if full else _delta_plan(store, entries, used, parent)
    clock.append(time.monotonic())
    require_space(
        gdir.parent,
        _generation_estimate(entries, used, inodes, size, kernel or _tree_kernel(tree), parent)
        - (used - plan.used if plan is not None else 0),
        f"{'create' if parent is None else 'update'} base {name}",
    )
    gdir.mkdir(mode=0o700)
    checkpoint(f"{op}:space-checked")
    info = None
    if plan is None:
        make_ext4(gdir / "base.img", "BASE", tree, size, inodes=inodes)
    else:
        info = _make_delta(tree, plan, gdir)
        if info is None:
            make_ext4(gdir / "base.img", "BASE", tree, size, inodes=inodes)
    clock.append(time.monotonic())
    write_manifest(entries, gdir / "manifest.sqlite", {"base": name, "generation": str(number)})
    checkpoint(f"{op}:image-made")
    kernel_src = kernel or _tree_kernel(tree)
    kernel_version = None
    if kernel_src is None and parent is not None and parent.kernel_path is not None:
        kernel_src = parent.kernel_path
        kernel_version = parent.kernel
    if kernel_src is not None:
        shutil.copyfile(kernel_src, gdir / "vmlinuz")
        os.chmod(gdir / "vmlinuz", 0o600)
        kernel_version = kernel_version or _kernel_version(kernel_src)
    # history: the sidecar goes next to the files in the overlay's upper, never in the image
    marked = mark_outside(entries)  # what Mercurial cannot hold: in the sidecar only
    history.write_sidecar(tree, sidecar_text(marked), {"generation": f"{name} {number}\n"})
    outside = [p[1:] for p in outside_roots(marked)]
    node = history.commit_tree_into(repo, tree, history_node(parent), message, outside)
    checkpoint(f"{op}:committed")
    shutil.rmtree(tree / history.SIDECAR_DIR)
    meta = GenerationMeta(
        number=number,
        created=now_iso(),
        size=size,
        hg_node=node,
        kernel=kernel_version,
        files=len(entries),
        source=source,
        kind="full" if info is None else "delta",
        parent=None if info is None or parent is None else parent.number,
        layer=None if info is None else info.diff_id,
    )
    write_record(gdir / GenerationMeta.FILE, meta)
    clock.append(time.monotonic())
    _log.debug(
        "generation %d (%s): scan %.1f s, unchanged check and delta plan %.1f s, "
        "image %.1f s, the rest (manifest, kernel, history) %.1f s",
        number,
        meta.kind,
        *(b - a for a, b in itertools.pairwise(clock)),
    )
    return _load_generation(name, gdir), info


def _delta_plan(
    store: Store, entries: list[Entry], used: int, parent: Generation | None
) -> gendelta.Plan | None:
    """The delta layer of ``entries`` over ``parent`` when storing the generation so is
    cheaper: its bytes below :data:`DELTA_MAX_SHARE` of the full tree's and the parent's
    chain short enough (:data:`MAX_DELTA_CHAIN`); else None (a full image)."""
    from unionimg.layers import gendelta  # deferred on purpose (see above)

    if parent is None or len(chain(store, parent)) > MAX_DELTA_CHAIN:
        return None
    with parent.manifest() as m:
        plan = gendelta.plan(entries, m)
    return plan if plan.used < DELTA_MAX_SHARE * used else None


def _make_delta(tree: Path, plan: gendelta.Plan, gdir: Path) -> BlobInfo | None:
    """Write ``plan``'s layer next to ``gdir`` and make its image ``gdir/layer.img``
    (labeled from its diff_id); its digests. Its blob is not kept: the layer store makes
    it from the image when a push asks (:func:`.layerstore.blob_path`). None (nothing
    left) when the tree cannot be a layer (a name starting with ``.wh.``, which a layer's
    tar cannot carry): the generation is then stored whole."""
    from unionimg.layers import gendelta, layerstore  # deferred on purpose (see above)
    from unionimg.layers.layer import LayerRefused  # deferred on purpose (see above)

    layer_dir = gdir.with_name("delta-tree")
    layer_dir.mkdir(mode=0o755)
    gendelta.write(tree, plan, layer_dir)
    try:
        info = layerstore.tree_digest(layer_dir, kind="delta")
    except LayerRefused as exc:
        _log.warning("the generation is stored whole: its delta cannot be a layer (%s)", exc)
        shutil.rmtree(layer_dir)
        return None
    make_ext4(
        gdir / "layer.img",
        layer_label(info.diff_id),
        layer_dir,
        default_size(plan.used, plan.inodes),
        inodes=plan.inodes,
    )
    # the image is the layer: its tree gives the same tar (no lost+found, the same root)
    layerstore._same_root(gdir / "layer.img", layer_dir)
    shutil.rmtree(layer_dir)
    return info


def _unchanged(
    entries: list[Entry], size: int, kernel: Path | None, tree: Path, parent: Generation
) -> bool:
    """Whether a generation of ``entries`` would equal ``parent``: every path the same
    (type, content, mode, owner, xattrs: what ``base diff`` compares), none more or fewer,
    the same image size and kernel. One lookup per path in the parent's manifest."""
    if size != parent.size:
        return False
    kernel_src = kernel or _tree_kernel(tree)
    if kernel_src is not None and (
        parent.kernel_path is None or not filecmp.cmp(kernel_src, parent.kernel_path, False)
    ):
        return False
    with parent.manifest() as m:
        if len(m) != len(entries):
            return False
        return all(e.same(m.get(e.path)) for e in entries)


def _generation_estimate(
    entries: list[Entry],
    used: int,
    inodes: int,
    size: int,
    kernel: Path | None,
    parent: Generation | None,
) -> int:
    """About how many bytes a new generation adds to the store: the image's data and the
    metadata mke2fs writes (it stays sparse), the SQLite manifest, the history (each file
    that changed since ``parent``, compressed at worst = raw; the sidecar; the manifest
    revision) and the kernel."""
    changed = used
    if parent is not None:
        changed = 0
        with parent.manifest() as m:
            for e in entries:
                if e.kind == "file" and not e.same_content(m.get(e.path)):
                    changed += e.size
    if kernel is None and parent is not None:
        kernel = parent.kernel_path
    kernel_bytes = kernel.stat().st_size if kernel is not None and kernel.is_file() else 0
    image = used + inodes * 256 + (4 << 20) + size // 65536
    return image + changed + len(entries) * 1100 + kernel_bytes


def create(
    store: Store, name: str, from_dir: Path, *, size: int | None = None, kernel: Path | None = None
) -> Generation:
    check_name(name, "base")
    src = _check_dir(from_dir, "source directory")
    check_outside_store(src, store.root, "source directory")
    kernel = _check_kernel(kernel)
    require_root("base create")
    with store.lock(f"base-{name}", purpose=f"base create {name}"):
        if store.base_dir(name).exists():
            raise Conflict(f"base '{name}' already exists; use 'unionimg base update {name}'")
        require_space(store.root, 0, f"create base {name}")  # the tree's own check comes later
        with store.staging(f"base-{name}") as stage, WriteWatch(stage) as watch:
            bdir = stage / "base"
            bdir.mkdir(mode=0o700)
            (bdir / "generations").mkdir(mode=0o700)
            repo = bdir / "history"
            history.init_repo(repo, template=hg_template(store))
            write_record(bdir / BaseMeta.FILE, BaseMeta(name, now_iso()))
            with _staging_tree(store, stage, [src]) as tree:
                made = _build_generation(
                    store,
                    name,
                    1,
                    tree,
                    bdir / "generations" / "1",
                    size=size,
                    kernel=kernel,
                    source=str(src),
                    parent=None,
                    repo=repo,
                    message=f"{name} generation 1: created from {src}",
                )
                assert made is not None  # made: nothing to compare a first generation with
                gen = made[0]
            sync_store(watch, f"create base {name}")  # all of it on disk before it appears
            os.rename(bdir, store.base_dir(name))
            checkpoint("base-create:published")
    return get_generation(store, name, gen.number)


# -- generations made from layers (a deploy on a host) -------------------------------------------
def history_node(gen: Generation | None) -> str | None:
    """The Mercurial changeset of ``gen`` in its base's history; None for none, or for a
    generation made from a layer (:func:`generation_from_layer`), which has none: its
    ``hg_node`` is its layer's diff_id, never a changeset."""
    if gen is None or len(gen.node) != 40 or not set(gen.node) <= set("0123456789abcdef"):
        return None
    return gen.node


def generation_from_layer(
    store: Store,
    name: str,
    number: int,
    layer: layerstore.Layer,
    *,
    parent: Generation | None = None,
) -> Generation:
    """Make generation ``number`` of base ``name`` (the base too, when the store lacks it)
    straight from ``layer``, a layer of the store's cache whose digests were checked when it
    was pulled: what a host does when a deploy needs a generation it lacks, so VMs made from
    the system's layers lie on the same generation number and tree as on the controller.

    - a ``base`` layer (a whole tree, no parent) becomes a full generation: its image IS
      the generation's ``base.img`` (a hard link, labelled BASE);
    - a ``delta`` layer becomes a delta generation over ``parent`` (the generation whose
      layer is the delta's parent layer): its image is the generation's ``layer.img``.

    Nothing is copied and no ``mke2fs`` runs: the generation's manifest is a scan of its
    whole tree (the image, or the overlay of its chain, mounted read-only; ``lost+found``
    left out as ``base create`` leaves it out) or, for a whole base layer pulled here, the
    same records made from its verified blob as it was extracted (no second read of the
    tree: :func:`.layerstore.tree_manifest`), its kernel the tree's newest
    ``/boot/vmlinuz-*`` (else its parent's). Its history is not recorded here (no
    Mercurial commit of the whole tree, which ``base create`` pays): ``base log`` shows
    only what this store committed itself, and the generation's ``hg_node`` is its layer's
    diff_id (:func:`history_node`). Built in staging, it appears by one rename."""
    check_name(name, "base")
    require_root("making a base generation from a layer")
    m = layer.meta
    short = layer.short
    if m.kind == "base":
        if parent is not None or m.parent is not None:
            raise UsageError(f"layer {short} is a whole base: it lies over no generation")
        if m.label != "BASE":
            raise ToolFailed(
                f"base layer {short} here is labelled {m.label}, not BASE (pulled by an older "
                "unionimg?): remove it ('layer gc') and deploy again"
            )
    elif m.kind == "delta":
        if parent is None or parent.base != name or parent.number >= number:
            raise UsageError(f"delta layer {short} needs its parent generation of base {name}")
        if parent.layer is not None and parent.layer != m.parent:
            raise Conflict(
                f"delta layer {short} lies over layer {m.parent}, but base {name} generation "
                f"{parent.number} here is layer {parent.layer}; nothing was changed"
            )
        if m.label != layer_label(m.diff_id):
            raise ToolFailed(f"delta layer {short} is labelled {m.label}; refused")
    else:
        raise UsageError(f"layer {short} is a {m.kind} layer, not a base generation's")
    full = m.kind == "base"
    with store.lock(f"base-{name}", purpose=f"base {name} generation {number} from a layer"):
        bdir = store.base_dir(name)
        new_base = not (bdir / BaseMeta.FILE).is_file()
        if new_base and bdir.exists():
            raise Conflict(f"{bdir} exists but is no base; remove it by hand")
        final = bdir / "generations" / str(number)
        if final.exists():
            raise Conflict(f"base '{name}' already has a generation {number}")
        with store.staging(f"gen-{name}-{number}") as stage, WriteWatch(stage) as watch:
            if new_base:
                top = stage / "base"
                (top / "generations").mkdir(mode=0o700, parents=True)
                history.init_repo(top / "history", template=hg_template(store))
                write_record(top / BaseMeta.FILE, BaseMeta(name, now_iso()))
                gdir = top / "generations" / str(number)
            else:
                top = gdir = stage / "gen"
            gdir.mkdir(mode=0o700)
            image = gdir / ("base.img" if full else "layer.img")
            os.link(layer.image, image)  # the layer's own image: one inode, no copy
            mnt = stage / "mnt"
            try:
                if full:
                    mount_image(image, mnt, readonly=True, exclusive=False)
                    tree = mnt
                else:
                    assert parent is not None
                    mount_image(image, mnt / "t", readonly=True, exclusive=False)
                    below = mount_layers(store, parent, mnt / "b")
                    tree = mnt / "overlay-of-the-chain"  # the longest path: unmounted first
                    mount_overlay([mnt / "t", *below], None, None, tree)
                entries = _layer_entries(layer, tree)
                for e in entries:
                    if e.path != "/" and e.path.split("/")[1] in RESERVED_TOP:
                        raise ToolFailed(
                            f"layer {short} holds {e.path}, a name unionimg reserves; refused"
                        )
                write_manifest(entries, gdir / "manifest.sqlite",
                               {"base": name, "generation": str(number)})  # fmt: skip
                kernel_src = _tree_kernel(tree)
                kernel_version = None
                if kernel_src is not None:
                    shutil.copyfile(kernel_src, gdir / "vmlinuz")
                    kernel_version = _kernel_version(kernel_src)
                elif parent is not None and parent.kernel_path is not None:
                    shutil.copyfile(parent.kernel_path, gdir / "vmlinuz")
                    kernel_version = parent.kernel
                if kernel_version is not None:
                    os.chmod(gdir / "vmlinuz", 0o600)
            finally:
                unmount_layers(mnt)
            used, inodes = usage_of(entries)
            size = image.stat().st_size if full else default_size(used, inodes)
            meta = GenerationMeta(
                number=number,
                created=now_iso(),
                size=max(size, parent.size) if parent is not None else size,
                hg_node=m.diff_id,
                kernel=kernel_version,
                files=len(entries),
                source=f"layer {m.diff_id}" + (f" ({m.origin})" if m.origin else ""),
                kind="full" if full else "delta",
                parent=None if full or parent is None else parent.number,
                layer=m.diff_id,
            )
            write_record(gdir / GenerationMeta.FILE, meta)
            sync_store(watch, f"make base {name} generation {number}")
            if new_base:
                os.rename(top, bdir)
            else:
                os.rename(gdir, final)
    return get_generation(store, name, number)


def _layer_entries(layer: layerstore.Layer, tree: Path) -> list[Entry]:
    """The manifest entries of a generation made from ``layer`` (its whole ``tree``
    mounted): those its verified blob's extraction recorded, for a whole base layer pulled
    here (:func:`.layerstore.tree_manifest`: the same records, without reading the tree
    again), else a scan of ``tree``."""
    from unionimg.layers import layerstore  # deferred on purpose (see above)

    started = time.monotonic()
    recorded = layerstore.tree_manifest(layer)
    entries = recorded if recorded is not None else scan_tree(tree, skip_top=("lost+found",))
    _log.debug("manifest of layer %s (%s): %.1f s", layer.short,
               "recorded" if recorded is not None else "scanned",
               time.monotonic() - started)  # fmt: skip
    return entries


def _repair_history(store: Store, name: str, gens: list[Generation]) -> None:
    """Strip changesets a crashed update committed without making its generation."""
    known = {g.node for g in gens}
    with history.open_repo(store.base_dir(name) / "history") as repo:
        while (tip := repo.tip()) is not None and tip not in known:
            repo.strip(tip)


@dataclass(frozen=True)
class Updated:
    """What ``base update`` did: the new generation, or (``changed`` False: the command
    changed nothing) the latest one, which stays."""

    generation: Generation
    changed: bool


def update_base(
    store: Store,
    name: str,
    *,
    from_dir: Path | None = None,
    apply_dir: Path | None = None,
    command: str | None = None,
    size: int | None = None,
    kernel: Path | None = None,
    echo: Echo | None = None,
    full: bool = False,
) -> Updated:
    """Make generation N+1 of ``name`` from a directory, a directory laid over N, or N
    changed by ``command``. ``command``'s output goes to ``echo`` as it comes and into the
    new generation's ``run.log``; a command that changes nothing makes no generation
    (``Updated.changed`` is False; the staging is removed). The generation is a delta layer
    over N where that is cheaper (:func:`_delta_plan`), unless ``full``."""
    check_name(name, "base")
    modes = [m for m in (from_dir, apply_dir, command) if m is not None]
    if len(modes) != 1:
        raise UsageError("give exactly one of --from-dir, --apply-dir or --run")
    src = _check_dir(from_dir or apply_dir, "directory") if command is None else None  # type: ignore[arg-type]
    if src is not None:
        check_outside_store(src, store.root, "--from-dir" if from_dir else "--apply-dir")
    if command is not None and not command.strip():
        raise UsageError("--run needs a command, e.g. --run 'apt-get -y upgrade'")
    kernel = _check_kernel(kernel)
    require_root("base update")
    with store.lock(f"base-{name}", purpose=f"base update {name}"):
        gens = generations(store, name)
        parent = gens[-1]
        require_space(store.root, 0, f"update base {name}")  # the tree's own check comes later
        _repair_history(store, name, gens)
        number = parent.number + 1
        repo = store.base_dir(name) / "history"
        with store.staging(f"gen-{name}-{number}") as stage, WriteWatch(stage) as watch:
            lower = stage / "lower"
            lowers: list[Path] = []
            if from_dir is not None:
                source = str(src)
                lowers = [src]  # type: ignore[list-item]
            else:
                below = mount_layers(store, parent, lower)  # its chain, if a delta
                if apply_dir is not None:
                    source = f"{src} laid over generation {parent.number}"
                    lowers = [src, *below]  # type: ignore[list-item]
                else:
                    source = f"generation {parent.number} changed by: {command}"
                    lowers = below
            log = stage / RUN_LOG
            try:
                with _staging_tree(store, stage, lowers) as tree:
                    if command is not None:
                        try:
                            run_in_chroot(tree, command, log=log, echo=echo)
                        except UsageError as exc:  # the command's writes filled the store?
                            if free_space(store.root) < SPACE_MARGIN:
                                raise StoreFull(
                                    full_message(store.root, SPACE_MARGIN, f"update base {name}")
                                    + f" (the command failed: {exc.message})"
                                ) from exc
                            raise
                        except OSError as exc:  # keeping its output filled the store
                            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                                raise
                            raise StoreFull(
                                full_message(store.root, SPACE_MARGIN, f"update base {name}")
                                + " (while keeping the command's output)"
                            ) from exc
                    made = _build_generation(
                        store,
                        name,
                        number,
                        tree,
                        stage / "gen",
                        size=size,
                        kernel=kernel,
                        source=source,
                        parent=parent,
                        repo=repo,
                        message=f"{name} generation {number}: {source}",
                        unless_unchanged=command is not None,
                        full=full,
                    )
            finally:
                unmount_layers(lower)
            if made is None:
                return Updated(parent, changed=False)  # the staging goes with its log
            gen, info = made
            if command is not None:
                os.rename(log, stage / "gen" / RUN_LOG)
            sync_store(watch, f"update base {name}")  # all of it on disk before it appears
            os.rename(stage / "gen", store.base_dir(name) / "generations" / str(number))
            checkpoint("base-update:published")
        new = get_generation(store, name, gen.number)
        delta(store, parent, new)  # while both manifests are warm: reconcile only reads it
        if info is not None:  # a delta: a layer over its parent's (adopted, no copy)
            try:
                started = time.monotonic()
                _adopt(store, new, info, generation_layer(store, parent).diff_id)
                _log.debug("generation %d adopted as a layer: %.1f s", new.number,
                           time.monotonic() - started)  # fmt: skip
            except (UnionimgError, OSError) as exc:  # the generation stands: adopted later
                _log.warning(
                    "base %s generation %d is made; adding it to the layer store failed "
                    "(%s); 'layer' commands will add it when they need it",
                    name,
                    new.number,
                    exc,
                )
    return Updated(new, changed=True)


class _RunLog:
    """``--run``'s output, as it comes: shown through ``echo`` and kept in ``path`` (its
    first :data:`RUN_LOG_LIMIT` bytes, then a line saying how much more there was)."""

    def __init__(self, path: Path, echo: Echo | None) -> None:
        self.echo = echo
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.kept = self.dropped = 0

    def __call__(self, fd: int, data: bytes) -> None:
        if self.echo is not None:
            self.echo(fd, data)
        room = RUN_LOG_LIMIT - self.kept
        if room > 0:
            part = data[:room]
            view = memoryview(part)
            while view:
                view = view[os.write(self.fd, view) :]
            self.kept += len(part)
        self.dropped += max(0, len(data) - max(room, 0))

    def close(self) -> None:
        try:
            if self.dropped:
                note = f"\n[unionimg: {self.dropped} more bytes of output were not kept]\n"
                os.write(self.fd, note.encode())
        finally:
            os.close(self.fd)


def run_in_chroot(
    tree: Path, command: str, *, log: Path | None = None, echo: Echo | None = None
) -> None:
    """Run ``command`` with the tree's own ``/bin/sh -c``, chrooted, with /proc, /sys, /dev
    and the host's resolver, in a PID and mount namespace of its own (:mod:`.sandbox`): the
    mounts are never visible on the host, and if unionimg dies (even by SIGKILL) every process
    of the command dies with it. Its stdout and stderr go to ``echo`` as they come and into
    ``log`` (a new file)."""
    if not (tree / "bin" / "sh").exists() and not (tree / "bin" / "sh").is_symlink():
        raise UsageError("the base has no /bin/sh, so --run cannot run a command in it")
    sink = _RunLog(log, echo) if log is not None else None
    try:
        res = stream(
            sandbox.argv(tree, command),
            sink or (lambda fd, data: echo(fd, data) if echo is not None else None),
        )
    finally:
        if sink is not None:
            sink.close()
    tail = (res.stderr or res.stdout).strip().splitlines()
    if res.returncode == sandbox.SETUP_FAILED and tail and tail[-1].startswith(sandbox.PREFIX):
        raise ToolFailed(
            f"could not start --run's command: {tail[-1][len(sandbox.PREFIX) :]}; "
            "no generation was made"
        )
    if res.returncode != 0:
        status = (
            f"exit status {res.returncode}"
            if res.returncode > 0
            else f"signal {-res.returncode} ({signal.strsignal(-res.returncode)})"
        )
        raise UsageError(
            f"command {command!r} failed in the base with {status}"
            f"{': ' + tail[-1] if tail else ''}; no generation was made"
        )


# -- reading ------------------------------------------------------------------------------
def show(store: Store, name: str) -> JsonObject:
    gens = generations(store, name)
    meta = read_record(store.base_dir(name) / BaseMeta.FILE, BaseMeta)
    return {
        "name": name,
        "created": meta.created,
        "latest": gens[-1].number if gens else None,
        "history": str(store.base_dir(name) / "history"),
        "generations": [g.to_json() for g in gens],
    }


def log(store: Store, name: str) -> list[history.Changeset]:
    with store.lock(f"base-{name}", purpose=f"base log {name}"):
        _repair_history(store, name, generations(store, name))
    with history.open_repo(store.base_dir(name) / "history") as repo:
        return repo.log()


def diff(store: Store, name: str, from_gen: int | None, to_gen: int | None) -> JsonObject:
    gens = generations(store, name)
    b = get_generation(store, name, to_gen) if to_gen is not None else gens[-1]
    if from_gen is None:
        earlier = [g for g in gens if g.number < b.number]
        a = earlier[-1] if earlier else b
    else:
        a = get_generation(store, name, from_gen)
    changes = diff_manifests(a.manifest_path, b.manifest_path)
    out: JsonObject = {
        "base": name,
        "from": a.number,
        "to": b.number,
        "added": [],
        "modified": [],
        "deleted": [],
        "metadata_only": [],
    }
    for c in changes:
        status = c.status
        if status == "metadata":
            out["modified"].append(c.path)
            out["metadata_only"].append(c.path)
        else:
            out[status].append(c.path)
    return out


# -- deltas between generations ----------------------------------------------------------
def delta_path(store: Store, base: str, b0: int, b1: int) -> Path:
    return store.base_dir(base) / "deltas" / f"{b0}-{b1}.json"


def delta(store: Store, b0: Generation, b1: Generation) -> list[Change]:
    """The changes B0 -> B1: read if saved, else computed (one pass over both manifests,
    O(base)) and saved beside the generations, so it is computed once per pair. ``base
    update`` saves each new generation's delta from its parent; reconcile asks for others
    (generations skipped) once per pair."""
    saved = delta_path(store, b0.base, b0.number, b1.number)
    if saved.is_file():
        return changes_from_json(saved.read_text(encoding="utf-8"))
    changes = diff_manifests(b0.manifest_path, b1.manifest_path)
    saved.parent.mkdir(mode=0o700, exist_ok=True)
    write_atomic(saved, changes_to_json(changes).encode())
    return changes
