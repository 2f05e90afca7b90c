"""A fake teacher for the pair-stage tests, and a command line that runs the stage with it.

    python tests/pairs_worker.py OUT_DIR [--num 64] [--shard-size 16] [--batch-size 8]
        [--sleep 0] [--guidance 3] [--devices 8] [--process-id I --num-processes P --port N]

The tests import `fake_generate`, `fake_encode` and `run` for in-process runs, and start
this file as a subprocess to kill it (SIGKILL) mid-run or to run two hosts.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

LATENT = (8, 8, 4)
VOCAB, LENGTH, WIDTH = 64, 6, 8


def fake_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"embedding": rng.standard_normal((VOCAB, WIDTH)).astype(np.float32),
          "mix": (rng.standard_normal((LATENT[-1], LATENT[-1])) / 2).astype(np.float32)}


def fake_encode(prompts: list[str], sleep: float = 0.0) -> dict:
  """A deterministic 'tokenizer': character codes mod VOCAB, padded to LENGTH."""
  if sleep:
    time.sleep(sleep)
  ids = np.zeros((len(prompts), LENGTH), np.int32)
  for i, p in enumerate(prompts):
    codes = [ord(c) % VOCAB for c in p[:LENGTH]]
    ids[i, :len(codes)] = codes
  return {"input_ids": ids}


def fake_generate(params, z_BxHxWxC, cond, guidance: float = 3.0):
  """A tiny stand-in for text encoder + guided DDIM: a few nonlinear steps from z."""
  import jax.numpy as jnp
  emb_BxLxD = jnp.take(params["embedding"], cond["input_ids"], axis=0)
  pooled_BxD = emb_BxLxD.mean(axis=1)
  bias_Bx1x1xC = pooled_BxD[:, None, None, :z_BxHxWxC.shape[-1]]
  x = z_BxHxWxC
  for _ in range(3):
    x = x - 0.1 * guidance * jnp.tanh(x @ params["mix"] + bias_Bx1x1xC)
  return {"x": x, "prompt_embeds": emb_BxLxD.astype(jnp.float16), "pooled": pooled_BxD}


def prompts(num: int) -> list[str]:
  return [f"a photo of thing {i}" if i % 3 else f"sketch {i}" for i in range(num)]


def run(out_dir: str, num: int = 64, shard_size: int = 16, batch_size: int = 8,
        guidance: float = 3.0, seed: int = 7, sleep: float = 0.0, progress: bool = False):
  import functools

  from d2g_jax.data import pairs
  return pairs.generate_pairs(
      out_dir, prompts(num), functools.partial(fake_generate, guidance=guidance),
      encode_fn=functools.partial(fake_encode, sleep=sleep), params=fake_params(),
      latent_shape=LATENT, seed=seed, batch_size=batch_size, shard_size=shard_size,
      manifest_meta={"teacher": "fake", "guidance": guidance, "steps": 3, "resolution": 64},
      progress=progress)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("out_dir")
  p.add_argument("--num", type=int, default=64)
  p.add_argument("--shard-size", type=int, default=16)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--guidance", type=float, default=3.0)
  p.add_argument("--sleep", type=float, default=0.0)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--port", type=int, default=0)
  args = p.parse_args(argv)
  # Keep the flags d2g_jax set at import (tests/conftest.py runs with the same), swap the device count.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  # The same settings as tests/conftest.py, so subprocess and in-process runs agree bitwise.
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_default_matmul_precision", "highest")
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id)
  run(args.out_dir, args.num, args.shard_size, args.batch_size, args.guidance, sleep=args.sleep,
      progress=True)
  print("done", flush=True)


if __name__ == "__main__":
  main()
