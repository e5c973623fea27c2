# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # What Luna packs and unpacks
#
# Luna replaces the N x N attention map with two small ones. In the **pack** step each of
# the l rows of the learned sequence P attends over the N tokens (an l x N map, each row a
# distribution over the tokens). In the **unpack** step each token attends over the l packed
# slots (an N x l map). Multiplying the head-averaged maps gives an **effective** N x N map,
# `mean_h(unpack) @ mean_h(pack)`. It is only an approximation: between the two steps the
# unpack key/value projections mix the heads' channels. Below it is shown next to the map of a
# softmax Transformer trained on the same data.
#
# The notebook trains three small models with `trainer.train_and_evaluate`: Luna and softmax
# on generated ListOps, and Luna on generated Pathfinder. A workdir that already holds
# `results.json` is loaded instead of retrained. The maps come from
# `luna_jax.analysis.attention_maps`, the figures from `luna_jax.analysis.plotting`, and every
# figure is saved as a PNG under `OUT_DIR`. Padded positions are drawn in grey.
#
# **Running it.** The committed `.ipynb` holds the outputs of one run, so the figures show
# without running anything. To run it, from the repository root with the virtualenv of
# `requirements-test.txt` (Jupyter itself is in neither requirements file):
#
# ```bash
# pip install jupyterlab && jupyter lab notebooks/attention_maps.ipynb
# # or headless, writing the outputs into the file (nbclient's `jupyter execute`, no install):
# jupyter execute --inplace notebooks/attention_maps.ipynb
# ```
#
# It runs with the repository root or `notebooks/` as its working directory (Jupyter starts
# kernels in the notebook's folder); the first code cell moves to the repository root, and
# `WORKDIR` and `OUT_DIR` are relative to it. On 2 CPU cores the run saved here took 3 minutes,
# generating the Pathfinder images (the first time only) included, and takes seconds once the
# runs exist.
#
# Source: `notebooks/attention_maps.py` (jupytext, paired with the `.ipynb`; edit the `.py`
# and run `jupytext --sync notebooks/attention_maps.py`).

# %% tags=["parameters"]
STEPS = 200              # training steps of the two ListOps models
PATHFINDER_STEPS = 2000  # training steps of the Pathfinder model
TINY = False             # tiny data and models (used by the tests; maps are then untrained)
WORKDIR = "runs/attention_maps"   # one sub-folder per model; a finished one is loaded
OUT_DIR = "notebooks/figures"     # PNG output folder (git-ignored)
EXAMPLE = 0              # which validation example to plot
MAX_CELLS = 128          # heatmaps are block-averaged to at most this many cells per side

# %%
import json
import os
import pathlib
import sys


def repository_root() -> pathlib.Path:
  """The working directory or the first folder above it that holds luna_jax/ and notebooks/."""
  cwd = pathlib.Path.cwd().resolve()
  for folder in (cwd, *cwd.parents):
    if (folder / "luna_jax").is_dir() and (folder / "notebooks").is_dir():
      return folder
  raise RuntimeError(f"run from the luna-jax repository or its notebooks/ folder, not {cwd}")


ROOT = repository_root()
os.chdir(ROOT)                  # WORKDIR and OUT_DIR are relative to it
if str(ROOT) not in sys.path:   # the imports below work without `pip install -e .` too
  sys.path.insert(0, str(ROOT))

import numpy as np
from IPython.display import Image, display

import lra_tasks
from configs import listops as listops_config
from configs import pathfinder as pathfinder_config
from luna_jax import steps, trainer, workdir as wd
from luna_jax.analysis import attention_maps, plotting


def show(fig, name):
  """Saves `fig` as OUT_DIR/name.png and displays the PNG."""
  display(Image(filename=plotting.save_figure(fig, os.path.join(OUT_DIR, f"{name}.png"))))


