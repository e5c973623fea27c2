"""benchmarks/xla_flags.py on a tiny model: each variant's environment reaches its worker
(no timing assertions)."""
import json

from benchmarks import xla_flags

TINY = ("configs/listops.py:luna,quick,seq_len=32,batch_size=4,model.emb_dim=16,"
        "model.mlp_dim=32,model.num_heads=2,model.classifier_dim=16,model.num_layers=1")


def test_variants_run_in_their_own_environment_and_report_time_and_peak_rss(tmp_path,
                                                                          monkeypatch):
  monkeypatch.setenv("LUNA_JAX_MALLOC", "system")   # main() would re-execute pytest with tcmalloc
  monkeypatch.setenv("XLA_FLAGS", "")               # one host device, not the tests' 8
  xla_flags.main(["--config", TINY, "--min_len", "8", "--max_len", "24", "--warmup", "0",
                  "--repeats", "1", "--variants", "default,async CPU dispatch",
                  "--out_json", str(tmp_path / "r.json"), "--out_md", str(tmp_path / "r.md")])
  rows = {r["variant"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
  assert set(rows) == {"default", "async CPU dispatch"}
  for row in rows.values():
    assert row["wall_ms"] > 0 and row["peak_rss_mb"] > 50, row
  # The trainer's setting (inline CPU dispatch) unless the variant's environment says otherwise.
  assert [r["cpu_dispatch"] for r in rows["default"]["runs"]] == ["sync"]
  assert [r["cpu_dispatch"] for r in rows["async CPU dispatch"]["runs"]] == ["async"]
  assert "LUNA_JAX_CPU_DISPATCH=async" in rows["async CPU dispatch"]["flags"]
  table = (tmp_path / "r.md").read_text()
  assert "| async CPU dispatch | `LUNA_JAX_CPU_DISPATCH=async` |" in table
