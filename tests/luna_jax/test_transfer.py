"""Post-hoc conversion at the parameter level: what is copied, initialised and dropped."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import listops as listops_config
from luna_jax import models, transfer

CFG = models.ModelConfig(vocab_size=16, num_classes=10, max_len=32, attention="softmax",
                         num_layers=2, emb_dim=16, num_heads=2, mlp_dim=32, classifier_dim=24,
                         block="pre_ln", readout="mean_padded", qkv_bias=True,
                         classifier_bias=True)
TOKENS = jnp.ones((2, 32), jnp.int32)


def init(cfg, seed=0):
  return models.Classifier(cfg).init({"params": jax.random.key(seed),
                                      "features": jax.random.key(1)}, TOKENS)["params"]


def flat(p):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(p).items()}


def with_attention(name, **kw):
  return dataclasses.replace(CFG, attention=name, attention_kwargs=tuple(sorted(kw.items())))


def test_softmax_to_softmax_copies_everything_bitwise():
  src = init(CFG, 0)
  params, report = transfer.transfer(src, init(CFG, 1))
  assert not report.initialised and not report.dropped and len(report.copied) == len(flat(src))
  for k, v in flat(params).items():
    np.testing.assert_array_equal(v, flat(src)[k])


@pytest.mark.parametrize("target,kw,new", [
    ("learned_kernel", {"num_features": 4, "hidden": 8},
     {"feature_proj", "feature_bias", "psi_w1", "psi_b1", "psi_w2", "psi_b2"}),
    ("cheap_linear", {"gated": True}, {"gate/kernel", "gate/bias"}),
    ("linear_elu", {}, set()),
    ("performer", {"num_features": 8}, set()),
    ("cosformer", {}, set()),
])
def test_kernel_targets_add_only_their_own_parameters(target, kw, new):
  src = init(CFG, 0)
  tgt_init = init(with_attention(target, **kw), 1)
  params, report = transfer.transfer(src, tgt_init)
  initialised = {p.split("self_attn/", 1)[1] for p in report.initialised}
  assert initialised == new and all("self_attn" in p for p in report.initialised)
  assert not report.dropped
  src_flat, out = flat(src), flat(params)
  for p in report.copied:
    np.testing.assert_array_equal(out[p], src_flat[p])          # bitwise
  for p in report.initialised:
    np.testing.assert_array_equal(out[p], flat(tgt_init)[p])     # left as initialised
  assert "initialised" in report.summary() and "copied" in report.summary()


def test_luna_target_maps_projections_and_adds_p():
  src = init(CFG, 0)
  luna_cfg = dataclasses.replace(CFG, attention="luna", proj_len=4, block="post_ln")
  params, report = transfer.transfer(src, init(luna_cfg, 1), target_is_luna=True)
  out, s = flat(params), flat(src)
  for tgt, name in (("q_proj", "query"), ("pk_proj", "key"), ("pv_proj", "value"),
                    ("out_proj", "out")):
    np.testing.assert_array_equal(out[f"encoder/layers_1/self_attn/{tgt}/kernel"],
                                  s[f"encoder/layers_1/self_attn/{name}/kernel"])
  fresh = {p.split("/")[-2] for p in report.initialised}
  assert {"pq_proj", "k_proj", "v_proj", "atten_proj_layer_norm"} <= fresh
  assert "encoder/projected_embeddings" in report.initialised
  assert "encoder/final_layer_norm/scale" in report.dropped   # pre-LN's last LN: no place in Luna


def test_incompatible_sources_fail_naming_the_field():
  src = listops_config.get_config("softmax,small")
  tgt = listops_config.get_config("learned_kernel,small")
  transfer.check_compatible(src, tgt)                          # same sizes: fine
  wide = listops_config.get_config("learned_kernel,small")
  wide.model.emb_dim = 128
  with pytest.raises(transfer.IncompatibleSourceError, match="model.emb_dim: source 64, target 128"):
    transfer.check_compatible(src, wide, "runs/src")
  other = listops_config.get_config("learned_kernel,quick")
  with pytest.raises(transfer.IncompatibleSourceError, match="seq_len"):
    transfer.check_compatible(src, other)
