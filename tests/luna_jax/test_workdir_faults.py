"""Fault injection on the run folder: reused, damaged or killed workdirs never make the project
report a wrong number or lose what the user made (luna_jax/workdir.py, workdir_lock.py,
resume_rules.py, checkpoints.py)."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from PIL import Image

import lra_tasks
from lra_tasks import listops, pathfinder, retrieval
from lra_tasks.common import DataError
from luna_jax import metrics as metrics_lib
from luna_jax import checkpoints, models, resume_rules, steps, trainer
from luna_jax import workdir as wd
from tests.conftest import REPO
from tests.lra_tasks.test_pathfinder import make_config as pathfinder_config
from tests.lra_tasks.test_pathfinder import write_release as write_pathfinder_release
from tests.lra_tasks.test_retrieval import make_config as retrieval_config
from tests.lra_tasks.test_retrieval import write_release as write_retrieval_release
from tests.luna_jax.test_trainer import tiny_config
from tests.luna_jax.test_trainer_scale import _cmd, _env


def config_of(steps: int = 4, every: int = 2, **fields):
  c = tiny_config(steps=steps)
  c.eval_every = c.checkpoint_every = every
  c.keep_checkpoints = 3
  for k, v in fields.items():
    node, (*parents, leaf) = c, k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def run(config, workdir) -> dict:
  return trainer.train_and_evaluate(config, str(workdir))


def records(workdir) -> list[dict]:
  return metrics_lib.read_metrics(str(workdir))


def accuracy(config, params, split: str) -> float:
  """Accuracy of `params` on a split, computed here from the model alone."""
  task = lra_tasks.load_task(config)
  ds = task.splits[split]
  rows = [ds[i] for i in range(len(ds))]
  logits = models.Classifier(steps.model_config(config, task)).apply(
      {"params": params}, np.stack([r["inputs"] for r in rows]), deterministic=True)
  return float(np.mean(np.argmax(logits, -1) == np.stack([r["targets"] for r in rows])))


def assert_consistent(workdir, config) -> dict:
  """results.json describes the best checkpoint that exists, config.json is the config of the
  checkpoints, and metrics.jsonl holds each step once."""
  res = json.loads((workdir / wd.RESULTS_FILE).read_text())
  _, best_params, best_step = checkpoints.load_params(str(workdir), "best")
  assert res["best_step"] == best_step
  assert res["test_accuracy"] == pytest.approx(accuracy(config, best_params, "test"), abs=1e-6)
  recs = records(workdir)
  val = [r["val_accuracy"] for r in recs if r["step"] == best_step and "val_accuracy" in r]
  assert val == [res["best_val_accuracy"]]
  assert res["best_val_accuracy"] == max(r["val_accuracy"] for r in recs if "val_accuracy" in r)
  assert json.loads((workdir / wd.CONFIG_FILE).read_text()) == resume_rules.config_dict(config)
  train_steps = [r["step"] for r in recs if "train_loss" in r]
  assert train_steps == sorted(set(train_steps))                    # no step twice
  assert sum(r["step"] == 0 for r in recs) == 1                     # one header record
  assert sum("test_accuracy" in r for r in recs) == 1
  return res


def params_of(workdir, which="latest"):
  return checkpoints.load_params(str(workdir), which)[1]


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 4-step run: its results and final parameters."""
  workdir = tmp_path_factory.mktemp("reference")
  results = run(config_of(), workdir)
  return results, params_of(workdir)


# ----------------------------------------------------------------------------- reused workdirs

def test_deleted_checkpoints_rerun_reports_the_best_checkpoint(reference, tmp_path):
  config = config_of()
  run(config, tmp_path)
  shutil.rmtree(tmp_path / wd.CHECKPOINTS_DIR)
  shutil.rmtree(tmp_path / wd.BEST_DIR)
  results = run(config, tmp_path)
  res = assert_consistent(tmp_path, config)
  # A restart from step 0 is the same run: the same numbers as an uninterrupted one.
  for k in ("test_accuracy", "best_step", "best_val_accuracy"):
    assert res[k] == results[k] == reference[0][k]
  assert_same_params(params_of(tmp_path), reference[1])


