"""The latent VGG16-BN classifier: how E-LatentLPIPS's trunk learns (ImageNet classes from VAE
latents), before its taps become a perceptual distance.

Legend: B batch, h/w latent height/width, L latent channels, C trunk channels, K classes.

`net` is the LPIPS trunk (`latent_vgg.VGG16`, the same names, so its params drop into the
loss after `latent_vgg.merge_batch_stats`); the head is
  vgg     torchvision's VGG classifier: adaptive average pool to 7x7, then Linear(C*49, hidden),
          ReLU, Dropout, Linear(hidden, hidden), ReLU, Dropout, Linear(hidden, K). Names
          `classifier_0/3/6` = the official checkpoint's `model.classifier.{0,3,6}`; the
          flattening is channel-major, as torch's, so the kernels convert by transposition.
  linear  global average pool, Dropout, Linear(C, K): a small head for tiny experiments.
Initialisation as torchvision's: linear weights N(0, 0.01), biases 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from d2g_jax.models.latent_vgg import VGG16, VGGConfig

Dtype = Any
HEADS = ("vgg", "linear")
POOL = 7  # torchvision VGG's AdaptiveAvgPool2d((7, 7))


def adaptive_pool_matrix(size: int, out: int = POOL) -> np.ndarray:
  """(out, size) averaging weights of torch's adaptive average pooling along one axis.

  Output i averages inputs [floor(i * size / out), ceil((i + 1) * size / out)).
  """
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x_BxHxWxC: jax.Array, out: int = POOL) -> jax.Array:
  """torch's AdaptiveAvgPool2d((out, out)), NHWC, as two small averaging matmuls."""
  _, h, w, _ = x_BxHxWxC.shape
  ph, pw = adaptive_pool_matrix(h, out), adaptive_pool_matrix(w, out)
  return jnp.einsum("oh,bhwc,pw->bopc", ph, x_BxHxWxC.astype(jnp.float32), pw,
                    precision=jax.lax.Precision.HIGHEST)


class LatentVGGClassifier(nn.Module):
  """Latent VGG16-BN + a classification head: latents BxhxwxL -> logits BxK (fp32)."""
  config: VGGConfig
  num_classes: int
  head: str = "vgg"
  hidden: int = 4096
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x_BxhxwxL: jax.Array, train: bool = False) -> jax.Array:
    """`train`: batch-norm batch statistics (mutable `batch_stats`) and dropout (rng `dropout`)."""
    if self.head not in HEADS:
      raise ValueError(f"classifier head {self.head!r}; expected one of {HEADS}")
    taps = VGG16(self.config, self.dtype, self.param_dtype, train=train,
                 bn_momentum=self.bn_momentum, name="net")(x_BxhxwxL)
    h_BxhxwxC = taps[-1]
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=nn.initializers.normal(0.01), name=name)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    if self.head == "vgg":
      pooled_Bx7x7xC = adaptive_avg_pool(h_BxhxwxC).astype(self.dtype)
      h = jnp.transpose(pooled_Bx7x7xC, (0, 3, 1, 2)).reshape(h_BxhxwxC.shape[0], -1)
      h = drop(nn.relu(dense(self.hidden, "classifier_0")(h)))
      h = drop(nn.relu(dense(self.hidden, "classifier_3")(h)))
      logits_BxK = dense(self.num_classes, "classifier_6")(h)
    else:
      h = drop(jnp.mean(h_BxhxwxC.astype(jnp.float32), axis=(1, 2)).astype(self.dtype))
      logits_BxK = dense(self.num_classes, "classifier")(h)
    return logits_BxK.astype(jnp.float32)
