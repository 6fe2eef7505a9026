"""``python -m unionimg.cli``: the same as the ``unionimg`` command."""

from unionimg.cli import main

main()
