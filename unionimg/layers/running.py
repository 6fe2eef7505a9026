"""Whether an instance's guest runs, whether its last boot failed, and why.

**The running record.** While a guest unionimg started runs, ``running.json`` in the
instance's directory holds its :class:`~unionimg.hypervisors.Running` record (this module is
the one place that reads and writes it). :func:`running_on` asks the record's driver whether
the guest still runs; a guest found gone has its host resources released by its driver, its
crash recorded when it failed, and its record removed. The drivers are found through the
registry (:func:`unionimg.hypervisors.get`), so asking costs no hypervisor library unless a
guest of that hypervisor is recorded.

**What the console says.** The serial console log of a boot (``STORE/run/VM/guest/
console.log``) is read for three things:

* the readiness line ``unionimg-init: switching root to the union of ...``: the initramfs
  (:file:`guest_init.sh`) found BASE and U, mounted their union and is handing over to the
  base's init (:data:`READY`);
* ``unionimg-init: error: ...``: the initramfs gave up (a missing BASE or U disk, a mount
  that failed, no init in the union) and powers the guest off (:data:`INIT_ERROR`);
* ``Kernel panic - not syncing: ...``: the guest's kernel panicked; ``Attempted to kill
  init! exitcode=0x...`` in it means PID 1 exited (the initramfs's /init, switch_root, or
  the base's init), and its status is decoded (:data:`PANIC`).

The console is written by the guest, which is untrusted: what is quoted from it is escaped
(no control characters or terminal escapes reach the admin's terminal) and cut short, and
only a bounded part of the log is read (its head for the readiness line, its tail for the
failure).

**The crash record.** When a guest that was not asked to stop is found gone and its console,
its hypervisor (libvirt's shut-off reason ``crashed`` after a pvpanic report, UML's exit
status) or the missing readiness line says it failed, ``crashed.json`` is written in the
instance's directory (:func:`record_crash`); ``instance show`` then says ``crashed`` with the
reason, and the next boot clears it. A hypervisor process that ends badly only after its guest
reached the union root and its kernel printed its halt line (``reboot: System halted``, the
console's last line) is warned about, not recorded: the guest had finished
(:func:`teardown_fault`).
"""

from __future__ import annotations

import logging
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionimg import display, hypervisors
from unionimg.hypervisors import Running
from unionimg.names import shown
from unionimg.store.layout import Store, now_iso, read_json, write_json
from unionimg.store.records import DamagedRecord

log = logging.getLogger(__name__)

RUNNING_FILE = "running.json"
CRASH_FILE = "crashed.json"
HEAD_BYTES = 4 << 20
"""How much of the start of a console log is searched for the readiness line."""
TAIL_BYTES = 64 << 10
"""How much of the end of a console log is searched for the failure."""
QUOTE_MAX = 240
"""Longest piece of console text quoted in a message."""

READY = re.compile(r"^unionimg-init: switching root to the union of ")
INIT_ERROR = re.compile(r"^unionimg-init: error: (.*)$")
PANIC = re.compile(r"Kernel panic - not syncing: ?(.*)$")
INIT_EXIT = re.compile(r"Attempted to kill init! exitcode=(0x[0-9a-fA-F]+)")
#: the guest kernel's last words when it finished a halt or a power-off (UML, which has no
#: power-off driver, halts for both)
HALTED = re.compile(r"^reboot: (System halted|Power down)$")
#: a kernel log line's time stamp, ``[    1.234567] ``
_STAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
#: a line before the panic that may say why (switch_root's error, UML's ptrace failure...)
_CAUSE = re.compile(
    r"error|fail|can't|cannot|unable|not found|no such|denied|BUG:|Oops|fault", re.IGNORECASE
)
#: kernel lines that follow a panic or an oops and never explain it
_NOISE = re.compile(
    r"^(CPU:|Hardware name:|Call Trace:|<TASK>|</TASK>|RIP:|RSP:|RAX:|RDX:|RBP:|R\d+:|FS:|CS:|"
    r"CR2:|Code:|Modules linked in:|Kernel Offset:|Rebooting in|---\[ end|\?|dump_stack|panic\+)"
)


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal N`` for a number that names no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def quote(text: str, limit: int = QUOTE_MAX) -> str:
    """Guest-written text made safe for one line of a terminal: every control character
    (ESC included) and other unprintable character becomes a ``\\xNN``/``\\uNNNN`` escape,
    backslashes are doubled, and the result is cut at ``limit`` characters."""
    return display.shown(text, limit)


def console_lines(data: bytes) -> list[str]:
    """A console's text as its non-empty lines, without the kernel's time stamps."""
    text = data.decode("utf-8", errors="replace")
    out = []
    for raw in text.replace("\r", "\n").split("\n"):
        line = _STAMP.sub("", raw.strip()).strip()
        if line:
            out.append(line)
    return out


