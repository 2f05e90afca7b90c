"""A diffusers SD 1.x / SD 2.x / SDXL pipeline folder as a Flax teacher.

Legend: B batch, S text tokens (77), E text width (768 / 1024 / 2048), P pooled width.

    teacher = load_teacher("stable-diffusion-v1-5")
    cond, uncond = teacher.encode_prompt(["a photo of a cat"])
    eps = teacher.unet.apply({"params": teacher.unet_params}, z, t, **cond)

`cond` / `uncond` are the keyword arguments of the UNet (and the `cond` pytrees of
`d2g_jax.sampling.sample`): `{"encoder_hidden_states": BxSxE}` for SD 1.x / 2.x, plus
`"added_cond_kwargs": {"text_embeds": BxP, "time_ids": Bx6}` for SDXL. They equal
diffusers' `StableDiffusionPipeline.encode_prompt` / `StableDiffusionXLPipeline.encode_prompt`
(and the SDXL pipeline's `add_time_ids`), quirks included: `clip_skip` applies to the
prompt only, never to the negative prompt; SDXL's absent negative prompt is all zeros
when the folder's model_index says `force_zeros_for_empty_prompt` (SDXL base does).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from d2g_jax.convert.clip import load_clip_text
from d2g_jax.convert.pipeline import PipelineInfo, inspect_pipeline
from d2g_jax.convert.unet import load_unet
from d2g_jax.convert.vae import load_vae
from d2g_jax.files import load_json
from d2g_jax.models.clip_text import CLIPTextModel
from d2g_jax.sampling.schedule import ScheduleConfig

COMPONENTS = ("unet", "vae", "text")


def token_keys(i: int) -> tuple[str, str]:
  """The record keys of text encoder i's tokens: ("input_ids", "attention_mask") for the
  first, ("input_ids_2", "attention_mask_2") for SDXL's second. Pair shards, evaluation
  samplers and the trainer all key tokens this way."""
  suffix = "" if i == 0 else f"_{i + 1}"
  return f"input_ids{suffix}", f"attention_mask{suffix}"


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """One tokenizer + CLIP text encoder pair of a pipeline."""
  name: str  # "text_encoder" or "text_encoder_2"
  tokenizer: Any  # a transformers tokenizer
  module: CLIPTextModel
  params: Any
  use_attention_mask: bool  # config.json's `use_attention_mask` (diffusers honours it for SD)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 BxS, padded / truncated to the tokenizer's length."""
    out = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=self.tokenizer.model_max_length, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


