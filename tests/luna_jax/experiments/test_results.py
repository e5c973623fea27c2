"""luna_jax.experiments.results on fake workdirs: aggregation, statuses, averages, published rows, plots."""
from __future__ import annotations

import csv
import json
import math
import os
import types

import pytest
from PIL import Image

from luna_jax.experiments import plots, results, runs

TASKS5 = ("listops", "text", "retrieval", "image", "pathfinder")


def fake_run(root, name, task="listops", attention="luna", seed=0, *, proj_len=256,
             test=0.5, val=0.5, lr=1e-4, status="finished", steps_per_s=10.0, params=1000,
             peak=None, last_step=100, failed_text="", protocol=None, data=None):
  """Writes a workdir as the trainer would: config.json, metrics.jsonl, results.json.
  protocol defaults to the one a plain config of `attention` has; data to official files."""
  protocol = protocol or ("luna_paper" if attention == "luna" else "lra_reference")
  data = data or {"source": "official", "files": {"x.tsv": "0" * 64}}
  wd = os.path.join(root, name)
  os.makedirs(os.path.join(wd, "checkpoints", str(last_step)))
  config = {"task": task, "seed": seed, "learning_rate": lr, "num_train_steps": 100,
            "data_dir": f"/data/{seed}", "protocol": protocol,
            "model": {"attention": attention, "proj_len": proj_len}}
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(config, f)
  loss = math.nan if status == "diverged" else 0.7
  recs = [{"step": 0, "num_params": params}]
  for step in range(10, last_step + 1, 10):
    rec = {"step": step, "train_loss": loss if step == last_step else 0.9,
           "steps_per_s": steps_per_s, "val_accuracy": val * step / last_step}
    if peak:
      rec["peak_memory_bytes"] = peak
    recs.append(rec)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in recs)
  if status == "finished":
    with open(os.path.join(wd, "results.json"), "w") as f:
      json.dump({"task": task, "attention": attention, "proj_len": proj_len, "seed": seed,
                 "num_params": params, "step": last_step, "num_train_steps": 100,
                 "finished": True, "best_val_accuracy": val, "best_step": last_step,
                 "test_accuracy": test, "test_loss": 1.0, "steps_per_s": steps_per_s,
                 "protocol": protocol, "data": data}, f)
  if failed_text:
    with open(os.path.join(wd, runs.FAILED_FILE), "w") as f:
      f.write(failed_text)
  return wd


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_two_seeds_give_mean_and_std(tmp_path):
  fake_run(tmp_path, "listops/luna_l256_s0", seed=0, test=0.40)
  fake_run(tmp_path, "listops/luna_l256_s1", seed=1, test=0.50)
  rows = results.aggregate(results.load_runs([str(tmp_path)]))
  assert len(rows) == 1 and rows[0].selected     # data_dir and seed do not split variants
  row = rows[0]
  assert (row.task, row.mechanism, len(row.test)) == ("listops", "luna-256", 2)
  assert row.mean == pytest.approx(45.0)
  assert row.std == pytest.approx(math.sqrt(50.0))
  md = results.markdown(results.load_runs([str(tmp_path)]), rows, str(tmp_path), False)
  assert "45.00 ± 7.07 (n=2)" in md


def test_statuses_unfinished_diverged_failed(tmp_path):
  fake_run(tmp_path, "a/done", seed=0)
  fake_run(tmp_path, "a/killed", seed=1, status="unfinished", last_step=30)
  fake_run(tmp_path, "a/nan", seed=2, status="diverged", last_step=40)
  fake_run(tmp_path, "a/nan_marker", seed=3, status="unfinished",
           failed_text="NonFiniteLossError: training loss became NaN/Inf at step 7")
  fake_run(tmp_path, "a/oom", seed=4, status="unfinished", failed_text="RESOURCE_EXHAUSTED")
  runs = {os.path.basename(r.workdir): r for r in results.load_runs([str(tmp_path)])}
  assert {k: r.status for k, r in runs.items()} == {
      "done": "finished", "killed": "unfinished", "nan": "diverged", "nan_marker": "diverged",
      "oom": "failed"}
  assert runs["killed"].step == 30 and runs["killed"].test_accuracy is None
  rows = results.aggregate(runs.values())
  assert len(rows) == 1 and len(rows[0].runs) == 1    # only the finished run is aggregated
  md = results.markdown(list(runs.values()), rows, str(tmp_path), False)
  unfinished = md.split("## Unfinished runs")[1].split("##")[0]
  assert "a/killed" in unfinished and "| 30 | 100 |" in unfinished
  diverged = md.split("## Diverged runs")[1].split("##")[0]
  assert "a/nan " in diverged and "a/nan_marker" in diverged and "a/killed" not in diverged
  assert "a/oom" in md.split("## Failed runs")[1]


