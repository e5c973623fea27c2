r"""Side-by-side CPU timing: the PyTorch rendering of the official Luna vs this project's JAX.

For every point (N, l) and every module in --what, one training-style step is timed on each side:
forward + backward of loss = sum(out) + sum(pcontext) (attention) or sum(x') + sum(p') (encoder
layer), float32, CPU, no dropout, with gradients with respect to all parameters and both inputs
(x and P).

* torch: `benchmarks/torch_reference/luna_torch.py` (a clean-room rendering of the official
  `LunarMultiheadAttention` / `LunaSentenceEncoderLayer`, validated against the official reference
  vectors; the official op structure), eager autograd, time-major [N, B, D].
* jax: the library modules as they are, `luna_jax.attention.luna.LunaAttention` and
  `luna_jax.models.EncoderLayer` (attention="luna"), `jax.jit(jax.value_and_grad(loss, argnums=(params, x, p)))`,
  batch-major [B, N, D].

Both sides get the same inputs (numpy, fixed seed) and the same padding: the last --pad_frac of
the positions of the last example are padding (the pack keys are masked there). Weights are each
side's own random init (timing does not depend on them; tests/benchmarks/test_torch_reference.py
proves the two compute the same function).

Every measurement runs in its own fresh subprocess, so the peak RSS (raw ru_maxrss of that
process, nothing subtracted) belongs to one implementation at one point; the baseline RSS of an
idle subprocess of each kind (`import torch` / `import jax` only, and after one tiny op) is
reported next to it as the framework's own overhead. Per point the subprocesses alternate
torch, jax, torch, jax ... (--rounds pairs); each runs --warmup untimed steps (the first one
includes JAX's compilation, reported separately) and then --repeats timed steps, of which the
median is kept. The per-point figure is the median over rounds; ratio = torch_ms / jax_ms
(> 1: JAX faster).

torch is run at its best: its CPU build uses GNU OpenMP, whose spinning worker threads collapse
when another process holds a core (measured on a busy 2-core host: one layer step 780 ms with the
default policy, 45 ms with OMP_WAIT_POLICY=PASSIVE, 63 ms single-threaded), while on an idle host
spinning is usually the faster choice. So every torch measurement is made under each policy of
--torch_omp_wait_policy (default: `default,passive`; `default` = the variable unset) and the
faster one is the torch figure; all variants are kept in the JSON. Load averages before and after each point, versions, thread counts, the CPU
model and the date are recorded.

Usage, from the repository root (needs `pip install -r benchmarks/requirements-torch.txt`):
  python benchmarks/compare_torch.py                               # N 1024,4096,16384 x l 16,256
  python benchmarks/compare_torch.py --points 1024:16 --what attention
  python benchmarks/compare_torch.py --lengths 4096 --proj_lens 16,256 --rounds 3 \
      --out_json benchmarks/out/torch_vs_jax.json --out_md benchmarks/out/torch_vs_jax.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]

from luna_jax import runtime  # noqa: E402  (no JAX import: safe in the parent and torch workers)

IMPLS = ("torch", "jax")
WHATS = ("attention", "layer")
RESULT_PREFIX = "RESULT "


# ----------------------------------------------------------------------------- helpers

def rss_mb() -> float:
  """Peak resident set size of this process so far, MB (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def loadavg() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def parse_ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t.strip()]


def parse_points(args: argparse.Namespace) -> list[tuple[int, int]]:
  if args.points:
    points = []
    for item in args.points.split(","):
      n, _, l = item.strip().partition(":")
      if not l:
        raise SystemExit(f"--points: {item!r} is not N:l")
      points.append((int(n), int(l)))
    return points
  return [(n, l) for n in parse_ints(args.lengths) for l in parse_ints(args.proj_lens)]


