"""Sweep library, sweep files, launcher commands and skipping (no real training)."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

from configs.sweeps import hyper as h
from luna_jax.experiments import results, runs
from luna_jax.experiments import sweep
from luna_jax import resume_rules, workdir as wd


def test_hyper_combinators_order_and_counts():
  s = h.product(h.fixed("config", "c.py"), h.sweep("arg", ["a", "b"]), h.sweep("seed", [0, 1]))
  assert [(d["arg"], d["seed"]) for d in s] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
  assert all(d["config"] == "c.py" for d in s)
  z = h.zipit(h.sweep("lr", [1, 2]), h.sweep("warmup", [10, 20]))
  assert z == [{"lr": 1, "warmup": 10}, {"lr": 2, "warmup": 20}]
  assert h.chain(h.fixed("a", 1), h.sweep("b", [2, 3])) == [{"a": 1}, {"b": 2}, {"b": 3}]
  assert len(h.product(h.sweep("a", range(3)), h.chain(h.fixed("b", 0), z))) == 9
  with pytest.raises(ValueError, match="same key"):
    h.product(h.fixed("a", 1), h.fixed("a", 2))
  with pytest.raises(ValueError, match="equal length"):
    h.zipit(h.sweep("a", [1, 2]), h.sweep("b", [1]))


def test_short_float_and_flag_values():
  assert [sweep.short_float(x) for x in (1e-4, 5e-5, 0.05, 2.5e-4, 1.0)] == [
      "1e-4", "5e-5", "5e-2", "2.5e-4", "1e0"]
  assert [sweep.format_value(v) for v in (True, False, 1e-4, 3, "x")] == [
      "true", "false", "0.0001", "3", "x"]


def test_quick_sweep_points():
  points = sweep.expand("configs/sweeps/quick.py")
  assert [p.name for p in points] == ["listops/luna_l16_lr1e-3_s0", "listops/softmax_lr5e-2_s0"]
  args = points[0].train_args("/r", ["--config.log_every=1"])
  assert args == ["train.py", "--config=configs/listops.py:luna,quick",
                  "--workdir=/r/listops/luna_l16_lr1e-3_s0", "--config.num_train_steps=200",
                  "--config.warmup_steps=50", "--config.eval_every=100",
                  "--config.checkpoint_every=100", "--config.seed=0", "--config.log_every=1"]
  assert len(sweep.expand("configs/sweeps/quick.py:seeds=2,tasks=listops+pathfinder")) == 8


def test_lra_grid_points():
  points = sweep.expand("configs/sweeps/lra_luna.py:data=/d")
  assert len(points) == 3 * 5 * 8
  assert len({p.name for p in points}) == len(points)
  assert [p.name for p in points[:8]] == [
      "listops/luna_l16_lr1e-4_s0", "listops/luna_l128_lr1e-4_s0", "listops/luna_l256_lr1e-4_s0",
      "listops/softmax_lr5e-2_s0", "listops/linear_elu_lr5e-2_s0", "listops/performer_lr5e-2_s0",
      "listops/cheap_linear_lr5e-2_s0", "listops/learned_kernel_lr5e-2_s0"]
  assert points[0].overrides == (("data_dir", "/d/lra_release/listops-1000"),
                                 ("model.proj_len", 16), ("seed", 0))
  by_name = {p.name: p for p in points}
  assert ("data_dir", "/d/tfds") in by_name["text/luna_l256_lr5e-5_s1"].overrides
  assert by_name["image/softmax_lr5e-4_s2"].config_arg == "softmax"
  assert points[-1].name.endswith("_s2")                  # seeds outermost
  assert sweep.expand("configs/sweeps/lra_luna.py:data=/d") == points   # deterministic
  six = sweep.expand("configs/sweeps/lra_luna.py:tasks=all,seeds=1")
  assert len(six) == 6 * 8 and any(p.name.startswith("pathx/") for p in six)
  assert all(k != "data_dir" for p in six for k, _ in p.overrides)   # no data= given


def test_lr_seed_points():
  points = sweep.expand("configs/sweeps/lr_seed.py:listops,luna,l=256")
  assert [p.name for p in points[:4]] == [
      "listops/luna_l256_lr5e-5_s0", "listops/luna_l256_lr5e-5_s1",
      "listops/luna_l256_lr5e-5_s2", "listops/luna_l256_lr1e-4_s0"]
  assert len(points) == 9 and points[0].config_arg == "luna,l=256"
  assert ("learning_rate", 5e-5) in points[0].overrides
  pts = sweep.expand("configs/sweeps/lr_seed.py:text,softmax,lrs=0.01+0.1,seeds=1")
  assert [p.name for p in pts] == ["text/softmax_lr1e-2_s0", "text/softmax_lr1e-1_s0"]


def _write_sweep(tmp_path, name, body):
  path = tmp_path / f"{name}.py"
  path.write_text("from configs.sweeps import hyper as h\n\n"
                  f"def get_sweep(arg=None):\n  return {body}\n")
  return str(path)


def test_bad_sweeps_fail_at_expansion(tmp_path):
  dup = _write_sweep(tmp_path, "dup", 'h.product(h.fixed("config", "configs/listops.py"), '
                               'h.sweep("model.dropout", [0.1, 0.2]))')
  with pytest.raises(ValueError, match="share the workdir"):
    sweep.expand(dup)
  tagged = _write_sweep(tmp_path, "tagged", 'h.product(h.fixed("config", "configs/listops.py"), '
                                  'h.zipit(h.sweep("model.dropout", [0.1, 0.2]), '
                                  'h.sweep("name", ["d1", "d2"])))')
  assert [p.name for p in sweep.expand(tagged)] == ["listops/luna_l256_lr1e-4_s0_d1",
                                                    "listops/luna_l256_lr1e-4_s0_d2"]
  typo = _write_sweep(tmp_path, "typo", '[{"config": "configs/listops.py", "model.dropuot": 0.1}]')
  with pytest.raises(ValueError, match="unknown config field 'model.dropuot'"):
    sweep.expand(typo)


def test_local_dry_run_prints_one_command_per_point(tmp_path, capsys):
  assert sweep.main(["run", "configs/sweeps/lra_luna.py:seeds=1,tasks=listops+image",
                     "--root", str(tmp_path), "--dry-run", "--config.num_train_steps=7"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 16
  for line in lines:
    cd, cmd = line.split(" && ")
    argv = shlex.split(cmd)
    assert cd == f"cd {sweep.REPO}" and argv[1] == "train.py"
    assert argv[-1] == "--config.num_train_steps=7" and "--config.seed=0" in argv
  assert f"--workdir={tmp_path}/image/luna_l128_lr5e-3_s0" in lines[9]
  assert "--config.model.proj_len=128" in lines[9]
  assert not os.listdir(tmp_path)                       # nothing ran


def test_tpu_dry_run_command_format(capsys):
  assert sweep.main(["run", "configs/sweeps/quick.py", "--root", "gs://b/q", "--launcher", "tpu",
                     "--tpu", "pod", "--zone", "us-central2-b", "--project", "p", "--dry-run",
                     "--env", "TFDS_DATA_DIR=gs://b/tfds"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  argv = shlex.split(lines[1])
  assert argv[:11] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone",
                       "us-central2-b", "--project", "p", "--worker=all"]
  assert argv[11] == "--command" and len(argv) == 13
  assert argv[12].startswith("cd ~/luna-jax && LUNA_JAX_DISTRIBUTED=1 "
                             "TFDS_DATA_DIR=gs://b/tfds python train.py "
                             "--config=configs/listops.py:softmax,quick ")
  remote = shlex.split(argv[12].split(" && ", 1)[1])
  assert "--workdir=gs://b/q/listops/softmax_lr5e-2_s0" in remote
  assert "--config.num_train_steps=200" in remote
  point = sweep.expand("configs/sweeps/quick.py")[0]
  cmd = sweep.tpu_command(point, "gs://b", tpu="t", zone="z", env=["A=x y"])
  assert cmd[-1].startswith("cd ~/luna-jax && LUNA_JAX_DISTRIBUTED=1 A='x y' python train.py")


def _finish(workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"finished": True}, f)


def test_run_skips_finished_and_diverged_and_resumes_the_rest(tmp_path):
  points = sweep.expand("configs/sweeps/lr_seed.py:listops,luna,lrs=1e-4,seeds=4")
  root = str(tmp_path)
  _finish(points[0].workdir(root))
  os.makedirs(os.path.join(points[1].workdir(root), "checkpoints", "100"))   # killed run
  with open(os.path.join(points[1].workdir(root), runs.FAILED_FILE), "w") as f:
    f.write("exit status -9")                                               # stale marker
  os.makedirs(points[2].workdir(root))
  with open(os.path.join(points[2].workdir(root), runs.FAILED_FILE), "w") as f:
    f.write("NonFiniteLossError: training loss became NaN/Inf at step 3")
  calls = []

  def runner(cmd, workdir):
    calls.append((cmd, workdir))
    assert not os.path.exists(os.path.join(workdir, runs.FAILED_FILE))
    return 0 if workdir == points[1].workdir(root) else 3

  out = io.StringIO()
  outcome = sweep.run_sweep(points, root, lambda p: sweep.local_command(p, root), runner=runner,
                            out=out)
  assert [w for _, w in calls] == [points[1].workdir(root), points[3].workdir(root)]
  assert calls[0][0][1:3] == ["train.py", "--config=configs/listops.py:luna"]
  assert outcome == {points[0].name: "skipped-finished", points[1].name: "ok",
                     points[2].name: "skipped-diverged", points[3].name: "failed (rc 3)"}
  assert f"resume {points[1].name}" in out.getvalue()
  assert f"start {points[3].name}" in out.getvalue()
  calls.clear()
  sweep.run_sweep(points[:3], root, lambda p: [p.name], runner=runner, parallel=2,
                  retry_diverged=True, out=io.StringIO())
  assert sorted(w for _, w in calls) == [points[1].workdir(root), points[2].workdir(root)]


def test_run_logged_writes_log_and_failed_marker(tmp_path, monkeypatch):
  def fake_run(cmd, cwd, stdout, stderr):
    assert cwd == sweep.REPO and stderr == subprocess.STDOUT
    stdout.write("Traceback ...\nNonFiniteLossError: training loss became NaN/Inf at step 5\n")
    return subprocess.CompletedProcess(cmd, 1)

  monkeypatch.setattr(sweep.subprocess, "run", fake_run)
  wd = str(tmp_path / "w")
  assert sweep.run_logged(["python", "train.py"], wd) == 1
  assert "$ python train.py" in open(os.path.join(wd, sweep.LOG_FILE)).read()
  assert "exit status 1" in open(os.path.join(wd, runs.FAILED_FILE)).read()
  assert runs.workdir_status(wd)[0] == "diverged"


def test_cli_reports_failures_in_exit_status(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sweep, "run_logged", lambda cmd, workdir: 2)
  assert sweep.main(["run", "configs/sweeps/quick.py", "--root", str(tmp_path),
                     "--only", "softmax"]) == 1
  assert "1 points: 0 ran, 0 skipped, 1 failed: listops/softmax_lr5e-2_s0" in (
      capsys.readouterr().out)


def test_a_point_another_process_runs_is_skipped_and_left_alone(tmp_path, monkeypatch):
  points = sweep.expand("configs/sweeps/lr_seed.py:listops,luna,lrs=1e-4,seeds=3")
  root = str(tmp_path)
  holder = subprocess.Popen(["sleep", "60"])
  try:
    busy = points[0].workdir(root)
    os.makedirs(busy)
    with open(os.path.join(busy, wd.LOCK_FILE), "w") as f:
      json.dump({"host": socket.gethostname(), "pid": holder.pid}, f)
    with open(os.path.join(busy, runs.FAILED_FILE), "w") as f:
      f.write("exit status -9")
    calls = []

    def runner(cmd, workdir):
      calls.append(workdir)
      if workdir == points[1].workdir(root):
        _finish(points[2].workdir(root))      # another sweep finishes point 2 meanwhile
      return 0

    outcome = sweep.run_sweep(points, root, lambda p: [p.name], runner=runner,
                              out=io.StringIO())
  finally:
    holder.kill()
    holder.wait()
  assert calls == [points[1].workdir(root)]
  assert outcome == {points[0].name: "skipped-running", points[1].name: "ok",
                     points[2].name: "skipped-finished"}
  assert os.path.exists(os.path.join(busy, runs.FAILED_FILE))     # not touched

  # train.py refused the folder (taken between the check and the start): no FAILED marker.
  monkeypatch.setattr(sweep.subprocess, "run",
                      lambda cmd, **kw: subprocess.CompletedProcess(cmd, wd.BUSY_EXIT_STATUS))
  other = str(tmp_path / "other")
  assert sweep.run_logged(["python", "train.py"], other) == wd.BUSY_EXIT_STATUS
  assert not os.path.exists(os.path.join(other, runs.FAILED_FILE))
  outcome = sweep.run_sweep(points[1:2], str(tmp_path / "r2"), lambda p: [p.name],
                            out=io.StringIO())
  assert outcome == {points[1].name: "skipped-running"}


def test_an_empty_root_is_refused(capsys):
  with pytest.raises(SystemExit) as e:
    sweep.main(["run", "configs/sweeps/quick.py", "--root", ""])
  assert e.value.code == 2
  assert "--root is empty (an unset shell variable?)" in capsys.readouterr().err


def test_a_rerun_with_other_extra_flags_is_refused_not_skipped(tmp_path, monkeypatch, capsys):
  point = sweep.expand("configs/sweeps/quick.py")[1]
  root = str(tmp_path)
  workdir = point.workdir(root)
  _finish(workdir)
  os.makedirs(os.path.join(workdir, wd.BEST_DIR, "7"))
  stored = resume_rules.config_dict(sweep.point_config(point, ["--config.model.dropout=0.25"]))
  with open(os.path.join(workdir, wd.CONFIG_FILE), "w") as f:
    json.dump(stored, f)
  monkeypatch.setattr(sweep, "run_logged", lambda cmd, w: pytest.fail(f"ran {cmd}"))
  args = ["run", "configs/sweeps/quick.py", "--root", root, "--only", "softmax"]
  assert sweep.main(args + ["--config.model.dropout=0.25", "--config.eval_every=7"]) == 0
  assert f"# skip (finished): {workdir}" in capsys.readouterr().out   # bookkeeping only
  assert sweep.main(args) == 1
  out = capsys.readouterr().out
  assert (f"# refuse: {workdir} holds a run of another config (config.model.dropout: 0.25 -> "
          f"{point_config_value(point)}); rerun with its flags or use another --root") in out
  assert "1 points: 0 ran, 0 skipped, 1 failed: listops/softmax_lr5e-2_s0" in out


def point_config_value(point):
  return repr(sweep.point_config(point).model.dropout)


@pytest.mark.parametrize("body,message", [
    ("def get_sweep(arg=None):\n  return [{'config': 'configs/listops.py'\n",
     r"bad.py:\d+: syntax error: "),
    ("def get_sweep(arg=None):\n  return [{'config': 'configs/listops.py', "
     "'model.dropuot': 0.1}]\n", "sweep sets unknown config field 'model.dropuot'"),
    ("def get_sweep(arg=None):\n  return [{'config': 'configs/listops.py', "
     "'model.dropout': d} for d in (0.1, 0.2)]\n", "two sweep points share the workdir"),
    ("POINTS = []\n", r"bad.py has no get_sweep\(arg\) function"),
    ("def get_sweep(arg=None):\n  return {'config': 'configs/listops.py'}\n",
     "get_sweep returned a dict, expected a list of dicts"),
    ("def get_sweep(arg=None):\n  return ['configs/listops.py']\n",
     "sweep point 'configs/listops.py' is not a dict with a 'config'"),
    ("def get_sweep(arg=None):\n  return [{'config': 'configs/listops.py', "
     "'model.dropout': 'high'}]\n", r"sweep point .*: "),
])
def test_malformed_sweep_files_are_one_line(tmp_path, capsys, body, message):
  (tmp_path / "bad.py").write_text(body)
  with pytest.raises(SystemExit) as e:
    sweep.main(["run", str(tmp_path / "bad.py"), "--root", str(tmp_path / "runs")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("python -m luna_jax.experiments.sweep: error: SweepError: ")
  assert re.search(message, err), err


def test_a_bad_extra_flag_or_a_damaged_point_folder_is_one_line(tmp_path, capsys):
  args = ["run", "configs/sweeps/quick.py", "--root", str(tmp_path), "--only", "softmax"]
  with pytest.raises(SystemExit) as e:
    sweep.main(args + ["--config.nonexistent=1"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1, err
  assert "SweepError: --config.nonexistent=1: ValueError: config argument sets unknown field" in err
  workdir = sweep.expand("configs/sweeps/quick.py")[1].workdir(str(tmp_path))
  os.makedirs(workdir)
  with open(os.path.join(workdir, wd.METRICS_FILE), "w") as f:
    f.write("garbage\n")
  with pytest.raises(SystemExit):
    sweep.main(args)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"DamagedFileError: {workdir}/{wd.METRICS_FILE}:1" in err, err


def test_two_sweeps_on_one_root_train_each_point_once(tmp_path):
  from tests.luna_jax.test_trainer_scale import TINY  # pylint: disable=g-import-not-at-top
  flags = {**TINY, "num_train_steps": 30, "eval_every": 10, "checkpoint_every": 10}
  spec = tmp_path / "two.py"
  spec.write_text(f"def get_sweep(arg=None):\n  return [dict({{'config': 'configs/listops.py', "
                  f"'arg': 'softmax,quick', 'name': 'p%d' % i}}, **{flags!r}) for i in range(3)]\n")
  root = tmp_path / "runs"
  cmd = [sys.executable, "-m", "luna_jax.experiments.sweep", "run", str(spec), "--root",
         str(root), "--parallel", "2"]
  sweeps = [subprocess.Popen(cmd, cwd=sweep.REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in sweeps]
  assert [p.returncode for p in sweeps] == [0, 0], outs
  for point in sweep.expand(str(spec)):
    workdir = point.workdir(str(root))
    recs = wd.read_metrics(workdir)
    train = [r["step"] for r in recs if "train_loss" in r]
    assert train == list(range(1, 31)), (workdir, outs)                # trained once
    assert sum(r["step"] == 0 for r in recs) == 1
    assert os.path.exists(wd.path(workdir, wd.RESULTS_FILE))
    assert not os.path.exists(wd.path(workdir, wd.LOCK_FILE))
