"""The report: fitted log-log exponents, the relative table, markdown, plot, JSON, merging."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np


def fit_pairs(xs: Sequence[float], ys: Sequence[float], tail: int = 0
              ) -> list[tuple[float, float]]:
  """The (x, y) pairs a log-log fit uses: positive and finite, sorted by x, only the `tail`
  largest x when `tail` >= 2 (fewer when fewer ran)."""
  pairs = sorted((float(x), float(y)) for x, y in zip(xs, ys)
                 if x is not None and y is not None and x > 0 and y > 0
                 and math.isfinite(x) and math.isfinite(y))
  return pairs[-tail:] if tail >= 2 else pairs


def fit_loglog_slope(xs: Sequence[float], ys: Sequence[float], tail: int = 0) -> float:
  """Least-squares slope of log(y) against log(x), i.e. k in y ~ c * x**k.

  Uses only the `tail` largest x when `tail` >= 2 (the asymptotic regime); ignores non-positive
  or non-finite pairs; returns nan when fewer than two distinct x remain.
  """
  pairs = fit_pairs(xs, ys, tail)
  if len({x for x, _ in pairs}) < 2:
    return float("nan")
  lx = np.log([x for x, _ in pairs])
  ly = np.log([y for _, y in pairs])
  slope, _ = np.polyfit(lx, ly, 1)
  return float(slope)


def torch_peak_words(report: dict[str, Any], scale: float, unit: str) -> str:
  """torch's matmul rate as `scale`-scaled `unit`, or why there is none (never a 0.0)."""
  flops = (report.get("torch_matmul") or {}).get("flops_per_s")
  if flops:
    return f"{flops * scale:.3g} {unit}" if unit.startswith("T") else f"{flops * scale:.1f} {unit}"
  if report.get("backend", "cpu") != "cpu":
    return "not measured: CPU only"
  if report.get("dtype", "float32") != "float32":
    return "not measured: float32 only"
  if importlib.util.find_spec("torch") is None:
    return "not installed"
  return "not measured: the torch probe failed"


def _fmt(value: float | None, fmt: str, scale: float = 1.0) -> str:
  """`value * scale` in `fmt`, or "-" for None and non-finite values."""
  if value is None or not math.isfinite(value):
    return "-"
  text = format(value * scale, fmt)
  return text[1:] if text.startswith("-") and float(text) == 0 else text   # no "-0.00"


def _loads(host: dict[str, Any]) -> str:
  """The host's load averages at the start (and end) of the run."""
  start = "/".join(f"{x:.1f}" for x in host["load_average"])
  end = host.get("load_average_end")
  return f"{start} (1/5/15 min) at start" + (
      f", {'/'.join(f'{x:.1f}' for x in end)} at end" if end else "")


def _labels(results: list[dict[str, Any]]) -> list[str]:
  """The rows' labels, each once, in order."""
  return list(dict.fromkeys(r["label"] for r in results))


def _ok_points(results: list[dict[str, Any]], label: str, key: str) -> tuple[list, list]:
  pts = [(r["length"], r[key]) for r in results if r["label"] == label and r["status"] == "ok"]
  return [p[0] for p in pts], [p[1] for p in pts]


def slopes(results: list[dict[str, Any]], key: str, tail: int) -> dict[str, float]:
  """Per-label log-log slope of `key` against length over the "ok" points."""
  return {label: fit_loglog_slope(*_ok_points(results, label, key), tail)
          for label in _labels(results)}


def fit_counts(results: list[dict[str, Any]], key: str, tail: int) -> dict[str, int]:
  """Per label, how many ok lengths the fit of `key` used (at most `tail` when `tail` >= 2)."""
  return {label: len(fit_pairs(*_ok_points(results, label, key), tail))
          for label in _labels(results)}


def fit_heading(counts: dict[str, int], tail: int) -> str:
  """The exponents' heading, naming the number of lengths the fits really used."""
  used = sorted({n for n in counts.values() if n >= 2})   # fewer than two: no exponent
  if not used:
    return "no mechanism has two ok lengths to fit"
  if len(used) == 1:
    n = used[0]
    if tail >= 2 and n == tail:
      return f"fit over the last {n} ok lengths"
    return f"fit over the {n} ok lengths" + (
        f" (fewer than the {tail} asked for)" if tail >= 2 else "")
  most = f"at most the last {tail}" if tail >= 2 else "all"
  return (f"fit over each mechanism's ok lengths, {most}: {used[0]}-{used[-1]} per mechanism, "
          "see the lengths column")


