"""The trainer at scale: 1 vs 8 devices, two processes, kill-and-resume, SIGTERM, NaN guard."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from luna_jax import metrics as metrics_lib
from luna_jax import runtime, steps, trainer
from tests import conftest
from tests.conftest import REPO
from tests.luna_jax.test_trainer import tiny_config

TINY = {"seq_len": 48, "batch_size": 8, "warmup_steps": 1, "log_every": 1,
        "listops.num_train": 64, "listops.num_val": 16, "listops.num_test": 16,
        "listops.min_length": 5, "listops.max_length": 40, "listops.max_depth": 3,
        "listops.max_args": 4, "model.emb_dim": 16, "model.mlp_dim": 32, "model.num_heads": 2,
        "model.classifier_dim": 16, "model.proj_len": 4, "model.num_layers": 1,
        "model.dropout": 0.1, "model.attention_dropout": 0.1}


def _cmd(workdir, steps, every, extra=()):
  flags = {**TINY, "num_train_steps": steps, "eval_every": every, "checkpoint_every": every}
  return ([sys.executable, "train.py", "--config=configs/listops.py:quick",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()] + list(extra))


def _env(devices, cache):
  env = dict(os.environ)
  env["XLA_FLAGS"] = conftest.xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["LUNA_JAX_CACHE"] = str(cache)
  return env


def _train_losses(workdir):
  return [r["train_loss"] for r in metrics_lib.read_metrics(str(workdir)) if "train_loss" in r]


def _final_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored.state["params"]


def _tiny_in_process(steps, every):
  c = tiny_config(steps=steps)
  c.model.dropout = c.model.attention_dropout = 0.1
  c.eval_every = c.checkpoint_every = every
  return c


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 6-step run on 8 devices, in process."""
  workdir = tmp_path_factory.mktemp("ref")
  trainer.train_and_evaluate(_tiny_in_process(6, 2), str(workdir))
  return workdir


