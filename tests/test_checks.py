"""The consistency checks of a staged result (``unionimg.reconcile.checks``), with the host's
real dpkg, apt-get, pwck and grpck on small synthetic trees (root).

A "base" here is a directory holding a minimal dpkg world (status, info lists and md5sums,
the files) and user databases; a staged upper layer is a directory beside it, as
``upper.new`` is in U. The rules:

* a consistent result passes, a broken status paragraph fails with dpkg's words, a passwd
  entry whose group is missing fails with pwck's, problems the base has itself never count;
* a base package the layer hides (an opaque directory) fails ``dpkg --verify``; one the VM
  changed itself is not verified; a file-only layer runs no program at all;
* the guest's tree is only data: a symlinked status or passwd is never followed to a host
  file, a planted NSS module or ``ld.so.preload`` is never loaded by the host's tools (a
  canary library that would leave a file if it ever ran), the guest's apt configuration is
  never read;
* through the CLI: the VM whose staged result fails stays on its generation with its union
  byte-identical and no ``upper.new`` left, the text and JSON output carry the words, a
  consistent VM of the same run reconciles, ``--no-checks`` swaps anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, need_programs, need_root
from unionimg.entries import Entry
from unionimg.fs.manifest import scan_tree
from unionimg.layers.base import Generation
from unionimg.reconcile import checks
from unionimg.reconcile.checks import NOT_NEEDED, BaseFacts, check_staged, scope_of
from unionimg.reconcile.checks_inside import APT, AUDIT, MAX_DB, PWCK, VERIFY
from unionimg.store.layout import Store

PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"  # no home: B1's own
)
GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"
SHADOW = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
GSHADOW = "root:*::\ndaemon:*::\nnogroup:*::\n"


def paragraph(name: str, version: str = "1.0", depends: str | None = None, **extra: str) -> str:
    fields = {
        "Package": name,
        "Status": "install ok installed",
        "Priority": "optional",
        "Section": "misc",
        "Maintainer": "unionimg tests <tests@example.org>",
        "Architecture": "all",
        "Version": version,
        **({"Depends": depends} if depends else {}),
        "Description": f"{name} for the consistency checks",
        **extra,
    }
    return "".join(f"{k}: {v}\n" for k, v in fields.items() if v)


def add_package(tree: Path, name: str, files: dict[str, bytes], **fields: str) -> str:
    """Install ``name`` into the dpkg world of ``tree`` (its files, list, md5sums); returns
    its status paragraph (the caller writes the status)."""
    info = tree / "var/lib/dpkg/info"
    info.mkdir(parents=True, exist_ok=True)
    dirs: set[str] = set()
    for path, data in files.items():
        (tree / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tree / path.lstrip("/")).write_bytes(data)
        parts = path.strip("/").split("/")[:-1]
        dirs |= {"/" + "/".join(parts[: i + 1]) for i in range(len(parts))}
    (info / f"{name}.list").write_text(
        "/.\n" + "".join(f"{p}\n" for p in sorted(dirs | set(files)))
    )
    (info / f"{name}.md5sums").write_text(
        "".join(f"{hashlib.md5(d).hexdigest()}  {p.lstrip('/')}\n" for p, d in files.items())
    )
    return paragraph(name, **fields)


def make_base(root: Path) -> Path:
    """B1: two packages (base-a's files under /usr/share/base-a, base-b's under /opt/b),
    the user databases (nobody's home missing, as on Debian)."""
    for d in ("etc", "root", "usr/sbin", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    status = add_package(root, "base-a", {"/usr/share/base-a/data": b"a\n"})
    status += "\n" + add_package(root, "base-b", {"/opt/b/conf": b"b\n"}, depends="base-a")
    (root / "var/lib/dpkg/status").write_text(status)
    (root / "var/lib/dpkg/arch").write_text("amd64\n")
    for name, text in (("passwd", PASSWD), ("group", GROUP), ("shadow", SHADOW)):
        (root / "etc" / name).write_text(text)
    (root / "etc/gshadow").write_text(GSHADOW)
    os.chmod(root / "etc/shadow", 0o640)
    return root


def upper_with(upper: Path, files: dict[str, bytes | str]) -> Path:
    for path, data in files.items():
        target = upper / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
    return upper


class World:
    """A store with one fake generation whose tree is a plain directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = Store(tmp / "store")
        self.store.init()
        self.base = make_base(tmp / "b1")
        gdir = tmp / "gen"
        gdir.mkdir()
        (gdir / "manifest.sqlite").write_bytes(b"")  # only its identity keys a cache
        self.store.base_dir("os").mkdir(parents=True)
        self.gen = Generation("os", 1, gdir, "", 0, "node1", None, 0, "")
        self.n = 0

    def upper(self, files: dict[str, bytes | str] | None = None) -> Path:
        self.n += 1
        up = self.tmp / f"upper{self.n}"
        up.mkdir()
        return upper_with(up, files or {})

    def check(self, upper: Path) -> checks.Verdict:
        return check_staged(self.store, self.gen, self.base, upper)


@pytest.fixture
def world(tmp_path: Path, root: None) -> Iterator[World]:
    need_root()
    need_programs("dpkg", "apt-get", "pwck", "grpck", "setpriv", "unshare", "chroot")
    checks._base_facts.cache_clear()
    w = World(tmp_path)
    yield w
    leaked = [
        ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in ln
    ]
    assert not leaked, leaked


def words(v: checks.Verdict, check: str) -> str:
    found = [p for p in v.problems if p.check == check]
    assert found, (check, v)
    return "\n".join(found[0].words)


# -- verdicts --------------------------------------------------------------------------------
def test_consistent_result_passes_and_base_only_problems_do_not_count(world: World) -> None:
    """The VM installed a package of its own (files, list, a status paragraph whose
    dependency is a base package) and a user with a home: every check passes though the
    base's own pwck run fails (nobody's home /nonexistent)."""
    status = (world.base / "var/lib/dpkg/status").read_text()
    scratch = world.tmp / "scratch"
    add_package(scratch, "vm-tool", {"/usr/bin/vm-tool": b"#!/bin/sh\n"})
    up = world.upper(
        {
            "/var/lib/dpkg/status": status + "\n" + paragraph("vm-tool", depends="base-b"),
            **{
                f"/var/lib/dpkg/info/vm-tool.{kind}": (
                    scratch / f"var/lib/dpkg/info/vm-tool.{kind}"
                ).read_bytes()
                for kind in ("list", "md5sums")
            },
            "/usr/bin/vm-tool": b"#!/bin/sh\n",
            "/etc/passwd": PASSWD + "alice:x:1000:1000::/home/alice:/bin/sh\n",
            "/etc/group": GROUP + "alice:x:1000:\n",
            "/etc/shadow": SHADOW + "alice:!:19000:0:99999:7:::\n",
            "/etc/gshadow": GSHADOW + "alice:!::\n",
            "/home/alice/.profile": "",
        }
    )
    v = world.check(up)
    assert v.ok, v.problems
    assert v.note.startswith(f"passed ({AUDIT}, {APT}, {PWCK}, grpck -r;"), v.note
    kept = json.loads((world.store.base_dir("os") / "checks/1.json").read_text())
    base_pwck = next(o for o in kept["outcomes"] if o["check"] == PWCK)
    assert base_pwck["code"] == 2  # the base fails pwck on its own: not counted
    assert "user 'nobody': directory '/nonexistent' does not exist" in base_pwck["lines"]


def test_broken_status_paragraph_fails_with_dpkgs_words(world: World) -> None:
    status = (world.base / "var/lib/dpkg/status").read_text()
    broken = "Package: vm-broken\nStatus: install ok installed\nArchitecture: all\n"  # no Version
    v = world.check(world.upper({"/var/lib/dpkg/status": status + "\n" + broken}))
    assert not v.ok
    said = words(v, AUDIT)
    assert "vm-broken" in said and "Version" in said, said


def test_unmet_dependency_fails_with_apts_words(world: World) -> None:
    status = (world.base / "var/lib/dpkg/status").read_text()
    v = world.check(
        world.upper(
            {"/var/lib/dpkg/status": status + "\n" + paragraph("vm-app", depends="not-there")}
        )
    )
    said = words(v, APT)
    assert "vm-app : Depends: not-there but it is not installable" in said, said
    assert "E: Unmet dependencies." in said


def test_user_whose_group_is_missing_fails_with_pwcks_words(world: World) -> None:
    up = world.upper(
        {
            "/etc/passwd": PASSWD + "bob:x:1001:1234::/root:/bin/sh\n",
            "/etc/shadow": SHADOW + "bob:!:19000:0:99999:7:::\n",
        }
    )
    v = world.check(up)
    assert [p.check for p in v.problems] == [PWCK], v
    assert "user 'bob': no group 1234" in words(v, PWCK)


def test_file_only_layer_runs_no_program(world: World) -> None:
    v = world.check(world.upper({"/etc/motd": "hello\n", "/srv/www/index.html": "<p>\n"}))
    assert v.ok and v.note == NOT_NEEDED
    assert not (world.store.base_dir("os") / "checks").exists()  # not even B1's baseline


def test_hidden_base_package_fails_verify_and_own_changes_are_not_verified(world: World) -> None:
    """An opaque /opt in the layer hides base-b's files: dpkg --verify names them. A base
    package whose file the VM replaced itself (base-a) is the VM's business."""
    up = world.upper({"/opt/mine": "x\n", "/usr/share/base-a/data": "changed by the VM\n"})
    os.setxattr(up / "opt", "trusted.overlay.opaque", b"y")
    v = world.check(up)
    assert [p.check for p in v.problems] == [VERIFY], v
    said = words(v, VERIFY)
    assert "missing     /opt/b/conf" in said and "base-a" not in said, said


def test_scope_is_pure_and_minimal() -> None:
    facts = BaseFacts(
        owners={"/opt/b/conf": frozenset({"base-b"}), "/usr/share/a": frozenset({"base-a"})},
        paragraphs={"base-a": "Package: base-a", "base-b": "Package: base-b"},
        has_dpkg=True,
        user_dbs=frozenset({"passwd", "group"}),
    )
    e = {
        "/": Entry("/", "dir"),
        "/opt": Entry("/opt", "dir", opaque=True),
        "/usr": Entry("/usr", "dir"),
        "/usr/share": Entry("/usr/share", "dir"),
        "/usr/share/a": Entry("/usr/share/a", "file"),
    }
    s = scope_of(e, facts, None)
    assert s.why == () and s.verify == ("base-b",)
    s = scope_of({"/": Entry("/", "dir"), "/etc/motd": Entry("/etc/motd", "file")}, facts, None)
    assert not s.needed
    s = scope_of({"/etc/passwd": Entry("/etc/passwd", "file")}, facts, None)
    assert s.why == ("/etc/passwd",)
    # a status paragraph the VM changed: that package is its own
    s = scope_of(e, facts, b"Package: base-a\n\nPackage: base-b\nVersion: 9\n")
    assert s.verify == ()


# -- the guest's tree is only data -------------------------------------------------------------
CANARY_C = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void canary(void) {
    int fd = open("%s", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) { write(fd, "loaded\n", 7); close(fd); }
}
int _nss_evil_getpwnam_r(void) { return 0; }
"""


def canary_library(tmp: Path, ran: Path) -> bytes:
    """A shared library whose constructor leaves ``ran`` if anything ever loads it."""
    need_programs("gcc")
    src = tmp / "canary.c"
    src.write_text(CANARY_C % ran)
    out = tmp / "canary.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    # the library really works: a host program given it by hand leaves the canary
    probe = subprocess.run(
        ["env", f"LD_PRELOAD={out}", "true"], capture_output=True, text=True, check=False
    )
    assert probe.returncode == 0 and ran.read_text() == "loaded\n", probe
    ran.unlink()
    return out.read_bytes()


def test_planted_libraries_and_configs_are_never_loaded(world: World) -> None:
    ran = world.tmp / "canary-ran"
    lib = canary_library(world.tmp, ran)
    libdir = "/usr/lib/x86_64-linux-gnu"
    up = world.upper(
        {
            f"{libdir}/libnss_files.so.2": lib,
            f"{libdir}/libnss_evil.so.2": lib,
            "/lib/x86_64-linux-gnu/libnss_evil.so.2": lib,
            f"{libdir}/libc.so.6": lib,
            "/etc/ld.so.preload": f"{libdir}/libnss_evil.so.2\n",
            "/etc/nsswitch.conf": "passwd: evil files\ngroup: evil files\nshadow: evil\n",
            "/etc/apt/apt.conf.d/99evil": 'Dir::Bin::dpkg "/usr/lib/x86_64-linux-gnu/libc.so.6";\n',
            "/etc/dpkg/dpkg.cfg.d/evil": "admindir /nonexistent\n",
            # user databases changed too: pwck and grpck run (and resolve names through NSS)
            "/etc/passwd": PASSWD + "carol:x:1002:1002::/root:/bin/sh\n",
            "/etc/group": GROUP + "carol:x:1002:\n",
            "/etc/shadow": SHADOW + "carol:!:19000:0:99999:7:::\n",
            "/etc/gshadow": GSHADOW + "carol:!::\n",
            "/var/lib/dpkg/status": (world.base / "var/lib/dpkg/status").read_bytes(),
        }
    )
    planted = [
        up / f"{libdir.lstrip('/')}/libnss_files.so.2",
        up / f"{libdir.lstrip('/')}/libnss_evil.so.2",
        up / "lib/x86_64-linux-gnu/libnss_evil.so.2",
        up / f"{libdir.lstrip('/')}/libc.so.6",
        up / "etc/ld.so.preload",
        up / "etc/nsswitch.conf",
        up / "etc/apt/apt.conf.d/99evil",
        up / "etc/dpkg/dpkg.cfg.d/evil",
    ]
    with Watch(*planted) as watch:  # the union's files are opened through overlayfs: seen
        v = world.check(up)
        opened = watch.events()
    assert opened == [], f"planted files opened: {opened}"
    assert not ran.exists(), "a host tool loaded a library planted in the guest's tree"
    assert v.ok, v  # the planted files changed nothing the tools report
    assert v.note.startswith("passed (dpkg --audit, apt-get check, pwck -r, grpck -r;")


def test_symlinked_databases_are_never_followed_to_host_files(world: World) -> None:
    """``/var/lib/dpkg/status -> HOST FILE`` and ``/etc/passwd -> HOST FILE``: neither host
    file is opened (inotify on both says so), the VM fails with the reason."""
    secret = world.tmp / "host-secret"
    secret.mkdir()
    (secret / "status").write_text(paragraph("canary-pkg", depends="never-there"))
    (secret / "passwd").write_text("canary-user:x:4242:4242::/root:/bin/sh\n")
    up = world.upper()
    for path, target in (
        ("var/lib/dpkg/status", secret / "status"),
        ("etc/passwd", secret / "passwd"),
        ("etc/group", Path("/etc/shadow")),
    ):
        (up / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, up / path)
    with Watch(secret / "status", secret / "passwd", Path("/etc/shadow")) as watch:
        v = world.check(up)
        opened = watch.events()
    assert opened == [], f"host files opened through guest symlinks: {opened}"
    text = "\n".join("\n".join(p.words) for p in v.problems)
    assert "canary" not in text and "4242" not in text
    assert "/var/lib/dpkg/status is a symbolic link" in words(v, AUDIT)
    assert "/etc/passwd is a symbolic link" in words(v, PWCK)


class Watch:
    """inotify (IN_OPEN) on some files: whether anything opened them meanwhile."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, *paths: Path) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.paths = paths

    def __enter__(self) -> Watch:
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0
        self.wd = {
            self.libc.inotify_add_watch(self.fd, str(p).encode(), self.IN_OPEN): p
            for p in self.paths
        }
        assert all(w >= 0 for w in self.wd)
        # the watch works: an open of the first file is seen
        with open(self.paths[0], "rb"):
            pass
        assert self.events() == [self.paths[0]]
        return self

    def events(self) -> list[Path]:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i < len(data):
            wd, _mask, _cookie, length = (
                int.from_bytes(data[i + k : i + k + 4], "little") for k in (0, 4, 8, 12)
            )
            out.append(self.wd[wd])
            i += 16 + length
        return out

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# -- through the CLI ---------------------------------------------------------------------------
def union_digest(cli: Cli, vm: str, mnt: Path) -> list[Entry]:
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", vm, str(mnt), "--readonly")
    try:
        return scan_tree(mnt, hash_files=True, digests=False)
    finally:
        cli.ok("umount", str(mnt))


def test_failing_vm_stays_on_its_generation_untouched(cli: Cli, tmp_path: Path, root: None) -> None:
    need_programs("dpkg", "apt-get", "pwck", "grpck", "setpriv", "unshare", "chroot")
    base = make_base(tmp_path / "tree")
    cli.ok("base", "create", "os", "--from-dir", str(base))
    for vm in ("bad", "good", "forced"):
        cli.ok("instance", "create", vm, "--base", "os")
    status = (base / "var/lib/dpkg/status").read_text()
    edits = {
        "bad": {"var/lib/dpkg/status": status + "\n" + paragraph("vm-app", depends="not-there")},
        "good": {"etc/motd": "the good VM\n"},
        "forced": {"var/lib/dpkg/status": status + "\n" + paragraph("vm-x", depends="gone")},
    }
    for vm, files in edits.items():
        mnt = tmp_path / f"mnt-{vm}"
        mnt.mkdir()
        cli.ok("mount", vm, str(mnt))
        try:
            for path, text in files.items():
                (mnt / path).write_text(text)
        finally:
            cli.ok("umount", str(mnt))
    patch = tmp_path / "patch"
    (patch / "etc").mkdir(parents=True)
    (patch / "etc/issue").write_text("generation 2\n")
    cli.ok("base", "update", "os", "--apply-dir", str(patch))
    before = union_digest(cli, "bad", tmp_path / "look")

    res = cli("reconcile", "bad", "good")
    assert res.exit_code == 10, res.output
    lines = res.output.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("bad: "))
    assert lines[at] == (
        "bad: error: the staged result fails the consistency checks; the instance stays on "
        "generation 1, untouched:"
    ), res.output
    said = lines[at + 1 : at + 3]  # one line per failing check, in the checks' own words
    assert said[0].startswith("  dpkg --audit: The following packages are missing the list")
    assert said[1].startswith("  apt-get check: ") and "vm-app : Depends: not-there" in said[1]
    assert any(ln.startswith("good: generation 1 -> 2: change ") for ln in lines), res.output

    shown = json.loads(cli.ok("instance", "show", "bad", "--json").output)
    assert shown["generation"] == 1
    assert union_digest(cli, "bad", tmp_path / "look") == before  # byte-identical
    assert json.loads(cli.ok("instance", "show", "good", "--json").output)["generation"] == 2
    report = json.loads(cli("reconcile", "bad", "--json").output)["instances"][
        0
    ]  # the same again, as JSON
    assert report["status"] == "error" and report["applied"] is False
    assert report["checks"].startswith("failed (dpkg --audit, apt-get check")
    assert "vm-app : Depends: not-there but it is not installable" in report["error"]
    u = Path(cli.store) / "instances/bad"
    assert not list(u.glob("conflicts/*"))

    dry = json.loads(cli("reconcile", "bad", "--dry-run", "--json").output)["instances"][0]
    assert dry["status"] == "clean" and "checks" not in dry  # a dry run checks nothing

    forced = cli("reconcile", "forced", "--no-checks", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["instances"][0]["checks"] == "skipped (--no-checks)"


def test_huge_status_is_never_given_to_dpkg(world: World) -> None:
    """A status of more than 64 MiB (sparse: it costs the guest nothing) is reported, and
    neither dpkg nor apt is run on it."""
    up = world.upper({"/etc/passwd": PASSWD})
    status = up / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    with open(status, "wb") as fh:
        fh.truncate(MAX_DB + 1)
    v = world.check(up)
    assert [p.check for p in v.problems] == [AUDIT], v
    assert "is larger than 64 MiB; not read" in words(v, AUDIT)
    assert v.note.startswith("failed (pwck -r, grpck -r;"), v.note  # no dpkg, no apt
