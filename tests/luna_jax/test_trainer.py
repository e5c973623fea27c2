"""train_and_evaluate end to end on tiny generated ListOps (8 fake CPU devices)."""
import json
import os

import jax
import pytest

from configs import listops as listops_config
from luna_jax import metrics as metrics_lib
from luna_jax import trainer


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
    ("model.readout", "first", "config.model.readout"),
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
  s = trainer.learning_rate_schedule(c)
  assert float(s(0)) == pytest.approx(1e-7)
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(40)) == pytest.approx(1e-3 * 0.5)
  c.schedule = "rsqrt_lra"
  c.learning_rate = 0.05
  s = trainer.learning_rate_schedule(c)
  assert float(s(10)) == pytest.approx(0.05 / 10**0.5)
  assert float(s(5)) == pytest.approx(0.5 * 0.05 / 10**0.5)
