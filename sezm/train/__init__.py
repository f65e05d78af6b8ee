"""Training: setup, the step loop, losses, optimisers, validation and checkpoints."""
