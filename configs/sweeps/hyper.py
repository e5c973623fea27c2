"""A tiny sweep library: lists of `{key: value}` dicts combined by product, zip and chain.

Keys are config fields as on the command line without the `config.` prefix
(`learning_rate`, `model.proj_len`), plus three reserved keys read by `luna_jax.experiments.sweep`:
`config` (the config file, e.g. `configs/listops.py`), `arg` (its argument, e.g. `luna,l=16`)
and `name` (an optional tag appended to the run's workdir name).

  product(fixed("config", "configs/listops.py"), sweep("arg", ["luna", "softmax"]),
          sweep("seed", [0, 1]))
  -> [{config: .., arg: luna, seed: 0}, {.., arg: luna, seed: 1}, {.., arg: softmax, seed: 0},
      {.., arg: softmax, seed: 1}]
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

Sweep = list[dict[str, Any]]


def fixed(key: str, value: Any) -> Sweep:
  """One point setting `key` to `value`."""
  return [{key: value}]


def sweep(key: str, values: Iterable[Any]) -> Sweep:
  """One point per value of `key`, in the given order."""
  return [{key: v} for v in values]


def _merge(dicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for d in dicts:
    clash = set(out) & set(d)
    if clash:
      raise ValueError(f"sweep factors set the same key(s) {sorted(clash)}")
    out.update(d)
  return out


def product(*sweeps: Sweep) -> Sweep:
  """The Cartesian product (first argument outermost, last varies fastest), dicts merged."""
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sweep) -> Sweep:
  """Element-wise merge of equally long sweeps."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f"zipit needs sweeps of equal length, got lengths {[len(s) for s in sweeps]}")
  return [_merge(combo) for combo in zip(*sweeps)]


def chain(*sweeps: Sweep) -> Sweep:
  """The points of each sweep, one sweep after another."""
  return [dict(d) for s in sweeps for d in s]


def parse_arg(arg: str | None, allowed: Iterable[str]) -> tuple[set[str], dict[str, str]]:
  """Splits a sweep argument `word,key=value,...` into (words, key=value items); only keys in
  `allowed` are accepted. List values use `+`: `seeds=3,tasks=listops+text`."""
  words, kv = set(), {}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" in item:
      k, v = item.split("=", 1)
      if k not in allowed:
        raise ValueError(f"sweep argument {arg!r}: unknown key {k!r}; expected one of "
                         f"{sorted(allowed)}")
      kv[k] = v
    else:
      words.add(item)
  return words, kv
