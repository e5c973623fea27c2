"""Tests of the attention scaling benchmark on tiny sizes (no timing assertions)."""
import argparse
import json
import math
import pathlib
import sys
import types

import jax
import numpy as np
import pytest

from benchmarks import attention_scaling as bench
from luna_jax import steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--lengths", "64,128", "--dim", "16", "--heads", "2", "--batch", "1", "--layers", "1",
        "--repeats", "1", "--warmup", "1", "--matmul-size", "128", "--xla-fast-compile"]
OK_FLOAT_FIELDS = ("compile_time_s", "step_time_s", "examples_per_s", "tokens_per_s",
                   "achieved_flops_per_s", "fraction_of_peak", "flops")


# One model-mode point at length 16, no matmul probe.
POINT = ["--lengths", "16", "--dim", "16", "--heads", "2", "--batch", "2", "--layers", "1",
         "--repeats", "1", "--warmup", "0", "--matmul-size", "0", "--xla-fast-compile"]


def _point_args(*extra: str) -> argparse.Namespace:
  return bench.resolve_defaults(bench.build_parser().parse_args(POINT + list(extra)))


def _run(tmp_path: pathlib.Path, name: str, extra: list[str]) -> tuple[dict, pathlib.Path]:
  out = tmp_path / name
  bench.main(TINY + extra + ["--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
                             "--plot", str(out / "r.png")])
  return json.loads((out / "r.json").read_text()), out


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("bench"), "layer",
              ["--mode", "layer", "--mechanisms", "softmax,luna:4,bogus"])


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("bench"), "model",
              ["--mode", "model", "--mechanisms", "softmax,luna:4"])


def _check_report(report: dict, mode: str) -> None:
  for key in ("device", "backend", "versions", "command", "date", "matmul_peak_flops", "results"):
    assert key in report
  assert set(report["versions"]) >= {"jax", "jaxlib", "flax"}
  assert isinstance(report["matmul_peak_flops"], float) and report["matmul_peak_flops"] > 0
  assert f"--mode {mode}" in report["command"]
  ok = [r for r in report["results"] if r["status"] == "ok"]
  assert {(r["label"], r["length"]) for r in ok} == {
      ("softmax", 64), ("softmax", 128), ("luna:4", 64), ("luna:4", 128)}
  for r in ok:
    assert set(bench.RESULT_FIELDS) <= set(r)
    assert r["mode"] == mode and r["dtype"] == "float32"
    assert (r["batch"], r["dim"], r["heads"], r["layers"]) == (1, 16, 2, 1)
    assert r["proj_len"] == (4 if r["mechanism"] == "luna" else None)
    for field in OK_FLOAT_FIELDS:
      assert isinstance(r[field], float) and r[field] > 0, (field, r[field])
    assert isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] > 0
    assert math.isclose(r["tokens_per_s"], r["examples_per_s"] * r["length"])
    assert math.isclose(r["fraction_of_peak"],
                        r["achieved_flops_per_s"] / report["matmul_peak_flops"])
  # The quadratic baseline's memory grows with the length.
  soft = {r["length"]: r for r in ok if r["label"] == "softmax"}
  assert soft[128]["peak_memory_bytes"] > soft[64]["peak_memory_bytes"]


def _check_outputs(out: pathlib.Path) -> str:
  assert (out / "r.png").read_bytes()[:8] == PNG_SIGNATURE
  markdown = (out / "r.md").read_text()
  assert "| mechanism | length | status |" in markdown
  assert "## Relative to softmax" in markdown
  return markdown


def test_layer_mode_end_to_end(layer_run):
  report, out = layer_run
  _check_report(report, "layer")
  markdown = _check_outputs(out)
  assert "| luna:4 | 64 | ok |" in markdown


def test_model_mode_end_to_end(model_run):
  report, out = model_run
  _check_report(report, "model")
  _check_outputs(out)
  # A training step updates (donated) params and optimizer state: arguments alias outputs.
  for r in report["results"]:
    assert r["memory_analysis"]["alias"] > 0


def test_failing_mechanism_is_an_error_row(layer_run):
  report, _ = layer_run
  bogus = {r["length"]: r for r in report["results"] if r["label"] == "bogus"}
  assert bogus[64]["status"] == "error" and "bogus" in bogus[64]["message"]
  assert bogus[128]["status"] == "skipped"   # longer lengths of a failed mechanism are skipped
  assert bogus[64]["step_time_s"] is None


