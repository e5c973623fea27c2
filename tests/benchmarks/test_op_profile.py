"""benchmarks/op_profile.py on a tiny Luna layer (no timing assertions)."""
import pytest

from benchmarks import op_profile

HLO = """HloModule m

%fused_computation.1 (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %neg = f32[4,8]{1,0} negate(%a), metadata={op_name="jit(f)/neg"}
  ROOT %ynn_fusion.1 = f32[4,2]{1,0} fusion(%neg, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(f)/dot_general"}
}
"""


def test_hlo_ops_finds_dots_inside_fusions():
  ops = op_profile.hlo_ops(HLO)
  assert ops["ynn_fusion.1"]["dot"] and ops["ynn_fusion.1"]["op_name"] == "jit(f)/dot_general"
  assert not ops["neg"]["dot"] and ops["neg"]["shape"] == "f32[4,8]{1,0}"


def test_profile_of_a_tiny_layer_names_dots_and_other_ops(tmp_path):
  rep = op_profile.main(["--what", "layer", "--n", "128", "--l", "4", "--dim", "16",
                         "--heads", "2", "--ffn", "32", "--steps", "2", "--warmup", "1",
                         "--top", "50", "--out_md", str(tmp_path / "p.md")])
  assert rep["dot_ops"] >= 8 and rep["other_ops"] >= 8      # FFN, projections, attention
  assert rep["dot_ms"] > 0 and rep["other_ms"] > 0 and rep["wall_ms"] > 0
  assert {t["kind"] for t in rep["top"]} == {"dot", "other"}
  assert any("ffn" in t["source"] for t in rep["top"])
  table = (tmp_path / "p.md").read_text()
  assert table.count("\n| ") == len(rep["kinds"]) + 1 + len(rep["top"]) + 1   # 2 headers
  assert all(f"| {t['op']} |" in table for t in rep["top"])


def test_profile_of_the_trainers_step_sums_op_kinds():
  tiny = ("configs/listops.py:luna,quick,seq_len=32,batch_size=4,model.emb_dim=16,"
          "model.mlp_dim=32,model.num_heads=2,model.classifier_dim=16,model.num_layers=1")
  rep = op_profile.main(["--config", tiny, "--min_len", "8", "--max_len", "24", "--steps", "2",
                         "--warmup", "1", "--top", "1000"])
  assert rep["step"].startswith("train_step of configs/listops.py")
  kinds = {k["kind"]: k for k in rep["kinds"]}
  assert sum(k["ms"] for k in rep["kinds"]) == pytest.approx(rep["dot_ms"] + rep["other_ms"])
  assert sum(k["ops"] for k in rep["kinds"]) == rep["dot_ops"] + rep["other_ops"]
  assert kinds["dots (any op or fusion with a dot)"]["ops"] == rep["dot_ops"]
  assert any("optimizer" in t["source"] or "adam" in t["source"].lower() or
             "Classifier" in t["source"] for t in rep["top"])
  assert op_profile.op_kind("copy_bitcast_fusion.12") == "copy_bitcast_fusion"
