"""Per-VM identity: what must differ between two VMs of one base (``docs/identity.md``).

As virt-sysprep's ``machine-id``, ``ssh-hostkeys`` and ``random-seed`` operations do for a
cloned disk, identity is kept out of every base generation and made per instance:

- at ``base create`` / ``base update`` (:func:`scrub_base`), in the staged tree before the
  image and its manifest are made: ``/etc/machine-id`` emptied (systemd's "first boot"
  state), the SSH host keys, D-Bus's own machine-id copy, the random seeds and systemd's
  credential secret removed. A generation's image and manifest never hold them.
- at ``instance create`` and whenever ``reconcile`` moves a VM to a generation
  (:func:`ensure_instance`), written into the VM's upper layer through the confined file
  operations of :mod:`unionimg.fs.fsops` (no symlink followed anywhere): a fresh
  machine-id where the base runs systemd, and SSH host keys (rsa, ecdsa, ed25519, made with
  the host's ``ssh-keygen`` in a scratch directory of the store) where the base has sshd and
  the VM's layer has no host key of its own yet (a generation's keys do not count). A VM
  that moves to a generation which brought sshd gets its keys then: Debian's
  ``ssh.service`` does not make missing keys (its ``ExecStartPre`` is ``sshd -t``, which
  fails with "no hostkeys available"), so first boot could not.

The upper layer written to is the guest's (hostile) except at ``instance create``; the base
is the admin's (trusted) but its tree is still walked without following links, so a
symlinked key or machine-id is removed as the link, never through it.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from unionimg.entries import DIR, FILE, WHITEOUT, Entry
from unionimg.errors import MissingCapability
from unionimg.fs import fsops
from unionimg.fs.manifest import Manifest
from unionimg.layers.chainview import Lookup
from unionimg.runner import run, which
from unionimg.store.layout import Store

MACHINE_ID = "/etc/machine-id"
SSH_DIR = "/etc/ssh"
#: the host key types made per VM: the ones sshd loads when sshd_config names no HostKey
#: (and that Debian's openssh-server postinst makes); DSA is gone from OpenSSH 9.x defaults
SSH_KEY_TYPES = ("rsa", "ecdsa", "ed25519")
#: a base has sshd when one of these is a regular file in it
SSHD_MARKERS = ("/usr/sbin/sshd", "/sbin/sshd", "/usr/bin/sshd", "/etc/ssh/sshd_config")
#: a base runs systemd (which reads /etc/machine-id) when one of these is in it
SYSTEMD_MARKERS = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")

EMPTIED, REMOVED = "emptied", "removed"


@dataclass(frozen=True)
class Rule:
    """One identity path: a glob on the guest path, what ``base create/update`` does to it,
    what each instance gets instead (the table of ``docs/identity.md``)."""

    pattern: str
    at_base: str  # EMPTIED (a regular file only: a link is left alone) or REMOVED
    per_instance: str
    links_too: bool = False  # REMOVED also when the entry is a symlink


RULES = (
    Rule(
        MACHINE_ID,
        EMPTIED,
        "a fresh random ID (32 lowercase hex digits, 128 random bits with the UUID v4 "
        "marks, as systemd-machine-id-setup writes), mode 0444 root, when the base runs "
        "systemd or has /etc/machine-id",
    ),
    Rule(
        "/var/lib/dbus/machine-id",
        REMOVED,
        "none: libdbus reads /etc/machine-id when it is missing (a symlink to "
        "/etc/machine-id is kept)",
    ),
    Rule(
        "/etc/ssh/ssh_host_*",
        REMOVED,
        "rsa, ecdsa and ed25519 host keys made with the host's ssh-keygen (private 0600, "
        ".pub 0644, root), when the base has sshd and the VM has no host key",
        links_too=True,
    ),
    Rule(
        "/var/lib/systemd/random-seed",
        REMOVED,
        "none: systemd-random-seed.service writes the VM's own at its first boot",
    ),
    Rule(
        "/var/lib/urandom/random-seed",
        REMOVED,
        "none: the urandom init script writes the VM's own at its first boot",
    ),
    Rule(
        "/var/lib/systemd/credential.secret",
        REMOVED,
        "none: systemd makes the VM's own the first time a credential is encrypted",
    ),
)


def _dir_of(pattern: str) -> str:
    return pattern.rsplit("/", 1)[0] or "/"


@contextmanager
def _opened_dir(tree: Path, directory: str) -> Iterator[int | None]:
    """A descriptor of ``directory`` inside ``tree`` (every component opened without
    following a symlink), or None when it is missing or not a plain directory."""
    stack = ExitStack()
    dfd: int | None = None
    try:
        dfd, _unused = stack.enter_context(fsops.parent_fd(tree, directory + "/x"))
    except OSError as exc:
        # missing, or a symlink / non-directory on the way: its target is not the tree's
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise
    with stack:
        yield dfd


def _names(dfd: int) -> list[str]:
    return sorted(os.listdir(dfd))


def scrub_base(tree: Path) -> list[str]:
    """Empty or remove every identity path of :data:`RULES` in ``tree`` (a staged base
    tree, writable); returns the guest paths it changed. No symlink is followed: a link
    that stands where a rule names a file is removed (SSH keys) or left alone."""
    changed = []
    for rule in RULES:
        directory, glob = _dir_of(rule.pattern), rule.pattern.rsplit("/", 1)[1]
        with _opened_dir(tree, directory) as dfd:
            if dfd is None:
                continue
            for name in _names(dfd):
                if not fnmatch.fnmatchcase(name, glob):
                    continue
                st = os.lstat(name, dir_fd=dfd)
                path = f"{directory}/{name}"
                if rule.at_base == REMOVED:
                    if stat.S_ISREG(st.st_mode) or (rule.links_too and stat.S_ISLNK(st.st_mode)):
                        os.unlink(name, dir_fd=dfd)
                        changed.append(path)
                elif stat.S_ISREG(st.st_mode) and st.st_size > 0:
                    entry = fsops.entry_at(tree, path)
                    assert entry is not None  # just seen, and the tree is ours alone
                    fsops.write_entry(tree, path, replace(entry, size=0, sha256=None), b"")
                    changed.append(path)
    return changed


# -- per instance ---------------------------------------------------------------------------
def new_machine_id() -> str:
    """128 random bits as 32 lowercase hex digits with the UUID v4 version and variant
    marks, as systemd makes a machine ID (``sd_id128_randomize``); never all zeros."""
    raw = bytearray(secrets.token_bytes(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def _is_file(entry: Entry | None) -> bool:
    return entry is not None and entry.kind == FILE


def base_has_sshd(base: Lookup) -> bool:
    return any(_is_file(base.get(p)) for p in SSHD_MARKERS)


def base_wants_machine_id(base: Lookup) -> bool:
    return base.get(MACHINE_ID) is not None or any(base.get(p) is not None for p in SYSTEMD_MARKERS)


def _writable_under(upper: Path, path: str) -> bool:
    """Whether the upper layer (guest data, read without following a link) can take a file
    at ``path``: every directory on the way is missing or a directory (not a symlink,
    whiteout or file the VM put there: then the VM replaced it, and it stays as it is)."""
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        e = fsops.entry_at(upper, "/" + "/".join(parts[:i]))
        if e is None:  # missing (checked from the top: nothing but directories above)
            return True
        if e.kind != DIR:
            return False
    return True


def _own_names(upper: Path, directory: str) -> dict[str, Entry]:
    """The VM's own entries directly in ``directory`` of its upper layer (not whiteouts)."""
    out: dict[str, Entry] = {}
    with _opened_dir(upper, directory) as dfd:
        for name in _names(dfd) if dfd is not None else []:
            e = fsops.entry_at(upper, f"{directory}/{name}")
            if e is not None and e.kind != WHITEOUT:
                out[name] = e
    return out


