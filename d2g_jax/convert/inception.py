"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> Flax params.

The file is the state dict of `pytorch_fid.inception.fid_inception_v3()` (torchvision's
`Inception3(num_classes=1008, aux_logits=False)` with the FID blocks): the TensorFlow
FID graph's weights that clean-fid and pytorch-fid compute FID with. It cannot be
downloaded here; get it once from pytorch-fid's release page
(`PYTORCH_FID_URL` below)
and pass its path. Pickles are read with `torch.load(weights_only=True)`.

Conversion is a name table over `models.inception.FIDInceptionV3`: every conv and batch
norm tensor consumed, shapes checked; the 1008-way classifier (`fc.*`) and
`num_batches_tracked` counters are not part of the features and are skipped by name.
`save_inception` writes a `.safetensors` copy that loads without torch:

    python -m d2g_jax.convert.inception --checkpoint pt_inception-2015-12-05-6726825d.pth \
        --out weights/fid_inception.safetensors
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from d2g_jax.convert import core
from d2g_jax.convert.lpips import read_checkpoint
from d2g_jax.models.inception import FIDInceptionV3

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
BN_LEAVES = {"mean": "running_mean", "var": "running_var"}
CLASSIFIER = ("fc.weight", "fc.bias")
FID_CLASSES = 1008  # the TF graph's classifier; torchvision's ImageNet Inception has 1000


def inception_table() -> core.Table:
  """Flax path -> PyTorch key (`Mixed_5b.branch1x1.conv.weight`, ...), every tensor."""
  return core.module_table(FIDInceptionV3().init_shapes(), [], leaves=BN_LEAVES)


def _skipped(key: str) -> bool:
  return key in CLASSIFIER or key.endswith(".num_batches_tracked")


def params_from_source(source: core.TensorSource, dtype=np.float32) -> dict:
  """Strict conversion of a tensor source (file or state dict) to Flax params."""
  keys = source.keys()
  if "fc.weight" in keys and source.shape("fc.weight")[0] != FID_CLASSES:
    raise core.ConversionError(
        f"{source.description}: fc.weight has {source.shape('fc.weight')[0]} classes; the FID "
        f"Inception has {FID_CLASSES}. This looks like torchvision's ImageNet Inception-v3, "
        f"whose weights differ from the TensorFlow FID graph's: use {PYTORCH_FID_URL}")
  if any(k.startswith("AuxLogits.") for k in keys):
    raise core.ConversionError(f"{source.description} has AuxLogits.* tensors: it is not the FID "
                               f"Inception (pytorch-fid's file has none); use {PYTORCH_FID_URL}")
  return core.to_flax(inception_table(), FIDInceptionV3().init_shapes(), source, dtype=dtype,
                      ignore=[k for k in keys if _skipped(k)],
                      hint=f"Expected pytorch-fid's FID Inception weights ({PYTORCH_FID_URL}).")


def params_from_state_dict(state: dict, dtype=np.float32) -> dict:
  """Flax params from an in-memory state dict (torch tensors or numpy)."""
  return params_from_source(core.from_state_dict(state), dtype)


def load_inception(path: str, normalize: str = "clean", dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> tuple[FIDInceptionV3, dict]:
  """(module, params) from `pt_inception-2015-12-05-*.pth` or a `save_inception` file."""
  if not path:
    raise FileNotFoundError(f"no FID Inception weights given; download {PYTORCH_FID_URL} and set "
                            "its path (config: eval.fid.inception_weights)")
  state = read_checkpoint(path, "FID Inception weights")
  source = core.from_state_dict(state, path)
  params = params_from_source(source, dtype=jnp.dtype(param_dtype))
  return FIDInceptionV3(normalize, dtype=dtype, param_dtype=param_dtype), params


def save_inception(params, path: str):
  """Writes the params as a PyTorch-layout `.safetensors` file (no classifier)."""
  core.save_params_safetensors(inception_table(), params, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="pt_inception-2015-12-05-*.pth")
  parser.add_argument("--out", required=True, help="output .safetensors file")
  args = parser.parse_args(argv)
  _, params = load_inception(args.checkpoint)
  save_inception(params, args.out)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