def read_console(path: Path) -> tuple[list[str], list[str]]:
    """(lines of the log's head, lines of its tail), both bounded; ([], []) if it is absent."""
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
            size = fh.seek(0, 2)
            if size <= HEAD_BYTES:
                return console_lines(head), console_lines(head)
            fh.seek(max(size - TAIL_BYTES, HEAD_BYTES))
            tail = fh.read(TAIL_BYTES)
    except OSError:
        return [], []
    # the tail's first line may be cut in the middle: drop it
    return console_lines(head), console_lines(tail)[1:]


@dataclass(frozen=True)
class ConsoleVerdict:
    """What a boot's console log shows."""

    ready: bool
    """The readiness line is there: the union root was prepared and handed to the base's init."""
    failure: str | None
    """One line saying why the boot failed (quoted, escaped), or None."""
    last_line: str
    """The log's last line (quoted), for messages about a guest that stopped silently."""
    halted: bool = False
    """The log ends with the kernel's halt (or power-off) line: the guest's kernel finished
    its shutdown; whatever its hypervisor's process did after it was not the guest's."""


def _init_exit(code_hex: str, ready: bool, cause: str | None) -> str:
    code = int(code_hex, 16)
    if cause is not None and cause.startswith("switch_root:"):
        who = "switch_root (PID 1)"
    elif ready:
        who = "the base's init (PID 1)"
    else:
        who = "the initramfs's /init (PID 1)"
    if code & 0x7F:
        return f"{who} was killed by {signal_name(code & 0x7F)}"
    return f"{who} exited with status {(code >> 8) & 0xFF}"


def _cause_before(lines: list[str], index: int) -> str | None:
    """The nearest of the few lines before ``lines[index]`` that looks like a cause."""
    for line in reversed(lines[max(0, index - 8) : index]):
        if _NOISE.match(line) or INIT_ERROR.match(line) or line.startswith("unionimg-init:"):
            continue
        if _CAUSE.search(line):
            return line
    return None


def analyse(head: list[str], tail: list[str]) -> ConsoleVerdict:
    """The verdict of a console log given as :func:`read_console` returns it."""
    ready = any(READY.match(line) for line in head)
    last = quote(tail[-1]) if tail else ""
    halted = bool(tail) and HALTED.match(tail[-1]) is not None
    for line in tail:
        m = INIT_ERROR.match(line)
        if m:
            return ConsoleVerdict(ready, f"the initramfs failed: {quote(m.group(1))}", last, halted)
    for index, line in enumerate(tail):
        m = PANIC.search(line)
        if not m:
            continue
        message = m.group(1).strip()
        reason = f"kernel panic: {quote(message)}"
        cause = _cause_before(tail, index)
        exited = INIT_EXIT.search(message)
        if exited:
            reason += f" ({_init_exit(exited.group(1), ready, cause)})"
        if cause:
            reason += f" after '{quote(cause)}'"
        return ConsoleVerdict(ready, reason, last, halted)
    return ConsoleVerdict(ready, None, last, halted)


def teardown_fault(verdict: ConsoleVerdict, hypervisor_says: str | None) -> bool:
    """The hypervisor's process failed after the guest had finished: the guest reached its
    union root, then its kernel halted (its last console line), and only then did the
    process end badly (Debian's UML 6.1 is now and then killed by SIGABRT in its own exit
    path, after "reboot: System halted": its exit calls have closed the console, so it says
    nothing). The guest's disks were synced and its devices shut down before that line, so
    its stop was clean; the caller says what the process did as a warning."""
    return bool(hypervisor_says) and verdict.ready and verdict.halted


def console_verdict(path: Path) -> ConsoleVerdict:
    return analyse(*read_console(path))


def stop_reason(
    verdict: ConsoleVerdict, *, hypervisor_says: str | None, stop_requested: bool
) -> str | None:
    """Why a guest that is gone failed, or None when it ended well: it powered off after the
    readiness line, or an admin stopped it (a panic on the console still counts then).
    ``hypervisor_says``: the hypervisor's own evidence of a crash (libvirt's shut-off reason
    ``crashed``, UML killed by a signal or exiting non-zero), or None; it does not count
    when the guest had reached its union root and its kernel then finished a halt (see
    :func:`teardown_fault`)."""
    if verdict.failure:
        return verdict.failure
    if stop_requested:
        return None
    last = f"; last console line: '{verdict.last_line}'" if verdict.last_line else "; no output"
    if hypervisor_says and not teardown_fault(verdict, hypervisor_says):
        return f"{hypervisor_says}{last}"
    if not verdict.ready:
        return (
            "the guest stopped before its init started on the union root (no "
            f"'unionimg-init: switching root' line){last}"
        )
    return None


# -- where a guest's files are ----------------------------------------------------------------
def workdir(store: Store, name: str) -> Path:
    """The instance's run directory for its guest: rendered files, initramfs, console."""
    return store.run_dir / name / "guest"


def console_log(store: Store, name: str) -> Path:
    return workdir(store, name) / "console.log"


# -- the running record -----------------------------------------------------------------------
def running_path(store: Store, name: str) -> Path:
    return store.instance_dir(name) / RUNNING_FILE


