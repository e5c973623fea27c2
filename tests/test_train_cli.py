"""train.py as a user meets it: help, one-line errors, a quiet console, reruns."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from luna_jax import workdir as wd
from tests.conftest import REPO
from tests.luna_jax.test_trainer_scale import _cmd, _env

ABSL_LINE = re.compile(r"^[IWEF]\d{4} ", re.M)     # absl's "I1130 03:04:33.58 ..." format


def train_py(*args: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=env)


def test_help_exits_0_and_lists_the_config_fields():
  r = train_py("--help")
  assert r.returncode == 0, r.stderr
  for text in ("--config=FILE[:ARG]", "--workdir", "--verbosity", "  model.proj_len = ",
               "  allow_resume_changes = False", "  learning_rate = "):
    assert text in r.stdout
  r = train_py("--config=configs/listops.py:quick", "--help")
  assert r.returncode == 0 and "  listops.num_train = 20000" in r.stdout
  assert "  num_train_steps = 800" in r.stdout


def test_a_bad_dispatch_setting_is_one_line_naming_the_variable():
  r = train_py("--config=configs/listops.py:quick", "--workdir=unused",
               env={**os.environ, "LUNA_JAX_CPU_DISPATCH": "fast"})
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.strip() == ("train.py: LUNA_JAX_CPU_DISPATCH='fast': expected 'sync' or "
                              "'async'")


@pytest.mark.parametrize("flag,names", [
    ("--config.model.emb_dmi=3", ["config.model.emb_dim"]),
    ("--config.lerning_rate=0.1", ["config.learning_rate"]),
    ("--config.nonexistent=1", ["'nonexistent'", "closest valid names: config."]),
])
def test_unknown_field_is_one_line_naming_the_closest_fields(tmp_path, flag, names):
  r = train_py("--config=configs/listops.py:quick", f"--workdir={tmp_path}", flag)
  assert r.returncode == 2
  assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.startswith(f"train.py: error: {flag.split('=')[0]}: config has no field")
  for name in names:
    assert name in r.stderr
  assert not os.listdir(tmp_path)


def test_console_is_quiet_reruns_say_finished_and_mismatches_are_one_line(tmp_path):
  cache = os.environ["LUNA_JAX_CACHE"]
  workdir = tmp_path / "run"
  r = subprocess.run(_cmd(workdir, 2, 2), cwd=REPO, env=_env(8, cache), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout + r.stderr
  assert not ABSL_LINE.search(out), out
  assert "Unable to initialize backend" not in out and "CheckpointManager" not in out
  assert len(out.splitlines()) <= 8, out
  last = r.stdout.splitlines()[-1]
  for name in (wd.RESULTS_FILE, wd.METRICS_FILE, f"tensorboard --logdir {workdir / wd.TB_DIR}"):
    assert name in last
  # train.py runs CPU computations inline (luna_jax/runtime.py) and the run folder says so.
  machine = json.loads((workdir / wd.RESULTS_FILE).read_text())["machine"]
  assert machine["cpu_dispatch"] == "sync", machine

  again = subprocess.run(_cmd(workdir, 2, 2), cwd=REPO, env=_env(8, cache),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already finished training at step 2" in again.stdout
  assert "steps/s" not in again.stdout and "ETA" not in again.stdout

  other = subprocess.run(_cmd(workdir, 2, 2, ["--config.model.emb_dim=32"]), cwd=REPO,
                         env=_env(8, cache), capture_output=True, text=True, timeout=600)
  assert other.returncode == 1
  assert other.stderr.count("\n") == 1 and "Traceback" not in other.stderr, other.stderr
  assert "config.model.emb_dim: 16 -> 32" in other.stderr

  loud = subprocess.run(_cmd(workdir, 2, 2, ["--verbosity=0"]), cwd=REPO, env=_env(8, cache),
                        capture_output=True, text=True, timeout=600)
  assert loud.returncode == 0 and ABSL_LINE.search(loud.stderr)   # --verbosity restores it