def test_averages_only_with_all_tasks(tmp_path):
  for t in TASKS5:
    fake_run(tmp_path, f"{t}/softmax", t, "softmax", test=0.6)
    if t != "image":
      fake_run(tmp_path, f"{t}/luna", t, "luna", proj_len=16, test=0.7)
  report = results.write_report([str(tmp_path)], str(tmp_path / "out"))
  rows = read_csv(report["files"]["results.csv"])
  avgs = {(r["task"], r["mechanism"]): float(r["test_acc_mean"]) for r in rows
          if r["task"].startswith("avg")}
  assert avgs == {("avg5", "softmax"): pytest.approx(60.0)}   # luna-16 lacks Image; no Path-X
  md = open(report["files"]["results.md"]).read()
  table = md.split("## Per task")[0]
  assert "Avg (5 tasks)" in table and "Avg (6 tasks)" not in table
  luna_line = next(line for line in table.splitlines() if line.startswith("| luna-16"))
  assert luna_line.rstrip(" |").endswith("—")


def test_six_task_average_kept_apart(tmp_path):
  for t in TASKS5 + ("pathx",):
    fake_run(tmp_path, f"{t}/softmax", t, "softmax", test=0.5 if t == "pathx" else 0.8)
  rows = read_csv(results.write_report([str(tmp_path)], str(tmp_path / "o"))["files"]
                  ["results.csv"])
  avgs = {r["task"]: float(r["test_acc_mean"]) for r in rows if r["task"].startswith("avg")}
  assert avgs == {"avg5": pytest.approx(80.0), "avg6": pytest.approx(75.0)}


def test_variants_select_best_validation_and_relative_speed(tmp_path):
  # Speeds are compared within one protocol (same model sizes), never across protocols.
  fake_run(tmp_path, "lo", "listops", "luna", lr=1e-4, val=0.3, test=0.9, steps_per_s=20.0,
           protocol="small")
  fake_run(tmp_path, "hi", "listops", "luna", lr=1e-3, val=0.6, test=0.5, steps_per_s=20.0,
           protocol="small")
  fake_run(tmp_path, "sm", "listops", "softmax", steps_per_s=5.0, protocol="small")
  fake_run(tmp_path, "other", "listops", "softmax", steps_per_s=1.0)
  rows = results.aggregate(results.load_runs([str(tmp_path)]))
  luna = [r for r in rows if r.mechanism == "luna-256"]
  assert sorted(r.variant for r in luna) == ["learning_rate=0.0001", "learning_rate=0.001"]
  assert [r.variant for r in luna if r.selected] == ["learning_rate=0.001"]
  speeds = results.relative_speeds(results.selected_table(rows, ("small", "official")))
  assert speeds["luna-256"]["listops"] == pytest.approx(4.0)


def test_published_rows_are_labelled_and_beside_their_protocol_only(tmp_path):
  fake_run(tmp_path, "r", "listops", "luna", data={"source": "official", "files": {},
                                                   "tokens": "fairseq"})
  plain = results.write_report([str(tmp_path)], str(tmp_path / "plain"))
  assert all(r["source"] == "measured" for r in read_csv(plain["files"]["results.csv"]))
  assert "published:" not in open(plain["files"]["results.md"]).read()
  report = results.write_report([str(tmp_path)], str(tmp_path / "pub"), with_published=True)
  rows = read_csv(report["files"]["results.csv"])
  measured = [r for r in rows if r["source"] == "measured"]
  published = [r for r in rows if r["source"] != "measured"]
  assert len(measured) == 1 and all(r["source"].startswith("published: ") for r in published)
  assert {r["protocol"] for r in published} == {"luna_paper"}     # no LRA or small rows
  luna256 = {r["task"]: r["test_acc_mean"] for r in published if r["mechanism"] == "Luna-256"}
  assert luna256["listops"] == "37.98" and luna256["avg5"] == "61.95"
  md = open(report["files"]["results.md"]).read()
  section = md.split("## Luna paper recipes")[1].split("\n## ")[0]
  published_line = next(ln for ln in section.splitlines() if "published: Luna-256" in ln)
  assert "37.98" in published_line and "[Luna paper" in published_line
  assert "37.98" not in next(ln for ln in section.splitlines() if ln.startswith("| luna-256"))
  assert "LRA Table 1" not in section and "Skyformer" not in section
  assert "Published tables not shown" in md and "LRA Table 1" in md.split("not shown")[1]