def read_running(store: Store, name: str) -> Running | None:
    """The running record of the instance's guest, or None when it has none. DamagedRecord
    (one line naming the file and the field) when it is not what unionimg writes: whether a
    guest runs is then unknown, and nothing may touch the instance's images."""
    path = running_path(store, name)
    try:
        rec = Running.from_json(read_json(path))
        if rec.hypervisor not in hypervisors.names():
            raise ValueError(f"no driver for hypervisor '{shown(rec.hypervisor)}'")
    except FileNotFoundError:
        return None
    except ValueError as exc:  # not JSON, or not a running record
        raise DamagedRecord(
            f"running record {path} is damaged: {exc}; unionimg never writes it so: if no "
            f"guest of instance '{name}' runs, remove that file"
        ) from None
    return rec


def write_running(store: Store, name: str, rec: Running) -> None:
    write_json(running_path(store, name), rec.to_json())


def clear_running(store: Store, name: str) -> None:
    running_path(store, name).unlink(missing_ok=True)


def running_on(store: Store, name: str) -> str | None:
    """The hypervisor the instance's guest runs on now, or None. A guest found gone has its
    record cleared and, when it failed, its crash recorded."""
    rec = read_running(store, name)
    if rec is None:
        return None
    driver = hypervisors.get(rec.hypervisor)
    seen = driver.is_running(rec)
    if seen.running:
        return rec.hypervisor
    _cleanup(store, name, rec, seen.evidence)
    return None


def _cleanup(store: Store, name: str, rec: Running, evidence: str | None) -> None:
    """The guest is gone: record why if it failed, free what it held, forget that it ran."""
    console = Path(rec.console)
    verdict = console_verdict(console)
    reason = stop_reason(verdict, hypervisor_says=evidence, stop_requested=rec.stopping)
    if reason is None and evidence and not rec.stopping:  # stop_reason's teardown_fault
        log.warning(
            "%s: %s after its guest had halted (console: '%s'); the guest's shutdown was "
            "complete, so it counts as stopped",
            name,
            evidence,
            verdict.last_line,
        )
    if reason is not None:
        record_crash(
            store,
            name,
            hypervisor=rec.hypervisor,
            reason=reason,
            console=str(console),
            ready=verdict.ready,
            evidence=evidence,
        )
    hypervisors.get(rec.hypervisor).release(rec)
    clear_running(store, name)


# -- the crash record -------------------------------------------------------------------------
@dataclass(frozen=True)
class Crash:
    """Why the instance's last boot failed (``crashed.json``), until its next boot."""

    reason: str
    """One line (console text in it quoted and escaped)."""
    hypervisor: str = ""
    ready: bool = False
    """The guest had reached its init on the union root before it failed."""
    evidence: str | None = None
    """What the hypervisor said (libvirt's shut-off reason, UML's exit status), if anything."""
    at: str = ""
    console: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "hypervisor": self.hypervisor,
            "reason": self.reason,
            "ready": self.ready,
            "evidence": self.evidence,
            "at": self.at,
            "console": self.console,
        }

    @classmethod
    def from_json(cls, data: object) -> Crash:
        """The record :meth:`to_json` wrote; ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for key in ("reason", "hypervisor", "at", "console"):
            if not isinstance(data.get(key, ""), str):
                raise ValueError(f"'{key}' is not a string")
        if not isinstance(data.get("reason"), str):
            raise ValueError("'reason' is missing")
        if not isinstance(data.get("ready", False), bool):
            raise ValueError("'ready' is not true or false")
        evidence = data.get("evidence")
        if evidence is not None and not isinstance(evidence, str):
            raise ValueError("'evidence' is not a string")
        return cls(
            reason=data["reason"],
            hypervisor=data.get("hypervisor", ""),
            ready=data.get("ready", False),
            evidence=evidence,
            at=data.get("at", ""),
            console=data.get("console", ""),
        )


def _crash_path(store: Store, name: str) -> Path:
    return store.instance_dir(name) / CRASH_FILE


def last_crash(store: Store, name: str) -> Crash | None:
    """The record of the instance's last boot failure, or None."""
    path = _crash_path(store, name)
    if not path.is_file():
        return None
    try:
        return Crash.from_json(read_json(path))
    except (OSError, ValueError):
        return Crash(reason=f"unreadable crash record {path}")


def record_crash(
    store: Store,
    name: str,
    *,
    hypervisor: str,
    reason: str,
    console: str,
    ready: bool = False,
    evidence: str | None = None,
) -> None:
    """Write the crash record: ``reason`` (one line), whether the guest had reached its init
    on the union root (``ready``) and what the hypervisor said (``evidence``)."""
    if not store.instance_dir(name).is_dir():
        return  # removed meanwhile
    crash = Crash(reason, hypervisor, ready, evidence, now_iso(), console)
    write_json(_crash_path(store, name), crash.to_json())


def clear_crash(store: Store, name: str) -> None:
    _crash_path(store, name).unlink(missing_ok=True)
