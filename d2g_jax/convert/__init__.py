"""Checkpoint conversion: diffusers / transformers / (E-)LPIPS files <-> Flax params."""

from d2g_jax.convert.clip import load_clip_text, save_clip_text
from d2g_jax.convert.core import ConversionError
from d2g_jax.convert.lpips import load_latent_lpips, load_pixel_lpips
from d2g_jax.convert.unet import load_unet, save_unet
from d2g_jax.convert.vae import load_vae, save_vae

__all__ = ["ConversionError", "load_clip_text", "load_latent_lpips", "load_pixel_lpips",
           "load_unet", "load_vae", "save_clip_text", "save_unet", "save_vae"]
