"""E-LatentLPIPS training: the classifier against torchvision's VGG16-BN (the official trunk's
class), the calibration objective, the three stages end to end with exact resume, and the
official-layout export loaded by the `elatentlpips` package with equal distances."""

import logging
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import latent_vgg_data as D
import numpy as np
import pytest
import torch
from torch_utils import assert_close_to_scale

from d2g_jax import config_defaults, run
from d2g_jax.convert import lpips as convert_lpips
from d2g_jax.latent_lpips import calibrate as cal
from d2g_jax.losses import perceptual
from d2g_jax.models.latent_vgg import (
  LPIPS,
  WIDTHS,
  LPIPSConfig,
  VGGConfig,
  init_params,
  merge_batch_stats,
)
from d2g_jax.models.latent_vgg_classifier import LatentVGGClassifier, adaptive_pool_matrix
from d2g_jax.models.lpips_rank import RankNet

with warnings.catch_warnings():
  warnings.simplefilter("ignore")  # elatentlpips imports the deprecated pkg_resources
  import elatentlpips  # noqa: E402
  from elatentlpips import vgg16 as official_vgg16  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
HIDDEN, CLASSES = 16, 3


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


class _SmallHeadVGG16BN(torch.nn.Module):
  """torchvision's VGG16-BN (the same `features`, `avgpool`, `classifier` and forward) with a
  small classifier: hidden 16, 3 classes (torchvision's own would allocate 120M weights)."""

  def __init__(self, pretrained=False):
    super().__init__()
    from torchvision.models import vgg
    self.features = vgg.make_layers(vgg.cfgs["D"], batch_norm=True)
    self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = torch.nn.Sequential(
        torch.nn.Linear(512 * 7 * 7, HIDDEN), torch.nn.ReLU(True), torch.nn.Dropout(0.0),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(True), torch.nn.Dropout(0.0),
        torch.nn.Linear(HIDDEN, CLASSES))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.fixture
def small_head(monkeypatch):
  """The official package builds its trunk from tv.vgg16_bn(): give it the small head."""
  monkeypatch.setattr(official_vgg16.tv, "vgg16_bn", _SmallHeadVGG16BN)


def _random_classifier(seed=0):
  """A full-width classifier (torchvision head, small) with random weights and batch-norm
  statistics, drawn with numpy (no compiled init pass)."""
  model = LatentVGGClassifier(VGGConfig.latent(4), CLASSES, head="vgg", hidden=HIDDEN,
                              dropout=0.0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                                             train=True))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(
          np.float32)
    base = {"scale": 0.5, "var": 0.5}.get(name, 0.0)
    return (base + (rng.random(s.shape) if base else 0.1 * rng.standard_normal(s.shape))
            ).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return model, variables["params"], variables["batch_stats"]


def test_imagenet_config():
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "latent_vgg_imagenet.py")
  spec = importlib.util.spec_from_file_location("latent_vgg_imagenet", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.__doc__.split("\n\n")[1].strip().startswith(
      "python -m d2g_jax.main --config configs/latent_vgg_imagenet.py")
  config = mod.get_config()
  assert run.parse_stages(config.stages) == ["latent_cache", "latent_vgg_train",
                                             "latent_vgg_calibrate"]
  assert tuple(config.latent_vgg.widths) == WIDTHS and config.latent_vgg.train.head == "vgg"
  assert config.latent_vgg.cache.train == "tfds:imagenet2012/train"


def test_adaptive_pool_matches_torch():
  for size in (1, 4, 7, 9):
    x = np.random.default_rng(size).standard_normal((1, 3, size, size)).astype(np.float32)
    want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), 7).numpy()
    m = adaptive_pool_matrix(size)
    np.testing.assert_allclose(np.einsum("oh,bchw,pw->bcop", m, x, m), want, atol=1e-6)


