"""The GDD / GDD-I recipe: captioned image sources, the real_latents stage, the train stage
on real latents (no pairs, no regression, z drawn in the step) with GDD-I's frozen
convolutions bit-identical through training and stateless in the optimiser, the recipe's
refusals, and the GDD-I preset on the real SD 1.5 / SDXL parameter trees."""

import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_train_config
from flax import traverse_util
from PIL import Image
from test_configs import load as load_config

from d2g_jax import config_defaults, run
from d2g_jax.data import images, source
from d2g_jax.infra import metrics as metrics_lib
from d2g_jax.infra import optim
from d2g_jax.models.unet import init_shapes
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.preflight import PreflightError
from d2g_jax.teacher import load_teacher
from d2g_jax.train import build, inputs

CAPTIONS = ["a cat", "the cat", "a photo of the cat", "the photo", "cat", "of the cat"]
# Trainable under GDD-I: every kind of UNet parameter the preset must leave alone.
TRAINABLE = r"(norm|time_emb|time_embedding|add_embedding|/to_[qkv]/|conv_shortcut|^conv_(in|out)/)"


def _image(i):
  rng = np.random.default_rng(i)
  return Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8))


def _captioned_folder(root):
  """captioned:<root>: 12 images in two subfolders, each with its caption file."""
  for i in range(12):
    folder = root / ("a" if i < 6 else "b")
    folder.mkdir(parents=True, exist_ok=True)
    _image(i).save(folder / f"{i:02d}.png")
    (folder / f"{i:02d}.txt").write_text(f"  {CAPTIONS[i % 6]}\n")
  return root


def test_caption_sources(tmp_path):
  src = images.open_images(f"captioned:{_captioned_folder(tmp_path / 'cap')}")
  assert src.target == "caption" and len(src) == 12
  image, caption, key = src.item(7)
  assert (caption, key, image.size) == (CAPTIONS[1], os.path.join("b", "07.png"), (48, 40))
  (tmp_path / "cap" / "b" / "07.txt").write_text("another caption")  # captions identify the data
  assert images.open_images(f"captioned:{tmp_path / 'cap'}").description() != src.description()
  with pytest.raises(images.ImageSourceError, match="already has captions"):
    images.open_images(f"captioned:{tmp_path / 'cap'}", caption_template="{}")
  (tmp_path / "cap" / "b" / "07.txt").unlink()
  with pytest.raises(images.ImageSourceError, match=r"1 images .* no caption file.*07.png"):
    images.open_images(f"captioned:{tmp_path / 'cap'}")

  for label in ("3", "7"):  # class folders captioned by a template
    (tmp_path / "digits" / label).mkdir(parents=True)
    _image(int(label)).save(tmp_path / "digits" / label / "x.png")
  src = images.open_images(f"folder:{tmp_path / 'digits'}",
                           caption_template="a handwritten digit {}")
  assert src.target == "caption" and [src.item(i)[1] for i in range(2)] == [
      "a handwritten digit 3", "a handwritten digit 7"]
  assert src.description()["caption_template"] == "a handwritten digit {}"
  with pytest.raises(images.ImageSourceError, match="no '{}'"):
    images.open_images(f"folder:{tmp_path / 'digits'}", caption_template="a digit")


def test_gdd_i_preset_on_real_unets():
  """Which SD 1.5 / SDXL parameters GDD-I freezes: every leaf is frozen or of a trainable
  kind, the trainable kinds are never frozen, and SD 1.5 freezes 86% (the paper: 85%)."""
  pattern = optim.frozen_pattern("gdd_i")
  fractions = {}
  for preset in ("sd15", "sdxl_base"):
    flat = traverse_util.flatten_dict(init_shapes(UNetConfig.preset(preset)), sep="/")
    frozen = {k for k in flat if re.search(pattern, k)}
    trainable = set(flat) - frozen
    assert all(re.search(TRAINABLE, k) for k in trainable), sorted(
        k for k in trainable if not re.search(TRAINABLE, k))[:5]
    assert not any(re.search(TRAINABLE, k) for k in frozen)
    kinds = {re.sub(r"_\d+", "", k.split("/")[-2]) for k in frozen}
    assert kinds == {"conv1", "conv2", "to_out", "net", "proj", "proj_in", "proj_out", "conv"}
    n_train, n_frozen = optim.count_frozen(flat, "gdd_i")
    assert n_train == sum(flat[k].size for k in trainable)
    fractions[preset] = n_frozen / (n_train + n_frozen)
    print(f"{preset}: {n_train:,} trainable, {n_frozen:,} frozen ({fractions[preset]:.1%})")
  assert 0.855 < fractions["sd15"] < 0.865