def test_kill_before_the_first_checkpoint_leaves_one_step0_record(tmp_path):
  config = config_of()
  tmp_path.mkdir(exist_ok=True)
  # What a run killed at step 1, before its first checkpoint, leaves behind.
  (tmp_path / wd.METRICS_FILE).write_text(
      '{"step": 0, "num_params": 1}\n{"step": 1, "train_loss": 2.0}\n{"step": 1, "tra')
  run(config, tmp_path)
  assert_consistent(tmp_path, config)


def test_orphan_tmp_folders_are_removed_at_start(tmp_path):
  for d in (wd.CHECKPOINTS_DIR, wd.BEST_DIR):
    (tmp_path / d / "8.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  run(config_of(steps=2), tmp_path)
  assert not [p for d in (wd.CHECKPOINTS_DIR, wd.BEST_DIR)
              for p in os.listdir(tmp_path / d) if wd.TMP_MARKER in p]


@pytest.mark.parametrize("field,value,old", [
    ("model.emb_dim", 32, 16), ("seed", 1, 0), ("listops.num_train", 48, 64)])
def test_model_or_data_change_fails_before_anything_is_written(tmp_path, field, value, old):
  run(config_of(steps=2), tmp_path)
  before = {p: (tmp_path / p).read_bytes() for p in (wd.CONFIG_FILE, wd.METRICS_FILE,
                                                     wd.RESULTS_FILE)}
  steps = sorted(os.listdir(tmp_path / wd.CHECKPOINTS_DIR))
  with pytest.raises(wd.ConfigMismatchError) as e:
    run(config_of(steps=2, **{field: value}), tmp_path)
  assert f"config.{field}: {old!r} -> {value!r}" in str(e.value)
  assert "another model or data" in str(e.value)
  assert {p: (tmp_path / p).read_bytes() for p in before} == before
  assert sorted(os.listdir(tmp_path / wd.CHECKPOINTS_DIR)) == steps
  assert not (tmp_path / wd.CONFIG_HISTORY_FILE).exists()


def test_schedule_change_needs_allow_resume_changes_and_is_recorded(tmp_path, capsys):
  run(config_of(steps=2), tmp_path)
  stored = (tmp_path / wd.CONFIG_FILE).read_bytes()
  with pytest.raises(wd.ConfigMismatchError, match="allow_resume_changes") as e:
    run(config_of(steps=4, learning_rate=5e-4), tmp_path)
  assert "config.learning_rate: 0.001 -> 0.0005" in str(e.value)
  assert "config.num_train_steps: 2 -> 4" in str(e.value)
  assert (tmp_path / wd.CONFIG_FILE).read_bytes() == stored
  config = config_of(steps=4, learning_rate=5e-4, allow_resume_changes=True)
  run(config, tmp_path)
  assert "resumed from step 2" in capsys.readouterr().out
  history = wd.read_jsonl(str(tmp_path / wd.CONFIG_HISTORY_FILE))
  assert len(history) == 1 and history[0]["step"] == 2
  assert history[0]["changes"] == {"allow_resume_changes": [False, True],
                                   "learning_rate": [1e-3, 5e-4], "num_train_steps": [2, 4]}
  assert_consistent(tmp_path, config)


def test_rerun_of_a_finished_run_with_an_older_config_json(reference, tmp_path, capsys):
  config = config_of()
  run(config, tmp_path)
  # A config.json written before the bookkeeping fields existed.
  stored = json.loads((tmp_path / wd.CONFIG_FILE).read_text())
  del stored["allow_resume_changes"], stored["allow_truncation"]
  (tmp_path / wd.CONFIG_FILE).write_text(json.dumps(stored))
  (tmp_path / wd.RESULTS_FILE).unlink()
  capsys.readouterr()
  results = run(config, tmp_path)
  out = capsys.readouterr().out
  assert "already finished training at step 4" in out
  assert "steps/s" not in out and "ETA" not in out
  assert results["test_accuracy"] == reference[0]["test_accuracy"]
  assert_consistent(tmp_path, config)


def test_field_rules_for_old_and_new_configs():
  stored = resume_rules.config_dict(config_of())
  new = resume_rules.config_dict(config_of())
  del stored["model"]["qkv_bias"]                    # added since, at its default: unchanged
  assert resume_rules.config_changes(stored, new) == []
  new["model"]["qkv_bias"] = True                    # added since, not at its default
  new["eval_every"] = 7                              # bookkeeping
  new["one_cycle"]["div_factor"] = 10.0              # schedule
  changes = {c.field: (c.kind, c.old, c.new) for c in resume_rules.config_changes(stored, new)}
  assert changes == {"model.qkv_bias": (resume_rules.MODEL_DATA, resume_rules.ABSENT, True),
                     "eval_every": (resume_rules.BOOKKEEPING, 2, 7),
                     "one_cycle.div_factor": (resume_rules.SCHEDULE, 25.0, 10.0)}


# ----------------------------------------------------------------------------- damaged files

def _largest_file(folder):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["array data", "iterator json", "state metadata",
                                    "ocdbt manifest"])
