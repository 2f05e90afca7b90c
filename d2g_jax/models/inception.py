"""The FID Inception-v3 (pool3, 2048 features) that `pytorch-fid` and `clean-fid` use, in Flax.

Legend: B batch, H/W height/width, C channels.

This is the TensorFlow graph `inception-2015-12-05` as `pytorch-fid` ports it
(`pytorch_fid.inception.fid_inception_v3`): torchvision's Inception-v3 layout with the
FID blocks, which differ from torchvision's in two ways TF's graph does: the average
pools of the A, C and E blocks leave the zero padding out of the mean
(`count_include_pad=False`), and the last E block (`Mixed_7c`) pools with a max instead
of an average. Every convolution is conv (no bias) -> batch norm (eps 1e-3, frozen
statistics stored as params) -> ReLU. The output is the global average of `Mixed_7c`:
the 2048-d "pool3" features FID is computed on.

Parameter names mirror the PyTorch state dict (`Mixed_5b.branch1x1.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ...), so `d2g_jax.convert.inception` is a name
table over the `pt_inception-2015-12-05-6726825d.pth` file.

Input: images BxHxWx3 as floats in [0, 255], already resized (FID uses 299 x 299: see
`d2g_jax.evaluate.resize`), normalised inside as `normalize` says:
  "clean"        (x - 128) / 128, as clean-fid feeds its Inception (`InceptionV3W`);
  "pytorch_fid"  x / 127.5 - 1, as pytorch-fid's `normalize_input` (2 * x/255 - 1).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from d2g_jax.models.latent_vgg import FrozenBatchNorm

Dtype = Any
NORMALIZATIONS = ("clean", "pytorch_fid")
FEATURES = 2048
BN_EPS = 1e-3


class BasicConv2d(nn.Module):
  """torchvision's `BasicConv2d`: conv (no bias), batch norm, ReLU."""
  features: int
  kernel: Sequence[int]
  strides: int = 1
  padding: Sequence[int] = (0, 0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv")(x_BxHxWxC)
    x = FrozenBatchNorm(self.features, BN_EPS, self.param_dtype, name="bn")(x)
    return nn.relu(x)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_same(x):
  """3x3 average, stride 1, padding 1, the padding left out of the mean (TF's 'SAME')."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_same(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class _Block(nn.Module):
  """Base of the mixed blocks: `conv(name, features, kernel, ...)` makes a named BasicConv2d."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def conv(self, name, features, kernel, strides=1, padding=(0, 0)):
    return BasicConv2d(features, kernel, strides, padding, self.dtype, self.param_dtype,
                       name=name)


class InceptionA(_Block):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, (1, 1))(x)
    b5 = self.conv("branch5x5_1", 48, (1, 1))(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(b5)
    b3 = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features, (1, 1))(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of 1x7 and 7x1 convs
    b1 = self.conv("branch1x1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7_1", c7, (1, 1))(x)
    b7 = self.conv("branch7x7_2", c7, row[0], padding=row[1])(b7)
    b7 = self.conv("branch7x7_3", 192, col[0], padding=col[1])(b7)
    bd = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
    for i, (features, (kernel, pad)) in enumerate(((c7, col), (c7, row), (c7, col), (192, row))):
      bd = self.conv(f"branch7x7dbl_{i + 2}", features, kernel, padding=pad)(bd)
    bp = self.conv("branch_pool", 192, (1, 1))(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_1", 192, (1, 1))(x)
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  pool: str = "avg"  # FIDInceptionE_1 ("avg", Mixed_7b) / FIDInceptionE_2 ("max", Mixed_7c)

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, (1, 1))(x)
    b3 = self.conv("branch3x3_1", 384, (1, 1))(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
    bp = self.conv("branch_pool", 192, (1, 1))(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """`apply({"params": p}, images_BxHxWx3)` -> pool3 features Bx2048 (fp32).

  Images are floats in [0, 255] (H, W >= 75; FID uses 299 x 299).
  """
  normalize: str = "clean"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWx3):
    if self.normalize not in NORMALIZATIONS:
      raise ValueError(f"normalize={self.normalize!r}; expected one of {NORMALIZATIONS}")
    x = images_BxHxWx3.astype(jnp.float32)
    x = (x - 128.0) / 128.0 if self.normalize == "clean" else x / 127.5 - 1.0
    x = x.astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = BasicConv2d(32, (3, 3), 2, **kw, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), **kw, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), **kw, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, (1, 1), **kw, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), **kw, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(**kw, pool_features=pool_features, name=name)(x)
    x = InceptionB(**kw, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(**kw, channels_7x7=c7, name=name)(x)
    x = InceptionD(**kw, name="Mixed_7a")(x)
    x = InceptionE(**kw, pool="avg", name="Mixed_7b")(x)
    x = InceptionE(**kw, pool="max", name="Mixed_7c")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

  def init_shapes(self, size: int = 299):
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda a: self.init(jax.random.PRNGKey(0), a), x)["params"]
