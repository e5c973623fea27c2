"""`python -m luna_jax.convert check`: official names -> params, any sizes, exit codes."""
import subprocess
import sys

import numpy as np

from luna_jax import convert
from tests.conftest import REPO


def _softmax(s, axis=-1):
  s = s - s.max(axis, keepdims=True)
  e = np.exp(s)
  return e / e.sum(axis, keepdims=True)


def _reference_luna(v, prefix, heads, pheads, x_pad, p_pad, tied):
  """Independent float64 numpy reading of luna.md §1, time-major like the official code."""
  lin = lambda name, z: z @ v[f"{prefix}{name}_proj_weight"].T.astype(np.float64) + v[
      f"{prefix}{name}_proj_bias"]
  x, p = v["x"].astype(np.float64), v["p"].astype(np.float64)   # [N,B,D], [l,B,D]
  n, b, d = x.shape

  def attend(q, k, val, key_pad, h):           # q [T,B,D], k/v [S,B,D], key_pad [B,S]
    t, s = q.shape[0], k.shape[0]
    qh = q.reshape(t, b, h, d // h)
    kh = k.reshape(s, b, h, d // h)
    vh = val.reshape(s, b, h, d // h)
    scores = np.einsum("tbhk,sbhk->bhts", qh, kh)
    if key_pad is not None:
      scores = np.where(key_pad[:, None, None, :], -np.inf, scores)
    a = _softmax(scores)
    return np.einsum("bhts,sbhk->tbhk", a, vh).reshape(t, b, d)

  pq = lin("pq", p) * (d // pheads)**-0.5
  pk = lin("pc" if tied else "pk", x)
  pv = pk if tied else lin("pv", x)
  pctx = attend(pq, pk, pv, x_pad, pheads)
  q = lin("q", x) * (d // heads)**-0.5
  k = lin("c" if tied else "k", pctx)
  val = k if tied else lin("v", pctx)
  out = lin("out", attend(q, k, val, p_pad, heads))
  return out.astype(np.float32), pctx.astype(np.float32)


def _make_vectors(path, n=19, b=3, d=24, heads=4, pheads=2, l=5, seed=0):
  rng = np.random.default_rng(seed)
  v = {"cfg_seq_len": np.int64(n), "cfg_batch": np.int64(b), "cfg_embed_dim": np.int64(d),
       "cfg_num_heads": np.int64(heads), "cfg_num_pheads": np.int64(pheads),
       "cfg_proj_len": np.int64(l)}
  v["x"] = rng.normal(size=(n, b, d)).astype(np.float32)
  v["p"] = rng.normal(size=(l, b, d)).astype(np.float32)
  pad = np.zeros((b, n), bool)
  pad[1, -4:] = True
  pad[2, -9:] = True
  v["key_padding_mask"] = pad
  for prefix, names in (("", ("pq", "pk", "pv", "q", "k", "v", "out")),
                        ("tied_", ("pq", "pc", "q", "c", "out"))):
    for name in names:
      v[f"{prefix}{name}_proj_weight"] = (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)
      v[f"{prefix}{name}_proj_bias"] = (0.1 * rng.normal(size=(d,))).astype(np.float32)
  v["out"], v["pcontext"] = _reference_luna(v, "", heads, pheads, pad, None, False)
  p_pad = np.zeros((b, l), bool)
  p_pad[0, 3:] = True
  v["pkey_padding_mask_case2"] = p_pad
  v["out_case2"], v["pcontext_case2"] = _reference_luna(v, "", heads, pheads, pad, p_pad, False)
  v["tied_out"], v["tied_pcontext"] = _reference_luna(v, "tied_", heads, pheads, pad, None, True)
  np.savez(path, **v)
  return v


def test_check_passes_on_shared_fixture_via_cli(fixtures_dir):
  r = subprocess.run([sys.executable, "-m", "luna_jax.convert", "check",
                      str(fixtures_dir / "luna_vectors.npz")],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "PASS" in r.stdout and "layer_x_out" in r.stdout


def test_check_accepts_other_sizes_and_pack_heads(tmp_path):
  path = tmp_path / "other.npz"
  _make_vectors(path)
  assert convert.main(["check", str(path)]) == 0


def test_check_fails_on_wrong_outputs(tmp_path, capsys):
  path = tmp_path / "bad.npz"
  v = _make_vectors(path)
  v["tied_out"] = v["tied_out"] + 1e-3
  np.savez(path, **v)
  assert convert.main(["check", str(path)]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_check_reports_missing_entries(tmp_path, capsys):
  path = tmp_path / "empty.npz"
  np.savez(path, cfg_num_heads=np.int64(4), x=np.zeros((3, 1, 8), np.float32),
           p=np.zeros((2, 1, 8), np.float32))
  assert convert.main(["check", str(path)]) == 2
  assert "missing entry" in capsys.readouterr().err


def test_check_causal_cli(fixtures_dir):
  assert convert.main(["check-causal", str(fixtures_dir / "luna_causal_vectors.npz")]) == 0
