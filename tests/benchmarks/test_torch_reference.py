"""The PyTorch rendering of the official Luna modules (benchmarks/torch_reference) matches the
official reference vectors, the checker can fail, and torch and the JAX library agree."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_reference import check  # noqa: E402
from benchmarks.torch_reference.luna_torch import (LunaAttentionTorch,  # noqa: E402
                                                   LunaEncoderLayerTorch)

TOL = 1e-5
EXPECTED = ("out", "pcontext", "out_vs_f64", "pcontext_vs_f64", "unpack_attn_probs", "out_case2",
            "pcontext_case2", "tied_out", "tied_pcontext", "layer_x_out", "layer_p_out")


@pytest.fixture(scope="module")
def vectors(fixtures_dir):
  with np.load(fixtures_dir / "luna_vectors.npz") as f:
    return {k: f[k] for k in f.files}


def test_matches_every_fixture_output(vectors):
  errors = check.check_bidirectional(vectors)
  assert set(errors) == set(EXPECTED)
  bad = {k: e for k, e in errors.items() if not e <= TOL}
  assert not bad, bad


def test_cli_passes(fixtures_dir, capsys):
  assert check.main([str(fixtures_dir / "luna_vectors.npz")]) == 0
  assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("key,fails", [
    ("pq_proj_weight", ("out", "pcontext", "unpack_attn_probs", "out_case2", "pcontext_case2")),
    ("k_proj_weight", ("out", "out_case2")),   # (a k bias would be softmax-invariant)
    ("tied_c_proj_weight", ("tied_out",)),
    ("layer_self_atten_proj_layer_norm_bias", ("layer_p_out",)),
    ("layer_fc2_weight", ("layer_x_out",)),
])
def test_corrupted_weight_fails(vectors, tmp_path, capsys, key, fails):
  bad = dict(vectors)
  noise = np.random.default_rng(0).standard_normal(vectors[key].shape).astype(np.float32)
  bad[key] = vectors[key] + 1e-2 * noise   # random: a constant shift can be LN/softmax-invariant
  errors = check.check_bidirectional(bad)
  for name in fails:
    assert errors[name] > TOL, (name, errors[name])
  path = tmp_path / "bad.npz"
  np.savez(path, **bad)
  assert check.main([str(path)]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_corrupted_output_fails(vectors, tmp_path):
  bad = dict(vectors)
  bad["layer_p_out"] = vectors["layer_p_out"].copy()
  bad["layer_p_out"][0, 0, 0] += 1e-4
  path = tmp_path / "bad.npz"
  np.savez(path, **bad)
  assert check.main([str(path)]) == 1


def test_missing_weight_is_an_error(vectors, tmp_path):
  bad = {k: v for k, v in vectors.items() if k != "v_proj_bias"}
  path = tmp_path / "bad.npz"
  np.savez(path, **bad)
  assert check.main([str(path)]) == 2


# --------------------------------------------------------------- torch vs the JAX library

def _random_inputs(rng, n, l, b, d, pad):
  x = rng.standard_normal((n, b, d)).astype(np.float32)
  p = rng.standard_normal((l, b, d)).astype(np.float32)
  x_pad = np.zeros((b, n), bool)
  x_pad[1, n - pad:] = True                 # example 1: last `pad` positions are padding
  p_pad = np.zeros((b, l), bool)
  p_pad[1, l - 2:] = True                   # example 1: last 2 P slots masked
  return x, p, x_pad, p_pad


def _flat(module):
  return {k.replace(".", "_"): v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("tied,pheads", [(False, 2), (True, 2), (False, 3)])
def test_torch_and_jax_attention_agree(tied, pheads):
  jax = pytest.importorskip("jax")
  from luna_jax import convert
  from luna_jax.attention.luna import LunaAttention

  n, l, b, d, h = 19, 5, 2, 24, 2
  torch.manual_seed(0)
  m = LunaAttentionTorch(d, h, pheads, tie_kv=tied).eval()
  with torch.no_grad():  # non-zero out_proj bias so it is exercised too
    m.out_proj.bias.uniform_(-0.1, 0.1)
  x, p, x_pad, p_pad = _random_inputs(np.random.default_rng(1), n, l, b, d, pad=6)

  xt = torch.tensor(x, requires_grad=True)
  pt = torch.tensor(p, requires_grad=True)
  y_t, yp_t = m(xt, pt, torch.tensor(x_pad), torch.tensor(p_pad))
  (y_t.sum() + yp_t.sum()).backward()

  attn = LunaAttention(num_heads=h, num_pack_heads=pheads, tie_kv=tied)
  params = convert.attention_params(_flat(m), "", tied)
  x_j, p_j = np.swapaxes(x, 0, 1), np.swapaxes(p, 0, 1)

  def loss(prm, xx, pp):
    y, yp = attn.apply({"params": prm}, xx, ~x_pad, pp, ~p_pad)
    return y.sum() + yp.sum(), (y, yp)

  with jax.default_matmul_precision("highest"):
    (_, (y_j, yp_j)), (g_prm, g_x, g_p) = jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True)(params, x_j, p_j)

  np.testing.assert_allclose(np.swapaxes(np.asarray(y_j), 0, 1), y_t.detach().numpy(),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(np.swapaxes(np.asarray(yp_j), 0, 1), yp_t.detach().numpy(),
                             atol=TOL, rtol=0)
  # Gradients of the benchmark loss (sum of both outputs) agree too.
  np.testing.assert_allclose(np.swapaxes(np.asarray(g_x), 0, 1), xt.grad.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.swapaxes(np.asarray(g_p), 0, 1), pt.grad.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(g_prm["q_proj"]["kernel"]),
                             m.q_proj.weight.grad.numpy().T, atol=1e-4)


def test_torch_and_jax_layer_agree():
  jax = pytest.importorskip("jax")
  from luna_jax import convert, models

  n, l, b, d, h, ffn = 19, 5, 2, 24, 2, 40
  torch.manual_seed(0)
  layer = LunaEncoderLayerTorch(d, ffn, h).eval()
  with torch.no_grad():  # non-trivial LayerNorm affine parameters
    for name in ("self_attn_layer_norm", "self_atten_proj_layer_norm", "final_layer_norm"):
      ln = getattr(layer, name)
      ln.weight.uniform_(0.5, 1.5)
      ln.bias.uniform_(-0.1, 0.1)
  x, p, x_pad, p_pad = _random_inputs(np.random.default_rng(2), n, l, b, d, pad=4)
  with torch.no_grad():
    xo_t, po_t = layer(torch.tensor(x), torch.tensor(p), torch.tensor(x_pad),
                       torch.tensor(p_pad))

  cfg = models.ModelConfig(vocab_size=1, num_classes=1, max_len=1, emb_dim=d, num_heads=h,
                           mlp_dim=ffn)
  params = convert.layer_params({f"layer_{k}": v for k, v in _flat(layer).items()}, "layer_")
  with jax.default_matmul_precision("highest"):
    xo_j, po_j = models.EncoderLayer(cfg).apply(
        {"params": params}, np.swapaxes(x, 0, 1), ~x_pad, np.swapaxes(p, 0, 1), ~p_pad, True)
  np.testing.assert_allclose(np.swapaxes(np.asarray(xo_j), 0, 1), xo_t.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.swapaxes(np.asarray(po_j), 0, 1), po_t.numpy(), atol=TOL, rtol=0)