def test_data_label_of_generated_listops_is_the_same_under_the_old_module_name():
  settings = {"num_train": 96000, "seed": 0}
  old = {"source": "generated", "generator": "lra_tasks.listops", "settings": settings}
  new = {"source": "generated", "generator": "lra_tasks.listops_generator",
         "generator_version": 1, "settings": settings, "files": {"basic_val.tsv": "0" * 64}}
  assert runs.data_label(old) == runs.data_label(new) == (
      "generated: lra_tasks.listops_generator (num_train=96000, seed=0)")


def test_protocols_and_data_sources_never_share_a_table(tmp_path):
  generated = {"source": "generated", "generator": "lra_tasks.listops",
               "settings": {"num_train": 96000, "seed": 0}}
  fake_run(tmp_path, "small_gen", "listops", "softmax", protocol="small", data=generated,
           test=0.30)
  fake_run(tmp_path, "small_off", "listops", "softmax", protocol="small", test=0.37)
  fake_run(tmp_path, "quick", "listops", "softmax", protocol="quick", data=generated, test=0.9)
  fake_run(tmp_path, "ref", "listops", "softmax", test=0.36)
  runs = results.load_runs([str(tmp_path)])
  rows = results.aggregate(runs)
  assert len(rows) == 4 and all(r.selected for r in rows)      # four separate groups
  md = results.markdown(runs, rows, str(tmp_path), True).split("Published tables not shown")[0]
  sections = {s.split("\n")[0]: s for s in md.split("\n## ")[1:]}
  small_gen = next(v for k, v in sections.items() if k.startswith("small") and "generated" in k)
  small_off = next(v for k, v in sections.items() if k.startswith("small") and "official" in k)
  quick = next(v for k, v in sections.items() if k.startswith("quick"))
  reference = next(v for k, v in sections.items() if k.startswith("LRA reference"))
  assert "30.00†" in small_gen and "37.00" not in small_gen and "generated data" in small_gen
  assert "37.00 (n=1)" in small_off and "†" not in small_off.split("\n\n")[1]
  for sec in (small_gen, small_off):   # the small protocol's published rows, named
    assert "published: Transformer [Nystromformer paper" in sec
    assert "LUNA (learned kernel) [LUNA learned kernel" in sec and "(protocol not stated)" in sec
    assert "LRA Table 1" not in sec and "Luna paper" not in sec and "Skyformer paper" not in sec
  assert "90.00†" in quick and "published:" not in quick
  assert "36.00 (n=1)" in reference and "published: Transformer [LRA Table 1" in reference
  assert "Skyformer" not in reference


@pytest.mark.parametrize("with_softmax,peak", [(True, 2**30), (False, None)])
def test_plots_are_valid_pngs(tmp_path, with_softmax, peak):
  mechs = [("luna", 16), ("luna", 256), ("performer", 256)]
  if with_softmax:
    mechs.append(("softmax", 256))
  for t in TASKS5:
    for i, (att, l) in enumerate(mechs):
      for seed in (0, 1):
        fake_run(tmp_path, f"{t}/{att}{l}_s{seed}", t, att, seed, proj_len=l,
                 test=0.4 + 0.05 * i + 0.01 * seed, steps_per_s=5.0 + i, peak=peak)
  report = results.write_report([str(tmp_path)], str(tmp_path / "out"), with_published=True)
  names = [n for n in report["files"] if n.endswith(".png")]
  assert sorted(names) == sorted(f"{kind}_{p}_official{i}.png"
                                 for i, p in enumerate(("luna_paper", "lra_reference"))
                                 for kind in ("accuracy", "speed_accuracy", "curves"))
  for name in names:
    path = report["files"][name]
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
      assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 400


def test_cli_writes_files(tmp_path, capsys):
  fake_run(tmp_path / "runs", "listops/softmax", "listops", "softmax")
  assert results.main(["--root", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 0
  assert "| softmax | 50.00 (n=1) |" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "o")) == [
      "accuracy_lra_reference_official0.png", "curves_lra_reference_official0.png",
      "results.csv", "results.md", "runs.csv", "speed_accuracy_lra_reference_official0.png"]


