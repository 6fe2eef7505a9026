"""Small deterministic Debian packages for tests (issue 12: packages, users, conffiles).

No network, no mirror: :func:`build` makes a ``.deb`` with ``dpkg-deb --build
--root-owner-group`` (owners root:root, every mtime and the ar timestamps fixed by
``SOURCE_DATE_EPOCH``: the same :class:`Deb` gives the same bytes on every run).

API (keep it small):

* :class:`Deb` — a package: ``name``, ``version``, ``files`` (absolute path -> content),
  ``conffiles`` (absolute path under ``/etc`` -> content, listed in ``DEBIAN/conffiles``),
  ``postinst`` (a ``/bin/sh`` script body, or ``None``), ``depends`` (a ``Depends:`` value),
  ``architecture`` (``all``).
* :func:`build` ``(deb, outdir) -> Path`` — the ``.deb`` file, named as apt caches it
  (``NAME_VERSION_ARCH.deb``, ``:`` of an epoch as ``%3a``).
* :func:`install` ``(tree, *debs)`` — the host's ``dpkg --root=TREE -i`` (maintainer
  scripts run chrooted in TREE by dpkg itself, so TREE needs ``/bin/sh`` and what the scripts
  call: use it on the Debian fixture's trees, mounted ``exec``). ``cache=True`` also copies
  the debs to TREE's ``/var/cache/apt/archives`` as apt leaves them.
* :func:`install_command` ``(*debs) -> str`` — a shell command for
  ``unionimg base update BASE --run CMD``: that command runs chrooted in the new generation's
  tree (:mod:`unionimg.layers.sandbox`), which cannot see the host's files, so the debs travel
  base64-encoded in the command itself (a few KiB each), are written to the tree's
  ``/var/cache/apt/archives`` (kept there, as apt keeps what it installed, unless
  ``cache=False``) and installed by the tree's own ``dpkg -i``.
* Ready packages: :func:`conf_package` (``uimg-conf``, or another name, 1.0 / 2.0: the
  20-line conffile :data:`CONFFILE` changed on line 10 between them, plus a plain file),
  :func:`user_package` (``uimg-svc``: ``Depends: uimg-conf``, a ``postinst`` adding the system
  user :data:`SYSTEM_USER` with ``adduser --system`` or ``useradd --system``),
  :func:`plain_package` (any name, one file under ``/usr/share``, no scripts).
"""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CONFFILE",
    "EPOCH",
    "SYSTEM_USER",
    "Deb",
    "build",
    "conf_package",
    "conffile_text",
    "install",
    "install_command",
    "plain_package",
    "user_package",
]

EPOCH = 1_700_000_000  # SOURCE_DATE_EPOCH and every mtime in the packages
CONFFILE = "/etc/uimg-conf/uimg.conf"
SYSTEM_USER = "uimgsvc"
ARCHIVES = "/var/cache/apt/archives"
_TIMEOUT = 120


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    files: Mapping[str, bytes] = field(default_factory=dict)
    conffiles: Mapping[str, bytes] = field(default_factory=dict)
    postinst: str | None = None
    depends: str | None = None
    architecture: str = "all"
    description: str = "unionimg test package"

    @property
    def filename(self) -> str:
        """The name apt gives the package in its cache."""
        version = self.version.replace(":", "%3a")
        return f"{self.name}_{version}_{self.architecture}.deb"


def _control(deb: Deb) -> str:
    lines = [
        f"Package: {deb.name}",
        f"Version: {deb.version}",
        f"Architecture: {deb.architecture}",
        "Maintainer: unionimg tests <tests@unionimg.invalid>",
        "Priority: optional",
        "Section: misc",
    ]
    if deb.depends:
        lines.append(f"Depends: {deb.depends}")
    lines.append(f"Description: {deb.description}")
    return "\n".join(lines) + "\n"


def _put(root: Path, path: str, data: bytes, mode: int = 0o644) -> None:
    if not path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"package paths are absolute, without '..': {path!r}")
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(mode)