def test_classifier_matches_torchvision_and_exports(small_head, tmp_path):
  """Ours vs the package's LatentVGG16BN (torchvision VGG16-BN, 4 channels, three pools
  removed) loaded strictly from our exported .pth.tar: eval logits, then a train-mode
  forward with batch statistics and the running statistics it leaves."""
  model, params, stats = _random_classifier()
  merged = {**params, "net": merge_batch_stats(params["net"], stats["net"])}
  path = convert_lpips.export_classifier(model, merged, str(tmp_path), "sd15", best_acc1=12.5,
                                         epoch=3, num_batches_tracked=7)
  assert os.path.basename(path) == "sd15_latent_vgg16.pth.tar"
  ckpt = torch.load(path, weights_only=True)
  assert ckpt["best_acc1"] == 12.5 and ckpt["arch"] == "vgg16_bn"
  ref = official_vgg16.LatentVGG16BN(4)
  ref.load_state_dict({k[len("module."):] if k.startswith("module.") else k: v
                       for k, v in ckpt["state_dict"].items()})  # strict

  x = np.random.default_rng(1).standard_normal((4, 8, 8, 4)).astype(np.float32)
  ours = model.apply({"params": merged}, x, train=False)
  with torch.no_grad():
    assert_close_to_scale(ours, ref.eval()(_nchw(x)).numpy())

  logits, updated = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
  with torch.no_grad():
    assert_close_to_scale(logits, ref.train()(_nchw(x)).numpy())
  bn = ref.model.features[1]  # the first batch norm; 4 x 8 x 8 values per channel
  got = updated["batch_stats"]["net"]["slice1_1"]
  assert_close_to_scale(got["mean"], bn.running_mean.numpy())
  # torch keeps the unbiased variance (n / (n - 1)), flax the biased one.
  n = 4 * 8 * 8
  assert_close_to_scale((np.asarray(got["var"]) - 0.9 * stats["net"]["slice1_1"]["var"]) * n
                        / (n - 1), bn.running_var.numpy() - 0.9 * stats["net"]["slice1_1"]["var"])

  # The trunk file loads as a (trunk-only) E-LatentLPIPS here too.
  with pytest.warns(RuntimeWarning, match="trunk only"):
    _, lp = convert_lpips.load_latent_lpips(path, "sd15")
  jax.tree.map(np.testing.assert_array_equal, lp["net"], merged["net"])


def test_16_channel_classifier_exports_to_the_official_layout(small_head, tmp_path):
  """SD3 / Flux latents (16 channels): the exported file loads strictly into the package's
  LatentVGG16BN(16)."""
  model = LatentVGGClassifier(VGGConfig.latent(16), CLASSES, head="vgg", hidden=HIDDEN)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)),
                                             train=True))
  v = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  merged = {**v["params"], "net": merge_batch_stats(v["params"]["net"], v["batch_stats"]["net"])}
  path = convert_lpips.export_classifier(model, merged, str(tmp_path), "sd3", best_acc1=0.0,
                                         epoch=0)
  state = torch.load(path, weights_only=True)["state_dict"]
  official_vgg16.LatentVGG16BN(16).load_state_dict(state)  # strict
  with pytest.raises(convert_lpips.ConversionError, match="official layout exists for"):
    convert_lpips.export_classifier(model, merged, str(tmp_path), "my_vae", best_acc1=0.0,
                                    epoch=0)


