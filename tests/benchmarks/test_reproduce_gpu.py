"""benchmarks/reproduce_gpu.py (run_gpu.sh reproduce / speed): the CPU dry run end to end, so
the command prepared for a lent GPU cannot rot."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from benchmarks import reproduce_gpu as rg
from configs import common
from luna_jax.experiments import sweep
from tests import conftest
from tests.conftest import REPO


def _run(*args: str, cache) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": conftest.xla_flags(None), "JAX_PLATFORMS": "cpu",
         "LUNA_JAX_CACHE": str(cache)}
  r = subprocess.run([sys.executable, "-m", "benchmarks.reproduce_gpu", *args], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def _section(markdown: str, title_start: str) -> str:
  """The text of the `## ` section whose title starts with `title_start`."""
  parts = re.split(r"^## ", markdown, flags=re.M)
  return next(p for p in parts if p.startswith(title_start))


def test_full_runs_keep_their_protocols_through_train_py_flags():
  """The GPU runs' --config flags (bfloat16, data_dir) leave the protocol as train.py marks it."""
  for run in rg.reproduce_runs(dry_run=False):
    file, _, arg = run.config.partition(":")
    c = sweep.load_module(file).get_config(arg)
    keys = ["data_dir"] + [f.split("=")[0][len("--config."):] for f in run.flags]
    common.mark_overrides(c, keys)
    assert c.protocol == ("small" if run.wave == "small" else "luna_paper"), run
  names = [g.name for g in rg.speed_groups()]
  assert len(set(names)) == len(names) and names[0] == "model_fast_4096"


def test_reproduce_dry_run_end_to_end_and_resume(tmp_path):
  out = tmp_path / "out"
  _run("reproduce", "--out", str(out), "--dry-run", cache=tmp_path / "cache")
  setup = json.loads((out / "setup.json").read_text())
  assert setup["backend"] == "cpu" and setup["versions"]["jax"]
  assert (out / "data" / "listops" / "GENERATED.json").exists()
  record = json.loads((out / "reproduce.json").read_text())
  names = [r.name for r in rg.reproduce_runs(dry_run=True)]
  assert list(record["runs"]) == names
  for name in names:
    assert record["runs"][name]["outcome"] == "finished", record["runs"][name]
    results = json.loads((out / "runs" / "listops" / name / "results.json").read_text())
    assert results["finished"] and results["protocol"] == "custom"   # tiny: not the recipe
  table = (out / "summary" / "results.md").read_text()
  assert (out / "SUMMARY.md").read_text().count("| finished |") == len(names)
  # Every tiny run in the custom table, and no published row beside them.
  custom = "".join(p for p in re.split(r"^## ", table, flags=re.M) if p.startswith("custom"))
  for mech in ("softmax", "performer", "luna-16", "learned_kernel", "luna-256"):
    assert f"\n| {mech} | " in custom
  assert "published:" not in table
  # A rerun skips what finished.
  _run("reproduce", "--out", str(out), "--dry-run", cache=tmp_path / "cache")
  record = json.loads((out / "reproduce.json").read_text())
  assert {r["outcome"] for r in record["runs"].values()} == {"finished earlier"}


def test_speed_dry_run_writes_the_group_and_the_merged_table(tmp_path):
  out = tmp_path / "out"
  _run("speed", "--out", str(out), "--dry-run", "--only", "model_quadratic_2048",
       cache=tmp_path / "cache")
  report = json.loads((out / "speed" / "model_quadratic_2048.json").read_text())
  assert sorted(r["status"] for r in report["results"]) == ["ok"] * 4
  summary = (out / "speed" / "SUMMARY.md").read_text()
  assert "| model_quadratic_2048 | ok |" in summary and "luna:256" in summary
