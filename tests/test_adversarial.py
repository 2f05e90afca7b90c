"""The adversarial loss pieces: NS-GAN terms, single-sample lazy R1 against a closed form,
mix-and-match rows and labels, input diffusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2g_jax.losses import adversarial as adv
from d2g_jax.sampling.schedule import ScheduleConfig


def test_ns_gan_terms():
  real = [jnp.asarray([[[1.0, 2.0]], [[0.0, -1.0]]]), jnp.asarray([[[3.0]], [[-2.0]]])]
  fake = [jnp.asarray([[[-1.0, 0.5]], [[2.0, 0.0]]]), jnp.asarray([[[0.0]], [[1.0]]])]
  sp = lambda v: np.log1p(np.exp(v))
  want_real = np.mean([np.mean(sp(-np.asarray(real[0]))), np.mean(sp(-np.asarray(real[1])))])
  want_fake = np.mean([np.mean(sp(np.asarray(fake[0]))), np.mean(sp(np.asarray(fake[1])))])
  got_real, got_fake = adv.d_loss(real, fake)
  np.testing.assert_allclose([got_real, got_fake], [want_real, want_fake], rtol=1e-6)
  want_g = np.mean([np.mean(sp(-np.asarray(f))) for f in fake])
  np.testing.assert_allclose(adv.g_loss(fake), want_g, rtol=1e-6)
  # Per-sample score: mean over readouts of each map's mean.
  np.testing.assert_allclose(adv.per_sample_score(real), [(1.5 + 3.0) / 2, (-0.5 - 2.0) / 2])


def test_r1_matches_closed_form():
  # A "discriminator" with readouts w_r * x summed over channels (maps of the input's size)
  # and a quadratic one: score(x) = mean_r mean_hw D_r, so its input gradient is known.
  key = jax.random.key(0)
  x = jax.random.normal(key, (3, 4, 5, 2))
  w1 = jax.random.normal(jax.random.key(1), (4, 5, 2))
  a = 0.7

  def readouts(xs):
    return [jnp.sum(xs * w1, axis=-1), a * jnp.sum(xs ** 2, axis=-1)]

  score = lambda xs: adv.per_sample_score(readouts(xs))
  hw = 4 * 5
  grad = (w1[None] + 2 * a * x) / hw / 2  # d/dx of mean_r mean_hw
  want = np.mean(np.sum(np.asarray(grad) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(adv.r1_penalty(score, x), want, rtol=1e-5)
  # Single sample: only that sample's gradient.
  want1 = np.sum(np.asarray(grad[:1]) ** 2)
  np.testing.assert_allclose(adv.r1_penalty(score, x[:1]), want1, rtol=1e-5)
  assert adv.r1_weight(gamma=0.5, interval=16) == 4.0


@pytest.mark.parametrize("b,fraction", [(8, 0.25), (8, 0.5), (7, 1.0), (5, 0.0), (1, 0.5)])
def test_mix_and_match_rows_and_labels(b, fraction):
  real = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, 2, 2, 1))
  fake = -1.0 - real
  for seed in range(5):
    out, info = adv.mix_and_match(jax.random.key(seed), real, fake, fraction)
    mixed, from_real, source = (np.asarray(info[k]) for k in ("mixed", "from_real", "source"))
    m = adv.num_mixed(b, fraction)
    assert mixed.sum() == m and from_real.sum() == m // 2
    assert not (from_real & ~mixed).any()
    for i in range(b):
      row = np.asarray(out[i])
      if not mixed[i]:
        np.testing.assert_array_equal(row, np.asarray(fake[i]))
        assert source[i] == i
      else:
        assert source[i] != i  # an unrelated latent, never the row's own
        donor = real if from_real[i] else fake
        np.testing.assert_array_equal(row, np.asarray(donor[source[i]]))
  with pytest.raises(ValueError, match="fraction"):
    adv.num_mixed(4, 1.5)


def test_diffuse_same_noise_and_range():
  schedule = ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  x1 = jnp.zeros((64, 2, 2, 1))
  x2 = jnp.ones((64, 2, 2, 1))
  (a, b), t = adv.diffuse(jax.random.key(0), schedule, 100, 200, x1, x2)
  t = np.asarray(t)
  assert t.min() >= 100 and t.max() <= 200 and len(set(t.tolist())) > 10
  ab = schedule.alphas_cumprod[t][:, None, None, None]
  # x1 = 0 gives sqrt(1-a) eps; x2 = 1 adds sqrt(a): the same eps in both.
  np.testing.assert_allclose(np.asarray(b) - np.asarray(a), np.broadcast_to(np.sqrt(ab), a.shape),
                             rtol=1e-5, atol=1e-6)
