"""Layers of the SeZM descriptor: SO(3)/SO(2) linears, norms, grids, convolution, streaming."""
