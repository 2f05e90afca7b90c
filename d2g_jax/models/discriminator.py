"""The multi-scale conditional diffusion discriminator D(x, z, c) of Diffusion2GAN.

Legend: B batch, H/W/C latent height/width/channels, h/w a decoder scale's size,
F features.

D is the teacher's UNet (same modules, same parameter names under `unet/`, the teacher's
weights) run on a latent x, with Diffusion2GAN's additions between its pieces:

    x_BxHxWxC ---(+ z_conv(z), zero-init: noise conditioning, fp32)---> conv_in
        down block 0 <--(+ input_convs_0(x),         zero-init: multi-scale input)
        down block 1 <--(+ input_convs_1(x at H/2),  zero-init)
        ...           (text: the UNet's own cross-attention; SDXL: its added embeddings)
        mid block
        up block k:   readout_k_pre  (features entering the scale, before the skip concat)
                      readout_k_cat  (right after concatenating the first skip)
                      readout_k_out  (the block's output, before upsampling)
    -> a list of 3 x num_blocks logit maps BxhxW (multi-scale output)

Each readout is GroupNorm -> SiLU -> 1x1 conv to one channel. The UNet's output head
(conv_norm_out, conv_out) is not used. Switches (`DiscriminatorOptions`) turn each
addition off, so the paper's ablation rows are configs: plain diffusion D (all off: one
readout on the last decoder output), + z-conditioning, + multi-scale input/output.

    module = Discriminator(unet_config, DiscriminatorOptions())
    params = init_discriminator(module, teacher_unet_params, key)   # trunk = teacher's
    logits = module.apply({"params": params}, x, z, cond, timestep)

At initialisation the zero-initialised convs make D ignore z and the injected inputs
exactly, while their parameter gradients are non-zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from d2g_jax.models.layers import group_norm
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig

Dtype = Any
PLACES = ("pre", "cat", "out")
TRUNK = "unet"


@dataclasses.dataclass(frozen=True)
class DiscriminatorOptions:
  """The paper's design choices, each a switch (config block `discriminator`)."""
  z_cond: bool = True             # zero-init conv on z added to D's input
  multiscale_input: bool = True   # x, resized, into every down block via zero-init convs
  multiscale_output: bool = True  # 3 readouts per decoder scale (else one, at the end)


def zero_conv(features: int, kernel: int, dtype, param_dtype, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding=kernel // 2, dtype=dtype,
                 param_dtype=param_dtype, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros, name=name)


class Readout(nn.Module):
  """GroupNorm -> SiLU -> 1x1 conv: features BxhxwxF -> logits Bxhxw (fp32)."""
  num_groups: int
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_BxhxwxF):
    h = group_norm(self.num_groups, self.eps, self.param_dtype, "norm")(f_BxhxwxF)
    h = nn.silu(h).astype(self.dtype)
    logits = nn.Conv(1, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj")(h)
    return logits[..., 0].astype(jnp.float32)


class Discriminator(nn.Module):
  """D(x, z, cond, timestep) -> list of logit maps. See the module docstring."""
  unet_config: UNetConfig
  options: DiscriminatorOptions = DiscriminatorOptions()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, x_BxHxWxC, z_BxHxWxC, cond: Mapping[str, Any], timestep) -> list:
    c, o = self.unet_config, self.options
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    unet = UNet(c, attention=self.attention, remat=self.remat, name=TRUNK, **kw)
    b = x_BxHxWxC.shape[0]
    emb = unet.embed(timestep, b, cond.get("added_cond_kwargs"))
    ctx = unet.context(cond["encoder_hidden_states"])

    x = x_BxHxWxC.astype(self.dtype)
    x_in = x
    if o.z_cond:  # in fp32 whatever `dtype`, as the generator's x0 = f(z, eps) is
      z_in = zero_conv(c.in_channels, 3, jnp.float32, self.param_dtype, "z_conv")(
          z_BxHxWxC.astype(jnp.float32))
      x_in = x_BxHxWxC.astype(jnp.float32) + z_in
    h = unet.stem(x_in)
    skips = [h]
    for i in range(c.num_blocks):
      if o.multiscale_input:
        x_i = x if h.shape[1:3] == x.shape[1:3] else jax.image.resize(
            x, (b, *h.shape[1:3], x.shape[-1]), "linear", antialias=True)
        h = h + zero_conv(h.shape[-1], 3, name=f"input_convs_{i}", **kw)(x_i)
      h, block_skips = unet.down(i, h, emb, ctx)
      skips.extend(block_skips)
    h = unet.mid(h, emb, ctx)

    readout = lambda name: Readout(c.norm_num_groups, c.norm_eps, name=name, **kw)
    logits = []
    for k in range(c.num_blocks):
      h, skips, feats = unet.up(k, h, skips, emb, ctx)
      if o.multiscale_output:
        logits.extend(readout(f"readout_{k}_{p}")(f) for p, f in zip(PLACES, feats))
    if not o.multiscale_output:
      logits.append(readout("readout")(feats[-1]))
    return logits

  def readout_names(self) -> list[str]:
    """Names of the readouts, in the order of D's output list."""
    if not self.options.multiscale_output:
      return ["readout"]
    return [f"readout_{k}_{p}" for k in range(self.unet_config.num_blocks) for p in PLACES]


