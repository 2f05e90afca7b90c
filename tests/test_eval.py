"""The eval stage end to end on tiny random models and 8 fake devices: a teacher row (3-step DDIM,
CFG 3) and a one-step student row from an exported pipeline, samples checked against diffusers,
metrics against the stored per-sample features, resume after a lost shard, changed config."""

import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from test_inception import random_fid_state_dict
from torch_utils import assert_close_to_scale, nchw, nhwc

from d2g_jax import config_defaults, run, tiny
from d2g_jax.convert import load_unet
from d2g_jax.convert.pipeline import export_pipeline
from d2g_jax.data import pairs, shards
from d2g_jax.data.source import PairSource
from d2g_jax.evaluate import clip_score, fidelity
from d2g_jax.evaluate import fid as fid_lib

PROMPTS = ["a photo of the cat", "the cat", "a cat of the cat", "cats", "the photo", "of of"]
SEED, STEPS, GUIDANCE, N, K, S = 3, 3, 3.0, 6, 2, 3  # 6 + 2 x 3 = 12 samples: shards of 8 and 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  tiny.build("sd1", str(root / "teacher"))
  unet, params = load_unet(str(root / "teacher" / "unet"))
  student = jax.tree.map(lambda p: p * 1.01, params)  # a student that differs from the teacher
  export_pipeline(str(root / "teacher"), unet, student, str(root / "student"), timestep=999)
  tiny.build_clip_model(str(root / "clip"), image_size=32)
  torch.save(random_fid_state_dict(seed=1), str(root / "inception.pth"))
  rng = np.random.default_rng(0)
  os.makedirs(root / "real")
  for i in range(5):
    image = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    Image.fromarray(image).save(root / "real" / f"{i}.png")
  (root / "captions.txt").write_text("\n".join(PROMPTS) + "\n")
  return root


def make_config(root):
  c = config_defaults.base()
  c.workdir, c.seed, c.stages = str(root / "work"), SEED, "eval"
  c.teacher.path = str(root / "teacher")
  e = c.eval
  e.teacher.num_steps, e.teacher.guidance_scale = STEPS, GUIDANCE
  e.student.path = str(root / "student")
  e.prompts, e.num_samples = str(root / "captions.txt"), N
  e.diversity_prompts, e.diversity_seeds = K, S
  e.batch_size, e.shard_size, e.grid_size = 8, 8, 4
  e.fid.inception_weights, e.fid.ref = str(root / "inception.pth"), str(root / "real")
  e.clip.path = str(root / "clip")
  e.allow_random_lpips = True  # fidelity and diversity with a random LatentLPIPS: no weights here
  return c


