"""Checkpoint conversion: diffusers / transformers / (E-)LPIPS files <-> Flax params."""

from d2g_jax.convert.core import ConversionError
from d2g_jax.convert.unet import load_unet, save_unet

__all__ = ["ConversionError", "load_unet", "save_unet"]
