"""benchmarks/compare_torch.py's JAX worker and table on a tiny point (no timing assertions;
the torch side is covered by test_torch_reference.py where torch is installed)."""
import math

from benchmarks import compare_torch

TINY = ["--n", "64", "--l", "4", "--batch", "2", "--dim", "16", "--heads", "2", "--ffn", "32",
        "--warmup", "1", "--repeats", "2"]


def test_jax_worker_reports_times_rss_and_the_compiled_footprint():
  for what in ("attention", "layer"):
    args = compare_torch.build_parser().parse_args(["--worker", "jax", "--what", what, *TINY])
    res = compare_torch.worker_jax(args)
    assert len(res["times_ms"]) == 2 and res["median_ms"] > 0 and math.isfinite(res["loss"])
    # The compiled step holds at least its inputs (x, P, mask) and the parameters' gradients.
    inputs_mb = (2 * 64 * 16 + 2 * 4 * 16) * 4 / 2**20
    assert inputs_mb < res["xla_total_mb"] < 64, res
    assert 0 < res["xla_temp_mb"] < res["xla_total_mb"]
    assert res["peak_rss_mb"] >= res["setup_rss_mb"] > 0


def test_table_has_a_column_for_every_field_of_a_row():
  ok = {"status": "ok", "median_ms": 10.0, "min_ms": 9.0, "peak_rss_mb": 300.0}
  report = {
      "meta": {"date": "d", "cpu_model": "cpu", "cpu_count": 2, "versions": {}, "batch": 2,
               "torch_threads": 2, "dim": 16, "heads": 2, "ffn": 32, "pad_frac": 0.1,
               "warmup": 1, "repeats": 2, "rounds": 1},
      "baseline": {"torch": {}, "jax": {}},
      "results": [{"what": "layer", "n": 64, "l": 4, "ratio": 0.5, "loadavg_before": [1.0],
                   "loadavg_after": [1.5], "torch": ok,
                   "jax": dict(ok, median_ms=20.0, xla_total_mb=12.4, compile_s=1.0),
                   "torch_variants": {"default": ok}}],
  }
  rows = [l for l in compare_torch.markdown(report).splitlines() if l.startswith("|")]
  header, rule, row = rows
  assert header.count("|") == rule.count("|") == row.count("|")
  cells = dict(zip((c.strip() for c in header.split("|")), (c.strip() for c in row.split("|"))))
  assert cells["jax XLA MB"] == "12" and cells["ratio"] == "0.50" and cells["jax ms"] == "20.0"
