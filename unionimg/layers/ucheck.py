"""A U image is guest data: checked before the host kernel mounts it, mounted so that
nothing on it runs, gains privileges or opens a device, and its layout resolved without
following a symlink.

Every host mount of a U image goes through :func:`mount_u` and :func:`release_u`:

1. **File system check** (:func:`check_image`). The guest writes its U image with its own
   kernel; a crafted ext4 must not reach the host kernel's ext4 driver unchecked. Unless
   the image is unchanged since the host last vouched for it, a journal left by a guest
   that stopped uncleanly is replayed by ``e2fsck`` in user space (never by the host
   kernel: a journal is unchecked metadata), then ``e2fsck -f -n`` (read-only, forced)
   checks it. Any problem refuses the mount (:class:`GuestDataRefused`, exit 8) and names
   ``unionimg fsck VM --repair``.
   The fast path: after a passed check and after the host's own clean unmount, the
   image's (size, mtime_ns, ctime_ns, inode, device) are recorded in the instance's
   directory in the store (``u-checked.json``, written atomically). A guest that ran since
   changed mtime and ctime; a copied or replaced image has another inode or ctime. Only a
   match skips ``e2fsck``.
2. **Mount options** (:data:`GUEST_MOUNT_OPTIONS`): ``nosuid,nodev,noexec`` and
   ``errors=remount-ro`` whatever the guest put in its superblock (``errors=panic`` there
   would otherwise let a guest choose to panic the host on the first error).
3. **Layout** (:func:`check_layout`): ``upper`` and ``work`` must be directories on U's own
   file system, ``.hg``, ``.unionimg``, ``upper.new``, ``upper.prev`` directories or absent,
   the sidecars and ``.hgignore`` regular files or absent; nothing of it a symlink
   (``openat2`` with ``RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS``, see :mod:`unionimg.fs.fsops`).
   The whole of ``.hg`` is walked: Mercurial opens its files by path and appends to
   revlogs, so one symlink there would make a host ``commit`` write a host file; a
   ``.hg/sharedpath`` would point it at another repository. It is the walk
   :func:`history.check_repo` makes (:func:`history.walk_hg`: sparse files refused too), done
   once: a Mercurial command on the same U while this process holds it does not walk again.

The check-then-use is sound because the host holds U exclusively while it is mounted: the
guest is not running (boot refuses a mounted instance, mount refuses a running one), the
image sits on a loop device of its own (a second mount waits for it to be released), and
nothing but unionimg writes U's root while the host has it. So a directory checked here is
still the same directory when the overlay mount or Mercurial uses it by path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from unionimg import display
from unionimg.errors import GuestDataRefused, ToolFailed
from unionimg.fs import fsops
from unionimg.fs.mounts import loop_users, mount_image, umount
from unionimg.fs.space import WriteWatch, write_failure
from unionimg.layers import history
from unionimg.runner import Result, run
from unionimg.store.layout import Store, now_iso, read_record, write_record
from unionimg.store.records import BaseRef, DamagedRecord, JsonObject, Resolution, UCheckStamp

log = logging.getLogger(__name__)

STAMP = UCheckStamp.FILE
E2FSCK_TIMEOUT = 1800.0  # seconds; a big U legitimately takes a while, a hung one must not

# directories U must have, may have, and regular files it may have (relative to its root)
REQUIRED_DIRS = ("upper", "work")
OPTIONAL_DIRS = (".hg", ".unionimg", "upper.new", "upper.prev")
OPTIONAL_FILES = (
    ".hgignore",
    ".unionimg/manifest.jsonl",
    f"{history.SIDECAR_DIR}/{BaseRef.FILE}",
    f"{history.SIDECAR_DIR}/{Resolution.FILE}",
)
FORBIDDEN = (".hg/sharedpath",)  # would make Mercurial use another repository's store
_HGIGNORE_MAX = 64 << 10


def image_path(store: Store, name: str) -> Path:
    return store.instance_dir(name) / "upper.img"


def printable(text: str, limit: int = 200) -> str:
    """Guest-derived text (file names in e2fsck's output) made safe for a terminal, cut."""
    return display.shown(text, limit)


# -- the fast path: has the image changed since the host last vouched for it? ---------------
def image_stamp(image: Path, how: str) -> UCheckStamp:
    """``image`` as it is now, known good by ``how``."""
    st = os.stat(image)
    return UCheckStamp(
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        dev=st.st_dev,
        how=how,
        when=now_iso(),
    )


def write_stamp(image: Path, where: Path, how: str) -> None:
    """Record that ``image`` is known good as it is now (``where``: its instance dir)."""
    write_record(where / STAMP, image_stamp(image, how))


def record(store: Store, name: str, how: str) -> None:
    write_stamp(image_path(store, name), store.instance_dir(name), how)


def forget(store: Store, name: str) -> None:
    (store.instance_dir(name) / STAMP).unlink(missing_ok=True)


def unchanged(store: Store, name: str) -> bool:
    path = store.instance_dir(name) / STAMP
    try:
        saved = read_record(path, UCheckStamp)
        now = os.stat(image_path(store, name))
    except (OSError, DamagedRecord):  # no stamp, or a damaged one: e2fsck decides
        return False
    return saved.matches(now)


# -- e2fsck -----------------------------------------------------------------------------------
def needs_recovery(image: Path) -> bool:
    """Whether the ext4 superblock says its journal must be replayed (INCOMPAT_RECOVER)."""
    with open(image, "rb") as fh:
        fh.seek(1024)
        sb = fh.read(0x64)
    if len(sb) < 0x64 or sb[0x38:0x3A] != b"\x53\xef":
        return False  # not ext4 at all: e2fsck says so
    return bool(int.from_bytes(sb[0x60:0x64], "little") & 0x4)


def e2fsck(image: Path, *args: str) -> Result:
    return run(
        ["e2fsck", *args, str(image)],
        check=False,
        timeout=E2FSCK_TIMEOUT,
        what=f"checking {image}",
    )


_NOISE = ("Pass ", "e2fsck ", "Fix? no", "Warning: skipping journal")


def problems(result: Result) -> list[str]:
    """What e2fsck found, one line each, escaped (the names in it are the guest's)."""
    lines = []
    for raw in (result.stdout + "\n" + result.stderr).splitlines():
        line = raw.strip()
        if not line or line.startswith(_NOISE) or ("files (" in line and "blocks" in line):
            continue
        if line.startswith(("Free blocks count wrong (", "Free inodes count wrong (")):
            continue  # the kernel updates the superblock's totals lazily: not damage
        lines.append(printable(line))
    return lines


def _refuse_damaged(name: str, image: Path, result: Result) -> GuestDataRefused:
    found = problems(result)
    first = found[0] if found else f"exit status {result.returncode}"
    return GuestDataRefused(
        f"instance '{name}': its U image {image} is damaged (e2fsck: {first}); it was not "
        f"mounted: repair it with 'unionimg fsck {name} --repair'"
    )


def _check(name: str, image: Path) -> Result:
    """Replay a pending journal in user space, then ``e2fsck -f -n``; refuse any problem."""
    if needs_recovery(image):
        # the guest stopped without unmounting: replay its journal here, in user space, so
        # the host kernel never replays (unchecked) journal blocks over checked metadata
        res = e2fsck(image, "-E", "journal_only", "-p")
        if res.returncode not in (0, 1):
            raise _refuse_damaged(name, image, res)
    res = e2fsck(image, "-f", "-n")
    if res.returncode != 0:
        raise _refuse_damaged(name, image, res)
    return res


def check_image(store: Store, name: str) -> bool:
    """Refuse a damaged U before the host mounts it; True if e2fsck ran, False on the fast
    path (unchanged since the host last vouched for it)."""
    if unchanged(store, name):
        return False
    _check(name, image_path(store, name))
    try:
        record(store, name, "e2fsck")
    except OSError as exc:  # the stamp is an optimisation: a full store only costs a recheck
        log.warning("cannot record the check of %s: %s", image_path(store, name), exc)
    return True


# -- layout -----------------------------------------------------------------------------------
def check_layout(u: Path) -> None:
    """Refuse (:class:`fsops.UnsafePath`) a U root whose entries are symlinks, other kinds
    than they must be, or on another file system; walk ``.hg`` entirely."""
    root_st = os.stat(u)
    has_hgignore = False
    for rel in REQUIRED_DIRS + OPTIONAL_DIRS + OPTIONAL_FILES:
        st = fsops.lstat_beneath(u, rel)
        if st is None:
            if rel in REQUIRED_DIRS:
                raise fsops.UnsafePath(rel, "is missing (not a U image made by unionimg?)")
            continue
        want_dir = rel not in OPTIONAL_FILES
        if want_dir and not stat.S_ISDIR(st.st_mode):
            raise fsops.UnsafePath(rel, "is not a directory")
        if not want_dir and not stat.S_ISREG(st.st_mode):
            raise fsops.UnsafePath(rel, "is not a regular file")
        if st.st_dev != root_st.st_dev:
            raise fsops.UnsafePath(rel, "is not on the U file system")
        if rel == ".hgignore":
            if st.st_size > _HGIGNORE_MAX:
                raise fsops.UnsafePath(rel, f"is larger than {_HGIGNORE_MAX} bytes")
            has_hgignore = True
    for rel in FORBIDDEN:
        if fsops.lstat_beneath(u, rel) is not None:
            raise fsops.UnsafePath(rel, "exists: it would point Mercurial at another repository")
    if has_hgignore:
        _check_hgignore(u)
    history.walk_hg(u, remember=True)  # check_repo, on the same U, does not walk it again


def _check_hgignore(u: Path) -> None:
    """``include:``/``subinclude:`` lines would make Mercurial read any host file."""
    with fsops.opened_root(u) as rfd:
        fd = fsops.open_beneath(rfd, ".hgignore", os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            text = fh.read(_HGIGNORE_MAX + 1)
    for line in text.splitlines():
        if line.strip().startswith((b"include:", b"subinclude:")):
            raise fsops.UnsafePath(".hgignore", "includes other files (include:/subinclude:)")


def refused(name: str, image: Path, exc: fsops.UnsafePath) -> GuestDataRefused:
    """The one line for a layout refusal: the VM, the path in U, why, what to do."""
    return GuestDataRefused(
        f"instance '{name}': {printable(exc.rel)} in its U image {exc.why}; refusing to use "
        f"it (inspect it with 'debugfs -R \"stat /{printable(exc.rel)}\" {image}', fix or "
        "remove the instance)"
    )


# -- mounting -----------------------------------------------------------------------------------
def mount_u(store: Store, name: str, target: Path, *, readonly: bool) -> None:
    """Check the instance's U image (or take the fast path), mount it at ``target`` with the
    guest-data options, and check its layout; on refusal nothing stays mounted."""
    image = image_path(store, name)
    check_image(store, name)
    mount_image(image, target, readonly=readonly, guest=True)
    try:
        check_layout(target)
    except fsops.UnsafePath as exc:
        release_u(store, name, target)
        raise refused(name, image, exc) from exc
    except BaseException:
        release_u(store, name, target)
        raise


@contextlib.contextmanager
def guarded(store: Store, name: str, u: Path, *, check: bool = False) -> Iterator[None]:
    """Around host work on a mounted U: a path refused beneath it (:class:`fsops.UnsafePath`,
    say a sidecar write meeting a symlink) becomes the one line naming the VM; ``check``
    checks the layout first (a U mounted earlier, by ``unionimg mount``)."""
    try:
        if check:
            check_layout(u)
        yield
    except fsops.UnsafePath as exc:
        raise refused(name, image_path(store, name), exc) from exc
    finally:
        if check:
            history.forget_walk(u)


def has_errors(image: Path) -> bool:
    """Whether the ext4 superblock records errors (s_state & EXT4_ERROR_FS)."""
    with open(image, "rb") as fh:
        fh.seek(1024 + 0x3A)
        state = fh.read(2)
    return len(state) == 2 and bool(int.from_bytes(state, "little") & 0x2)


def release_u(
    store: Store, name: str, target: Path, *, vouch: bool = True, settle: float = 2.0
) -> None:
    """Unmount U; once its loop device is gone (the host's own clean unmount: every write
    is in the image), vouch for the image as it now is (``vouch``: it was checked when it
    was mounted). A lazy unmount or a loop device still attached leaves no stamp: the next
    mount checks again."""
    image = image_path(store, name)
    history.forget_walk(target)
    umount(target)
    if not vouch:
        return
    deadline = time.monotonic() + settle
    while loop_users(image):
        if time.monotonic() > deadline:
            log.debug("%s still attached after unmount; not recording it as checked", image)
            return
        time.sleep(0.05)
    try:
        if has_errors(image):  # the host kernel met an error while it had U: check again
            forget(store, name)
            return
        record(store, name, "unmounted")
    except OSError as exc:  # the stamp is an optimisation: never fail an unmount for it
        log.warning("cannot record the check of %s: %s", image, exc)


# -- unionimg fsck VM [--repair] ----------------------------------------------------------------
def fsck(store: Store, name: str, *, repair: bool) -> JsonObject:
    """Check (``e2fsck -f -n``) or repair (``e2fsck -f -y``) the instance's U image, then
    its layout (mounted read-only). The caller (:func:`unionimg.ops.fsck_instance`) holds
    the instance's lock and has made sure it is neither mounted nor running."""
    image = image_path(store, name)
    forget(store, name)
    found: list[str] = []
    repaired = False
    if repair:
        res = e2fsck(image, "-f", "-y")
        found = problems(res)
        if res.returncode >= 8:
            raise ToolFailed(
                f"e2fsck could not repair {image}: "
                f"{found[-1] if found else f'exit status {res.returncode}'}"
            )
        if res.returncode & 4:
            raise GuestDataRefused(
                f"instance '{name}': e2fsck could not repair every problem of its U image "
                f"{image} ({found[0] if found else 'exit status 4'}); restore the image "
                "or remove the instance"
            )
        repaired = bool(res.returncode & 3)
    res = _check(name, image)
    record(store, name, "fsck")
    mnt = store.run_dir / name / "fsck"
    mount_u(store, name, mnt, readonly=True)  # the layout: refused with its path
    release_u(store, name, mnt)
    return {
        "name": name,
        "image": str(image),
        "repaired": repaired,
        "found": found if repair else problems(res),
    }


def sync_image(watch: WriteWatch, store_root: Path, owner: str, what: str) -> None:
    """Make what was written into the U image of ``owner`` durable (``watch`` was opened
    before the writes). A write-back error — EIO after U's journal aborted because the store
    could not hold the image's new blocks — raises instead of letting anything report
    writes that are lost."""
    try:
        watch.sync()
    except OSError as exc:
        try:
            forget(Store(store_root), owner)  # U lost writes: e2fsck before its next mount
        except OSError as err:
            log.warning("cannot drop the check stamp of %s: %s", owner, err)
        full = write_failure(exc, store_root, what, store_path=store_root)
        if full is not None:
            raise full from exc
        raise ToolFailed(
            f"writing the U image of {owner} failed ({exc.strerror or exc}) while trying to "
            f"{what}; nothing was recorded; check the disk holding {store_root}"
        ) from exc
