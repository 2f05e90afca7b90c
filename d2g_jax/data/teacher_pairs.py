"""The pair stage with a real teacher: text encoders + DDIM with classifier-free guidance.

Legend: B batch, H/W/C latent height/width/channels, S text tokens, E text width,
P pooled width.

    encode_fn, generate_fn, params = teacher_fns(teacher, guidance_scale=3.0, num_steps=50)
    cond = encode_fn(["a photo of a cat"])                    # host: token ids and masks
    out = jax.jit(generate_fn)(params, z_BxHxWxC, cond)      # {"x", "prompt_embeds", ...}

`z` is the initial noise in the teacher's latent space, exactly what a diffusers
pipeline takes as `latents=` (NHWC here); `out["x"]` is the pipeline's
`output_type="latent"` result with `DDIMScheduler.from_config(pipe.scheduler.config)`.
`run_pairs(config)` is the `pairs` stage: prompts -> `data.pairs.generate_pairs`.

Records hold, besides `index`, `seed`, `prompt` and `z`: `input_ids` and
`attention_mask` (`input_ids_2`, `attention_mask_2` for SDXL's second tokenizer,
int32 BxS), `x` (fp32), and with `store_embeddings` the text embeddings the UNet
saw: `prompt_embeds` (BxSxE) and, for SDXL, `pooled_prompt_embeds` (BxP). Those are
stored in float16, half the bytes of fp32 (SD 1.5: 118 KB instead of 236 KB a pair,
more than z and x together). float16 rather than bfloat16 because its 10-bit mantissa
is 8x finer and its range (65,504) holds CLIP hidden states: diffusers' own fp16
pipelines produce exactly these embeddings in float16. The token ids are stored too,
so the fp32 embeddings can always be recomputed.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax import dtypes, files, sampling
from d2g_jax.data import pairs as pairs_lib
from d2g_jax.data import shards as fmt
from d2g_jax.data import writer
from d2g_jax.data.prompts import load_prompts
from d2g_jax.log import get_logger
from d2g_jax.teacher import Teacher, load_teacher

_log = get_logger(__name__)

EMBED_DTYPE = jnp.float16  # stored text embeddings (see the module docstring)
FINGERPRINT_PARTS = ("model_index.json", "scheduler", "unet", "text_encoder", "tokenizer",
                     "text_encoder_2", "tokenizer_2")


# ------------------------------------------------------------- the functions
def latent_shape(teacher: Teacher, height: int | None = None,
                 width: int | None = None) -> tuple[int, int, int]:
  """(H, W, C) of the teacher's latents for an image of height x width pixels."""
  default_h, default_w = teacher.default_size
  height, width = height or default_h, width or default_w
  f = teacher.info.vae.downscale
  if height % f or width % f:
    raise ValueError(f"height {height} and width {width} must be multiples of the VAE's "
                     f"downscale factor {f} ({teacher.info.path}/vae/config.json)")
  return height // f, width // f, teacher.info.unet.in_channels


def _pair_keys(seed: int, z_BxHxWxC: jax.Array) -> jax.Array:
  """One PRNG key per pair, from `seed` and the first 64 bits of the pair's own noise."""
  bits_Bx2 = jax.lax.bitcast_convert_type(z_BxHxWxC.reshape(z_BxHxWxC.shape[0], -1)[:, :2],
                                          jnp.uint32)
  base = jax.random.key(seed)
  return jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(base, b[0]), b[1]))(bits_Bx2)