def relative_to(results: list[dict[str, Any]], baseline: str
                ) -> dict[str, dict[int, tuple[float | None, float | None] | str]]:
  """{label: {length: (speed x, memory x) or a note}} against the `baseline` label.

  speed = baseline step time / step time; memory = peak memory / baseline peak memory.
  """
  base = {r["length"]: r for r in results if r["label"] == baseline}
  out: dict[str, dict[int, Any]] = {}
  for r in results:
    if r["label"] == baseline:
      continue
    b = base.get(r["length"])
    cell: Any
    if r["status"] != "ok":
      cell = r["status"]
    elif b is None or b["status"] != "ok":
      cell = f"{baseline} {b['status'] if b else 'missing'}"
    else:
      speed = b["step_time_s"] / r["step_time_s"]
      mem = (r["peak_memory_bytes"] / b["peak_memory_bytes"]
             if r["peak_memory_bytes"] and b["peak_memory_bytes"] else None)
      cell = (speed, mem)
    out.setdefault(r["label"], {})[r["length"]] = cell
  return out


def resolve_baseline(results: list[dict[str, Any]], baseline: str | None) -> str | None:
  """The label matching `baseline` exactly, else the first "<baseline>[...]" label."""
  labels = _labels(results)
  if not baseline:
    return None
  if baseline in labels:
    return baseline
  return next((l for l in labels if l.startswith(f"{baseline}[")), None)


