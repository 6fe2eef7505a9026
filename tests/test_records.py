"""Typed records (:mod:`unionimg.store.records`): every record round-trips through JSON, the
files the previous unionimg wrote (``tests/data/records-v1/``) still load and are written
back byte for byte, and a damaged record is one line naming its file and field (no root)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
from pathlib import Path

import msgspec
import pytest

from tests.conftest import Cli
from unionimg.errors import EXIT_INTERNAL, UsageError
from unionimg.layers import ucheck
from unionimg.store import probecache, records
from unionimg.store.fleet_records import Deployment, HostMeta, SystemMeta, SystemVM
from unionimg.store.layout import Store, read_record, write_json, write_record
from unionimg.store.migrate_records import (
    ChainLayer,
    HashIndex,
    LayerTree,
    LeftManifest,
    MigrateAnswer,
    MigrateDone,
    MigrateOffer,
    TreeEntry,
)
from unionimg.store.placement_records import PlacedHost, PlacementApplied, PlannedRecovery
from unionimg.store.reconcile_records import (
    CheckBaseline,
    CheckOutcome,
    HeldResolution,
    HeldResolutions,
    InstanceReport,
    LastReconcile,
    OwnerChange,
    OwnerChanges,
    PackageConflict,
    PackageConflicts,
    ReconcileReport,
    ReportAction,
    ReportConflict,
)
from unionimg.store.records import (
    BaseMeta,
    BaseRef,
    ConflictRecord,
    Conflicts,
    DamagedRecord,
    GenerationMeta,
    Instance,
    LayerMeta,
    MountRecord,
    ProbeCache,
    ReconcileJournal,
    Record,
    RecordError,
    Resolution,
    StoreMeta,
    UCheckStamp,
    compact,
    sorted_conflicts,
)
from unionimg.store.snapshot_records import SnapshotRecord

V1 = Path(__file__).parent / "data" / "records-v1"

CONFLICT = ConflictRecord(
    path="/etc/nämé with space",
    reason="binary file changed on both sides",
    generation=3,
    dir="/var/lib/unionimg/instances/vm1/conflicts/31dc742b3c9d4130-3",
    files=("base-new", "base-old", "local"),
    case=7,
)
GENERATION = GenerationMeta(
    number=2,
    created="2026-12-01T23:53:49Z",
    size=64 << 20,
    hg_node="41f78baaf5af02ee5dcda6ab231692dcfd7ebe06",
    kernel="6.1.0-28-amd64",
    files=4,
    source="generation 1 changed by: apt-get -y upgrade",
)
INSTANCE = Instance(
    name="vm1",
    base="os",
    generation=2,
    mac="7a:11:e3:d1:b4:ef",
    hypervisor="uml",
    size=4 << 30,
    memory=512,
    vcpus=2,
    created="2026-12-01T23:53:45Z",
    nic_name="lan0",
)
MOUNT = MountRecord(
    target="/mnt/vm1",
    readonly=True,
    driver="fuse-overlayfs",
    lower="/var/lib/unionimg/run/vm1/lower",
    u="/var/lib/unionimg/run/vm1/u",
    base="os",
    generation=1,
    mounted="2026-12-01T23:53:46Z",
    u_checked=True,
)
JOURNAL = ReconcileJournal(
    phase="swap",
    from_generation=2,
    to_generation=3,
    pre_node=None,
    started="2026-12-01T23:53:55Z",
    new_ino=34,
    commit_paths=(".unionimg", "upper/etc/bin"),
    conflicts=(CONFLICT,),
    conflicts_before=(CONFLICT.replace(generation=2),),
)
SYSTEM_VM = SystemVM("mail1", "sha256:" + "ab" * 32, "52:54:00:00:00:01", "kvm", 512, 1, 1 << 30)
EXAMPLES: list[Record] = [
    StoreMeta(format=1, created="2026-12-01T23:53:42Z"),
    BaseMeta(name="os", created="2026-12-01T23:53:43Z"),
    GENERATION,
    INSTANCE,
    MOUNT,
    UCheckStamp(
        size=1 << 30, mtime_ns=17, ctime_ns=18, ino=2549470, dev=65024, how="fsck", when="now"
    ),
    CONFLICT,
    Conflicts((CONFLICT, CONFLICT.replace(path="/a", case=None))),
    CONFLICT.replace(held=True),
    HeldResolution(
        path="/etc/bin", action="keep-local", generation=3, took="local", resolved="now"
    ),
    HeldResolutions((HeldResolution("/a", "take-base", 2, "base", "now"),)),
    JOURNAL,
    LastReconcile(
        from_generation=1,
        to_generation=2,
        pre_node="c02f00b351859523e73a083309703e93ed46d9ed",
        post_node="a244252e494f8ec4c09cd35ca3e846e44afd0d32",
        conflicts_before=(CONFLICT,),
        finished="2026-12-01T23:53:50Z",
    ),
    ReportAction(path="/etc/motd", case=3, action="write", reason="base changed, U did not"),
    ReportConflict(path="/etc/bin", reason="binary file changed on both sides", case=7),
    ReportConflict.earlier(CONFLICT),
    InstanceReport(
        name="vm1",
        from_generation=1,
        to_generation=2,
        status="conflicts",
        actions=(ReportAction("/etc/bin", 7, "conflict", "binary file changed on both sides"),),
        conflicts=(ReportConflict("/etc/bin", "binary file changed on both sides", 7),),
        unaffected=12,
        applied=True,
    ),
    InstanceReport(name="vm2", status="error", error="instance 'vm2' is running; stop it"),
    ReconcileReport(
        finished="2026-12-01T23:53:50Z",
        dry_run=True,
        instances=(InstanceReport("vm1"), InstanceReport("vm2", 1, 1)),
    ),
    BaseRef(instance="vm1", base="os", generation=3),
    Resolution(path="/etc/bin", took="file /root/bin", generation=3, resolved="now"),
    OwnerChange(path="/home/alice", which="uid", old=1000, new=1001),
    OwnerChanges((OwnerChange("/home/alice", "gid", 1000, 1001),)),
    PackageConflict("tool", "amd64", "1.1", "2", ("/var/lib/dpkg/info/tool.list",), ("/etc/t",)),
    PackageConflicts((PackageConflict("tool", "", "1", "removed", ()),)),
    ReportAction("/var/lib/dpkg/status", 5, "write", "merged", ("tool: base 2 supersedes ...",)),
    ProbeCache(version=1, entries={"0287e57c": {"ok": False, "reason": "no output in 25 s"}}),
    CheckOutcome("pwck -r", 2, ("user 'lp': directory '/var/spool/lpd' does not exist",)),
    CheckBaseline("ab12", "v1;/usr/bin/dpkg:1:2", (CheckOutcome("dpkg --audit", 0, ()),)),
    INSTANCE.replace(layers=("sha256:" + "ab" * 32, "sha256:" + "cd" * 32)),
    LayerMeta(
        diff_id="sha256:" + "ab" * 32,
        blob_digest="sha256:" + "ef" * 32,
        blob_size=4711,
        tar_size=10240,
        parent="sha256:" + "cd" * 32,
        kind="snapshot",
        created="2026-12-02T03:29:04Z",
        label="L" + "ab" * 7 + "a",
        image_size=155648,
        entries=5,
        origin="instance vm1: A",
        base="os",
        generation=2,
        instance="vm1",
        message="A",
    ),
    SYSTEM_VM,
    SnapshotRecord(
        vm="vm1",
        id=2,
        created="2026-12-02T06:20:34Z",
        kind="memory+disk",
        instance=INSTANCE,
        chain=("sha256:" + "cd" * 32,),
        domain_type="qemu",
        memory_size=12288,
        memory=("ab" * 32 + ":8192", "ef" * 32 + ":4096"),
        disk_size=1 << 20,
        disk=("65536:" + "12" * 32 + ":65536",),
        new_bytes=4096,
        pause_ms=170,
        ready_line="unionimg-init: switching root to the union of /dev/vda and /dev/vdb",
    ),
    SystemMeta(
        name="lab-restored",
        parent="lab",
        created="2026-12-02T03:40:00Z",
        message="restored",
        vms=(
            SystemVM("mail1", "sha256:" + "ab" * 32, "52:54:00:00:00:01", "kvm", 512, 1, 1 << 30),
        ),
    ),
    Deployment(system="lab", digest="sha256:" + "12" * 32, vms=("mail1",), deployed="now"),
    HostMeta(
        name="h1",
        user="root",
        addr="10.77.0.2",
        port=22,
        store="/var/lib/unionimg",
        unionimg="/usr/local/bin/unionimg",
        created="2026-12-02T03:40:00Z",
    ),
    TreeEntry(
        "upper/etc/hosts", "file", 0o644, 0, 0, 17, 12, "ab" * 32, xattrs=(("user.a", "00"),)
    ),
    ChainLayer("sha256:" + "cd" * 32, "base", None, 4096, "os", 1),
    MigrateOffer(
        1,
        INSTANCE,
        (ChainLayer("sha256:" + "cd" * 32, "base", None, 4096, "os", 1),),
        (
            TreeEntry("upper", "dir", 0o755, 0, 0, 5),
            TreeEntry("upper/x", "symlink", 0o777, 0, 0, 5, target="y"),
        ),
        sender="/var/lib/unionimg",
    ),
    MigrateAnswer(("sha256:" + "cd" * 32,), ("ab" * 32,), (("ef" * 32, "cache"),), "os", 1),
    MigrateDone("web", "52:54:00:00:00:01", "uml", 3, 2, 0, 4096, 1, 1.5),
    HashIndex("12:4096:17", (("ab" * 32, "upper/etc/hosts"),)),
    LeftManifest("web", (("/var/lib/db/big.sqlite", "ef" * 32),)),
    LayerTree(
        "sha256:" + "cd" * 32,
        TreeEntry(".", "dir", 0o755, 0, 0, 3),
        (TreeEntry("etc", "dir", 0o755, 0, 0, 3), TreeEntry("etc/x", "file", 0o644, 0, 0, 3)),
    ),
    PlacedHost("h1", ("sha256:" + "cd" * 32,)),
    PlannedRecovery("h1", "web", "h3", 0),
    PlacementApplied(
        system="lab",
        registry="http://10.213.5.2:5000",
        created="2026-12-02T06:40:00Z",
        method="exact",
        status="optimal",
        worst=0,
        total=0,
        servers='server = [{ name = "h1", disk = "1G", runs = ["web"] }]\n',
        hosts=(PlacedHost("h3", ("sha256:" + "cd" * 32,)),),
        recovery=(PlannedRecovery("h1", "web", "h3", 0),),
        recovered=("web@h3",),
    ),
]


def test_every_record_has_an_example() -> None:
    """Every record of every ``unionimg.store.*records`` module (found, not listed)."""
    import unionimg.store

    modules = [
        importlib.import_module(f"unionimg.store.{m.name}")
        for m in pkgutil.iter_modules(unionimg.store.__path__)
        if m.name.endswith("records")
    ]
    assert records in modules and len(modules) >= 3
    kinds = {
        obj
        for module in modules
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Record) and obj is not Record
    }
    assert kinds == {type(r) for r in EXAMPLES}


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip(record: Record) -> None:
    text = json.dumps(record.to_json(), sort_keys=True)
    again = type(record).from_json(json.loads(text))
    assert again == record
    assert json.dumps(again.to_json(), sort_keys=True) == text
    assert isinstance(record, msgspec.Struct)
    with pytest.raises(AttributeError):  # frozen
        setattr(record, record.__struct_fields__[0], None)


# -- files written by the previous version ------------------------------------------------------
STORE_FILES: list[tuple[str, type[Record]]] = [
    ("store.json", StoreMeta),
    ("base.json", BaseMeta),
    ("generation.json", GenerationMeta),
    ("instance.json", Instance),
    ("mount.json", MountRecord),
    ("u-checked.json", UCheckStamp),
    ("conflicts.json", Conflicts),
    ("conflicts-after-journal.json", Conflicts),
    ("conflicts-empty.json", Conflicts),
    ("reconcile-journal.json", ReconcileJournal),
    ("last-reconcile.json", LastReconcile),
    ("last-reconcile-with-conflicts.json", LastReconcile),
    ("report.json", ReconcileReport),
    ("report-pending.json", ReconcileReport),
]


@pytest.mark.parametrize(("name", "kind"), STORE_FILES, ids=[n for n, _ in STORE_FILES])
def test_store_files_of_the_previous_version_load_and_write_back_identical(
    name: str, kind: type[Record], tmp_path: Path
) -> None:
    record = read_record(V1 / name, kind)
    write_record(tmp_path / name, record)
    assert (tmp_path / name).read_bytes() == (V1 / name).read_bytes()


def test_the_previous_version_s_records_say_what_it_wrote() -> None:
    inst = read_record(V1 / "instance.json", Instance)
    assert (inst.name, inst.generation, inst.nic_name) == ("vm1", 2, "eth0")
    mount = read_record(V1 / "mount.json", MountRecord)
    assert (mount.target, mount.readonly, mount.u_checked) == ("/mnt/vm1", False, True)
    journal = read_record(V1 / "reconcile-journal.json", ReconcileJournal)
    assert (journal.phase, journal.from_generation, journal.to_generation) == ("swap", 2, 3)
    assert journal.commit_paths == (".unionimg",) and journal.new_ino == 19
    assert [c.generation for c in journal.conflicts_before] == [2]
    assert [c.generation for c in journal.conflicts] == [3]
    # what reconcile writes after that journal: both merged by path, the later one kept
    merged = sorted_conflicts([*journal.conflicts_before, *journal.conflicts])
    assert compact(merged) == compact(read_record(V1 / "conflicts-after-journal.json", Conflicts))
    report = read_record(V1 / "report-pending.json", ReconcileReport)
    assert report.instances[0].conflicts[0].pending


@pytest.mark.parametrize(
    ("name", "kind"), [("u-base.json", BaseRef), ("u-resolutions.jsonl", Resolution)]
)
def test_u_files_of_the_previous_version_are_written_identically(
    name: str, kind: type[Record]
) -> None:
    text = (V1 / name).read_text(encoding="utf-8")
    assert compact(kind.from_json(json.loads(text))) == text


@pytest.mark.parametrize("name", ["kvm-probe.json", "uml-probe.json"])
def test_probe_caches_of_the_previous_version_load_and_save_identical(
    name: str, tmp_path: Path
) -> None:
    entries = probecache.load(V1 / name, 1)
    assert entries and all(isinstance(v, dict) for v in entries.values())
    probecache.save(tmp_path / name, 1, entries, "test")
    assert (tmp_path / name).read_bytes() == (V1 / name).read_bytes()
    assert probecache.load(V1 / name, 2) == {}  # another version: probe again


@pytest.mark.parametrize("name", ["cli-reconcile-dry-run.json", "cli-reconcile-pending.json"])
def test_reconcile_json_output_keeps_its_key_order(name: str) -> None:
    """``reconcile --json`` prints its reports unsorted: the key order of every object (a
    new conflict: path, reason, case; a pending one: path, case, reason) is the contract."""
    text = (V1 / name).read_text(encoding="utf-8")
    data = json.loads(text)
    reports = [InstanceReport.from_json(r) for r in data["instances"]]
    out = {"dry_run": data["dry_run"], "instances": [r.to_json() for r in reports]}
    assert json.dumps(out, indent=2, ensure_ascii=False) + "\n" == text


# -- leniency: what earlier versions wrote, or left out -----------------------------------------
def test_fields_added_later_keep_their_defaults() -> None:
    inst = INSTANCE.replace(nic_name="eth0")
    data = inst.to_json()
    del data["nic_name"]
    assert Instance.from_json(data) == inst
    mount = {k: v for k, v in MOUNT.to_json().items() if k not in ("u_checked", "readonly")}
    assert not MountRecord.from_json(mount).u_checked
    gen = {k: v for k, v in GENERATION.to_json().items() if k not in ("kernel", "source")}
    assert (GenerationMeta.from_json(gen).kernel, GenerationMeta.from_json(gen).source) == (
        None,
        "",
    )
    # the first reconcile journal ("staging", before the swap) and undo record (no post_node)
    staging = {"phase": "staging", "from": 1, "to": 2, "pre_node": "ab", "started": "t"}
    journal = ReconcileJournal.from_json(staging)
    assert (journal.new_ino, journal.commit_paths, journal.conflicts) == (None, None, ())
    last = LastReconcile.from_json(
        {"from": 1, "to": 2, "pre_node": "ab", "conflicts_before": [], "finished": None}
    )
    assert (last.post_node, last.finished) == (None, None)
    conflict = CONFLICT.to_json()
    del conflict["case"]
    assert ConflictRecord.from_json(conflict).case is None


def test_unknown_keys_are_ignored() -> None:
    data = {**INSTANCE.to_json(), "added_by_a_later_version": [1, 2]}
    assert Instance.from_json(data) == INSTANCE


# -- damage: one clear error, never a KeyError ----------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "os"}, "field 'created' is missing"),
        ({"name": "os", "created": 5}, "field 'created' is an integer, not a string"),
        ({"name": None, "created": "t"}, "field 'name' is null, not a string"),
        (["os"], "it holds a list, not a JSON object"),
    ],
)
def test_a_bad_field_is_named(data: object, message: str) -> None:
    with pytest.raises(RecordError) as err:
        BaseMeta.from_json(data)
    assert str(err.value) == message


def test_types_are_checked_exactly() -> None:
    good = INSTANCE.to_json()
    for key, bad in [("generation", True), ("generation", "2"), ("memory", 512.0), ("mac", 7)]:
        with pytest.raises(RecordError, match=f"field '{key}' is "):
            Instance.from_json({**good, key: bad})
    with pytest.raises(RecordError, match=r"field 'files'\[1\] is an integer, not a string"):
        ConflictRecord.from_json({**CONFLICT.to_json(), "files": ["a", 1]})
    with pytest.raises(RecordError, match="field 'u_checked' is a string, not a boolean"):
        MountRecord.from_json({**MOUNT.to_json(), "u_checked": "yes"})


def test_a_nested_record_s_field_is_named_with_its_place() -> None:
    data = JOURNAL.to_json()
    del data["conflicts_before"][0]["dir"]
    with pytest.raises(RecordError) as err:
        ReconcileJournal.from_json(data)
    assert str(err.value) == "conflicts_before[0]: field 'dir' is missing"
    with pytest.raises(RecordError) as err:
        Conflicts.from_json([CONFLICT.to_json(), "x"])
    assert str(err.value) == "[1]: it holds a string, not a JSON object"
    with pytest.raises(RecordError, match="it is an object, not a list"):
        Conflicts.from_json({})


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{\n  "target": "/mnt/vm1"\n}\n', "field 'driver' is missing"),
        ('{"target": "/mnt', "it is not JSON"),
        (b"\xff\xfe{}", "it is not JSON"),
    ],
)
def test_a_damaged_file_is_one_error_naming_it(
    tmp_path: Path, content: str | bytes, why: str
) -> None:
    path = tmp_path / MountRecord.FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DamagedRecord) as err:
        read_record(path, MountRecord)
    message = err.value.message
    assert message.startswith(f"mount record {path} is damaged: {why}")
    assert "\n" not in message and "restore it" in message
    assert err.value.exit_code == EXIT_INTERNAL
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "missing.json", MountRecord)


def test_the_cli_says_which_record_is_damaged(cli: Cli) -> None:
    cli.ok("instance", "list")  # makes the store
    idir = cli.store / "instances" / "vm1"
    idir.mkdir(mode=0o700)
    data = INSTANCE.to_json()
    del data["mac"]
    write_json(idir / Instance.FILE, data)
    res = cli.fails("instance", "show", "vm1", code=EXIT_INTERNAL)
    assert f"instance record {idir / Instance.FILE} is damaged: field 'mac' is missing" in (
        res.output
    )


# -- the store's own records -----------------------------------------------------------------
def test_store_format_is_checked_before_the_rest(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    s.init()
    assert read_record(s.root / StoreMeta.FILE, StoreMeta).format == 2
    write_json(s.root / StoreMeta.FILE, {"format": 3, "layers": {}})
    with pytest.raises(UsageError, match="has format 3, this unionimg reads 2"):
        s.init()
    write_json(s.root / StoreMeta.FILE, {"format": "1"})
    with pytest.raises(DamagedRecord, match="field 'format' is a string, not an integer"):
        s.init()


def test_a_format_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    """Format 1 (before delta generations and layers) is a valid format 2 store: the number
    is raised the first time it is opened, so an older unionimg then refuses it in one line."""
    s = Store(tmp_path / "st")
    s.init()
    write_json(s.root / StoreMeta.FILE, {"format": 1, "created": "2026-11-01T00:00:00Z"})
    s.init()
    meta = read_record(s.root / StoreMeta.FILE, StoreMeta)
    assert (meta.format, meta.created) == (2, "2026-11-01T00:00:00Z")


def test_u_check_stamp_vouches_only_for_the_same_image(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    s.init()
    s.instance_dir("vm1").mkdir()
    image = ucheck.image_path(s, "vm1")
    image.write_bytes(b"\0" * 4096)
    assert not ucheck.unchanged(s, "vm1")  # never checked
    ucheck.record(s, "vm1", "fsck")
    stamp = read_record(s.instance_dir("vm1") / ucheck.STAMP, UCheckStamp)
    assert (stamp.how, stamp.size, stamp.ino) == ("fsck", 4096, image.stat().st_ino)
    assert ucheck.unchanged(s, "vm1")
    os.utime(image, ns=(1, 1))  # changed since: e2fsck again
    assert not ucheck.unchanged(s, "vm1")
    ucheck.record(s, "vm1", "unmounted")
    assert ucheck.unchanged(s, "vm1")
    (s.instance_dir("vm1") / ucheck.STAMP).write_text('{"size": "4096"}')
    assert not ucheck.unchanged(s, "vm1")  # a damaged stamp costs a check, not an error


def test_damaged_probe_cache_only_costs_a_probe(tmp_path: Path) -> None:
    cache = tmp_path / "probe.json"
    for text in ("{", '{"version": 1}', '{"version": 1, "entries": []}', "[]"):
        cache.write_text(text)
        assert probecache.load(cache, 1) == {}