def teacher_fns(teacher: Teacher, *, guidance_scale: float, num_steps: int, eta: float = 0.0,
                height: int | None = None, width: int | None = None, negative_prompt: str = "",
                store_embeddings: bool = True, eta_seed: int = 0,
                ) -> tuple[Callable[[Sequence[str]], dict], Callable, dict]:
  """(encode_fn, generate_fn, params) of the pair stage for a loaded teacher.

  encode_fn(prompts) -> {"input_ids", "attention_mask"[, "input_ids_2",
    "attention_mask_2"]}: int32 BxS numpy arrays, tokenised on the host.
  generate_fn(params, z_BxHxWxC, cond) -> {"x": BxHxWxC fp32[, "prompt_embeds",
    "pooled_prompt_embeds"]}: pure and traceable: the text encoders, then DDIM with
    CFG from z (one `lax.scan`). The unconditional branch is `negative_prompt`,
    encoded once here and broadcast; "" means no negative prompt, as diffusers'
    default `negative_prompt=None` (the empty prompt's embedding; zeros for SDXL
    folders with `force_zeros_for_empty_prompt`).
  params: {"unet", "text", "uncond"}, the pytree generate_fn takes.

  `height` / `width` are pixels (default: the teacher's); SDXL's time_ids use them.
  With `eta > 0` the fresh noise of each DDIM step is drawn per pair from `eta_seed`
  and the pair's own z, so a pair does not depend on the batch it is computed in.
  """
  if teacher.unet is None or not teacher.text_encoders:
    raise ValueError("teacher_fns needs the teacher's UNet and text encoders; load it with "
                     "components=('unet', 'text')")
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  if eta < 0:
    raise ValueError(f"eta={eta} must be >= 0")
  h, w, _ = latent_shape(teacher, height, width)
  f = teacher.info.vae.downscale
  height, width = h * f, w * f
  sdxl = teacher.family == "sdxl"
  encode_tokens, text_params = teacher.encode_tokens_fn()
  schedule, unet = teacher.schedule, teacher.unet
  time_ids_1x6 = teacher.time_ids(1, height, width)

  _, uncond = teacher.encode_prompt([""], [negative_prompt] if negative_prompt else None,
                                    height=height, width=width)
  params = {"unet": teacher.unet_params, "text": text_params,
            "uncond": jax.tree.map(np.asarray, uncond)}  # host arrays, like the weights

  def model_fn(unet_params, x_BxHxWxC, t_B, c):
    return unet.apply({"params": unet_params}, x_BxHxWxC, t_B, c["encoder_hidden_states"],
                      added_cond_kwargs=c.get("added_cond_kwargs"))

  def generate_fn(params, z_BxHxWxC, cond):
    embeds_BxSxE, pooled_BxP = encode_tokens(params["text"], cond)
    b = z_BxHxWxC.shape[0]
    c = {"encoder_hidden_states": embeds_BxSxE}
    if sdxl:
      c["added_cond_kwargs"] = {"text_embeds": pooled_BxP,
                                "time_ids": jnp.broadcast_to(time_ids_1x6, (b, 6))}
    fn = functools.partial(model_fn, params["unet"])
    run = functools.partial(sampling.sample, fn, schedule, guidance_scale=guidance_scale,
                            num_steps=num_steps, eta=eta)
    z_BxHxWxC = z_BxHxWxC.astype(jnp.float32)
    if eta > 0:  # per pair, so that its noise does not depend on the batch
      one = lambda z, c_, k: run(z[None], jax.tree.map(lambda a: a[None], c_),
                                 params["uncond"], key=k)[0]
      x = jax.vmap(one)(z_BxHxWxC, c, _pair_keys(eta_seed, z_BxHxWxC))
    else:
      x = run(z_BxHxWxC, c, params["uncond"])
    out = {"x": x.astype(jnp.float32)}
    if store_embeddings:
      out["prompt_embeds"] = embeds_BxSxE.astype(EMBED_DTYPE)
      if sdxl:
        out["pooled_prompt_embeds"] = pooled_BxP.astype(EMBED_DTYPE)
    return out

  return teacher.tokenize, generate_fn, params


# ------------------------------------------------------------------ the stage
def teacher_fingerprint(path: str, parts: Sequence[str] = FINGERPRINT_PARTS) -> str:
  """sha256 over the pipeline parts the pair stage uses (`parts`, files or folders under
  `path`; `files.fingerprint`: small files by content, weights by name and size)."""
  return files.fingerprint(path, parts)


def _prompts(config) -> list[str]:
  c = config.pairs
  if not c.prompts:
    raise ValueError("config.pairs.prompts is empty; give a prompt source: a .txt file (one "
                     "prompt a line), a .jsonl file, or tfds:<name>[/<config>]/<split>")
  prompts = load_prompts(c.prompts, field=c.prompt_field or None,
                         data_dir=c.tfds_data_dir or None, caption_key=c.caption_key or None,
                         all_captions=c.all_captions)
  if c.num_pairs == -1:
    return prompts
  if not 1 <= c.num_pairs <= len(prompts):
    raise ValueError(f"config.pairs.num_pairs={c.num_pairs}, but {c.prompts} holds "
                     f"{len(prompts)} prompts; use 1..{len(prompts)}, or -1 for all")
  return prompts[:c.num_pairs]


