"""Attention-map inspection: Luna pack/unpack/effective maps, softmax and linear N x N maps,
padding, the size limit, checkpoint loading, and that the training path computes none of it."""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from luna_jax.analysis import attention_maps as ia
from luna_jax import models, steps, trainer
from luna_jax.analysis import plotting
from luna_jax.attention import get_attention

N = 13          # distinct from every other dimension, so [N, N] arrays are recognisable
LENGTHS = (13, 9, 3)   # example 2 is shorter than proj_len: dynamic projection masks slots

LUNA = models.ModelConfig(vocab_size=20, num_classes=5, max_len=N, proj_len=4, num_layers=2,
                          emb_dim=16, num_heads=2, mlp_dim=24, classifier_dim=8,
                          dropout=0.1, attention_dropout=0.1)
SOFTMAX = dataclasses.replace(LUNA, attention="softmax", block="pre_ln")


def _tokens(lengths=LENGTHS, n=N, seed=0) -> np.ndarray:
  t = np.asarray(jax.random.randint(jax.random.key(seed), (len(lengths), n), 1, 20))
  return np.where(np.arange(n)[None] < np.array(lengths)[:, None], t, 0).astype(np.int32)


def _params(cfg: models.ModelConfig, tokens: np.ndarray):
  return models.Classifier(cfg).init(jax.random.key(1), jnp.asarray(tokens))["params"]


def _assert_rows_sum_to_one(a, where=None, atol=1e-5):
  s = a.sum(axis=-1)
  if where is not None:
    s = s[np.broadcast_to(where, s.shape)]
  np.testing.assert_allclose(s, 1.0, atol=atol)


# ----------------------------------------------------------------------------- Luna

@pytest.mark.parametrize("tied", [False, True])
def test_luna_maps_are_stochastic_and_masked(tied):
  cfg = dataclasses.replace(LUNA, tie_layer_weights=tied)
  tokens = _tokens()
  layers = ia.attention_maps(cfg, _params(cfg, tokens), tokens)
  assert [l.layer for l in layers] == [0, 1]
  assert [l.name for l in layers] == (
      ["encoder/layer/self_attn[0]", "encoder/layer/self_attn[1]"] if tied else
      ["encoder/layers_0/self_attn", "encoder/layers_1/self_attn"])
  mask = tokens != 0
  p_mask = np.arange(4)[None] < np.array(LENGTHS)[:, None]
  for l in layers:
    b, h, n, lp = 3, 2, N, 4
    assert l.pack_BxHxLxN.shape == (b, h, lp, n) and l.pack_BxHxLxN.dtype == np.float32
    assert l.unpack_BxHxNxL.shape == (b, h, n, lp)
    assert l.effective_BxNxN.shape == (b, n, n)
    np.testing.assert_array_equal(l.mask_BxN, mask)
    np.testing.assert_array_equal(l.p_mask_BxL, p_mask)
    # Pack rows: a distribution over the real tokens; padded tokens get exactly 0.
    _assert_rows_sum_to_one(l.pack_BxHxLxN)
    assert np.all(np.where(mask[:, None, None, :], 0.0, l.pack_BxHxLxN) == 0)
    # Unpack rows: a distribution over the live P slots; masked slots get 0.
    _assert_rows_sum_to_one(l.unpack_BxHxNxL)
    assert np.all(np.moveaxis(l.unpack_BxHxNxL, -1, 1)[~p_mask] == 0)
    # Effective map: exactly the product it claims, rows sum to 1, pad columns 0.
    expected = np.einsum("bnl,blm->bnm", l.unpack_BxHxNxL.mean(1), l.pack_BxHxLxN.mean(1))
    np.testing.assert_allclose(l.effective_BxNxN, expected, rtol=1e-5, atol=1e-7)
    _assert_rows_sum_to_one(l.effective_BxNxN)
    assert np.all(np.moveaxis(l.effective_BxNxN, -1, 1)[~mask] == 0)
    assert l.token_map_BxNxN is l.effective_BxNxN
  # Untied layers must differ (different parameters and inputs).
  assert not np.allclose(layers[0].pack_BxHxLxN, layers[1].pack_BxHxLxN)


