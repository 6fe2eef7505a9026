"""The seed's example rebuilt (seed 003: four 270 GB servers Si, Sj, Sk, Sl; VMs A-J; a 40 GB
master per tree, 5 GB differences, 40 GB VM images; layers registered a0, b0, a1, a2, b1, b2 ...).

The seed's figures 3 and 4 (which VM runs where, the trees' shapes) are not in its text. This is
one rebuild consistent with every figure the text gives (assumptions: docs/placement.md):
A-C on Si, D-F on Sj, G-I on Sk, J on Sl; tree a (a0-a14) for A-F, tree b (b0-b9) for G-J;
CPU so that Si can take one more VM, Sj two, Sk none and Sl ("resources plenty") seven; a
restored VM needs its 40 GB image on the target and the differences sent to build it are not
kept (``transfer_kept = false``). With it the seed's method (greedy.seed) gives 0 GB for Si's
failure and 40 GB for Sk's (b0 split in b0/0 on Si and b0/1 on Sj, G recovering on Si and H, I
on Sj), the conventional placement 15 GB and 65 GB (b0 and five differences), as in table 1.
"""

from __future__ import annotations

SEED_EXAMPLE = """\
# The seed's example (unionimg/placement/example.py says how it was rebuilt)
server = [
  { name = "Si", disk = "270G", cpu = 16, memory = "256G" },
  { name = "Sj", disk = "270G", cpu = 20, memory = "256G" },
  { name = "Sk", disk = "270G", cpu = 12, memory = "256G" },
  { name = "Sl", disk = "270G", cpu = 32, memory = "256G" },
]

vm = [
  { name = "A", server = "Si", layer = "a3",  image = "40G", cpu = 4, memory = "8G" },
  { name = "B", server = "Si", layer = "a14", image = "40G", cpu = 4, memory = "8G" },
  { name = "C", server = "Si", layer = "a13", image = "40G", cpu = 4, memory = "8G" },
  { name = "D", server = "Sj", layer = "a12", image = "40G", cpu = 4, memory = "8G" },
  { name = "E", server = "Sj", layer = "a9",  image = "40G", cpu = 4, memory = "8G" },
  { name = "F", server = "Sj", layer = "a2",  image = "40G", cpu = 4, memory = "8G" },
  { name = "G", server = "Sk", layer = "b1",  image = "40G", cpu = 4, memory = "8G" },
  { name = "H", server = "Sk", layer = "b9",  image = "40G", cpu = 4, memory = "8G" },
  { name = "I", server = "Sk", layer = "b7",  image = "40G", cpu = 4, memory = "8G" },
  { name = "J", server = "Sl", layer = "b6",  image = "40G", cpu = 4, memory = "8G" },
]

# registration order: a0, b0, a1, a2, b1, b2, a3, a4, b3, b4, ...
layer = [
  { name = "a0", size = "40G" },
  { name = "b0", size = "40G" },
  { name = "a1", size = "5G", parent = "a0" },
  { name = "a2", size = "5G", parent = "a1" },
  { name = "b1", size = "5G", parent = "b0" },
  { name = "b2", size = "5G", parent = "b0" },
  { name = "a3", size = "5G", parent = "a1" },
  { name = "a4", size = "5G", parent = "a0" },
  { name = "b3", size = "5G", parent = "b2" },
  { name = "b4", size = "5G", parent = "b0" },
  { name = "a5", size = "5G", parent = "a1" },
  { name = "a6", size = "5G", parent = "a5" },
  { name = "b5", size = "5G", parent = "b4" },
  { name = "b6", size = "5G", parent = "b3" },
  { name = "a7", size = "5G", parent = "a6" },
  { name = "a8", size = "5G", parent = "a4" },
  { name = "b7", size = "5G", parent = "b4" },
  { name = "b8", size = "5G", parent = "b5" },
  { name = "a9", size = "5G", parent = "a7" },
  { name = "a10", size = "5G", parent = "a8" },
  { name = "b9", size = "5G", parent = "b8" },
  { name = "a11", size = "5G", parent = "a10" },
  { name = "a12", size = "5G", parent = "a8" },
  { name = "a13", size = "5G", parent = "a11" },
  { name = "a14", size = "5G", parent = "a10" },
]

[placement]
split_parts = 2          # a layer of at least split_min may be stored in two halves
split_min = "20G"
transfer_kept = false    # the seed restores a 40G image; sent differences are not kept
"""