def test_calibration_objective_and_scores():
  # LPIPS's schedule: lr for `epochs`, then lr (1 - k / decay_epochs) in decay epoch k.
  c = type("C", (), {"lr": 1.0, "epochs": 2, "decay_epochs": 4})
  sched = cal.lr_schedule(c, steps_per_epoch=10)
  assert [float(sched(e * 10 + 3)) for e in range(6)] == [1, 1, 1, 0.75, 0.5, 0.25]
  # 2AFC: judge = fraction preferring p1; ties count half.
  s = cal.two_afc(np.array([1.0, 2.0, 1.0]), np.array([2.0, 1.0, 1.0]), np.array([0.3, 0.9, 0.7]))
  np.testing.assert_allclose(s, [0.7, 0.9, 0.5])

  # Synthetic features: channels 0-3 carry what people judge, 4-63 are loud noise, so the
  # uncalibrated heads (all ones) are near chance and calibration must find the 4 channels.
  rng = np.random.default_rng(0)
  n, widths = 512, (8, 8, 16, 16, 16)
  sig0, sig1 = rng.random(n), rng.random(n)
  f0, f1 = 5 * rng.random((n, 64)), 5 * rng.random((n, 64))
  f0[:, :4], f1[:, :4] = sig0[:, None], sig1[:, None]
  judge = (sig1 < sig0).astype(np.float32) * 0.9 + 0.05
  feats = {"f0": f0.astype(np.float32), "f1": f1.astype(np.float32), "judge": judge,
           "distortion": np.array(["a", "b"] * (n // 2))}
  assert cal.scores(np.ones(64), feats)["mean"] < 0.65
  import optax

  from d2g_jax import parallel
  mesh = parallel.make_mesh()
  rank, tx = RankNet(), optax.adam(3e-2, b1=0.5)
  state = cal.init_state(rank, tx, widths, 0, mesh)
  step = jax.jit(lambda s, b: cal.calibrate_step(rank, tx, 0.0, 0, s, b))
  for _i in range(150):
    rows = rng.integers(0, n, 64)
    state, out = step(state, {k: jnp.asarray(feats[k][rows]) for k in ("f0", "f1", "judge")})
  w = np.asarray(state["params"]["w"])
  assert w.min() >= 0 and w[:4].min() > w[4:].max()
  score = cal.scores(w, feats)
  assert score["mean"] > 0.85 and set(score["per_family"]) == {"a", "b"}


def test_pair_features_give_the_lpips_distance():
  """d = f . w is LatentLPIPS (without the L1 term) with heads w."""
  module = LPIPS(LPIPSConfig.latent("sd15", widths=(8, 8, 16, 16, 16)))
  params = init_params(module, seed=3)
  rng = np.random.default_rng(2)
  w = rng.random(64).astype(np.float32)
  params.update(cal.heads_params(w, module.config.vgg.widths))
  ref, p0, p1 = (rng.standard_normal((3, 8, 8, 4)).astype(np.float32) for _ in range(3))
  f0, f1 = jax.jit(lambda *a: cal.pair_features(module, params["net"], *a))(ref, p0, p1)
  for f, p in ((f0, p0), (f1, p1)):
    want = module.apply({"params": params}, ref, p, add_l1=False)
    assert_close_to_scale(np.asarray(f) @ w, want)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The three stages, end to end, on tiny data (narrow trunk, linear head)."""
  root = tmp_path_factory.mktemp("elatentlpips")
  config = D.tiny_config(str(root / "run"), D.make_vae(str(root / "vae")),
                         D.make_image_folder(str(root / "images")),
                         D.make_bapps(str(root / "bapps")))
  return root, config, run.run(config)


def test_stages_end_to_end(trained, caplog):
  root, config, results = trained
  out = os.path.join(config.workdir, "latent_vgg")
  train = results["latent_vgg_train"]
  assert train["num_steps"] == 20 and train["num_classes"] == 3
  assert train["top1"] >= 0.5  # colour-coded classes: above chance (1/3) after 20 steps
  calib = results["latent_vgg_calibrate"]
  assert set(calib["val"]["per_family"]) == {"color", "deblur"}
  assert set(calib["train"]["per_family"]) == {"cnn", "mix"}
  assert 0 <= calib["val"]["mean"] <= 1 and calib["steps"] == 5 * 2
  assert os.path.isfile(os.path.join(out, "sd15_elatentlpips.safetensors"))

  # The distillation stage's loss loads the result (narrow widths from the file's metadata).
  cfg = config_defaults.base().loss
  cfg.weights, cfg.name = out, "latent_lpips"
  loss_fn, params = perceptual.loss_from_config(cfg)
  w = np.concatenate([np.asarray(params[f"lin{k}"]["model_1"]["kernel"]).ravel()
                      for k in range(5)])
  assert w.shape == (64,) and w.min() >= 0
  a = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  assert float(loss_fn(params, a, a)) == 0.0 and float(loss_fn(params, a, a + 1)) > 0

  # Running again skips every finished stage.
  stamp = os.stat(os.path.join(out, "sd15_elatentlpips.safetensors")).st_mtime_ns
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="d2g_jax"):
    run.run(config)
  log = caplog.text
  assert log.count("already complete") == 4 and "already trained" in log
  assert "already calibrated" in log
  assert os.stat(os.path.join(out, "sd15_elatentlpips.safetensors")).st_mtime_ns == stamp


def test_train_resume_is_exact(trained, tmp_path):
  """10 steps, then the same run to 20 steps (checkpoint + grain iterator restored) gives
  the trunk of the uninterrupted 20-step run, bit for bit."""
  _, config, results = trained
  src = os.path.join(config.workdir, "latent_vgg")
  config = D.tiny_config(str(tmp_path / "run"), config.latent_vgg.vae,
                         config.latent_vgg.cache.train[len("folder:"):])
  out = os.path.join(config.workdir, "latent_vgg")
  shutil.copytree(os.path.join(src, "cache"), os.path.join(out, "cache"))
  config.stages = "latent_vgg_train"
  config.latent_vgg.train.num_steps = 10
  first = run.run(config)["latent_vgg_train"]
  assert first["num_steps"] == 10
  config.latent_vgg.train.num_steps = 20
  second = run.run(config)["latent_vgg_train"]
  assert second["steps_this_run"] == 10
  trunk = "trunk/sd15_elatentlpips.safetensors"
  from safetensors.numpy import load_file
  resumed, whole = load_file(os.path.join(out, trunk)), load_file(os.path.join(src, trunk))
  assert resumed.keys() == whole.keys()
  for k in whole:
    np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)
  assert second["top1"] == results["latent_vgg_train"]["top1"]
  # Another config into the same run is refused, naming the key.
  config.latent_vgg.train.lr = 0.5
  with pytest.raises(ValueError, match="train.lr"):
    run.run(config)


def test_calibrated_export_loads_in_elatentlpips(trained, small_head, tmp_path):
  """The calibrate stage on a full-width trunk writes ckpt/sd15_latest_vgg16_tuned.pth; the
  official package loads it (and our classifier file) and its distances equal ours."""
  _, config, _ = trained
  model, params, stats = _random_classifier(seed=4)
  merged = {**params, "net": merge_batch_stats(params["net"], stats["net"])}
  out = tmp_path / "run" / "latent_vgg"
  shutil.copytree(os.path.join(config.workdir, "latent_vgg", "cache"), out / "cache")
  trunk = str(tmp_path / "trunk.safetensors")
  module = LPIPS(LPIPSConfig.latent("sd15"))
  convert_lpips.save_lpips(module, {"net": merged["net"], **cal.heads_params(
      np.ones(sum(WIDTHS)), WIDTHS)}, trunk)
  config = D.tiny_config(str(tmp_path / "run"), config.latent_vgg.vae, "unused")
  config.stages = "latent_vgg_calibrate"
  config.latent_vgg.widths = WIDTHS
  config.latent_vgg.calibrate.trunk = trunk
  result = run.run(config)["latent_vgg_calibrate"]
  assert result["outputs"]["official"] == str(out / "ckpt" / "sd15_latest_vgg16_tuned.pth")
  convert_lpips.export_classifier(model, merged, str(out / "ckpt"), "sd15", best_acc1=0.0,
                                  epoch=0)

  cwd = os.getcwd()
  os.chdir(out)  # the package reads ./ckpt
  try:
    ref = elatentlpips.ELatentLPIPS(pretrained=True, pnet_rand=False, encoder="sd15",
                                    augment=None, verbose=False).eval()
  finally:
    os.chdir(cwd)
  cfg = config_defaults.base().loss
  cfg.weights, cfg.name = str(out), "latent_lpips"
  loss_fn, lp = perceptual.loss_from_config(cfg)
  w = np.asarray(lp["lin3"]["model_1"]["kernel"]).ravel()
  np.testing.assert_array_equal(w, ref.lin3.model[1].weight.detach().numpy().ravel())
  rng = np.random.default_rng(5)
  a = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  b = (a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32)
  module, _ = convert_lpips.load_latent_lpips(str(out), "sd15")
  ours = module.apply({"params": lp}, a, b)
  with torch.no_grad():
    want = ref(_nchw(a), _nchw(b), ensembling=False).numpy().reshape(2)
  assert_close_to_scale(ours, want)
  assert_close_to_scale(float(loss_fn(lp, a, b)), want.mean())
