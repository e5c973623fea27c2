"""Tests of the built-in ListOps generator: serialization, tree growth, files, CLI, cache key."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from lra_tasks import common, listops, listops_generator
from tests.lra_tasks.test_listops import SMALL


def shape_of(source: str) -> tuple[int, int, int]:
  """(length without parentheses, deepest operator nesting, most arguments of an operator)."""
  stack, depth, args = [], 0, 0
  tokens = source.replace("(", " ").replace(")", " ").split()
  for tok in tokens:
    if tok in listops.OPERATORS:
      if stack:
        stack[-1] += 1
      stack.append(0)
      depth = max(depth, len(stack))
    elif tok == "]":
      args = max(args, stack.pop())
    elif stack:
      stack[-1] += 1
  return len(tokens), depth, args


# ------------------------------------------------------------------------------ serialization


def test_serialize_matches_the_official_example():
  assert listops_generator.serialize(("[MAX", [2, 9])) == "( ( ( [MAX 2 ) 9 ) ] )"
  assert listops_generator.serialize(4) == "4"


def test_serialize_nested_operators():
  tree = ("[MIN", [("[MAX", [2, 9]), 3, ("[SM", [1, 2, ("[MED", [4, 5])])])
  source = listops_generator.serialize(tree)
  assert source == ("( ( ( ( [MIN ( ( ( [MAX 2 ) 9 ) ] ) ) 3 ) ( ( ( ( [SM 1 ) 2 ) "
                    "( ( ( [MED 4 ) 5 ) ] ) ) ] ) ) ] )")
  assert listops.evaluate(source) == 3
  assert shape_of(source)[0] == 7 + 2 * 4  # Leaves + 2 per operator.


# ------------------------------------------------------------------------------ generator


@pytest.fixture(scope="module")
def small_set() -> list[tuple[str, int]]:
  return list(listops_generator.generate(SMALL))


def test_generated_labels_agree_with_evaluate(small_set):
  assert len(small_set) == 200
  assert [listops.evaluate(s) for s, _ in small_set] == [t for _, t in small_set]
  assert len({t for _, t in small_set}) > 5


def test_generator_respects_bounds_and_dedupes(small_set):
  assert len({s for s, _ in small_set}) == len(small_set)
  lengths = [shape_of(s)[0] for s, _ in small_set]
  assert min(lengths) > SMALL.min_length and max(lengths) < SMALL.max_length
  shallow = listops_generator.GeneratorSettings(num_train=40, num_val=0, num_test=0,
                                                min_length=5, max_length=60, max_depth=4,
                                                max_args=3, seed=1)
  shapes = [shape_of(s) for s, _ in listops_generator.generate(shallow)]
  assert max(d for _, d, _ in shapes) <= shallow.max_depth - 1  # Leaves only at max_depth.
  assert max(a for _, _, a in shapes) == shallow.max_args


def test_generator_is_deterministic(small_set):
  assert list(listops_generator.generate(SMALL)) == small_set
  other = dataclasses.replace(SMALL, seed=4)
  assert list(listops_generator.generate(other))[:10] != small_set[:10]


def test_workers_make_the_same_examples_and_files(tmp_path, small_set):
  """Batches made by worker processes (the CLI's --workers) come back in order: same data."""
  assert list(listops_generator.generate(SMALL, workers=2)) == small_set
  listops_generator.main(["--out", str(tmp_path / "w2"), "--workers", "2"]
                         + [f"--{k}={v}" for k, v in dataclasses.asdict(SMALL).items()])
  listops_generator.generate_files(str(tmp_path / "w1"), SMALL)
  for name in listops.SPLIT_FILES.values():
    assert (tmp_path / "w2" / name).read_bytes() == (tmp_path / "w1" / name).read_bytes()

def test_same_settings_same_bytes_and_cache_key(tmp_path):
  """Cached data is found by the settings hash: data for a hash must never change. If this
  fails because generation changed on purpose, bump _GENERATOR_VERSION (and these values)."""
  assert SMALL.short_hash() == "1eb6350183b8"
  assert listops_generator.GeneratorSettings().short_hash() == "ccb43b76dfaf"
  listops_generator.generate_files(str(tmp_path), SMALL)
  digest = hashlib.sha256((tmp_path / "basic_val.tsv").read_bytes()).hexdigest()
  assert digest == "95423c8cc3d26f76be349234219aa660e6c89c12ec7cc7aec92542be8c34bb42"


@pytest.mark.parametrize("field, value", [("num_train", -1), ("max_depth", 0), ("max_args", 1),
                                          ("min_length", 99)])
def test_settings_out_of_range_are_refused(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(SMALL, **{field: value})


# ------------------------------------------------------------------------------ files and CLI


def test_generate_files_cli_and_read_back(tmp_path, small_set, capsys):
  out = tmp_path / "gen"
  args = [f"--{k}={v}" for k, v in dataclasses.asdict(SMALL).items()]
  listops_generator.main(["--out", str(out)] + args)
  assert str(out) in capsys.readouterr().out
  with open(out / "basic_val.tsv", encoding="utf-8") as f:
    assert f.readline() == "Source\tTarget\n"
  inputs, targets = listops.read_tsv(str(out / "basic_train.tsv"), 64)
  assert inputs.shape == (150, 64) and inputs.dtype == np.int32 and targets.dtype == np.int32
  np.testing.assert_array_equal(targets, [t for _, t in small_set[:150]])
  np.testing.assert_array_equal(inputs[7], listops.tokenize(small_set[7][0], 64))
  _, test_targets = listops.read_tsv(str(out / "basic_test.tsv"), 64)
  np.testing.assert_array_equal(test_targets, [t for _, t in small_set[175:]])


def test_generate_files_writes_the_generated_marker(tmp_path):
  listops_generator.generate_files(str(tmp_path / "out"), SMALL)
  with open(tmp_path / "out" / common.GENERATED_MARKER) as f:
    marker = json.load(f)
  assert marker == {"source": "generated", "generator": "lra_tasks.listops_generator",
                    "generator_version": 1, "settings": dataclasses.asdict(SMALL)}
  assert marker == listops_generator.generated_provenance(SMALL)


def test_generate_files_into_an_existing_folder_replaces_files_and_marker(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "basic_val.tsv").write_text("old")
  (out / "notes.txt").write_text("kept")
  listops_generator.generate_files(str(out), SMALL)
  assert sorted(os.listdir(out)) == sorted([*listops.SPLIT_FILES.values(),
                                            common.GENERATED_MARKER, "notes.txt"])
  assert (out / "basic_val.tsv").read_text().startswith("Source\tTarget\n")
  assert common.read_generated_marker(str(out))["settings"]["seed"] == SMALL.seed
  assert [n for n in os.listdir(tmp_path) if n != "out"] == []   # no temporary folder left


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
  def broken(s, workers=1):
    yield "[MAX 1 2 ]", 2
    raise RuntimeError("killed")
  monkeypatch.setattr(listops_generator, "generate", broken)
  with pytest.raises(RuntimeError):
    listops_generator.generate_files(str(tmp_path / "out"), SMALL)
  assert os.listdir(tmp_path) == []


def test_cached_data_dir_is_keyed_by_the_settings_hash(tmp_path, monkeypatch):
  monkeypatch.setenv("LUNA_JAX_CACHE", str(tmp_path))
  folder = listops_generator.cached_data_dir(SMALL)
  assert folder == os.path.join(str(tmp_path), "listops", SMALL.short_hash())
  assert common.read_generated_marker(folder) == listops_generator.generated_provenance(SMALL)
