"""Instances (VMs): a base generation, a sparse U image with ``upper/``, ``work/`` and the
instance's own Mercurial history, a fixed MAC, a hypervisor and resources."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from unionimg.display import shown
from unionimg.errors import Conflict, NotFound, UsageError
from unionimg.faults import checkpoint
from unionimg.fs.image import disk_usage, make_ext4
from unionimg.fs.mounts import is_mounted, require_root, umount
from unionimg.fs.space import WriteWatch, require_space
from unionimg.layers import history, identity, ucheck
from unionimg.layers.base import generations, get_generation, hg_template
from unionimg.layers.chainview import chain_lookup
from unionimg.layers.ucheck import sync_image
from unionimg.mac import derive_mac
from unionimg.names import check_hypervisor, check_name, check_nic_name, human_size, parse_mac
from unionimg.store.layout import Store, now_iso, read_record, write_record
from unionimg.store.records import BaseRef, Conflicts, JsonObject, MountRecord, compact
from unionimg.store.records import Instance as Instance  # the record, with the others' schemas

# Whether a guest runs is asked of its hypervisor's driver (layers.running -> hypervisors):
# the three functions that ask import it, so making an instance (bench/provision.py times
# 'instance create') does not load the drivers' registry.

DEFAULT_U_SIZE = 4 << 30
MIN_U_SIZE = 32 << 20
MAX_MEMORY_MIB = 4 << 20  # 4 TiB


def instance_dir(store: Store, name: str) -> Path:
    return store.instance_dir(name)


def upper_image(store: Store, name: str) -> Path:
    return store.instance_dir(name) / "upper.img"


def load(store: Store, name: str) -> Instance:
    check_name(name, "instance")
    path = store.instance_dir(name) / Instance.FILE
    if not path.is_file():
        raise NotFound(f"instance '{name}' does not exist; see 'unionimg instance list'")
    return read_record(path, Instance)


def save(store: Store, inst: Instance) -> None:
    write_record(store.instance_dir(inst.name) / Instance.FILE, inst)


def list_instances(store: Store) -> list[Instance]:
    if not store.instances_dir.is_dir():
        return []
    out = []
    for p in sorted(store.instances_dir.iterdir()):
        if (p / Instance.FILE).is_file():
            out.append(load(store, p.name))
    return out


# -- mount records ------------------------------------------------------------------------
def mount_record(store: Store, name: str) -> MountRecord | None:
    """The union mount of the instance, if it is really mounted (stale records are dropped)."""
    path = store.instance_dir(name) / MountRecord.FILE
    if not path.is_file():
        return None
    rec = read_record(path, MountRecord)
    if is_mounted(rec.target):
        return rec
    return None


def state(store: Store, name: str) -> str:
    from unionimg.layers.running import running_on  # deferred on purpose (see the top)

    if running_on(store, name):
        return "running"
    return "mounted" if mount_record(store, name) else "stopped"


def pending_conflicts(store: Store, name: str) -> int:
    """How many conflicts of earlier reconciles the instance still has (``conflicts.json``,
    written by :mod:`unionimg.reconcile.apply`; 0 when there is none)."""
    path = store.instance_dir(name) / Conflicts.FILE
    return len(read_record(path, Conflicts).items) if path.is_file() else 0


def describe(store: Store, inst: Instance) -> JsonObject:
    """What ``instance show --json`` says: the record and the instance's state."""
    img = upper_image(store, inst.name)
    rec = mount_record(store, inst.name)
    latest = generations(store, inst.base)[-1].number
    out = inst.to_json()
    st = state(store, inst.name)
    from unionimg.layers.running import last_crash  # deferred on purpose (see the top)

    crash = last_crash(store, inst.name) if st != "running" else None
    out.update(
        {
            "upper_image": str(img),
            "upper_disk_usage": disk_usage(img),
            # a guest whose last boot failed is "crashed" (until its next boot), not "stopped"
            "state": "crashed" if crash is not None and st == "stopped" else st,
            "crash_reason": None if crash is None else crash.reason,
            "mounted_at": rec.target if rec else None,
            "latest_generation": latest,
            "pending_conflicts": pending_conflicts(store, inst.name),
        }
    )
    return out


