"""Process-level setup of a CPU host: the memory allocator, inline CPU dispatch, one XLA device
per core; and what the host's CPU is.

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


DEVICES_ENV = "LUNA_JAX_CPU_DEVICES"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_devices_choice = "not chosen (XLA's default: one CPU device)"


def use_cpu_cores(batch_size: int) -> str:
  """Splits each batch over one XLA host device per core (the small-protocol ListOps step ran
  1.22-1.41x faster on 2 cores than on one device; benchmarks/RESULTS.md) when `batch_size`
  divides by the count: LUNA_JAX_CPU_DEVICES=N asks for N devices, =1 keeps one; an XLA_FLAGS
  that already sets the count wins. Call before JAX creates its CPU client (the first
  computation); a GPU or TPU host is not affected (its default devices are the accelerators).
  A resumed run may use another count: dropout masks are counter hashes, so the steps are the
  same. The devices' collectives wait a day for a late peer instead of XLA's 40 s
  (`_collective_timeouts`). Returns the choice, in words (also `cpu_devices_choice()`, recorded in results.json)."""
  global _devices_choice
  flags = os.environ.get("XLA_FLAGS", "")
  wanted = os.environ.get(DEVICES_ENV, "")
  if _DEVICE_FLAG in flags:
    _devices_choice = "set by XLA_FLAGS"
  elif wanted and (not wanted.isdigit() or int(wanted) < 1):
    raise ValueError(f"{DEVICES_ENV}={wanted!r}: expected a device count >= 1")
  else:
    n = int(wanted) if wanted else (os.cpu_count() or 1)
    if n > 1 and batch_size % n == 0:
      os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={n} {_collective_timeouts()}".strip()
      _devices_choice = f"{n} host devices ({DEVICES_ENV if wanted else 'one per core'})"
    else:
      _devices_choice = (f"one device ({DEVICES_ENV}=1)" if n == 1 else
                         f"one device: batch {batch_size} does not divide by {n}")
  return _devices_choice


def _collective_timeouts() -> str:
  """XLA flags that let a host device wait for its peers: XLA:CPU ends the process when a
  device's thread reaches an all-reduce 40 s after another (seen on an overloaded 2-core host at
  step 3,200 of a quick run, "Termination timeout for all reduce ... exceeded"); a day instead.
  Only for jaxlib 0.10, where these flags were checked to exist (an unknown flag aborts XLA)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  if not metadata.version("jaxlib").startswith("0.10."):
    return ""
  return ("--xla_cpu_collective_call_terminate_timeout_seconds=86400 "
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600")


def cpu_devices_choice() -> str:
  """How `use_cpu_cores` chose this process's CPU device count."""
  return _devices_choice


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
