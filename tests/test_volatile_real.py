"""Generated and volatile files, opaque directories on the real Debian fixture (issue 12,
items 5 and 6).

Base generation 1 is the Debian fixture. Local packages (``tests/debs.py``) whose postinst
does what Debian's maintainer scripts do: register a debconf template and answer its question
(``debconf-communicate``: both ``templates.dat`` and ``config.dat`` change) and run
``ldconfig`` (``ld.so.cache`` and ``ldconfig/aux-cache`` change); dpkg itself writes
``/var/log/dpkg.log``. Two VMs, changed through ``unionimg mount`` (remounted exec by the TEST
for the packages' scripts; the host's ``dpkg --root``):

* ``libvm``: installs ``uimg-vmlib`` with a real shared library ``libuimgvm.so.1`` (gcc),
  writes ``/tmp`` and ``/var/tmp`` files, and ``mkdir /opt/x`` with a file (``/opt`` is a
  base directory: overlayfs makes ``/opt/x`` opaque);
* ``plain``: installs ``uimg-plain`` (a debconf question, ``ldconfig``, no library).

The base then installs ``uimg-baselib`` (``libuimgbase.so.1``, a debconf question, ldconfig)
and adds ``/opt/x/y`` (``base update --run``). After ``reconcile --all`` (the shipped policy):
no conflict from debconf's databases, the loader caches, logs or volatile paths; both VMs'
``ld.so.cache`` (read by the host's ``ldconfig -r MNT -p``) lists the base's new library, and
libvm's lists its own too (regenerated in the sandbox); debconf knows both sides' questions;
nothing under ``/var/log``, ``/tmp``, ``/var/tmp``, ``/var/cache`` (but debconf) is in a VM's
history; libvm sees both ``/opt/x/mine`` and the base's ``/opt/x/y``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import debs
from tests.conftest import Cli, need, need_programs, need_root
from unionimg.fs.mounts import mountinfo, unmount_tree
from unionimg.layers import history
from unionimg.layers.instance import u_layer
from unionimg.reconcile.ldcache import valid_cache
from unionimg.store.layout import Store

LIBDIR = "/usr/lib/x86_64-linux-gnu"
NOISE = (  # what both sides' package runs change that must never be a conflict
    "/var/cache/debconf/config.dat",
    "/var/cache/debconf/templates.dat",
    "/etc/ld.so.cache",
    "/var/cache/ldconfig/aux-cache",
    "/var/log/dpkg.log",
)


def library(tmp: Path, name: str) -> tuple[str, bytes]:
    """A real shared library ``lib{name}.so.1`` (its SONAME), built by the host's gcc."""
    src = tmp / f"{name}.c"
    src.write_text(f"int {name}_answer(void) {{ return 42; }}\n")
    out = tmp / f"lib{name}.so.1"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f"-Wl,-soname,lib{name}.so.1", "-o", str(out), str(src)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out.name, out.read_bytes()


def package(name: str, lib: tuple[str, bytes] | None, answer: str) -> debs.Deb:
    """``name`` 1.0: a debconf template and its answer, ``ldconfig``; ``lib``: a library
    (its file name, its bytes)."""
    templates = (
        f"Template: {name}/question\nType: string\nDefault: none\n"
        f"Description: a question of {name}\n"
    ).encode()
    files = {f"/usr/share/{name}/templates": templates}
    if lib is not None:
        files[f"{LIBDIR}/{lib[0]}"] = lib[1]
    script = (
        f"printf 'X_LOADTEMPLATEFILE /usr/share/{name}/templates\\nSET {name}/question "
        f"{answer}\\nFSET {name}/question seen true\\n' "
        f"| debconf-communicate {name} > /tmp/{name}.debconf\n"
        "ldconfig"
    )
    return debs.Deb(name, "1.0", files=files, postinst=script)


@dataclass
class World:
    cli: Cli
    tmp: Path
    report: dict[str, Any]
    code: int
    text: str  # the text output of a dry run after (nothing left to do)
    opaque: bytes  # libvm's /opt/x marker before reconcile


