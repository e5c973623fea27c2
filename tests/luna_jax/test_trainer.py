"""train_and_evaluate end to end on tiny generated ListOps (8 fake CPU devices)."""
import json
import os
import shutil

import jax
import pytest

from configs import listops as listops_config
from luna_jax import metrics as metrics_lib
from luna_jax import optim, steps, trainer
import lra_tasks


def tiny_config(attention: str = "luna", steps: int = 2):
  c = listops_config.get_config(f"{attention},quick")
  c.seq_len = 48
  c.listops.update(num_train=64, num_val=16, num_test=16, min_length=5, max_length=40,
                   max_depth=3, max_args=4)
  c.batch_size = 8
  c.num_train_steps = steps
  c.eval_every = steps
  c.log_every = 1
  c.checkpoint_every = steps
  c.warmup_steps = 1
  m = c.model
  m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim, m.proj_len, m.num_layers = 16, 32, 2, 16, 4, 1
  return c


def test_two_steps_write_metrics_and_results(tmp_path):
  assert jax.device_count() == 8
  results = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  recs = metrics_lib.read_metrics(str(tmp_path))
  steps = [r["step"] for r in recs if "train_loss" in r]
  assert steps == [1, 2]
  assert any("val_accuracy" in r for r in recs)
  test = [r for r in recs if "test_accuracy" in r]
  assert len(test) == 1 and 0.0 <= test[0]["test_accuracy"] <= 1.0
  assert recs[0]["num_params"] > 0
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["test_accuracy"] == pytest.approx(results["test_accuracy"])
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  events.Reload()
  assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
  assert "val_accuracy" in events.Tags()["scalars"]
  assert (tmp_path / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("field,value,match", [
    ("model.attention", "lunar", "valid names: luna, softmax"),
    ("batch_size", 12, "not divisible by the 8 devices"),
    ("model.num_heads", 3, "config.model.num_heads=3"),
    ("model.readout", "last", "config.model.readout"),
])
def test_bad_config_fails_before_compute(tmp_path, field, value, match):
  c = tiny_config()
  node, leaf = (c.model, field.split(".")[1]) if "." in field else (c, field)
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_schedules():
  c = tiny_config()
  c.learning_rate, c.warmup_steps, c.warmup_init_lr = 1e-3, 10, 1e-7
  s = optim.learning_rate_schedule(c)
  assert float(s(0)) == pytest.approx(1e-7)
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(40)) == pytest.approx(1e-3 * 0.5)
  c.schedule = "rsqrt_lra"
  c.learning_rate = 0.05
  s = optim.learning_rate_schedule(c)
  assert float(s(10)) == pytest.approx(0.05 / 10**0.5)
  assert float(s(5)) == pytest.approx(0.5 * 0.05 / 10**0.5)


def test_evaluation_uses_the_random_features_the_parameters_were_trained_with():
  """With redraw_every == eval_every, evaluating after update `step` must use the draw of
  update step - 1 (the last training step), not a fresh draw."""
  import functools
  import jax.numpy as jnp
  from luna_jax import models
  cfg = models.ModelConfig(vocab_size=12, num_classes=3, max_len=16, attention="performer",
                           attention_kwargs=(("num_features", 4),), num_layers=1, emb_dim=8,
                           num_heads=2, mlp_dim=16, classifier_dim=8)
  model = models.Classifier(cfg)
  tokens = jnp.ones((2, 16), jnp.int32).at[:, 5:].set(3)
  params = model.init({"params": jax.random.key(0), "features": jax.random.key(1)},
                      tokens)["params"]
  key, redraw = jax.random.key(5), 10
  batch = {"inputs": tokens, "targets": jnp.zeros(2, jnp.int32), "weights": jnp.ones(2),
           "class_counts": jnp.ones((2, 3))}
  ev = functools.partial(steps.eval_step, apply_fn=model.apply, redraw_every=redraw)

  def loss_with_draw(train_step_index):
    rngs = {"features": steps.step_rngs(key, jnp.asarray(train_step_index), redraw)["features"]}
    logits = model.apply({"params": params}, tokens, rngs=rngs)
    return float(steps.cross_entropy(logits, batch["targets"]).sum())

  got = float(ev(params, batch, key, jnp.asarray(10))["loss"])     # after updates 0..9
  assert got == pytest.approx(loss_with_draw(9), rel=1e-6)
  assert loss_with_draw(9) != pytest.approx(loss_with_draw(10), rel=1e-3)   # draws differ


def test_repeated_and_resumed_runs_reuse_the_compiled_programs(tmp_path):
  """An identical config in the same process (a notebook cell run again, a resumed run) finds
  its jitted programs: the train step is compiled once for fresh and restored states."""
  c = tiny_config(steps=4)
  c.checkpoint_every = 2
  trainer.train_and_evaluate(c, str(tmp_path / "a"))
  programs = steps.programs_of(c, steps.model_config(c, lra_tasks.load_task(c)),
                                 steps.data_mesh())
  assert programs.train._cache_size() == 1      # pylint: disable=protected-access
  trainer.train_and_evaluate(c, str(tmp_path / "b"))
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")      # resume "b" from step 2
  trainer.train_and_evaluate(c, str(tmp_path / "b"))
  recs = metrics_lib.read_metrics(str(tmp_path / "b"))
  assert [r["step"] for r in recs if "train_loss" in r] == [1, 2, 3, 4]
  assert programs.train._cache_size() == 1      # pylint: disable=protected-access
  assert programs is steps.programs_of(c, steps.model_config(c, lra_tasks.load_task(c)),
                                         steps.data_mesh())



def test_one_steps_per_s_figure_in_console_metrics_and_results(tmp_path, capsys):
  """steps/s is one figure: the console's, metrics.jsonl's and results.json's agree (one log
  record: the same number; several: results.json is their timed steps over their time)."""
  c = tiny_config(steps=5)
  c.log_every = 5
  results = trainer.train_and_evaluate(c, str(tmp_path / "one"))
  out = capsys.readouterr().out
  (rec,) = [r for r in metrics_lib.read_metrics(str(tmp_path / "one")) if "train_loss" in r]
  assert rec["timed_steps"] == 4                    # the first step (compilation) is not timed
  assert results["steps_per_s"] == pytest.approx(rec["steps_per_s"])
  with open(tmp_path / "one" / "results.json") as f:
    assert json.load(f)["steps_per_s"] == pytest.approx(rec["steps_per_s"])
  shown = [line for line in out.splitlines() if "steps/s" in line]
  assert shown and all(f"{rec['steps_per_s']:.2f} steps/s" in line for line in shown)

  c.log_every = 2
  results = trainer.train_and_evaluate(c, str(tmp_path / "three"))
  recs = [r for r in metrics_lib.read_metrics(str(tmp_path / "three")) if "train_loss" in r]
  assert [r["timed_steps"] for r in recs] == [1, 2, 1]
  seconds = sum(r["timed_steps"] / r["steps_per_s"] for r in recs)
  assert results["steps_per_s"] == pytest.approx(4 / seconds)
  out = capsys.readouterr().out
  for r in recs:
    assert f"step {r['step']}/5 " in out and f"{r['steps_per_s']:.2f} steps/s" in out
