"""benchmarks/step_breakdown.py on a tiny model (no timing assertions)."""
import json

import pytest

from benchmarks import step_breakdown

TINY = ("configs/listops.py:luna,quick,seq_len=32,batch_size=4,model.emb_dim=16,"
        "model.mlp_dim=32,model.num_heads=2,model.classifier_dim=16,model.num_layers=1")


def test_every_part_is_timed_and_the_derived_parts_add_up(tmp_path):
  rep = step_breakdown.main(["--config", TINY, "--min_len", "8", "--max_len", "24",
                             "--warmup", "0", "--repeats", "1",
                             "--out_json", str(tmp_path / "r.json"),
                             "--out_md", str(tmp_path / "r.md")])
  ms = {p["part"]: p["ms"] for p in rep["parts"]}
  assert list(ms) == list(step_breakdown.PARTS)
  measured = set(ms) - {"layer minus attention", "embedding, readout, loss"}
  assert all(ms[k] > 0 for k in measured), ms
  assert ms["layer minus attention"] == pytest.approx(ms["encoder layer"] - ms["attention"])
  assert ms["embedding, readout, loss"] == pytest.approx(ms["forward+backward"]
                                                        - ms["encoder layer"])   # 1 layer
  assert json.loads((tmp_path / "r.json").read_text())["parts"] == rep["parts"]
  table = (tmp_path / "r.md").read_text()
  for part in step_breakdown.PARTS:
    assert f"| {part} |" in table
