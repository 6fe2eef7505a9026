"""Snapshots of VMs in the store: take, list, remove, retention, chunk gc, restore.

::

    STORE/snapshots/
      chunks/AB/HEX            the chunk store (:mod:`unionimg.snapshots.chunks`)
      vms/VM/ID.json           a snapshot: a SnapshotRecord (store/snapshot_records.py)
      vms/VM/schedule.log      what 'snapshot schedule' did (one line per snapshot)

A take: the guest paused, its memory saved and U copied into a staging directory
(:mod:`unionimg.snapshots.capture`), the guest resumed; then the two files cut into chunks,
the new ones written, the store synced, and only then the record written (atomically). A
take that fails at any point (a full disk included) removes the chunks it added and its
staging: no half snapshot. Takes, receives and gc hold the store lock ``snapshot-chunks``
while they write or remove chunks, so gc never removes a chunk a take is about to name.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unionimg import hypervisors
from unionimg.boot.control import make_spec, write_rendered
from unionimg.errors import Conflict, NotFound, UsageError
from unionimg.faults import checkpoint
from unionimg.fs.mounts import ensure_shared_root
from unionimg.fs.space import require_space
from unionimg.hypervisors import Running
from unionimg.layers import layerstore
from unionimg.layers.base import (
    generation_from_layer,
    generation_layer,
    generations,
    get_generation,
    list_bases,
)
from unionimg.layers.instance import list_instances, load, mount_record, upper_image
from unionimg.layers.running import (
    READY,
    clear_crash,
    clear_running,
    console_log,
    read_console,
    read_running,
    running_on,
    workdir,
    write_running,
)
from unionimg.names import check_name
from unionimg.snapshots import capture, chunks, policy
from unionimg.store.layout import Store, now_iso, read_record, write_atomic, write_record
from unionimg.store.records import Instance
from unionimg.store.snapshot_records import SnapshotRecord

CHUNK_LOCK = "snapshot-chunks"


def vms_dir(store: Store) -> Path:
    return store.root / "snapshots" / "vms"


def vm_dir(store: Store, vm: str) -> Path:
    return vms_dir(store) / check_name(vm, "instance")


def record_path(store: Store, vm: str, snap_id: int) -> Path:
    return vm_dir(store, vm) / f"{snap_id}.json"


def list_snapshots(store: Store, vm: str) -> list[SnapshotRecord]:
    d = vm_dir(store, vm)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.suffix == ".json" and p.stem.isdigit():
            out.append(read_record(p, SnapshotRecord))
    return sorted(out, key=lambda s: s.id)


def all_vms(store: Store) -> list[str]:
    d = vms_dir(store)
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def get(store: Store, vm: str, snap_id: int | None = None) -> SnapshotRecord:
    """Snapshot ``snap_id`` of ``vm`` (its latest when None); NotFound in one line."""
    snaps = list_snapshots(store, vm)
    if not snaps:
        raise NotFound(f"VM {vm} has no snapshot in this store; 'snapshot take {vm}' makes one")
    if snap_id is None:
        return snaps[-1]
    for s in snaps:
        if s.id == snap_id:
            return s
    raise NotFound(
        f"VM {vm} has no snapshot {snap_id}; it has {', '.join(str(s.id) for s in snaps)}"
    )


def chain_of(store: Store, inst: Instance) -> tuple[str, ...]:
    """What the VM's U lies on, by content: its snapshot layers, then its generation's layer
    (a tree digest, the same on every host that has the same generation)."""
    gen = get_generation(store, inst.base, inst.generation)
    return (*inst.layers, generation_layer(store, gen).diff_id)


def _ready_line(path: Path) -> str:
    """The guest's readiness line of this boot (guest output: kept printable ASCII only,
    bounded), written back at the head of the console of a restored guest."""
    head, _ = read_console(path)
    for line in head:
        if READY.match(line):
            return "".join(c for c in line[:1000] if " " <= c <= "~")
    return ""


def _epoch(iso: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class Taken:
    record: SnapshotRecord
    removed: list[int]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "vm": r.vm,
            "id": r.id,
            "kind": r.kind,
            "memory_size": r.memory_size,
            "disk_size": r.disk_size,
            "data_bytes": r.memory_size + sum(n for _, _, n in r.disk_refs()),
            "new_bytes": r.new_bytes,
            "pause_s": r.pause_ms / 1000,
            "seconds": round(self.seconds, 3),
            "removed": self.removed,
        }


def take(
    store: Store, vm: str, *, keep: int | None = None, older_than: float | None = None
) -> Taken:
    """Snapshot VM now: memory + U for a kvm guest that runs, U alone for a uml guest (its
    file systems synced) or a VM that does not run. Then retention (``keep`` newest,
    ``older_than`` seconds) and chunk gc when it removed any."""
    t0 = time.monotonic()
    inst = load(store, vm)
    if keep is not None and keep < 1:
        raise UsageError(f"--keep {keep}: keep at least the snapshot being taken (1)")
    with store.lock(f"snapshot-{vm}", wait=False, purpose=f"snapshot take {vm}"):
        if mount_record(store, vm) is not None:
            raise Conflict(f"instance '{vm}' is mounted; umount it before a snapshot")
        running = running_on(store, vm)
        rec = read_running(store, vm) if running else None
        upper = upper_image(store, vm)
        chain = chain_of(store, inst)
        memory = rec is not None and hypervisors.get(rec.hypervisor).capabilities.can_snapshot
        allocated = os.stat(upper).st_blocks * 512
        # the staged memory image, the U copy, and their chunks (compressed: at most as much)
        need = 2 * allocated + (2 * (inst.memory << 20) if memory else 0)
        require_space(store.root, need, f"snapshot {vm}")
        with store.staging(f"snapshot-{vm}") as stage:
            checkpoint("snapshot-take:staged")  # the full-disk test fills the disk here
            if rec is not None and memory:
                got = capture.capture_kvm(rec, upper, stage)
            elif rec is not None:
                got = capture.capture_uml(rec, upper, stage)
            else:
                disk = stage / "u.img"
                capture.copy_u(upper, disk)
                got = capture.Captured(None, disk, 0.0, "")
            ready = _ready_line(Path(rec.console)) if rec is not None else ""
            with store.lock(CHUNK_LOCK, purpose=f"snapshot take {vm}"):
                writer = chunks.Writer(store)
                try:
                    mem_refs: list[str] = []
                    mem_size = 0
                    if got.memory is not None:
                        mem_refs, mem_size = chunks.cut_memory(got.memory, writer)
                        got.memory.unlink()
                    checkpoint("snapshot-take:memory-stored")
                    disk_refs, disk_size = chunks.cut_disk(got.disk, writer)
                    checkpoint("snapshot-take:chunks-stored")
                    chunks.sync(store, f"snapshot {vm}")
                    snaps = list_snapshots(store, vm)
                    record = SnapshotRecord(
                        vm=vm,
                        id=(snaps[-1].id + 1) if snaps else 1,
                        created=now_iso(),
                        kind="memory+disk" if got.memory is not None else "disk",
                        instance=inst,
                        chain=chain,
                        domain_type=got.domain_type,
                        memory_size=mem_size,
                        memory=tuple(mem_refs),
                        disk_size=disk_size,
                        disk=tuple(disk_refs),
                        new_bytes=writer.new_bytes,
                        pause_ms=round(got.pause_s * 1000),
                        ready_line=ready,
                    )
                    vm_dir(store, vm).mkdir(mode=0o700, parents=True, exist_ok=True)
                    write_record(record_path(store, vm, record.id), record)
                except BaseException:
                    writer.undo()
                    raise
    removed: list[int] = []
    if keep is not None or older_than is not None:
        removed = prune(store, vm, keep=keep, older_than=older_than)
    return Taken(record, removed, time.monotonic() - t0)


def describe(s: SnapshotRecord) -> dict[str, Any]:
    return {
        "vm": s.vm,
        "id": s.id,
        "created": s.created,
        "kind": s.kind,
        "memory_size": s.memory_size,
        "disk_size": s.disk_size,
        "data_bytes": s.memory_size + sum(n for _, _, n in s.disk_refs()),
        "chunks": len(s.memory) + len(s.disk),
        "new_bytes": s.new_bytes,
        "pause_s": s.pause_ms / 1000,
        "base": f"{s.instance.base}/{s.instance.generation}",
    }


def remove(store: Store, vm: str, ids: list[int]) -> list[int]:
    """Remove snapshots ``ids`` of VM (NotFound naming one it lacks: nothing removed), then
    the chunks no snapshot names any more."""
    have = {s.id for s in list_snapshots(store, vm)}
    for i in ids:
        if i not in have:
            raise NotFound(f"VM {vm} has no snapshot {i}; 'snapshot list {vm}' shows them")
    with store.lock(CHUNK_LOCK, purpose=f"snapshot rm {vm}"):
        for i in ids:
            record_path(store, vm, i).unlink()
        _gc_locked(store)
    return sorted(ids)


def prune(store: Store, vm: str, *, keep: int | None, older_than: float | None) -> list[int]:
    snaps = list_snapshots(store, vm)
    ids = policy.to_remove(
        [(s.id, _epoch(s.created)) for s in snaps], keep, older_than, time.time()
    )
    if ids:
        remove(store, vm, ids)
    return ids


def _gc_locked(store: Store) -> tuple[int, int]:
    reachable: set[str] = set()
    for vm in all_vms(store):
        for s in list_snapshots(store, vm):
            reachable |= s.digests()
    count = size = 0
    for digest, path in chunks.all_digests(store):
        if digest not in reachable:
            with contextlib.suppress(FileNotFoundError):
                size += path.stat().st_size
                path.unlink()
                count += 1
    return count, size


def gc(store: Store) -> tuple[int, int]:
    """Remove the chunks no snapshot names: (how many, bytes)."""
    with store.lock(CHUNK_LOCK, purpose="snapshot gc"):
        return _gc_locked(store)


# -- restore ---------------------------------------------------------------------------------
def _local_generation(store: Store, snap: SnapshotRecord) -> tuple[str, int]:
    """The base generation of this store whose tree is the snapshot's (by digest): the same
    base name first. Lacking one, it is made from the layer cache as a deploy makes it
    (:func:`unionimg.layers.base.generation_from_layer`) when the generation's layers were
    pulled here ('unionimg pull'); else NotFound saying so."""
    want = snap.chain[-1]
    found = _generation_with(store, want, snap.instance.base)
    if found is not None:
        return found
    try:
        layer = layerstore.get(store, want)
    except NotFound:
        raise NotFound(
            f"snapshot {snap.id} of VM {snap.vm} lies on base {snap.instance.base} generation "
            f"{snap.instance.generation} (layer {want[:19]}), which this store does not have; "
            f"deploy it here, or pull that layer ('unionimg pull {want}') first: the snapshot "
            "holds only the VM's own U"
        ) from None
    return _generation_from(store, layer, snap.instance.base, snap.instance.generation)


def _generation_with(store: Store, diff_id: str, prefer: str) -> tuple[str, int] | None:
    names = list_bases(store)
    names.sort(key=lambda n: n != prefer)
    for name in names:
        for gen in generations(store, name):
            if generation_layer(store, gen).diff_id == diff_id:
                return name, gen.number
    return None


def _generation_from(
    store: Store, layer: layerstore.Layer, base: str, number: int
) -> tuple[str, int]:
    """Generation ``base``/``number`` (or the next free number) made from pulled ``layer``,
    its parent generations first."""
    parent = None
    if layer.meta.parent is not None:
        below = _generation_with(store, layer.meta.parent, base)
        if below is None:
            below = _generation_from(
                store, layerstore.get(store, layer.meta.parent), base, max(1, number - 1)
            )
        base, _ = below
        parent = get_generation(store, *below)
    taken = {g.number for g in generations(store, base)} if base in list_bases(store) else set()
    if layer.meta.base == base and layer.meta.generation is not None:
        number = layer.meta.generation
    if number in taken or (parent is not None and number <= parent.number):
        number = max(taken | {parent.number if parent else 0}) + 1
    gen = generation_from_layer(store, base, number, layer, parent=parent)
    return base, gen.number


def _target_instance(store: Store, snap: SnapshotRecord) -> tuple[Instance, bool]:
    """The instance the snapshot is restored into: this store's VM of that name (same chain
    required), or a new record like the snapshot's on the matching local generation."""
    vm = snap.vm
    try:
        inst = load(store, vm)
    except NotFound:
        inst = None
    if inst is not None:
        if chain_of(store, inst) != snap.chain:
            raise Conflict(
                f"instance {vm} here lies on other layers than snapshot {snap.id} "
                f"(base {inst.base}/{inst.generation}); remove it or restore under its chain"
            )
        return inst, False
    for layer in snap.instance.layers:
        layerstore.get(store, layer)  # NotFound in one line
    for other in list_instances(store):
        if other.mac == snap.instance.mac:
            raise Conflict(
                f"instance '{other.name}' here has MAC {other.mac}, the MAC of VM {vm} in "
                f"snapshot {snap.id}; remove or re-MAC it before restoring {vm} here"
            )
    base, number = _local_generation(store, snap)
    return snap.instance.replace(base=base, generation=number, created=now_iso()), True


