"""Records of reconcile's own files: held resolutions, ownership proposals, the undo record,
reports and the consistency checks' baselines (a part of :mod:`unionimg.store.records`,
imported only where reconcile runs or reports)."""

from __future__ import annotations

from typing import Self

from unionimg.store.records import (
    ConflictRecord,
    Fields,
    JsonObject,
    Record,
    RecordError,
    record_list,
)


class HeldResolution(Record, frozen=True):
    """How the admin settled a conflict policy ``fail`` held: the next reconcile of the
    instance to ``generation`` decides ``path`` by ``action`` (keep-local or take-base)."""

    WHAT = "held resolution"

    path: str
    action: str  # a policy action: keep-local | take-base
    generation: int
    took: str  # what resolve was told (local, base, merged, file F)
    resolved: str

    def to_json(self) -> JsonObject:
        return {
            "path": self.path,
            "action": self.action,
            "generation": self.generation,
            "took": self.took,
            "resolved": self.resolved,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            path=f.text("path"),
            action=f.text("action"),
            generation=f.integer("generation"),
            took=f.text("took"),
            resolved=f.text("resolved"),
        )


class HeldResolutions(Record, frozen=True):
    """An instance's resolutions of held conflicts, used (then removed) by its next reconcile."""

    WHAT = "held resolution list"
    FILE = "held-resolutions.json"

    items: tuple[HeldResolution, ...] = ()

    def to_json(self) -> list[JsonObject]:
        return [r.to_json() for r in self.items]

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls(record_list(data, HeldResolution, ""))


class OwnerChange(Record, frozen=True):
    """One of the VM's files whose owner a conflict's proposal changes (a renumbered user,
    group or sub-ID range): written by :mod:`unionimg.reconcile.userdb` into the conflict's
    ``proposal-owners``, applied by ``resolve --take proposal``."""

    WHAT = "ownership change"

    path: str
    which: str  # "uid" | "gid" (the JSON key is "field")
    old: int
    new: int

    def to_json(self) -> JsonObject:
        return {"path": self.path, "field": self.which, "old": self.old, "new": self.new}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        which = f.text("field")
        if which not in ("uid", "gid"):
            raise RecordError(f"field 'field' is {which!r}, not 'uid' or 'gid'")
        old, new = f.integer("old"), f.integer("new")
        if not (0 <= old < 2**32 - 1 and 0 <= new < 2**32 - 1):
            raise RecordError("field 'old' or 'new' is no ID (0 to 4294967294)")
        return cls(path=f.text("path"), which=which, old=old, new=new)


class OwnerChanges(Record, frozen=True):
    """A conflict's ``proposal-owners``: the ownership changes its ``proposal`` implies."""

    WHAT = "ownership change list"
    FILE = "proposal-owners"

    items: tuple[OwnerChange, ...] = ()

    def to_json(self) -> list[JsonObject]:
        return [c.to_json() for c in self.items]

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls(record_list(data, OwnerChange, ""))


class PackageConflict(Record, frozen=True):
    """A package both sides changed that stays a conflict (dpkg's status): what ``resolve
    --package`` applies as one unit. Written by the planner (:mod:`unionimg.reconcile.plan`)
    into the status conflict's ``packages`` artefact."""

    WHAT = "package conflict"

    package: str
    architecture: str
    local: str  # the VM's version ("removed": none)
    base: str  # B1's version
    files: tuple[str, ...]  # U's entries of the package: its info files and files
    edited_conffiles: tuple[str, ...] = ()  # conffiles the VM edited (kept by --take base)

    def to_json(self) -> JsonObject:
        return {
            "package": self.package,
            "architecture": self.architecture,
            "local": self.local,
            "base": self.base,
            "files": list(self.files),
            "edited_conffiles": list(self.edited_conffiles),
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        files, edited = f.texts("files"), f.maybe_texts("edited_conffiles") or ()
        if not all(p.startswith("/") and "/../" not in p + "/" for p in (*files, *edited)):
            raise RecordError("field 'files' holds a path that is not absolute and plain")
        return cls(
            package=f.text("package"),
            architecture=f.text("architecture"),
            local=f.text("local"),
            base=f.text("base"),
            files=files,
            edited_conffiles=edited,
        )

    @property
    def label(self) -> str:
        return f"{self.package}:{self.architecture}" if self.architecture else self.package


class PackageConflicts(Record, frozen=True):
    """A status conflict's ``packages`` artefact: its packages still pending."""

    WHAT = "package conflict list"
    FILE = "packages"

    items: tuple[PackageConflict, ...] = ()

    def to_json(self) -> list[JsonObject]:
        return [c.to_json() for c in self.items]

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls(record_list(data, PackageConflict, ""))


class LastReconcile(Record, frozen=True):
    """The last reconcile applied to an instance, for ``reconcile --undo``."""

    WHAT = "undo record"
    FILE = "last-reconcile.json"

    from_generation: int
    to_generation: int
    pre_node: str | None
    post_node: str | None = None  # U's changeset right after it: undo refuses if U moved on
    conflicts_before: tuple[ConflictRecord, ...] = ()
    finished: str | None = None

    def to_json(self) -> JsonObject:
        return {
            "from": self.from_generation,
            "to": self.to_generation,
            "pre_node": self.pre_node,
            "post_node": self.post_node,
            "conflicts_before": [c.to_json() for c in self.conflicts_before],
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            from_generation=f.integer("from"),
            to_generation=f.integer("to"),
            pre_node=f.maybe_text("pre_node", None),
            post_node=f.maybe_text("post_node", None),
            conflicts_before=f.records("conflicts_before", ConflictRecord, ()),
            finished=f.maybe_text("finished", None),
        )


# -- reconcile reports ---------------------------------------------------------------------------
class ReportAction(Record, frozen=True):
    """One change reconcile makes (or, in a dry run, would make) to a path."""

    WHAT = "reported action"

    path: str
    case: int
    action: str  # plan's drop | write | set-meta | conflict | error | report
    reason: str
    # dpkg's status: the packages the newer version settled, one line each (JSON only if any)
    packages: tuple[str, ...] = ()

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "path": self.path,
            "case": self.case,
            "action": self.action,
            "reason": self.reason,
        }
        if self.packages:
            out["packages"] = list(self.packages)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            path=f.text("path"),
            case=f.integer("case"),
            action=f.text("action"),
            reason=f.text("reason"),
            packages=f.maybe_texts("packages") or (),
        )


