"""Time per image of the E-LatentLPIPS training stages, ours against PyTorch, on this machine.

  python benchmarks/latent_vgg.py --batch 8 --repeats 3

Full-size networks with random weights:
  encode 256 px   the SD VAE encoder (posterior mean), 256x256 -> 32x32x4: latent_cache, ImageNet
  encode BAPPS    the same on three 64x64 patches (ref, p0, p1): latent_cache, one 2AFC triplet
  train step      latent VGG16-BN + torchvision's classifier (4096, 1000 classes) on 32x32x4,
                  forward + backward + SGD: latent_vgg_train, one ImageNet image
  features        the frozen trunk on the three 8x8x4 latents of a triplet: latent_vgg_calibrate
                  (the heads' own training on the pooled features is negligible)
PyTorch sides: diffusers' AutoencoderKL.encode and torchvision's VGG16-BN with the three
first max-pools removed (the official trunk's layout), eager, fp32. Every call is timed in
turns with the others after a warm-up (`benchmarks/common.py`); medians of `--repeats`.
Host-side JPEG decoding and resizing (threads, overlapped with the device) are not included.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import interleaved_medians

import d2g_jax  # noqa: F401  (XLA CPU flags before JAX starts)
from d2g_jax.data.latents import encode_images, encoder_params
from d2g_jax.latent_lpips import pretrain as train_lib
from d2g_jax.latent_lpips.calibrate import pair_features
from d2g_jax.models.latent_vgg import LPIPS, LPIPSConfig, VGGConfig, init_params
from d2g_jax.models.latent_vgg_classifier import LatentVGGClassifier
from d2g_jax.models.vae import AutoencoderKL, VAEConfig


def he_params(shapes, seed: int = 0):
  """Random params with stable activations: kernels N(0, 1/fan_in), norms 1, biases 0."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    return np.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def ours(batch: int) -> dict:
  fns = {}
  vae = AutoencoderKL(VAEConfig.sd())
  vparams = jax.device_put(encoder_params(he_params(vae.init_shapes(64))))
  encode = jax.jit(functools.partial(encode_images, vae))
  rng = np.random.default_rng(0)
  img256 = rng.integers(0, 256, (batch, 256, 256, 3), np.uint8)
  img64 = rng.integers(0, 256, (3 * batch, 64, 64, 3), np.uint8)
  fns["encode 256 px"] = lambda: encode(vparams, img256).block_until_ready()
  fns["encode BAPPS"] = lambda: encode(vparams, img64).block_until_ready()

  model = LatentVGGClassifier(VGGConfig.latent(4), 1000, head="vgg")
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
                                             train=True))
  variables = he_params(shapes)
  state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
           "batch_stats": variables["batch_stats"],
           "opt_state": tx.init(variables["params"])}
  state = {"s": jax.device_put(state)}
  step = jax.jit(functools.partial(train_lib.train_step, model, tx, "", 1.0, 0,
                                   lambda s: 0.01), donate_argnums=0)
  batch_d = {"latent": rng.standard_normal((batch, 32, 32, 4)).astype(np.float32),
             "label": rng.integers(0, 1000, batch).astype(np.int32)}

  def train():
    state["s"], out = step(state["s"], batch_d)
    out["loss"].block_until_ready()
  fns["train step"] = train

  lp = LPIPS(LPIPSConfig.latent("sd15"))
  net = jax.device_put(init_params(lp)["net"])
  feat = jax.jit(functools.partial(pair_features, lp))
  lat = [rng.standard_normal((batch, 8, 8, 4)).astype(np.float32) for _ in range(3)]
  fns["features"] = lambda: jax.block_until_ready(feat(net, *lat))
  return fns


def theirs(batch: int) -> dict:
  import diffusers
  import torch
  import torchvision
  torch.manual_seed(0)
  fns = {}
  vae = diffusers.AutoencoderKL(**{k: v for k, v in VAEConfig.sd().to_diffusers().items()
                                   if not k.startswith("_")}).eval()
  img256 = torch.rand(batch, 3, 256, 256) * 2 - 1
  img64 = torch.rand(3 * batch, 3, 64, 64) * 2 - 1

  def encode(x):
    with torch.no_grad():
      return vae.encode(x).latent_dist.mean * vae.config.scaling_factor
  fns["encode 256 px"] = lambda: encode(img256)
  fns["encode BAPPS"] = lambda: encode(img64)

  net = torchvision.models.vgg16_bn()
  net.features[0] = torch.nn.Conv2d(4, 64, 3, padding=1)
  pools = [i for i, m in enumerate(net.features) if isinstance(m, torch.nn.MaxPool2d)][:3]
  for i in pools:
    net.features[i] = torch.nn.Identity()
  net.train()
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(batch, 4, 32, 32)
  y = torch.randint(0, 1000, (batch,))

  def train():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
  fns["train step"] = train

  trunk = net.features[:44].eval()  # the five taps: relu outputs after blocks 1-5
  lat = torch.randn(3 * batch, 4, 8, 8)

  def features():
    with torch.no_grad():
      trunk(lat)
  fns["features"] = features
  return fns


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--record", default="", metavar="PATH",
                 help="append this run to PATH as one JSON line (benchmarks/results/*.jsonl; benchmarks/tables.py)")
  args = p.parse_args(argv)
  a, b = ours(args.batch), theirs(args.batch)
  fns = {f"ours/{k}": v for k, v in a.items()}
  fns.update({f"torch/{k}": v for k, v in b.items()})
  for f in fns.values():  # compile and warm up
    f()
  t = interleaved_medians(fns, args.repeats)
  per = {"encode 256 px": args.batch, "encode BAPPS": args.batch, "train step": args.batch,
         "features": args.batch}
  rows = {}
  for k in a:
    o, r = t[f"ours/{k}"] / per[k], t[f"torch/{k}"] / per[k]
    rows[k] = {"ours_s_per_image": o, "torch_s_per_image": r, "speedup": r / o}
    print(f"{k:14s} ours {o * 1e3:9.1f} ms/image   PyTorch {r * 1e3:9.1f} ms/image   "
          f"{r / o:5.2f}x")
  print(json.dumps({"batch": args.batch, "repeats": args.repeats, "rows": rows}))
  if args.record:
    from common import record
    record(args.record, {"batch": args.batch, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
  main()
