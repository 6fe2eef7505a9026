"""``unionimg registry serve|stop``: an OCI registry for the image repository."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from unionimg.errors import NotFound
from unionimg.registry import server as server_mod


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
    """Run a registry storing in DIR and listening on ADDR (foreground until Ctrl-C).

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
        srv.wait()
    finally:
        srv.stop()


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