# -- create / remove ----------------------------------------------------------------------
def _prepare_u_tree(store: Store, root: Path, ref: BaseRef) -> None:
    """The content of a new U image: empty upper/ and work/, and the history repository.

    The repository starts empty: an instance with no local changes has nothing to record,
    and its first ``commit`` (or reconcile) records the base generation it sits on.
    """
    for d in ("upper", "work"):
        (root / d).mkdir(mode=0o755)
    (root / ".hgignore").write_text(history.hgignore_text(), encoding="utf-8")
    history.init_repo(root, template=hg_template(store))
    history.write_sidecar(root, "", {BaseRef.FILE: compact(ref)})


def base_ref(inst: Instance) -> BaseRef:
    """What U's ``.unionimg/base.json`` says: the base generation the instance sits on."""
    return BaseRef(instance=inst.name, base=inst.base, generation=inst.generation)


def _check_free(store: Store, name: str, mac: str | None) -> dict[str, str]:
    """Conflict when instance ``name`` exists or ``mac`` is taken; the MACs taken (MAC ->
    instance)."""
    if store.instance_dir(name).exists():
        raise Conflict(f"instance '{name}' already exists; remove it first or pick another name")
    taken = {i.mac: i.name for i in list_instances(store)}
    if mac is not None and mac in taken:
        raise Conflict(
            f"MAC {mac} is already used by instance '{taken[mac]}'; "
            "give another --mac or leave it out to derive one"
        )
    return taken


