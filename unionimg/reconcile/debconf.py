"""debconf's databases merged record by record (issue 12, item 5). Pure.

debconf keeps its state in ``/var/cache/debconf``: ``templates.dat`` (one record per
template: its type, choices, descriptions in every language), ``config.dat`` (one record per
question: the template it asks, the answer ``Value:``, ``Owners:`` — the packages that
registered it — ``Flags:`` and ``Variables:``) and ``passwords.dat`` (``config.dat``'s format,
for password questions). Each is an RFC 822-like list of records separated by blank lines,
keyed by ``Name:``, sorted by name; a line starting with a blank continues the field above.

A text merge of these files conflicts whenever both sides installed or upgraded a package
(the records are sorted, so additions of both sides meet) and is wrong when it does not. Here
each record is merged on its own (3-way, by ``Name:``):

* a record only one side changed (added, modified, deleted) takes that side's version;
* a record both sides changed the same way is taken once;
* a record one side deleted and the other modified is kept (the modified version);
* a record both sides changed differently is merged field by field: ``Owners:`` and
  ``Flags:`` as sets (what either side added is kept, what either side removed goes), any
  other field a 3-way value, and where both sides gave a field different values the VM's
  value wins in ``config.dat`` and ``passwords.dat`` (its answer belongs with its own
  configuration) and B1's in ``templates.dat`` (template text comes from the packages). A
  question left with no owner is dropped, as debconf drops it.

So a well-formed database never conflicts. A malformed one (a line that is no field, a
record without ``Name:`` or two records of one name: what debconf itself would not write)
is refused with one line and the planner keeps it as a conflict. The output is the records
in ``Name:`` order, each followed by a blank line, as debconf writes them; records taken
from one side keep their bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CONFIG",
    "FORMATS",
    "TEMPLATES",
    "DebconfError",
    "DebconfMerge",
    "Format",
    "merge",
    "parse",
]

_FIELD = re.compile(rb"([^\s:][^:\s]*):[ \t]?(.*)")
_SETS = (b"owners", b"flags")  # fields merged as comma-separated sets


class DebconfError(ValueError):
    """A database debconf would not have written; the message says where."""


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    prefer_local: bool  # both sides gave a field different values: the VM's wins


CONFIG = Format("config", prefer_local=True)
TEMPLATES = Format("templates", prefer_local=False)
FORMATS = {
    "/var/cache/debconf/config.dat": CONFIG,
    "/var/cache/debconf/passwords.dat": CONFIG,
    "/var/cache/debconf/templates.dat": TEMPLATES,
}


@dataclass(frozen=True, slots=True)
class Record:
    name: bytes
    raw: bytes  # the record's lines, each ending in b"\n" (no blank line)
    fields: tuple[tuple[bytes, bytes], ...]  # (key as written, value with continuations)

    def get(self, key: bytes) -> bytes | None:
        for k, v in self.fields:
            if k.lower() == key:
                return v
        return None


@dataclass(frozen=True, slots=True)
class DebconfMerge:
    data: bytes  # merged: the new database; refused: the VM's own
    clean: bool
    reason: str  # one line


def _record(lines: list[bytes], where: str, first: int) -> Record:
    fields: list[tuple[bytes, bytes]] = []
    for offset, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise DebconfError(f"{where} line {first + offset}: continues no field")
            key, value = fields[-1]
            fields[-1] = (key, value + b"\n" + line)
            continue
        m = _FIELD.fullmatch(line)
        if m is None:
            raise DebconfError(f"{where} line {first + offset}: not a 'Field: value' line")
        fields.append((m.group(1), m.group(2)))
    names = [v for k, v in fields if k.lower() == b"name"]
    if len(names) != 1 or not names[0].strip():
        raise DebconfError(f"{where} line {first}: a record needs exactly one Name:")
    raw = b"".join(line + b"\n" for line in lines)
    return Record(names[0].strip(), raw, tuple(fields))


def parse(data: bytes, where: str = "database") -> dict[bytes, Record]:
    """The records of a debconf database by name; :class:`DebconfError` if malformed."""
    out: dict[bytes, Record] = {}
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    block: list[bytes] = []
    start = 1
    for number, line in enumerate([*lines, b""], 1):
        if line.strip(b" \t\r"):
            if not block:
                start = number
            block.append(line)
            continue
        if block:
            record = _record(block, where, start)
            if record.name in out:
                name = record.name.decode("utf-8", "replace")
                raise DebconfError(f"{where} line {start}: a second record named {name!r}")
            out[record.name] = record
            block = []
    return out


def _items(value: bytes | None) -> list[bytes]:
    if value is None:
        return []
    return [x.strip() for x in value.split(b",") if x.strip()]


def _merge_set(o: bytes | None, u: bytes | None, n: bytes | None) -> bytes | None:
    old, local, new = set(_items(o)), _items(u), _items(n)
    keep = [x for x in local if x in new or x not in old]
    keep += [x for x in new if x not in old and x not in keep]
    seen: list[bytes] = []
    for x in keep:
        if x not in seen:
            seen.append(x)
    return b", ".join(seen) if seen else None


def _merge_fields(fmt: Format, o: Record | None, u: Record, n: Record) -> Record | None:
    """A record both sides changed, field by field (``None``: a question left unowned)."""
    keys: list[bytes] = []
    spelled: dict[bytes, bytes] = {}
    for rec in (u, n, *((o,) if o is not None else ())):
        for k, _v in rec.fields:
            if k.lower() not in spelled:
                spelled[k.lower()] = k
                keys.append(k.lower())
    fields: list[tuple[bytes, bytes]] = []
    for key in keys:
        ov = o.get(key) if o is not None else None
        uv, nv = u.get(key), n.get(key)
        value: bytes | None
        if key in _SETS:
            value = _merge_set(ov, uv, nv)
            if key == b"owners" and value is None and (uv is not None or nv is not None):
                return None  # debconf drops a question no package owns
        elif uv == nv or nv == ov:
            value = uv
        elif uv == ov:
            value = nv
        else:
            value = uv if fmt.prefer_local else nv
        if value is not None:
            fields.append((spelled[key], value))
    raw = b"".join(
        k + (b": " if v[:1] not in (b"", b"\n") else b":") + v + b"\n" for k, v in fields
    )
    return Record(u.name, raw, tuple(fields))


def merge(fmt: Format, old: bytes | None, local: bytes | None, new: bytes | None) -> DebconfMerge:
    """The 3-way merge of one debconf database (``None``: the file does not exist)."""
    try:
        o = parse(old or b"", "B0's version")
        u = parse(local or b"", "the VM's version")
        n = parse(new or b"", "B1's version")
    except DebconfError as exc:
        return DebconfMerge(local or b"", False, f"debconf {fmt.name} database not merged: {exc}")
    out: dict[bytes, Record] = {}
    counts = {"B1's": 0, "the VM's": 0, "merged": 0}
    for name in sorted(set(o) | set(u) | set(n)):
        ov, uv, nv = o.get(name), u.get(name), n.get(name)
        ur = uv.raw if uv is not None else None
        nr = nv.raw if nv is not None else None
        orr = ov.raw if ov is not None else None
        chosen: Record | None
        if ur == nr or nr == orr:
            chosen = uv
        elif ur == orr:
            chosen, counts["B1's"] = nv, counts["B1's"] + 1
        elif uv is None or nv is None:  # deleted on one side, changed on the other: kept
            chosen = nv if uv is None else uv
            counts["B1's" if uv is None else "the VM's"] += 1
        else:
            chosen, counts["merged"] = _merge_fields(fmt, ov, uv, nv), counts["merged"] + 1
        if chosen is not None:
            out[name] = chosen
    data = _render(out.values())
    done = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "nothing to take"
    return DebconfMerge(data, True, f"debconf {fmt.name} database merged by record ({done})")


def _render(records: Iterable[Record]) -> bytes:
    return b"".join(r.raw + b"\n" for r in records)
