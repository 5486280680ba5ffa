"""Engines: the training loop, the evaluation grid, the figure sweeps, and the files they own
(checkpoints, run directories), with the builders of their objects from a validated config."""
