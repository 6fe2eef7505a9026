"""Tests of vm_fixtures: the tiny fixture (always) and the debian fixture (opt-in, slow)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

import vm_fixtures
from unionimg.errors import Conflict, MissingCapability, UsageError
from unionimg.runner import run
from vm_fixtures import cache, debian, tiny

IS_ROOT = os.geteuid() == 0
REQUIRE_REAL = os.environ.get("UNIONIMG_REQUIRE_REAL") == "1"


def need_root(why: str) -> None:
    """Skip (locally) or fail (UNIONIMG_REQUIRE_REAL=1) when not root."""
    if IS_ROOT:
        return
    message = f"needs root: {why}"
    if REQUIRE_REAL:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixture-cache")


@pytest.fixture(scope="module")
def tiny_root(tiny_cache: Path) -> Path:
    return vm_fixtures.build("tiny", cache_dir=tiny_cache)


def test_fixture_names() -> None:
    assert vm_fixtures.FIXTURES == ("tiny", "debian")


def test_unknown_fixture_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown fixture 'nope'"):
        vm_fixtures.build("nope", cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(vm_fixtures.CACHE_ENV, raising=False)
    repo = Path(vm_fixtures.__file__).resolve().parent.parent
    assert vm_fixtures.default_cache_dir() == repo / ".cache" / "fixtures"
    monkeypatch.setenv(vm_fixtures.CACHE_ENV, str(tmp_path))
    assert vm_fixtures.default_cache_dir() == tmp_path


def test_tiny_is_a_complete_entry(tiny_root: Path, tiny_cache: Path) -> None:
    assert tiny_root.is_dir()
    assert tiny_root.name == "rootfs"
    assert tiny_root.parent.parent == tiny_cache
    assert tiny_root.parent.name.startswith("tiny-")
    meta = json.loads((tiny_root.parent / "fixture.json").read_text())
    assert meta["fixture"] == "tiny"
    assert meta["size_bytes"] > 1_000_000
    assert not list(tiny_cache.glob(".tiny-*.partial-*"))


def test_tiny_busybox_is_static(tiny_root: Path) -> None:
    busybox = tiny_root / "bin/busybox"
    assert busybox.is_file()
    assert os.stat(busybox).st_mode & 0o111
    assert tiny.elf_interpreter(busybox) is False
    assert os.readlink(tiny_root / "bin/sh") == "/bin/busybox"
    assert os.readlink(tiny_root / "sbin/poweroff") == "/bin/busybox"


def test_elf_interpreter_tells_dynamic_from_static(tmp_path: Path) -> None:
    assert tiny.elf_interpreter(Path(sys.executable).resolve()) is True
    not_elf = tmp_path / "script"
    not_elf.write_text("#!/bin/sh\n")
    assert tiny.elf_interpreter(not_elf) is None


def test_tiny_busybox_runs_in_chroot(tiny_root: Path, root: None) -> None:
    need_root("chroot into the tiny rootfs")
    out = run(["chroot", str(tiny_root), "/bin/busybox", "--help"], what="running busybox")
    assert "BusyBox" in out.stdout + out.stderr
    out = run(["chroot", str(tiny_root), "/bin/sh", "-c", "cat /etc/hostname; id -u"])
    assert out.stdout.split() == ["tiny", "0"]


def test_tiny_init_script(tiny_root: Path) -> None:
    init = tiny_root / "sbin/init"
    assert init.is_file() and not init.is_symlink()
    assert stat.S_IMODE(init.stat().st_mode) == 0o755
    script = init.read_text()
    assert script.startswith("#!/bin/sh\n")
    for needle in (
        "unionimg-guest: $*",
        'say "nic $name mac',
        'say "root ',
        'say "boot $boots"',
        "/var/log/boots",
        "/etc/unionimg-boot.d/*",
        "unionimg.shell",
        "sync",
        "poweroff -f",
    ):
        assert needle in script, needle
    # every applet the script relies on exists in the tree
    for applet in ("mount", "hostname", "ip", "awk", "date", "wc", "sync", "poweroff", "sleep"):
        assert (
            os.path.lexists(tiny_root / "bin" / applet)
            or os.path.lexists(tiny_root / "sbin" / applet)
            or os.path.lexists(tiny_root / "usr/bin" / applet)
        ), applet
    run([str(tiny_root / "bin/busybox"), "sh", "-n", str(init)], what="checking init's syntax")


def test_tiny_etc_and_modes(tiny_root: Path) -> None:
    etc = tiny_root / "etc"
    assert (etc / "hostname").read_text() == "tiny\n"
    assert 'NAME="unionimg tiny"' in (etc / "os-release").read_text().splitlines()
    assert (etc / "passwd").read_text().startswith("root:x:0:0:")
    for name in ("group", "hosts", "motd", "fstab", "profile"):
        assert (etc / name).is_file(), name
    assert stat.S_IMODE((etc / "shadow").stat().st_mode) == 0o640
    services = (etc / "tiny/services.conf").read_text().splitlines()
    assert len(services) >= 20
    assert (etc / "tiny/network.conf").is_file()
    assert os.readlink(etc / "tiny/current.conf") == "services.conf"
    modes = {
        "": 0o755,
        "tmp": 0o1777,
        "var/tmp": 0o1777,
        "root": 0o700,
        "proc": 0o555,
        "etc": 0o755,
        "var/log": 0o755,
    }
    for rel, mode in modes.items():
        assert stat.S_IMODE((tiny_root / rel).stat().st_mode) == mode, rel
    for rel in ("sys", "dev", "run", "mnt", "home", "etc/unionimg-boot.d"):
        assert (tiny_root / rel).is_dir(), rel
    if IS_ROOT:
        for path in [tiny_root, *tiny_root.rglob("*")]:
            st = path.lstat()
            assert (st.st_uid, st.st_gid) == (0, 0), path


def test_tiny_device_nodes(tiny_root: Path, root: None) -> None:
    need_root("mknod /dev/console and /dev/null")
    for rel, dev in (("dev/console", (5, 1)), ("dev/null", (1, 3))):
        st = (tiny_root / rel).lstat()
        assert stat.S_ISCHR(st.st_mode), rel
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev


def test_tiny_cached_call_is_fast_and_does_not_rebuild(
    tiny_root: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinel = tiny_root.parent / "sentinel"
    sentinel.write_text("still here\n")
    inode = tiny_root.stat().st_ino

    def no_build(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("the cached fixture was rebuilt")

    monkeypatch.setattr(tiny, "apply", no_build)
    started = time.monotonic()
    again = vm_fixtures.build("tiny", cache_dir=tiny_cache)
    elapsed = time.monotonic() - started
    assert again == tiny_root
    assert elapsed < 1.0, f"cached call took {elapsed:.2f} s"
    assert tiny_root.stat().st_ino == inode
    assert sentinel.exists()
    sentinel.unlink()


def test_force_rebuilds_in_place(tmp_path: Path) -> None:
    first = vm_fixtures.build("tiny", cache_dir=tmp_path)
    sentinel = first.parent / "sentinel"
    sentinel.write_text("old build\n")
    again = vm_fixtures.build("tiny", cache_dir=tmp_path, force=True)
    assert again == first
    assert not sentinel.exists()
    assert (again / "bin/busybox").is_file()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [first.parent.name]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".tiny.lock"]


def test_recipe_change_makes_a_new_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = vm_fixtures.build("tiny", cache_dir=tmp_path)
    monkeypatch.setattr(tiny, "SERVICES", tiny.SERVICES + "vsftpd      21    disabled  1\n")
    second = vm_fixtures.build("tiny", cache_dir=tmp_path)
    assert second != first
    assert "vsftpd" in (second / "etc/tiny/services.conf").read_text()
    assert "vsftpd" not in (first / "etc/tiny/services.conf").read_text()


def test_failed_build_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(root: Path, *args: object, **kwargs: object) -> list[str]:
        (root / "half-written").write_text("x")
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(tiny, "apply", fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        vm_fixtures.build("tiny", cache_dir=tmp_path)
    assert not list(tmp_path.glob("tiny-*")), "a failed build looks done"
    assert not list(tmp_path.glob(".tiny-*.partial-*")), "a failed build was left behind"


def test_leftover_of_a_crash_is_removed_by_the_next_build(tmp_path: Path) -> None:
    # what a killed build leaves: a hidden partial directory, never a "<name>-<hash>" entry
    digest = vm_fixtures.recipe("tiny").digest[: cache.KEY_CHARS]
    leftover = tmp_path / f".tiny-{digest}.partial-999999"
    (leftover / "rootfs/etc").mkdir(parents=True)
    (leftover / "rootfs/etc/half-written").write_text("x")
    root = vm_fixtures.build("tiny", cache_dir=tmp_path)
    assert cache.is_complete(root.parent)
    assert not (root / "etc/half-written").exists()
    assert not leftover.exists()
    assert not list(tmp_path.glob(".tiny-*.partial-*"))


def test_leftover_with_a_mount_inside_is_refused(tmp_path: Path, root: None) -> None:
    need_root("mount a tmpfs inside a leftover build")
    digest = vm_fixtures.recipe("tiny").digest[: cache.KEY_CHARS]
    leftover = tmp_path / f".tiny-{digest}.partial-999999"
    (leftover / "rootfs/proc").mkdir(parents=True)
    run(["mount", "-t", "tmpfs", "none", str(leftover / "rootfs/proc")])
    try:
        with pytest.raises(Conflict, match="still mounted"):
            vm_fixtures.build("tiny", cache_dir=tmp_path)
        assert (leftover / "rootfs/proc").is_dir()
    finally:
        run(["umount", str(leftover / "rootfs/proc")])
    assert cache.is_complete(vm_fixtures.build("tiny", cache_dir=tmp_path).parent)


def test_cli_prints_the_rootfs_path(tmp_path: Path) -> None:
    out = run(
        [sys.executable, "-m", "vm_fixtures", "build", "tiny", "--cache", str(tmp_path)],
        what="building tiny with the CLI",
    )
    path = Path(out.stdout.strip())
    assert out.stdout.count("\n") == 1
    assert path == vm_fixtures.build("tiny", cache_dir=tmp_path)
    assert "vm_fixtures:" in out.stderr
    by_env = run(
        [sys.executable, "-m", "vm_fixtures", "build", "tiny"],
        env={vm_fixtures.CACHE_ENV: str(tmp_path)},
    )
    assert Path(by_env.stdout.strip()) == path


def test_cli_unknown_fixture_fails_cleanly() -> None:
    out = run([sys.executable, "-m", "vm_fixtures", "build", "nope"], check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr


def test_host_sources_keep_only_debian(tmp_path: Path) -> None:
    sources_list = tmp_path / "sources.list"
    sources_list.write_text(
        "# a comment\n"
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb https://packages.example.com/apt cloud-sdk-bookworm main\n"
    )
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.example/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm-updates\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    (parts / "nodesource.sources").write_text(
        "Types: deb\nURIs: https://deb.example.com/node_20.x\nSuites: nodistro\n"
        "Components: main\nSigned-By: /usr/share/keyrings/nodesource.gpg\n"
    )
    (parts / "docker.list").write_text(
        "deb [signed-by=/etc/apt/keyrings/docker.asc] https://download.example/linux/debian "
        "bookworm stable\n"
    )
    (parts / "old.sources.disabled").write_text(
        "Types: deb\nURIs: http://elsewhere.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    text, used = debian.host_sources(sources_list, parts)
    assert used == [sources_list, parts / "debian.sources"]
    assert "http://mirror.example/debian\n" in text
    assert "http://mirror.example/debian-security\n" in text
    for foreign in ("packages.example.com", "node_20", "docker", "elsewhere", "bookworm-updates"):
        assert foreign not in text, foreign
    assert "contrib" not in text
    assert text.count("Types: deb\n") == 2


def test_host_sources_without_debian_is_a_clear_error(tmp_path: Path) -> None:
    sources_list = tmp_path / "sources.list"
    sources_list.write_text("deb https://packages.example.com/apt cloud-sdk-bookworm main\n")
    with pytest.raises(MissingCapability, match="no Debian bookworm entry"):
        debian.host_sources(sources_list, tmp_path / "missing.d")


@pytest.mark.slow
def test_debian_fixture() -> None:
    wanted = REQUIRE_REAL or os.environ.get("UNIONIMG_TEST_DEBIAN") == "1"
    if not wanted:
        reason = (
            "the debian fixture takes minutes to build; "
            "set UNIONIMG_TEST_DEBIAN=1 (or UNIONIMG_REQUIRE_REAL=1) to run it"
        )
        print(reason)
        pytest.skip(reason)
    # required from here on: any failure to build fails the test
    root = vm_fixtures.build("debian")
    for rel in (
        "sbin/init",
        "lib/systemd/systemd",
        "bin/udevadm",
        "sbin/ip",
        "sbin/modprobe",
        "usr/local/sbin/unionimg-selftest",
        "etc/systemd/system/multi-user.target.wants/unionimg-selftest.service",
    ):
        assert os.path.lexists(root / rel), rel
    assert os.readlink(root / "sbin/init").endswith("/systemd")
    assert list(root.glob("boot/vmlinuz-*"))
    assert [p for p in root.glob("lib/modules/*") if (p / "kernel").is_dir()]
    assert (root / "etc/hostname").read_text() == "debian-fixture\n"
    assert (root / "etc/machine-id").read_text() == ""
    unit = (root / "etc/systemd/system/unionimg-selftest.service").read_text()
    assert "ConditionKernelCommandLine=unionimg.selftest=1" in unit
    assert not [p for p in (root / "var/lib/apt/lists").iterdir() if p.is_file()]
    assert not list(root.glob("var/cache/apt/archives/*.deb"))
    sources = "".join(p.read_text() for p in (root / "etc/apt/sources.list.d").iterdir())
    assert "nodesource" not in sources and "google" not in sources
