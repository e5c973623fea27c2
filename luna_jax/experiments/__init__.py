"""Experiments built on the trainer: the conversion study (and, with the sweep launcher and the
results table, everything that runs or aggregates many runs)."""
