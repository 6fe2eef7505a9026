"""Hidden base changes in reconcile's text output (issue 12, item 6), on real images.

The table's scenario (``tests/scenario.py``): the VM removed ``/c16/dir`` (a base directory)
and made it again, so overlayfs marks it opaque over B0's entries; B1 adds a file there. The
opaque directory stays (it hides what the VM deleted) and the text output, not only
``--json``, counts the directories still hiding base changes and names each with its count.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cli, need_root
from tests.scenario import build
from unionimg.fs.mounts import mountinfo, unmount_tree


def test_text_output_counts_hidden_base_changes(cli: Cli, tmp_path: Path, root: None) -> None:
    need_root()
    try:
        build(cli, tmp_path)
        dry = cli("reconcile", "vm1", "--dry-run").output
        out = cli("reconcile", "vm1").output
    finally:
        unmount_tree(tmp_path)
        assert not [m for m in mountinfo() if m.target.startswith(str(tmp_path))]
    for text in (dry, out):
        first = text.splitlines()[0]
        assert ", 1 opaque director(ies) hiding base changes" in first, text
        hidden = [ln for ln in text.splitlines() if ln.startswith("  hidden ")]
        assert hidden == [
            "  hidden /c16/dir: opaque directory hides 1 paths B1 adds or changes: /c16/dir/added"
        ], text