class Teacher:
  """The loaded components of a pipeline folder; `None` for those not asked for."""

  def __init__(self, info: PipelineInfo, schedule: ScheduleConfig, unet=None, unet_params=None,
               vae=None, vae_params=None, text_encoders: Sequence[TextEncoder] = ()):
    self.info = info
    self.family = info.family
    self.schedule = schedule
    self.unet, self.unet_params = unet, unet_params
    self.vae, self.vae_params = vae, vae_params
    self.text_encoders = tuple(text_encoders)

  def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Host tokenisation with every tokenizer of the folder: int32 BxS arrays keyed by
    `token_keys` (what pair records store and `encode_tokens_fn` reads)."""
    self._need_text()
    out = {}
    for i, enc in enumerate(self.text_encoders):
      k_ids, k_mask = token_keys(i)
      out[k_ids], out[k_mask] = enc.tokenize(list(prompts))
    return out

  def encode_tokens_fn(self) -> tuple[Callable, Any]:
    """(encode(text_params, tokens) -> (BxSxE embeddings, BxP pooled or None), text_params):
    the frozen text encoders on tokens keyed by `token_keys`, as `encode_prompt` encodes the
    prompts. Pure and traceable: the trainer and the samplers call it inside jit."""
    self._need_text()
    sdxl = self.family == "sdxl"
    modules = self._modules
    use_masks = tuple(enc.use_attention_mask and not sdxl for enc in self.text_encoders)

    def encode(text_params, tokens):
      keys = [token_keys(i) for i in range(len(modules))]
      ids = [jnp.asarray(tokens[k]) for k, _ in keys]
      masks = [jnp.asarray(tokens[m]) if use else None for (_, m), use in zip(keys, use_masks)]
      return encode_tokens(modules, text_params, ids, masks, sdxl=sdxl)
    return encode, tuple(enc.params for enc in self.text_encoders)

  def _need_text(self):
    if not self.text_encoders:
      raise ValueError("this Teacher was loaded without its text encoders; load it with "
                       "components including 'text'")

  @property
  def default_size(self) -> tuple[int, int]:
    """(height, width) in pixels the pipeline samples by default (unet sample_size x 8)."""
    size = (self.info.unet.sample_size or 64) * self.info.vae.downscale
    return size, size

  def time_ids(self, batch: int, height: int | None = None, width: int | None = None,
               original_size: tuple[int, int] | None = None,
               crops_coords_top_left: tuple[int, int] = (0, 0),
               target_size: tuple[int, int] | None = None) -> np.ndarray:
    """SDXL micro-conditioning, Bx6 float32: original size, crop top-left, target size."""
    default = (height or self.default_size[0], width or self.default_size[1])
    ids = [*(original_size or default), *crops_coords_top_left, *(target_size or default)]
    return np.tile(np.asarray([ids], np.float32), (batch, 1))

  def encode_prompt(self, prompts: Sequence[str] | str,
                    negative_prompts: Sequence[str] | str | None = None, *,
                    clip_skip: int | None = None, height: int | None = None,
                    width: int | None = None, original_size: tuple[int, int] | None = None,
                    crops_coords_top_left: tuple[int, int] = (0, 0),
                    target_size: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """(cond, uncond): the UNet conditioning of `prompts` and of the negative prompts
    (empty by default) for classifier-free guidance. fp32 jax arrays.

    The size arguments are SDXL's `time_ids` (height/width default to `default_size`);
    `clip_skip` as in diffusers (layers skipped from the end).
    """
    self._need_text()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    if negative_prompts is None:
      negatives = None
    else:
      negatives = ([negative_prompts] * b if isinstance(negative_prompts, str)
                   else list(negative_prompts))
      if len(negatives) != b:
        raise ValueError(f"{len(negatives)} negative prompts for {b} prompts; give one per prompt, "
                         "a single string, or None")
    sdxl = self.family == "sdxl"
    embeds, pooled = self._encode(prompts, clip_skip)
    zero_negative = sdxl and negatives is None and self.info.force_zeros_for_empty_prompt
    if zero_negative:
      neg_embeds, neg_pooled = jnp.zeros_like(embeds), jnp.zeros_like(pooled)
    else:
      neg_embeds, neg_pooled = self._encode(negatives or [""] * b, None)
    cond = {"encoder_hidden_states": embeds}
    uncond = {"encoder_hidden_states": neg_embeds}
    if sdxl:
      time_ids = jnp.asarray(self.time_ids(b, height, width, original_size, crops_coords_top_left,
                                           target_size))
      cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
      uncond["added_cond_kwargs"] = {"text_embeds": neg_pooled, "time_ids": time_ids}
    return cond, uncond

  def _encode(self, prompts: Sequence[str], clip_skip: int | None):
    """(BxSxE embeddings, BxP pooled or None) as the diffusers pipeline computes them."""
    ids, masks = [], []
    for enc in self.text_encoders:
      i, m = enc.tokenize(prompts)
      ids.append(i)
      masks.append(m if enc.use_attention_mask and self.family != "sdxl" else None)
    params = tuple(enc.params for enc in self.text_encoders)
    return _encode_jit(self._modules, self.family == "sdxl", clip_skip)(params, tuple(ids),
                                                                        tuple(masks))

  @property
  def _modules(self) -> tuple[CLIPTextModel, ...]:
    return tuple(enc.module for enc in self.text_encoders)


@functools.lru_cache(maxsize=32)
def _encode_jit(modules: tuple[CLIPTextModel, ...], sdxl: bool, clip_skip: int | None):
  return jax.jit(functools.partial(encode_tokens, modules, sdxl=sdxl, clip_skip=clip_skip))


def encode_tokens(modules: Sequence[CLIPTextModel], params: Sequence[Any],
                  ids: Sequence[jax.Array], masks: Sequence[jax.Array | None], *, sdxl: bool,
                  clip_skip: int | None = None):
  """Pure: token ids -> (BxSxE embeddings, BxP pooled or None), per diffusers' rules.

  SD: the last hidden state (after the final layer norm), or with `clip_skip` the
  hidden state `clip_skip` layers earlier, final-normed. SDXL: each encoder's hidden
  state `clip_skip + 1` (default 1) layers before the last, concatenated on the
  feature axis; pooled = the projected EOS state of the encoder with a projection.
  """
  outs, pooled = [], None
  for module, p, i, m in zip(modules, params, ids, masks):
    out = module.apply({"params": p}, i, m)
    if sdxl:
      if pooled is None and out.text_embeds is not None:
        pooled = out.text_embeds.astype(jnp.float32)
      outs.append(out.hidden_states[-((clip_skip or 0) + 2)])
    elif clip_skip is None:
      outs.append(out.last_hidden_state)
    else:
      cfg = module.config
      norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32)
      outs.append(norm.apply({"params": p["text_model"]["final_layer_norm"]},
                             out.hidden_states[-(clip_skip + 1)]))
  embeds = jnp.concatenate([o.astype(jnp.float32) for o in outs], axis=-1)
  return embeds, pooled


def _tokenizer(path: str, info: PipelineInfo, name: str):
  import transformers
  library, cls_name = info.model_index[name]
  cls = getattr(transformers, cls_name, None) if library == "transformers" else None
  if cls is None:
    raise ValueError(f"{info.path}/model_index.json: {name} is {library}.{cls_name}; expected a "
                     "transformers tokenizer class such as CLIPTokenizer")
  try:
    return cls.from_pretrained(path)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"could not load the tokenizer in {path!r} with transformers.{cls_name}: {e}"
                     ) from e


def load_teacher(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 components: Sequence[str] = COMPONENTS, attention: str = "auto",
                 variant: str | None = None) -> Teacher:
  """Loads a diffusers SD 1.x / SD 2.x / SDXL pipeline folder.

  `components` picks what to load: "unet", "vae", "text" (text encoders and
  tokenizers); the folder is checked whole either way. `dtype` is the compute dtype,
  `param_dtype` the params' (numpy, on the host). `attention` is the UNet's and
  VAE's attention kernel (see models/attention.py).
  """
  unknown = set(components) - set(COMPONENTS)
  if unknown:
    raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
  info = inspect_pipeline(path)
  schedule = ScheduleConfig.from_folder(path)
  if info.family != "sdxl":  # StableDiffusionPipeline.__init__ patches outdated configs
    schedule = schedule.with_sd_pipeline_fixes()
  kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
  unet = unet_params = vae = vae_params = None
  if "unet" in components:
    unet, unet_params = load_unet(info.folder("unet"), attention=attention, **kw)
  if "vae" in components:
    vae, vae_params = load_vae(info.folder("vae"), implementation=attention, **kw)
  encoders = []
  if "text" in components:
    for (enc_name, _), tok_name in zip(info.text_encoders, info.tokenizers):
      module, params = load_clip_text(info.folder(enc_name), **kw)
      tokenizer = _tokenizer(info.folder(tok_name), info, tok_name)
      if len(tokenizer) > module.config.vocab_size:
        raise ValueError(f"{info.folder(tok_name)} has {len(tokenizer)} tokens but "
                         f"{info.folder(enc_name)} embeds only {module.config.vocab_size}: "
                         "mismatched tokenizer and text encoder")
      if tokenizer.model_max_length > module.config.max_position_embeddings:
        raise ValueError(f"{info.folder(tok_name)} pads to {tokenizer.model_max_length} tokens "
                         f"but {info.folder(enc_name)} has {module.config.max_position_embeddings} "
                         "positions: mismatched tokenizer and text encoder")
      raw = load_json(os.path.join(info.folder(enc_name), "config.json"))
      encoders.append(TextEncoder(enc_name, tokenizer, module, params,
                                  bool(raw.get("use_attention_mask", False))))
  return Teacher(info, schedule, unet, unet_params, vae, vae_params, encoders)
