"""The host-side union of an instance: base generation (read-only) + U (read-write).

An instance with snapshot layers (issue 13) gets its whole chain, top to bottom: U's upper,
its snapshot layers (``run/VM/layers/N``, guest data), its generation's chain, BASE.

The union shows guest data, so it is mounted ``nosuid,nodev,noexec`` (see
:data:`unionimg.fs.mounts.GUEST_FLAGS`), over a U image checked and mounted by
:func:`unionimg.layers.ucheck.mount_u`. Its mount point must lie outside the store and be empty
(unless ``allow_non_empty``): a union over ``STORE/instances/VM`` would hide the store's
own files, and one over a populated directory hides what is there.
"""

from __future__ import annotations

import os
from pathlib import Path

from unionimg.errors import Conflict, NotFound, UnionimgError, UsageError
from unionimg.fs.mounts import is_mounted, mount_overlay, require_root, umount
from unionimg.fs.space import WriteWatch, require_space
from unionimg.layers import snapshot, ucheck
from unionimg.layers.base import get_generation, mount_layers, unmount_layers
from unionimg.layers.instance import (
    list_instances,
    load,
    mount_record,
    refuse_pending_migration,
    state,
)
from unionimg.layers.status import check_u_writable
from unionimg.layers.ucheck import sync_image
from unionimg.store.layout import Store, now_iso, write_record
from unionimg.store.records import JsonObject, MountRecord


def check_target(store: Store, target: Path, *, allow_non_empty: bool = False) -> Path:
    """The mount point, absolute: an existing directory, not the store, not inside it, not
    above it, and empty unless ``allow_non_empty``; else :class:`UsageError` (exit 2)."""
    target = Path(os.path.abspath(target))
    if not target.is_dir():
        raise UsageError(f"mount point {target} is not an existing directory; create it first")
    real = os.path.realpath(target)
    store_real = os.path.realpath(store.root)
    if real == store_real or real.startswith(store_real.rstrip("/") + "/"):
        raise UsageError(
            f"mount point {target} is inside the store {store.root}; a union there would hide "
            "the store's own files: choose a directory outside it"
        )
    if store_real.startswith(real.rstrip("/") + "/"):
        raise UsageError(
            f"mount point {target} holds the store {store.root}; a union there would hide "
            "it: choose a directory outside it"
        )
    if not allow_non_empty:
        with os.scandir(target) as it:
            if next(it, None) is not None:
                raise UsageError(
                    f"mount point {target} is not empty; choose an empty directory (or give "
                    "--allow-non-empty to hide its content while the union is mounted)"
                )
    return target


def _refuse_mounted(store: Store, name: str) -> None:
    rec = mount_record(store, name)
    if rec is not None:
        raise Conflict(
            f"instance '{name}' is already mounted at {rec.target}; "
            f"run 'unionimg umount {rec.target}' first"
        )


def mount(
    store: Store,
    name: str,
    target: Path,
    *,
    readonly: bool = False,
    driver: str = "auto",
    allow_non_empty: bool = False,
) -> JsonObject:
    """Mount the union of instance ``name`` at ``target``; its mount record (as JSON)."""
    inst = load(store, name)
    _refuse_mounted(store, name)  # the first thing to say, whatever the target
    if not readonly:  # a read-only look changes nothing a pending migration compares
        refuse_pending_migration(store, name, "mount read-write")
    target = check_target(store, target, allow_non_empty=allow_non_empty)
    require_root("mount")
    with store.lock(f"instance-{name}", wait=False, purpose=f"mount {name}"):
        _refuse_mounted(store, name)
        if not readonly:
            refuse_pending_migration(store, name, "mount read-write")
        st = state(store, name)
        if st == "running":
            raise Conflict(f"instance '{name}' is running; stop it before mounting")
        if is_mounted(target):
            raise Conflict(f"{target} is already a mount point; choose an empty directory")
        if not readonly:  # what is written through the union grows U, a sparse file there
            require_space(store.root, 0, f"mount {name} read-write")
        gen = get_generation(store, inst.base, inst.generation)
        run_dir = store.run_dir / name
        lower, u = run_dir / "lower", run_dir / "u"
        umount(u)  # a crash may have left these behind
        unmount_layers(lower)
        snaps = run_dir / "layers"  # the VM's snapshot layers (issue 13), top first
        unmount_layers(snaps)
        mounted: list[Path] = []
        try:
            lowers = mount_layers(store, gen, lower)  # the generation's chain, top first
            mounted.append(lower)
            lowers = [*snapshot.mount_layers(store, inst, snaps), *lowers]
            mounted.append(snaps)
            # checked (e2fsck or the fast path), mounted nosuid,nodev,noexec, and its layout
            # checked: upper/ and work/ are real directories on U's own file system, no
            # symlinks. U is the host's alone while mounted (the guest is not running, see
            # ucheck), so overlay may use them by path right after the check.
            ucheck.mount_u(store, name, u, readonly=readonly)
            mounted.append(u)
            if readonly:
                used = mount_overlay(
                    [u / "upper", *lowers], None, None, target, driver=driver, guest=True
                )
            else:
                used = mount_overlay(
                    lowers, u / "upper", u / "work", target, driver=driver, guest=True
                )
            mounted.append(target)
            rec = MountRecord(
                target=str(target),
                readonly=readonly,
                driver=used,
                lower=str(lower),
                u=str(u),
                base=inst.base,
                generation=inst.generation,
                mounted=now_iso(),
                u_checked=True,  # umount may vouch for U (written only by the host since)
            )
            write_record(store.instance_dir(name) / MountRecord.FILE, rec)
        except BaseException:
            for m in reversed(mounted):
                if m == u:
                    ucheck.release_u(store, name, u)
                elif m in (lower, snaps):
                    unmount_layers(m)
                else:
                    umount(m)
            raise
    return rec.to_json()


def find_by_target(store: Store, target: Path) -> str:
    want = os.path.abspath(target)
    for inst in list_instances(store):
        rec = mount_record(store, inst.name)
        if rec is not None and rec.target == want:
            return inst.name
    raise NotFound(f"{want} is not a unionimg mount; see 'unionimg instance list'")


def umount_union(store: Store, target: Path) -> str:
    require_root("umount")
    name = find_by_target(store, target)
    with store.lock(f"instance-{name}", purpose=f"umount {name}"):
        rec = mount_record(store, name)
        if rec is None:
            raise NotFound(f"{target} is not mounted")
        lost = None if rec.readonly else _flush_u(store, name, Path(rec.u))
        umount(Path(rec.target), lazy_fallback=False)
        # a clean unmount vouches for U, if it was checked when it was mounted
        ucheck.release_u(store, name, Path(rec.u), vouch=rec.u_checked)
        unmount_layers(Path(rec.lower))
        unmount_layers(Path(rec.lower).with_name("layers"))
        (store.instance_dir(name) / MountRecord.FILE).unlink(missing_ok=True)
    if lost is not None:
        raise lost
    return name


def _flush_u(store: Store, name: str, u: Path) -> UnionimgError | None:
    """Flush U before it is unmounted (umount reports no write-back error): the error to
    report, after unmounting, if writes made through the union were lost (say, the store
    filled up and U's journal aborted)."""
    what = f"keep what was written through the union of {name}"
    try:
        check_u_writable(store, u, name, what)
        with WriteWatch(u) as watch:
            sync_image(watch, store.root, name, what)
    except UnionimgError as exc:
        return exc
    return None
