"""Helpers shared by the parity tests: NCHW <-> NHWC and seeded random inputs."""

import numpy as np


def nchw(x_nhwc: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2))


def nhwc(x_nchw) -> np.ndarray:
  x = x_nchw.detach().cpu().numpy() if hasattr(x_nchw, "detach") else np.asarray(x_nchw)
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def randn(seed: int, *shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_close_to_scale(ours, ref, rel: float = 1e-4):
  """max |ours - ref| <= rel * max |ref|: the project's fp32 parity criterion."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = max(np.abs(ref).max(), 1e-12)
  err = np.abs(ours - ref).max()
  assert err <= rel * scale, f"max abs error {err:.3e} exceeds {rel:g} x output scale {scale:.3e}"