def make_inputs(n: int, l: int, b: int, d: int, pad_frac: float, seed: int):
  """Batch-major x [B,N,D], p [B,l,D] and the padding mask [B,N] (True = pad), numpy."""
  import numpy as np
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, n, d), dtype=np.float32)
  p = rng.standard_normal((b, l, d), dtype=np.float32)
  pad = np.zeros((b, n), bool)
  num_pad = int(round(pad_frac * n))
  if num_pad:
    pad[-1, n - num_pad:] = True
  return x, p, pad


def time_steps(step, warmup: int, repeats: int) -> dict[str, Any]:
  """Runs `step` (which must block until its result is ready) warmup + repeats times."""
  t0 = time.perf_counter()
  step()
  first_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    step()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    step()
    times.append((time.perf_counter() - t0) * 1e3)
  return {"first_step_s": first_s, "times_ms": times, "median_ms": statistics.median(times),
          "min_ms": min(times)}


def write_outputs(json_path: str, report: dict[str, Any], md_path: str, md: str) -> None:
  """Writes the report as JSON and the markdown table, each where a path is given."""
  for path, text in ((json_path, json.dumps(report, indent=1) + "\n"), (md_path, md)):
    if path:
      pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(path).write_text(text)


# ----------------------------------------------------------------------------- workers

def worker_baseline(impl: str) -> dict[str, Any]:
  """An idle subprocess of the same kind: import the framework only, then one tiny op."""
  if impl == "torch":
    import torch
    after_import = rss_mb()
    torch.zeros(8).add_(1).sum().item()
    return {"import_rss_mb": after_import, "tiny_op_rss_mb": rss_mb(),
            "versions": {"torch": torch.__version__}, "threads": torch.get_num_threads()}
  import jax
  after_import = rss_mb()
  import jax.numpy as jnp
  jax.block_until_ready(jnp.zeros(8) + 1)
  return {"import_rss_mb": after_import, "tiny_op_rss_mb": rss_mb(),
          "versions": {"jax": jax.__version__}, "backend": jax.default_backend()}


def worker_torch(args: argparse.Namespace) -> dict[str, Any]:
  import numpy as np
  import torch
  from benchmarks.torch_reference.luna_torch import LunaAttentionTorch, LunaEncoderLayerTorch
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(args.seed)
  x_np, p_np, pad_np = make_inputs(args.n, args.l, args.batch, args.dim, args.pad_frac, args.seed)
  if args.what == "attention":
    module = LunaAttentionTorch(args.dim, args.heads)
  else:
    module = LunaEncoderLayerTorch(args.dim, args.ffn, args.heads)
  module.eval()  # no dropout (rates are 0 anyway); autograd still runs
  x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(1, 0, 2))).requires_grad_(True)
  p = torch.from_numpy(np.ascontiguousarray(p_np.transpose(1, 0, 2))).requires_grad_(True)
  pad = torch.from_numpy(pad_np) if pad_np.any() else None
  leaves = [x, p, *module.parameters()]
  setup_rss = rss_mb()
  box = {}

  def step():
    for t in leaves:
      t.grad = None
    y, yp = module(x, p, pad)
    loss = y.sum() + yp.sum()
    loss.backward()
    box["loss"] = loss.item()

  res = time_steps(step, args.warmup, args.repeats)
  res.update(setup_rss_mb=setup_rss, peak_rss_mb=rss_mb(), loss=box["loss"],
             threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
             omp_wait_policy_env=os.environ.get("OMP_WAIT_POLICY"),
             versions={"torch": torch.__version__, "numpy": np.__version__},
             num_params=sum(t.numel() for t in module.parameters()))
  return res


