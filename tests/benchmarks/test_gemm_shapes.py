"""benchmarks/gemm_shapes.py: the dot list of a Luna layer and its jax worker (no timing
assertions)."""
import numpy as np
import pytest

from benchmarks import gemm_shapes


def test_layer_dot_list_counts_the_flops_of_its_sizes():
  sizes = gemm_shapes.PRESETS["layer_4k"]
  gemms = gemm_shapes.layer_gemms(**sizes)
  t, d, f = sizes["tokens"], sizes["d"], sizes["ffn"]
  flops = {g["name"]: 2 * g["batch"] * g["m"] * g["k"] * g["n"] for g in gemms}
  # Forward, dX and dW of a projection cost the same; the FFN is 2 x tokens x D x F each way.
  for name in ("x projections (pk,pv,q)", "out_proj", "fc1", "fc2"):
    assert flops[f"{name} fwd"] == flops[f"{name} dX"] == flops[f"{name} dW"]
  assert flops["fc1 fwd"] == flops["fc2 fwd"] == 2 * t * d * f
  # Per-head pack scores: B*H heads of [l, dh] x [dh, N] = 2 * tokens * l * D in all.
  assert flops["pack scores"] == 2 * t * sizes["l"] * d
  # The block-diagonal form multiplies H*l rows against the full width: H times the work.
  bd = {g["name"]: g for g in gemm_shapes.layer_gemms(**gemm_shapes.PRESETS["small_protocol"])}
  sp = gemm_shapes.PRESETS["small_protocol"]
  assert (bd["pack scores"]["m"], bd["pack scores"]["k"]) == (sp["heads"] * sp["l"], sp["d"])


@pytest.mark.parametrize("orient", ["NN", "NT", "TN"])
def test_operands_are_stored_so_the_product_has_the_listed_shape(orient):
  g = {"name": "x", "batch": 2, "m": 3, "k": 5, "n": 4, "orient": orient}
  a, b = gemm_shapes._operands(g, np.random.default_rng(0))
  a = a.transpose(0, 2, 1) if orient == "TN" else a
  b = b.transpose(0, 2, 1) if orient == "NT" else b
  assert (a @ b).shape == (2, 3, 4)


def test_jax_worker_times_every_dot_and_the_table_sums_them():
  gemms = [{"name": f"g{o}", "batch": 2, "m": 8, "k": 16, "n": 4, "orient": o}
           for o in ("NN", "NT", "TN")]
  res = gemm_shapes.worker("jax", gemms, warmup=1, repeats=2)
  assert len(res["ms"]) == 3 and all(ms > 0 for ms in res["ms"])
  rows = [dict(g, gflop=2 * 2 * 8 * 16 * 4 / 1e9, jax_ms=ms) for g, ms in zip(gemms, res["ms"])]
  report = {"meta": {"preset": "tiny", "frameworks": ["jax"], "date": "d", "cpu_model": "c",
                     "versions": res["versions"], "sizes": {}, "repeats": 2, "warmup": 1,
                     "rounds": 1, "load_before": [0], "load_after": [0]}, "rows": rows}
  lines = gemm_shapes.markdown(report).splitlines()
  total = [l for l in lines if l.startswith("| all of the above")][0]
  assert f"{sum(res['ms']):.1f}" in total
  assert sum(l.startswith("| g") for l in lines) == 3
