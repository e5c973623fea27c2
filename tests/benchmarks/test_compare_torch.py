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
    assert res["peak_rss_mb"] >= res["compiled_rss_mb"] >= res["setup_rss_mb"] > 0


def test_summary_splits_the_peak_rss_into_setup_compilation_and_steps():
  jax_runs = [{"status": "ok", "median_ms": m, "min_ms": m, "setup_rss_mb": 300.0,
               "compiled_rss_mb": c, "peak_rss_mb": c + grew, "compile_s": 1.0,
               "xla_total_mb": 20.0} for m, c, grew in [(10.0, 350.0, 30.0), (12.0, 360.0, 50.0)]]
  s = compare_torch.summarise(jax_runs)
  assert s["median_ms"] == 11.0 and s["peak_rss_mb"] == 410.0
  assert s["compiled_rss_mb"] == 355.0 and s["steps_rss_mb"] == 40.0   # medians
  torch_runs = [{"status": "ok", "median_ms": 8.0, "min_ms": 7.0, "setup_rss_mb": 240.0,
                 "peak_rss_mb": 270.0}]
  t = compare_torch.summarise(torch_runs)
  assert t["steps_rss_mb"] == 30.0 and "compiled_rss_mb" not in t
  assert compare_torch.summarise([{"status": "error"}])["status"] == "error"


def test_table_has_a_column_for_every_field_of_a_row():
  ok = {"status": "ok", "median_ms": 10.0, "min_ms": 9.0, "peak_rss_mb": 300.0,
        "steps_rss_mb": 41.0}
  report = {
      "meta": {"date": "d", "cpu_model": "cpu", "cpu_count": 2, "versions": {}, "batch": 2,
               "torch_threads": 2, "dim": 16, "heads": 2, "ffn": 32, "pad_frac": 0.1,
               "warmup": 1, "repeats": 2, "rounds": 1},
      "baseline": {"torch": {}, "jax": {}},
      "results": [{"what": "layer", "n": 64, "l": 4, "ratio": 0.5, "loadavg_before": [1.0],
                   "loadavg_after": [1.5], "torch": ok,
                   "jax": dict(ok, median_ms=20.0, xla_total_mb=12.4, compile_s=1.0,
                               setup_rss_mb=280.0, compiled_rss_mb=290.4, steps_rss_mb=9.6),
                   "torch_variants": {"default": ok}}],
  }
  rows = [l for l in compare_torch.markdown(report).splitlines() if l.startswith("|")]
  header, rule, row = rows
  assert header.count("|") == rule.count("|") == row.count("|")
  cells = dict(zip((c.strip() for c in header.split("|")), (c.strip() for c in row.split("|"))))
  assert cells["jax XLA MB"] == "12" and cells["ratio"] == "0.50" and cells["jax ms"] == "20.0"
  assert cells["jax RSS setup / compiled MB"] == "280 / 290"
  assert cells["steps +MB torch / jax"] == "41 / 10"
