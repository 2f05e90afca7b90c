"""The pairs stage with a real (tiny) teacher, end to end on 8 fake devices: records against
direct calls of the sampler and of encode_prompt, the manifest, resume, config changes."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_trajectory
from torch_utils import assert_close_to_scale

from d2g_jax import config_defaults, run, sampling
from d2g_jax.data import pairs, shards, source, teacher_pairs
from d2g_jax.teacher import load_teacher
from d2g_jax.tiny import build

PROMPTS = ["a photo of the cat", "the cat", "a cat of the cat", "cats", "the photo",
           "a photo of a photo of the cat", "the the the", "", "cat cat cat", "of of",
           "a photo", "the cat of the photo", "a last prompt"]
NUM, STEPS, GUIDANCE, SEED = 12, 4, 3.0, 5  # 12 pairs: shards of 8 and 4, global batch 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("teacher_pairs")
  with open(root / "prompts.txt", "w") as fh:
    fh.write("\n".join(p or "   " for p in PROMPTS) + "\n")  # a blank line is skipped
  return root


def make_config(root, family, **pairs_overrides):
  config = config_defaults.base()
  config.workdir = str(root / f"work_{family}")
  config.seed = SEED
  config.teacher.path = str(root / family)
  config.pairs.prompts = str(root / "prompts.txt")
  config.pairs.num_pairs = NUM
  config.pairs.num_steps = STEPS
  config.pairs.guidance_scale = GUIDANCE
  config.pairs.batch_size = 8
  config.pairs.shard_size = 8
  for k, v in pairs_overrides.items():
    config.pairs[k] = v
  return run.resolve(config)


@pytest.fixture(scope="module")
def runs(root):
  """family -> a complete run of the stage: (config, manifest, records, prompts), made once."""
  cache = {}

  def get(family):
    if family not in cache:
      build(family, str(root / family))
      if family == "sdxl":  # SDXL base's scheduler values (see test_trajectory.folders)
        test_trajectory.patch_scheduler(str(root / family), clip_sample=False,
                                        set_alpha_to_one=False, timestep_spacing="leading")
      config = make_config(root, family, negative_prompt="blurry" if family == "sd1" else "")
      manifest = teacher_pairs.run_pairs(config)
      src = source.PairSource(os.path.join(config.workdir, "pairs"), verify="sha256")
      prompts = [p for p in PROMPTS if p][:NUM]
      cache[family] = config, manifest, [src[i] for i in range(len(src))], prompts
    return cache[family]

  return get


@pytest.fixture(params=["sd1", "sdxl"])
def stage(request, runs):
  return runs(request.param)


@pytest.fixture
def sd1_stage(runs):
  return runs("sd1")


def unet_apply(teacher, params, x, t_B, c):
  return teacher.unet.apply({"params": params}, x, t_B, c["encoder_hidden_states"],
                            added_cond_kwargs=c.get("added_cond_kwargs"))


def test_records_match_direct_sampling(stage):
  config, manifest, records, prompts = stage
  teacher = load_teacher(config.teacher.path, components=("unet", "text"))
  shape = teacher_pairs.latent_shape(teacher)
  assert [r["index"] for r in records] == list(range(NUM))
  assert [r["prompt"] for r in records] == prompts
  assert {r["seed"] for r in records} == {SEED}
  for r in records:  # z is the pair's own noise, bitwise
    np.testing.assert_array_equal(r["z"], pairs.pair_noise(SEED, r["index"], shape))

  # x: our sampler called directly, on the whole set at once, unsharded, conditioning
  # from Teacher.encode_prompt (not from teacher_fns).
  negative = config.pairs.negative_prompt or None
  cond, uncond = teacher.encode_prompt(prompts, negative and [negative] * NUM)
  run = sampling.make_sampler(functools.partial(unet_apply, teacher), teacher.schedule, STEPS,
                              GUIDANCE)
  want = run(teacher.unet_params, jnp.stack([r["z"] for r in records]), cond, uncond)
  got = np.stack([r["x"] for r in records])
  assert got.dtype == np.float32
  assert_close_to_scale(got, want, 1e-5)

  # Stored conditioning: token ids exactly, embeddings to float16 rounding.
  for i, enc in enumerate(teacher.text_encoders):
    suffix = "" if i == 0 else f"_{i + 1}"
    ids, mask = enc.tokenize(prompts)
    np.testing.assert_array_equal(np.stack([r["input_ids" + suffix] for r in records]), ids)
    np.testing.assert_array_equal(np.stack([r["attention_mask" + suffix] for r in records]), mask)
  stored = {"prompt_embeds": cond["encoder_hidden_states"]}
  if teacher.family == "sdxl":
    stored["pooled_prompt_embeds"] = cond["added_cond_kwargs"]["text_embeds"]
  assert {k for k in records[0] if "embeds" in k} == set(stored)
  for k, ref in stored.items():
    ours = np.stack([r[k] for r in records])
    assert ours.dtype == np.float16
    ref = np.asarray(ref)
    np.testing.assert_allclose(ours.astype(np.float32), ref, rtol=2**-10,
                               atol=1e-4 * np.abs(ref).max(), err_msg=k)


def test_manifest(stage):
  config, manifest, _, _ = stage
  path = config.teacher.path
  family = os.path.basename(path)
  teacher = load_teacher(path, components=())
  size = teacher.default_size
  assert manifest["status"] == "complete"
  assert (manifest["num_examples"], manifest["num_shards"]) == (NUM, 2)
  assert [s["num_records"] for s in manifest["shards"]] == [8, 4]
  meta = manifest["config"]["meta"]
  assert meta["teacher"] == {"path": path, "family": family, "dtype": "float32",
                             "attention": config.teacher.attention,
                             "fingerprint": teacher_pairs.teacher_fingerprint(path)}
  assert meta["guidance_scale"] == GUIDANCE and meta["num_steps"] == STEPS
  assert meta["eta"] == 0.0 and meta["sampler"] == "ddim"
  assert meta["resolution"] == list(size)
  assert meta["negative_prompt"] == config.pairs.negative_prompt
  assert meta["store_embeddings"] is True and meta["embeddings_dtype"] == "float16"
  f = teacher.info.vae.downscale
  assert manifest["config"]["latent_shape"] == [size[0] // f, size[1] // f, 4]
  record = manifest["record"]
  assert record["x"] == record["z"] == f"float32{manifest['config']['latent_shape']}"
  assert record["input_ids"] == "int32[12]"  # the tiny tokenizers pad to 12 tokens
  assert ("input_ids_2" in record) == ("pooled_prompt_embeds" in record) == (family == "sdxl")


def test_rerun_does_nothing_and_changed_config_is_refused(stage, root, monkeypatch):
  config, manifest, _, _ = stage
  out = os.path.join(config.workdir, "pairs")
  before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}

  def fail(*args, **kwargs):
    raise AssertionError("a complete dataset was generated again")

  monkeypatch.setattr(teacher_pairs, "load_teacher",
                      lambda path, components=(), **kw: load_teacher(path, components=()) if
                      not components else fail())
  monkeypatch.setattr(teacher_pairs.pairs_lib, "generate_pairs", fail)
  assert teacher_pairs.run_pairs(config) == manifest
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == before

  changed = make_config(root, os.path.basename(config.teacher.path), guidance_scale=5.0,
                        negative_prompt=config.pairs.negative_prompt)
  with pytest.raises(ValueError, match=r"(?s)different config.*guidance_scale: folder has 3\.0, "
                                       r"this run 5\.0"):
    teacher_pairs.run_pairs(changed)
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == before


def test_deleted_shard_is_regenerated(sd1_stage):
  config, manifest, records, _ = sd1_stage
  out = os.path.join(config.workdir, "pairs")
  first = os.path.join(out, manifest["shards"][0]["name"])
  mtime = os.stat(first).st_mtime_ns
  for name in (manifest["shards"][1]["name"], shards.sidecar_name(1, 2)):
    os.remove(os.path.join(out, name))
  again = teacher_pairs.run_pairs(config)
  assert again["shards"] == manifest["shards"]  # same bytes (sha256) as the first run
  assert os.stat(first).st_mtime_ns == mtime


def test_eta_noise_is_per_pair(sd1_stage):
  """With eta > 0, a pair's result does not depend on where it sits in its batch."""
  config, _, records, prompts = sd1_stage
  teacher = load_teacher(config.teacher.path, components=("unet", "text"))
  encode_fn, generate_fn, params = teacher_pairs.teacher_fns(
      teacher, guidance_scale=GUIDANCE, num_steps=STEPS, eta=0.7, eta_seed=1,
      negative_prompt=config.pairs.negative_prompt, store_embeddings=False)
  run = jax.jit(generate_fn)
  z = np.stack([records[i]["z"] for i in (0, 1)])
  x = np.asarray(run(params, z, encode_fn(prompts[:2]))["x"])
  swapped = np.asarray(run(params, z[::-1], encode_fn(prompts[1::-1]))["x"])
  assert_close_to_scale(swapped[::-1], x, 1e-5)
  eta0 = np.stack([records[i]["x"] for i in (0, 1)])  # the same pairs with eta = 0
  assert not np.allclose(x, eta0, atol=1e-2)  # the noise was used


def test_config_errors(root, sd1_stage, tmp_path):
  bad = make_config(root, "sd1", num_pairs=99)
  bad.workdir = str(tmp_path)
  with pytest.raises(ValueError, match="num_pairs=99, but .* holds 12 prompts"):
    teacher_pairs.run_pairs(bad)
  bad = make_config(root, "sd1", height=33)
  with pytest.raises(ValueError, match="multiples of the VAE's downscale factor"):
    teacher_pairs.run_pairs(bad)
