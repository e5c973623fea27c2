"""Post-hoc conversion end to end: init_from in the trainer, and the conversion study."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from luna_jax import checkpoints, optim, resume_rules, trainer, workdir as wd
from luna_jax.experiments import conversion
from tests.luna_jax.test_trainer import tiny_config


def flat(p):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(p).items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A finished tiny softmax run (the conversion source)."""
  workdir = str(tmp_path_factory.mktemp("source"))
  trainer.train_and_evaluate(tiny_config("softmax", steps=6), workdir)
  return workdir


def converted_config(target, steps, source_dir):
  c = tiny_config(target, steps=max(steps, 1))
  c.num_train_steps = steps
  c.init_from = source_dir
  c.model.block = "post_ln" if target == "luna" else "pre_ln"
  return c


def test_softmax_to_softmax_reproduces_the_source_evaluation(source, tmp_path):
  src = wd.read_json(wd.path(source, wd.RESULTS_FILE))
  res = trainer.train_and_evaluate(converted_config("softmax", 0, source), str(tmp_path))
  assert res["test_accuracy"] == src["test_accuracy"]
  assert res["test_loss"] == pytest.approx(src["test_loss"], rel=1e-6)
  info = res["init_from"]
  assert info["workdir"] == os.path.abspath(source) and not info["initialised"]
  assert info["test_accuracy"] == src["test_accuracy"]


def test_learned_kernel_target_copies_bitwise_and_adds_only_its_own(source, tmp_path):
  res = trainer.train_and_evaluate(converted_config("learned_kernel", 0, source),
                                   str(tmp_path))
  info = res["init_from"]
  assert info["initialised"] and all(
      p.rsplit("/", 1)[-1] in ("feature_proj", "feature_bias", "psi_w1", "psi_b1", "psi_w2",
                               "psi_b2") for p in info["initialised"])
  assert not info["dropped"]
  _, src_params, _ = checkpoints.load_params(source, "best")
  _, new_params, step = checkpoints.load_params(str(tmp_path), "best")   # 0 steps: converted
  assert step == 0
  s, n = flat(src_params), flat(new_params)
  for path in info["copied"]:
    np.testing.assert_array_equal(n[path], s[path])
  assert set(n) - set(s) == set(info["initialised"])
  with open(tmp_path / wd.INIT_FROM_FILE) as f:
    assert json.load(f)["summary"].startswith("init_from: copied")


def test_fine_tune_is_an_ordinary_resumable_run(source, tmp_path):
  c = converted_config("linear_elu", 3, source)
  res = trainer.train_and_evaluate(c, str(tmp_path))
  assert res["finished"] and res["step"] == 3 and res["init_from"]["attention"] == "softmax"
  again = trainer.train_and_evaluate(c, str(tmp_path))      # a rerun re-evaluates, same numbers
  assert again["test_accuracy"] == res["test_accuracy"]


def test_incompatible_source_fails_before_compute(source, tmp_path):
  c = converted_config("learned_kernel", 2, source)
  c.model.emb_dim = 32
  with pytest.raises(ValueError, match="model.emb_dim: source 16, target 32"):
    trainer.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_study_writes_table_and_plot(source, tmp_path):
  rows = conversion.run_study(source, ["linear_elu"], [0, 2], str(tmp_path))
  assert [(r["target"], r["steps"]) for r in rows] == [("linear_elu", 0), ("linear_elu", 2)]
  src_acc = wd.read_json(wd.path(source, wd.RESULTS_FILE))["test_accuracy"]
  for r in rows:
    assert r["converted_recovered"] == pytest.approx(r["converted_test_accuracy"] / src_acc)
  assert rows[0]["scratch_test_accuracy"] != rows[0]["scratch_test_accuracy"]   # NaN at N=0
  assert 0.0 <= rows[1]["scratch_test_accuracy"] <= 1.0
  files = conversion.write_outputs(rows, str(tmp_path), source)
  md = open(files["md"]).read()
  assert "| linear_elu | 2 |" in md and os.path.getsize(files["png"]) > 1000
  # Table only: finished runs are read back as they were, unfinished ones are not trained.
  again = conversion.run_study(source, ["linear_elu", "cosformer"], [0, 2], str(tmp_path),
                               train=False)
  assert again[1]["converted_test_accuracy"] == rows[1]["converted_test_accuracy"]
  assert all(r["converted_test_accuracy"] != r["converted_test_accuracy"] for r in again[2:])
  assert not os.path.exists(tmp_path / "cosformer")