def restore(store: Store, vm: str, snap_id: int | None = None) -> dict[str, Any]:
    """Bring VM back from a snapshot in this store: U rebuilt from its chunks and, for a
    memory snapshot, the guest resumed from its memory image (a kvm guest running where it
    was). Every chunk is checked present before anything changes, and verified as it is
    read; the VM must not run here."""
    t0 = time.monotonic()
    snap = get(store, vm, snap_id)
    where = f"snapshot {snap.id} of VM {vm}"
    chunks.check_present(store, snap.digests(), where)
    inst, new = _target_instance(store, snap)
    driver = hypervisors.get(inst.hypervisor)
    if snap.kind == "memory+disk" and not driver.capabilities.can_snapshot:
        raise Conflict(f"{where} holds memory state, which {inst.hypervisor} cannot resume")
    size = snap.disk_size
    require_space(store.root, snap.memory_size + sum(n for _, _, n in snap.disk_refs()), where)
    with store.lock(f"instance-{vm}", wait=False, purpose=f"restore {vm}"):
        if not new:
            current = running_on(store, vm)
            if current:
                raise Conflict(f"instance '{vm}' runs here under {current}; stop it first")
            if mount_record(store, vm) is not None:
                raise Conflict(f"instance '{vm}' is mounted; umount it first")
        with store.staging(f"restore-{vm}") as stage:
            chunks.build_disk(store, snap.disk_refs(), size, stage / "upper.img", where)
            memfile = stage / "memory"
            domain_xml = ""
            if snap.kind == "memory+disk":
                chunks.build_memory(store, snap.memory_refs(), memfile, where)
                # kernel, initramfs and domain XML for this host before U is touched: a
                # host that cannot boot the VM leaves it as it was
                domain_xml = _render(store, inst, snap)
            if new:
                idir = stage / "instance"
                idir.mkdir(mode=0o700)
                os.rename(stage / "upper.img", idir / "upper.img")
                write_record(idir / Instance.FILE, inst)
                store.instances_dir.mkdir(mode=0o700, exist_ok=True)
                try:
                    os.rename(idir, store.instance_dir(vm))
                except OSError as exc:
                    raise Conflict(f"instance '{vm}' appeared meanwhile: {exc}") from exc
            else:
                os.replace(stage / "upper.img", upper_image(store, vm))
            out: dict[str, Any] = {"vm": vm, "id": snap.id, "kind": snap.kind, "created": new}
            if snap.kind == "memory+disk":
                _resume(store, inst, snap, memfile, domain_xml)
                out["state"] = "running"
            else:
                out["state"] = "stopped"
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def _render(store: Store, inst: Instance, snap: SnapshotRecord) -> str:
    """The domain XML resuming ``inst`` here (this store's paths, the saved domain type),
    its kernel and initramfs in place: the files a boot would write."""
    driver = hypervisors.get(inst.hypervisor)
    wd = workdir(store, inst.name)
    spec = make_spec(store, inst, driver, out=wd)
    spec = replace(spec, domain_type=snap.domain_type or "qemu")
    prepared = driver.prepare(spec)
    write_rendered(prepared.files, wd)
    return capture.append_console(prepared.files["domain.xml"])


def _resume(
    store: Store, inst: Instance, snap: SnapshotRecord, memfile: Path, domain_xml: str
) -> None:
    driver = hypervisors.get(inst.hypervisor)
    if driver.capabilities.private_mounts:
        ensure_shared_root()
    log = console_log(store, inst.name)
    if log.exists():
        os.replace(log, log.with_name("console.log.1"))
    head = f"{snap.ready_line}\n" if snap.ready_line else ""
    note = f"unionimg: restored from snapshot {snap.id} of {snap.vm} ({snap.created})\n"
    write_atomic(
        log,
        f"{head}{note}".encode(),
        mode=0o600,
    )
    clear_crash(store, inst.name)
    rec = Running(
        hypervisor=driver.name,
        started=now_iso(),
        console=str(log),
        domain=inst.name,
        domain_type=snap.domain_type or "qemu",
    )
    write_running(store, inst.name, rec)
    try:
        capture.resume_kvm(memfile, domain_xml)
    except BaseException:
        clear_running(store, inst.name)
        raise
