"""The Luna encoder and classifier: padding invariance, dynamic projection, tying, jit, grads."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax import models

CFG = models.ModelConfig(vocab_size=20, num_classes=5, max_len=40, proj_len=6, num_layers=2,
                         emb_dim=16, num_heads=4, mlp_dim=32, classifier_dim=24,
                         dropout=0.1, attention_dropout=0.1)


def _tokens(lengths=(40, 25), n=40, seed=0):
  t = jax.random.randint(jax.random.key(seed), (len(lengths), n), 1, CFG.vocab_size)
  return jnp.where(jnp.arange(n)[None] < jnp.array(lengths)[:, None], t, 0)


def _init(cfg=CFG, tokens=None):
  tokens = _tokens() if tokens is None else tokens
  model = models.Classifier(cfg)
  return model, model.init(jax.random.key(0), tokens)["params"], tokens


@pytest.mark.parametrize("attention", ["luna", "softmax"])
@pytest.mark.parametrize("readout", ["cls", "mean", "mean_padded"])
def test_padded_tokens_change_no_logit(readout, attention):
  block = "post_ln" if attention == "luna" else "pre_ln"
  cfg = dataclasses.replace(CFG, readout=readout, attention=attention, block=block, max_len=48)
  model, params, tokens = _init(cfg)
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens)
  # More padding at the end (a longer buffer, 8 more pads) changes no logit, except for the
  # Nystromformer readout, which divides by the padded length N by definition.
  longer = jnp.pad(tokens, ((0, 0), (0, 8)))
  assert longer.shape[1] == tokens.shape[1] + 8
  want = logits if readout != "mean_padded" else None
  if want is not None:
    np.testing.assert_allclose(apply({"params": params}, longer), want, atol=1e-5)
  # Whatever sits at padded positions is ignored: perturb the pad embedding (row 0), which
  # only padded positions read.
  p2 = jax.tree.map(lambda a: a, params)
  emb = p2["encoder"]["embed_tokens"]["embedding"]
  p2["encoder"]["embed_tokens"]["embedding"] = emb.at[0].add(5.0)
  np.testing.assert_allclose(apply({"params": p2}, tokens), logits, atol=1e-5)


def test_logits_do_not_depend_on_the_amount_of_padding():
  model, params, tokens = _init()
  logits = model.apply({"params": params}, tokens[1:, :25])       # example 1, no padding
  padded = model.apply({"params": params}, tokens[1:])             # same example, 15 pads
  np.testing.assert_allclose(padded, logits, atol=1e-5)


def test_dynamic_projection_masks_slots_beyond_length():
  cfg = dataclasses.replace(CFG, proj_len=30)
  model, params, tokens = _init(cfg)
  short = tokens.at[:, 4:].set(0)                                   # 4 real tokens, 30 slots
  logits = model.apply({"params": params}, short)
  # Slots >= 4 are masked: perturbing P rows >= 4 changes nothing.
  p2 = jax.tree.map(lambda a: a, params)
  p2["encoder"]["projected_embeddings"] = params["encoder"]["projected_embeddings"].at[4:].add(
      jax.random.normal(jax.random.key(4), (26, 16)))
  np.testing.assert_allclose(model.apply({"params": p2}, short), logits, atol=1e-5)
  # Without dynamic projection they matter.
  cfg_off = dataclasses.replace(cfg, dynamic_projection=False)
  off = models.Classifier(cfg_off)
  assert np.abs(off.apply({"params": p2}, short) - off.apply({"params": params}, short)
                ).max() > 1e-4


def test_tied_layer_weights_share_one_layer():
  _, tied, _ = _init(dataclasses.replace(CFG, tie_layer_weights=True))
  _, untied, _ = _init(CFG)
  assert "layer" in tied["encoder"] and "layers_1" not in tied["encoder"]
  assert "layers_0" in untied["encoder"] and "layers_1" in untied["encoder"]
  assert models.count_params(tied) < models.count_params(untied)


def test_jit_compiles_once_and_gradients_are_finite():
  model, params, tokens = _init()
  traces = []

  @jax.jit
  def loss(params, tokens, key):
    traces.append(1)
    logits = model.apply({"params": params}, tokens, deterministic=False,
                         rngs={"dropout": key})
    return jax.nn.log_softmax(logits)[:, 0].mean()

  g = jax.grad(loss)
  grads = jax.jit(g)(params, tokens, jax.random.key(1))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(grads)) > 0
  loss(params, tokens, jax.random.key(1))
  n = len(traces)
  loss(params, _tokens(seed=3), jax.random.key(2))
  loss(params, _tokens(lengths=(3, 40), seed=4), jax.random.key(3))
  assert n >= 1 and len(traces) == n          # new data and lengths: no retrace


def test_no_padding_tasks_keep_zero_tokens():
  cfg = dataclasses.replace(CFG, pad_id=None, readout="mean", vocab_size=256)
  model, params, tokens = _init(cfg, jnp.zeros((2, 40), jnp.int32).at[0, 5].set(200))
  logits = model.apply({"params": params}, tokens)
  # Black pixels (token 0) are real tokens: changing one changes the output.
  logits2 = model.apply({"params": params}, tokens.at[0, 20].set(7))
  assert np.abs(logits2[0] - logits[0]).max() > 1e-5


def test_bert_init_replaces_dense_and_embeddings_only():
  _, params, _ = _init()
  bert = models.bert_init(params, jax.random.key(5))
  k = np.asarray(bert["encoder"]["layers_0"]["ffn"]["fc1"]["kernel"])
  assert abs(k.std() - 0.02) < 0.004
  np.testing.assert_array_equal(bert["encoder"]["layers_0"]["ffn"]["fc1"]["bias"], 0.0)
  np.testing.assert_array_equal(bert["encoder"]["emb_layer_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(bert["encoder"]["projected_embeddings"],
                                params["encoder"]["projected_embeddings"])


def test_dual_encoder_keeps_documents_apart():
  cfg = dataclasses.replace(CFG, num_docs=2, num_classes=2)
  model = models.Classifier(cfg)
  docs = jnp.stack([_tokens(seed=1), _tokens(seed=2)], axis=1)        # [B, 2, N]
  params = model.init(jax.random.key(0), docs)["params"]
  enc = models.Encoder(cfg)
  feats = lambda d: enc.apply({"params": params["encoder"]}, d)
  f1 = feats(docs[:, 0])
  docs2 = docs.at[:, 1].set(_tokens(seed=7))
  np.testing.assert_allclose(feats(docs2[:, 0]), f1, atol=1e-6)
  assert np.abs(model.apply({"params": params}, docs2) - model.apply({"params": params}, docs)
                ).max() > 1e-5


@pytest.mark.parametrize("combine,width", [("luna", 32), ("interact", 64)])
def test_retrieval_combinations(combine, width):
  cfg = dataclasses.replace(CFG, num_docs=2, num_classes=2, retrieval_combine=combine)
  docs = jnp.stack([_tokens(seed=1), _tokens(seed=2)], axis=1)
  params = models.Classifier(cfg).init(jax.random.key(0), docs)["params"]
  assert params["classifier_hidden"]["kernel"].shape[0] == width


def test_sequence_longer_than_position_table_fails():
  model, params, _ = _init()
  with pytest.raises(ValueError, match="max_len"):
    model.apply({"params": params}, jnp.ones((1, 41), jnp.int32))


def test_readouts_mean_padded_and_first():
  x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  np.testing.assert_allclose(models.readout(x, mask, "first"), x[:, 0])
  np.testing.assert_allclose(models.readout(x, mask, "cls"), x[:, 0])
  # "mean": over the real tokens; "mean_padded": real tokens summed, divided by N (Nystromformer).
  np.testing.assert_allclose(models.readout(x, mask, "mean")[1], x[1, :2].mean(0))
  np.testing.assert_allclose(models.readout(x, mask, "mean_padded")[1], x[1, :2].sum(0) / 4)
  np.testing.assert_allclose(models.readout(x, mask, "mean_padded")[0], x[0].mean(0))
  with pytest.raises(ValueError, match="readout"):
    models.readout(x, mask, "max")


def test_torch_init_is_nn_linear_and_normal_embeddings():
  cfg = dataclasses.replace(CFG, attention="softmax", block="pre_ln", qkv_bias=True)
  _, params, _ = _init(cfg)
  new = models.torch_init(params, jax.random.key(3))
  enc = new["encoder"]
  fc1 = enc["layers_0"]["ffn"]["fc1"]
  bound = CFG.emb_dim**-0.5
  for leaf in (fc1["kernel"], fc1["bias"], enc["layers_0"]["self_attn"]["query"]["bias"]):
    assert float(jnp.abs(leaf).max()) <= bound and float(jnp.abs(leaf).max()) > 0.5 * bound
  assert abs(float(enc["embed_tokens"]["embedding"].std()) - 0.02) < 0.006
  np.testing.assert_array_equal(enc["final_layer_norm"]["scale"],
                                params["encoder"]["final_layer_norm"]["scale"])


def test_classifier_head_layers_and_bias():
  cfg = dataclasses.replace(CFG, classifier_layers=2, classifier_bias=True)
  _, params, _ = _init(cfg)
  assert params["classifier_hidden"]["kernel"].shape == (16, 24)
  assert params["classifier_hidden_1"]["kernel"].shape == (24, 12)
  assert params["classifier_out"]["kernel"].shape == (12, 5) and "bias" in params["classifier_out"]
  _, params, _ = _init(CFG)
  assert "bias" not in params["classifier_out"]                 # Luna's head has none


def test_patch_embedding_reads_square_patches_row_major():
  side, p, d = 8, 4, 5
  pixels_BxN = jax.random.randint(jax.random.key(0), (2, side * side), 0, 256)
  embed = models.PatchEmbed(p, d)
  params = embed.init(jax.random.key(1), pixels_BxN)["params"]
  out_BxTxD = embed.apply({"params": params}, pixels_BxN)
  assert out_BxTxD.shape == (2, (side // p) ** 2, d)
  image = np.asarray(pixels_BxN).reshape(2, side, side) / 255.0
  kernel, bias = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
  # Token 1 is the top-right patch: rows 0..3, columns 4..7.
  want = image[:, 0:4, 4:8].reshape(2, 16) @ kernel + bias
  np.testing.assert_allclose(out_BxTxD[:, 1], want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="patch_size=3"):
    models.PatchEmbed(3, d).init(jax.random.key(1), pixels_BxN)


def test_patch_classifier_runs_and_refuses_padded_tasks():
  cfg = dataclasses.replace(CFG, pad_id=None, vocab_size=256, max_len=64, readout="mean",
                            embedding="patches", patch_size=4)
  pixels = jax.random.randint(jax.random.key(0), (2, 64), 0, 256)
  model = models.Classifier(cfg)
  params = model.init(jax.random.key(0), pixels)["params"]
  assert "embed_patches" in params["encoder"] and "embed_tokens" not in params["encoder"]
  logits = model.apply({"params": params}, pixels)
  assert logits.shape == (2, CFG.num_classes) and np.isfinite(logits).all()
  # Every pixel counts: changing one changes the logits.
  assert np.abs(model.apply({"params": params}, pixels.at[0, 63].add(100)) - logits).max() > 0
  with pytest.raises(ValueError, match="unpadded"):
    models.Classifier(dataclasses.replace(cfg, pad_id=0)).init(jax.random.key(0), pixels)
