"""Published LRA numbers (test accuracy, %), kept apart from anything measured here.

Every source names the protocol its numbers were produced under (the names of
`configs/common.py`: luna_paper, lra_reference, small) or "other". The results table shows a
published row only beside measured runs of the same protocol (`comparable_rows`). Sources as
summarised in shared/reference/recipes-and-results.md and luna.md. `FAIL` marks a Path-X entry
reported as failed (chance level); a missing task was not reported.
"""
from __future__ import annotations

import dataclasses

FAIL = "FAIL"


@dataclasses.dataclass(frozen=True)
class Source:
  """A published table: its name, the protocol it ran, and what a reader must know."""
  name: str
  protocol: str          # luna_paper | lra_reference | small | other
  note: str


LUNA = Source("Luna paper (Ma et al. 2021, camera-ready)", "luna_paper",
              "Luna recipes per task; the Transformer row is the Luna authors' re-implementation")
LRA = Source("LRA Table 1 (Tay et al. 2020)", "lra_reference",
             "LRA reference configs; Performer = the LRA configs' generalized ReLU kernel "
             "(ListOps: FAVOR+ softmax with 2 features)")
NYSTROMFORMER = Source("Nystromformer paper (Xiong et al. 2021)", "small",
                       "small-model protocol; quoted from the reference notes, which flag these "
                       "figures as from memory: check the paper before citing")
SKYFORMER = Source("Skyformer paper (Chen et al. 2021), reprinted by LUNA", "small",
                   "small-model protocol, the Skyformer authors' runs")
LEARNED_KERNEL = Source("LUNA learned kernel (Shahbazi et al. 2025)", "small",
                        "small-model protocol (most likely; LUNA reuses the Skyformer code)")
HIGH_BARS = Source("6-task high bars (with Path-X)", "other",
                   "other models and recipes (state-space models, pretraining); not comparable "
                   "with any protocol here")

_L = ("listops", "text", "retrieval", "image", "pathfinder")
_L6 = _L + ("pathx",)


def _row(tasks: tuple[str, ...], *values: float | str) -> dict[str, float | str]:
  """Task values followed by the published average (avg5 for 5 tasks, avg6 for 6); pass
  None as the average when the source gives none."""
  *accs, avg = values
  row = dict(zip(tasks, accs))
  if avg is not None:
    row["avg5" if len(tasks) == 5 else "avg6"] = avg
  return row


def _lra(*values: float) -> dict[str, float | str]:
  return {**_row(_L, *values), "pathx": FAIL}


# source -> model -> {task or avg5/avg6: accuracy}
PUBLISHED: dict[Source, dict[str, dict[str, float | str]]] = {
    LUNA: {
        "Luna-16": _row(_L, 37.43, 65.74, 79.38, 46.39, 78.36, 61.46),
        "Luna-128": _row(_L, 38.01, 65.74, 79.55, 47.47, 78.89, 61.93),
        "Luna-256": _row(_L, 37.98, 65.78, 79.56, 47.86, 78.55, 61.95),
        "Transformer (Luna re-impl.)": _row(_L, 37.11, 65.21, 79.14, 42.94, 71.83, 59.24),
    },
    LRA: {
        "Transformer": _lra(36.37, 64.27, 57.46, 42.44, 71.40, 54.39),
        "Local Attention": _lra(15.82, 52.98, 53.39, 41.46, 66.63, 46.06),
        "Sparse Trans.": _lra(17.07, 63.58, 59.59, 44.24, 71.71, 51.24),
        "Longformer": _lra(35.63, 62.85, 56.89, 42.22, 69.71, 53.46),
        "Linformer": _lra(35.70, 53.94, 52.27, 38.56, 76.34, 51.36),
        "Reformer": _lra(37.27, 56.10, 53.40, 38.07, 68.50, 50.67),
        "Sinkhorn Trans.": _lra(33.67, 61.20, 53.83, 41.23, 67.45, 51.39),
        "Synthesizer": _lra(36.99, 61.68, 54.67, 41.61, 69.45, 52.88),
        "BigBird": _lra(36.05, 64.02, 59.29, 40.83, 74.87, 55.01),
        "Linear Trans.": _lra(16.13, 65.90, 53.09, 42.34, 75.30, 50.55),
        "Performer": _lra(18.01, 65.40, 53.82, 42.77, 77.05, 51.41),
    },
    NYSTROMFORMER: {
        "Transformer": _row(_L, 37.10, 65.02, 79.35, 38.20, 74.16, None),
    },
    SKYFORMER: {
        "Transformer": _row(_L, 38.71, 61.55, 80.93, 39.14, 70.39, None),
        "Skyformer": _row(_L, 38.69, 64.70, 82.06, 40.77, 70.73, None),
    },
    LEARNED_KERNEL: {
        "LUNA (learned kernel)": _row(_L, 38.94, 73.41, 81.02, 64.32, 69.52, 65.44),
    },
    HIGH_BARS: {
        "S4": _row(_L6, 59.60, 86.82, 90.90, 88.65, 94.20, 96.35, 86.09),
        "S5": _row(_L6, 62.15, 89.31, 91.40, 88.00, 95.33, 98.58, 87.46),
        "Mega": _row(_L6, 63.14, 90.43, 91.25, 90.44, 96.01, 97.98, 88.21),
        "Transformer + self-pretraining": _row(_L6, 61.49, 91.02, 91.57, 86.04, 94.16, 92.98,
                                               86.21),
    },
}

# (protocol, our mechanism name) -> the published rows it reproduces (source, model).
COMPARABLE: dict[tuple[str, str], tuple[tuple[Source, str], ...]] = {
    ("luna_paper", "luna-16"): ((LUNA, "Luna-16"),),
    ("luna_paper", "luna-128"): ((LUNA, "Luna-128"),),
    ("luna_paper", "luna-256"): ((LUNA, "Luna-256"),),
    ("lra_reference", "softmax"): ((LRA, "Transformer"),),
    ("lra_reference", "linear_elu"): ((LRA, "Linear Trans."),),
    ("lra_reference", "performer"): ((LRA, "Performer"),),
    ("small", "softmax"): ((NYSTROMFORMER, "Transformer"), (SKYFORMER, "Transformer")),
    ("small", "learned_kernel"): ((LEARNED_KERNEL, "LUNA (learned kernel)"),),
}


def comparable_rows(protocol: str) -> list[tuple[Source, str, dict[str, float | str]]]:
  """Every published row produced under `protocol` (source, model, values)."""
  return [(src, model, vals) for src, models in PUBLISHED.items() if src.protocol == protocol
          for model, vals in models.items()]


# Byte-level Text at 4K tokens, relative to the Transformer: (speed, memory). LRA Table 2 steps/s
# and memory at 4K divided by the Transformer's (1.4 steps/s, 9.48 GB); Luna-256 from the Mega
# paper's table; Luna-16 and Luna-128 speeds read off the Luna paper's Figure 1 (no memory).
SPEED_TEXT_4K: dict[tuple[Source, str], tuple[float, float | None]] = {
    (LRA, "Transformer"): (1.0, 1.0),
    (LRA, "Linformer"): (7.7 / 1.4, 0.99 / 9.48),
    (LRA, "Linear Trans."): (7.8 / 1.4, 1.03 / 9.48),
    (LRA, "Performer"): (8.0 / 1.4, 1.06 / 9.48),
    (LRA, "BigBird"): (1.5 / 1.4, 2.88 / 9.48),
    (LUNA, "Luna-16"): (5.5, None),
    (LUNA, "Luna-128"): (5.1, None),
    (LUNA, "Luna-256"): (4.9, 0.16),
}
