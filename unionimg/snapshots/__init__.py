"""Repeated, load-adaptive, differential VM snapshots (issue 16): memory and disk state of a
running guest kept as content-addressed chunks, copied off the host, restored elsewhere.
Not to be confused with ``instance snapshot`` (:mod:`unionimg.layers.snapshot`), which
freezes a VM's upper layer into an image-tree layer."""
