"""Paired differentiable augmentations (d2g_jax.losses.augment)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2g_jax.losses import augment as A
from d2g_jax.losses import resample as R

GROUP_POLICIES = ["b", "g", "c", "o"]
ALL_POLICIES = GROUP_POLICIES + ["bg", "bgco"]


def _x(shape=(6, 8, 12, 4), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# Jitted once per shape/policy: eager dispatch would compile every small op separately.
# p may be traced (one compile serves every p) or static.
_pair = jax.jit(A.augment_pair, static_argnames=("policy",))
_aug = jax.jit(A.augment, static_argnames=("policy",))
_apply = jax.jit(A.apply_params)
_resample = jax.jit(R.affine_resample)
_sample = jax.jit(A.sample_params, static_argnames=("batch", "height", "width", "policy"))


def _np_shift_reflect(img_HxWxC, dy, dx):
  """Reference integer shift (content moves down/right) with reflect padding."""
  P = max(abs(dy), abs(dx), 1)
  padded = np.pad(img_HxWxC, ((P, P), (P, P), (0, 0)), mode="reflect")
  H, W = img_HxWxC.shape[:2]
  return padded[P - dy:P - dy + H, P - dx:P - dx + W]


# ----------------------------------------------------------------------------- API


def test_invalid_policy_names_bad_letter_and_valid_ones():
  x = _x()
  with pytest.raises(ValueError, match=r"'x'.*valid letters are 'b'.*'g'.*'c'.*'o'"):
    A.augment(jax.random.key(0), x, "bxg")
  with pytest.raises(ValueError, match=r"'B'"):
    A.augment_pair(jax.random.key(0), x, x, "B")
  with pytest.raises(ValueError, match="p must be in"):
    A.augment(jax.random.key(0), x, "b", p=1.5)
  with pytest.raises(ValueError, match="same shape"):
    A.augment_pair(jax.random.key(0), x, x[:, :4], "b")
  with pytest.raises(ValueError, match="NHWC"):
    A.augment(jax.random.key(0), x[0], "b")
  assert A.POLICIES == frozenset("bgco")


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_identical_inputs_give_identical_outputs(policy):
  x = _x()
  a, b = _pair(jax.random.key(3), x, x, policy, 1.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.sum((a - b) ** 2)) == 0.0


def test_empty_policy_is_identity():
  x, y = _x(), _x(seed=1)
  a, b = A.augment_pair(jax.random.key(0), x, y, "")
  assert a is x and b is y


def test_determinism_and_key_dependence():
  x, y = _x(), _x(seed=1)
  a1, b1 = _pair(jax.random.key(5), x, y, "bgco", 1.0)
  a2, b2 = _pair(jax.random.key(5), x, y, "bgco", 1.0)
  a3, _ = _pair(jax.random.key(6), x, y, "bgco", 1.0)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  np.testing.assert_array_equal(np.asarray(b1), np.asarray(b2))
  assert not np.allclose(np.asarray(a1), np.asarray(a3))


def test_pair_is_single_augment_of_each():
  x, y = _x(), _x(seed=1)
  key = jax.random.key(7)
  a, b = _pair(key, x, y, "bgco", 1.0)
  np.testing.assert_allclose(np.asarray(a), np.asarray(_aug(key, x, "bgco", 1.0)), atol=1e-5)
  np.testing.assert_allclose(np.asarray(b), np.asarray(_aug(key, y, "bgco", 1.0)), atol=1e-5)


@pytest.mark.parametrize("policy", GROUP_POLICIES + ["bgco"])
def test_p1_changes_input_p0_is_identity(policy):
  x, y = _x(), _x(seed=1)
  a, b = _pair(jax.random.key(1), x, y, policy, 1.0)
  assert float(jnp.abs(a - x).max()) > 0.1 and float(jnp.abs(b - y).max()) > 0.1
  a, b = _pair(jax.random.key(1), x, y, policy, 0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(y))


@pytest.mark.parametrize("policy", GROUP_POLICIES + ["bgco"])
def test_gradients_flow(policy):
  x, y = _x(), _x(seed=1)
  loss = lambda x: jnp.sum(jnp.square(jnp.subtract(*A.augment_pair(jax.random.key(2), x, y,
                                                                    policy))))
  g = jax.jit(jax.grad(loss))(x)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


def test_dtype_jit_vmap():
  x = _x((2, 8, 8, 16)).astype(jnp.bfloat16)  # 16 channels (SD3 / Flux latents), bf16
  a, b = _pair(jax.random.key(0), x, x, "bgco", 1.0)
  assert a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16 and a.shape == x.shape
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  xs = jnp.stack([_x(), _x(seed=1)])
  keys = jax.random.split(jax.random.key(0), 2)
  out = jax.jit(jax.vmap(lambda k, x: A.augment(k, x, "bgco")))(keys, xs)
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(_aug(keys[1], xs[1], "bgco", 1.0)),
                             atol=1e-5)


# ----------------------------------------------------------------------------- resampling


def _np_resample(img_HxW, inv_2x3):
  """Reference of ADA's geometric pipeline in float64 numpy, one channel, spelt out as matrices:
  reflect padding by H - 1 / W - 1, 2x upsampling (input k feeds 2x samples 2k - 5 .. 2k + 6
  with weights 2 * sym6), bilinear sampling (zero outside) at the 2x grid extended by 5 samples
  each side, and the adjoint filter to downsample."""
  f = R.SYM6
  H, W = img_HxW.shape

  def up(n):
    U = np.zeros((2 * n, n))
    for k in range(n):
      for t in range(12):
        if 0 <= 2 * k + t - 5 < 2 * n:
          U[2 * k + t - 5, k] += 2 * f[t]
    return U

  def down(n):  # 2x input index 0 is 2x position -5
    D = np.zeros((n, 2 * n + 10))
    for m in range(n):
      D[m, 2 * m:2 * m + 12] = f
    return D

  xp = np.pad(np.asarray(img_HxW, np.float64), ((H - 1, H - 1), (W - 1, W - 1)), mode="reflect")
  u = up(3 * H - 2) @ xp @ up(3 * W - 2).T
  q_r, q_c = np.meshgrid(np.arange(-5, 2 * H + 5), np.arange(-5, 2 * W + 5), indexing="ij")
  xs = inv_2x3[0, 0] * q_c + inv_2x3[0, 1] * q_r + 2 * inv_2x3[0, 2] + 2 * (W - 1)
  ys = inv_2x3[1, 0] * q_c + inv_2x3[1, 1] * q_r + 2 * inv_2x3[1, 2] + 2 * (H - 1)
  x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
  z = np.zeros(xs.shape)
  for dy in (0, 1):
    for dx in (0, 1):
      r, c = y0 + dy, x0 + dx
      ok = (r >= 0) & (r < u.shape[0]) & (c >= 0) & (c < u.shape[1])
      w = (1 - abs(xs - c)) * (1 - abs(ys - r))
      z += np.where(ok, w * u[np.clip(r, 0, u.shape[0] - 1), np.clip(c, 0, u.shape[1] - 1)], 0)
  return down(H) @ z @ down(W).T


def test_sym6_is_pywavelets_symlet6():
  pywt = pytest.importorskip("pywt")  # in the `test` extra; a constant check, not a parity test
  dec_lo = np.asarray(pywt.Wavelet("sym6").dec_lo)
  np.testing.assert_allclose(R.SYM6, dec_lo / dec_lo.sum(), atol=1e-8)
  np.testing.assert_allclose(R.PHASE, 0.0982609, atol=1e-6)


def test_resampler_matches_numpy_reference():
  x = _x((4, 7, 9, 3))
  rng = np.random.default_rng(0)
  inv = rng.normal(size=(4, 2, 3)).astype(np.float32)
  inv[:, :, :2] += np.eye(2, dtype=np.float32)
  inv[:, :, 2] *= 6  # far outside the image too: multiple reflections and the zero region
  inv[3] = [[0, -1, 8], [1, 0, -1]]  # a quarter turn, on a non-square image
  out = np.asarray(_resample(x, jnp.asarray(inv)))
  for b in range(4):
    for c in range(3):
      np.testing.assert_allclose(out[b, :, :, c], _np_resample(np.asarray(x[b, :, :, c]), inv[b]),
                                 atol=2e-5)


def test_filter_gradients_are_the_adjoints():
  """The hand-written backward passes of the 2x filters: <f(x), g> = <x, f^T(g)>."""
  for f, shape in ((R.upsample2x, (2, 7, 9, 3)), (R.downsample2x, (2, 24, 28, 3))):
    x = _x(shape, seed=1)
    y, vjp = jax.vjp(f, x)
    g = _x(y.shape, seed=2)
    (xg,) = vjp(g)
    np.testing.assert_allclose(float(jnp.vdot(y, g)), float(jnp.vdot(x, xg)), rtol=1e-5)
    assert xg.shape == x.shape


def test_resampler_identity_and_integer_shift():
  x = _x((3, 8, 12, 4))
  eye = jnp.tile(jnp.array([[1.0, 0, 0], [0, 1, 0]]), (3, 1, 1))
  # sym6 is orthogonal: down(up(x)) = x, so the identity and whole-pixel shifts stay exact.
  np.testing.assert_allclose(np.asarray(_resample(x, eye)), np.asarray(x), atol=1e-5)
  dy, dx = 2, -3  # content moves down 2, left 3
  shift = eye.at[:, 0, 2].set(-dx).at[:, 1, 2].set(-dy)
  out = np.asarray(_resample(x, shift))
  for i in range(3):  # and the border is the reflect padding
    np.testing.assert_allclose(out[i], _np_shift_reflect(np.asarray(x[i]), dy, dx), atol=1e-5)
  # Flips are not exact (sym6 is not symmetric): a mirror about x = (W - 1 - PHASE) / 2.
  flip = eye.at[:, 0, 0].set(-1.0).at[:, 0, 2].set(11.0)
  assert float(jnp.abs(_resample(x, flip) - x[:, :, ::-1]).max()) > 0.1


def _ramps(batch, height, width):
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float32),
                           np.arange(width, dtype=np.float32), indexing="ij")
  return jnp.asarray(np.broadcast_to(np.stack([cols, rows], -1), (batch, height, width, 2)))


def _blits(batch, **kw):
  z = jnp.zeros((batch,), jnp.int32)
  fields = dict(xflip_B=z, rot90_B=z, shift_Bx2=jnp.zeros((batch, 2), jnp.int32))
  fields.update({k: jnp.asarray(v, jnp.int32) for k, v in kw.items()})
  return fields


def _geom(batch, **kw):
  z = jnp.zeros((batch,), jnp.float32)
  fields = dict(log2_scale_B=z, theta_pre_B=z, log2_aniso_B=z, theta_post_B=z,
                frac_shift_Bx2=jnp.zeros((batch, 2), jnp.float32))
  fields.update({k: jnp.asarray(v, jnp.float32) for k, v in kw.items()})
  return fields


# (fields, L, t): in centred (x, y) = (col, row) coordinates, output q shows source L @ (q - t).
_CONVENTIONS = [
    (_blits(1, xflip_B=[1]), np.diag([-1.0, 1.0]), (0, 0)),
    (_blits(1, rot90_B=[1]), np.array([[0.0, -1], [1, 0]]), (0, 0)),  # np.rot90: anticlockwise
    (_blits(1, rot90_B=[1], xflip_B=[1]), np.array([[0.0, 1], [1, 0]]), (0, 0)),  # flip first
    (_blits(1, shift_Bx2=[[2, -1]]), np.eye(2), (-1, 2)),  # content moves down 2, left 1
    (_geom(1, theta_pre_B=[math.pi / 2]), np.array([[0.0, 1], [-1, 0]]), (0, 0)),  # +x to +y
    (_geom(1, theta_post_B=[math.pi / 2]), np.array([[0.0, 1], [-1, 0]]), (0, 0)),
    (_geom(1, log2_scale_B=[1.0]), np.eye(2) / 2, (0, 0)),  # 2x zoom
    (_geom(1, log2_aniso_B=[1.0]), np.diag([0.5, 2.0]), (0, 0)),  # columns stretched by 2
    (_geom(1, frac_shift_Bx2=[[0.5, -1.25]]), np.eye(2), (-1.25, 0.5)),
    # b before g: the integer shift is zoomed with the content.
    ({**_blits(1, shift_Bx2=[[1, 0]]), **_geom(1, log2_scale_B=[1.0])}, np.eye(2) / 2, (0, 2)),
]


@pytest.mark.parametrize("fields,inv_2x2,shift_xy", _CONVENTIONS)
def test_geometric_conventions_on_ramps(fields, inv_2x2, shift_xy):
  """sym6 reproduces linear ramps, so a ramp's output reads off the map that was applied: each
  non-trivial map acts about the centre moved by PHASE / 2 (the official pipeline's too)."""
  H, W = 28, 32  # non-square: quarter turns keep the canvas
  out = np.asarray(_apply(A.AugParams(**fields), _ramps(1, H, W)))[0]
  centre = np.array([(W - 1) / 2, (H - 1) / 2]) - R.PHASE / 2
  rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  q = np.stack([cols, rows], -1) - centre
  source = q @ inv_2x2.T - np.asarray(shift_xy, np.float64) @ inv_2x2.T + centre
  # Where the filters reach no border (6 pixels, more where the map minifies), the output is
  # the source position itself.
  margin = 6 * max(1.0, np.abs(inv_2x2).sum(1).max())
  inside = np.all((source >= margin) & (source <= np.array([W, H]) - 1 - margin), -1)
  assert inside.sum() >= 20
  np.testing.assert_allclose(out[inside], source[inside], atol=2e-4)


def test_colour_formulas():
  x = _x((3, 8, 8, 4))
  ident = dict(brightness_B=jnp.zeros(3), contrast_B=jnp.ones(3), saturation_B=jnp.ones(3))
  run = lambda **kw: np.asarray(_apply(A.AugParams(**{**ident, **kw}), x))
  xn = np.asarray(x)
  np.testing.assert_array_equal(run(), xn)
  np.testing.assert_allclose(run(brightness_B=jnp.array([0.3, -0.2, 0.0])),
                             xn + np.array([0.3, -0.2, 0.0])[:, None, None, None], atol=1e-6)
  c = np.array([0.5, 1.5, 1.0])[:, None, None, None]
  m = xn.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(run(contrast_B=jnp.array(c[:, 0, 0, 0])), (xn - m) * c + m,
                             atol=1e-5)
  s = np.array([0.0, 2.0, 0.7])[:, None, None, None]
  m = xn.mean(axis=3, keepdims=True)
  out = run(saturation_B=jnp.array(s[:, 0, 0, 0]))
  np.testing.assert_allclose(out, (xn - m) * s + m, atol=1e-5)
  np.testing.assert_allclose(out.mean(axis=3), xn.mean(axis=3), atol=1e-5)  # per-pixel mean kept


def test_cutout_region():
  x = jnp.ones((2, 8, 8, 4))
  params = A.AugParams(cutout_size_B=jnp.array([0.5, 0.5]),
                       cutout_center_Bx2=jnp.array([[0.5, 0.5], [0.0, 1.0]]))
  out = np.asarray(_apply(params, x))
  ref = np.ones((2, 8, 8, 4), np.float32)
  ref[0, 2:6, 2:6] = 0  # a 4x4 square, half the size, centred
  ref[1, 0:2, 6:8] = 0  # a corner centre: the quarter inside the image
  np.testing.assert_array_equal(out, ref)


# ----------------------------------------------------------------------------- statistics


def test_parameter_statistics():
  n, H, W = 20000, 64, 32
  P = _sample(jax.random.key(0), n, H, W, "bgco", p=1.0)
  P = jax.tree.map(np.asarray, P)
  assert abs(P.log2_scale_B.std() - 0.2) < 0.01 and abs(P.log2_scale_B.mean()) < 0.01
  assert abs(P.log2_aniso_B.std() - 0.2) < 0.01 and abs(P.log2_aniso_B.mean()) < 0.01
  np.testing.assert_allclose(P.frac_shift_Bx2.std(axis=0), [H / 8, W / 8], rtol=0.05)
  for theta in (P.theta_pre_B, P.theta_post_B):  # uniform over the full circle
    assert np.abs(theta).max() <= math.pi and abs(theta.std() - math.pi / 3 ** 0.5) < 0.05
  assert np.abs(P.shift_Bx2[:, 0]).max() == H // 8 and np.abs(P.shift_Bx2[:, 1]).max() == W // 8
  np.testing.assert_allclose(np.bincount(P.rot90_B, minlength=4) / n, [0.25] * 4, atol=0.02)
  assert abs(P.xflip_B.mean() - 0.5) < 0.02
  assert P.brightness_B.min() >= -0.5 and P.brightness_B.max() < 0.5
  assert abs(P.brightness_B.std() - 1 / 12 ** 0.5) < 0.01
  assert P.contrast_B.min() >= 0.5 and P.contrast_B.max() < 1.5
  assert P.saturation_B.min() >= 0.0 and P.saturation_B.max() < 2.0
  assert np.all(P.cutout_size_B == 0.5)
  # With p = 0.5 each transform fires half the time; some rotation (pre or post) too.
  Q = jax.tree.map(np.asarray, _sample(jax.random.key(1), n, H, W, "bgco", p=0.5))
  for fired in (Q.log2_scale_B != 0, Q.log2_aniso_B != 0, np.any(Q.frac_shift_Bx2 != 0, 1),
                (Q.theta_pre_B != 0) | (Q.theta_post_B != 0), Q.contrast_B != 1,
                Q.cutout_size_B != 0, Q.brightness_B != 0):
    assert abs(fired.mean() - 0.5) < 0.02, fired.mean()
  assert abs((Q.rot90_B != 0).mean() - 0.5 * 0.75) < 0.02


# ----------------------------------------------------------------------------- official package


def test_groups_and_defaults_match_official_package():
  from elatentlpips.ada_aug import AdaAugment
  from elatentlpips.elatentlpips import ada_augpipe
  for policy, transforms in ada_augpipe.items():
    ours = {t for letter in A.check_policy(policy) for t in A.GROUPS[letter]}
    assert ours == {k for k, v in transforms.items() if v}, policy
  official = AdaAugment()
  assert float(official.p) == A.DEFAULT_P
  for ours, theirs in [(A.XINT_MAX, "xint_max"), (A.SCALE_STD, "scale_std"),
                       (A.ROTATE_MAX, "rotate_max"), (A.ANISO_STD, "aniso_std"),
                       (A.XFRAC_STD, "xfrac_std"), (A.CUTOUT_SIZE, "cutout_size")]:
    assert ours == getattr(official, theirs), theirs


def test_colour_and_cutout_distributions_match_official_package():
  """Black-box: the same per-sample distributions as the official colour/cutout ops."""
  import torch
  from elatentlpips.ada_aug import AdaAugment
  torch.manual_seed(0)
  n = 4000
  base = np.asarray(_x((1, 8, 8, 4)))[0]
  x = np.broadcast_to(base, (n, 8, 8, 4)).copy()
  m_all = base.mean()
  m_px = base.mean(axis=2, keepdims=True)

  def official(**kw):
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    return AdaAugment(**kw)(t, t)[0].numpy().transpose(0, 2, 3, 1)

  def ours(field):
    P = _sample(jax.random.key(0), n, 8, 8, "co", p=1.0)
    keep = dict(brightness_B=jnp.zeros(n), contrast_B=jnp.ones(n), saturation_B=jnp.ones(n),
                cutout_size_B=jnp.zeros(n), cutout_center_Bx2=P.cutout_center_Bx2)
    keep[field] = getattr(P, field)
    return np.asarray(_apply(A.AugParams(**keep), jnp.asarray(x)))

  stats = {  # per-sample statistic that recovers the drawn parameter
      "brightness_B": (dict(brightness=1), lambda y: y.mean((1, 2, 3)) - m_all),
      "contrast_B": (dict(contrast=1), lambda y: (y[:, 0, 0, 0] - y.mean((1, 2, 3)))
                     / (base[0, 0, 0] - m_all)),
      "saturation_B": (dict(saturation=1), lambda y: (y[:, 0, 0, 0] - y[:, 0, 0].mean(-1))
                       / (base[0, 0, 0] - m_px[0, 0, 0])),
      "cutout_size_B": (dict(cutout=1), lambda y: (y[..., 0] == 0).mean((1, 2))),
  }
  qs = np.linspace(0.05, 0.95, 19)
  for field, (kw, stat) in stats.items():
    np.testing.assert_allclose(np.quantile(stat(ours(field)), qs),
                               np.quantile(stat(official(**kw)), qs), atol=0.05, err_msg=field)
