"""`python -m d2g_jax.convert`: diffusers folder -> Orbax -> diffusers folder, bit-exact."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from safetensors.numpy import load_file
from test_unet import make_diffusers_unet

from d2g_jax.convert import orbax_io


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "d2g_jax.convert", *args], check=True,
                        capture_output=True, text=True)


def test_cli_round_trip_bit_identical(tmp_path):
  src, ck, dst = (str(tmp_path / n) for n in ("src", "ck", "dst"))
  make_diffusers_unet("tiny_sdxl", src)
  run_cli("to-orbax", "--diffusers", src, "--orbax", ck)
  params, component, config = orbax_io.load(ck)
  assert component == "unet" and config["addition_embed_type"] == "text_time"
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
  run_cli("to-diffusers", "--orbax", ck, "--diffusers", dst)
  a = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  b = load_file(os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  _, info = UNet2DConditionModel.from_pretrained(dst, output_loading_info=True)
  assert not any(info.values()), info


def test_cli_refuses_to_overwrite_and_explains_bad_paths(tmp_path):
  src, ck = str(tmp_path / "src"), str(tmp_path / "ck")
  make_diffusers_unet("tiny_sd15", src)
  run_cli("to-orbax", "--diffusers", src, "--orbax", ck)
  with pytest.raises(subprocess.CalledProcessError) as e:
    run_cli("to-orbax", "--diffusers", src, "--orbax", ck)
  assert "already exists" in e.value.stderr
  with pytest.raises(subprocess.CalledProcessError) as e:
    run_cli("to-diffusers", "--orbax", src, "--diffusers", str(tmp_path / "x"))
  assert "not a d2g_jax Orbax checkpoint" in e.value.stderr


@pytest.mark.slow
def test_full_sd15_conversion_peak_memory(tmp_path):
  """Real SD 1.5 size (3.4 GB fp32): each direction peaks at <= ~2x the weights."""
  subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                               "convert_memory.py"), "--workdir", str(tmp_path),
                  "--max-ratio", "2.2"], check=True)
