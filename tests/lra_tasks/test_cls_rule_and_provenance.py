"""One CLS rule for every task (`uses_cls`), and the provenance each loader reports."""
import ml_collections
import numpy as np

from lra_tasks import common, listops
from tests.lra_tasks.test_listops import SMALL, make_config


def test_uses_cls_follows_the_readout():
  for readout, want in (("cls", True), ("first", False), ("mean", False),
                        ("mean_padded", False)):
    c = ml_collections.ConfigDict({"model": {"readout": readout}})
    assert common.uses_cls(c) is want


def test_listops_rows_start_with_cls_only_for_a_cls_readout(tmp_path):
  c = make_config(seq_len=64)
  c.model = ml_collections.ConfigDict({"readout": "cls"})
  with_cls = listops.load(c)
  c.model.readout = "mean_padded"
  without = listops.load(c)
  a, b = with_cls.splits["train"][0]["inputs"], without.splits["train"][0]["inputs"]
  assert a.shape == b.shape == (64,)
  assert a[0] == listops.CLS_ID and listops.CLS_ID not in b
  np.testing.assert_array_equal(a[1:], b[:-1])          # the same symbols, shifted by one
  prov = without.provenance
  assert prov["source"] == "generated" and prov["generator"] == "lra_tasks.listops"
  assert prov["settings"]["num_train"] == SMALL.num_train and prov["settings"]["seed"] == 3


def test_official_files_are_hashed(tmp_path):
  folder = tmp_path / "listops-1000"
  listops.generate_files(str(folder), SMALL)
  c = make_config(data_dir=str(folder))
  prov = listops.load(c).provenance
  assert prov["source"] == "official"
  assert set(prov["files"]) == set(listops.SPLIT_FILES.values())
  import hashlib
  want = hashlib.sha256((folder / "basic_val.tsv").read_bytes()).hexdigest()
  assert prov["files"]["basic_val.tsv"] == want
  assert common.file_digest(str(folder / "basic_val.tsv")) == want   # cached, same answer