def jax_step(args: argparse.Namespace):
  """The JAX side's jitted step (value and gradients w.r.t. params, x and P) and its arguments
  (params, x, p, keep) for args.what at (args.n, args.l); also used by benchmarks/op_profile.py."""
  import jax
  import jax.numpy as jnp
  from luna_jax import models
  from luna_jax.attention.luna import LunaAttention
  x_np, p_np, pad_np = make_inputs(args.n, args.l, args.batch, args.dim, args.pad_frac, args.seed)
  if args.what == "attention":
    module = LunaAttention(num_heads=args.heads)
    call = lambda prm, x, keep, p: module.apply({"params": prm}, x, keep, p, None)
  else:
    cfg = models.ModelConfig(vocab_size=1, num_classes=1, max_len=1, emb_dim=args.dim,
                             num_heads=args.heads, mlp_dim=args.ffn)
    module = models.EncoderLayer(cfg)
    call = lambda prm, x, keep, p: module.apply({"params": prm}, x, keep, p, None, True)
  # Parameters do not depend on N or l: initialise on a tiny input, jitted as the trainer's
  # init is (eager init compiles every op on its own: about 13 MB more RSS at setup).
  tiny_x, tiny_p = jnp.zeros((1, 4, args.dim)), jnp.zeros((1, 2, args.dim))
  extra = () if args.what == "attention" else (None, True)
  params = jax.jit(lambda key: module.init(key, tiny_x, None, tiny_p, *extra)["params"])(
      jax.random.PRNGKey(args.seed))

  def loss(prm, x, p, keep):
    y, yp = call(prm, x, keep, p)
    return y.sum() + yp.sum()

  grad_step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  x, p = jnp.asarray(x_np), jnp.asarray(p_np)
  keep = jnp.asarray(~pad_np) if pad_np.any() else None
  return grad_step, (params, x, p, keep)


def worker_jax(args: argparse.Namespace) -> dict[str, Any]:
  dispatch = runtime.set_cpu_dispatch()   # as train.py has it
  import jax
  import numpy as np
  grad_step, (params, x, p, keep) = jax_step(args)
  setup_rss = rss_mb()
  box = {}

  def step():
    out = grad_step(params, x, p, keep)
    jax.block_until_ready(out)
    box["loss"] = float(out[0])

  t0 = time.perf_counter()
  compiled = grad_step.lower(params, x, p, keep).compile()
  compile_s = time.perf_counter() - t0
  compiled_rss = rss_mb()
  mem = compiled.memory_analysis()
  xla_mb = {"xla_temp_mb": mem.temp_size_in_bytes / 2**20,
            "xla_total_mb": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                             + mem.output_size_in_bytes) / 2**20}
  res = time_steps(step, args.warmup, args.repeats)
  import flax
  import jaxlib
  res.update(setup_rss_mb=setup_rss, compiled_rss_mb=compiled_rss, peak_rss_mb=rss_mb(),
             loss=box["loss"], compile_s=compile_s, cpu_dispatch=dispatch, **xla_mb,
             backend=jax.default_backend(),
             cpu_count=os.cpu_count(), affinity=len(os.sched_getaffinity(0)),
             versions={"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                       "flax": flax.__version__, "numpy": np.__version__},
             num_params=int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params))))
  return res


def worker_main(args: argparse.Namespace) -> int:
  if args.baseline:
    res = worker_baseline(args.worker)
  else:
    res = (worker_torch if args.worker == "torch" else worker_jax)(args)
  print(RESULT_PREFIX + json.dumps(res), flush=True)
  return 0


# ----------------------------------------------------------------------------- parent

def run_worker(impl: str, args: argparse.Namespace, extra: Sequence[str],
               omp_policy: str | None = None) -> dict[str, Any]:
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", impl, *extra]
  env = dict(os.environ)
  if impl == "jax":
    env["JAX_PLATFORMS"] = "cpu"
  if impl == "torch" and omp_policy is not None:
    env.pop("OMP_WAIT_POLICY", None)
    if omp_policy != "default":
      env["OMP_WAIT_POLICY"] = omp_policy.upper()
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  # The same allocator for both sides (luna_jax/runtime.py: why it matters on CPU).
  env.pop("LD_PRELOAD", None)
  env[runtime.ENV] = args.malloc
  if args.malloc == "tcmalloc":
    env["LD_PRELOAD"] = runtime.tcmalloc_path()
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {"status": "timeout", "wall_s": time.perf_counter() - t0}
  wall = time.perf_counter() - t0
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      res = json.loads(line[len(RESULT_PREFIX):])
      res.update(status="ok", wall_s=wall)
      if impl == "torch":
        res["omp_wait_policy"] = omp_policy or "inherited"
      return res
  tail = (proc.stderr or proc.stdout)[-2000:]
  return {"status": "error", "returncode": proc.returncode, "wall_s": wall, "error": tail}