def exec_mount(cli: Cli, vm: str, mnt: Path) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    cli.ok("mount", vm, str(mnt))
    subprocess.run(["mount", "-o", "remount,bind,exec", str(mnt)], check=True, timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[World]:
    need_root()
    need_programs("gcc", "dpkg", "dpkg-deb", "ldconfig")
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("volatile")
    cli = Cli(tmp / "store")
    try:
        rootfs = build("debian")
        cli.ok("base", "create", "deb", "--from-dir", str(rootfs))
        built = {
            "vmlib": debs.build(package("uimg-vmlib", library(tmp, "uimgvm"), "vm"), tmp),
            "plain": debs.build(package("uimg-plain", None, "plain"), tmp),
            "baselib": debs.build(package("uimg-baselib", library(tmp, "uimgbase"), "b"), tmp),
        }
        for vm, deb in (("libvm", "vmlib"), ("plain", "plain")):
            cli.ok("instance", "create", vm, "--base", "deb")
            mnt = tmp / f"mnt-{vm}"
            exec_mount(cli, vm, mnt)
            try:
                debs.install(mnt, built[deb])
                if vm == "libvm":
                    (mnt / "tmp/vm-scratch").write_text("scratch\n")
                    (mnt / "var/tmp/vm-scratch").write_text("scratch\n")
                    # made as dpkg makes a directory (NAME.dpkg-new, renamed): overlayfs
                    # marks a directory renamed into a merged one opaque
                    (mnt / "opt/x.dpkg-new").mkdir()
                    (mnt / "opt/x.dpkg-new/mine").write_text("the VM's own\n")
                    os.rename(mnt / "opt/x.dpkg-new", mnt / "opt/x")
            finally:
                cli.ok("umount", str(mnt))
        with u_layer(Store(cli.store), "libvm", write=False) as u:
            opaque = os.getxattr(u / "upper/opt/x", "trusted.overlay.opaque")
        run = debs.install_command(built["baselib"], then="mkdir -p /opt/x && echo base > /opt/x/y")
        cli.ok("base", "update", "deb", "--run", run)
        res = cli("reconcile", "--all", "--json")
        report = {i["name"]: i for i in json.loads(res.output)["instances"]}
        text = cli("reconcile", "--all", "--dry-run").output
        yield World(cli, tmp, report, res.exit_code, text, opaque)
    finally:
        unmount_tree(tmp)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp))]


def paths(world: World, vm: str, action: str) -> set[str]:
    return {a["path"] for a in world.report[vm]["actions"] if a["action"] == action}


@pytest.mark.parametrize("vm", ["libvm", "plain"])
def test_no_conflict_from_generated_or_volatile_files(world: World, vm: str) -> None:
    r = world.report[vm]
    assert r["status"] != "error", r
    conflicted = {c["path"] for c in r["conflicts"]}
    assert not conflicted & set(NOISE), r["conflicts"]
    assert not [p for p in conflicted if p.startswith(("/var/log/", "/tmp/", "/var/cache/"))]
    assert not [p for p in conflicted if p.endswith("-")], r["conflicts"]  # the - backups
    # both sides really changed them: decided, not merely untouched
    decided = {a["path"]: a for a in r["actions"]}
    assert "/var/cache/debconf/config.dat" in decided, r["actions"]
    assert "/etc/ld.so.cache" in decided


def read_ro(world: World, vm: str, check: Any) -> Any:
    mnt = world.tmp / f"ro-{vm}"
    mnt.mkdir(exist_ok=True)
    world.cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        return check(mnt)
    finally:
        world.cli.ok("umount", str(mnt))


