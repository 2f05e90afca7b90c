"""E-LatentLPIPS / pixel LPIPS: parity with the official PyTorch packages, conversion, errors.

The official weights cannot be downloaded here, so the checkpoint files are built from the
packages' own randomly initialised modules, saved in the layouts the packages load.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

with warnings.catch_warnings():
  warnings.simplefilter("ignore")  # elatentlpips imports the deprecated pkg_resources
  import elatentlpips  # noqa: E402
  import lpips  # noqa: E402

from d2g_jax.convert.core import ConversionError  # noqa: E402
from d2g_jax.convert.lpips import load_latent_lpips, load_pixel_lpips  # noqa: E402
from d2g_jax.convert.lpips import main as convert_main  # noqa: E402
from d2g_jax.models.latent_vgg import LPIPS, VGG16, LPIPSConfig, param_shapes  # noqa: E402

# The reference packages build torchvision models with the deprecated `pretrained=` argument.
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


def _randomise_bn(module):
  """Random batch-norm affine and running statistics, so inference BN is not the identity."""
  g = torch.Generator().manual_seed(0)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      m.weight.data = 0.5 + torch.rand(n, generator=g)
      m.bias.data = 0.1 * torch.randn(n, generator=g)
      m.running_mean.data = 0.1 * torch.randn(n, generator=g)
      m.running_var.data = 0.5 + torch.rand(n, generator=g)


def _official_files(folder, encoder, channels):
  """Writes ckpt/{encoder}_latent_vgg16.pth.tar and ckpt/{encoder}_latest_vgg16_tuned.pth as the
  official package loads them, and returns the package's ELatentLPIPS built from them."""
  from elatentlpips.vgg16 import LatentVGG16BN
  torch.manual_seed(0)
  trunk = LatentVGG16BN(channels)
  _randomise_bn(trunk)
  ckpt = os.path.join(folder, "ckpt")
  os.makedirs(ckpt, exist_ok=True)
  state = {"module." + k: v for k, v in trunk.state_dict().items()}  # DataParallel-saved
  torch.save({"state_dict": state, "best_acc1": 70.0, "arch": "vgg16_bn"},
             os.path.join(ckpt, f"{encoder}_latent_vgg16.pth.tar"))
  cwd = os.getcwd()
  os.chdir(folder)  # the package reads ./ckpt
  try:
    # pretrained=False: heads random; pnet_rand=False: trunk from ckpt/*_latent_vgg16.pth.tar.
    ref = elatentlpips.ELatentLPIPS(pretrained=False, pnet_rand=False, encoder=encoder,
                                    augment=None, verbose=False).eval()
    torch.save(ref.state_dict(), os.path.join(ckpt, f"{encoder}_latest_vgg16_tuned.pth"))
    # The package loads the tuned file strictly: our file has its exact layout.
    elatentlpips.ELatentLPIPS(pretrained=True, pnet_rand=False, encoder=encoder, augment=None,
                              verbose=False)
  finally:
    os.chdir(cwd)
  return ref


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("elatentlpips"))
  ref = _official_files(folder, "sd15", 4)
  return folder, ref


@pytest.fixture(scope="module")
def sd15_loaded(sd15):
  folder, _ = sd15
  return load_latent_lpips(os.path.join(folder, "ckpt", "sd15_latest_vgg16_tuned.pth"), "sd15")


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _close(ours, ref, rel=1e-4):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  np.testing.assert_allclose(ours, ref, rtol=rel, atol=rel * np.abs(ref).max())


