"""Process-level setup of a CPU host: the memory allocator, inline CPU dispatch; and what the
host's CPU is.

On Linux, glibc's malloc serves XLA's large temporary buffers with mmap and gives them back to
the OS after every step, so the next step page-faults them in again. tcmalloc keeps them: on this
project's 2-core CPU the small-protocol ListOps Luna step went from 1.49 to 0.92 s and one
Luna encoder layer (N=4096, D=256) from about 750 to 610 ms (benchmarks/RESULTS.md).
`preload_tcmalloc()` re-executes the current command with tcmalloc preloaded when it is installed
(Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) and not already loaded; set
LUNA_JAX_MALLOC=system to keep glibc's malloc. Nothing is computed differently: only where
buffers come from.
"""
from __future__ import annotations

import os
import platform
import sys

ENV = "LUNA_JAX_MALLOC"
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def tcmalloc_path() -> str | None:
  """The installed tcmalloc library, or None."""
  return next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)


def allocator() -> str:
  """"tcmalloc" when it is preloaded in this process, else "system"."""
  return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def preload_tcmalloc(argv: list[str] | None = None) -> None:
  """Re-executes `argv` (default: this command) with tcmalloc preloaded, if Linux, installed,
  not yet loaded, and LUNA_JAX_MALLOC is not "system". Returns only when it does nothing."""
  if (not sys.platform.startswith("linux") or os.environ.get(ENV, "") == "system"
      or allocator() == "tcmalloc"):
    return
  lib = tcmalloc_path()
  if lib is None:
    return
  env = dict(os.environ)
  env["LD_PRELOAD"] = os.pathsep.join(filter(None, [lib, env.get("LD_PRELOAD")]))
  env[ENV] = "tcmalloc"
  os.execve(sys.executable, argv or sys.orig_argv, env)   # orig_argv: python -c/-m too


DISPATCH_ENV = "LUNA_JAX_CPU_DISPATCH"


def set_cpu_dispatch() -> str:
  """Runs CPU computations inline ("sync"): JAX's asynchronous CPU dispatch off, unless
  LUNA_JAX_CPU_DISPATCH=async. Call before JAX's first computation (the CPU client reads it
  once); GPU and TPU computations are not affected. Returns the mode.

  With asynchronous dispatch XLA:CPU releases a step's temporary buffers only after the step's
  outputs are ready, so the next step's buffers can be taken first and a loop of steps holds two
  steps' temporaries: one Luna encoder layer step at N=16384, l=256 peaked at 3.2 GB of RSS
  instead of 2.0 GB (benchmarks/RESULTS.md)."""
  mode = os.environ.get(DISPATCH_ENV, "sync")
  if mode not in ("sync", "async"):
    raise ValueError(f"{DISPATCH_ENV}={mode!r}: expected 'sync' or 'async'")
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", mode == "async")
  return mode


def cpu_dispatch() -> str:
  """"sync" or "async": how this process's JAX dispatches CPU computations."""
  import jax
  return "async" if jax.config.values["jax_cpu_enable_async_dispatch"] else "sync"


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