# ------------------------------------------------------------------ init
def example_inputs(config: UNetConfig, batch: int = 1, size: int | None = None):
  """Small abstract inputs (x, z, cond, timestep) for init / eval_shape."""
  size = size or 2 ** (config.num_blocks - 1)
  x = jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32)
  cond = {"encoder_hidden_states": jax.ShapeDtypeStruct((batch, 2, config.cross_dims[0]),
                                                        jnp.float32)}
  if config.addition_embed_type == "text_time":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    cond["added_cond_kwargs"] = {"text_embeds": jax.ShapeDtypeStruct((batch, text_dim),
                                                                     jnp.float32),
                                 "time_ids": jax.ShapeDtypeStruct((batch, 6), jnp.float32)}
  return x, x, cond, jax.ShapeDtypeStruct((batch,), jnp.float32)


def _zeros_like_struct(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def param_shapes(module: Discriminator) -> Any:
  """D's parameter tree as ShapeDtypeStructs (nothing allocated)."""
  args = example_inputs(module.unet_config)
  return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *_zeros_like_struct(a)),
                        *args)["params"]


def with_teacher_trunk(d_params: Any, teacher_params: Any, where: str = "teacher UNet") -> Any:
  """`d_params` with its `unet/` subtree taken from the teacher's UNet params.

  Every trunk parameter must exist in the teacher with the same shape; the teacher's
  parameters that D does not use (the output head conv_norm_out / conv_out) are left out.
  Traceable: inside `jax.jit`, D's own random trunk init is dead code and never runs.
  """
  trunk = traverse_util.flatten_dict(dict(d_params[TRUNK]), sep="/")
  teacher = traverse_util.flatten_dict(dict(teacher_params), sep="/")
  missing = sorted(k for k in trunk if k not in teacher)
  misshaped = sorted(f"{k}: D {tuple(trunk[k].shape)} vs {tuple(teacher[k].shape)}"
                     for k in trunk if k in teacher and tuple(trunk[k].shape)
                     != tuple(teacher[k].shape))
  if missing or misshaped:
    raise ValueError(f"the {where} does not fit the discriminator's trunk: missing "
                     f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, mis-shaped "
                     f"{misshaped[:8]}; was D built from the same UNet config as the teacher?")
  new_trunk = traverse_util.unflatten_dict(
      {k: jnp.asarray(teacher[k], trunk[k].dtype) for k in trunk}, sep="/")
  return {**d_params, TRUNK: new_trunk}


def init_params(module: Discriminator, key: jax.Array, teacher_params: Any) -> Any:
  """D's params: the teacher's UNet weights for the trunk, new layers initialised
  (zero convs zero, readouts: GroupNorm 1/0, 1x1 conv LeCun-normal). Traceable: inside a
  jit the trunk's random init is dead code that XLA eliminates."""
  params = module.init(key, *_zeros_like_struct(example_inputs(module.unet_config)))["params"]
  return with_teacher_trunk(params, teacher_params)


def init_discriminator(module: Discriminator, teacher_params: Any, key: jax.Array) -> Any:
  """`init_params` in one jit (the teacher's weights in, D's params out)."""
  return jax.jit(lambda k, t: init_params(module, k, t))(key, teacher_params)


def summary(params_or_shapes: Any) -> dict[str, int]:
  """Parameter counts: {"trunk", "z_conv", "input_convs", "readouts", "total"}."""
  counts = {"trunk": 0, "z_conv": 0, "input_convs": 0, "readouts": 0}
  for path, leaf in traverse_util.flatten_dict(dict(params_or_shapes)).items():
    top = path[0]
    group = ("trunk" if top == TRUNK else "z_conv" if top == "z_conv" else
             "input_convs" if top.startswith("input_convs") else "readouts")
    counts[group] += int(jnp.size(leaf) if not hasattr(leaf, "size") else leaf.size)
  counts["total"] = sum(counts.values())
  return counts


def main():
  import argparse
  ap = argparse.ArgumentParser(description="Parameter summary of the discriminator for a preset "
                                           "(jax.eval_shape: nothing allocated).")
  ap.add_argument("--preset", default="sd15", help="UNet preset: sd15, sd21, sdxl_base, tiny_*")
  ap.add_argument("--no_z_cond", action="store_true")
  ap.add_argument("--no_multiscale_input", action="store_true")
  ap.add_argument("--no_multiscale_output", action="store_true")
  a = ap.parse_args()
  opts = DiscriminatorOptions(not a.no_z_cond, not a.no_multiscale_input,
                              not a.no_multiscale_output)
  module = Discriminator(UNetConfig.preset(a.preset), opts)
  counts = summary(param_shapes(module))
  print(f"discriminator of {a.preset} ({opts}): {len(module.readout_names())} readouts")
  for k, v in counts.items():
    print(f"  {k:12s} {v:>14,d}")


if __name__ == "__main__":
  main()
