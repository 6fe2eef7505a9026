"""What every command module of the CLI shares: the context (store, ``--debug``), the
top-level options, JSON output, the parameter types, and the one place that turns an error
into one ``unionimg: error:`` line and its exit code (:class:`UnionimgGroup`).

Kept light: ``unionimg --help`` imports this module and no command module.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from unionimg.display import shown
from unionimg.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_PIPE_CLOSED, UnionimgError
from unionimg.fs.space import write_failure
from unionimg.names import HYPERVISORS, parse_int, parse_seconds, parse_size
from unionimg.store.layout import DEFAULT_STORE, Store

if TYPE_CHECKING:
    from unionimg.layers.history import Changeset

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Ctx:
    def __init__(self, store_path: str, debug: bool) -> None:
        self.store_path = store_path
        self.debug = debug
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_path)
            self._store.init()
        return self._store


pass_ctx = click.make_pass_decorator(Ctx)


# -- the top-level options ------------------------------------------------------------------
def store_option(f: F) -> F:
    return click.option(
        "--store",
        "store_path",
        envvar="UNIONIMG_STORE",
        default=DEFAULT_STORE,
        show_default=True,
        help="Store directory (also UNIONIMG_STORE).",
    )(f)


def debug_option(f: F) -> F:
    return click.option("--debug", is_flag=True, help="Log every program run; show tracebacks.")(f)


def start(ctx: click.Context, store_path: str, debug: bool) -> None:
    """What the top-level options do: ``--debug`` logs every program run (and lets
    :class:`UnionimgGroup` show tracebacks); the store is opened when a command first needs it."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="unionimg: %(message)s"
    )
    ctx.obj = Ctx(store_path, debug)


# -- output ---------------------------------------------------------------------------------
def json_text(data: object, **kw: Any) -> str:
    """JSON for output: UTF-8 as it is; a byte that was no UTF-8 in a guest's file name
    (a lone surrogate from os.fsdecode) as its ``\\udcXX`` escape, still valid JSON."""
    text = json.dumps(data, indent=2, ensure_ascii=False, **kw)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def emit(data: T, as_json: bool, human: Callable[[T], None]) -> None:
    if as_json:
        click.echo(json_text(data, sort_keys=True))
    else:
        human(data)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def print_log(csets: Sequence[Changeset], as_json: bool) -> None:
    """A Mercurial history (``base log``, ``log``): one line per changeset, or JSON."""

    def human(rows: Sequence[Changeset]) -> None:
        for cs in rows:
            click.echo(f"{cs.rev}:{cs.node[:12]}  {cs.date}  {shown(cs.desc)}")

    if as_json:
        click.echo(json_text([cs.to_json() for cs in csets]))
    else:
        human(csets)


def exit_with(code: int) -> NoReturn:
    """End the command with ``code`` (a named constant of :mod:`unionimg.errors`) after
    what it printed; for outcomes that are no error line of their own."""
    click.get_current_context().exit(code)


# -- parameter types --------------------------------------------------------------------------
def size_type(value: str | None, of: str = "") -> int | None:
    return None if value is None else parse_size(value, "--size", of)


class AsciiInt(click.ParamType[int]):
    """A whole number in ASCII digits (click's INT takes ``int()``'s Unicode digits and
    ``1_000``); refused as one ``unionimg: error:`` line, exit 2. Bounds: the commands."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        what = param.opts[0] if param is not None and param.opts else "number"
        return parse_int(str(value), what)


ASCII_INT = AsciiInt()


class Seconds(click.ParamType[float]):
    """Seconds in ASCII digits, optional fraction, at most 31 days (click's FLOAT takes
    ``nan``, ``inf``, negatives and Unicode digits)."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float | int):
            return float(value)
        what = param.opts[0] if param is not None and param.opts else "seconds"
        return parse_seconds(str(value), what)


SECONDS = Seconds()


def hv_option(f: F) -> F:
    return click.option(
        "--hypervisor",
        default=None,
        help=f"One of {', '.join(HYPERVISORS)} (default: the instance's).",
    )(f)


# -- errors -----------------------------------------------------------------------------------
class UnionimgGroup(click.Group):
    """Turns UnionimgError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnionimgError as exc:
            obj = ctx.find_object(Ctx)
            if obj is not None and obj.debug:
                raise
            # one line whatever the message quotes (guest file names): controls escaped
            click.echo(f"unionimg: error: {shown(exc.message, backslash=False)}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("unionimg: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # the reader went away (`unionimg instance list | head`): stop quietly, like cat
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_PIPE_CLOSED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            obj = ctx.find_object(Ctx)
            if obj is not None and obj.debug:
                raise
            full = full_disk(exc, obj) if isinstance(exc, OSError) else None
            if full is not None:
                click.echo(f"unionimg: error: {shown(full.message, backslash=False)}", err=True)
                ctx.exit(full.exit_code)
            # any other OSError is no less a bug than the rest: one line, never a traceback
            click.echo(
                f"unionimg: internal error: {type(exc).__name__}: "
                f"{shown(str(exc), backslash=False)} "
                "(rerun with --debug for the traceback)",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


def full_disk(exc: OSError, obj: Ctx | None) -> UnionimgError | None:
    """A write that failed for lack of space, anywhere a check did not foresee it: said as
    "store full" (exit 7), never as an internal error."""
    where = exc.filename or (obj.store_path if obj is not None else ".")
    store_root = Path(obj.store_path) if obj is not None else None
    return write_failure(exc, str(where), "writing " + str(where), store_path=store_root)
