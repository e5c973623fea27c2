"""What a sweep runs: the `--mechanisms` and `--lengths` lists, and the default sizes."""
from __future__ import annotations

import dataclasses

DEFAULT_MECHANISMS = "softmax,luna:16,luna:256,cheap_linear,linear_elu,performer,learned_kernel"
DEFAULT_LENGTHS = "1024,2048,4096"
DEFAULT_LUNA_PROJ_LEN = 16
VOCAB_SIZE = 259          # 256 bytes + specials, as the Text task
NUM_CLASSES = 2
# Mode defaults for the sizes (model: LRA Table 2 Text; layer: one layer of the same width).
MODE_DEFAULTS = {
    "model": {"batch": 32, "dim": 256, "heads": 4, "layers": 4},
    "layer": {"batch": 8, "dim": 256, "heads": 4, "layers": 1},
}


@dataclasses.dataclass(frozen=True)
class MechanismSpec:
  """One entry of `--mechanisms`: `label` as typed, registry `name`, Luna's `proj_len`."""
  label: str
  name: str
  proj_len: int | None = None
  error: str | None = None      # a spec that cannot run (reported as an error row)


def parse_mechanisms(text: str) -> list[MechanismSpec]:
  """Parses "softmax,luna:16,luna:256" into specs; never raises (bad specs carry `error`)."""
  specs = []
  for label in (s.strip() for s in text.split(",")):
    if not label:
      continue
    name, _, arg = label.partition(":")
    if name != "luna":
      err = f"{name!r} takes no ':' argument" if arg else None
      specs.append(MechanismSpec(label, name, None, err))
    elif not arg:
      specs.append(MechanismSpec(label, name, DEFAULT_LUNA_PROJ_LEN))
    elif arg.isdigit() and int(arg) > 0:
      specs.append(MechanismSpec(label, name, int(arg)))
    else:
      specs.append(MechanismSpec(label, name, None, f"luna:{arg}: proj_len must be a positive int"))
  return specs


def parse_ints(text: str) -> list[int]:
  """Parses "1024,2048" into [1024, 2048]."""
  return [int(s) for s in text.split(",") if s.strip()]