def test_effective_map_function_is_head_mean_product():
  rng = np.random.default_rng(0)
  u = rng.dirichlet(np.ones(3), size=(2, 4, 5))           # [B, H, N, l]
  p = rng.dirichlet(np.ones(5), size=(2, 2, 3))           # [B, Hp, l, N]: Hp != H
  eff = ia.effective_map(u, p)
  np.testing.assert_allclose(eff, u.mean(1) @ p.mean(1), rtol=1e-6)
  _assert_rows_sum_to_one(eff)


def test_luna_long_input_keeps_pack_maps_but_no_effective_map():
  tokens = _tokens()
  layers = ia.attention_maps(LUNA, _params(LUNA, tokens), tokens, max_dense_len=N - 1)
  assert layers[0].effective_BxNxN is None and layers[0].pack_BxHxLxN is not None


def test_patch_model_maps_are_over_patches_with_their_mask():
  # 8x8 images in 2x2 patches: 16 tokens; the mask is over the tokens, not the 64 pixels.
  cfg = dataclasses.replace(LUNA, embedding="patches", patch_size=2, pad_id=None, max_len=64)
  pixels = np.asarray(jax.random.randint(jax.random.key(0), (2, 64), 0, 256), np.int32)
  layers = ia.attention_maps(cfg, _params(cfg, pixels), pixels)
  assert layers[0].pack_BxHxLxN.shape[-1] == 16 and layers[0].effective_BxNxN.shape[-2:] == (16, 16)
  assert layers[0].mask_BxN.shape == (2, 16) and layers[0].mask_BxN.all()
  assert layers[0].p_mask_BxL is None


def test_training_config_and_task_accepted():
  from configs import listops as listops_config   # pylint: disable=g-import-not-at-top
  from lra_tasks.common import TaskData          # pylint: disable=g-import-not-at-top
  c = listops_config.get_config("luna,quick")
  c.model.update(emb_dim=16, mlp_dim=16, num_heads=2, classifier_dim=8, proj_len=4,
                 num_layers=1)
  c.seq_len = N
  task = TaskData(name="listops", splits={}, vocab_size=20, num_classes=10, seq_len=N)
  tokens = _tokens()
  from luna_jax import steps  # pylint: disable=g-import-not-at-top
  params = _params(steps.model_config(c, task), tokens)
  layers = ia.attention_maps(c, params, tokens, task=task)
  assert len(layers) == 1 and layers[0].pack_BxHxLxN.shape == (3, 2, 4, N)
  with pytest.raises(ValueError, match="needs task="):
    ia.attention_maps(c, params, tokens)


# ----------------------------------------------------------------------------- softmax

class _Recorder:
  """Records the (x, mask) each `self_attn` module is called with, and optionally its
  `features(x, mask)` computed in place (same module path, so the same random features)."""

  def __init__(self, features: bool = False):
    self.calls = []
    self.features = []
    self._want_features = features

  def __call__(self, next_fun, args, kwargs, context):
    if context.module.name == "self_attn" and context.method_name == "__call__":
      self.calls.append((np.asarray(args[0]), None if args[1] is None else np.asarray(args[1])))
      if self._want_features:
        self.features.append(context.module.features(args[0], args[1]))
    return next_fun(*args, **kwargs)


def _attention_inputs(cfg, params, tokens, features=False):
  rec = _Recorder(features)
  with nn.intercept_methods(rec):
    models.Classifier(cfg).apply({"params": params}, jnp.asarray(tokens))
  return (rec.calls, rec.features) if features else rec.calls


def _maps(cfg, params, tokens):
  """Every mechanism sows its map when inspected: a MapNotSownError fails the test."""
  return ia.attention_maps(cfg, params, tokens)


