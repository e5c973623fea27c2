"""notebooks/attention_maps: the .ipynb matches its jupytext source and runs headless.

How it runs: the notebook is executed by nbclient in a kernel of *this* interpreter, whose
kernelspec is written into a temporary JUPYTER_PATH (`ipykernel.kernelspec.install(prefix=...)`),
so no pre-registered "python3" kernel is needed. Parameters are injected papermill-style: a cell
after the one tagged "parameters" sets TINY, two training steps per model and temporary WORKDIR
and OUT_DIR. Without nbclient/ipykernel the same cells run as one Python script in a subprocess.
The kernel sees one CPU device (faster compiles than the 8 fake devices of the unit tests).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
SOURCE = NOTEBOOKS / "attention_maps.py"
IPYNB = NOTEBOOKS / "attention_maps.ipynb"
FIGURES = ("listops_luna_pack", "listops_luna_unpack", "listops_effective_vs_softmax",
           "pathfinder_luna_pack_slots", "pathfinder_luna_query_pixel")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 900


def _cells(nb):
  return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells]


def test_ipynb_is_in_sync_with_its_jupytext_source():
  jupytext = pytest.importorskip("jupytext")
  py, ipynb = jupytext.read(SOURCE), jupytext.read(IPYNB)
  assert _cells(py) == _cells(ipynb), (
      "notebooks/attention_maps.ipynb is stale: run "
      "`jupytext --to ipynb notebooks/attention_maps.py`")
  assert "ipynb,py:percent" in SOURCE.read_text().split("# ---", 2)[1]
  params = [c for c in py.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  for name in ("STEPS", "PATHFINDER_STEPS", "TINY", "WORKDIR", "OUT_DIR"):
    assert f"{name} =" in params[0].source


@pytest.mark.parametrize("where", ["repository root", "notebooks"])
def test_paths_are_relative_to_the_repository_root(where, tmp_path):
  """The parameters and setup cells alone, run from the root and from notebooks/: the kernel
  moves to the root, where WORKDIR and OUT_DIR are, and nothing is written."""
  jupytext = pytest.importorskip("jupytext")
  pytest.importorskip("IPython")
  code = [c.source for c in jupytext.read(SOURCE).cells if c.cell_type == "code"][:2]
  assert "def repository_root" in code[1]
  script = tmp_path / "setup_cells.py"
  script.write_text("\n\n".join(code + [
      "print(ROOT, os.getcwd(), os.path.abspath(WORKDIR), os.path.abspath(OUT_DIR), sep='\\n')"]))
  root = NOTEBOOKS.parent
  cwd = root if where == "repository root" else NOTEBOOKS
  before = sorted(p.name for p in NOTEBOOKS.iterdir())
  proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=_kernel_env(),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == [str(root), str(root), str(root / "runs" / "attention_maps"),
                                 str(root / "notebooks" / "figures")]
  assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before


def _inject_parameters(nb, **values):
  """Adds a cell that overrides the parameters right after the "parameters" cell."""
  import nbformat   # pylint: disable=g-import-not-at-top
  index = next(i for i, c in enumerate(nb.cells)
               if "parameters" in c.metadata.get("tags", []))
  source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, cell)
  return nb


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)   # keeps LUNA_JAX_CACHE (a per-session temporary cache, conftest)
  env["JAX_PLATFORMS"] = "cpu"
  env["MPLBACKEND"] = "Agg"
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join([str(NOTEBOOKS.parent), env.get("PYTHONPATH", "")])
  return env


def _run_with_nbclient(nb, tmp_path, monkeypatch) -> None:
  import nbclient   # pylint: disable=g-import-not-at-top
  from ipykernel import kernelspec   # pylint: disable=g-import-not-at-top
  prefix = tmp_path / "jupyter"
  kernelspec.install(kernel_name="luna-jax-test", prefix=str(prefix))
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="luna-jax-test",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute(env=_kernel_env())


def _run_as_script(nb, tmp_path) -> None:
  script = tmp_path / "attention_maps_script.py"
  script.write_text("\n\n".join(c.source for c in nb.cells if c.cell_type == "code"))
  proc = subprocess.run([sys.executable, str(script)], cwd=NOTEBOOKS, env=_kernel_env(),
                        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_notebook_runs_headless_and_saves_figures(tmp_path, monkeypatch):
  jupytext = pytest.importorskip("jupytext")
  Image = pytest.importorskip("PIL.Image")   # pylint: disable=invalid-name
  out_dir = tmp_path / "figures"
  nb = _inject_parameters(jupytext.read(IPYNB), TINY=True, STEPS=2, PATHFINDER_STEPS=2,
                          WORKDIR=str(tmp_path / "runs"), OUT_DIR=str(out_dir))
  try:
    import ipykernel, nbclient   # noqa: F401  pylint: disable=g-import-not-at-top,multiple-imports
  except ImportError:
    _run_as_script(nb, tmp_path)
  else:
    _run_with_nbclient(nb, tmp_path, monkeypatch)
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert len(shown) >= len(FIGURES)

  for name in FIGURES:
    path = out_dir / f"{name}.png"
    assert path.is_file(), f"notebook did not save {path.name}"
    assert path.stat().st_size > 1000
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      assert im.format == "PNG" and min(im.size) >= 100
      assert len(np.unique(np.asarray(im.convert("L")))) > 10   # not a blank canvas
  assert (tmp_path / "runs" / "listops_luna" / "results.json").is_file()