def test_latent_lpips_matches_official_package(sd15, sd15_loaded):
  _, ref = sd15
  module, params = sd15_loaded
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  b = (a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32)

  # Every tap of the trunk (catches a tap or pool in the wrong place that the sum could hide).
  taps = VGG16(module.config.vgg).apply({"params": params["net"]}, jnp.asarray(a))
  with torch.no_grad():
    ref_taps = ref.net(_nchw(a))
  assert [t.shape[1:3] for t in taps] == [(16, 16)] * 3 + [(8, 8), (4, 4)]
  for ours, theirs in zip(taps, ref_taps):
    _close(ours, np.transpose(theirs.numpy(), (0, 2, 3, 1)))

  fn = jax.jit(lambda p, x, y, raw, l1: module.apply({"params": p}, x, y, raw_latents=raw,
                                                     add_l1=l1), static_argnums=(3, 4))
  for raw, l1 in ((False, True), (True, False)):
    with torch.no_grad():
      want = ref(_nchw(a), _nchw(b), normalize=raw, ensembling=False, add_l1_loss=l1)
    got = fn(params, a, b, raw, l1)
    assert got.shape == (2,)
    _close(got, want.numpy().reshape(2))


def test_latent_lpips_gradient_matches_official_package(sd15, sd15_loaded):
  _, ref = sd15
  module, params = sd15_loaded
  rng = np.random.default_rng(1)
  a = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  b = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  grad = jax.grad(lambda x: module.apply({"params": params}, x, b).sum())(jnp.asarray(a))
  ta = _nchw(a).requires_grad_(True)
  ref(ta, _nchw(b), ensembling=False).sum().backward()
  _close(grad, np.transpose(ta.grad.numpy(), (0, 2, 3, 1)))


def test_trunk_file_gives_same_trunk_and_uncalibrated_heads(sd15, sd15_loaded):
  folder, _ = sd15
  _, params = sd15_loaded
  with pytest.warns(RuntimeWarning, match="trunk only"):
    _, trunk_params = load_latent_lpips(os.path.join(folder, "ckpt", "sd15_latent_vgg16.pth.tar"),
                                        "sd15")
  jax.tree.map(np.testing.assert_array_equal, trunk_params["net"], params["net"])
  assert all(np.all(np.asarray(trunk_params[f"lin{k}"]["model_1"]["kernel"]) == 1)
             for k in range(5))


def test_folder_and_safetensors_round_trip(sd15, sd15_loaded, tmp_path):
  folder, _ = sd15
  _, params = sd15_loaded
  _, from_folder = load_latent_lpips(os.path.join(folder, "ckpt"), "sd15")
  jax.tree.map(np.testing.assert_array_equal, from_folder, params)
  out = str(tmp_path / "sd15_elatentlpips.safetensors")
  convert_main(["--encoder", "sd15", "--checkpoint", os.path.join(folder, "ckpt"), "--out", out])
  _, again = load_latent_lpips(out, "sd15")
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_no_weights_warns_loudly():
  with pytest.warns(RuntimeWarning, match=r"RANDOMLY.*huggingface.co/Mingguksky/elatentlpips"):
    module, params = load_latent_lpips(None, "sdxl")
  assert module.config.vgg.in_channels == 4
  with pytest.raises(FileNotFoundError, match="sdxl_latest_vgg16_tuned.pth"):
    load_latent_lpips(os.path.dirname(__file__), "sdxl")  # a folder without weights


