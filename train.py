r"""Trains an LRA classifier. Flags only; the work is `luna_jax.trainer.train_and_evaluate`.

  python train.py --config=configs/listops.py:quick --workdir=runs/listops_quick
  python train.py --config=configs/listops.py:luna,l=16 --workdir=runs/x \
      --config.data_dir=/data/lra_release/listops-1000 --config.num_train_steps=5000

--config=FILE[:ARG]: a config file under configs/ (listops, text, retrieval, image,
  pathfinder, pathx). ARG is a comma-separated list: an attention name, `small` (the small-model
  protocol), `quick` (a CPU-minutes run), and key=value items (l=16 is model.proj_len=16).
--config.FIELD=VALUE sets any field listed below (python train.py --config=FILE --help lists
  that file's fields and values).
--workdir=DIR: output folder. Rerunning the same command resumes from its newest readable
  checkpoint; a finished run is evaluated again. With no readable checkpoint left, a folder that
  holds an earlier run's best/ and results.json is started over only with --start_over. A config that changes the model or the data of
  the checkpoints is refused; schedule changes need --config.allow_resume_changes=true.
--verbosity=0: show the libraries' INFO logging (quiet by default) and the traceback of an
  error (otherwise one line; LUNA_JAX_TRACEBACK=1 shows it too).
Multi-host: pass --coordinator_address/--num_processes/--process_id, or set
LUNA_JAX_DISTRIBUTED=1 on TPU pods and Slurm (auto-detected).
"""
import sys

from luna_jax import runtime

if __name__ == "__main__":
  runtime.preload_tcmalloc()   # before JAX starts (luna_jax/runtime.py says why)
  try:
    runtime.set_cpu_dispatch()   # before JAX's first computation (the same file says why)
  except ValueError as e:
    sys.exit(f"train.py: {e}")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import lra_tasks  # noqa: E402
from configs import common  # noqa: E402
from luna_jax import cli, metrics, resume_rules, trainer, transfer  # noqa: E402
from luna_jax import workdir as wd  # noqa: E402
from luna_jax.experiments import sweep  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it exists).")
_COORD = flags.DEFINE_string("coordinator_address", "", "Multi-process: coordinator host:port.")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
_PID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's id.")
_START_OVER = flags.DEFINE_bool(
    "start_over", False, "With no readable checkpoint, train from step 0 even if that replaces "
    "the workdir's best/ and results.json (otherwise refused).")
flags.mark_flags_as_required(["config", "workdir"])

HELP_FLAGS = ("--help", "-h", "--helpshort", "-help", "-?")
# Errors that mean bad input, not a bug: printed as one line (luna_jax/cli.py).
USER_ERRORS = (wd.ConfigError, lra_tasks.DataError, wd.CheckpointError, wd.WorkdirError,
               wd.DamagedFileError, transfer.IncompatibleSourceError,
               trainer.NonFiniteLossError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.setup_console_logging(verbose=flags.FLAGS["verbosity"].present)
  config = _CONFIG.value
  try:
    runtime.use_cpu_cores(config.batch_size)    # before JAX's CPU client exists
  except ValueError as e:
    _fail(str(e), 1)
  trainer.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  with config.unlocked():
    common.mark_overrides(config, _dotted(overrides))
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value, start_over=_START_OVER.value)
  except USER_ERRORS as e:
    cli.fail("train.py", e, wd.BUSY_EXIT_STATUS if isinstance(e, wd.WorkdirBusyError) else 1,
             traceback_too=flags.FLAGS["verbosity"].present)


def _dotted(tree: dict, prefix: str = "") -> list[str]:
  """Dotted names of the leaves of a nested override dict."""
  out = []
  for k, v in tree.items():
    out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
  return out


def _fail(message: str, code: int) -> None:
  print(f"train.py: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _config_of(argv: list[str]):
  """The config that --config names in `argv` (without overrides), or None."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  if not spec:
    return None
  file, _, arg = spec.partition(":")
  try:
    return sweep.load_module(file).get_config(arg or None)
  except Exception:  # pylint: disable=broad-except
    return None


def help_text(config=None) -> str:
  """This docstring, the flags, and the config fields with their values."""
  lines = [__doc__.rstrip(), "", "Flags:"]
  for name in ("config", "workdir", "start_over", "coordinator_address", "num_processes",
               "process_id"):
    f = flags.FLAGS[name]
    lines.append(f"  --{name}: {f.help}" + (f" (default: {f.default!r})"
                                           if f.default not in (None, "") else ""))
  lines.append("  --verbosity: 0 shows the libraries' INFO logging (default: warnings only)")
  if config is None:
    title = ("Config fields common to every task (task files add their own, such as listops.* "
             "or pathfinder.*):")
    config = common.base_config()
  else:
    title = "Config fields of this config (--config.FIELD=VALUE):"
  lines += ["", title]
  fields = resume_rules.flatten(resume_rules.config_dict(config))
  lines += [f"  {k} = {v!r}" for k, v in sorted(fields.items())]
  return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a help that lists the config fields (exit 0), and one-line errors:
  an unknown --config.FIELD names the closest valid fields."""
  if any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:]):
    rest = [a for a in argv if a.split("=", 1)[0] not in HELP_FLAGS]
    print(help_text(_config_of(rest)))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    config = _config_of(argv)
    if config is not None:
      names = resume_rules.field_names(config)
      for arg in argv[1:]:
        key = arg.split("=", 1)[0]
        if key.startswith("--config.") and key[len("--config."):] not in names:
          field = key[len("--config."):]
          close = resume_rules.closest_fields(field, names)
          hint = (f"; closest valid names: {', '.join('config.' + c for c in close)}"
                  if close else "")
          _fail(f"{key}: config has no field {field!r}{hint} (train.py --config=FILE --help "
                "lists them)", 2)
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()] or [repr(e)]
    _fail(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}", 2)
  return []


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
