"""The jitted steps a point times: one attention layer's gradients, or the trainer's step.

Model mode runs `luna_jax.steps.train_step` (the step train.py runs: softmax cross-entropy,
dropout and feature rngs from the step counter, AdamW update) on a `steps.TrainState`, jitted
with the state donated as the trainer does. The optimizer is the LRA Text one at a constant
learning rate, `optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01)`: a schedule
changes no step time, and the benchmark has no config to build one from.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.attention_scaling.specs import (DEFAULT_LUNA_PROJ_LEN, NUM_CLASSES, VOCAB_SIZE,
                                                MechanismSpec, parse_ints)
from luna_jax import models, steps
from luna_jax.attention import common, get_attention

REDRAW_EVERY = 1000       # random-feature redraw interval (config.model.redraw_every default)


@dataclasses.dataclass
class Step:
  """A jitted step, its arguments, and how to thread its outputs into the next call."""
  fn: Callable
  args: tuple
  next_args: Callable[[tuple, Any], tuple]   # (args, outputs) -> args of the next call
  twin: Callable | None = None                # same math without fused kernels (FLOP count)


# About 4x faster CPU compiles of the small test models (measured on jaxlib 0.10.2).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}
# jaxlib 0.11's XLA no longer has this option (an unknown option is an error there).
FAST_COMPILE_OPTIONS_CPU = ({"xla_cpu_use_fusion_emitters": False}
                            if jax.__version_info__ < (0, 11) else {})


def compiler_options(args: argparse.Namespace) -> dict[str, Any] | None:
  """XLA options of every compilation (`--xla-fast-compile`: smoke tests, not timings)."""
  if not args.xla_fast_compile:
    return None
  options = dict(FAST_COMPILE_OPTIONS)
  if jax.default_backend() == "cpu":
    options.update(FAST_COMPILE_OPTIONS_CPU)
  return options


def jit_run(fn: Callable, *call_args: Any, options: dict[str, Any] | None = None) -> Any:
  """Compiles `fn` for `call_args` with `options` and calls it once."""
  return jax.jit(fn).lower(*call_args).compile(compiler_options=options)(*call_args)


def fit_params(params: Any, shapes: Any) -> Any:
  """Slices every leaf to its wanted shape (a longer position table to the current length)."""
  def fit(p, s):
    return p if p.shape == s.shape else p[tuple(slice(0, n) for n in s.shape)]
  return jax.tree.map(fit, params, shapes)


def attention_kwargs(spec: MechanismSpec, args: argparse.Namespace) -> dict[str, Any]:
  """Mechanism options the CLI controls (fast paths)."""
  if spec.name == "softmax":
    return {"implementation": args.softmax_impl}
  if spec.name == "luna" and args.luna_flash:
    return {"implementation": "auto"}
  return {}


def uses_fused_kernel(spec: MechanismSpec, args: argparse.Namespace) -> bool:
  """Whether the point asks for a fused kernel (cuDNN softmax, Luna flash); those have no
  attention dropout, so the model runs them with attention dropout 0."""
  if spec.name == "softmax" and args.softmax_impl != "xla":
    if args.softmax_impl == "cudnn":
      return True
    try:   # "auto": fused exactly where it resolves to cuDNN without dropout
      return common.resolve_implementation("auto", args.dtype, False) == "cudnn"
    except Exception:  # noqa: BLE001
      return False
  return spec.name == "luna" and args.luna_flash


def attention_impl(spec: MechanismSpec, args: argparse.Namespace, dropout_active: bool
                   ) -> str | None:
  """The attention implementation a point actually runs ("xla", "cudnn", "flash", ...)."""
  if spec.name == "softmax":
    try:
      return common.resolve_implementation(args.softmax_impl, args.dtype, dropout_active)
    except Exception:  # noqa: BLE001
      return args.softmax_impl
  if spec.name == "luna":
    if not args.luna_flash:
      return "xla"
    return common.resolve_implementation("auto", args.dtype, dropout_active)
  return None


def xla_twin_args(args: argparse.Namespace) -> argparse.Namespace:
  """The same benchmark with the fused kernels off: the FLOPs reference of a fused point."""
  return argparse.Namespace(**{**vars(args), "softmax_impl": "xla", "luna_flash": False})


# ----------------------------------------------------------------------------- layer mode

def build_layer_step(spec: MechanismSpec, length: int, args: argparse.Namespace,
                     cache: dict[str, Any]) -> Step:
  """One attention layer: grads of mean(y**2) w.r.t. params, x (and P for Luna)."""
  cls = get_attention(spec.name)
  dtype = jnp.dtype(args.dtype)
  is_luna = spec.name == "luna"
  kx, kp, kinit, kfeat = jax.random.split(jax.random.key(0), 4)
  b, d = args.batch, args.dim
  x_BxNxD = jax.random.normal(kx, (b, length, d), jnp.float32).astype(dtype)
  mask_BxN = jnp.ones((b, length), bool)
  p_BxLxD = (jax.random.normal(kp, (b, spec.proj_len, d), jnp.float32).astype(dtype)
             if is_luna else None)

  def make_attn(a: argparse.Namespace) -> Any:
    return cls(num_heads=a.heads, dropout_rate=0.0, dtype=dtype, **attention_kwargs(spec, a))

  def make_grad_fn(a: argparse.Namespace) -> Callable:
    attn = make_attn(a)

    def forward(params, x_BxNxD, p_BxLxD):
      y_BxNxD, _ = attn.apply({"params": params}, x_BxNxD, mask_BxN, p_BxLxD, None,
                              deterministic=True, rngs={"features": kfeat})
      return jnp.mean(jnp.square(y_BxNxD.astype(jnp.float32)))

    if a.remat:
      forward = jax.checkpoint(forward)
    return jax.jit(jax.grad(forward, argnums=(0, 1, 2) if is_luna else (0, 1)))

  if "params" not in cache:   # parameter shapes do not depend on the length
    short = min(length, 16)
    attn = make_attn(args)
    init = lambda r: attn.init(r, x_BxNxD[:, :short], mask_BxN[:, :short], p_BxLxD, None,
                               deterministic=True)["params"]
    cache["params"] = jit_run(init, {"params": kinit, "features": kfeat, "dropout": kfeat},
                              options=compiler_options(args))
  twin = make_grad_fn(xla_twin_args(args)) if uses_fused_kernel(spec, args) else None
  return Step(make_grad_fn(args), (cache["params"], x_BxNxD, p_BxLxD), lambda a, _: a, twin)


# ----------------------------------------------------------------------------- model mode

def text_model_config(spec: MechanismSpec, length: int, args: argparse.Namespace
                      ) -> models.ModelConfig:
  """The LRA Text classifier (Luna recipe for luna, LRA reference blocks for the others)."""
  is_luna = spec.name == "luna"
  return models.ModelConfig(
      vocab_size=VOCAB_SIZE, num_classes=NUM_CLASSES, max_len=length, attention=spec.name,
      attention_kwargs=tuple(sorted(attention_kwargs(spec, args).items())),
      proj_len=spec.proj_len or DEFAULT_LUNA_PROJ_LEN, num_layers=args.layers,
      emb_dim=args.dim, num_heads=args.heads, mlp_dim=args.mlp_dim, classifier_dim=args.mlp_dim,
      dropout=args.dropout,
      attention_dropout=0.0 if uses_fused_kernel(spec, args) else args.attention_dropout,
      dtype=args.dtype, remat=args.remat, block="post_ln" if is_luna else "pre_ln",
      positions="learned" if is_luna else "sinusoidal")


def text_optimizer() -> optax.GradientTransformation:
  """AdamW of LRA Text at a constant learning rate (module docstring)."""
  return optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01)


def trainer_step() -> Callable:
  """`steps.train_step` jitted as the trainer jits it: (state, batch, key), state donated."""
  return jax.jit(functools.partial(steps.train_step, redraw_every=REDRAW_EVERY),
                 donate_argnums=(0,))


def twin_trainer_step(apply_fn: Callable) -> Callable:
  """`steps.train_step` on the state's params and optimizer, with `apply_fn` as the model."""
  def step(state, batch, key):
    return steps.train_step(state.replace(apply_fn=apply_fn), batch, key, REDRAW_EVERY)
  return jax.jit(step)


