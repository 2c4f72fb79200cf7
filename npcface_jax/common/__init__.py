"""Foundations every other folder may use: the XLA flags set before JAX
starts, what a run prints, users' text and JSON files, orbax checkpoints,
the device mesh. Nothing here imports another folder."""