def test_memory_estimate_above_limit_is_oom(tmp_path):
  report = bench.main(TINY + ["--mode", "layer", "--mechanisms", "softmax", "--matmul-size", "0",
                              "--memory-limit-gb", "1e-9", "--json", str(tmp_path / "r.json")])
  rows = {r["length"]: r for r in report["results"]}
  assert rows[64]["status"] == "oom" and rows[64]["peak_memory_bytes"] > 0
  assert rows[64]["step_time_s"] is None
  assert rows[128]["status"] == "skipped"
  assert report["matmul_peak_flops"] is None and rows[64]["fraction_of_peak"] is None


@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0, 2.7])
def test_fit_loglog_slope_recovers_exponent(exponent):
  xs = [2**k for k in range(6, 14)]
  rng = np.random.default_rng(0)
  ys = [3e-4 * x**exponent * (1 + 0.01 * rng.standard_normal()) for x in xs]
  assert bench.fit_loglog_slope(xs, ys) == pytest.approx(exponent, abs=0.02)


def test_fit_loglog_slope_tail_and_degenerate_inputs():
  xs = [64, 128, 256, 512, 1024]
  ys = [1.0, 1.0, 1.0, 4.0, 16.0]          # flat (overhead-bound), then quadratic
  assert bench.fit_loglog_slope(xs, ys, tail=3) == pytest.approx(2.0, rel=0.25)
  assert bench.fit_loglog_slope(xs[-2:], ys[-2:]) == pytest.approx(2.0)
  assert math.isnan(bench.fit_loglog_slope([64], [1.0]))
  assert math.isnan(bench.fit_loglog_slope([64, 128], [None, 0.0]))


def test_parse_mechanisms():
  specs = bench.parse_mechanisms("softmax, luna:16,luna,luna:x,performer:3")
  assert [(s.label, s.name, s.proj_len) for s in specs[:3]] == [
      ("softmax", "softmax", None), ("luna:16", "luna", 16), ("luna", "luna", 16)]
  assert specs[3].error and specs[4].error


def test_cost_flops_across_return_types():
  def compiled(cost):
    return types.SimpleNamespace(cost_analysis=lambda: cost)
  assert bench.cost_flops(compiled({"flops": 10.0})) == 10.0
  assert bench.cost_flops(compiled([{"flops": 7.0}])) == 7.0
  assert bench.cost_flops(compiled(None)) is None
  assert bench.cost_flops(compiled([])) is None
  assert bench.cost_flops(compiled({"bytes accessed": 1.0})) is None


def test_is_oom_error():
  assert bench.is_oom_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 GiB"))
  assert bench.is_oom_error(MemoryError())
  assert not bench.is_oom_error(ValueError("shapes do not match"))


def test_relative_to_baseline():
  def row(label, n, t, m, status="ok"):
    return {"label": label, "length": n, "step_time_s": t, "peak_memory_bytes": m,
            "status": status}
  results = [row("softmax", 1024, 1.0, 100), row("softmax", 4096, 8.0, 1000),
             row("luna:256", 1024, 0.5, 50), row("luna:256", 4096, 2.0, 160),
             row("softmax", 8192, None, None, "oom"), row("luna:256", 8192, 4.0, 300)]
  rel = bench.relative_to(results, "softmax")["luna:256"]
  assert rel[4096] == pytest.approx((4.0, 0.16))
  assert rel[1024] == pytest.approx((2.0, 0.5))
  assert rel[8192] == "softmax oom"


def test_merge_reports(layer_run, tmp_path):
  report, out = layer_run
  merged = bench.main(["--merge", str(out / "r.json"), str(out / "r.json"),
                       "--markdown", str(tmp_path / "m.md"), "--plot", str(tmp_path / "m.png"),
                       "--json", str(tmp_path / "m.json")])
  assert len(merged["results"]) == 2 * len(report["results"])
  assert len(merged["merged_from"]) == 2
  assert (tmp_path / "m.png").read_bytes()[:8] == PNG_SIGNATURE
  assert json.loads((tmp_path / "m.json").read_text())["results"] == merged["results"]