def test_length_buckets_evaluate_exactly_and_train(source, tmp_path):
  """The same (converted, 0-step) parameters evaluated with and without length buckets."""
  plain = trainer.train_and_evaluate(converted_config("softmax", 0, source),
                                     str(tmp_path / "plain"))
  c = converted_config("softmax", 0, source)
  c.length_buckets = 3
  bucketed = trainer.train_and_evaluate(c, str(tmp_path / "bucketed"))
  assert bucketed["test_accuracy"] == plain["test_accuracy"]
  assert bucketed["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)
  t = tiny_config("luna", steps=4)
  t.length_buckets = 3
  res = trainer.train_and_evaluate(t, str(tmp_path / "train"))
  assert res["finished"] and res["step"] == 4


def test_study_reports_a_target_it_cannot_build_as_a_row(source, tmp_path):
  rows = conversion.run_study(source, ["no_such_mechanism"], [0, 2], str(tmp_path))
  assert [r["steps"] for r in rows] == [0, 2]
  assert all(r["note"].startswith("not convertible") and "no_such_mechanism" in r["note"]
             for r in rows)
  assert all(r["converted_test_accuracy"] != r["converted_test_accuracy"] for r in rows)
  md = open(conversion.write_outputs(rows, str(tmp_path), source)["md"]).read()
  assert "- no_such_mechanism: not convertible" in md
  assert not os.path.exists(tmp_path / "no_such_mechanism")


@pytest.mark.parametrize("schedule", ["rsqrt_lra", "inverse_sqrt", "one_cycle"])
def test_short_fine_tunes_keep_the_source_peak_learning_rate(schedule):
  from configs import listops as listops_config
  src = listops_config.get_config("softmax,quick")
  src.schedule, src.warmup_steps, src.num_train_steps = schedule, 150, 800
  target = conversion.target_config(src, "linear_elu", 20, None)
  assert target.warmup_steps == 5

  def peak(c):
    return max(float(optim.learning_rate_schedule(c)(s)) for s in range(c.num_train_steps))

  assert peak(target) == pytest.approx(peak(src), rel=1e-3)


def test_study_rerun_with_another_source_is_refused(source, tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  shutil.copytree(source, first)
  shutil.copytree(source, second)                 # the same checkpoint under another path
  root = str(tmp_path / "study")
  conversion.run_study(str(first), ["softmax"], [0], root)
  info = wd.read_json(os.path.join(root, "softmax", "converted_n0", wd.INIT_FROM_FILE))
  assert info["sha256"] == resume_rules.best_identity(str(first))["sha256"]
  with pytest.raises(wd.ConfigMismatchError) as e:
    conversion.run_study(str(second), ["softmax"], [0], root, train=False)
  assert (f"holds a run of another config (config.init_from: {str(first)!r} -> "
          f"{str(second)!r}): use another --root for this study") in str(e.value)
  # The same path, retrained: its best checkpoint is another one.
  best = first / wd.BEST_DIR
  step_dir = best / os.listdir(best)[0]
  array = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs),
              key=os.path.getsize)
  with open(array, "r+b") as f:
    byte = f.read(1)
    f.seek(0)
    f.write(bytes([byte[0] ^ 1]))
  with pytest.raises(wd.ConfigMismatchError, match="was converted from another source "
                                                   "checkpoint .*: use another --root"):
    conversion.run_study(str(first), ["softmax"], [0], root)


def test_a_converted_run_no_longer_needs_its_source(source, tmp_path):
  copy = tmp_path / "source"
  shutil.copytree(source, copy)
  evaluated = converted_config("softmax", 0, str(copy))
  tuned = converted_config("linear_elu", 2, str(copy))
  first = trainer.train_and_evaluate(evaluated, str(tmp_path / "n0"))
  trainer.train_and_evaluate(tuned, str(tmp_path / "n2"))
  shutil.rmtree(copy)
  again = trainer.train_and_evaluate(evaluated, str(tmp_path / "n0"))    # re-evaluated
  assert again["test_accuracy"] == first["test_accuracy"]
  assert again["init_from"]["workdir"] == str(copy)                      # provenance kept
  tuned.num_train_steps, tuned.allow_resume_changes = 4, True
  resumed = trainer.train_and_evaluate(tuned, str(tmp_path / "n2"))     # resumed from step 2
  assert resumed["finished"] and resumed["step"] == 4


def test_a_signal_during_a_study_point_stops_the_study_in_one_line(source, tmp_path,
                                                                   monkeypatch, capsys):
  import signal  # pylint: disable=g-import-not-at-top
  tick = trainer.metrics_lib.Progress.tick

  def interrupted(self, step):
    os.kill(os.getpid(), signal.SIGINT)
    return tick(self, step)

  monkeypatch.setattr(trainer.metrics_lib.Progress, "tick", interrupted)
  args = ["--source", source, "--targets", "linear_elu", "--steps", "3",
          "--root", str(tmp_path)]
  assert conversion.main(args) == 0
  captured = capsys.readouterr()
  assert "received SIGINT: saved step 1" in captured.out
  assert captured.err == (f"{conversion.PROG}: linear_elu converted N=3 was stopped at step 1 "
                          "(its checkpoint is saved); rerun the same command to go on\n")
  monkeypatch.setattr(trainer.metrics_lib.Progress, "tick", tick)
  assert conversion.main(args) == 0
  assert "| linear_elu | 3 |" in (tmp_path / "conversion.md").read_text()


def test_study_input_errors_are_one_line(source, tmp_path, capsys):
  unfinished = tmp_path / "unfinished"
  shutil.copytree(source, unfinished)
  (unfinished / wd.RESULTS_FILE).unlink()
  for args, message in [
      (["--source", str(tmp_path / "missing")], "FileNotFoundError: no config.json in"),
      (["--source", str(unfinished)], f"SourceError: --source {unfinished}: no finished run")]:
    with pytest.raises(SystemExit) as e:
      conversion.main(args + ["--targets", "linear_elu", "--steps", "0", "--root",
                              str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"{conversion.PROG}: error: {message}")
