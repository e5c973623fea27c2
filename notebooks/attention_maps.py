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
# `luna_jax.analysis.attention_maps`, the figures from `luna_jax.analysis.plotting`, and every figure is
# saved as a PNG under `OUT_DIR`. Padded positions are drawn in grey.
#
# Source: `notebooks/attention_maps.py` (jupytext, paired with the `.ipynb`; edit the `.py`
# and run `jupytext --sync notebooks/attention_maps.py`).

# %% tags=["parameters"]
STEPS = 200              # training steps of the two ListOps models
PATHFINDER_STEPS = 100   # training steps of the Pathfinder model
TINY = False             # tiny data and models (used by the tests; maps are then untrained)
WORKDIR = "../runs/attention_maps"   # one sub-folder per model; a finished one is loaded
OUT_DIR = "figures"      # PNG output folder (git-ignored)
EXAMPLE = 0              # which validation example to plot
MAX_CELLS = 128          # heatmaps are block-averaged to at most this many cells per side

# %%
import os

import numpy as np
from IPython.display import Image, display

import lra_tasks
from configs import listops as listops_config
from configs import pathfinder as pathfinder_config
from luna_jax import steps, trainer, workdir as wd
from luna_jax.analysis import attention_maps, plotting

os.makedirs(OUT_DIR, exist_ok=True)


def show(fig, name):
  """Saves `fig` as OUT_DIR/name.png and displays the PNG."""
  path = plotting.save_figure(fig, os.path.join(OUT_DIR, f"{name}.png"))
  display(Image(filename=path))
  return path


# %% [markdown]
# ## Configs
#
# The `quick` variants of the task configs, with the step counts above and only a final
# evaluation. The Pathfinder config generates 20,000 16x16 images of the easy quick setting
# once into the data cache; here its model reads one token per pixel (the quick config's 4x4
# patches would give maps over 16 patches, not pixels). At this budget the Pathfinder model is
# still mostly untrained; raise `PATHFINDER_STEPS` for sharper maps. With
# `TINY` the data and models shrink so that the notebook runs in a minute or two (the tests use
# this); the maps are then those of barely trained models.

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
    "pathfinder_luna": finish(pathfinder_config.get_config("luna,quick,model.embedding=tokens,"
                                                           "model.patch_size=0"),
                              PATHFINDER_STEPS),
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
  print(f"{name}: step {step} ({workdir})")

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
try:
  softmax_layers = attention_maps.attention_maps(s["model_cfg"], s["params"], batch(s["task"]))
except attention_maps.MapNotSownError as e:   # softmax.py not wired yet
  softmax_layers = []
  print(f"softmax map unavailable: {e}")
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
# Pathfinder inputs here are 16 x 16 images, one token per pixel, with no padding. A row of the
# pack map is a distribution over pixels, so it can be drawn on the image grid: each panel
# shows where one P slot reads (mean over heads). The last figure shows the effective map
# row of one query pixel (the brightest pixel, marked +), i.e. where that pixel gathers from
# via P.

# %%
p = trained["pathfinder_luna"]
images = batch(p["task"])
res = p["config"].pathfinder.resolution
offset = images.shape[-1] - res * res          # 1 when a CLS token is prepended
pf_layers = attention_maps.attention_maps(p["model_cfg"], p["params"], images)
image = images[b, offset:].reshape(res, res)
pack_slots = pf_layers[0].pack_BxHxLxN[b].mean(axis=0)       # [l, N]
k = min(len(pack_slots), 11)
show(plotting.image_grid(pack_slots[:k], res, offset=offset, image=image,
                         titles=[f"P slot {j}" for j in range(k)],
                         suptitle="Pathfinder: Luna pack map rows on the image (layer 0)"),
     "pathfinder_luna_pack_slots")

# %%
query = int(np.argmax(images[b, offset:])) + offset
qr, qc = divmod(query - offset, res)
rows = [layer.effective_BxNxN[b, query] for layer in pf_layers]
show(plotting.image_grid(np.stack(rows), res, offset=offset, image=image,
                         titles=[f"effective, layer {layer.layer}" for layer in pf_layers],
                         marks=[(qr, qc)] * len(rows),
                         suptitle=f"Pathfinder: where pixel ({qr}, {qc}) attends via P"),
     "pathfinder_luna_query_pixel")

# %%
print("figures:", sorted(f for f in os.listdir(OUT_DIR) if f.endswith(".png")))
