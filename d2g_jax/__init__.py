"""d2g_jax: Diffusion2GAN (one-step distillation of Stable Diffusion) in JAX/Flax."""

from d2g_jax import _xla_flags

_xla_flags.apply()  # before any JAX backend starts: see d2g_jax/_xla_flags.py

__version__ = "0.1.0"
