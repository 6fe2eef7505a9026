"""``unionimg registry serve|stop``, ``push LAYER|SYSTEM``, ``pull REF``: the image repository,
an OCI registry (``unionimg.registry``).

``push NAME`` takes a layer reference or a system node's name (:func:`what_to_push` decides
which; a name that is both is refused, ``--layer``/``--system`` say which); a system node is
pushed as ``system push`` does (:func:`unionimg.systems.push`, the same output; command
groups do not import each other)."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from unionimg import systems
from unionimg.cli._common import Ctx, json_option, json_text, pass_ctx
from unionimg.errors import NotFound, ToolFailed, UsageError
from unionimg.layers import layerstore
from unionimg.registry import hostcache
from unionimg.registry import server as server_mod
from unionimg.registry.client import Registry
from unionimg.registry.manifests import LAYER_REPO, SYSTEM_REPO, check_repo
from unionimg.registry.transfer import PushReport
from unionimg.store.layout import Store

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def registry() -> None:
    """An OCI registry for layers and systems (Debian's docker-registry, unionimg's config)."""


@registry.command("serve")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the registry's storage, config, log and pid file.",
)
@click.option(
    "--listen",
    default="127.0.0.1:5000",
    show_default=True,
    help="HOST:PORT the registry listens on (only there).",
)
@click.option(
    "--background", is_flag=True, help="Return once it listens; its pid is in DIR/registry.pid."
)
def registry_serve(directory: Path, listen: str, background: bool) -> None:
    """Run a registry storing in DIR and listening on ADDR (foreground until Ctrl-C or
    SIGTERM, which stop it: exit 0).

    Writes DIR/config.yml: filesystem storage in DIR/data, deletes enabled (for
    'docker-registry garbage-collect'), no TLS and no auth: for a trusted network only
    (docs/oci.md says what a production registry adds). Its log is DIR/registry.log."""
    srv = server_mod.start(directory, listen)
    click.echo(f"registry {srv.url} serving {srv.directory} (pid {srv.pid}, log {srv.log})")
    if background:
        return

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # stop the registry below, as Ctrl-C does

    signal.signal(signal.SIGTERM, terminated)
    try:
        code = srv.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how a foreground server is stopped
        srv.stop()
        click.echo(f"registry {srv.url} stopped")
        return
    finally:
        srv.stop()
    raise ToolFailed(
        f"docker-registry exited by itself (status {code}) while serving {srv.url}; see {srv.log}"
    )


@registry.command("stop")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The registry's directory (as given to 'registry serve --background').",
)
def registry_stop(directory: Path) -> None:
    """Stop the registry 'registry serve --background' started on DIR."""
    srv = server_mod.attach(directory)
    if srv is None:
        raise NotFound(f"no registry runs on {directory} (no live pid in its registry.pid)")
    srv.stop()
    click.echo(f"stopped registry pid {srv.pid}")


def registry_option(f: F) -> F:
    return click.option(
        "--registry",
        "url",
        required=True,
        envvar="UNIONIMG_REGISTRY",
        help="The registry's URL, http(s)://HOST[:PORT] (also UNIONIMG_REGISTRY).",
    )(f)


def repo_option(f: F) -> F:
    return click.option(
        "--repo",
        default=LAYER_REPO,
        show_default=True,
        help="Repository of the image-tree nodes in the registry.",
    )(f)


_LAYER_LIKE = re.compile(r"(sha256:)?[0-9a-fA-F]{4,64}|L[0-9a-fA-F]{15}")
"""What ``layerstore.get`` reads as a layer reference (a digest, 4+ hex digits, a label)."""


def what_to_push(store: Store, name: str, *, layer: bool, system: bool) -> str:
    """``"layer"`` or ``"system"``: what NAME of ``push`` names in ``store``. ``layer`` /
    ``system`` (the options) force one; else a name that is both a layer reference that
    resolves (or matches several layers) and a system node is refused (UsageError), and
    one that is neither is NotFound, naming both kinds looked for."""
    if layer and system:
        raise UsageError("give --layer or --system, not both")
    if layer:
        return "layer"
    if system:
        return "system"
    found: layerstore.Layer | None = None
    failed: NotFound | UsageError | None = None
    try:
        found = layerstore.get(store, name)
    except (NotFound, UsageError) as exc:
        failed = exc
    try:
        is_system = systems.exists(store, name)
    except UsageError:  # not a valid node name (a digest has ':')
        is_system = False
    # a reference that matches several layers is ambiguous as a layer, but still one
    several = isinstance(failed, UsageError) and _LAYER_LIKE.fullmatch(name.strip()) is not None
    if is_system and (found is not None or several):
        what = f"layer {found.short}" if found is not None else "several layers"
        raise UsageError(
            f"'{name}' names both system node {name} and {what}; say which with "
            f"'push --system {name}' or 'push --layer {name}'"
        )
    if is_system:
        return "system"
    if found is not None:
        return "layer"
    if several and failed is not None:
        raise failed  # "X names N layers (...); give more of its digits"
    raise NotFound(
        f"nothing named '{name}' to push: no layer (digest, 4+ hex digits or label) and no "
        "system node by that name; see 'unionimg layer list' and 'unionimg system tree'"
    )


@click.command("push")
@click.argument("name")
@registry_option
@click.option(
    "--repo",
    default=None,
    help=f"Repository of the pushed node in the registry [default: {LAYER_REPO} for a "
    f"layer, {SYSTEM_REPO} for a system node, whose VMs' image-tree nodes always go to "
    f"{LAYER_REPO}].",
)
@click.option("--layer", "as_layer", is_flag=True, help="NAME is a layer (not a system node).")
@click.option("--system", "as_system", is_flag=True, help="NAME is a system node (not a layer).")
@json_option
@pass_ctx
def push_cmd(
    c: Ctx, name: str, url: str, repo: str | None, as_layer: bool, as_system: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Push layer or system node NAME to a registry: a layer with its chain of parents, a
    system node with its ancestors and every layer its VMs need; blobs the registry holds
    are not sent again.

    NAME: a layer (a digest, 4+ hex digits or its label) or a system node's name; a name
    that is both is refused: say which with --layer or --system. Each layer of a chain
    becomes an image-tree node (an OCI manifest tagged layer-<diff_id hex>); a system node
    becomes a manifest tagged with its name, as 'system push' makes it (docs/oci.md).
    Blobs the repository holds are not sent, blobs another repository of the registry
    holds are mounted, the rest uploaded."""
    kind = what_to_push(c.store, name, layer=as_layer, system=as_system)
    if kind == "system":
        _push_system(c, name, url, check_repo(repo or SYSTEM_REPO), as_json)
        return
    check_repo(repo or LAYER_REPO)
    with Registry(url) as reg:
        report = hostcache.push_layers(c.store, reg, name, repo=repo or LAYER_REPO)

    def human(r: PushReport) -> None:
        sent = sum(1 for v in r.blobs.values() if v == "uploaded")
        mounted = sum(1 for v in r.blobs.values() if v == "mounted")
        click.echo(
            f"pushed {len(r.nodes)} node(s) to {r.registry}/{r.repo}: {sent} blob(s) uploaded, "
            f"{mounted} mounted, {len(r.blobs) - sent - mounted} already there; "
            f"{r.bytes_sent} bytes sent in {r.seconds:.2f} s"
        )
        click.echo(f"top node {r.repo}@{r.top} tag {r.nodes[-1]['tag']}")

    if as_json:
        click.echo(json_text({"kind": "layer", **report.to_json()}))
    else:
        human(report)


