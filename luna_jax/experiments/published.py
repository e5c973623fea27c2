"""Published LRA numbers (test accuracy, %), kept apart from anything measured here.

Every source names the protocol its numbers were produced under (the names of
`configs/common.py`: luna_paper, lra_reference, small, skyformer), "not_stated" (shown beside
the protocols in `shown_with`, marked) or "other"; the ListOps token set its runs read
(lra_tasks/listops.py TOKEN_SETS); and where its numbers were checked (`verified`, "" when they
were not). The results table shows a published row only beside measured runs of the same
protocol (`comparable_rows`), and a ListOps cell only beside runs of the same token set.
`FAIL` marks a Path-X entry reported as failed (chance level); a missing task was not reported.
"""
from __future__ import annotations

import dataclasses

FAIL = "FAIL"
NOT_STATED = "not_stated"


@dataclasses.dataclass(frozen=True)
class Source:
  """A published table: its name, the protocol it ran, and what a reader must know."""
  name: str
  protocol: str          # luna_paper | lra_reference | small | skyformer | not_stated | other
  note: str
  listops_tokens: str = ""       # the token set its ListOps rows read ("": not known)
  verified: str = ""             # where the numbers were checked ("": unverified)
  shown_with: tuple[str, ...] = ()   # not_stated: the protocols it is shown beside, marked

  def shown_under(self, protocol: str) -> bool:
    return protocol == self.protocol or protocol in self.shown_with


LUNA = Source("Luna paper (Ma et al. 2021, camera-ready)", "luna_paper",
              "Luna recipes per task; the Transformer row is the Luna authors' re-implementation",
              listops_tokens="fairseq", verified="shared/reference/luna.md")
LRA = Source("LRA Table 1 (Tay et al. 2020)", "lra_reference",
             "LRA reference configs; Performer = the LRA configs' generalized ReLU kernel "
             "(ListOps: FAVOR+ softmax with 2 features); ListOps through the public pipeline "
             "of the paper's time (bracket-free until 2021-03-04)",
             listops_tokens="no_brackets", verified="shared/reference/recipes-and-results.md")
NYSTROMFORMER = Source(
    "Nystromformer paper (Xiong et al. 2021), LRA table", "small",
    "the Nystromformer LRA code (mlpen/Nystromformer LRA/); its header says Text 4K but that "
    "code reads 1,000 bytes; Performer = performer-pytorch FAVOR+ with 256 features",
    listops_tokens="no_brackets",
    verified="the repository's table image img/LRA.png (\"Table 1\"); each Avg is the mean "
             "of its row; the paper PDF itself was not read")
SKYFORMER = Source(
    "Skyformer paper (Chen et al. 2021), Table 1", "skyformer",
    "the Skyformer code (pkuzengqi/Skyformer src/), mean of 3 seeds; Performer with 128 "
    "features", listops_tokens="no_brackets",
    verified="doc/Skyformer_camera_ready.pdf Table 1 (columns reordered to ours); each Avg "
             "is the mean of its row")
LEARNED_KERNEL = Source(
    "LUNA learned kernel (Shahbazi et al. 2025)", NOT_STATED,
    "protocol not stated in our sources (LUNA reuses a small-model code base; which of "
    "`small` and `skyformer` is not known)", shown_with=("small", "skyformer"),
    verified="shared/reference/recipes-and-results.md (abstract numbers)")
LUNA_TABLE_TRANSFORMER = Source(
    "Transformer row reprinted beside LUNA (source unknown)", NOT_STATED,
    "UNVERIFIED: in no source we read; earlier notes gave it as the Skyformer authors' row, "
    "but their camera-ready table has other numbers (its Self-Attention row, above)",
    shown_with=("small", "skyformer"))
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
        "Transformer": _row(_L, 37.10, 65.02, 79.35, 38.20, 74.16, 58.77),
        "Reformer": _row(_L, 19.05, 64.88, 78.64, 43.29, 69.36, 55.04),
        "Linformer": _row(_L, 37.25, 55.91, 79.37, 37.84, 67.60, 55.59),
        "Performer": _row(_L, 18.80, 63.81, 78.62, 37.07, 69.87, 53.63),
        "Nystromformer": _row(_L, 37.15, 65.52, 79.56, 41.58, 70.94, 58.95),
    },
    SKYFORMER: {     # the paper's columns are Text, ListOps, Retrieval, Pathfinder, Image
        "Self-Attention (Transformer)": _row(_L, 38.37, 61.95, 80.69, 40.57, 65.26, 57.37),
        "Kernelized Attention": _row(_L, 38.78, 60.22, 81.77, 41.29, 70.73, 58.56),
        "Nystromformer": _row(_L, 38.51, 64.83, 80.52, 41.30, 69.48, 58.93),
        "Linformer": _row(_L, 37.45, 58.93, 78.19, 37.96, 60.93, 54.69),
        "Informer": _row(_L, 32.53, 62.64, 77.57, 38.10, 57.83, 53.73),
        "Performer": _row(_L, 38.02, 64.19, 80.04, 41.43, 66.30, 58.00),
        "Reformer": _row(_L, 37.68, 62.93, 78.99, 48.87, 66.49, 58.99),
        "BigBird": _row(_L, 39.25, 63.86, 80.28, 43.16, 68.72, 59.05),
        "Skyformer": _row(_L, 38.69, 64.70, 82.06, 40.77, 70.73, 59.39),
    },
    LEARNED_KERNEL: {
        "LUNA (learned kernel)": _row(_L, 38.94, 73.41, 81.02, 64.32, 69.52, 65.44),
    },
    LUNA_TABLE_TRANSFORMER: {
        "Transformer (unverified)": _row(_L, 38.71, 61.55, 80.93, 39.14, 70.39, None),
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
    ("small", "softmax"): ((NYSTROMFORMER, "Transformer"),),
    ("small", "performer"): ((NYSTROMFORMER, "Performer"),),
    ("skyformer", "softmax"): ((SKYFORMER, "Self-Attention (Transformer)"),),
    ("skyformer", "performer"): ((SKYFORMER, "Performer"),),
    ("small", "learned_kernel"): ((LEARNED_KERNEL, "LUNA (learned kernel)"),),
    ("skyformer", "learned_kernel"): ((LEARNED_KERNEL, "LUNA (learned kernel)"),),
}


def comparable_rows(protocol: str) -> list[tuple[Source, str, dict[str, float | str]]]:
  """Every published row shown under `protocol` (source, model, values): those produced under
  it, then those of an unstated protocol shown beside it (marked by their source)."""
  rows = [(src, model, vals) for src, models in PUBLISHED.items() if src.protocol == protocol
          for model, vals in models.items()]
  return rows + [(src, model, vals) for src, models in PUBLISHED.items()
                 if src.protocol != protocol and src.shown_under(protocol)
                 for model, vals in models.items()]


def comparable_cell(source: Source, task: str, listops_tokens: str | None
                    ) -> bool:
  """Whether a published cell may stand beside runs of `task` that read `listops_tokens`: for
  ListOps only when the source's runs read the same token set (known on both sides)."""
  return task != "listops" or (bool(source.listops_tokens)
                               and source.listops_tokens == listops_tokens)


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
