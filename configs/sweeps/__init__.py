"""Sweep definitions: `hyper` (the small sweep library) and files with `get_sweep(arg)`.

  python -m luna_jax.experiments.sweep run configs/sweeps/quick.py --root runs/quick
  python -m luna_jax.experiments.sweep run configs/sweeps/lra_luna.py:data=/data --root gs://b/lra --dry-run
"""
