"""What the machine is and can do: device and host description, memory budget, matmul peak."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from luna_jax import runtime


def device_peak_bytes() -> int | None:
  """The device's `peak_bytes_in_use` (a process-wide maximum), where the backend reports it."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def host_available_bytes() -> int | None:
  """MemAvailable of the host (Linux), else total physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def memory_limit_bytes(override_gb: float | None) -> int | None:
  """The budget a point's estimated memory must fit: the override, the device's `bytes_limit`,
  or 90% of the host's available memory on CPU."""
  if override_gb is not None:
    return int(override_gb * 2**30)
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  avail = host_available_bytes()
  return int(0.9 * avail) if avail else None


def device_description() -> str:
  """`<kind> [<platform>, <n> device(s), using 1]`; on CPU the kind is the CPU model."""
  d = jax.devices()[0]
  kind = d.device_kind
  if d.platform == "cpu":
    kind = f"{runtime.cpu_model()} ({os.cpu_count()} cores)"
  return f"{kind} [{d.platform}, {jax.device_count()} device(s), using 1]"


def versions() -> dict[str, str]:
  """jax, jaxlib and flax versions."""
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}


def measure_matmul_peak(size: int, dtype: str, repeats: int = 5) -> dict[str, Any]:
  """Best-of-`repeats` FLOP/s of a size^3 matmul in `dtype` on the default device."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a_NxN = jax.random.normal(k1, (size, size), jnp.float32).astype(dtype)
  b_NxN = jax.random.normal(k2, (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.matmul).lower(a_NxN, b_NxN).compile()
  jax.block_until_ready(matmul(a_NxN, b_NxN))
  best = float("inf")
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a_NxN, b_NxN))
    best = min(best, time.perf_counter() - t0)
  return {"size": size, "dtype": dtype, "best_seconds": best, "flops_per_s": 2.0 * size**3 / best}


TORCH_PEAK_SNIPPET = """
import json, sys, time, torch
n = int(sys.argv[1])
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
times = []
for _ in range(5):
  t0 = time.perf_counter()
  a @ b
  times.append(time.perf_counter() - t0)
print(json.dumps({"flops_per_s": 2.0 * n**3 / min(times), "threads": torch.get_num_threads(),
                  "version": torch.__version__}))
"""


def measure_torch_matmul_peak(size: int) -> dict[str, Any] | None:
  """The same size^3 float32 matmul timed by torch (MKL) in a subprocess, or None without torch
  or off CPU: the machine's peak is the better of the two libraries, not XLA's alone."""
  if jax.default_backend() != "cpu":
    return None
  try:
    out = subprocess.run([sys.executable, "-c", TORCH_PEAK_SNIPPET, str(size)],
                         capture_output=True, text=True, timeout=300, check=True)
    return {"size": size, **json.loads(out.stdout.strip().splitlines()[-1])}
  except (subprocess.SubprocessError, ValueError, IndexError, OSError):
    return None
