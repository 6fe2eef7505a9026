"""Migration on the real Debian fixture (issue 14): a Debian VM to a namespace host that holds
the same base, and back.

The VM gets a real Debian package of its own (unpacked into its union with ``dpkg-deb -x``
from the host's apt cache, or the package's files copied from the host when no .deb is
cached), a config edit and a base binary with 4 KiB rewritten. The migration sends what the
host has nowhere: the package's files and the edits — the binary as a delta on the base's
version — and the host's VM holds the very same union, file by file; then, after a small
change there, the way back sends little more than that change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Cli, need, need_ssh_hosts
from tests.test_migrate_real import Env, change, hcli, migrate, names, share_base, u_tree
from unionimg.fs.mounts import unmount_tree
from vm_fixtures.nethosts import Lab

pytestmark = pytest.mark.usefixtures("root")


@dataclass
class Deb:
    env: Env
    package: int  # bytes of the VM's own files


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory, root: None) -> Iterator[Deb]:
    need(
        os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
        or os.environ.get("UNIONIMG_REQUIRE_REAL") == "1",
        "the debian fixture takes minutes; set UNIONIMG_TEST_DEBIAN=1",
    )
    need_ssh_hosts("mke2fs", "dpkg-deb")
    from vm_fixtures import build

    tmp = tmp_path_factory.mktemp("mdeb")
    lab = Lab(tmp / "lab")
    try:
        ctl = Cli(tmp / "ctl")
        ctl.ok("base", "create", "deb", "--from-dir", str(build("debian")))
        h1 = lab.add_host("h1")
        share_base(ctl, hcli(h1), "deb")
        env = Env(tmp, lab, ctl, {"h1": h1})
        env.add_host(ctl, "h1", h1)
        back = lab.add_host("back")
        back.store = ctl.store
        env.hosts["back"] = back
        env.add_host(hcli(h1), "ctl", back)
        ctl.ok("instance", "create", "deb1", "--base", "deb", "--mac", "52:54:00:14:0d:01",
               "--hypervisor", "uml", "--size", "2G")  # fmt: skip
        mnt = tmp / "mnt"
        mnt.mkdir()
        ctl.ok("mount", "deb1", str(mnt))
        try:
            debs = sorted(Path("/var/cache/apt/archives").glob("gawk_*.deb"))
            pkg = tmp / "pkg"
            if debs:
                subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(pkg)], check=True)
            else:  # the host's own gawk
                (pkg / "usr" / "bin").mkdir(parents=True)
                shutil.copy2("/usr/bin/gawk", pkg / "usr" / "bin" / "gawk")
            own = sum(
                p.stat().st_size for p in pkg.rglob("*") if p.is_file() and not p.is_symlink()
            )
            subprocess.run(["cp", "-a", f"{pkg}/.", str(mnt)], check=True)
            (mnt / "etc" / "hostname").write_text("deb1\n")
            ls = bytearray((mnt / "usr" / "bin" / "ls").read_bytes())
            ls[40_000:44_096] = os.urandom(4096)
            (mnt / "usr" / "bin" / "ls").write_bytes(bytes(ls))
        finally:
            ctl.ok("umount", str(mnt))
        yield Deb(env, own)
    finally:
        lab.close()
        unmount_tree(tmp)


def test_debian_vm_there_and_back(deb: Deb) -> None:
    env = deb.env
    ctl, h1, back = env.ctl, env.hosts["h1"], env.hosts["back"]
    before = u_tree(ctl, "deb1", env.tmp)
    rx0 = h1.counters()["rx_bytes"]
    out = migrate(ctl, "deb1", "h1")
    wire = h1.counters()["rx_bytes"] - rx0
    assert out["deltas"] >= 1  # /usr/bin/ls on the base's version
    plan = out["plan"]
    # every content the base holds was found there; the package's files are all that is new
    # (/usr/bin/ls's new content counts whole here, but travels as a delta)
    assert plan["by_reason"]["new"]["bytes"] <= deb.package + 400_000, plan
    assert wire < deb.package, wire  # compressed; ls as a delta
    print(f"Debian VM: {plan['files']} files, {wire} B on the wire, {out['seconds']} s")
    assert "deb1" not in names(ctl)
    show = json.loads(hcli(h1).ok("instance", "show", "deb1", "--json").output)
    assert show["mac"] == "52:54:00:14:0d:01"
    assert u_tree(hcli(h1), "deb1", env.tmp) == before

    change(hcli(h1), "deb1", env.tmp, {"etc/motd": "back from h1\n"})
    rx0 = back.counters()["rx_bytes"]
    out = migrate(hcli(h1), "deb1", "ctl")
    wire = back.counters()["rx_bytes"] - rx0
    assert wire < 200_000, wire  # the package's files were kept here when it left
    print(f"Debian VM back: {wire} B on the wire")
    assert "deb1" in names(ctl) and "deb1" not in names(hcli(h1))