def create(
    store: Store,
    name: str,
    base: str,
    *,
    generation: int | None = None,
    mac: str | None = None,
    hypervisor: str = "kvm",
    size: int | None = None,
    memory: int = 512,
    vcpus: int = 1,
    nic_name: str = "eth0",
    layers: tuple[str, ...] = (),
) -> Instance:
    """A new instance on base generation ``base``/``generation``; ``layers``: the snapshot
    layers between the generation and its U, top to bottom (``instance create --from``,
    checked by the caller: :func:`unionimg.layers.snapshot.create_from`)."""
    check_name(name, "instance")
    check_name(base, "base")
    check_hypervisor(hypervisor)
    mac_norm = parse_mac(mac, of=f" for instance {name}") if mac is not None else None
    check_nic_name(nic_name, of=f" for instance {name}")
    size = DEFAULT_U_SIZE if size is None else size
    if size < MIN_U_SIZE:
        raise UsageError(
            f"upper image size {human_size(size)} is too small; "
            f"give at least {human_size(MIN_U_SIZE)}"
        )
    if not 32 <= memory <= MAX_MEMORY_MIB:
        raise UsageError(
            f"memory {memory} MiB for instance {name} is out of range; "
            f"give 32 to {MAX_MEMORY_MIB} (4 TiB)"
        )
    if not 1 <= vcpus <= 256:
        raise UsageError(f"vcpus {vcpus} is out of range; give 1 to 256")
    gen = get_generation(store, base, generation)
    _check_free(store, name, mac_norm)  # early, for a quick answer; again when it is published
    # what mke2fs writes into the sparse U (measured: 2.2 MiB for 4 GiB, 16 MiB for 1 TiB)
    require_space(store.root, (4 << 20) + size // 65536, f"create instance {name}")
    # the U image is made without the store lock (its tree and image are the new
    # instance's own, in staging), so instances made at once (a deploy's) overlap; the
    # lock is held to check the name and the MAC and to put the instance in place
    with store.staging(f"inst-{name}") as stage:
        u_tree = stage / "u"
        u_tree.mkdir(mode=0o755)
        _prepare_u_tree(store, u_tree, BaseRef(instance=name, base=base, generation=gen.number))
        scratch = stage / "identity"  # ssh-keygen's output, removed with the staging
        scratch.mkdir(mode=0o700)
        with (  # its own machine-id and SSH host keys; its chain's view with layers
            gen.manifest() as base_manifest,
            chain_lookup(store, base_manifest, layers, stage / "layers") as below,
        ):
            identity.ensure_instance(u_tree / "upper", below, scratch, name)
        checkpoint("instance-create:staged")
        idir = stage / "instance"
        idir.mkdir(mode=0o700)
        checkpoint("instance-create:space-checked")  # full-disk tests fill it here
        make_ext4(idir / "upper.img", "U", u_tree, size)
        checkpoint("instance-create:image-made")
        with store.lock("store", purpose=f"instance create {name}"):
            taken = _check_free(store, name, mac_norm)
            # 'base gc' and 'base remove' keep what instances use, under this lock: the
            # generation must still be there now that this one will use it
            try:
                get_generation(store, base, gen.number)
            except NotFound:
                raise Conflict(
                    f"base '{base}' generation {gen.number} was removed while instance "
                    f"'{name}' was being made on it; nothing was made: create it again"
                ) from None
            inst = Instance(
                name=name,
                base=base,
                generation=gen.number,
                mac=mac_norm or derive_mac(name, taken),  # among the MACs taken now
                hypervisor=hypervisor,
                size=size,
                memory=memory,
                vcpus=vcpus,
                created=now_iso(),
                nic_name=nic_name,
                layers=layers,
            )
            write_record(idir / Instance.FILE, inst)
            os.rename(idir, store.instance_dir(name))
            checkpoint("instance-create:published")
    return inst


# -- access to the U layer from the host ---------------------------------------------------
@contextlib.contextmanager
def u_layer(store: Store, name: str, *, write: bool) -> Iterator[Path]:
    """The root of the instance's U filesystem on the host (``upper/``, ``work/``, ``.hg``).

    Reuses the mount of a mounted union; otherwise mounts the image for the duration.
    """
    rec = mount_record(store, name)
    if rec is not None:
        if write and rec.readonly:
            raise Conflict(
                f"instance '{name}' is mounted read-only at {rec.target}; umount it first"
            )
        with ucheck.guarded(store, name, Path(rec.u), check=True):
            yield Path(rec.u)
        return
    from unionimg.layers.running import running_on  # deferred on purpose (see the top)

    if running_on(store, name):
        raise Conflict(f"instance '{name}' is running; stop it first")
    require_root("reading the upper layer")
    mnt = store.run_dir / name / "u"
    if is_mounted(mnt):
        umount(mnt)
    ucheck.mount_u(store, name, mnt, readonly=not write)
    # umount reports no write-back error: sync U through a descriptor opened before any
    # write, so nothing written into U is lost silently (say, the store filled up)
    watch = WriteWatch(mnt) if write else None
    if watch is not None:
        _WATCHES[os.fspath(mnt)] = watch
    vouch = False  # a clean unmount after a run without errors vouches for the image
    try:
        with ucheck.guarded(store, name, mnt):
            yield mnt
        if watch is not None and not watch.durable:
            sync_image(watch, store.root, name, f"write the U image of {name}")
        vouch = True
    finally:
        if watch is not None:
            _WATCHES.pop(os.fspath(mnt), None)
            watch.close()
        ucheck.release_u(store, name, mnt, vouch=vouch)


# the write watches of the U layers u_layer mounted, by mount point
_WATCHES: dict[str, WriteWatch] = {}


def durable(u: Path) -> None:
    """Tell :func:`u_layer` that everything written into ``u`` was synced (by the caller's
    own watch, opened before its writes) and that nothing more is written before the end
    of its block: its final sync (a flush of the loop device) is skipped."""
    watch = _WATCHES.get(os.fspath(u))
    if watch is not None:
        watch.durable = True


PENDING_MIGRATION = "migrate-pending.json"  # written by unionimg.migrate.pending


def refuse_pending_migration(store: Store, name: str, verb: str) -> None:
    """Conflict (naming ``verb``: boot, mount read-write) while a migration of the instance may have
    made it on another host (its sender stopped after its stream:
    :mod:`unionimg.migrate.pending`): running or changing it here would make the same machine,
    MAC and all, live in two places."""
    path = store.instance_dir(name) / PENDING_MIGRATION
    if not path.exists():
        return
    try:
        host = str(json.loads(path.read_text(encoding="utf-8"))["host"])
    except (OSError, ValueError, KeyError, TypeError):
        host = "HOST"
    host = shown(host, 64)
    raise Conflict(
        f"instance '{name}' does not {verb} here: it is being migrated to host {host}, which "
        f"may hold it already; unless a 'migrate' of it still runs, run 'unionimg migrate "
        f"{name} --to {host}' again to finish (or undo) the migration"
    )
