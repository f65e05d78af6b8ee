"""The DPA4 models (energy, spin, dens, property) built from the descriptor and fitting heads."""
