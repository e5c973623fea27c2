"""benchmarks/step_ratio.py on tiny models: both steps run interleaved (data parallel over the
tests' host devices) and the ratio is the median of the per-round ratios (no timing
assertions)."""
import argparse
import statistics

from benchmarks import step_ratio

TINY = ("configs/listops.py:{},quick,seq_len=32,batch_size=8,model.emb_dim=16,model.mlp_dim=32,"
        "model.num_heads=2,model.classifier_dim=16,model.num_layers=1")


def test_interleaved_rounds_and_per_round_ratio():
  args = argparse.Namespace(config=TINY.format("learned_kernel"), baseline=TINY.format("linear_elu"),
                            vocab=16, classes=10, min_len=8, max_len=24, warmup=1, rounds=3)
  rep = step_ratio.measure(args)
  times = rep["times_s"]
  for side in ("config", "baseline"):
    assert len(times[side]["wall"]) == len(times[side]["cpu"]) == 3
    assert min(times[side]["wall"]) > 0
  want = statistics.median(a / b for a, b in zip(times["config"]["wall"], times["baseline"]["wall"]))
  assert rep["ratio_wall"] == want
  assert rep["devices"] > 1          # the tests' host devices: the batch was split over them