def _explicit_softmax(x_BxNxD, p, mask_BxN, h):
  b, n, d = x_BxNxD.shape
  dh = d // h
  q = (x_BxNxD @ np.asarray(p["query"]["kernel"])).reshape(b, n, h, dh)
  k = (x_BxNxD @ np.asarray(p["key"]["kernel"])).reshape(b, n, h, dh)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
  s = np.where(mask_BxN[:, None, None, :], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def _check_softmax_layers(cfg, params, tokens, layers):
  calls = _attention_inputs(cfg, params, tokens)
  assert len(layers) == len(calls) == 2
  assert [l.name for l in layers] == ["encoder/layers_0/self_attn", "encoder/layers_1/self_attn"]
  mask = tokens != 0
  for l, (x_BxNxD, m) in zip(layers, calls):
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_array_equal(l.mask_BxN, mask)
    assert l.p_mask_BxL is None and l.pack_BxHxLxN is None and l.effective_BxNxN is None
    w = _explicit_softmax(x_BxNxD, params["encoder"][f"layers_{l.layer}"]["self_attn"], mask,
                          cfg.num_heads)
    assert l.attn_BxHxNxN.shape == (3, cfg.num_heads, N, N)
    np.testing.assert_allclose(l.attn_BxHxNxN, w, rtol=1e-4, atol=1e-6)
    _assert_rows_sum_to_one(l.attn_BxHxNxN)
    assert np.all(np.moveaxis(l.attn_BxHxNxN, -1, 1)[~mask] == 0)
    np.testing.assert_allclose(l.token_map_BxNxN, w.mean(1), rtol=1e-4, atol=1e-6)


def test_softmax_map_matches_explicit_computation():
  tokens = _tokens()
  params = _params(SOFTMAX, tokens)
  _check_softmax_layers(SOFTMAX, params, tokens, _maps(SOFTMAX, params, tokens))


class _SowingSoftmax(nn.Module):
  """Test double of the "attn_weights" contract: plain softmax attention that sows its map."""
  num_heads: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  qkv_dim: int = 0
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, p_BxLxD=None, p_mask_BxL=None, *,
               deterministic=True):
    del p_BxLxD, p_mask_BxL, deterministic
    b, n, d = x_BxNxD.shape
    dh = d // self.num_heads
    q, k, v = (nn.Dense(d, use_bias=False, name=name)(x_BxNxD).reshape(b, n, self.num_heads, dh)
               for name in ("query", "key", "value"))
    s_BxHxNxN = jnp.einsum("bqhd,bkhd->bhqk", q, k) * dh**-0.5
    if mask_BxN is not None:
      s_BxHxNxN = jnp.where(mask_BxN[:, None, None, :], s_BxHxNxN, jnp.finfo(jnp.float32).min)
    w_BxHxNxN = jax.nn.softmax(s_BxHxNxN, axis=-1)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", ia.ATTN_KEY, w_BxHxNxN)
    o = jnp.einsum("bhqk,bkhd->bqhd", w_BxHxNxN, v).reshape(b, n, d)
    return nn.Dense(d, use_bias=False, name="out")(o), None


def test_attn_weights_contract_with_a_sowing_module(monkeypatch):
  """The non-Luna path, independent of whether softmax.py sows yet."""
  monkeypatch.setattr(models, "get_attention", lambda name: _SowingSoftmax)
  cfg = dataclasses.replace(SOFTMAX, mlp_dim=20)   # its own jit cache entry
  tokens = _tokens()
  params = _params(cfg, tokens)
  _check_softmax_layers(cfg, params, tokens, ia.attention_maps(cfg, params, tokens))


def test_size_limit_raises_before_running():
  tokens = _tokens()
  with pytest.raises(ValueError, match=r"N=13 tokens is above max_dense_len=12"):
    ia.attention_maps(SOFTMAX, _params(SOFTMAX, tokens), tokens, max_dense_len=12)


# ----------------------------------------------------------------------------- linear family

def _reference_kernel_map(name, module, feats, mask):
  phi_q, phi_k = np.asarray(feats[0], np.float64), np.asarray(feats[1], np.float64)
  if name == "cheap_linear":
    return ia.kernel_attention_map(phi_q, phi_k, mask, mode="none",
                                   count_normalise=module._normalization() == "length")
  if name == "performer" and module.kernel == "softmax":
    # Key features in the log domain: exponentiate with the module's stabiliser (max over
    # features and real keys, per example and head); it cancels in the ratio.
    shift = np.where(mask[:, :, None], phi_k.max(-1), -np.inf).max(1)   # [B, H]
    phi_k = np.exp(phi_k - shift[:, None, :, None])
  mode = "floor" if name == "cosformer" else "eps"
  return ia.kernel_attention_map(phi_q, phi_k, mask, mode=mode, eps=module.eps)


