"""The host-side union of an instance: base generation (read-only) + U (read-write)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import get_generation
from .errors import Conflict, NotFound, UsageError
from .instance import list_instances, load, mount_record, state, upper_image
from .mounts import is_mounted, mount_image, mount_overlay, require_root, umount
from .store import Store, now_iso, write_json


def mount(
    store: Store, name: str, target: Path, *, readonly: bool = False, driver: str = "auto"
) -> dict[str, Any]:
    inst = load(store, name)
    require_root("mount")
    target = Path(os.path.abspath(target))
    if not target.is_dir():
        raise UsageError(f"mount point {target} is not an existing directory; create it first")
    with store.lock(f"instance-{name}", wait=False, purpose=f"mount {name}"):
        rec = mount_record(store, name)
        if rec is not None:
            raise Conflict(
                f"instance '{name}' is already mounted at {rec['target']}; "
                f"run 'unionimg umount {rec['target']}' first"
            )
        st = state(store, name)
        if st == "running":
            raise Conflict(f"instance '{name}' is running; stop it before mounting")
        if is_mounted(target):
            raise Conflict(f"{target} is already a mount point; choose an empty directory")
        gen = get_generation(store, inst.base, inst.generation)
        run_dir = store.run_dir / name
        lower, u = run_dir / "lower", run_dir / "u"
        for leftover in (u, lower):  # a crash may have left these behind
            umount(leftover)
        mounted: list[Path] = []
        try:
            mount_image(gen.image, lower, readonly=True, exclusive=False)
            mounted.append(lower)
            mount_image(upper_image(store, name), u, readonly=readonly)
            mounted.append(u)
            if readonly:
                used = mount_overlay([u / "upper", lower], None, None, target, driver=driver)
            else:
                used = mount_overlay([lower], u / "upper", u / "work", target, driver=driver)
            mounted.append(target)
            rec = {
                "target": str(target),
                "readonly": readonly,
                "driver": used,
                "lower": str(lower),
                "u": str(u),
                "base": inst.base,
                "generation": inst.generation,
                "mounted": now_iso(),
            }
            write_json(store.instance_dir(name) / "mount.json", rec)
        except BaseException:
            for m in reversed(mounted):
                umount(m)
            raise
    return rec


def find_by_target(store: Store, target: Path) -> str:
    want = os.path.abspath(target)
    for inst in list_instances(store):
        rec = mount_record(store, inst.name)
        if rec is not None and rec["target"] == want:
            return inst.name
    raise NotFound(f"{want} is not a unionimg mount; see 'unionimg instance list'")


def umount_union(store: Store, target: Path) -> str:
    require_root("umount")
    name = find_by_target(store, target)
    with store.lock(f"instance-{name}", purpose=f"umount {name}"):
        rec = mount_record(store, name)
        if rec is None:
            raise NotFound(f"{target} is not mounted")
        umount(Path(rec["target"]), lazy_fallback=False)
        umount(Path(rec["u"]))
        umount(Path(rec["lower"]))
        (store.instance_dir(name) / "mount.json").unlink(missing_ok=True)
    return name
