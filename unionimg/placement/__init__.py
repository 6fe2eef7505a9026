"""Spare-image placement (issue 15): where each layer of the VMs' chains is kept so that a
failed server's VMs recover on others with no (or the least) transfer; an exact solver for
small clusters, a heuristic for large ones, both explaining their choices."""