def test_one_device_matches_eight(reference_run, tmp_path):
  cache = os.environ["LUNA_JAX_CACHE"]
  r = subprocess.run(_cmd(tmp_path / "one", 6, 2), cwd=REPO, env=_env(1, cache),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "on 1 device(s)" in r.stdout
  one, eight = _train_losses(tmp_path / "one"), _train_losses(reference_run)
  assert len(one) == len(eight) == 6
  # Same data, same randomness; only the reduction order differs across devices.
  np.testing.assert_allclose(one, eight, rtol=1e-4, atol=1e-5)


def test_sigkill_then_resume_equals_uninterrupted(reference_run, tmp_path):
  cache = os.environ["LUNA_JAX_CACHE"]
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(workdir, 6, 2), cwd=REPO, env=_env(8, cache),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in (ckpt.iterdir() if ckpt.exists() else []) if d.name.isdigit()]
    if any(int(d.name) >= 2 and (d / "_CHECKPOINT_METADATA").exists() for d in done):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_before = [int(d.name) for d in ckpt.iterdir() if d.name.isdigit()]
  assert steps_before and max(steps_before) < 6, "the run finished before it could be killed"
  # A leftover temporary folder from a crashed save must be ignored.
  (ckpt / "8.orbax-checkpoint-tmp-1234").mkdir()
  r = subprocess.run(_cmd(workdir, 6, 2), cwd=REPO, env=_env(8, cache), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stdout
  ref, res = _final_params(reference_run, 6), _final_params(workdir, 6)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(res)):
    np.testing.assert_array_equal(a, b)                      # bitwise on CPU
  assert _train_losses(workdir) == _train_losses(reference_run)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  cache = os.environ["LUNA_JAX_CACHE"]
  workdir = tmp_path / "term"
  proc = subprocess.Popen(_cmd(workdir, 100000, 100000), cwd=REPO, env=_env(8, cache),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith("step 3/"):
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0
  assert "received SIGTERM" in out
  saved = [int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()]
  assert saved and max(saved) >= 3
  assert not (workdir / "results.json").exists()              # unfinished: no final results


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_agree_with_one_process(reference_run, tmp_path):
  cache = os.environ["LUNA_JAX_CACHE"]
  port = _free_port()
  workdir = tmp_path / "mp"
  procs = [subprocess.Popen(
      _cmd(workdir, 6, 2, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                           f"--process_id={i}"]),
      cwd=REPO, env=_env(4, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  assert "on 8 device(s), 2 process(es)" in outs[0][0]
  np.testing.assert_allclose(_train_losses(workdir), _train_losses(reference_run), rtol=1e-4,
                             atol=1e-5)
  with open(workdir / "results.json") as f:
    res = json.load(f)
  assert res["finished"] and res["step"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  c = _tiny_in_process(4, 2)
  trainer.train_and_evaluate(c, str(tmp_path))                 # good run to step 4
  good = _final_params(str(tmp_path), 4)
  c.num_train_steps = 8
  c.allow_resume_changes = True                                # a longer schedule
  monkeypatch.setattr(steps, "cross_entropy", lambda logits, t: jnp.full(t.shape, jnp.nan))
  with pytest.raises(trainer.NonFiniteLossError, match="NaN/Inf at step 5"):
    trainer.train_and_evaluate(c, str(tmp_path))
  saved = [int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit()]
  assert max(saved) == 4
  assert "NonFiniteLossError" in (tmp_path / "FAILED").read_text()
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(_final_params(str(tmp_path), 4))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("option", ["remat", "bfloat16"])
def test_precision_and_memory_options_train(tmp_path, option):
  c = _tiny_in_process(2, 2)
  c.model.dropout = c.model.attention_dropout = 0.0
  base = trainer.train_and_evaluate(c, str(tmp_path / "base"))
  if option == "remat":
    c.model.remat = True
  else:
    c.model.dtype = "bfloat16"
  res = trainer.train_and_evaluate(c, str(tmp_path / option))
  l0, l1 = _train_losses(tmp_path / "base"), _train_losses(tmp_path / option)
  assert np.isfinite(l1).all()
  tol = 1e-5 if option == "remat" else 5e-2
  np.testing.assert_allclose(l1, l0, rtol=tol, atol=tol)
  assert res["num_params"] == base["num_params"]


def test_train_py_splits_the_batch_over_the_cores_and_resumes_exactly_on_another_count(
    reference_run, tmp_path):
  cache = os.environ["LUNA_JAX_CACHE"]
  env = _env(None, cache)                  # no device count in XLA_FLAGS: train.py chooses
  env.pop(runtime.DEVICES_ENV, None)
  fresh = subprocess.run(_cmd(tmp_path / "fresh", 2, 2), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  cores = os.cpu_count() or 1
  n = cores if 8 % cores == 0 else 1       # TINY's batch is 8
  assert f"on {n} device(s)" in fresh.stdout
  machine = json.loads((tmp_path / "fresh" / "results.json").read_text())["machine"]
  assert machine["num_devices"] == n
  assert machine["cpu_devices"] == (f"{n} host devices (one per core)" if n > 1 else
                                    f"one device: batch 8 does not divide by {cores}")
  # The 8-device reference run, resumed from its step-4 checkpoint on 4 devices: the same steps.
  workdir = tmp_path / "resumed"
  shutil.copytree(reference_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  r = subprocess.run(_cmd(workdir, 6, 2), cwd=REPO, env={**env, runtime.DEVICES_ENV: "4"},
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 4" in r.stdout
  res = json.loads((workdir / "results.json").read_text())
  assert res["machine"]["num_devices"] == 4
  assert res["machine"]["cpu_devices"] == "4 host devices (LUNA_JAX_CPU_DEVICES)"
  np.testing.assert_allclose(_train_losses(workdir), _train_losses(reference_run), rtol=1e-4,
                             atol=1e-5)
  bad = subprocess.run(_cmd(tmp_path / "bad", 2, 2), cwd=REPO,
                       env={**env, runtime.DEVICES_ENV: "two"}, capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode == 1 and "LUNA_JAX_CPU_DEVICES='two'" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
