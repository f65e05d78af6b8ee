"""Geometry of atoms and edges: neighbour lists, cells, edge frames, Wigner-D blocks, the (l, m) layout."""