def text_batch(length: int, batch: int) -> dict[str, jax.Array]:
  """Random bytes (no padding) and random labels, as the trainer's batches."""
  rng = np.random.default_rng(0)
  return {"inputs": jnp.asarray(rng.integers(3, VOCAB_SIZE, (batch, length)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, NUM_CLASSES, (batch,)), jnp.int32)}


def build_model_step(spec: MechanismSpec, length: int, args: argparse.Namespace,
                     cache: dict[str, Any]) -> Step:
  """The Text classifier: one `steps.train_step` (forward + backward + AdamW update, dropout
  on) on random bytes; the next call gets the new state."""
  batch = text_batch(length, args.batch)
  short_BxS = batch["inputs"][:, :min(length, 16)]
  kinit, kstep = jax.random.split(jax.random.key(0))
  if "params" not in cache:
    # Initialise once per mechanism at the longest length; shorter lengths slice the positions.
    longest = max([length] + parse_ints(args.lengths))
    init_model = models.Classifier(text_model_config(spec, longest, args))
    cache["params"] = jit_run(lambda k: init_model.init(k, short_BxS)["params"], kinit,
                              options=compiler_options(args))
  model = models.Classifier(text_model_config(spec, length, args))
  shapes = jax.eval_shape(lambda k: model.init(k, short_BxS)["params"], kinit)
  # Copies: the step donates its state, and the cached params serve the next length too.
  params = jax.tree.map(lambda x: x.copy(), fit_params(cache["params"], shapes))
  state = jit_run(lambda p: steps.TrainState.create(apply_fn=model.apply, params=p,
                                                      tx=text_optimizer()),
                  params, options=compiler_options(args))
  twin = None
  if uses_fused_kernel(spec, args):
    # XLA attention, and no attention dropout, as the fused kernel runs.
    twin_cfg = dataclasses.replace(text_model_config(spec, length, xla_twin_args(args)),
                                   attention_dropout=0.0)
    twin = twin_trainer_step(models.Classifier(twin_cfg).apply)
  return Step(trainer_step(), (state, batch, kstep), lambda a, out: (out[0],) + a[1:], twin)