def test_published_rows_by_protocol_and_listops_token_set(tmp_path):
  bracket_free = {"source": "official", "files": {"x.tsv": "0" * 64}, "tokens": "no_brackets"}
  brackets = {"source": "official", "files": {"x.tsv": "0" * 64}, "tokens": "brackets"}
  fake_run(tmp_path, "sky", "listops", "softmax", protocol="skyformer", data=bracket_free,
           test=0.38)
  fake_run(tmp_path, "small", "listops", "softmax", protocol="small", data=brackets, test=0.36)
  runs = results.load_runs([str(tmp_path)])
  md = results.markdown(runs, results.aggregate(runs), str(tmp_path), True)
  sections = {s.split("\n")[0]: s for s in md.split("\n## ")[1:]}
  sky = next(v for k, v in sections.items() if k.startswith("Skyformer protocol"))
  small = next(v for k, v in sections.items() if k.startswith("small-model"))
  assert "tokens no_brackets" in next(iter(k for k in sections if k.startswith("Skyformer")))
  line = next(ln for ln in sky.splitlines() if "published: Self-Attention" in ln)
  assert "| 38.37 |" in line and "| 61.95 |" in line     # same protocol, same token set
  assert "Nystromformer paper" not in sky
  unverified = next(ln for ln in sky.splitlines() if "Transformer (unverified)" in ln)
  assert "(protocol not stated) (unverified)" in unverified
  # Runs of the `brackets` token set: the bracket-free published ListOps cells are not shown.
  line = next(ln for ln in small.splitlines() if "published: Transformer [Nystromformer" in ln)
  assert "37.10" not in line and "65.02" in line
  assert "its ListOps number is not shown" in small


def test_verified_published_averages_are_the_means_of_their_rows():
  """The tables read this session (Nystromformer, Skyformer): each Avg is its row's mean, so a
  mistyped number fails here."""
  from luna_jax.experiments import published as pub
  for src in (pub.NYSTROMFORMER, pub.SKYFORMER):
    for model, vals in pub.PUBLISHED[src].items():
      tasks = TASKS5 if "avg5" in vals else TASKS5 + ("pathx",)
      avg = vals.get("avg5", vals.get("avg6"))
      nums = [vals[t] for t in tasks if isinstance(vals.get(t), float)]
      if avg is not None and len(nums) == len(tasks):
        assert abs(sum(nums) / len(nums) - avg) < 0.006, (src.name, model)


def test_a_damaged_run_is_listed_as_unreadable_and_the_report_goes_on(tmp_path, capsys):
  fake_run(tmp_path / "runs", "listops/softmax", "listops", "softmax")
  bad = fake_run(tmp_path / "runs", "listops/softmax_s1", "listops", "softmax", seed=1)
  with open(os.path.join(bad, "metrics.jsonl"), "a") as f:
    f.write("garbage\n{\"step\": 1}\n")
  assert results.main(["--root", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 0
  out = capsys.readouterr()
  assert "| softmax | 50.00 (n=1) |" in out.out
  assert "## Unreadable runs" in out.out
  assert f"DamagedFileError: {bad}/metrics.jsonl:12: not a JSON object" in out.out
  assert "(1 finished, 0 unfinished, 0 diverged, 0 failed, 1 unreadable, 0 copy)" in out.err


def test_a_missing_root_is_an_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    results.main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      f"python -m luna_jax.experiments.results: error: FileNotFoundError: --root "
      f"{tmp_path / 'nowhere'}: no such folder\n")
  assert not (tmp_path / "o").exists()


def test_two_copies_of_one_run_are_one_run(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  first = fake_run(tmp_path, "listops/luna_s0", seed=0, test=0.40)
  shutil.copytree(first, tmp_path / "old" / "luna_s0")
  fake_run(tmp_path, "listops/luna_s1", seed=1, test=0.50)
  runs = results.load_runs([str(tmp_path)])
  copy = next(r for r in runs if r.workdir == str(tmp_path / "old" / "luna_s0"))
  assert copy.status == "copy" and first in copy.message
  rows = results.aggregate(runs)
  assert len(rows) == 1 and len(rows[0].test) == 2
  md = results.markdown(runs, rows, str(tmp_path), False)
  assert "45.00 ± 7.07 (n=2)" in md and "## Copies of a run (counted once)" in md


def test_seeds_column_gives_count_and_seeds():
  row = types.SimpleNamespace(runs=[types.SimpleNamespace(seed=0)])
  assert results.seeds_cell(row) == "1 (seed 0)"
  row.runs.append(types.SimpleNamespace(seed=2))
  assert results.seeds_cell(row) == "2 (seeds 0, 2)"


def test_plot_titles_fit_the_figure():
  fig = plots._figure(7.5, 4.5)
  ax = fig.subplots()
  plots._set_title(ax, "Accuracy vs step\n" + "a very long group title " * 8, 8)
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  renderer = FigureCanvasAgg(fig).get_renderer()
  fig.tight_layout()
  box = ax.title.get_window_extent(renderer)
  assert box.x0 >= 0 and box.x1 <= fig.bbox.width
