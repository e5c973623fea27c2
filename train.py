r"""Trains an LRA classifier. Flags only; the work is `luna_jax.trainer.train_and_evaluate`.

  python train.py --config=configs/listops.py:quick --workdir=runs/listops_quick
  python train.py --config=configs/listops.py:luna,l=16 --workdir=runs/x \
      --config.data_dir=/data/lra_release/listops-1000 --config.num_train_steps=5000

Rerunning the same command resumes from the latest checkpoint in --workdir.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or set
LUNA_JAX_DISTRIBUTED=1 on TPU pods and Slurm (auto-detected).
"""
from absl import app, flags
from ml_collections import config_flags

from configs import common
from luna_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it exists).")
_COORD = flags.DEFINE_string("coordinator_address", "", "Multi-process: coordinator host:port.")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
_PID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  trainer.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  config = _CONFIG.value
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  with config.unlocked():
    common.mark_overrides(config, _dotted(overrides))
  trainer.train_and_evaluate(config, _WORKDIR.value)


def _dotted(tree: dict, prefix: str = "") -> list[str]:
  """Dotted names of the leaves of a nested override dict."""
  out = []
  for k, v in tree.items():
    out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
  return out


if __name__ == "__main__":
  app.run(main)