def _architecture_counts(c: UNetConfig) -> dict:
  """How many layers of each kind a UNet of config `c` has, from its block structure."""
  n, layers = c.num_blocks, c.layers
  up_resnets = [layers[n - 1 - k] + 1 for k in range(n)]  # each eats one skip (a concatenation)
  resnets = sum(layers) + 2 + sum(up_resnets)             # down, mid (2), up
  width_changes = sum(c.block_out_channels[i] != c.block_out_channels[max(i - 1, 0)]
                      for i in range(n))                  # a down block's first resnet
  shortcuts = width_changes + sum(up_resnets)             # + every up resnet (wider input)
  blocks = [c.down_transformer_layers[i] * layers[i] for i in range(n)
            if c.down_block_types[i] == "CrossAttnDownBlock2D"]
  blocks += [c.down_transformer_layers[-1]]               # mid
  blocks += [sum(c.up_transformer_layers[k][:up_resnets[k]]) for k in range(n)
             if c.up_block_types[k] == "CrossAttnUpBlock2D"]
  transformers = sum(layers[i] for i in range(n) if c.down_block_types[i] ==
                     "CrossAttnDownBlock2D") + 1 + sum(up_resnets[k] for k in range(n) if
                                                       c.up_block_types[k] == "CrossAttnUpBlock2D")
  return dict(resnets=resnets, shortcuts=shortcuts, transformers=transformers,
              blocks=sum(blocks), samplers=n - 1, sdxl=c.addition_embed_type == "text_time")


@pytest.mark.parametrize("preset", ["tiny_sd15", "tiny_sdxl"])
def test_gdd_i_freezes_what_gdd_freezes_per_layer_kind(preset):
  """GDD's rule written out here, per layer kind (not the preset's regex): norms, time
  embeddings, attention q/k/v and the 1x1 skip convs train, and so do conv_in / conv_out
  (outside the blocks the rule applies to); every other weight layer is frozen. The number
  of layers of each kind, trainable or frozen, is counted from the architecture."""
  t, f = optim.TRAIN, optim.FROZEN
  a = _architecture_counts(UNetConfig.preset(preset))
  r, tb = a["resnets"], a["blocks"]
  want = {("resnets", "conv1"): (f, r), ("resnets", "conv2"): (f, r),
          ("resnets", "norm1"): (t, r), ("resnets", "norm2"): (t, r),
          ("resnets", "time_emb_proj"): (t, r), ("resnets", "conv_shortcut"): (t, a["shortcuts"]),
          ("attentions", "norm"): (t, a["transformers"]),
          ("attentions", "proj_in"): (f, a["transformers"]),
          ("attentions", "proj_out"): (f, a["transformers"]),
          ("transformer_blocks", "norm1"): (t, tb), ("transformer_blocks", "norm2"): (t, tb),
          ("transformer_blocks", "norm3"): (t, tb),
          ("attn", "to_q"): (t, 2 * tb), ("attn", "to_k"): (t, 2 * tb),
          ("attn", "to_v"): (t, 2 * tb), ("attn", "to_out"): (f, 2 * tb),
          ("net", "proj"): (f, tb), ("ff", "net"): (f, tb),  # feed-forward: net_0/proj, net_2
          ("downsamplers", "conv"): (f, a["samplers"]), ("upsamplers", "conv"): (f, a["samplers"]),
          ("time_embedding", "linear"): (t, 2),
          ("", "conv_in"): (t, 1), ("", "conv_norm_out"): (t, 1), ("", "conv_out"): (t, 1)}
  if a["sdxl"]:
    want[("add_embedding", "linear")] = (t, 2)
  params = init_shapes(UNetConfig.preset(preset))
  labels = traverse_util.flatten_dict(optim.path_labels(params, "gdd_i"))
  # resnets_0 -> resnets, attn1/attn2 -> attn; conv1, norm1 stay
  strip = lambda name: re.sub(r"(_\d+|(?<=^attn)\d)$", "", name)
  got = {}  # kind -> {label: set of layers}
  for path, label in labels.items():
    layer = path[:-1]
    kind = (strip(layer[-2]) if len(layer) > 1 else "", strip(layer[-1]))
    got.setdefault(kind, {}).setdefault(label, set()).add(layer)
  assert set(got) == set(want), (sorted(set(got) ^ set(want)))
  for kind, (label, count) in want.items():
    assert {k: len(v) for k, v in got[kind].items()} == {label: count}, (kind, got[kind].keys())


