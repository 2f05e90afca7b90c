"""Optimisers from config data: Adam with warm-up, gradient clipping and frozen parameters.

    tx, lr_fn = make_optimizer(lr=1e-5, b1=0.0, b2=0.99, warmup_steps=500, grad_clip=1.0,
                               frozen=r"down_blocks_.*/resnets_.*/conv[12]/kernel")
    opt_state = tx.init(params)

`frozen` is a regular expression over '/'-joined parameter paths (`re.search`, as
big_vision's optax masks), or the name of a preset in `FROZEN_PRESETS`: matching
parameters get no update and no optimiser state (`optax.set_to_zero`), so the state is
smaller and they stay bit-identical.

GDD-I's preset ("gdd_i", arXiv 2405.20750) freezes the UNet's heavy weight layers and
trains what modulates them. Frozen: the residual blocks' 3x3 convolutions (`conv1`,
`conv2`), the attention output projections (`to_out`), the transformer blocks' feed-forward
layers (`ff`), the transformers' input/output projections (`proj_in`, `proj_out`) and the
down/up-sampling convolutions. Trainable: every norm, the time embedding (and SDXL's
added-condition embedding), the per-block time projections (`time_emb_proj`), attention
q/k/v, the 1x1 shortcut convs (`conv_shortcut`), `conv_in` and `conv_out`. The GDD code
freezes every layer named "conv" or "proj" inside the EDM UNet's blocks, whose other
layers are exactly the trainable kinds above; SD's UNet has three kinds EDM's lacks
(feed-forward, proj_in/out, standalone resampling convs), frozen here as the weight
layers they are. SD 1.5: 86.0% of the UNet frozen (the paper: "85%").
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax
from flax import traverse_util

TRAIN, FROZEN = "train", "frozen"
FROZEN_PRESETS = {
    "gdd_i": r"(resnets_\d+/conv[12]|/to_out_\d+|/ff|/proj_(in|out)|samplers_\d+/conv)/",
}


def frozen_pattern(frozen: str) -> str:
  """The regex of `frozen`: a preset's (by name) or `frozen` itself."""
  return FROZEN_PRESETS.get(frozen, frozen)


def path_labels(params: Any, frozen: str) -> Any:
  """A tree like `params` of "train" / "frozen" labels; `frozen` = '' freezes nothing."""
  pattern = re.compile(frozen_pattern(frozen)) if frozen else None
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {k: FROZEN if pattern and pattern.search(k) else TRAIN for k in flat}
  return traverse_util.unflatten_dict(labels, sep="/")


def split_frozen(params: Any, frozen: str) -> tuple[Any, Callable]:
  """(trainable, join): the tree of `params`' trainable leaves only (all of them when `frozen`
  is ''), and `join(tree_like_trainable, frozen_as_zeros=False)` -> a tree like `params`,
  the frozen leaves filled in from `params` (or as zeros: gradients for the optimiser).

  Differentiate `loss(join(trainable))` with respect to `trainable`, and the frozen leaves
  are constants: no cotangent is computed for them."""
  if not frozen:
    return params, lambda tree, frozen_as_zeros=False: tree
  labels = traverse_util.flatten_dict(path_labels(params, frozen))
  flat = traverse_util.flatten_dict(params)
  trainable = traverse_util.unflatten_dict({k: v for k, v in flat.items() if labels[k] == TRAIN})
  rest = {k: v for k, v in flat.items() if labels[k] == FROZEN}

  def join(tree: Any, frozen_as_zeros: bool = False) -> Any:
    fill = {k: jax.numpy.zeros_like(v) for k, v in rest.items()} if frozen_as_zeros else rest
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(tree), **fill})
  return trainable, join


def count_frozen(params: Any, frozen: str) -> tuple[int, int]:
  """(trainable, frozen) parameter counts under the `frozen` pattern."""
  labels = traverse_util.flatten_dict(path_labels(params, frozen), sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  n = {TRAIN: 0, FROZEN: 0}
  for k, v in flat.items():
    n[labels[k]] += int(v.size)
  return n[TRAIN], n[FROZEN]


def state_size(opt_state: Any) -> int:
  """Number of values in an optimiser state (frozen leaves hold none)."""
  return sum(int(x.size) for x in jax.tree.leaves(opt_state) if hasattr(x, "size"))


def make_optimizer(lr: float, *, b1: float = 0.0, b2: float = 0.99, eps: float = 1e-8,
                   warmup_steps: int = 0, grad_clip: float = 0.0, weight_decay: float = 0.0,
                   frozen: str = "") -> tuple[optax.GradientTransformation, Callable]:
  """(optimiser, learning-rate schedule): linear warm-up from 0 to `lr` over
  `warmup_steps`, then constant; global-norm clipping when `grad_clip` > 0; AdamW when
  `weight_decay` > 0; parameters matching `frozen` untouched and stateless."""
  if lr <= 0:
    raise ValueError(f"learning rate {lr} must be > 0")
  schedule = (optax.warmup_constant_schedule(0.0, lr, warmup_steps) if warmup_steps > 0
              else optax.constant_schedule(lr))
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  if weight_decay > 0:
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  else:
    parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
  tx = optax.chain(*parts)
  if frozen:
    tx = optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()},
                               lambda params: path_labels(params, frozen))
  return tx, schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)