def point_args(args: argparse.Namespace, what: str, n: int, l: int) -> list[str]:
  out = ["--what", what, "--n", str(n), "--l", str(l), "--batch", str(args.batch),
         "--dim", str(args.dim), "--heads", str(args.heads), "--ffn", str(args.ffn),
         "--pad_frac", str(args.pad_frac), "--warmup", str(args.warmup),
         "--repeats", str(args.repeats), "--seed", str(args.seed)]
  if args.torch_threads:
    out += ["--torch_threads", str(args.torch_threads)]
  return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
  ok = [r for r in runs if r.get("status") == "ok"]
  if not ok:
    return {"status": runs[-1].get("status", "error") if runs else "error"}
  out = {"status": "ok" if len(ok) == len(runs) else "partial",
         "median_ms": statistics.median(r["median_ms"] for r in ok),
         "min_ms": min(r["min_ms"] for r in ok),
         "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}
  for key in ("compile_s", "xla_total_mb", "setup_rss_mb", "compiled_rss_mb"):
    if key in ok[0]:
      out[key] = statistics.median(r[key] for r in ok)
  # RSS the timed steps added: above setup (torch) or above setup + compilation (JAX).
  before_steps = out.get("compiled_rss_mb", out.get("setup_rss_mb"))
  if before_steps is not None:
    out["steps_rss_mb"] = statistics.median(
        r["peak_rss_mb"] - r.get("compiled_rss_mb", r["setup_rss_mb"]) for r in ok)
  return out


def fmt(v: Any, spec: str = ".1f") -> str:
  return "-" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
  m = report["meta"]
  base = report["baseline"]
  lines = [
      "# Luna: PyTorch rendering of the official modules vs luna_jax (CPU, float32)",
      "",
      f"{m['date']}; {m['cpu_model']} ({m['cpu_count']} logical CPUs); "
      f"torch {m['versions'].get('torch', '?')} ({m['torch_threads']} threads), "
      f"jax {m['versions'].get('jax', '?')} / flax {m['versions'].get('flax', '?')}; "
      f"B={m['batch']}, D={m['dim']}, {m['heads']} heads, FFN {m['ffn']}, "
      f"pad_frac {m['pad_frac']}; warmup {m['warmup']}, median of {m['repeats']}, "
      f"{m['rounds']} round(s); allocator of both sides: {m.get('malloc', 'system')}.",
      "",
      "Forward + backward of sum(outputs) w.r.t. params, x and P. ratio = torch ms / jax ms "
      "(> 1: JAX faster). Peak RSS is the raw ru_maxrss of the measuring subprocess; idle "
      f"baseline (import only / after one tiny op): torch {fmt(base['torch'].get('import_rss_mb'))}"
      f" / {fmt(base['torch'].get('tiny_op_rss_mb'))} MB, jax "
      f"{fmt(base['jax'].get('import_rss_mb'))} / {fmt(base['jax'].get('tiny_op_rss_mb'))} MB. "
      "jax XLA MB is the compiled step's own footprint (arguments + outputs + temporaries, "
      "`memory_analysis()`); back-to-back steps can hold two steps' temporaries at once (the "
      "CPU runtime frees a step's temporaries after its outputs are ready), which the peak RSS "
      "includes. jax RSS setup / compiled is the peak RSS after initialising parameters and "
      "inputs / after compiling the step (the XLA compiler's high-water mark stays in the peak); "
      "steps +MB is what the timed steps added to the peak RSS (torch: above its setup; "
      "jax: above its compiled figure).",
      "",
      "torch ms is the faster of its OpenMP wait policies (each shown in the last column).",
      "",
      "| what | N | l | torch ms | jax ms | ratio | torch RSS MB | jax RSS MB "
      "| jax RSS setup / compiled MB | steps +MB torch / jax | jax XLA MB "
      "| jax compile s | load before -> after | torch ms by OMP_WAIT_POLICY |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in report["results"]:
    t, j = r["torch"], r["jax"]
    variants = ", ".join(f"{k} {fmt(v.get('median_ms'))}" for k, v in r["torch_variants"].items())
    load = lambda a: "-" if a is None else f"{a[0]:.2f}"
    lines.append(
        f"| {r['what']} | {r['n']} | {r['l']} | {fmt(t.get('median_ms'))} | "
        f"{fmt(j.get('median_ms'))} | {fmt(r.get('ratio'), '.2f')} | "
        f"{fmt(t.get('peak_rss_mb'), '.0f')} | {fmt(j.get('peak_rss_mb'), '.0f')} | "
        f"{fmt(j.get('setup_rss_mb'), '.0f')} / {fmt(j.get('compiled_rss_mb'), '.0f')} | "
        f"{fmt(t.get('steps_rss_mb'), '.0f')} / {fmt(j.get('steps_rss_mb'), '.0f')} | "
        f"{fmt(j.get('xla_total_mb'), '.0f')} | "
        f"{fmt(j.get('compile_s'), '.2f')} | {load(r['loadavg_before'])} -> "
        f"{load(r['loadavg_after'])} | {variants} |")
    for impl in IMPLS:
      if r[impl].get("status") not in ("ok",):
        lines.append(f"|  | | | {impl}: {r[impl].get('status')} | | | | | | | | | | |")
  return "\n".join(lines) + "\n"


def parent_main(args: argparse.Namespace) -> int:
  points = parse_points(args)
  policies = [v.strip().lower() for v in args.torch_omp_wait_policy.split(",") if v.strip()]
  for v in policies:
    if v not in ("default", "passive", "active"):
      raise SystemExit(f"--torch_omp_wait_policy: {v!r} is not default, passive or active")
  whats = [w.strip() for w in args.what.split(",") if w.strip()]
  for w in whats:
    if w not in WHATS:
      raise SystemExit(f"--what: {w!r} is not one of {', '.join(WHATS)}")
  date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

  # Idle baselines, interleaved like the measurements.
  baseline_runs: dict[str, list] = {i: [] for i in IMPLS}
  for _ in range(args.rounds):
    for impl in IMPLS:
      baseline_runs[impl].append(run_worker(impl, args, ["--baseline"]))
  baseline = {}
  for impl in IMPLS:
    ok = [r for r in baseline_runs[impl] if r.get("status") == "ok"]
    baseline[impl] = ({"import_rss_mb": statistics.median(r["import_rss_mb"] for r in ok),
                       "tiny_op_rss_mb": statistics.median(r["tiny_op_rss_mb"] for r in ok)}
                      if ok else {"status": baseline_runs[impl][-1].get("status"),
                                  "error": baseline_runs[impl][-1].get("error")})

  results = []
  versions: dict[str, str] = {}
  threads = {}
  for what in whats:
    for n, l in points:
      before = loadavg()
      runs: dict[str, list] = {f"torch:{v}": [] for v in policies}
      runs["jax"] = []
      for _ in range(args.rounds):
        for impl, policy in [("torch", v) for v in policies] + [("jax", None)]:
          res = run_worker(impl, args, point_args(args, what, n, l), policy)
          runs["jax" if impl == "jax" else f"torch:{policy}"].append(res)
          versions.update(res.get("versions", {}))
          if impl == "torch" and "threads" in res:
            threads["torch"] = res["threads"]
            threads["torch_interop"] = res.get("interop_threads")
          if impl == "jax" and "affinity" in res:
            threads["jax_cpu_affinity"] = res["affinity"]
      after = loadavg()
      variants = {v: summarise(runs[f"torch:{v}"]) for v in policies}
      timed = [v for v in policies if variants[v].get("median_ms") is not None]
      best = min(timed, key=lambda v: variants[v]["median_ms"]) if timed else policies[0]
      row = {"what": what, "n": n, "l": l, "loadavg_before": before, "loadavg_after": after,
             "torch": dict(variants[best], omp_wait_policy=best), "torch_variants": variants,
             "jax": summarise(runs["jax"]), "runs": runs}
      t_ms, j_ms = row["torch"].get("median_ms"), row["jax"].get("median_ms")
      row["ratio"] = t_ms / j_ms if t_ms and j_ms else None
      row["ratio_per_round"] = [
          (a["median_ms"] / b["median_ms"]) if a.get("status") == b.get("status") == "ok"
          else None for a, b in zip(runs[f"torch:{best}"], runs["jax"])]
      results.append(row)
      print(f"{what:9s} N={n:6d} l={l:4d}  torch {fmt(t_ms):>9s} ms  jax {fmt(j_ms):>9s} ms  "
            f"ratio {fmt(row['ratio'], '.2f')}  load {before} -> {after}", file=sys.stderr,
            flush=True)

  report = {
      "meta": {"date": date, "cpu_model": runtime.cpu_model(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "python": platform.python_version(),
               "versions": versions, "torch_threads": threads.get("torch"), "threads": threads,
               "command": [sys.executable, *sys.argv], "batch": args.batch, "dim": args.dim,
               "heads": args.heads, "ffn": args.ffn, "pad_frac": args.pad_frac,
               "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds,
               "seed": args.seed, "xla_flags": os.environ.get("XLA_FLAGS"),
               "torch_omp_wait_policies": policies, "malloc": args.malloc,
               "dtype": "float32", "device": "cpu"},
      "baseline": baseline, "baseline_runs": baseline_runs, "results": results,
  }
  md = markdown(report)
  print(md)
  write_outputs(args.out_json, report, args.out_md, md)
  failed = [r for r in results
            if r["torch"].get("status") != "ok" or r["jax"].get("status") != "ok"]
  return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--what", default="attention,layer", help="attention, layer or both")
  ap.add_argument("--points", default="", help="N:l,N:l,... (overrides --lengths/--proj_lens)")
  ap.add_argument("--lengths", default="1024,4096,16384", help="sequence lengths N")
  ap.add_argument("--proj_lens", default="16,256", help="projected lengths l")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--ffn", type=int, default=1024, help="encoder layer FFN width")
  ap.add_argument("--pad_frac", type=float, default=0.1,
                  help="fraction of the last example's positions that are padding")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  ap.add_argument("--repeats", type=int, default=7, help="timed steps; the median is kept")
  ap.add_argument("--rounds", type=int, default=1, help="torch/jax subprocess pairs per point")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  ap.add_argument("--torch_omp_wait_policy", default="default,passive",
                  help="comma list of OMP_WAIT_POLICY settings for torch (default = unset, "
                       "passive, active); the fastest is the torch figure")
  ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
  ap.add_argument("--malloc", default="tcmalloc" if runtime.tcmalloc_path() else "system",
                  choices=("system", "tcmalloc"),
                  help="allocator of both sides' subprocesses (default: tcmalloc if installed)")
  ap.add_argument("--out_json", default="")
  ap.add_argument("--out_md", default="")
  # internal: one measurement in this (fresh) process
  ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
  ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--l", type=int, help=argparse.SUPPRESS)
  return ap


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.worker:
    return worker_main(args)
  return parent_main(args)


if __name__ == "__main__":
  sys.exit(main())