def test_bad_checkpoints_name_file_and_keys(sd15, tmp_path):
  folder, ref = sd15
  good = ref.state_dict()

  missing = dict(good)
  del missing["net.slice3.18.running_var"]
  path = str(tmp_path / "missing.pth")
  torch.save(missing, path)
  with pytest.raises(ConversionError, match=r"missing\.pth(.|\n)*net\.slice3\.18\.running_var"
                     r"(.|\n)*sd15_latest_vgg16_tuned"):
    load_latent_lpips(path, "sd15")

  misshaped = dict(good)
  misshaped["lin2.model.1.weight"] = torch.zeros(1, 128, 1, 1)
  misshaped["lins.2.model.1.weight"] = misshaped["lin2.model.1.weight"]
  path = str(tmp_path / "misshaped.pth")
  torch.save(misshaped, path)
  with pytest.raises(ConversionError, match=r"misshaped\.pth(.|\n)*lin2\.model\.1\.weight"):
    load_latent_lpips(path, "sd15")

  # A 16-channel (SD3 / Flux) checkpoint for a 4-channel encoder.
  from elatentlpips.vgg16 import LatentVGG16BN
  sd3 = {"module." + k: v for k, v in LatentVGG16BN(16).state_dict().items()}
  path = str(tmp_path / "sd3_latent_vgg16.pth.tar")
  torch.save({"state_dict": sd3, "best_acc1": 0.0}, path)
  with pytest.raises(ConversionError, match=r"sd3_latent_vgg16\.pth\.tar(.|\n)*16 input channels"
                     r"(.|\n)*sd3(.|\n)*encoder='sdxl' expects 4"):
    load_latent_lpips(path, "sdxl")

  path = str(tmp_path / "not_a_state_dict.pth")
  torch.save([1, 2, 3], path)
  with pytest.raises(ConversionError, match="not_a_state_dict.pth"):
    load_latent_lpips(path, "sd15")


@pytest.fixture(scope="module")
def pixel(tmp_path_factory, monkeypatch_module):
  """lpips.LPIPS(net='vgg') around a random torchvision VGG16 (the package's calibrated heads)."""
  import lpips.pretrained_networks as pn
  torch.manual_seed(1)
  tvm = torchvision.models.vgg16()
  path = str(tmp_path_factory.mktemp("vgg") / "vgg16.pth")
  torch.save(tvm.state_dict(), path)
  monkeypatch_module.setattr(pn.tv, "vgg16", lambda *a, **k: tvm)
  ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  return path, ref


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


def test_pixel_lpips_matches_lpips_package(pixel):
  path, ref = pixel
  module, params = load_pixel_lpips(path)  # heads: the lpips package's own vgg.pth
  rng = np.random.default_rng(2)
  a = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
  got = jax.jit(lambda p, x, y: module.apply({"params": p}, x, y))(params, a, b)
  with torch.no_grad():
    want = ref(_nchw(a), _nchw(b)).numpy().reshape(2)
  _close(got, want)

  # The whole LPIPS module's state dict loads too, to the same params.
  lp_path = os.path.join(os.path.dirname(path), "lpips_module.pth")
  torch.save(ref.state_dict(), lp_path)
  _, again = load_pixel_lpips(lp_path)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_pixel_lpips_bad_trunk(tmp_path):
  sd = torchvision.models.vgg16().state_dict()
  del sd["features.28.bias"]
  path = str(tmp_path / "broken_vgg16.pth")
  torch.save(sd, path)
  with pytest.raises(ConversionError, match=r"broken_vgg16\.pth(.|\n)*features\.28\.bias"):
    load_pixel_lpips(path)


def _count(module):
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(module)))


@pytest.mark.parametrize("encoder,channels", [("sd15", 4), ("sd3", 16)])
def test_param_count_matches_official(encoder, channels):
  from elatentlpips.vgg16 import LatentVGG16BN
  trunk = LatentVGG16BN(channels).model.features
  heads = [elatentlpips.elatentlpips.NetLinLayer(c) for c in (64, 128, 256, 512, 512)]
  n_torch = sum(p.numel() for m in [trunk, *heads] for p in m.parameters())
  n_stats = sum(b.numel() for n, b in trunk.named_buffers() if "running" in n)
  ours = _count(LPIPS(LPIPSConfig.latent(encoder)))
  assert ours == n_torch + n_stats  # BN running statistics are frozen params here
  assert ours == (14_733_632 if channels == 4 else 14_740_544)


def test_param_count_pixel_matches_lpips():
  torch.manual_seed(0)
  ref = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
  n_torch = sum(p.numel() for p in ref.parameters())
  assert _count(LPIPS(LPIPSConfig.pixel())) == n_torch == 14_716_160