def _meta(config, teacher: Teacher, shape: tuple[int, ...]) -> dict:
  c = config.pairs
  f = teacher.info.vae.downscale
  return json.loads(json.dumps({
      "teacher": {"path": os.path.abspath(config.teacher.path), "family": teacher.family,
                  "fingerprint": teacher_fingerprint(config.teacher.path),
                  "dtype": config.teacher.dtype, "attention": config.teacher.attention},
      "prompts": c.prompts, "sampler": "ddim", "guidance_scale": float(c.guidance_scale),
      "num_steps": int(c.num_steps), "eta": float(c.eta),
      "resolution": [shape[0] * f, shape[1] * f], "negative_prompt": c.negative_prompt,
      "store_embeddings": bool(c.store_embeddings),
      "embeddings_dtype": jnp.dtype(EMBED_DTYPE).name if c.store_embeddings else None,
  }))


def _expected_config(config, meta: dict, prompts: list[str], shape) -> dict:
  """The parts of generate_pairs' manifest config known before the teacher is loaded."""
  return json.loads(json.dumps({
      "meta": meta, "seed": int(config.seed), "num_examples": len(prompts),
      "shard_size": int(config.pairs.shard_size), "latent_shape": list(shape),
      "noise": pairs_lib.NOISE, "prng_impl": str(jax.config.jax_default_prng_impl),
      "prompts_sha256": pairs_lib.prompts_sha256(prompts)}))


def run_pairs(config) -> dict:
  """The pairs stage: `config.pairs.*` prompts -> (z, c, x) shards in `config.pairs.out_dir`.

  Resumable: the same command continues an interrupted run (only missing shards are
  generated) and returns at once when the dataset is complete; another config into
  the same folder raises, listing what differs. Returns the manifest.
  """
  c = config.pairs
  dtype = dtypes.get(config.teacher.dtype, "config.teacher.dtype")
  out_dir = c.out_dir
  path = config.teacher.path
  info_only = load_teacher(path, components=())  # configs only: family, sizes, schedule
  shape = latent_shape(info_only, c.height or None, c.width or None)
  prompts = _prompts(config)
  meta = _meta(config, info_only, shape)
  num_shards = -(-len(prompts) // c.shard_size) if c.shard_size > 0 else 0
  _log.info("teacher %s (%s, %s); %s prompts from %s",
            path, info_only.family, config.teacher.dtype, len(prompts), c.prompts)
  _log.info("%s-step DDIM (eta %s), guidance %s, %sx%s px = latents %s; global batch %s, %s shards"
            " of %s -> %s",
            c.num_steps, c.eta, c.guidance_scale, meta['resolution'][0], meta['resolution'][1],
            shape, c.batch_size, num_shards, c.shard_size, out_dir)

  done = writer.existing_manifest(out_dir, fmt.PAIRS,
                                 _expected_config(config, meta, prompts, shape))
  if done is not None:
    _log.info("%s is already complete (%s pairs); nothing to do", out_dir, done['num_examples'])
    return done
  if os.path.exists(os.path.join(out_dir, fmt.MANIFEST)):
    _log.info("resuming the unfinished run in %s: complete shards are kept, the others are "
              "generated",
              out_dir)
  else:
    _log.info("new dataset; if interrupted, run the same command again to resume")

  teacher = load_teacher(path, dtype=dtype, param_dtype=dtype, components=("unet", "text"),
                         attention=config.teacher.attention)
  encode_fn, generate_fn, params = teacher_fns(
      teacher, guidance_scale=c.guidance_scale, num_steps=c.num_steps, eta=c.eta,
      height=c.height or None, width=c.width or None, negative_prompt=c.negative_prompt,
      store_embeddings=c.store_embeddings, eta_seed=config.seed)
  manifest = pairs_lib.generate_pairs(
      out_dir, prompts, generate_fn, latent_shape=shape, seed=config.seed,
      batch_size=c.batch_size, shard_size=c.shard_size, manifest_meta=meta, params=params,
      encode_fn=encode_fn)
  _log.info(f"complete: {manifest['num_examples']} pairs in {manifest['num_shards']} shards "
        f"({manifest['total_bytes'] / 2**20:.1f} MiB) in {out_dir}; record: "
        + ", ".join(f"{k} {v}" for k, v in manifest["record"].items()))
  return manifest
