"""The kinds of input preflight checks (`Inputs`: a teacher folder, prompts, image sources,
loss weights, outputs, batch sizes, ...), each adding a `Problem` that names its config key."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from d2g_jax.convert import lpips as convert_lpips
from d2g_jax.convert.core import weight_files
from d2g_jax.convert.pipeline import PipelineInfo, inspect_pipeline
from d2g_jax.data import shards as fmt
from d2g_jax.models.latent_vgg import ENCODERS
from d2g_jax.sampling.schedule import ScheduleConfig

TEACHER = ("a diffusers SD 1.x / 2.x / SDXL pipeline folder: model_index.json, scheduler/, unet/, "
           "vae/, text_encoder/ + tokenizer/ (SDXL: also text_encoder_2/ + tokenizer_2/)")
PROMPTS = ("a prompt file (.txt: one prompt a line, or .jsonl) or tfds:<name>[/<config>]/<split>, "
           "e.g. tfds:coco_captions/2014/train")
IMAGES = ("folder:<root> (one subfolder per class), captioned:<root> (x.png + x.txt) or "
          "tfds:<name>[/<config>]/<split>")
BAPPS = "a BAPPS root holding 2afc/train and 2afc/val"
LATENT_LOSSES = ("latent_lpips", "e_latent_lpips")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One input that would stop the run: the config key that sets it and its value, what was
  found, and what a valid value looks like."""
  key: str
  value: Any
  found: str
  expected: str = ""

  def __str__(self) -> str:
    return f"{self.key}={self.value!r}: {self.found}" + (
        f"; expected {self.expected}" if self.expected else "")