def _gdd_config(root, workdir, **overrides):
  config = config_defaults.gdd(tiny_train_config.get_config(), innate=True)
  config.workdir = str(workdir)
  config.teacher.path = str(root / "teacher")
  config.real.images = f"captioned:{root / 'images'}"
  config.real.batch_size = 8
  config.real.shard_size = 8
  config.real.workers = 2
  config.real.out_dir = str(root / "real_latents")
  # two steps, one compiled step variant (no R1: its tracing is checked below)
  config.train.batch_size, config.train.num_steps, config.train.checkpoint_every = 8, 2, 2
  config.train.g_lr = config.train.d_lr = 1e-3
  config.objective.r1_gamma = 0.0
  config.sharding.min_size = 2 ** 30  # state replicated (FSDP is test_train's): fast checkpoints
  return tiny_train_config.override(config, **overrides)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("gdd")
  _captioned_folder(root / "images")
  run.run(_gdd_config(root, root, stages="tiny_teacher,real_latents"))
  return root


def test_real_latents_stage(root):
  src = source.ShardSource(str(root / "real_latents"))
  m = src.manifest
  assert m["num_examples"] == 12 and m["record"] == {
      "index": "int", "caption": "str", "key": "str", "latent": "float32[16, 16, 4]"}
  assert [src[i]["caption"] for i in range(6)] == CAPTIONS
  again = run.run(_gdd_config(root, root, stages="real_latents"))["real_latents"]
  assert again == m  # complete: kept, nothing encoded

  # What the train stage reads: token ids from the captions (the teacher's tokenizer), no z.
  config = run.resolve(_gdd_config(root, root))
  data = inputs.open_input(config)
  teacher = load_teacher(config.teacher.path, components=("text",))
  assert data.real and data.recompute_text and data.latent_shape == (16, 16, 4)
  assert data.keys(teacher) == ["x", "attention_mask", "input_ids"]
  first = data.examples(teacher, 3)
  ids, _ = teacher.text_encoders[0].tokenize(CAPTIONS[:3])
  np.testing.assert_array_equal(first["input_ids"], ids)
  np.testing.assert_array_equal(first["x"], np.stack([src[i]["latent"] for i in range(3)]))
  batch = next(iter(data.dataset(teacher, 4, seed=0, verify="size").to_iter_dataset()))
  assert sorted(batch) == ["attention_mask", "input_ids", "x"] and batch["x"].shape == (4, 16, 16, 4)


def test_gdd_i_trains_on_real_latents_with_frozen_convs(root, tmp_path, caplog):
  """Two GDD-I steps through the train stage: D and the trainable part of G move, every
  frozen leaf of G is bit-identical to the teacher's and has no optimiser state."""
  work = tmp_path / "run"
  with caplog.at_level("INFO", logger="d2g_jax.train"):
    result = run.run(_gdd_config(root, work, stages="train"))["train"]
  assert result["step"] == 2
  logged = metrics_lib.read_metrics(str(work))
  assert {"g/gan", "d/loss_real", "d/loss_fake"} <= set(logged[-1])
  assert not {"g/regression", "g/mse", "d/logit_mixed"} & {k for m in logged for k in m}
  assert "frozen='gdd_i'" in caplog.text and "optimiser state" in caplog.text

  teacher = load_teacher(str(root / "teacher"), components=("unet",))
  g0 = traverse_util.flatten_dict(teacher.unet_params, sep="/")
  with ocp.PyTreeCheckpointer() as reader:
    state = reader.restore(str(work / "checkpoints" / "2" / "state"))
  pattern = optim.frozen_pattern("gdd_i")
  g = traverse_util.flatten_dict(state["g_params"], sep="/")
  frozen = {k for k in g if re.search(pattern, k)}
  assert frozen and len(frozen) < len(g)
  for k in g:
    same = np.array_equal(np.asarray(g[k]), np.asarray(g0[k]))
    assert same == (k in frozen), (k, "frozen" if k in frozen else "trainable")
  # Adam's moments (mu, nu) exist for the trainable leaves only: twice their size.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["g_opt"])]
  assert paths and not any(re.search(pattern, p.replace("']['", "/")) for p in paths)
  n_train, _ = optim.count_frozen(teacher.unet_params, "gdd_i")
  moments = sum(x.size for x in jax.tree.leaves(state["g_opt"]) if np.ndim(x) > 0)
  assert moments == 2 * n_train
  d = traverse_util.flatten_dict(state["d_params"], sep="/")  # D trained too
  assert any(not np.array_equal(np.asarray(v), np.asarray(g0[k[len("unet/"):]]))
             for k, v in d.items() if k.startswith("unet/"))