@pytest.mark.parametrize(("vm", "own"), [("libvm", "libuimgvm.so.1"), ("plain", None)])
def test_ld_so_cache_valid_with_both_sides_libraries(
    world: World, vm: str, own: str | None
) -> None:
    def check(mnt: Path) -> tuple[bytes, str]:
        data = (mnt / "etc/ld.so.cache").read_bytes()
        done = subprocess.run(
            ["ldconfig", "-r", str(mnt), "-p"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return data, done.stdout

    data, listing = read_ro(world, vm, check)
    assert valid_cache(data)
    assert "libuimgbase.so.1" in listing  # the base's new library
    assert "libc.so.6" in listing
    if own is not None:
        assert own in listing, listing  # regenerated: the VM's own library too
        assert "/etc/ld.so.cache" in paths(world, vm, "drop")  # B1's taken, then remade


@pytest.mark.parametrize("vm", ["libvm", "plain"])
def test_debconf_knows_both_sides_questions(world: World, vm: str) -> None:
    own = {"libvm": "uimg-vmlib", "plain": "uimg-plain"}[vm]

    def check(mnt: Path) -> tuple[str, str]:
        base = mnt / "var/cache/debconf"
        return (base / "config.dat").read_text(), (base / "templates.dat").read_text()

    config, templates = read_ro(world, vm, check)
    for name in (own, "uimg-baselib"):
        assert f"Name: {name}/question\n" in config, name
        assert f"Name: {name}/question\n" in templates, name
    assert "Name: tzdata/Areas\n" in templates  # the fixture's own records kept


def tracked(world: World, vm: str) -> list[str]:
    store = Store(world.cli.store)
    with u_layer(store, vm, write=False) as u, history.open_repo(u, guest=vm) as repo:
        return repo.cmd("files").decode().splitlines()


def test_volatile_paths_never_committed(world: World) -> None:
    files = tracked(world, "libvm")
    assert "upper/var/cache/debconf/config.dat" in files  # state: committed
    assert f"upper{LIBDIR}/libuimgvm.so.1" in files
    volatile = ("upper/var/log/", "upper/tmp/", "upper/var/tmp/", "upper/var/cache/ldconfig/")
    assert not [f for f in files if f.startswith(volatile)], files


def test_opaque_directory_made_transparent(world: World) -> None:
    assert world.opaque == b"y"  # the case is real: /opt/x was opaque in libvm's layer
    actions = {a["path"]: a for a in world.report["libvm"]["actions"]}
    assert actions["/opt/x"]["action"] == "set-meta" and actions["/opt/x"]["case"] == 16

    def check(mnt: Path) -> tuple[str, str]:
        return (mnt / "opt/x/mine").read_text(), (mnt / "opt/x/y").read_text()

    assert read_ro(world, "libvm", check) == ("the VM's own\n", "base\n")
    with u_layer(Store(world.cli.store), "libvm", write=False) as u:
        assert "trusted.overlay.opaque" not in os.listxattr(u / "upper/opt/x")


def test_text_output_after_is_quiet(world: World) -> None:
    assert "libvm: generation 2, nothing to do" in world.text, world.text


# -- the sandboxed ldconfig against a hostile layer ---------------------------------------------
PWNED = Path("/tmp/unionimg-ldcache-pwned")


def test_regenerate_is_confined(cli: Cli, tmp_path: Path, root: None) -> None:
    """A guest's layer with its cache a symlink to a host path, its own loader configuration
    naming /proc and /etc, and a library: the cache written into upper.new is a regular
    root-owned file listing the library; nothing lands on the host, in B1 or elsewhere in
    upper.new (ldconfig's aux-cache and links stay on the sandbox's tmpfs)."""
    from unionimg.reconcile.ldcache import regenerate

    need_root()
    need_programs("gcc", "ldconfig")
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    b1 = build("debian")  # read-only here: a lower layer in the sandbox
    b1_cache = (b1 / "etc/ld.so.cache").read_bytes()
    cli.ok("base", "list")  # the store exists
    PWNED.unlink(missing_ok=True)
    new = tmp_path / "upper.new"
    (new / "etc/ld.so.conf.d").mkdir(parents=True)
    os.symlink(str(PWNED), new / "etc/ld.so.cache")
    (new / "etc/ld.so.conf.d/guest.conf").write_text("/proc/self\n/etc\n/usr/local/lib\n")
    (new / "usr/local/lib").mkdir(parents=True)
    name, data = library(tmp_path, "guestlib")
    (new / "usr/local/lib" / name).write_bytes(data)
    (new / "usr/local/lib/libguestlib.so.1.0").symlink_to("/etc/shadow")
    before = sorted(str(p.relative_to(new)) for p in new.rglob("*"))

    assert regenerate(Store(cli.store), b1, new)

    assert not os.path.lexists(PWNED)
    st = os.lstat(new / "etc/ld.so.cache")
    assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o644)
    cache = (new / "etc/ld.so.cache").read_bytes()
    assert valid_cache(cache) and b"libguestlib.so.1" in cache and b"libc.so.6" in cache
    after = sorted(str(p.relative_to(new)) for p in new.rglob("*"))
    assert after == before  # only the cache replaced: no aux-cache, no link made
    assert (b1 / "etc/ld.so.cache").read_bytes() == b1_cache
    assert not [p for p in (cli.store / "tmp").iterdir()]  # the scratch is gone


def test_regenerate_failure_is_one_line_and_writes_nothing(
    cli: Cli, tmp_path: Path, root: None
) -> None:
    """A layer where no cache can be written (its /etc is a file): ToolFailed, one line, and
    upper.new as it was (reconcile then leaves the VM whole on its generation)."""
    from unionimg.errors import ToolFailed
    from unionimg.reconcile.ldcache import regenerate

    need_root()
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    from vm_fixtures import build

    cli.ok("base", "list")
    new = tmp_path / "upper.new"
    new.mkdir()
    (new / "etc").write_text("not a directory\n")
    with pytest.raises(ToolFailed) as info:
        regenerate(Store(cli.store), build("debian"), new)
    assert "\n" not in info.value.message
    assert "ld.so.cache could not be regenerated" in info.value.message
    assert sorted(p.name for p in new.iterdir()) == ["etc"] and (new / "etc").is_file()