def test_truncated_latest_checkpoint_resumes_from_an_older_one(reference, tmp_path, caplog,
                                                               damage):
  config = config_of()
  run(config, tmp_path)
  step4 = tmp_path / wd.CHECKPOINTS_DIR / "4"
  file = {"array data": lambda: _largest_file(step4 / "state" / "d"),
          "iterator json": lambda: str(step4 / "data_iter" / "metadata"),
          "state metadata": lambda: str(step4 / "state" / "_METADATA"),
          "ocdbt manifest": lambda: str(step4 / "state" / "manifest.ocdbt")}[damage]()
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) // 2)
  with caplog.at_level(logging.WARNING, logger="luna_jax"):
    run(config, tmp_path)
  message = next(r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage())
  assert "checkpoint step 4" in message and "corrupt-4" in message
  assert file in message
  assert (tmp_path / wd.CHECKPOINTS_DIR / "corrupt-4").is_dir()
  assert_same_params(params_of(tmp_path), reference[1])          # redone from step 2
  res = assert_consistent(tmp_path, config)
  assert res["test_accuracy"] == reference[0]["test_accuracy"]


def test_no_readable_checkpoint_fails_with_one_line(tmp_path):
  config = config_of()
  run(config, tmp_path)
  for step in (2, 4):
    (tmp_path / wd.CHECKPOINTS_DIR / str(step) / "data_iter" / "metadata").write_text("{")
  with pytest.raises(wd.CheckpointError) as e:
    run(config, tmp_path)
  assert "no readable checkpoint" in str(e.value) and "\n" not in str(e.value)
  assert "corrupt-2" in str(e.value) and "corrupt-4" in str(e.value)


