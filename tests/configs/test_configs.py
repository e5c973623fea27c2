"""Every config file builds for every attention and variant; the argument language errors."""
import importlib

import pytest

from configs import common
from luna_jax import config_checks
from luna_jax.attention import ATTENTION_NAMES

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attention", ATTENTION_NAMES)
def test_every_task_and_attention_builds(task, attention):
  mod = importlib.import_module(f"configs.{task}")
  for arg in (attention, f"{attention},quick"):
    c = mod.get_config(arg)
    config_checks.validate_config(c)          # every shipped config passes the pre-compute checks
    assert c.task == task and c.model.attention == attention
    assert c.seq_len > 0 and c.batch_size > 0
    assert c.model.emb_dim % c.model.num_heads == 0
    if arg.endswith("quick"):     # quick models attend at their own width: every mechanism
      assert c.model.qkv_dim in (0, c.model.emb_dim), (task, arg)   # (Luna too) fits them


def test_luna_recipe_matches_the_paper():
  c = importlib.import_module("configs.listops").get_config("luna,l=16")
  assert (c.model.proj_len, c.model.emb_dim, c.model.mlp_dim, c.model.num_heads) == (16, 512,
                                                                                     2048, 8)
  assert c.model.tie_layer_weights and c.model.init == "bert"
  assert (c.learning_rate, c.warmup_steps, c.num_train_steps, c.batch_size) == (1e-4, 1000,
                                                                               5000, 32)
  assert (c.adam_b1, c.adam_b2, c.weight_decay) == (0.9, 0.98, 1e-4)
  p = importlib.import_module("configs.pathfinder").get_config("luna")
  assert p.model.readout == "mean" and p.batch_size == 512 and p.learning_rate == 1e-3


def test_baselines_use_the_lra_reference_block():
  c = importlib.import_module("configs.listops").get_config("softmax")
  assert c.model.block == "pre_ln" and c.model.positions == "sinusoidal"
  assert c.schedule == "rsqrt_lra" and c.model.num_layers == 4


def test_argument_language():
  c = importlib.import_module("configs.listops").get_config("luna,l=128,lr=3e-4,quick")
  assert c.model.proj_len == 128 and c.learning_rate == 3e-4 and c.seq_len == 128
  with pytest.raises(ValueError, match="unknown variant"):
    common.parse_arg("luna,fast")
  with pytest.raises(ValueError, match="several attentions"):
    common.parse_arg("luna,softmax")
  with pytest.raises(ValueError, match="unknown field"):
    importlib.import_module("configs.listops").get_config("model.nope=1")


def test_patch_embedding_needs_a_patch_size():
  c = importlib.import_module("configs.pathfinder").get_config("luna")
  c.model.embedding = "patches"
  with pytest.raises(ValueError, match="patch_size >= 1"):
    config_checks.validate_config(c)
  c.model.patch_size = 4
  config_checks.validate_config(c)