def build(deb: Deb, outdir: Path) -> Path:
    """Build ``deb`` into ``outdir`` (created if missing); the same ``deb``, the same bytes."""
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / deb.filename
    with tempfile.TemporaryDirectory(prefix="deb-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir(mode=0o755)
        for path, data in {**deb.files, **deb.conffiles}.items():
            _put(root, path, data, 0o755 if data.startswith(b"#!") else 0o644)
        (root / "DEBIAN").mkdir(mode=0o755)
        _put(root, "/DEBIAN/control", _control(deb).encode())
        if deb.conffiles:
            _put(
                root, "/DEBIAN/conffiles", "".join(f"{p}\n" for p in sorted(deb.conffiles)).encode()
            )
        if deb.postinst is not None:
            _put(root, "/DEBIAN/postinst", f"#!/bin/sh\nset -e\n{deb.postinst}\n".encode(), 0o755)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                os.utime(Path(dirpath) / name, (EPOCH, EPOCH), follow_symlinks=False)
            Path(dirpath).chmod(0o755)
        os.utime(root, (EPOCH, EPOCH))
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(out)],
            check=True, capture_output=True, env=env, timeout=_TIMEOUT,
        )  # fmt: skip
    return out


def install(
    tree: Path, *debs: Path, cache: bool = False, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The host's ``dpkg --root=TREE -i DEBS`` (see the module docstring); ``cache`` first
    copies the debs to TREE's apt cache as apt would have left them."""
    if cache:
        archives = tree / ARCHIVES.lstrip("/")
        archives.mkdir(parents=True, exist_ok=True)
        for deb in debs:
            shutil.copyfile(deb, archives / deb.name)
    env = {
        **os.environ,
        "DEBIAN_FRONTEND": "noninteractive",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    done = subprocess.run(
        ["dpkg", f"--root={tree}", "--force-confold", "-i", *map(str, debs)],
        capture_output=True, text=True, env=env, timeout=_TIMEOUT, check=False,
    )  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"dpkg --root={tree} -i failed: {done.stdout}\n{done.stderr}")
    return done


def install_command(*debs: Path, cache: bool = True, then: str = "") -> str:
    """A ``base update --run`` command installing ``debs`` in the new generation's tree with
    its own ``dpkg -i`` (the debs carried in the command, base64); ``then``: more shell run
    after, in the same chroot (``&&``)."""
    parts = ["set -e", f"mkdir -p {ARCHIVES}"]
    targets = []
    for deb in debs:
        target = f"{ARCHIVES}/{deb.name}"
        encoded = base64.b64encode(deb.read_bytes()).decode()
        parts.append(f"echo {encoded} | base64 -d > {shlex.quote(target)}")
        targets.append(shlex.quote(target))
    parts.append(f"DEBIAN_FRONTEND=noninteractive dpkg --force-confold -i {' '.join(targets)}")
    if not cache:
        parts.append(f"rm -f {' '.join(targets)}")
    if then:
        parts.append(then)
    return "; ".join(parts)


# -- ready packages -----------------------------------------------------------------------------
def conffile_text(version: int) -> bytes:
    """The 20 lines of :data:`CONFFILE` in ``uimg-conf`` ``version`` (1 or 2: line 10 differs)."""
    lines = [f"option{i:02d} = value{i:02d}" for i in range(1, 21)]
    if version >= 2:
        lines[9] = "option10 = changed-in-2.0"
    return ("# uimg-conf configuration\n" + "\n".join(lines) + "\n").encode()


def conf_package(version: int, name: str = "uimg-conf", conffile: str = CONFFILE) -> Deb:
    """``name`` (``uimg-conf``) ``{version}.0``: the conffile ``conffile``
    (:data:`CONFFILE`, content :func:`conffile_text`) and a plain file."""
    return Deb(
        name,
        f"{version}.0",
        files={f"/usr/share/{name}/VERSION": f"{version}.0\n".encode()},
        conffiles={conffile: conffile_text(version)},
    )


def user_package(version: str = "1.0") -> Deb:
    """``uimg-svc``: depends on ``uimg-conf``; its postinst adds the system user
    :data:`SYSTEM_USER` (``adduser --system`` where the tree has it, else ``useradd``)."""
    script = (
        f"if ! getent passwd {SYSTEM_USER} >/dev/null; then\n"
        "  if command -v adduser >/dev/null; then\n"
        f"    adduser --system --quiet --group --no-create-home --home /nonexistent {SYSTEM_USER}\n"
        "  else\n"
        f"    useradd --system --user-group --no-create-home --home-dir /nonexistent"
        f" --shell /usr/sbin/nologin {SYSTEM_USER}\n"
        "  fi\n"
        "fi"
    )
    return Deb(
        "uimg-svc",
        version,
        files={"/usr/lib/uimg-svc/run": b"#!/bin/sh\necho uimg-svc\n"},
        postinst=script,
        depends="uimg-conf (>= 1.0)",
    )


def plain_package(name: str, version: str = "1.0") -> Deb:
    """``name`` ``version``: one file under ``/usr/share/NAME``, no maintainer scripts."""
    return Deb(name, version, files={f"/usr/share/{name}/README": f"{name} {version}\n".encode()})
