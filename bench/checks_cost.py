"""What the consistency checks before the swap cost per VM (issue 12, item 1), on the Debian
fixture (root; ``vm_fixtures`` builds or reuses it).

B1 is the fixture's tree itself (read-only: nothing writes it); three staged upper layers as
``upper.new`` would be after a plan, each checked ``--repeat`` times with
:func:`unionimg.reconcile.checks.check_staged` (what ``reconcile`` calls per VM):

* ``file-only``: edited ``/etc/motd``, ``/etc/ssh/sshd_config``-like files and 200 files of
  the VM's own under ``/srv``: no program runs (a scan of the layer and B1's package table);
* ``users``: a user added to passwd/group/shadow/gshadow with its home: the checks run;
* ``packages``: a package of the VM's own in dpkg's status (list and md5sums): they run.

First, B1's own result (made once per generation, kept in the store) is timed from cold.
Prints one line per case: the median and minimum wall time and the verdict (the
machine's other load shows in the median). Usage::

    .venv/bin/python bench/checks_cost.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # vm_fixtures lives in the checkout, not in the package

from unionimg.layers.base import Generation  # noqa: E402  (after the sys.path line)
from unionimg.reconcile import checks  # noqa: E402
from unionimg.store.layout import Store  # noqa: E402


def write(root: Path, files: dict[str, str]) -> Path:
    for path, text in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    opts = ap.parse_args()
    from vm_fixtures import build

    b1 = build("debian")
    with tempfile.TemporaryDirectory(prefix="checks-cost-") as tmp_name:
        tmp = Path(tmp_name)
        store = Store(tmp / "store")
        store.init()
        store.base_dir("deb").mkdir(parents=True)
        gdir = tmp / "gen"
        gdir.mkdir()
        (gdir / "manifest.sqlite").write_bytes(b"")
        gen = Generation("deb", 1, gdir, "", 0, "bench", None, 0, "")
        etc = {n: (b1 / "etc" / n).read_text() for n in ("passwd", "group", "shadow", "gshadow")}
        status = (b1 / "var/lib/dpkg/status").read_text()
        own = (
            "Package: vm-tool\nStatus: install ok installed\nPriority: optional\n"
            "Section: misc\nMaintainer: bench <b@example.org>\nArchitecture: all\n"
            "Version: 1.0\nDepends: bash\nDescription: the VM's own\n"
        )
        cases = {
            "file-only": {
                "/etc/motd": "hello\n",
                "/etc/hostname": "vm\n",
                **{f"/srv/www/page{i}.html": f"<p>{i}\n" for i in range(200)},
            },
            "users": {
                "/etc/passwd": etc["passwd"] + "bob:x:1001:1001::/home/bob:/bin/bash\n",
                "/etc/group": etc["group"] + "bob:x:1001:\n",
                "/etc/shadow": etc["shadow"] + "bob:!:19000:0:99999:7:::\n",
                "/etc/gshadow": etc["gshadow"] + "bob:!::\n",
                "/home/bob/.profile": "",
            },
            "packages": {
                "/var/lib/dpkg/status": status + "\n" + own,
                "/var/lib/dpkg/info/vm-tool.list": "/.\n/usr\n/usr/bin\n/usr/bin/vm-tool\n",
                "/var/lib/dpkg/info/vm-tool.md5sums": "",
                "/usr/bin/vm-tool": "#!/bin/sh\n",
            },
        }
        start = time.monotonic()
        facts = checks.base_facts(gen, b1)
        checks.baseline(store, gen, b1, facts)
        print(f"B1's own result (once per generation): {time.monotonic() - start:.2f} s")
        for name, files in cases.items():
            upper = write(tmp / name, files)
            times, note = [], ""
            for _ in range(opts.repeat):
                t = time.monotonic()
                v = checks.check_staged(store, gen, b1, upper)
                times.append(time.monotonic() - t)
                note = v.note if v.ok else f"FAILED {v.problems}"
            print(
                f"{name:10} {statistics.median(times) * 1000:7.0f} ms per VM median, "
                f"{min(times) * 1000:.0f} min  ({note})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
