"""train.py as a user meets it: help, one-line errors, a quiet console, reruns."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

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


def _one_line_error(r: subprocess.CompletedProcess, expected: str) -> str:
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.startswith(f"train.py: error: {expected}"), r.stderr
  return r.stderr.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-step run of the _cmd config (train.py), to damage in copies."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  r = subprocess.run(_cmd(workdir, 2, 2), cwd=REPO, env=_env(8, workdir.parent / "cache"),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _run(workdir, *extra, steps=2, cache=None):
  return subprocess.run(_cmd(workdir, steps, 2, list(extra)), cwd=REPO,
                        env=_env(8, cache or os.environ["LUNA_JAX_CACHE"]), capture_output=True,
                        text=True, timeout=600)


def test_unusable_workdirs_are_one_line(tmp_path):
  file = tmp_path / "a_file"
  file.write_text("x")
  _one_line_error(_run(file), f"WorkdirError: the workdir {file} is a file, not a folder")
  _one_line_error(_run(file / "run"), f"WorkdirError: the workdir {file / 'run'} lies under "
                                      f"{file}, which is a file, not a folder")
  if os.geteuid() == 0:
    read_only = "/sys/kernel"            # not writable even by root
  else:
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
  _one_line_error(_run(read_only), f"WorkdirError: cannot write in the workdir {read_only}: "
                                   f"Permission denied (creating {read_only}/{wd.LOCK_FILE})")


def test_cosine_schedule_shorter_than_its_warmup_is_one_line(tmp_path):
  r = _run(tmp_path / "run", "--config.schedule=cosine", "--config.warmup_steps=5", steps=5)
  _one_line_error(r, "ConfigError: config.num_train_steps=5 must be more than "
                     "config.warmup_steps=5 (at least 1) for config.schedule='cosine'")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("file,damage,expected", [
    (wd.CONFIG_FILE, lambda text: text[: len(text) // 2], ": not valid JSON"),
    (wd.METRICS_FILE, lambda text: text.replace("\n", "\ngarbage\n", 1), ":2: not a JSON object"),
])
def test_a_damaged_run_file_is_one_line(finished, tmp_path, file, damage, expected):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / file).write_text(damage((workdir / file).read_text()))
  line = _one_line_error(_run(workdir, cache=finished.parent / "cache"),
                         f"DamagedFileError: {workdir / file}")
  assert expected in line and "repair or delete" in line


def test_init_from_an_incompatible_or_damaged_source_is_one_line(finished, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  r = _run(tmp_path / "wide", f"--config.init_from={finished}", "--config.model.emb_dim=32")
  line = _one_line_error(r, "IncompatibleSourceError: ")
  assert "model.emb_dim: source 16, target 32" in line
  source = tmp_path / "source"
  shutil.copytree(finished, source)
  best = source / wd.BEST_DIR
  step_dir = best / os.listdir(best)[0]
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name == "_METADATA":
        open(os.path.join(root, name), "w").write("{")
  line = _one_line_error(_run(tmp_path / "conv", f"--config.init_from={source}"),
                         f"ConfigError: config.init_from='{source}': the checkpoint {step_dir} "
                         "is unreadable")
  assert sorted(os.listdir(tmp_path / "conv")) == [wd.BEST_DIR, wd.CHECKPOINTS_DIR]   # empty
  assert not wd.has_checkpoints(str(tmp_path / "conv"))


DISK_FULL = """
import errno, os, runpy, sys
sys.path.insert(0, os.getcwd())
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
original = handler.JsonCheckpointHandler._save_fn
async def disk_full(self, item, directory):
  if f"{os.sep}4.orbax-checkpoint-tmp" in str(directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))
  return await original(self, item, directory)
handler.JsonCheckpointHandler._save_fn = disk_full
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_disk_full_is_one_line_without_orbax_noise(tmp_path):
  cmd = _cmd(tmp_path / "run", 8, 2)
  r = subprocess.run([cmd[0], "-c", DISK_FULL] + cmd[1:], cwd=REPO,
                     env=_env(8, os.environ["LUNA_JAX_CACHE"]), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 1
  assert r.stderr.count("\n") == 1, r.stderr
  assert r.stderr.startswith("train.py: error: CheckpointError: saving checkpoint step 4 to ")
  assert "No space left on device" in r.stderr and "checkpoint step 2 is intact" in r.stderr


def test_closed_event_loop_noise_is_dropped_and_other_errors_kept(monkeypatch, capsys):
  import sys as sys_  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from luna_jax import metrics  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(sys_, "unraisablehook", lambda a: seen.append(a.exc_value))
  monkeypatch.setattr(threading, "excepthook", lambda a: seen.append(a.exc_value))
  metrics._quiet_closed_event_loops()
  closed, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
  for error in (closed, other):
    sys_.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error))
    threading.excepthook(types.SimpleNamespace(exc_type=type(error), exc_value=error))
  assert seen == [other, other]


def test_the_traceback_comes_back_on_request(tmp_path):
  env = _env(8, os.environ["LUNA_JAX_CACHE"])
  env["LUNA_JAX_TRACEBACK"] = "1"
  r = subprocess.run(_cmd(tmp_path / "run", 5, 2, ["--config.schedule=cosine",
                                                   "--config.warmup_steps=5"]),
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("train.py: error: ConfigError: ")