def _push_system(c: Ctx, name: str, url: str, repo: str, as_json: bool) -> None:
    """What ``system push`` does, with ``"kind": "system"`` in its JSON."""
    with Registry(url) as reg:
        out = systems.push(c.store, reg, name, repo=repo)
    if as_json:
        click.echo(json_text({"kind": "system", **out.to_json()}, sort_keys=True))
        return
    click.echo(
        f"pushed system {name} to {out.registry}/{out.repo}:{name} as {out.manifest} "
        f"({out.bytes_sent} bytes sent, {round(out.seconds, 3)} s)"
    )


@click.command("pull")
@click.argument("ref")
@registry_option
@repo_option
@json_option
@pass_ctx
def pull_cmd(c: Ctx, ref: str, url: str, repo: str, as_json: bool) -> None:
    """Pull image-tree node REF and its chain into this store's layer cache, fetching only
    the layers it lacks (each blob's sha256 checked on arrival; a broken pull resumes).

    REF: a tag (layer-<hex>), a node's manifest digest, or a layer's diff_id
    (sha256:<hex>, or the 64 hex digits alone)."""
    check_repo(repo)
    with Registry(url) as reg, _progress(not as_json and sys.stderr.isatty()) as (plan, step):
        report = hostcache.pull_node(c.store, reg, ref, repo=repo, on_plan=plan, on_bytes=step)
    if as_json:
        click.echo(json_text(report.to_json()))
        return
    click.echo(
        f"pulled {repo}@{report.manifest}: {len(report.layers)} layer(s), "
        f"{report.cache_hits} already here, {len(report.imported)} imported; "
        f"{report.bytes_pulled} bytes in {report.seconds:.2f} s"
    )


@contextlib.contextmanager
def _progress(
    shown: bool,
) -> Iterator[tuple[Callable[[int], None] | None, Callable[[int], None] | None]]:
    """A transfer bar on stderr (a terminal only): (on_plan, on_bytes) for pull_node."""
    if not shown:
        yield None, None
        return
    # deferred on purpose: rich.progress takes ~60 ms to import and only a terminal needs it
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(
        TextColumn("pull"), BarColumn(), DownloadColumn(), console=Console(stderr=True),
        transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("pull", total=None)
        yield (
            lambda total: bar.update(task, total=total),
            lambda n: bar.advance(task, n),
        )