class Inputs:
  """The checks, with the problems found so far and the outputs of the stages before."""

  def __init__(self, config):
    self.config = config
    self.problems: list[Problem] = []
    self.made: list[str] = []
    self.devices = jax.device_count()
    self._teachers: dict[str, PipelineInfo | None] = {}

  def add(self, key: str, found: str, expected: str = ""):
    self.problems.append(Problem(key, self.config_value(key), found, expected))

  def config_value(self, key: str) -> Any:
    value = self.config
    for part in key.split("."):
      value = value[part]
    return value

  def will_exist(self, path: str) -> bool:
    """Whether an earlier stage of this run writes `path` (or a folder holding it)."""
    path = os.path.abspath(path)
    return any(path == m or path.startswith(m.rstrip(os.sep) + os.sep)
               for m in map(os.path.abspath, self.made))

  # ---------------------------------------------------------------- kinds of input
  def teacher(self, key: str, path: str, parts: tuple[str, ...] = ()) -> PipelineInfo | None:
    """The pipeline folder's configs, and the weights of `parts` (unet, vae, text) present;
    None when an earlier stage makes it or it has problems (reported once per folder)."""
    if self.will_exist(path):
      return None
    if path not in self._teachers:
      self._teachers[path] = None
      if not path:
        self.add(key, "empty", TEACHER)
      elif not os.path.isdir(path):
        self.add(key, "no such folder", TEACHER)
      else:
        try:
          ScheduleConfig.from_folder(path)
          self._teachers[path] = inspect_pipeline(path)
        except (OSError, ValueError) as e:
          self.add(key, str(e), TEACHER)
    info = self._teachers[path]
    for part in parts if info is not None else ():
      folders = ([(enc, "model") for enc, _ in info.text_encoders] if part == "text"
                 else [(part, WEIGHT_STEMS[part])])
      for folder, stem in folders:
        try:
          weight_files(os.path.join(path, folder), stem)
        except (OSError, ValueError) as e:
          self.add(key, str(e), f"{TEACHER}, with the weights of {folder}/")
    return info

  def prompts(self, key: str, spec: str, data_dir_key: str):
    if not spec:
      self.add(key, "empty", PROMPTS)
    elif spec.startswith("tfds:"):
      self.tfds(key, spec, PROMPTS)
      self.folder(data_dir_key, self.config_value(data_dir_key), "", optional=True)
    elif not os.path.isfile(spec):
      self.add(key, "a folder, not a file" if os.path.isdir(spec) else "no such file", PROMPTS)

  def images(self, key: str, spec: str, data_dir_key: str):
    kind, sep, root = spec.partition(":")
    if sep and kind in ("folder", "captioned"):
      self.folder(key, root, IMAGES)
    elif sep and kind == "tfds":
      self.tfds(key, spec, IMAGES)
      self.folder(data_dir_key, self.config_value(data_dir_key), "", optional=True)
    else:
      self.add(key, "not an image source" if spec else "empty", IMAGES)

  def tfds(self, key: str, spec: str, expected: str):
    name, sep, split = spec[len("tfds:"):].rpartition("/")
    if not (sep and name and split):
      self.add(key, "not a tfds spec", expected)

  def folder(self, key: str, path: str, expected: str, optional: bool = False):
    """A folder that must exist (or be made before), unless `optional` and empty."""
    if (optional and not path) or self.will_exist(path) or os.path.isdir(path):
      return
    self.add(key, f"folder {path!r} does not exist" if path else "empty", expected)

  def file(self, key: str, path: str, expected: str):
    if not (self.will_exist(path) or os.path.isfile(path)):
      self.add(key, "a folder, not a file" if os.path.isdir(path) else "no such file", expected)

  def dataset(self, key: str, folder: str, stage: str):
    """A dataset folder (manifest.json) that `stage` writes, at or under `key`'s value."""
    if self.will_exist(folder) or os.path.isfile(os.path.join(folder, fmt.MANIFEST)):
      return
    where = "" if folder == self.config_value(key) else f"{folder}: "
    found = where + ("no such folder" if not os.path.isdir(folder) else
                     f"no {fmt.MANIFEST} in it, so no dataset of the {stage} stage")
    self.add(key, found, f"the output of the {stage} stage: run it first "
             f"(--config.stages={stage},...) or point {key} at a finished one")

  def writable(self, key: str, path: str):
    """An output: a folder, or a path whose nearest existing parent folder is writable."""
    if "://" in path:
      return  # remote storage: checked when written
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
      self.add(key, "a file, not a folder", "a folder this run may create and write")
      return
    while not os.path.exists(p):
      p = os.path.dirname(p)
    if not os.path.isdir(p) or not os.access(p, os.W_OK | os.X_OK):
      self.add(key, f"{p} is not a writable folder", "a place this run may create and write")

  def batch(self, key: str, size: int):
    n, hosts = self.devices, jax.process_count()
    if size < 1 or size % n or size % hosts:
      self.add(key, f"not a multiple of the {n} devices" + (f" and {hosts} hosts" if hosts > 1
                                                              else ""),
               f"a positive multiple of {n}, e.g. {max(n, size - size % n)}")

  def lpips_weights(self, key: str, path: str, encoder: str | None, allow_key: str):
    """E-LatentLPIPS weights for `encoder` (None: unknown yet) at `path`, or a random network
    allowed by `allow_key`."""
    url = convert_lpips.ELATENTLPIPS_URL
    files = ([f.format(encoder=encoder) for f in (convert_lpips.TUNED_FILE, convert_lpips.OURS_FILE,
                                                   convert_lpips.TRUNK_FILE)] if encoder else [])
    expected = (f"the {encoder or '<encoder>'} E-LatentLPIPS weights: "
                f"{encoder or '<encoder>'}_latest_vgg16_tuned.pth ({url}), a folder holding it, "
                f"or the latent_vgg_calibrate stage's latent_vgg.out_dir; or {allow_key}=True to "
                "use a randomly initialised network on purpose (not E-LatentLPIPS)")
    if not path:
      if not self.config_value(allow_key):
        self.add(key, "empty, so the E-LatentLPIPS network would be randomly initialised",
                 expected)
      return
    if self.will_exist(path) or any(self.will_exist(os.path.join(path, f)) for f in files):
      return
    if not os.path.exists(path):
      self.add(key, "no such file or folder", expected)
      return
    if encoder is None:
      return
    try:
      found = convert_lpips.find_weights(path, encoder)
      if found.endswith(".safetensors"):
        made_for = convert_lpips.safetensors_metadata(found).get("encoder", encoder)
        if made_for != encoder:
          self.add(key, f"{found} holds the weights of encoder {made_for!r}, not {encoder!r}",
                   expected)
    except (OSError, ValueError) as e:
      self.add(key, str(e), expected)

  def loss(self, info: PipelineInfo | None):
    """The regression loss's network (config.loss) for latents of the teacher's VAE."""
    lo = self.config.loss
    from d2g_jax.losses.perceptual import NAMES
    if lo.name not in NAMES:
      self.add("loss.name", "unknown loss", f"one of {', '.join(NAMES)}")
    elif lo.name in LATENT_LOSSES:
      if lo.encoder not in ENCODERS:
        self.add("loss.encoder", "unknown encoder", f"one of {', '.join(ENCODERS)}")
        return
      channels, vae = ENCODERS[lo.encoder][0], info.vae.latent_channels if info else None
      if vae is not None and vae != channels:
        fits = [k for k, v in ENCODERS.items() if v[0] == vae]
        self.add("loss.encoder", f"its E-LatentLPIPS takes {channels}-channel latents, but the "
                 f"teacher's VAE ({info.path}/vae) makes {vae}", f"one of {', '.join(fits)}")
      self.lpips_weights("loss.weights", lo.weights, lo.encoder, "loss.allow_random_weights")
    elif lo.name == "lpips":
      if lo.lpips_vgg:
        self.file("loss.lpips_vgg", lo.lpips_vgg, "torchvision's VGG16 state dict")
      elif not lo.allow_random_weights:
        self.add("loss.lpips_vgg", "empty, so the VGG16 trunk of pixel LPIPS would be randomly "
                 "initialised", f"torchvision's VGG16 state dict "
                 f"({convert_lpips.TORCHVISION_VGG16_URL}); or loss.allow_random_weights=True to "
                 "use a random one on purpose (not LPIPS)")

  def vae(self, key: str, folder: str, encoder: str, encoder_key: str):
    """A diffusers VAE folder whose latents have `encoder`'s channel count."""
    if self.will_exist(folder):
      return
    from d2g_jax.files import load_json
    from d2g_jax.models.vae import VAEConfig
    try:
      cfg = VAEConfig.from_diffusers(load_json(os.path.join(folder, "config.json"), "VAE config"))
      weight_files(folder, WEIGHT_STEMS["vae"])
    except (OSError, ValueError) as e:
      self.add(key, str(e), "a diffusers AutoencoderKL folder (config.json and weights)")
      return
    channels = ENCODERS[encoder][0] if encoder in ENCODERS else None
    if channels != cfg.latent_channels:
      fits = [k for k, v in ENCODERS.items() if v[0] == cfg.latent_channels]
      self.add(encoder_key, f"takes {channels}-channel latents, but the VAE at {folder} makes "
               f"{cfg.latent_channels}", f"one of {', '.join(fits)}")

  def train_mesh(self):
    """`mesh.data` x `mesh.fsdp` over the devices, and `train.batch_size` over the batch axes
    in `train.microbatches` parts (`build.check_batch`)."""
    from d2g_jax import parallel
    from d2g_jax.train.build import check_batch
    m, t, n = self.config.mesh, self.config.train, self.devices
    if t.microbatches < 1:
      self.add("train.microbatches", "below 1", "1 (no accumulation) or more")
      return
    try:
      mesh = parallel.make_mesh({"data": m.data, "fsdp": m.fsdp})
    except ValueError as e:
      self.add("mesh.fsdp", f"with mesh.data={m.data}: {e}", f"mesh.data x mesh.fsdp = the {n} "
               f"devices (one of them -1: all the others), e.g. mesh.data=-1 mesh.fsdp="
               f"{m.fsdp if m.fsdp > 0 and n % m.fsdp == 0 else 1}")
      self.batch("train.batch_size", t.batch_size)
      return
    try:
      check_batch(t.batch_size, t.microbatches, mesh)
    except ValueError as e:
      self.add("train.batch_size", str(e))
