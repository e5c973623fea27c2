"""Test setup: 8 fake CPU devices (sharding paths run as on a pod), fixtures directory."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not (FIXTURES / "luna_vectors.npz").exists():
    pytest.fail(f"shared fixtures not found at {FIXTURES} (expected ../shared/fixtures beside "
                "the repository)")
  return FIXTURES


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Generated data goes to a per-session temporary cache, never to ~/.cache."""
  cache = tmp_path_factory.getbasetemp() / "luna_jax_cache"
  monkeypatch.setenv("LUNA_JAX_CACHE", str(cache))
