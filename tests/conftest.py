"""Test setup: 8 fake CPU devices (sharding paths run as on a pod), fixtures directory."""
import os

# XLA's backend optimisations off: the tests' tiny programs compile much faster (measured here on
# 2 cores, cold compile cache: test_family_training + test_trainer_scale + test_models 193 s vs
# 317 s). Results agree with default compiles to float tolerance but not bitwise, so every
# process of a bitwise comparison must use the same flags (`xla_flags` for subprocesses).
# jaxlib 0.11's XLA has no xla_cpu_use_fusion_emitters (an unknown flag aborts the process).
from importlib import metadata  # noqa: E402

_JAXLIB = tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                      + (" --xla_cpu_use_fusion_emitters=false" if _JAXLIB < (0, 11) else ""))


def xla_flags(devices: int | None) -> str:
  """XLA_FLAGS of the tests (and their subprocesses): `devices` fake CPU devices, fast compiles."""
  count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
  return count + FAST_COMPILE_FLAGS


# 8 fake devices unless the caller chose XLA_FLAGS; the fast-compile flags always, so that this
# process and the subprocesses the tests start (which set their own device count) compile alike.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = xla_flags(8)
elif FAST_COMPILE_FLAGS not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run (and the subprocesses tests start): many
# tests compile the same tiny train step, and XLA compiles dominate the suite's time. One cache
# per checkout (keyed by its path), so two clones on a machine never share compiled programs.
import hashlib  # noqa: E402
import tempfile  # noqa: E402

_CHECKOUT = hashlib.sha1(os.path.dirname(os.path.dirname(os.path.abspath(__file__))).encode())
_CACHE = os.path.join(tempfile.gettempdir(),
                      f"luna_jax_test_xla_cache_{os.getuid()}_{_CHECKOUT.hexdigest()[:12]}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not (FIXTURES / "luna_vectors.npz").exists():
    pytest.fail(f"fixtures not found at {FIXTURES}: they are part of the repository "
                "(tests/fixtures/README.md)")
  return FIXTURES


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Generated data goes to a per-session temporary cache, never to ~/.cache."""
  cache = tmp_path_factory.getbasetemp() / "luna_jax_cache"
  monkeypatch.setenv("LUNA_JAX_CACHE", str(cache))