def test_failed_async_save_stops_the_run_at_that_save(tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
  original = handler.JsonCheckpointHandler._save_fn

  async def disk_full(self, item, directory):
    if f"{os.sep}4.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, item, directory)

  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", disk_full)
  config = config_of(steps=8)
  with pytest.raises(wd.CheckpointError) as e:
    run(config, tmp_path)
  assert "saving checkpoint step 4" in str(e.value) and "No space left" in str(e.value)
  assert "checkpoint step 2 is intact" in str(e.value)
  ckpt = tmp_path / wd.CHECKPOINTS_DIR
  assert sorted(os.listdir(ckpt)) == ["2"]                     # no orphan tmp folder
  assert max(r["step"] for r in records(tmp_path)) < 8         # stopped before the end
  assert not (tmp_path / wd.RESULTS_FILE).exists()
  monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", original)
  run(config, tmp_path)                                        # resumes from step 2
  assert_consistent(tmp_path, config)


def test_non_finite_metrics_are_written_as_null(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(3, {"val_loss": math.inf, "train_loss": math.nan, "x": 1.5})
  line = (tmp_path / wd.METRICS_FILE).read_text()
  record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
  assert record == {"step": 3, "val_loss": None, "train_loss": None, "x": 1.5}


# ----------------------------------------------------------------------------- bad input

def _listops_dir(tmp_path, **overrides):
  """Official-format ListOps files (a few rows), with some files replaced."""
  rows = "Source\tTarget\n" + "( ( [MAX 2 ) 9 ] )\t9\n( ( [MIN 2 ) 9 ] )\t2\n" * 8
  folder = tmp_path / "listops-data"
  folder.mkdir()
  for split, name in listops.SPLIT_FILES.items():
    (folder / name).write_text(overrides.get(split, rows))
  return folder


@pytest.mark.parametrize("split", ["validation", "train"])
def test_header_only_split_fails_before_compute(tmp_path, split):
  data = _listops_dir(tmp_path, **{split: "Source\tTarget\n"})
  with pytest.raises(DataError) as e:
    run(config_of(data_dir=str(data)), tmp_path / "run")
  assert str(data / listops.SPLIT_FILES[split]) in str(e.value)
  assert "no data rows" in str(e.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,message", [
    ("model.proj_len", 0, "config.model.proj_len=0 must be >= 1"),
    ("num_train_steps", 0, "config.num_train_steps=0 must be >= 1"),
    ("seq_len", 0, "config.seq_len=0 must be >= 1"),
    ("model.dropout", 1.0, "config.model.dropout=1.0 must be in [0, 1)"),
    ("listops.num_val", 0, "config.listops.num_val=0 must be >= 1"),
])
def test_out_of_range_fields_fail_before_compute(tmp_path, field, value, message):
  with pytest.raises(ValueError) as e:
    run(config_of(**{field: value}), tmp_path / "run")
  assert message in str(e.value)
  assert not (tmp_path / "run").exists()


def test_listops_rows_longer_than_seq_len_are_counted_or_refused(tmp_path, caplog):
  long_row = "( [SM " + " ".join("1" * 60) + " ] )\t0\n"          # 62 symbols
  data = _listops_dir(tmp_path, validation="Source\tTarget\n[MAX 2 9 ]\t9\n" + long_row * 3)
  c = config_of(data_dir=str(data))
  with caplog.at_level(logging.WARNING, logger="lra_tasks"):
    lra_tasks.load_task(c)
  warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert len(warnings) == 1 and "3 of 4 rows" in warnings[0]
  assert str(data / listops.SPLIT_FILES["validation"]) in warnings[0]
  c.allow_truncation = False
  with pytest.raises(DataError, match=r"basic_val.tsv:3: 62 symbols, more than the 47"):
    lra_tasks.load_task(c)


def test_listops_bom_is_named(tmp_path):
  data = _listops_dir(tmp_path, test="\ufeffSource\tTarget\n[MAX 2 9 ]\t9\n")
  with pytest.raises(DataError, match=r"basic_test.tsv:1: .*BOM"):
    lra_tasks.load_task(config_of(data_dir=str(data)))


def test_retrieval_empty_documents_are_counted_and_bom_named(tmp_path, caplog):
  folder = write_retrieval_release(str(tmp_path / "aan"))
  with caplog.at_level(logging.INFO, logger="lra_tasks"):
    retrieval.load(retrieval_config(folder))
  empty = [r.getMessage() for r in caplog.records
           if r.levelno == logging.WARNING and "are empty" in r.getMessage()]
  assert len(empty) == 1 and "1 of 8 documents" in empty[0] and "line 3" in empty[0]
  assert any("were cut" in r.getMessage() for r in caplog.records)   # the 20-byte document
  with open(os.path.join(folder, retrieval.FILES["test"]), "r+b") as f:
    body = f.read()
    f.seek(0)
    f.write(b"\xef\xbb\xbf" + body)
  with pytest.raises(DataError, match="line 1: .*BOM"):
    retrieval.load(retrieval_config(folder))


def test_pathfinder_rgb_png_is_an_error_naming_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv("LUNA_JAX_CACHE", str(tmp_path / "cache"))
  images = [np.full((32, 32), i, np.uint8) for i in range(10)]
  folder = write_pathfinder_release(tmp_path / "pathfinder32", [images], [[0, 1] * 5])
  png = folder / "imgs" / "0" / "sample_3.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
  with pytest.raises(DataError, match=r"sample_3.png .*PNG mode 'RGB', expected 8-bit "
                                      r"grayscale 'L'"):
    pathfinder.load(pathfinder_config(str(tmp_path / "pathfinder32")))


def test_pathfinder_decode_cache_sees_an_image_rewritten_in_place(tmp_path, monkeypatch):
  monkeypatch.setenv("LUNA_JAX_CACHE", str(tmp_path / "cache"))
  images = [np.full((32, 32), i, np.uint8) for i in range(4)]
  folder = write_pathfinder_release(tmp_path / "pathfinder32", [images], [[0, 1, 0, 1]])
  first = pathfinder.read_images(str(folder), 32)
  assert first.pixels[2].max() == 2
  png = folder / "imgs" / "0" / "sample_2.png"
  st = os.stat(png)
  Image.fromarray(np.full((32, 32), 200, np.uint8)).save(png)     # same name, same folder
  os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
  second = pathfinder.read_images(str(folder), 32)
  assert second.pixels[2].max() == 200


# ----------------------------------------------------------------------------- kills

def test_sigkill_at_five_random_points_then_rerun_is_bitwise_exact(tmp_path):
  steps, every = 60, 5
  config = tiny_config(steps=steps)
  config.model.dropout = config.model.attention_dropout = 0.1
  config.eval_every, config.checkpoint_every = 2 * every, every
  reference_dir = tmp_path / "reference"
  reference = run(config, reference_dir)

  cache = os.environ["LUNA_JAX_CACHE"]
  workdir = tmp_path / "killed"
  cmd = _cmd(workdir, steps, every, [f"--config.eval_every={2 * every}"])
  rng = np.random.default_rng(2026)
  targets = sorted(rng.choice(np.arange(1, steps - 10), size=5, replace=False).tolist())
  killed_at = []
  for target in targets:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(8, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
      if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= target:
        time.sleep(rng.uniform(0.0, 0.05))
        break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    killed_at.append(target)
  assert not (workdir / wd.RESULTS_FILE).exists(), "a run finished before it was killed"
  r = subprocess.run(cmd, cwd=REPO, env=_env(8, cache), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert_same_params(params_of(workdir), params_of(reference_dir))   # bitwise on CPU
  train = lambda w: [(x["step"], x["train_loss"]) for x in records(w) if "train_loss" in x]
  assert train(workdir) == train(reference_dir)
  res = json.loads((workdir / wd.RESULTS_FILE).read_text())
  assert (res["test_accuracy"], res["best_step"]) == (reference["test_accuracy"],
                                                      reference["best_step"]), killed_at


# ----------------------------------------------------------------------------- one writer

def _lock_by(workdir, pid, host=None):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / wd.LOCK_FILE).write_text(json.dumps({"host": host or socket.gethostname(),
                                                  "pid": pid}))


@pytest.fixture
def live_pid():
  proc = subprocess.Popen(["sleep", "60"])
  yield proc.pid
  proc.kill()
  proc.wait()


def test_second_writer_fails_naming_the_holder_and_writes_nothing(tmp_path, live_pid):
  _lock_by(tmp_path, live_pid)
  with pytest.raises(wd.WorkdirBusyError) as e:
    run(config_of(steps=2), tmp_path)
  assert f"in use by process {live_pid} on host {socket.gethostname()}" in str(e.value)
  assert str(tmp_path / wd.LOCK_FILE) in str(e.value) and "\n" not in str(e.value)
  assert sorted(os.listdir(tmp_path)) == [wd.LOCK_FILE]         # nothing written
  assert json.loads((tmp_path / wd.LOCK_FILE).read_text())["pid"] == live_pid
  _lock_by(tmp_path, 1, host="another-host")                     # never taken over
  with pytest.raises(wd.WorkdirBusyError, match="process 1 on host another-host"):
    run(config_of(steps=2), tmp_path)


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, caplog):
  dead = subprocess.Popen(["true"])
  dead.wait()
  _lock_by(tmp_path, dead.pid)
  with caplog.at_level(logging.WARNING, logger="luna_jax"):
    run(config_of(steps=2), tmp_path)
  assert any(f"taking over the lock of process {dead.pid}" in r.getMessage()
             for r in caplog.records)
  assert (tmp_path / wd.RESULTS_FILE).exists()
  assert not (tmp_path / wd.LOCK_FILE).exists()                  # released at the end


def test_two_train_processes_on_one_workdir(tmp_path):
  cache = os.environ["LUNA_JAX_CACHE"]
  workdir = tmp_path / "run"
  first = subprocess.Popen(_cmd(workdir, 400, 100), cwd=REPO, env=_env(1, cache),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    for line in first.stdout:
      if line.startswith("step "):
        break
    second = subprocess.run(_cmd(workdir, 400, 100, ["--config.seed=1"]), cwd=REPO,
                            env=_env(1, cache), capture_output=True, text=True, timeout=300)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stdout.close()
  assert second.returncode == wd.BUSY_EXIT_STATUS, second.stderr[-2000:]
  lines = second.stderr.strip().splitlines()
  assert lines[-1].startswith("train.py: error: WorkdirBusyError: ")
  assert f"in use by process {first.pid}" in lines[-1]
  assert json.loads((workdir / wd.CONFIG_FILE).read_text())["seed"] == 0


# ----------------------------------------------------------------------------- data identity

@pytest.mark.parametrize("data", ["official", "generated"])
def test_a_changed_data_file_under_a_stopped_run_is_refused(tmp_path, monkeypatch, data):
  monkeypatch.setenv("LUNA_JAX_CACHE", str(tmp_path / "cache"))   # edits its own copy
  config = config_of(steps=2, data_dir=str(_listops_dir(tmp_path)) if data == "official" else "")
  workdir = tmp_path / "run"
  run(config, workdir)
  train_file = lra_tasks.load_task(config).sources["train"]
  old = lra_tasks.common.file_digest(train_file)
  with open(train_file, "a") as f:
    f.write("( [MAX 1 2 ] )\t2\n")
  new = lra_tasks.common.file_digest(train_file)
  before = {p: (workdir / p).read_bytes() for p in (wd.CONFIG_FILE, wd.IDENTITY_FILE,
                                                    wd.RESULTS_FILE, wd.METRICS_FILE)}
  with pytest.raises(wd.ConfigMismatchError) as e:
    run(config, workdir)
  name = os.path.basename(train_file)
  assert f"the file {name} changed (sha256 {old!r} -> {new!r})" in str(e.value)
  assert "trained on other data" in str(e.value) and "\n" not in str(e.value)
  assert {p: (workdir / p).read_bytes() for p in before} == before


def test_a_changed_device_count_is_recorded_and_said(tmp_path, capsys):
  config = config_of(steps=2)
  run(config, tmp_path)
  identity = json.loads((tmp_path / wd.IDENTITY_FILE).read_text())
  assert identity["num_devices"] == jax.device_count() == 8
  assert identity["data"]["source"] == "generated" and identity["data"]["files"]
  identity["num_devices"] = 4                       # as if it had been trained on 4 devices
  (tmp_path / wd.IDENTITY_FILE).write_text(json.dumps(identity))
  capsys.readouterr()
  run(config_of(steps=4, allow_resume_changes=True), tmp_path)
  assert "resumed with a change: num_devices: 4 -> 8" in capsys.readouterr().out
  history = wd.read_jsonl(str(tmp_path / wd.CONFIG_HISTORY_FILE))
  assert history[0]["changes"]["num_devices"] == [4, 8]
  assert json.loads((tmp_path / wd.IDENTITY_FILE).read_text())["num_devices"] == 8


# ----------------------------------------------------------------------------- no silent restart

def test_a_second_rerun_after_unreadable_checkpoints_keeps_best_and_results(reference, tmp_path):
  config = config_of()
  run(config, tmp_path)
  for step in (2, 4):
    (tmp_path / wd.CHECKPOINTS_DIR / str(step) / "data_iter" / "metadata").write_text("{")
  with pytest.raises(wd.CheckpointError, match="--start_over"):
    run(config, tmp_path)
  kept = {p: (tmp_path / p).read_bytes() for p in (wd.RESULTS_FILE, wd.METRICS_FILE)}
  best = sorted(os.listdir(tmp_path / wd.BEST_DIR))
  with pytest.raises(wd.CheckpointError) as e:                   # the identical second rerun
    run(config, tmp_path)
  assert str(e.value) == (
      f"{tmp_path} has no readable training checkpoint and its checkpoints were unreadable "
      f"(moved aside to corrupt-2, corrupt-4); it holds best/{best[0]} and results.json of an "
      "earlier run: a start from step 0 would replace them. Rerun with --start_over to train "
      "again from step 0, or use a new --workdir")
  assert {p: (tmp_path / p).read_bytes() for p in kept} == kept
  assert sorted(os.listdir(tmp_path / wd.BEST_DIR)) == best
  results = trainer.train_and_evaluate(config, str(tmp_path), start_over=True)
  assert results["test_accuracy"] == reference[0]["test_accuracy"]
  assert_consistent(tmp_path, config)


def test_deleted_training_checkpoints_with_intact_best_are_not_started_over(tmp_path):
  config = config_of()
  run(config, tmp_path)
  shutil.rmtree(tmp_path / wd.CHECKPOINTS_DIR)
  results = (tmp_path / wd.RESULTS_FILE).read_bytes()
  with pytest.raises(wd.CheckpointError, match=r"holds best/\d and results.json"):
    run(config, tmp_path)
  assert (tmp_path / wd.RESULTS_FILE).read_bytes() == results
  assert os.listdir(tmp_path / wd.BEST_DIR)


def test_an_empty_workdir_is_refused(tmp_path):
  with pytest.raises(wd.WorkdirError, match="the workdir is empty"):
    run(config_of(steps=2), "")
  cmd = [str(REPO / a) if a == "train.py" else a.replace("=configs/", f"={REPO}/configs/")
         for a in _cmd("", 2, 2)]
  r = subprocess.run(cmd, cwd=tmp_path, env=_env(1, os.environ["LUNA_JAX_CACHE"]),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      "train.py: error: WorkdirError: the workdir is empty ('': an unset shell variable?): "
      "name a folder for the run, e.g. --workdir=runs/NAME")
  assert os.listdir(tmp_path) == []                               # nothing in the cwd


# ----------------------------------------------------------------------------- fields that matter

def test_a_changed_grain_workers_is_refused_before_the_restore(tmp_path):
  run(config_of(steps=2), tmp_path)
  with pytest.raises(wd.ConfigMismatchError, match=r"config.grain_workers: 0 -> 2"):
    run(config_of(steps=4, grain_workers=2, allow_resume_changes=True), tmp_path)
  assert not (tmp_path / wd.CONFIG_HISTORY_FILE).exists()


def test_num_train_steps_below_the_finished_step_is_refused(tmp_path):
  run(config_of(steps=4), tmp_path)
  results = (tmp_path / wd.RESULTS_FILE).read_bytes()
  with pytest.raises(wd.ConfigMismatchError) as e:
    run(config_of(steps=2, allow_resume_changes=True), tmp_path)
  assert str(e.value) == (
      f"config.num_train_steps=2 is below step 4 of the checkpoint in "
      f"{tmp_path / wd.CHECKPOINTS_DIR}: a run is not shortened after the fact; rerun with "
      "num_train_steps >= 4, or use a new --workdir")
  assert (tmp_path / wd.RESULTS_FILE).read_bytes() == results
  assert json.loads((tmp_path / wd.CONFIG_FILE).read_text())["num_train_steps"] == 4


@pytest.mark.parametrize("field,value", [("learning_rate", math.inf), ("weight_decay", math.nan),
                                         ("grad_clip", math.nan), ("adam_eps", -math.inf)])
def test_non_finite_float_fields_are_refused(tmp_path, field, value):
  with pytest.raises(wd.ConfigError) as e:
    run(config_of(**{field: value}), tmp_path / "run")
  assert str(e.value) == f"config.{field}={value} must be a finite number"
  assert not (tmp_path / "run").exists()


def test_divergence_before_the_first_checkpoint_says_so(tmp_path):
  config = config_of(steps=8, every=8, learning_rate=1e30)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    run(config, tmp_path)
  assert "No checkpoint was saved before it." in str(e.value)
  assert "step None" not in str(e.value)
  assert "No checkpoint was saved" in (tmp_path / wd.FAILED_FILE).read_text()


def test_the_first_record_after_a_resume_names_the_steps_it_averages(tmp_path):
  run(config_of(steps=2, log_every=4), tmp_path)
  run(config_of(steps=6, log_every=4, allow_resume_changes=True), tmp_path)
  train = {r["step"]: r for r in records(tmp_path) if "train_loss" in r}
  assert sorted(train) == [2, 4, 6]
  assert [train[s].get("averaged_steps") for s in (2, 4, 6)] == [None, 2, None]
  whole = tmp_path / "whole"
  run(config_of(steps=6, log_every=4), whole)
  assert not any("averaged_steps" in r for r in records(whole))


# ----------------------------------------------------------------------------- signals, damage

def test_garbage_iterator_state_is_an_unreadable_checkpoint(reference, tmp_path, caplog):
  config = config_of()
  run(config, tmp_path)
  (tmp_path / wd.CHECKPOINTS_DIR / "4" / "data_iter" / "metadata").write_text('{"foo": 1}')
  with caplog.at_level(logging.WARNING, logger="luna_jax"):
    run(config, tmp_path)
  assert any("checkpoint step 4 is unreadable" in r.getMessage() for r in caplog.records)
  assert (tmp_path / wd.CHECKPOINTS_DIR / "corrupt-4").is_dir()
  assert_same_params(params_of(tmp_path), reference[1])          # redone from step 2
  assert_consistent(tmp_path, config)


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_a_signal_during_the_final_evaluation_keeps_the_step_and_the_rerun_evaluates(
    reference, tmp_path, monkeypatch, capsys, signals):
  original = trainer._final_evaluation

  def interrupted(*args, **kwargs):
    for s in signals:
      os.kill(os.getpid(), s)
    return original(*args, **kwargs)

  monkeypatch.setattr(trainer, "_final_evaluation", interrupted)
  config = config_of()
  results = run(config, tmp_path)
  name = signal.Signals(signals[0]).name
  assert (f"received {name}: during the final evaluation; step 4 is saved, rerun the same "
          "command to evaluate it") in capsys.readouterr().out
  assert not results["finished"] and not (tmp_path / wd.RESULTS_FILE).exists()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored
  monkeypatch.setattr(trainer, "_final_evaluation", original)
  again = run(config, tmp_path)
  assert again["test_accuracy"] == reference[0]["test_accuracy"]
  assert_consistent(tmp_path, config)


def test_a_checkpoint_that_cannot_be_read_for_another_reason_is_not_moved(tmp_path,
                                                                         monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = config_of()
  run(config, tmp_path)

  def denied(self, step, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", f"checkpoints/{step}/state")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
  with pytest.raises(wd.CheckpointError) as e:
    run(config, tmp_path)
  assert str(e.value).startswith(f"cannot read checkpoint step 4 in {tmp_path / 'checkpoints'} "
                                 "(PermissionError: [Errno 13] Permission denied")
  assert "nothing was moved" in str(e.value)
  assert sorted(os.listdir(tmp_path / wd.CHECKPOINTS_DIR)) == ["2", "4"]
  assert (tmp_path / wd.RESULTS_FILE).exists()