def to_markdown(report: dict[str, Any], baseline: str | None, tail: int) -> str:
  """The results table, the relative table (LRA Table 2 style) and the fitted exponents."""
  results = report["results"]
  peak = report.get("matmul_peak_flops")
  lines = [
      "# Attention scaling benchmark", "",
      f"- device: {report['device']} (backend {report['backend']})",
      "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
      f"- date: {report['date']}; host load average {_loads(report['host'])}",
      f"- command: `{report['command']}`",
      f"- machine matmul peak: {_fmt(peak, '.3g', 1e-12)} TFLOP/s, the better of XLA's "
      f"({_fmt(report.get('xla_matmul_flops'), '.3g', 1e-12)}) and torch's "
      f"({torch_peak_words(report, 1e-12, 'TFLOP/s')}) "
      f"{report['matmul_peak']['size'] if report['matmul_peak'] else '-'}^3 {report['dtype']} "
      "matmul; '% of peak' divides by it, '% of XLA mm' by XLA's own",
      "- memory = compiled estimate (temp + arguments + outputs - aliased); device peak = "
      "`peak_bytes_in_use` where reported.", "",
      "| mechanism | length | status | compile s | step ms | examples/s | tokens/s | memory MiB "
      "| device peak MiB | GFLOP/step | TFLOP/s | % of peak | % of XLA mm |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(
        f"| {r['label']} | {r['length']} | {r['status']} | {_fmt(r['compile_time_s'], '.2f')} "
        f"| {_fmt(r['step_time_s'], '.2f', 1e3)} | {_fmt(r['examples_per_s'], '.3g')} "
        f"| {_fmt(r['tokens_per_s'], '.4g')} | {_fmt(r['peak_memory_bytes'], '.1f', 2**-20)} "
        f"| {_fmt(r['device_peak_bytes_in_use'], '.1f', 2**-20)} "
        f"| {_fmt(r['flops'], '.3g', 1e-9)} | {_fmt(r['achieved_flops_per_s'], '.3g', 1e-12)} "
        f"| {_fmt(r['fraction_of_peak'], '.1f', 100)} "
        f"| {_fmt(r.get('fraction_of_xla_matmul'), '.1f', 100)} |")
  notes = [f"- {r['label']} @ {r['length']}: {r['message']}" for r in results
           if r["status"] in ("oom", "error") and r.get("message")]
  if notes:
    lines += ["", "Failures:", ""] + [n.replace("\n", " ")[:300] for n in notes]

  baseline = resolve_baseline(results, baseline)
  if baseline:
    rel = relative_to(results, baseline)
    lengths = sorted({r["length"] for r in results})
    lines += ["", f"## Relative to {baseline} (speed x / memory x)", "",
              f"speed = {baseline} step time / step time; memory = peak memory / {baseline} "
              "peak memory (LRA Table 2 style: Luna-256 4.9x / 0.16x at 4K on TPU v3).", "",
              "| mechanism | " + " | ".join(str(n) for n in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for label, cells in rel.items():
      row = []
      for n in lengths:
        c = cells.get(n, "-")
        row.append(c if isinstance(c, str) else f"{c[0]:.2f}x / {_fmt(c[1], '.2f')}x")
      lines.append(f"| {label} | " + " | ".join(row) + " |")

  t_slopes = slopes(results, "step_time_s", tail)
  m_slopes = slopes(results, "peak_memory_bytes", tail)
  t_counts = fit_counts(results, "step_time_s", tail)
  m_counts = fit_counts(results, "peak_memory_bytes", tail)
  lines += ["", f"## Log-log exponents ({fit_heading(t_counts, tail)})", "",
            "| mechanism | step time ~ N^k | memory ~ N^k | lengths fitted |", "|---|---|---|---|"]
  for label in _labels(results):
    n_t, n_m = t_counts[label], m_counts[label]
    counts = str(n_t) if n_t == n_m else f"{n_t} (memory {n_m})"
    lines.append(f"| {label} | {_fmt(t_slopes[label], '.2f')} | {_fmt(m_slopes[label], '.2f')} "
                 f"| {counts} |")
  return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: str, title: str, tail: int) -> None:
  """Two log-log panels (step time, peak memory vs length) with fitted exponents in legends."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  panels = (("step_time_s", "step time (s)"), ("peak_memory_bytes", "peak memory (bytes)"))
  for ax, (key, ylabel) in zip(axes, panels):
    fitted = slopes(results, key, tail)
    for label in _labels(results):
      pts = sorted((r["length"], r[key]) for r in results
                   if r["label"] == label and r["status"] == "ok" and r[key])
      if not pts:
        continue
      k = fitted[label]
      name = f"{label} (N^{k:.2f})" if math.isfinite(k) else label
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="sequence length N", ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_json(report: dict[str, Any], path: str | None) -> None:
  """Writes `report` to `path` (atomically; nothing without a path)."""
  if not path:
    return
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(tmp, path)


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
  """One report from several JSON reports (e.g. an XLA run and a fused-kernel run)."""
  reports = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  merged = dict(reports[0])
  merged["merged_from"] = [{"path": str(p), "command": r["command"], "date": r["date"],
                            "matmul_peak_flops": r.get("matmul_peak_flops")}
                           for p, r in zip(paths, reports)]
  merged["command"] = " + ".join(r["command"] for r in reports)
  merged["results"] = [row for r in reports for row in r["results"]]
  return merged


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> str:
  """Writes the JSON, markdown and plot that were asked for; returns the markdown."""
  write_json(report, args.json)
  baseline = None if args.compare_speedup.lower() == "none" else args.compare_speedup
  markdown = to_markdown(report, baseline, args.fit_tail)
  if args.markdown:
    pathlib.Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.markdown).write_text(markdown)
  if args.plot:
    pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    first = report["results"][0] if report["results"] else {}
    plot(report["results"], args.plot,
         f"{first.get('mode')} mode, {first.get('dtype')}, B={first.get('batch')}, "
         f"D={first.get('dim')}, H={first.get('heads')}, {report['device']}", args.fit_tail)
  print(markdown, flush=True)
  return markdown


def row_line(row: dict[str, Any]) -> str:
  """One console line per finished point."""
  return (f"{row['label']:>16} N={row['length']:<6} {row['status']:<7} "
          f"step {_fmt(row['step_time_s'], '.2f', 1e3)} ms  "
          f"mem {_fmt(row['peak_memory_bytes'], '.1f', 2**-20)} MiB  "
          f"compile {_fmt(row['compile_time_s'], '.1f')} s"
          + (f"  ({row['message'][:160]})" if row.get("message") else ""))
