"""Sampling a student: the API, the command line (its student images equal diffusers' one-step
pipeline on the exported folder, from the same noise) and the web page in a real headless
browser; tiny random models on 8 fake devices, each sampler compiled once per module."""

import io
import json
import os
import socket

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from torch_utils import assert_close_to_scale, nchw, nhwc

from d2g_jax import tiny
from d2g_jax.convert import load_unet
from d2g_jax.convert.pipeline import export_pipeline
from d2g_jax.data.pairs import pair_noise
from d2g_jax.sample import api
from d2g_jax.sample.__main__ import main as sample_main

PROMPTS = ["a photo of the cat", "the cat"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A tiny SD 1 teacher and its exported "student" (the teacher's UNet weights x 1.01)."""
  root = tmp_path_factory.mktemp("sample")
  tiny.build("sd1", str(root / "teacher"))
  unet, params = load_unet(str(root / "teacher" / "unet"))
  export_pipeline(str(root / "teacher"), unet, jax.tree.map(lambda p: p * 1.01, params),
                  str(root / "student"), timestep=999)
  return root


@pytest.fixture(scope="module")
def student(root):
  return api.load_student(str(root / "student"))


def diffusers_one_step(folder, prompts, z_BxhxwxC, output_type):
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  pipe.set_progress_bar_config(disable=True)
  side = z_BxhxwxC.shape[1] * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
  with torch.no_grad():
    return pipe(prompts, num_inference_steps=1, guidance_scale=1.0, height=side, width=side,
                latents=torch.from_numpy(nchw(z_BxhxwxC)), output_type=output_type).images


def test_cli_equals_diffusers_one_step_pipeline(root, tmp_path):
  out = tmp_path / "out"
  assert sample_main(["--model", str(root / "student"), "--prompt", PROMPTS[0], "--prompt",
                      PROMPTS[1], "--num", "2", "--seed", "5", "--out", str(out), "--latents",
                      "--teacher", str(root / "teacher"), "--teacher_steps", "2",
                      "--guidance", "3"]) == 0
  lines = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
  assert [(d["sampler"], d["prompt"], d["seed"]) for d in lines] == [
      (s, p, seed) for s in ("student", "teacher") for p in PROMPTS for seed in (5, 6)]
  assert lines[0]["model"] == str(root / "student") and lines[-1]["num_steps"] == 2
  speed = json.loads((out / "speed.json").read_text())
  assert speed["student"]["images"] == 4 and speed["student_speedup"] > 0
  assert Image.open(out / "grid.png").format == "PNG"

  # The student's latents and 8-bit images are diffusers' one-step pipeline's, same noise.
  prompts = [d["prompt"] for d in lines[:4]]
  z = np.stack([np.asarray(pair_noise(d["seed"], 0, (16, 16, 4))) for d in lines[:4]])
  ours = np.load(out / "student" / "latents.npy")
  ref = diffusers_one_step(str(root / "student"), prompts, z, "latent")
  assert_close_to_scale(ours, nhwc(ref), 1e-3)
  ref_images = diffusers_one_step(str(root / "student"), prompts, z, "pil")
  for d, ref_image in zip(lines[:4], ref_images):
    image = np.asarray(Image.open(out / d["file"]))
    assert image.shape == (32, 32, 3)
    assert np.abs(image.astype(int) - np.asarray(ref_image).astype(int)).max() <= 1

  # A user's mistakes: one error line, status 2.
  assert sample_main(["--model", str(root / "teacher"), "--prompt", "x", "--out",
                      str(tmp_path / "e")]) == 2  # a teacher is not a one-step folder
  assert sample_main(["--model", str(tmp_path / "nothing"), "--prompt", "x", "--out",
                      str(tmp_path / "e")]) == 2


def test_seeds_noise_batches_and_one_compile(student):
  both = student(PROMPTS, seeds=[7, 8])
  alone = student(PROMPTS[1], seeds=[8])
  np.testing.assert_array_equal(alone.images[0], both.images[1])
  assert alone.compile_seconds == 0 and len(student._compiled) == 1  # 8 devices: one shape
  given = student(PROMPTS, noise=student.noise([7, 8]))
  np.testing.assert_array_equal(given.latents, both.latents)
  assert both.images.dtype == np.uint8 and both.images.shape == (2, 32, 32, 3)
  assert both.latents.dtype == np.float32 and both.latents.shape == (2, 16, 16, 4)
  many = student(PROMPTS[0], seeds=list(range(10)))  # two calls of 8 rows
  np.testing.assert_array_equal(many.images[7], student(PROMPTS[0], seeds=[7]).images[0])
  with pytest.raises(ValueError, match="either seeds"):
    student(PROMPTS, seeds=[1, 2], noise=student.noise([1, 2]))
  with pytest.raises(ValueError, match="3 prompts for 2 images"):
    student(PROMPTS + ["x"], seeds=[1, 2])
  with pytest.raises(ValueError, match="takes Bx16x16x4"):
    student(PROMPTS, noise=np.zeros((2, 8, 8, 4)))


def test_web_page_in_headless_chromium(root, student, tmp_path, monkeypatch):
  """Type a prompt, press Generate: both samplers' images appear and decode as PNGs, each
  sampler's time is shown, and neither the page nor the server asks anything of the network."""
  import browser

  from d2g_jax import app
  monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
  connections, connect = [], socket.socket.connect
  monkeypatch.setattr(socket.socket, "connect",
                      lambda sock, address: connections.append(address) or connect(sock, address))
  teacher = api.load_teacher_sampler(str(root / "teacher"), num_steps=2, guidance_scale=3.0)
  page = app.build(student, teacher, count=2, display=64)
  port = browser.free_port()
  app.launch(page, port=port, block=False)
  try:
    with browser.page() as tab:
      tab.goto(f"http://127.0.0.1:{port}")
      tab.locator("#prompt textarea").fill(PROMPTS[0])
      tab.locator("#generate").click()
      for name in ("student", "teacher"):
        images = tab.locator(f"#{name}_images img")
        images.nth(1).wait_for(timeout=60_000)
        assert images.count() == 2
        for i in range(2):
          data = tab.request.get(images.nth(i).get_attribute("src")).body()
          image = Image.open(io.BytesIO(data))
          assert image.format == "PNG" and image.size == (64, 64)
        assert "image(s) in" in tab.locator(f"#{name}_time").inner_text()
      assert tab.outside == []
  finally:
    page.close()
  assert os.listdir(tmp_path / "gradio")
  inet = [a for a in connections if isinstance(a, tuple)]  # (host, port): not unix sockets
  assert inet and all(a[0] in ("127.0.0.1", "::1") for a in inet), inet


def test_labelled_grid_margins():
  """Headers over equal spans, row labels in a left margin, nothing cut off at the edges."""
  from d2g_jax import grid
  image = np.zeros((40, 60, 3), np.uint8)
  out = grid.labelled(image, ["a", "a much longer header than its span"], ["row one", "two"])
  h, w = out.shape[:2]
  assert h > 40 and w > 60 + 30  # a header line; a left margin and room for the long header
  body = out[h - 40:, :]
  left = next(x for x in range(w) if (body[:, x] == 0).all())  # the image's first column
  assert (out[:h - 40] < 100).any() and (out[:, :left] < 100).any()  # dark text in both margins
  assert (out[:h - 40, -2:] == 255).all()  # the long header ends inside the picture
  np.testing.assert_array_equal(out[h - 40:, left:left + 60], image)
