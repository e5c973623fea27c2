"""benchmarks/softmax_step.py on a tiny model: both implementations run (no timing assertions)."""
import json

from benchmarks import softmax_step

TINY = ("configs/listops.py:softmax,quick,seq_len=32,batch_size=4,model.emb_dim=16,"
        "model.mlp_dim=32,model.num_heads=2,model.classifier_dim=16,model.num_layers=1")


def test_both_implementations_report_step_time_rss_and_module_time(tmp_path, monkeypatch):
  monkeypatch.setenv("LUNA_JAX_MALLOC", "system")
  monkeypatch.setenv("XLA_FLAGS", "")               # one host device, not the tests' 8
  rep = softmax_step.main(["--config", TINY, "--min_len", "8", "--max_len", "24", "--warmup",
                           "0", "--repeats", "1", "--lengths", "40",
                           "--out_json", str(tmp_path / "r.json"),
                           "--out_md", str(tmp_path / "r.md")])
  rows = {r["implementation"]: r for r in rep["steps"]}
  assert set(rows) == {"xla", "blocked"}
  for row in rows.values():
    assert row["step_ms"] > 0 and row["peak_rss_mb"] > 50, row
  (length,) = rep["lengths"]
  assert length["n"] == 40 and length["xla_ms"] > 0 and length["blocked_ms"] > 0
  assert json.loads((tmp_path / "r.json").read_text())["steps"] == rep["steps"]
  table = (tmp_path / "r.md").read_text()
  assert "| blocked |" in table and "| 40 |" in table
