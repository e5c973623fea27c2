"""benchmarks/op_profile.py on a tiny Luna layer (no timing assertions)."""
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
  assert (tmp_path / "p.md").read_text().count("\n| ") == len(rep["top"]) + 1
