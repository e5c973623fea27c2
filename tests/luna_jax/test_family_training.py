"""Every mechanism trains on the quick ListOps config: the training loss goes down."""
import numpy as np
import pytest

from luna_jax import metrics as metrics_lib
from luna_jax import trainer
from luna_jax.attention import ATTENTION_NAMES
from tests.luna_jax.test_trainer import tiny_config


@pytest.mark.parametrize("attention", ATTENTION_NAMES)
def test_loss_decreases(attention, tmp_path):
  c = tiny_config(attention, steps=40)
  c.eval_every = c.checkpoint_every = 40
  c.learning_rate = 2e-3 if attention == "luna" else 0.05
  c.warmup_steps = 5
  c.model.dropout = c.model.attention_dropout = 0.0
  trainer.train_and_evaluate(c, str(tmp_path))
  losses = [r["train_loss"] for r in metrics_lib.read_metrics(str(tmp_path)) if "train_loss" in r]
  assert len(losses) == 40 and np.isfinite(losses).all()
  first, last = np.mean(losses[:8]), np.mean(losses[-8:])
  assert last < first - 0.05, (attention, first, last)
