"""Tiny random-weight diffusers pipelines (SD 1.x, SD 2.x, SDXL) for demos and tests.

Real weights cannot be downloaded everywhere (CI has no model hub); these pipelines have
the real structure (components, tokenizers, schedulers, configs) at toy sizes, so every
loading, encoding, sampling and export path runs end to end on a laptop CPU. Needs the
conversion extra: pip install 'd2g_jax[torch]'.
"""

import json
import os
import string

import diffusers
import torch
import transformers

from d2g_jax.models.clip_text import CLIPTextConfig
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import VAEConfig

FAMILIES = ("sd1", "sd2", "sdxl")

MAX_LEN = 12
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    skip_prk_steps=True, steps_offset=1)


def make_tokenizer(pad_token: str) -> transformers.CLIPTokenizer:
  """A CLIP BPE tokenizer over lowercase words; EOS has the highest id, as in real CLIP."""
  vocab = {}
  for c in string.ascii_lowercase + "!":
    vocab[c] = len(vocab)
  for c in string.ascii_lowercase:
    vocab[c + "</w>"] = len(vocab)
  merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "f</w>")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LEN,
                                    pad_token=pad_token)


def make_text_encoder(hidden: int, act: str, projection_dim: int | None = None, seed: int = 0):
  cfg = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=MAX_LEN,
                       hidden_act=act, projection_dim=projection_dim or hidden,
                       with_projection=projection_dim is not None)
  torch.manual_seed(seed)
  cls = (transformers.CLIPTextModelWithProjection if cfg.with_projection
         else transformers.CLIPTextModel)
  return cls(transformers.CLIPTextConfig(**cfg.to_transformers())).eval()


def make_unet(preset: str, seed: int = 0):
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel.from_config(UNetConfig.preset(preset).to_diffusers()).eval()
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return unet


def make_vae():
  torch.manual_seed(1)
  cfg = {k: v for k, v in VAEConfig.tiny().to_diffusers().items() if not k.startswith("_")}
  return diffusers.AutoencoderKL(**cfg).eval()


def build(family: str, folder: str, force_zeros: bool = True):
  """Assembles a tiny random pipeline of `family` and saves it to `folder`."""
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
  if family == "sdxl":
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(16, "quick_gelu", seed=2),
        text_encoder_2=make_text_encoder(16, "gelu", projection_dim=32, seed=3),
        tokenizer=make_tokenizer("<|endoftext|>"), tokenizer_2=make_tokenizer("!"),
        unet=make_unet("tiny_sdxl"),
        scheduler=diffusers.EulerDiscreteScheduler(
            timestep_spacing="leading", **{k: v for k, v in SD_SCHEDULER.items()
                                           if k != "skip_prk_steps"}),
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
  else:
    sd1 = family == "sd1"
    pipe = diffusers.StableDiffusionPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(24, "quick_gelu" if sd1 else "gelu", seed=4),
        tokenizer=make_tokenizer("<|endoftext|>" if sd1 else "!"),
        unet=make_unet("tiny_sd15" if sd1 else "tiny_sd2"),
        scheduler=diffusers.PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder)
  if family == "sdxl":
    # SDXL base's scheduler_config.json also carries the DDIM options below (DDIM reads
    # them; Euler does not take them as arguments), so write them as the real file has them.
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(path) as fh:
      config = json.load(fh)
    config.update(clip_sample=False, set_alpha_to_one=False)
    with open(path, "w") as fh:
      json.dump(config, fh, indent=2)
  return pipe


def build_clip_model(folder: str, image_size: int = 32, seed: int = 5) -> transformers.CLIPModel:
  """A tiny random transformers CLIPModel folder (both towers, tokenizer, image processor),
  laid out like openai/clip-vit-large-patch14, for CLIP-score tests and demos."""
  tokenizer = make_tokenizer("<|endoftext|>")
  eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  text = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=16,
              bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
  vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                image_size=image_size, patch_size=8, projection_dim=16)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                         projection_dim=16)).eval()
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size,
                                                            "width": image_size})
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  processor.save_pretrained(folder)
  return model
