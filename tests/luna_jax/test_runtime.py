"""The allocator setup: tcmalloc is preloaded by re-executing, unless told not to."""
import os
import subprocess
import sys
from importlib import metadata

import pytest

from luna_jax import runtime

CHILD = ("from luna_jax import runtime; runtime.preload_tcmalloc(); "
         "import os; print(runtime.allocator(), os.environ.get('LD_PRELOAD', ''))")


def run_child(**env):
  out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       env={**os.environ, **env}, check=True, timeout=120)
  return out.stdout.split()


@pytest.mark.skipif(runtime.tcmalloc_path() is None, reason="tcmalloc is not installed")
def test_preloads_tcmalloc_once():
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", runtime.ENV)}
  out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                       check=True, timeout=120).stdout.split()
  assert out[0] == "tcmalloc" and runtime.tcmalloc_path() in out[1]


def test_system_malloc_when_asked():
  assert run_child(LUNA_JAX_MALLOC="system", LD_PRELOAD="")[0] == "system"


def test_allocator_reads_ld_preload(monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc_minimal.so.4")
  assert runtime.allocator() == "tcmalloc"
  monkeypatch.setenv("LD_PRELOAD", "")
  assert runtime.allocator() == "system"


def test_cpu_model_reads_proc_cpuinfo_and_falls_back(monkeypatch):
  import builtins
  import platform
  real_open = builtins.open
  cpuinfo = "processor\t: 0\nmodel name\t: Test CPU 9000 @ 3GHz\nflags\t: x\n"

  def fake_open(path, *a, **kw):
    if path == "/proc/cpuinfo":
      import io
      return io.StringIO(cpuinfo)
    return real_open(path, *a, **kw)

  monkeypatch.setattr(builtins, "open", fake_open)
  assert runtime.cpu_model() == "Test CPU 9000 @ 3GHz"

  def no_proc(path, *a, **kw):
    raise OSError("no /proc here")

  monkeypatch.setattr(builtins, "open", no_proc)
  assert runtime.cpu_model() == (platform.processor() or platform.machine())


DISPATCH_CHILD = ("from luna_jax import runtime; mode = runtime.set_cpu_dispatch(); "
                  "import jax, jax.numpy as jnp; jnp.ones(3).sum().block_until_ready(); "
                  "print(mode, jax.config.values['jax_cpu_enable_async_dispatch'], runtime.cpu_dispatch())")


@pytest.mark.parametrize("env, expected", [({}, ["sync", "False", "sync"]),
                                           ({"LUNA_JAX_CPU_DISPATCH": "async"},
                                            ["async", "True", "async"])])
def test_cpu_dispatch_is_inline_unless_asked(env, expected):
  base = {k: v for k, v in os.environ.items() if k != runtime.DISPATCH_ENV}
  out = subprocess.run([sys.executable, "-c", DISPATCH_CHILD], capture_output=True, text=True,
                       env={**base, **env}, check=True, timeout=120)
  assert out.stdout.split() == expected


def test_cpu_dispatch_rejects_an_unknown_mode(monkeypatch):
  monkeypatch.setenv(runtime.DISPATCH_ENV, "later")
  with pytest.raises(ValueError, match="LUNA_JAX_CPU_DISPATCH='later'"):
    runtime.set_cpu_dispatch()


@pytest.mark.parametrize("wanted, batch, expected_count, choice", [
    ("4", 32, 4, "4 host devices (LUNA_JAX_CPU_DEVICES)"),
    ("3", 32, None, "one device: batch 32 does not divide by 3"),
    ("1", 32, None, "one device (LUNA_JAX_CPU_DEVICES=1)"),
])
def test_use_cpu_cores_sets_the_device_count_and_patient_collectives(monkeypatch, wanted, batch,
                                                                      expected_count, choice):
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  monkeypatch.setenv(runtime.DEVICES_ENV, wanted)
  assert runtime.use_cpu_cores(batch) == choice == runtime.cpu_devices_choice()
  flags = os.environ["XLA_FLAGS"]
  if expected_count is None:
    assert flags == "--xla_backend_optimization_level=0"
  else:
    assert f"--xla_force_host_platform_device_count={expected_count}" in flags
    if metadata.version("jaxlib").startswith("0.10."):
      assert "--xla_cpu_collective_call_terminate_timeout_seconds=86400" in flags


def test_use_cpu_cores_keeps_a_count_set_in_xla_flags_and_refuses_a_bad_value(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.setenv(runtime.DEVICES_ENV, "2")
  assert runtime.use_cpu_cores(32) == "set by XLA_FLAGS"
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(runtime.DEVICES_ENV, "0")
  with pytest.raises(ValueError, match="LUNA_JAX_CPU_DEVICES='0'"):
    runtime.use_cpu_cores(32)
