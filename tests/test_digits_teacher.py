"""The digits demo's teacher: data, judge, tokenizer, the resumable loop, and the two stages
end to end at toy size (a few steps each) with the pipeline folder loaded by diffusers and by
`load_teacher`, their DDIM + CFG latents and decoded images compared.
"""

import json
import os

import jax
import numpy as np
import pytest
from torch_utils import assert_close_to_scale, nchw, nhwc

from d2g_jax import config_defaults, run
from d2g_jax.demo import check, classifier, digits, fit, folders, text

GUIDANCE, STEPS = 3.0, 3


def tiny_config(workdir: str):
  c = config_defaults.base()
  c.workdir = workdir
  c.stages = "digits_vae,digits_teacher"
  d = c.digits
  d.image_size, d.warmup_steps, d.checkpoint_every = 16, 1, 2
  d.vae.block_out_channels, d.vae.norm_num_groups = (4, 8), 2
  d.vae.steps, d.vae.batch_size = 3, 4
  d.text.hidden_size, d.text.num_layers, d.text.num_heads = 8, 1, 2
  d.unet.block_out_channels, d.unet.norm_num_groups = (8, 16), 4
  d.unet.steps, d.unet.batch_size = 3, 4
  d.check_per_digit = 0  # the test runs the check itself, beside diffusers
  d.check_steps, d.check_guidance = STEPS, GUIDANCE
  return c


def test_digits_split_and_prompts():
  train, held = digits.load(16, 50, seed=0)
  assert train.images_NxHxWx3.shape == (1747, 16, 16, 3) and held.labels_N.shape == (50,)
  assert np.bincount(held.labels_N).tolist() == [5] * 10  # stratified
  assert -1.0 <= train.images_NxHxWx3.min() and train.images_NxHxWx3.max() <= 1.0
  # The held-out images are not among the training images.
  flat = lambda s: {x.tobytes() for x in s.images_NxHxWx3[..., 0]}
  assert not flat(train) & flat(held)
  assert digits.prompts("a handwritten digit {}")[7] == "a handwritten digit 7"
  with pytest.raises(ValueError, match="must contain"):
    digits.prompt(3, "a digit")


def test_classifier_on_held_out_digits():
  clf, acc = classifier.fit_on_digits(32, 300, 0)
  assert acc >= 0.95, acc  # measured 0.98
  _, held = digits.load(32, 300, 0)
  noise = np.random.default_rng(0).uniform(-1, 1, held.images_NxHxWx3.shape)
  assert classifier.accuracy(clf, noise, held.labels_N) < 0.3  # not fooled by noise
  with pytest.raises(ValueError, match="multiple of 8"):
    classifier.features(np.zeros((1, 12, 12, 3)))


def test_tokenizer_makes_each_word_one_token():
  tok = text.make_tokenizer(text.template_words("a handwritten digit {}"), 8)
  ids = tok("a handwritten digit 7")["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "handwritten</w>",
                                            "digit</w>", "7</w>", "<|endoftext|>"]
  assert tok.convert_tokens_to_ids("<|endoftext|>") == len(tok) - 1  # EOS has the highest id
  assert len(tok("a handwritten digit seven")["input_ids"]) > 6  # other words: characters