PENDING = "pending since generation "


class ReportConflict(Record, frozen=True):
    """A conflict in a report: found by this run, or ``pending`` from an earlier one (its
    reason then starts with :data:`PENDING`)."""

    WHAT = "reported conflict"

    path: str
    reason: str
    case: int | None
    pending: bool = False

    @classmethod
    def earlier(cls, c: ConflictRecord) -> Self:
        """A conflict an earlier run set aside and nobody resolved yet."""
        return cls(c.path, f"{PENDING}{c.generation}: {c.reason}", c.case, pending=True)

    def to_json(self) -> JsonObject:
        # the key order each kind always had: ``reconcile --json`` prints it unsorted
        if self.pending:
            return {"path": self.path, "case": self.case, "reason": self.reason}
        return {"path": self.path, "reason": self.reason, "case": self.case}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        reason = f.text("reason")
        return cls(
            path=f.text("path"),
            reason=reason,
            case=f.maybe_integer("case"),
            pending=reason.startswith(PENDING),
        )


class InstanceReport(Record, frozen=True):
    """What reconcile did (or would do) to one instance."""

    WHAT = "instance report"

    name: str
    from_generation: int | None = None
    to_generation: int | None = None
    status: str = "clean"  # clean | conflicts | error
    actions: tuple[ReportAction, ...] = ()
    conflicts: tuple[ReportConflict, ...] = ()
    error: str | None = None
    unaffected: int = 0  # paths of U the base delta does not touch
    applied: bool = False
    full: bool = False  # the error was a full disk (not in JSON)
    checks: str | None = None  # the consistency checks' verdict (in JSON only when set)

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "from_generation": self.from_generation,
            "to_generation": self.to_generation,
            "status": self.status,
            "actions": [a.to_json() for a in self.actions],
            "conflicts": [c.to_json() for c in self.conflicts],
            "error": self.error,
            "unaffected": self.unaffected,
            "applied": self.applied,
        } | ({"checks": self.checks} if self.checks is not None else {})

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            name=f.text("name"),
            from_generation=f.maybe_integer("from_generation"),
            to_generation=f.maybe_integer("to_generation"),
            status=f.text("status"),
            actions=f.records("actions", ReportAction),
            conflicts=f.records("conflicts", ReportConflict),
            error=f.maybe_text("error"),
            unaffected=f.integer("unaffected"),
            applied=f.flag("applied"),
            checks=f.maybe_text("checks", None),
        )


class ReconcileReport(Record, frozen=True):
    """One reconcile run, kept in ``reports/`` (the last ``apply.REPORTS_KEPT`` of them)."""

    WHAT = "reconcile report"
    PREFIX = "reconcile-"
    GLOB = "reconcile-*.json"

    finished: str
    dry_run: bool
    instances: tuple[InstanceReport, ...]

    @classmethod
    def file_name(cls, unique: str) -> str:
        return f"{cls.PREFIX}{unique}.json"

    def to_json(self) -> JsonObject:
        return {
            "finished": self.finished,
            "dry_run": self.dry_run,
            "instances": [r.to_json() for r in self.instances],
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            finished=f.text("finished"),
            dry_run=f.flag("dry_run"),
            instances=f.records("instances", InstanceReport),
        )


# -- the consistency checks (reconcile.checks) -------------------------------------------------
class CheckOutcome(Record, frozen=True):
    """What one check program said: its exit status and its output's lines."""

    WHAT = "check outcome"

    check: str  # "dpkg --audit", "apt-get check", "pwck -r", "grpck -r", "dpkg --verify"
    code: int
    lines: tuple[str, ...]

    def to_json(self) -> JsonObject:
        return {"check": self.check, "code": self.code, "lines": list(self.lines)}

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(check=f.text("check"), code=f.integer("code"), lines=f.texts("lines"))


class CheckBaseline(Record, frozen=True):
    """The checks on one base generation alone (``bases/B/checks/N.json``): what a VM's
    staged result is compared with. Valid for that generation (its hg node) and the host's
    programs as they were (``tools``)."""

    WHAT = "consistency check baseline"

    node: str
    tools: str
    outcomes: tuple[CheckOutcome, ...]

    def to_json(self) -> JsonObject:
        return {
            "node": self.node,
            "tools": self.tools,
            "outcomes": [o.to_json() for o in self.outcomes],
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        f = Fields(data)
        return cls(
            node=f.text("node"),
            tools=f.text("tools"),
            outcomes=f.records("outcomes", CheckOutcome),
        )