@pytest.mark.parametrize("name", ia.LINEAR_MECHANISMS)
def test_linear_kernel_map(name):
  cfg = dataclasses.replace(SOFTMAX, attention=name)
  tokens = _tokens()
  params = _params(cfg, tokens)
  layers = _maps(cfg, params, tokens)
  _, features = _attention_inputs(cfg, params, tokens, features=True)
  assert len(layers) == len(features) == 2
  mask = tokens != 0
  module = get_attention(name)(num_heads=cfg.num_heads, **dict(cfg.attention_kwargs))
  for l, feats in zip(layers, features):
    ref = _reference_kernel_map(name, module, feats, mask)
    assert l.attn_BxHxNxN.shape == (3, cfg.num_heads, N, N)
    # Padded query rows are ignored downstream (and ill-conditioned for cosformer): compare
    # the rows of real queries.
    real_q = np.broadcast_to(mask[:, None, :], (3, cfg.num_heads, N))
    np.testing.assert_allclose(l.attn_BxHxNxN[real_q], ref[real_q], rtol=2e-4, atol=1e-6)
    assert np.all(np.moveaxis(l.attn_BxHxNxN, -1, 1)[~mask] == 0)
    if name != "cheap_linear":
      # A real query's row is a distribution over the real keys, or all zero when its
      # features are all zero (possible with ReLU features: cosformer, learned_kernel).
      sums = l.attn_BxHxNxN.sum(-1)[real_q]
      assert np.all(np.isclose(sums, 1.0, atol=1e-4) | (sums == 0.0)), sums


def test_kernel_attention_map_reference():
  rng = np.random.default_rng(0)
  q, k = rng.random((1, 5, 2, 3)), rng.random((1, 5, 2, 3))
  mask = np.array([[True, True, True, False, False]])
  a = ia.kernel_attention_map(q, k, mask, eps=0.0)
  _assert_rows_sum_to_one(a)
  assert np.all(a[..., 3:] == 0)
  c = ia.kernel_attention_map(q, k, mask, causal=True, eps=0.0)
  assert np.all(np.triu(c[0, 0], 1) == 0)
  _assert_rows_sum_to_one(c)
  raw = ia.kernel_attention_map(q, k, mask, mode="none", count_normalise=True)
  np.testing.assert_allclose(raw * 3, np.einsum("bihf,bjhf->bhij", q, k) * mask[:, None, None])


# ----------------------------------------------------------------------------- training path