# %% [markdown]
# ## Configs
#
# The `quick` variants of the task configs, with the step counts above and only a final
# evaluation. The Pathfinder config is `configs/pathfinder.py:quick` as it is: 20,000 generated
# 16x16 images of our easy setting (generated once into the data cache, about a minute), each
# seen as 16 tokens, its 4x4-pixel patches, by a 2-layer Luna with l = 16. Its schedule does
# not depend on the step count, so 2,000 steps are the first half of the 4,000-step run in
# `results/pathfinder_quick/` (validation accuracy 0.71 at step 2,000 there, 0.78 at 4,000;
# chance is 0.5; test accuracy 0.717 at step 2,000 in the run saved here). With `TINY` the data
# and models shrink so that the notebook runs in a minute or two (the tests use this); the maps
# are then those of barely trained models.

# %%
def finish(c, steps):
  """Step counts, a final-only evaluation, single-process data loading; TINY shrinks."""
  c.num_train_steps = c.eval_every = c.checkpoint_every = steps
  c.log_every = max(1, steps // 5)
  c.warmup_steps = min(c.warmup_steps, max(1, steps // 5))
  c.grain_workers = 0
  if TINY:
    c.batch_size = 8
    c.eval_max_examples = 16
    c.model.update(emb_dim=16, mlp_dim=32, num_heads=2, classifier_dim=16, proj_len=8,
                   num_layers=1)
    if c.task == "listops":
      c.seq_len = 64
      c.listops.update(num_train=64, num_val=16, num_test=16, min_length=10, max_length=60,
                       max_depth=3, max_args=4)
    else:
      c.pathfinder.num_images = 48
  return c


configs = {
    "listops_luna": finish(listops_config.get_config("luna,quick"), STEPS),
    "listops_softmax": finish(listops_config.get_config("softmax,quick"), STEPS),
    "pathfinder_luna": finish(pathfinder_config.get_config("luna,quick"), PATHFINDER_STEPS),
}

# %% [markdown]
# ## Train (or load)

# %%
trained = {}
for name, config in configs.items():
  workdir = os.path.join(WORKDIR, name)
  if not os.path.exists(wd.path(workdir, wd.RESULTS_FILE)):
    trainer.train_and_evaluate(config, workdir)
  saved_config, params, step = attention_maps.load_params(workdir)
  task = lra_tasks.load_task(saved_config)
  trained[name] = dict(config=saved_config, params=params, task=task,
                      model_cfg=steps.model_config(saved_config, task))
  with open(wd.path(workdir, wd.RESULTS_FILE)) as f:
    results = json.load(f)
  print(f"{name}: step {step}, test accuracy {results['test_accuracy']:.3f} "
        f"(majority class {results['test_majority_accuracy']:.3f})")

# %% [markdown]
# ## ListOps: pack and unpack maps of Luna
#
# Pack map (one panel per head): each row is one P slot and shows which tokens it reads.
# Unpack map: each row is one token and shows which slots it reads back. Grey marks padding
# (pack columns and unpack rows), and P slots that dynamic projection masks for a short input.

# %%
def batch(task, n=4):
  """The first n validation inputs, [n, N] (or [n, 2, N])."""
  val = task.splits["validation"]
  return np.stack([val[i]["inputs"] for i in range(min(n, len(val)))])


m = trained["listops_luna"]
tokens = batch(m["task"])
luna_layers = attention_maps.attention_maps(m["model_cfg"], m["params"], tokens)
b = EXAMPLE
first = luna_layers[0]
# ListOps pads at the end: show the real tokens and a few padded positions (grey).
n = min(first.mask_BxN.shape[1], int(first.mask_BxN[b].sum()) + 6)
mask = first.mask_BxN[b, :n]
p_mask = None if first.p_mask_BxL is None else first.p_mask_BxL[b]
labels = plotting.listops_labels(tokens[b, :n])
print(f"example {b}: {mask.sum()} real tokens of {first.mask_BxN.shape[1]}; "
      f"{len(luna_layers)} layers; P has {first.pack_BxHxLxN.shape[2]} slots")

show(plotting.heatmaps(first.pack_BxHxLxN[b, :, :, :n], col_mask=mask, row_mask=p_mask,
                       col_labels=labels, xlabel="token", ylabel="P slot", max_size=MAX_CELLS,
                       suptitle="Luna pack map, layer 0 (P slot -> tokens)"),
     "listops_luna_pack")

# %%
show(plotting.heatmaps(first.unpack_BxHxNxL[b, :, :n], row_mask=mask, col_mask=p_mask,
                       row_labels=labels, xlabel="P slot", ylabel="token", max_size=MAX_CELLS,
                       suptitle="Luna unpack map, layer 0 (token -> P slots)"),
     "listops_luna_unpack")

# %% [markdown]
# ## ListOps: the effective Luna map next to softmax attention
#
# Per layer: Luna's `mean_h(unpack) @ mean_h(pack)` and the head-averaged map of the softmax
# model, both on the same example. Its rank is at most l, so it is a smoothed version of the
# token-to-token routing.

# %%
panels, titles = [], []
for layer in luna_layers:
  panels.append(layer.effective_BxNxN[b, :n, :n])
  titles.append(f"Luna effective, layer {layer.layer}")
s = trained["listops_softmax"]
softmax_layers = attention_maps.attention_maps(s["model_cfg"], s["params"], batch(s["task"]))
for layer in softmax_layers:
  panels.append(layer.token_map_BxNxN[b, :n, :n])
  titles.append(f"softmax (head mean), layer {layer.layer}")
show(plotting.heatmaps(np.stack(panels), row_mask=mask, col_mask=mask, titles=titles,
                       row_labels=labels, col_labels=labels, xlabel="key token",
                       ylabel="query token", max_size=MAX_CELLS,
                       ncols=len(luna_layers), suptitle="ListOps: token -> token maps"),
     "listops_effective_vs_softmax")

# %% [markdown]
# ## Pathfinder: what each P slot gathers
#
# The Pathfinder inputs are 16 x 16 images with no padding; the model's tokens are their 16
# patches of 4 x 4 pixels, in row-major order. A row of the pack map is a distribution over the
# patches, so it can be drawn on the image: each patch is filled with the weight one P slot
# gives it (mean over heads). The last figure shows the effective map row of one query patch
# (the one with the most ink, marked +), i.e. where that patch gathers from via P.

# %%
p = trained["pathfinder_luna"]
images = batch(p["task"])
res = p["config"].pathfinder.resolution
patch = p["model_cfg"].patch_size or 1          # pixels per token side (1: a token per pixel)
grid = res // patch                             # tokens per image side
pf_layers = attention_maps.attention_maps(p["model_cfg"], p["params"], images)
image = images[b, images.shape[-1] - res * res:].reshape(res, res)
offset = pf_layers[0].pack_BxHxLxN.shape[-1] - grid * grid   # 1 when a CLS token is prepended


def on_pixels(rows_KxT):
  """[K, tokens] maps -> [K, res * res]: each token's value over the pixels of its patch."""
  rows = np.asarray(rows_KxT)[:, offset:].reshape(-1, grid, grid)
  return np.kron(rows, np.ones((patch, patch))).reshape(len(rows), res * res)


pack_slots = pf_layers[0].pack_BxHxLxN[b].mean(axis=0)       # [l, tokens]
k = min(len(pack_slots), 11)
show(plotting.image_grid(on_pixels(pack_slots[:k]), res, image=image,
                         titles=[f"P slot {j}" for j in range(k)],
                         suptitle="Pathfinder: Luna pack map rows on the image (layer 0)"),
     "pathfinder_luna_pack_slots")

# %%
ink = image.reshape(grid, patch, grid, patch).sum(axis=(1, 3))   # per patch
qr, qc = np.unravel_index(int(np.argmax(ink)), ink.shape)
query = offset + qr * grid + qc
centre = (qr * patch + (patch - 1) / 2, qc * patch + (patch - 1) / 2)   # in pixels
rows = [layer.effective_BxNxN[b, query] for layer in pf_layers]
show(plotting.image_grid(on_pixels(np.stack(rows)), res, image=image,
                         titles=[f"effective, layer {layer.layer}" for layer in pf_layers],
                         marks=[centre] * len(rows),
                         suptitle=f"Pathfinder: where patch ({qr}, {qc}) attends via P"),
     "pathfinder_luna_query_pixel")

# %%
print("figures:", sorted(f for f in os.listdir(OUT_DIR) if f.endswith(".png")))
