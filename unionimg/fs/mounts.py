"""The one way unionimg mounts: loop images, overlay unions, and cleaning up after itself."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from unionimg import poll
from unionimg.errors import Conflict, MissingCapability, ToolFailed, UsageError
from unionimg.runner import Result, run

log = logging.getLogger(__name__)

# Overlay features that would make an upper layer unportable or unreconcilable are off:
# renamed directories would need trusted.overlay.redirect, chmod of a lower file would
# leave a metadata-only copy (metacopy). The guest's early boot mounts with the same set.
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off,xino=off"

# Every host mount of guest data (a U image, an instance's union): a setuid file the guest
# planted gives no privilege, a device node it made opens nothing, nothing on it runs on the
# host. U images also get errors=remount-ro whatever their superblock asks for (a guest may
# set errors=panic there). BASE images are the admin's and keep their own behaviour.
GUEST_FLAGS = "nosuid,nodev,noexec"
GUEST_EXT4_OPTIONS = f"{GUEST_FLAGS},errors=remount-ro"


@dataclass(frozen=True)
class MountEntry:
    target: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            entries.append(
                MountEntry(
                    target=_unescape(fields[4]),
                    fstype=rfields[0],
                    source=_unescape(rfields[1]) if len(rfields) > 1 else "",
                    options=(fields[5] + "," + rfields[2]) if len(rfields) > 2 else fields[5],
                )
            )
    return entries


def find_mount(target: str | os.PathLike[str]) -> MountEntry | None:
    want = os.path.abspath(target)
    found = None
    for entry in mountinfo():
        if entry.target == want:
            found = entry  # the last one is the top of the stack
    return found


def is_mounted(target: str | os.PathLike[str]) -> bool:
    return find_mount(target) is not None


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise MissingCapability(f"{action} needs root (loop devices and mounts); run it as root")


def mount_image(
    image: Path, target: Path, *, readonly: bool, exclusive: bool = True, guest: bool = False
) -> None:
    """Mount a raw ext4 image through a loop device that is detached on unmount.

    Read-only mounts use a read-only loop device and skip journal replay (``noload``),
    so not a single byte of the image is written. ``guest``: the image is guest data (a U
    image; see :mod:`unionimg.layers.ucheck`, which checks it first): mounted with
    :data:`GUEST_EXT4_OPTIONS`.
    """
    require_root("mounting an image")
    target.mkdir(parents=True, exist_ok=True)
    if exclusive:  # only BASE images are mounted many times at once (read-only)
        _wait_loop_released(image)
    opts = "loop,ro,noload" if readonly else "loop,rw"
    if guest:
        opts += "," + GUEST_EXT4_OPTIONS
    run(
        ["mount", "-t", "ext4", "-o", opts, str(image), str(target)],
        what=f"mounting {image.name} at {target}",
    )


def mount_new_image(image: Path, target: Path) -> None:
    """Mount ``image``, a file system this host just made (``mke2fs``) and is about to fill,
    read-write at ``target`` (``nosuid,nodev,noexec``; its inode tables left as they are:
    ``noinit_itable``) through a loop device with direct I/O, so what is written reaches the
    image's blocks without a second copy in the page cache (the Debian base's 595 MB tar
    extracted by GNU tar into a new image synced every 0.25 s: 3.0-4.5 s with it, 6.4-9.9 s
    without, ad-hoc on this machine kind). The
    loop device is detached when ``target`` is unmounted. Where direct I/O cannot be had
    (the store on a file system without it), an ordinary loop device."""
    require_root("mounting an image")
    target.mkdir(parents=True, exist_ok=True)
    opts = f"rw,{GUEST_FLAGS},noinit_itable"
    what = f"mounting {image.name} at {target}"
    setup = run(["losetup", "--find", "--show", "--direct-io=on", str(image)], check=False)
    device = setup.stdout.strip()
    if setup.returncode != 0 or not device.startswith("/dev/loop"):
        log.info("no direct I/O loop device for %s: %s", image.name, setup.stderr.strip())
        run(["mount", "-t", "ext4", "-o", "loop," + opts, str(image), str(target)], what=what)
        return
    try:
        run(["mount", "-t", "ext4", "-o", opts, device, str(target)], what=what)
    finally:  # mounted: detached once unmounted (the kernel's auto-clear); else now
        run(["losetup", "--detach", device], check=False)


def loop_users(image: Path) -> list[str]:
    """The loop devices attached to ``image`` (``/dev/loopN``), read from sysfs
    (``/sys/block/loopN/loop/backing_file``): no process per call."""
    want = os.path.realpath(image)
    found = []
    try:
        devices = sorted(d for d in os.listdir("/sys/block") if d.startswith("loop"))
    except OSError:
        return []
    for dev in devices:
        try:
            with open(f"/sys/block/{dev}/loop/backing_file", encoding="utf-8") as fh:
                backing = fh.read().rstrip("\n")
        except OSError:  # not attached, or detached meanwhile
            continue
        if backing == want:
            found.append(f"/dev/{dev}")
    return found


def ensure_shared_root() -> None:
    """Make ``/`` a shared mount (what systemd does at boot) on hosts without systemd.

    libvirt starts each QEMU in a private mount namespace that copies every mount present at
    that moment, as a slave of the host's. Only if ``/`` is shared do later unmounts on the
    host propagate into those copies; otherwise a union mounted while a guest starts stays
    pinned (its U image attached) until that guest exits.
    """
    if Path("/run/systemd/system").is_dir():
        return
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        roots = [line.split(" - ")[0].split() for line in fh if line.split()[4] == "/"]
    if roots and not any(f.startswith("shared:") for f in roots[-1][6:]):
        log.warning(
            "making / a shared mount (as systemd does) so unmounts reach the mount "
            "namespaces of libvirt's QEMU processes"
        )
        run(["mount", "--make-rshared", "/"], what="making / a shared mount")


def _wait_loop_released(image: Path, timeout: float = 10.0) -> None:
    """A lazily unmounted image keeps its loop device until its last user goes; mounting the
    same ext4 image again meanwhile would fail or, worse, run two journals on one file."""
    if not poll.until(lambda: not loop_users(image), timeout) and (devices := loop_users(image)):
        raise Conflict(
            f"{image} is still in use by an earlier mount ({', '.join(devices)}); close "
            "what uses it and retry"
        )


def _check_layer_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ",:\\\n"):
        raise UsageError(
            f"path {text} holds ',', ':' or '\\', which overlay mount options cannot carry; "
            "use a store path without them"
        )
    return text


def overlay_driver(preferred: str = "auto") -> str:
    """``overlay`` (kernel) unless it is absent; then ``fuse-overlayfs``.

    aufs is not offered: it is not in mainline kernels, and its ``.wh.`` whiteout files are
    not the char 0/0 whiteouts the guest's kernel overlay reads, so a U layer written
    through aufs would not boot.
    """
    if preferred != "auto":
        return preferred
    with open("/proc/filesystems", encoding="ascii") as fh:
        kernel_has = any(line.split()[-1] == "overlay" for line in fh if line.strip())
    if kernel_has and os.geteuid() == 0:
        return "overlay"
    if shutil.which("fuse-overlayfs"):
        return "fuse-overlayfs"
    if kernel_has:
        return "overlay"
    raise MissingCapability("neither kernel overlayfs nor fuse-overlayfs is available here")


def mount_overlay(
    lowers: list[Path],
    upper: Path | None,
    work: Path | None,
    target: Path,
    *,
    driver: str = "auto",
    guest: bool = False,
) -> str:
    """Mount the union of ``lowers`` (first is topmost) with ``upper`` at ``target``.

    Returns the driver used. With ``upper=None`` the union is read-only. ``guest``: the
    union shows guest data (an instance's): mounted ``nosuid,nodev,noexec``.
    """
    target.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(_check_layer_path(p) for p in lowers)
    if upper is not None and work is not None:
        opts += f",upperdir={_check_layer_path(upper)},workdir={_check_layer_path(work)}"
    if guest:
        opts += "," + GUEST_FLAGS
    chosen = overlay_driver(driver)
    if chosen == "overlay":
        try:
            run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "-o",
                    f"{opts},{OVERLAY_OPTIONS}",
                    "unionimg",
                    str(target),
                ],
                what=f"mounting the overlay at {target}",
            )
            return chosen
        except ToolFailed as exc:
            if driver != "auto" or not shutil.which("fuse-overlayfs"):
                raise
            if "permission" not in str(exc).lower() and "not permitted" not in str(exc).lower():
                raise
            chosen = "fuse-overlayfs"
    run(
        ["fuse-overlayfs", "-o", f"{opts},fsname=unionimg", str(target)],
        what=f"mounting the fuse-overlayfs union at {target}",
    )
    return chosen


def umount(target: Path, *, lazy_fallback: bool = True, busy_wait: float = 3.0) -> None:
    """Unmount ``target``. While it is busy (say, a killed command's helper is still
    exiting) retry for ``busy_wait`` seconds, then fall back to a lazy unmount."""
    entry = find_mount(target)
    if entry is None:
        return
    fuse = entry.fstype.startswith("fuse") and shutil.which("fusermount3")
    argv = ["fusermount3", "-u", str(target)] if fuse else ["umount", str(target)]
    tried: list[Result] = []

    def unmounted() -> bool:  # retried while busy (a killed command's helper still exiting)
        tried.append(run(argv, check=False))
        return tried[-1].returncode == 0 or not is_mounted(target)

    poll.until(unmounted, busy_wait)
    res = tried[-1]
    if res.returncode != 0 and is_mounted(target):
        if not lazy_fallback:
            raise ToolFailed(
                f"cannot unmount {target}: {res.stderr.strip()}; close programs using it and retry"
            )
        log.warning("%s is busy; unmounting it lazily", target)
        run(["umount", "-l", str(target)], what=f"lazily unmounting {target}")


def unmount_tree(root: Path) -> None:
    """Unmount everything at or below ``root``, deepest first (cleanup after a crash)."""
    prefix = os.path.abspath(root)
    targets = sorted(
        {e.target for e in mountinfo() if e.target == prefix or e.target.startswith(prefix + "/")},
        key=len,
        reverse=True,
    )
    for target in targets:
        umount(Path(target))