def test_gdd_objective_and_refusals(root, tmp_path):
  """The recipe's objective: unpaired (z drawn in the step, no latent MSE), no regression
  network built; everything that needs pairs refused, naming the key."""
  config = _gdd_config(root, root / "unused")
  teacher = load_teacher(config.teacher.path, components=("unet", "text"))
  obj, consts = build.build_objective(config, teacher, recompute_text=True)
  assert not obj.paired and obj.regression is None and consts["loss"] is None
  assert obj.encode_tokens is not None and consts["text"] is not None
  for key, value, message in [("discriminator.z_cond", True, "z_cond=True"),
                              ("objective.mix_fraction", 0.25, "mix_fraction=0.25"),
                              ("objective.regression_weight", 1.0, "regression_weight=1.0"),
                              ("train.recipe", "gan", "expected one of")]:
    with pytest.raises(ValueError, match=message):
      run.run(_gdd_config(root, tmp_path / key, stages="train", **{key: value}))
  labels = tmp_path / "labels"
  with pytest.raises(ValueError, match="gives class labels, not captions"):
    run.run(_gdd_config(root, tmp_path, stages="real_latents",
                        **{"real.images": f"folder:{root / 'images'}",
                           "real.out_dir": str(labels)}))
  with pytest.raises(PreflightError, match="real.out_dir=.*missing': no such folder"):
    run.run(_gdd_config(root, tmp_path / "w", stages="train",
                        **{"real.out_dir": str(tmp_path / "missing")}))
  other = tmp_path / "other_teacher"  # latents from another VAE: refused before any work
  shutil.copytree(root / "teacher", other)
  vae_config = json.loads((other / "vae" / "config.json").read_text())
  (other / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 0.5}))
  with pytest.raises(ValueError, match="encoded by the VAE at .*fingerprints differ"):
    run.run(_gdd_config(root, tmp_path / "v", stages="train", **{"teacher.path": str(other)}))


def test_gdd_i_configs():
  """configs/gdd_i.py: SD 1.5 GDD-I and GDD; the demo variants train the digits demo's teacher
  with its budget (steps, batch, learning rates), so their numbers compare with its run."""
  gdd_i, demo = load_config("gdd_i"), load_config("demo").get_config()
  for arg, frozen in ((None, "gdd_i"), ("gdd", ""), ("demo", "gdd_i"), ("demo_gdd", "")):
    config = run.resolve(gdd_i.get_config(arg))
    build.check_recipe(config)
    assert config.train.recipe == "gdd" and config.train.g_frozen == frozen
    assert run.parse_stages(config.stages) == ["real_latents", "train", "export"] + (
        ["demo_report"] if arg and arg.startswith("demo") else [])
  sd15 = gdd_i.get_config()
  assert (sd15.train.g_lr, sd15.train.d_lr, sd15.objective.r1_gamma, sd15.train.adam_b2) == (
      8e-6, 4e-5, 1e-4, 0.99)
  demo_i = gdd_i.get_config("demo")
  assert demo_i.teacher.path == os.path.join(demo.workdir, "teacher")  # the demo's, not ours
  for key in ("num_steps", "batch_size", "g_lr", "d_lr", "warmup_steps"):
    assert demo_i.train[key] == demo.train[key], key
  # The demo's digits (its digits_lpips_data stage's training folders), prompt and loss.
  resolved = run.resolve(demo_i)
  assert resolved.real.images == "folder:" + os.path.join(demo.workdir, "digits",
                                                          "perceptual_data", "train")
  assert resolved.real.caption_template == demo.digits.prompt
  assert resolved.loss.weights == os.path.join(demo.workdir, "latent_vgg")
  assert resolved.workdir == os.path.join(demo.workdir, "gdd_i")
  with pytest.raises(ValueError, match="expected no variant, gdd, demo or demo_gdd"):
    gdd_i.get_config("sdxl")

