"""d2g_jax: Diffusion2GAN (one-step distillation of Stable Diffusion) in JAX/Flax."""

__version__ = "0.1.0"