def _make_parents(upper: Path, base: Lookup, path: str) -> None:
    """The directories above ``path`` in the upper layer, each with its base counterpart's
    owner, mode and xattrs (as overlayfs' copy-up makes them); root 0755 where the base
    has none."""
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if fsops.entry_at(upper, d) is not None:
            continue
        known = base.get(d)
        entry = known if known is not None and known.kind == DIR else Entry(d, DIR, mode=0o755)
        fsops.write_entry(upper, d, entry, None)


def _write(upper: Path, base: Lookup, path: str, data: bytes, mode: int) -> None:
    if os.geteuid() != 0:
        raise MissingCapability(
            f"writing {path} (the instance's own identity, owned by root) needs root; "
            "run it as root"
        )
    _make_parents(upper, base, path)
    fsops.write_entry(upper, path, Entry(path, FILE, mode=mode, size=len(data)), data)


def _keygen(scratch: Path, kind: str, comment: str) -> tuple[bytes, bytes]:
    """A host key pair made by the host's ssh-keygen in ``scratch`` (a private directory of
    the store), read back and deleted there."""
    try:
        keygen = which("ssh-keygen")
    except MissingCapability:
        raise MissingCapability(
            "the base has sshd, and making the VM's own SSH host keys needs the host's "
            "ssh-keygen; install openssh-client"
        ) from None
    key = scratch / f"ssh_host_{kind}_key"
    run(
        [keygen, "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(key)],
        what=f"making an SSH {kind} host key",
    )
    try:
        return key.read_bytes(), key.with_name(key.name + ".pub").read_bytes()
    finally:
        key.unlink(missing_ok=True)
        key.with_name(key.name + ".pub").unlink(missing_ok=True)


def ensure_instance(upper: Path, base: Lookup, scratch: Path, name: str) -> list[str]:
    """Give the VM whose upper layer is ``upper``, on the base generation of manifest
    ``base``, its own identity where it has none in its layer; returns the guest paths
    written. What a generation holds does not count: one made before identity was kept out
    of generations may still hold a machine-id or host keys, shared by every VM.

    - ``/etc/machine-id``: written when the base runs systemd (or has the file) and the
      VM's layer has none or an empty one (a VM's own, or one systemd committed at its
      boot, stays; so does a symlink or anything else the VM put there).
    - SSH host keys (:data:`SSH_KEY_TYPES`): written when the base has sshd and the VM's
      layer has no ``/etc/ssh/ssh_host_*_key`` regular file at all (a VM that kept only
      some types keeps its choice; a symlink there is no key and is replaced, never
      followed).

    Nothing is written where the VM replaced a directory on the way by something else (its
    business; a symlink is never followed). ``scratch``: an empty private directory."""
    written: list[str] = []
    if base_wants_machine_id(base) and _writable_under(upper, MACHINE_ID):
        mine = fsops.entry_at(upper, MACHINE_ID)
        if mine is None or mine.kind == WHITEOUT or (mine.kind == FILE and mine.size == 0):
            _write(upper, base, MACHINE_ID, (new_machine_id() + "\n").encode(), 0o444)
            written.append(MACHINE_ID)
    if base_has_sshd(base) and _writable_under(upper, f"{SSH_DIR}/x"):
        own = _own_names(upper, SSH_DIR)
        has_key = any(
            fnmatch.fnmatchcase(n, "ssh_host_*_key") and e.kind == FILE for n, e in own.items()
        )
        if not has_key:
            for kind in SSH_KEY_TYPES:
                private, public = _keygen(scratch, kind, f"root@{name}")
                path = f"{SSH_DIR}/ssh_host_{kind}_key"
                _write(upper, base, path, private, 0o600)
                _write(upper, base, path + ".pub", public, 0o644)
                written += [path, path + ".pub"]
    return written


@functools.lru_cache(maxsize=16)
def _base_needs(manifest: Path, ident: tuple[int, int, int]) -> bool:
    """Whether the generation of ``manifest`` (an immutable file; ``ident``: its device,
    inode and mtime, so a removed and remade generation is asked again) needs a per-VM
    identity at all. Asked once per generation, not once per VM of a reconcile."""
    with Manifest(manifest) as base:
        return base_wants_machine_id(base) or base_has_sshd(base)


def ensure_staged(store: Store, upper: Path, manifest: Path, name: str) -> list[str]:
    """:func:`ensure_instance` for reconcile: ``upper`` is the VM's staged upper layer
    (``upper.new``), ``manifest`` the manifest of the generation it moves to; the keys are
    made in a staging directory of the store, removed after. A generation that needs no
    identity (no systemd, no sshd) costs one cached answer per VM."""
    st = os.stat(manifest)
    if not _base_needs(manifest, (st.st_dev, st.st_ino, st.st_mtime_ns)):
        return []
    with store.staging(f"identity-{name}") as scratch, Manifest(manifest) as base:
        return ensure_instance(upper, base, scratch, name)