def _walk_avals(jaxpr):
  """Every output aval of every equation, recursing into sub-jaxprs (pjit, remat, scan...)."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _walk_avals(inner)


@pytest.mark.parametrize("name", ("luna", "softmax") + ia.LINEAR_MECHANISMS)
def test_training_path_computes_and_keeps_no_maps(name):
  cfg = LUNA if name == "luna" else dataclasses.replace(SOFTMAX, attention=name)
  tokens = jnp.asarray(_tokens())
  model = models.Classifier(cfg)
  # Shapes only (no compilation): init keeps no intermediates, apply returns a plain array.
  variables = jax.eval_shape(model.init, jax.random.key(1), tokens)
  assert set(variables) == {"params"}
  params = variables["params"]
  rngs = {"dropout": jax.random.key(2)}

  def loss(params):   # the train step's forward pass
    logits = model.apply({"params": params}, tokens, deterministic=False, rngs=rngs)
    return jnp.mean(logits**2)

  def with_maps(params):
    return model.apply({"params": params}, tokens, deterministic=False, rngs=rngs,
                       mutable=["intermediates"])

  out = jax.eval_shape(lambda p: model.apply({"params": p}, tokens, deterministic=False,
                                             rngs=rngs), params)
  assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (3, 5)
  closed = jax.make_jaxpr(loss)(params)
  assert len(closed.jaxpr.outvars) == 1
  # Nothing of shape [..., N, N] anywhere in the training computation (softmax needs one:
  # that checks the walker itself).
  nxn = [a.shape for a in _walk_avals(closed.jaxpr) if getattr(a, "shape", ())[-2:] == (N, N)]
  assert bool(nxn) == (name == "softmax"), f"{name}: training path builds {nxn}"
  # With intermediates mutable the sown maps are the only extra outputs.
  logits, state = jax.eval_shape(with_maps, params)
  assert logits.shape == (3, 5)
  num_maps = len(jax.tree.leaves(state))
  if name == "luna":
    assert num_maps == 2 * cfg.num_layers          # pack and unpack per layer
  assert len(jax.make_jaxpr(with_maps)(params).jaxpr.outvars) == 1 + num_maps


# ----------------------------------------------------------------------------- checkpoints

def test_load_params_best_and_latest(tmp_path):
  """Checkpoints laid out as trainer.train_and_evaluate writes them, here with replicated
  jax.Array leaves saved from 8 devices (the trainer itself now saves host copies)."""
  tokens = _tokens()
  params = _params(LUNA, tokens)
  repl = jax.sharding.NamedSharding(steps.data_mesh(), jax.sharding.PartitionSpec())
  params = jax.device_put(params, repl)
  best_params = jax.tree.map(lambda a: a + 1.0, params)
  (tmp_path / "config.json").write_text(json.dumps({"task": "listops", "model": {"x": 1}}))
  with ocp.CheckpointManager(str(tmp_path / "checkpoints")) as mngr:
    mngr.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": jnp.asarray(3), "params": params,
                                     "opt_state": {"mu": params}}),
        data_iter=ocp.args.JsonSave({"pos": 3})))
    mngr.wait_until_finished()
  with ocp.CheckpointManager(str(tmp_path / "best")) as mngr:
    mngr.save(2, args=ocp.args.StandardSave(best_params))
    mngr.wait_until_finished()

  config, got, step = ia.load_params(str(tmp_path))
  assert isinstance(config, ml_collections.ConfigDict) and config.model.x == 1
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(best_params))
  assert jax.tree.leaves(got)[0].sharding.is_fully_replicated
  assert len(jax.tree.leaves(got)[0].sharding.device_set) == 1
  _, got, step = ia.load_params(os.path.relpath(tmp_path), which="latest")   # relative works
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(params))
  # The restored params run.
  assert ia.attention_maps(LUNA, got, tokens)[0].pack_BxHxLxN.shape == (3, 2, 4, N)
  with pytest.raises(FileNotFoundError, match="config.json"):
    ia.load_params(str(tmp_path / "nothing"))
  os.makedirs(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no auto checkpoint"):
    ia.load_params(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- plotting

def test_block_average():
  a = np.arange(16, dtype=float).reshape(4, 4)
  np.testing.assert_allclose(plotting.block_average(a, 2), [[2.5, 4.5], [10.5, 12.5]])
  np.testing.assert_array_equal(plotting.block_average(a, 8), a)
  b = plotting.block_average(np.ones((2, 5, 7)), 3)           # uneven blocks, batch axis kept
  assert b.shape == (2, 3, 3) and np.allclose(b, 1.0)
  m = np.array([[1.0, np.nan, 3.0, np.nan]])
  np.testing.assert_allclose(plotting.block_average(m, 2), [[1.0, 3.0]])
  assert np.isnan(plotting.block_average(np.array([np.nan, np.nan, 1.0]), 2)[0])
  with pytest.raises(ValueError):
    plotting.block_average(a, 0)


def test_plots_mask_pads_and_save_png(tmp_path):
  tokens = _tokens()
  l = ia.attention_maps(LUNA, _params(LUNA, tokens), tokens)[0]
  mask = l.mask_BxN[1]
  masked = plotting.mask_map(l.effective_BxNxN[1], mask, mask)
  assert np.isnan(masked[~mask]).all() and np.isnan(masked[:, ~mask]).all()
  assert np.isfinite(masked[np.ix_(mask, mask)]).all()
  labels = plotting.listops_labels([16, 1, 6, 5, 0])
  assert labels == ["<cls>", "[MIN", "0", "]", "<pad>"]
  fig = plotting.heatmaps(l.pack_BxHxLxN[1], col_mask=mask, row_mask=l.p_mask_BxL[1],
                          col_labels=plotting.listops_labels(np.minimum(tokens[1], 16)))
  path = plotting.save_figure(fig, str(tmp_path / "sub" / "pack.png"))
  fig2 = plotting.image_grid(np.random.default_rng(0).random((3, 17)), 4, offset=1,
                             image=np.zeros((4, 4)), marks=[(0, 0), None, (3, 3)])
  path2 = plotting.save_figure(fig2, str(tmp_path / "grid.png"))
  for p in (path, path2):
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="positions"):
    plotting.image_grid(np.zeros((1, 10)), 4)