def test_fit_resumes_exactly(tmp_path, monkeypatch):
  """Killed after its first checkpoint and started again, fit ends where an uninterrupted
  run ends; a different spec refuses the saved state."""
  target = np.arange(6, dtype=np.float32)
  loss = lambda p, data, key: jax.numpy.mean((p["w"] + 0.1 * jax.random.normal(key, (6,))
                                              - data) ** 2)
  spec = fit.Spec(steps=6, lr=0.1, warmup_steps=1, ema_decay=0.5, checkpoint_every=2)
  p0 = {"w": np.zeros(6, np.float32)}
  key = jax.random.key(0)
  whole = fit.fit(loss, p0, target, spec, key, str(tmp_path / "a.msgpack"), "a")

  save = fit._save
  calls = []

  def save_then_die(*args):
    save(*args)
    calls.append(1)
    raise KeyboardInterrupt
  monkeypatch.setattr(fit, "_save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    fit.fit(loss, p0, target, spec, key, str(tmp_path / "b.msgpack"), "b")
  monkeypatch.setattr(fit, "_save", save)
  assert json.load(open(tmp_path / "b.msgpack.json"))["step"] == 2
  resumed = fit.fit(loss, p0, target, spec, key, str(tmp_path / "b.msgpack"), "b")
  np.testing.assert_array_equal(resumed["w"], whole["w"])
  assert not np.allclose(whole["w"], 0)
  with pytest.raises(ValueError, match=r"differing: \['lr'\]"):
    fit.fit(loss, p0, target, fit.Spec(steps=6, lr=0.2, warmup_steps=1, ema_decay=0.5,
                                       checkpoint_every=2), key, str(tmp_path / "b.msgpack"), "b")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_stages_write_a_pipeline_that_diffusers_and_load_teacher_sample_alike(tmp_path, capsys):
  import diffusers
  import torch

  config = tiny_config(str(tmp_path))
  run.run(config)
  out = capsys.readouterr().out
  teacher_dir = str(tmp_path / "teacher")
  assert "[digits_vae] trained the digits VAE (3 steps" in out
  assert f"wrote a StableDiffusionPipeline to {teacher_dir}" in out
  marker = json.load(open(os.path.join(teacher_dir, folders.MARKER)))
  assert marker["stage"] == "digits_teacher" and marker["settings"]["unet"]["steps"] == 3

  # Run again: both stages keep their folders.
  run.run(config)
  assert capsys.readouterr().out.count("already exists; keeping it") == 2

  # The pipeline through diffusers' own loader and sampler (DDIM, from the folder) ...
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher_dir)
  pipe.set_progress_bar_config(disable=True)
  assert type(pipe.scheduler).__name__ == "DDIMScheduler"
  z = check.noise(config.seed, 10, (8, 8, 4))
  with torch.no_grad():
    kw = dict(prompt=digits.prompts(config.digits.prompt), latents=torch.from_numpy(nchw(z)),
              num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    ref_latents = nhwc(pipe(**kw, output_type="latent").images)
    ref_images = pipe(**kw, output_type="np").images  # NHWC in [0, 1]
  assert ref_images.shape == (10, 16, 16, 3)
  # ... and through load_teacher, the pair stage's sampler and our VAE decoder: the check.
  r = check.teacher_accuracy(run.resolve(config), per_digit=1)
  np.testing.assert_array_equal(r.labels_N, np.arange(10))
  assert not np.allclose(r.latents_NxhxwxL, z, atol=0.1)  # the trajectory moved
  assert_close_to_scale(r.latents_NxhxwxL, ref_latents, 1e-4)
  assert_close_to_scale(np.clip(r.images_NxHxWx3 / 2 + 0.5, 0, 1), ref_images, 1e-4)
  # The judge's verdict on these images is what the check reports.
  clf, _ = classifier.fit_on_digits(16, config.digits.held_out, config.digits.split_seed)
  assert r.accuracy == classifier.accuracy(clf, ref_images * 2 - 1, np.arange(10))


def test_stages_refuse_a_stale_or_foreign_folder(tmp_path):
  config = tiny_config(str(tmp_path))
  config.stages = "digits_teacher"
  # A folder at teacher.path that these stages did not write (e.g. tiny_teacher's).
  os.makedirs(tmp_path / "teacher")
  (tmp_path / "teacher" / "model_index.json").write_text("{}")
  with pytest.raises(FileExistsError, match="not written by the digits_teacher stage"):
    run.run(config)
  # A finished VAE made with other settings.
  settings = {"vae": "other"}
  folders.build(str(tmp_path / "digits" / "vae"), lambda tmp: None, "digits_vae", settings, {})
  config.stages = "digits_vae"
  with pytest.raises(ValueError, match="differing: .*'vae'"):
    run.run(config)
  # The teacher stage without a VAE says which stage to run first.
  config = tiny_config(str(tmp_path / "other"))
  config.stages = "digits_teacher"
  with pytest.raises(FileNotFoundError, match="run the digits_vae stage first"):
    run.run(config)
