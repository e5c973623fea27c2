"""python -m luna_jax.evaluate: a run folder, a committed results folder, one split's file."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from lra_tasks import listops, listops_generator
from luna_jax import evaluate, resume_rules, trainer
from luna_jax import workdir as wd
from tests.luna_jax.test_trainer import tiny_config

FIXTURE = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "listops_rows.tsv")


@pytest.fixture(name="trained", scope="module")
def fixture_trained(tmp_path_factory) -> tuple[str, dict]:
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config("softmax", steps=3)
  config.test_drop_last = True              # the evaluation reads the split as the run did
  results = trainer.train_and_evaluate(config, workdir)
  return workdir, results


def data_dir_of(workdir: str) -> str:
  config = resume_rules.load_config(workdir)
  return listops_generator.cached_data_dir(listops._settings(config))


def test_a_run_folder_reproduces_its_own_test_accuracy(trained):
  workdir, results = trained
  assert os.path.isfile(os.path.join(workdir, wd.PARAMS_FILE))
  out = evaluate.evaluate_run(workdir, data_dir_of(workdir), "test")
  assert out["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
  assert out["majority_accuracy"] == pytest.approx(results["test_majority_accuracy"], abs=1e-6)
  assert out["num_examples"] == results["test_examples"] == 16
  assert out["model"]["step"] == results["best_step"]
  assert set(out["data"]["files"]) == {"basic_test.tsv"} and out["data"]["tokens"] == "brackets"


def test_a_committed_folder_needs_only_config_and_params(trained, tmp_path):
  workdir, results = trained
  for name in (wd.CONFIG_FILE, wd.RESULTS_FILE, wd.PARAMS_FILE):
    shutil.copy(os.path.join(workdir, name), tmp_path / name)
  only_test = tmp_path / "data"
  only_test.mkdir()
  shutil.copy(os.path.join(data_dir_of(workdir), "basic_test.tsv"), only_test)
  out_file = tmp_path / "eval.json"
  evaluate.main([str(tmp_path), "--data_dir", str(only_test), "--out", str(out_file)])
  written = json.loads(out_file.read_text())
  assert written["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
  assert {"accuracy", "majority_accuracy", "num_examples", "data", "model"} <= set(written)
  assert written["model"]["params_sha256"] and written["data"]["source"] == "official"


def test_official_rows_of_the_fixture(trained, tmp_path):
  workdir, _ = trained
  shutil.copy(FIXTURE, tmp_path / "basic_test.tsv")
  # tiny_config's batch is 8 and the run drops a partial test batch: 3 rows make none.
  with pytest.raises(wd.ConfigError, match="test split has 3 examples: not one batch"):
    evaluate.evaluate_run(workdir, str(tmp_path), "test")
  cfg_file = os.path.join(workdir, wd.CONFIG_FILE)
  config = json.loads(open(cfg_file).read())
  config["test_drop_last"] = False
  other = tmp_path / "run"
  other.mkdir()
  (other / wd.CONFIG_FILE).write_text(json.dumps(config))
  shutil.copy(os.path.join(workdir, wd.PARAMS_FILE), other / wd.PARAMS_FILE)
  out = evaluate.evaluate_run(str(other), str(tmp_path), "test")
  assert out["num_examples"] == 3 and 0.0 <= out["accuracy"] <= 1.0
  assert out["majority_accuracy"] == pytest.approx(1 / 3)      # targets 9, 2, 0


def test_a_missing_split_file_is_one_line(trained, tmp_path, capsys):
  workdir, _ = trained
  with pytest.raises(SystemExit) as e:
    evaluate.main([workdir, "--data_dir", str(tmp_path), "--split", "validation"])
  assert "basic_val.tsv not found" in str(e.value) and "lra_release.gz" in str(e.value)