def test_model_mode_runs_the_trainers_step(monkeypatch):
  args = _point_args("--mode", "model", "--mechanisms", "softmax")
  spec = bench.parse_mechanisms("softmax")[0]
  traced = []
  train_step = steps.train_step

  def spy(*a, **kw):
    traced.append(True)
    return train_step(*a, **kw)

  with monkeypatch.context() as m:
    m.setattr(steps, "train_step", spy)
    row = bench.run_point(spec, 16, args, None)
  assert row["status"] == "ok", row["message"]
  assert traced, "model mode did not call steps.train_step"

  step = bench.build_model_step(spec, 16, args, {})
  state, batch, key = step.args
  assert isinstance(state, steps.TrainState)
  want, _ = jax.jit(train_step, static_argnums=3)(state, batch, key, bench.steps.REDRAW_EVERY)
  out = step.fn(*step.args)          # donates `state`
  got, metrics = out
  assert set(metrics) == {"loss", "accuracy", "grad_norm"} and int(got.step) == 1
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7),
               got.params, want.params)
  assert step.next_args(step.args, out)[0] is got


def test_isolated_point_runs_from_another_directory(tmp_path, monkeypatch):
  args = _point_args("--mode", "layer", "--mechanisms", "softmax", "--isolate")
  argv = bench.child_argv(bench.parse_mechanisms("softmax")[0], 16, args, "row.json")
  assert argv[:3] == [sys.executable, "-m", "benchmarks.attention_scaling"]
  monkeypatch.chdir(tmp_path)
  report = bench.main(POINT + ["--mode", "layer", "--mechanisms", "softmax", "--isolate"])
  (row,) = report["results"]
  assert row["status"] == "ok", row["message"]


def _timed(label, n, t, m=1000, status="ok"):
  fields = dict.fromkeys(bench.RESULT_FIELDS + ("device_peak_bytes_in_use",))
  return {**fields, "label": label, "length": n, "step_time_s": t, "peak_memory_bytes": m,
          "status": status}


def test_fit_heading_names_the_lengths_really_fitted():
  two = [_timed("luna:16", 1024, 1.0), _timed("luna:16", 2048, 2.0)]
  counts = bench.fit_counts(two, "step_time_s", 3)
  assert counts == {"luna:16": 2}
  assert bench.fit_heading(counts, 3) == "fit over the 2 ok lengths (fewer than the 3 asked for)"
  three = two + [_timed("luna:16", 4096, 4.0), _timed("luna:16", 512, 0.5)]
  assert bench.fit_heading(bench.fit_counts(three, "step_time_s", 3), 3) == (
      "fit over the last 3 ok lengths")
  mixed = three + [_timed("softmax", 1024, 1.0, None), _timed("softmax", 2048, 4.0),
                   _timed("softmax", 4096, None, None, "oom"), _timed("bogus", 1024, None, None,
                                                                       "error")]
  counts = bench.fit_counts(mixed, "step_time_s", 3)
  assert counts == {"luna:16": 3, "softmax": 2, "bogus": 0}
  heading = bench.fit_heading(counts, 3)
  assert "at most the last 3" in heading and "2-3 per mechanism" in heading
  report = {"device": "cpu", "backend": "cpu", "versions": {}, "date": "d", "command": "c",
            "host": {"load_average": [0.0, 0.0, 0.0]}, "matmul_peak_flops": None,
            "matmul_peak": None, "dtype": "float32", "torch_matmul": None, "results": mixed}
  markdown = bench.to_markdown(report, None, 3)
  assert "| softmax | 2.00 | - | 2 (memory 1) |" in markdown
  assert "| luna:16 | 1.00 | 0.00 | 3 |" in markdown
  assert "last 3 ok lengths)" not in markdown


def test_torch_peak_is_never_printed_as_zero(monkeypatch):
  from benchmarks.attention_scaling import report as report_lib
  cpu = {"backend": "cpu", "dtype": "float32", "torch_matmul": None}
  monkeypatch.setattr(report_lib.importlib.util, "find_spec", lambda name: None)
  assert bench.torch_peak_words(cpu, 1e-9, "GFLOP/s") == "not installed"
  assert bench.torch_peak_words({**cpu, "backend": "gpu"}, 1e-9, "GFLOP/s") == (
      "not measured: CPU only")
  assert bench.torch_peak_words({**cpu, "dtype": "bfloat16"}, 1e-9, "GFLOP/s") == (
      "not measured: float32 only")
  measured = {**cpu, "torch_matmul": {"flops_per_s": 123.4e9}}
  assert bench.torch_peak_words(measured, 1e-9, "GFLOP/s") == "123.4 GFLOP/s"
  assert bench.torch_peak_words(measured, 1e-12, "TFLOP/s") == "0.123 TFLOP/s"
