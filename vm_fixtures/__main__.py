"""``python -m vm_fixtures build tiny|debian [--cache DIR] [--force]``: prints the rootfs path.

``python -m vm_fixtures prune [--cache DIR]`` removes cache entries of outdated recipes.
Progress goes to stderr; errors are one line and the exit code of the unionimg error class.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from unionimg.errors import UnionimgError

from . import FIXTURES, build, default_cache_dir, entry_name
from .cache import prune


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vm_fixtures", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build", help="build (or find in the cache) a fixture; print its rootfs path"
    )
    b.add_argument("name", choices=FIXTURES)
    b.add_argument("--cache", type=Path, default=None, help="cache directory")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    p = sub.add_parser("prune", help="remove cache entries whose recipe is not current")
    p.add_argument("--cache", type=Path, default=None, help="cache directory")
    args = parser.parse_args(argv)
    cache_dir: Path = args.cache if args.cache is not None else default_cache_dir()
    try:
        if args.command == "build":
            print(build(args.name, cache_dir=cache_dir, force=args.force))
        else:
            keep: set[str] = set()
            for name in FIXTURES:
                try:
                    keep.add(entry_name(name))
                except UnionimgError as exc:  # cannot tell which entry is current: keep all
                    print(
                        f"vm_fixtures: keeping every {name} entry: {exc.message}", file=sys.stderr
                    )
                    keep.update(p.name for p in cache_dir.glob(f"{name}-*"))
            for path in prune(cache_dir, keep):
                print(f"removed {path}", file=sys.stderr)
    except UnionimgError as exc:
        print(f"vm_fixtures: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vm_fixtures: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