@pytest.fixture(scope="module")
def fast_fid():
  """For speed on 2 CPU cores: the Inception sees 75 x 75 inputs (its smallest) instead of
  299 x 299, and Frechet distances are recorded, not computed (a 2048-d sqrtm takes ~45 s
  here). The 299 path and the distance are tested against pytorch-fid / clean-fid in
  test_inception.py and test_fid.py."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(fid_lib, "FID_SIZE", 75)
    calls = []
    m.setattr(fid_lib, "frechet_distance", lambda *a: calls.append(a) or float(len(calls)))
    yield calls


@pytest.fixture(scope="module")
def report(root, fast_fid):
  return run.run(make_config(root))["eval"], list(fast_fid)


def records(root, row):
  src = PairSource(str(root / "work" / "eval" / "samples" / row), verify="sha256")
  return [src[i] for i in range(len(src))]


def diffusers_latents(folder, steps, guidance, prompts, seed, shape):
  # The scheduler goes to from_pretrained so that the pipeline's __init__ applies its config
  # fixes (clip_sample=False), as in test_trajectory.
  config = diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler")
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      folder, scheduler=diffusers.DDIMScheduler.from_config(config), safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  z = np.stack([np.asarray(pairs.pair_noise(seed, i, shape)) for i in range(len(prompts))])
  with torch.no_grad():
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
               latents=torch.from_numpy(nchw(z))).images
  return nhwc(out)


def test_samples_match_diffusers(root, report):
  """Both rows' latents equal diffusers' pipelines from the same folders and initial noise."""
  teacher, student = records(root, "teacher"), records(root, "student")
  assert len(teacher) == len(student) == N + K * S
  assert [r["prompt"] for r in teacher] == PROMPTS + [p for p in PROMPTS[:K] for _ in range(S)]
  assert set(teacher[0]) == {"index", "seed", "prompt", "x", "inception", "clip_cosine",
                             "input_ids", "attention_mask", "clip_input_ids"}  # no z stored
  shape = teacher[0]["x"].shape
  want = diffusers_latents(str(root / "teacher"), STEPS, GUIDANCE, PROMPTS[:3], SEED, shape)
  assert_close_to_scale(np.stack([r["x"] for r in teacher[:3]]), want)
  want = diffusers_latents(str(root / "student"), 1, 1.0, PROMPTS[:3], SEED, shape)
  assert_close_to_scale(np.stack([r["x"] for r in student[:3]]), want)


def test_metrics_from_stored_features(root, report):
  out, calls = report
  assert out["order"] == ["teacher", "student"]
  teacher, student = records(root, "teacher"), records(root, "student")
  # FID: the statistics of the first N samples' features against the cached reference.
  ref = out["fid_reference"]
  assert ref["num_images"] == 5 and os.path.isfile(ref["cache"])
  mu_ref, sigma_ref = fid_lib.load_stats(ref["cache"])
  for (mu, sigma, mu2, sigma2), rows in zip(calls, (teacher, student)):
    want_mu, want_sigma = fid_lib.statistics(np.stack([r["inception"] for r in rows[:N]]))
    np.testing.assert_array_equal(mu, want_mu)
    np.testing.assert_array_equal(sigma, want_sigma)
    np.testing.assert_array_equal(mu2, mu_ref)
    np.testing.assert_array_equal(sigma2, sigma_ref)
  assert [out["rows"][r]["fid"] for r in ("teacher", "student")] == [1.0, 2.0]
  for name, rows in (("teacher", teacher), ("student", student)):
    m = out["rows"][name]
    assert m["clip_score"] == pytest.approx(clip_score.clip_score(
        np.stack([r["clip_cosine"] for r in rows[:N]])))
    assert m["steps"] == (STEPS if name == "teacher" else 1)
  # Fidelity: the student's LatentLPIPS to the teacher's sample of the same z and prompt;
  # diversity: mean over the S(S-1)/2 pairs of each diversity prompt.
  assert "lpips_to_teacher" not in out["rows"]["teacher"]
  assert out["rows"]["student"]["lpips_to_teacher"] > 0
  assert all(out["rows"][r]["diversity_lpips"] > 0 for r in ("teacher", "student"))
  i, j = fidelity.pairs_within_groups(K, S)
  assert list(zip(i, j)) == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]
  assert out["lpips"]["weights"].startswith("random")
  with open(root / "work" / "eval" / "metrics.json") as fh:
    assert json.load(fh)["rows"] == out["rows"]
  grid = np.asarray(Image.open(root / "work" / "eval" / "grid.png"))
  assert grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(root / "work" / "eval" / "tb"))


def test_resume_and_changed_config(root, report, fast_fid):
  """A lost shard (as after a kill) is regenerated bit for bit; finished rows are not
  recomputed; another sampler config into the same folder is refused."""
  out_dir = root / "work" / "eval" / "samples" / "student"
  manifest = shards.read_manifest(str(out_dir))
  for name in (manifest["shards"][1]["name"], shards.sidecar_name(1, 2)):
    os.remove(out_dir / name)
  (out_dir / ".pairs-00001-of-00002.array_record.tmp").write_bytes(b"half a shard")
  again = run.run(make_config(root))["eval"]
  assert shards.read_manifest(str(out_dir))["shards"] == manifest["shards"]  # same sha256
  assert not (out_dir / ".pairs-00001-of-00002.array_record.tmp").exists()
  assert again["rows"]["student"]["clip_score"] == report[0]["rows"]["student"]["clip_score"]
  changed = make_config(root)
  changed.eval.teacher.num_steps = STEPS + 1
  with pytest.raises(ValueError, match=r"(?s)different config.*num_steps"):
    run.run(changed)
