"""`python -m benchmarks.attention_scaling ...` (the package docstring)."""
from benchmarks.attention_scaling.cli import main
from luna_jax import runtime

if __name__ == "__main__":
  runtime.preload_tcmalloc()   # as train.py does (luna_jax/runtime.py)
  main()
