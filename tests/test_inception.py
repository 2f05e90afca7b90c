"""The Flax FID Inception against pytorch-fid's network with the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_utils import assert_close_to_scale, nchw

from d2g_jax.convert import core
from d2g_jax.convert import inception as convert


def random_fid_state_dict(seed: int = 0) -> dict:
  """A state dict of pytorch-fid's FID Inception layout, random but well scaled: conv
  weights ~ He-normal, batch-norm statistics and affine terms random."""
  from pytorch_fid import inception as pf
  torch.manual_seed(seed)
  net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
  state = net.state_dict()
  g = torch.Generator().manual_seed(seed)
  for k, v in state.items():
    if k.endswith("conv.weight"):
      fan_in = v[0].numel()
      state[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    elif k.endswith("bn.running_mean") or k.endswith("bn.bias"):
      state[k] = 0.1 * torch.randn(v.shape, generator=g)
    elif k.endswith("bn.running_var") or k.endswith("bn.weight"):
      state[k] = 0.5 + torch.rand(v.shape, generator=g)
  return state


@pytest.fixture(scope="module")
def fid_state():
  return random_fid_state_dict()


def reference_network(state, monkeypatch):
  """pytorch-fid's InceptionV3 (pool3 block), built as it builds itself, its weight download
  replaced by `state`."""
  from pytorch_fid import inception as pf
  monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: state)
  return pf.InceptionV3([3], resize_input=False, normalize_input=True,
                        use_fid_inception=True).eval()


def test_features_match_pytorch_fid(fid_state, monkeypatch, tmp_path):
  ref = reference_network(fid_state, monkeypatch)
  images = np.random.default_rng(1).uniform(0, 255, (2, 99, 107, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(nchw(images / 255.0)))[0][:, :, 0, 0].numpy()
  # Through a file, as a user loads it: the .pth pickle pytorch-fid publishes.
  path = str(tmp_path / "pt_inception.pth")
  torch.save(fid_state, path)
  module, params = convert.load_inception(path, normalize="pytorch_fid")
  got = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(images))
  assert got.shape == (2, 2048)
  assert_close_to_scale(got, want)
  # clean-fid's input scaling ("clean", (x - 128) / 128) is checked against clean-fid's own
  # pipeline in test_fid.py::test_folder_features_match_clean_fid.


def test_table_is_strict_and_round_trips(fid_state, tmp_path):
  params = convert.params_from_state_dict(fid_state)
  n = sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params))
  fc = sum(fid_state[k].numel() for k in convert.CLASSIFIER)
  tracked = sum(1 for k in fid_state if k.endswith("num_batches_tracked"))
  assert n == sum(v.numel() for v in fid_state.values()) - fc - tracked
  path = str(tmp_path / "fid.safetensors")
  convert.save_inception(params, path)
  _, again = convert.load_inception(path)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  broken = dict(fid_state)
  del broken["Mixed_6b.branch7x7_2.conv.weight"]
  with pytest.raises(core.ConversionError, match="Mixed_6b.branch7x7_2.conv.weight"):
    convert.params_from_state_dict(broken)
  imagenet = dict(fid_state, **{"fc.weight": torch.zeros(1000, 2048)})
  with pytest.raises(core.ConversionError, match="torchvision's ImageNet Inception"):
    convert.params_from_state_dict(imagenet)
  with pytest.raises(FileNotFoundError, match="pt_inception"):
    convert.load_inception("")
