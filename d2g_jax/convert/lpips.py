"""E-LatentLPIPS and pixel-LPIPS weights (PyTorch pickles) -> Flax params of `latent_vgg.LPIPS`.

Sources understood:
  * `{encoder}_latest_vgg16_tuned.pth`: the official E-LatentLPIPS module state dict (trunk
    `net.slice{k}.{i}.*` and heads `lin{k}.model.1.weight`; the aliased `lins.{k}.*` copies are
    checked and skipped). Everything the loss needs.
  * `{encoder}_latent_vgg16.pth.tar`: the official latent VGG16-BN classifier checkpoint
    (`{"state_dict": {"[module.]model.features.{i}.*", "model.classifier.*"}, "best_acc1": ...}`):
    the trunk only; heads stay at their uncalibrated initialisation (with a warning).
  * torchvision `vgg16()` state dicts (`features.{i}.*`, e.g. `vgg16-397923af.pth`) and the `lpips`
    package's head files (`weights/v0.1/vgg.pth`, `lin{k}.model.1.weight`) for pixel LPIPS.
  * `.safetensors` written by `save_lpips` (the module layout, readable without torch; its
    metadata names the encoder and the trunk widths, so a narrow trained trunk loads too).
Pickles are read with `torch.load(weights_only=True)`: a checkpoint cannot run code.

The inverse, for weights trained here (`d2g_jax.latent_lpips.pretrain*`), uses the same tables:
`export_official` writes `{encoder}_latest_vgg16_tuned.pth` and `export_classifier`
`{encoder}_latent_vgg16.pth.tar`, the files the official `elatentlpips` package loads from
`./ckpt/` (the classifier file loads there strictly only with torchvision's head: head "vgg",
hidden 4096, 1000 classes).

Weights: https://huggingface.co/Mingguksky/elatentlpips/tree/main/elatentlpips_ckpt (E-LatentLPIPS,
CC BY-NC), https://download.pytorch.org/models/vgg16-397923af.pth (torchvision VGG16).

CLI: python -m d2g_jax.convert.lpips --encoder sd15 --checkpoint ckpt/sd15_latest_vgg16_tuned.pth \
       --out weights/sd15_elatentlpips.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.convert.core import (
  CONV,
  IDENTITY,
  LINEAR,
  ConversionError,
  Entry,
  Table,
  TensorSource,
  from_state_dict,
  open_weights,
  save_safetensors,
  to_flax,
  to_torch,
)
from d2g_jax.files import atomic_write
from d2g_jax.models.latent_vgg import (
  ENCODERS,
  LPIPS,
  WIDTHS,
  LPIPSConfig,
  VGGConfig,
  conv_layers,
  init_params,
  param_shapes,
)

ELATENTLPIPS_URL = "https://huggingface.co/Mingguksky/elatentlpips/tree/main/elatentlpips_ckpt"
TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

KeyOf = Callable[[int, int], str]  # (block, features index) -> PyTorch module prefix
TUNED_FILE = "{encoder}_latest_vgg16_tuned.pth"      # official: trunk + calibrated heads
TRUNK_FILE = "{encoder}_latent_vgg16.pth.tar"        # official: the latent VGG16-BN classifier
OURS_FILE = "{encoder}_elatentlpips.safetensors"     # save_lpips, module layout


def module_key(block: int, index: int) -> str:
  """E-LatentLPIPS / LPIPS module layout: `net.slice{k}.{i}`."""
  return f"net.slice{block + 1}.{index}"


def features_key(prefix: str) -> KeyOf:
  """torchvision layout: `{prefix}features.{i}` (prefix `model.` in the latent classifier)."""
  return lambda block, index: f"{prefix}features.{index}"


# ------------------------------------------------------------------ tables
def trunk_table(cfg: VGGConfig, key_of: KeyOf = module_key) -> Table:
  """Flax `net` subtree path -> PyTorch key, for every trunk tensor."""
  table: Table = {}
  for layer in conv_layers(cfg):
    conv, torch_conv = f"slice{layer.block + 1}_{layer.index}", key_of(layer.block, layer.index)
    table[(conv, "kernel")] = Entry(f"{torch_conv}.weight", CONV)
    table[(conv, "bias")] = Entry(f"{torch_conv}.bias", IDENTITY)
    if cfg.batch_norm:
      bn = f"slice{layer.block + 1}_{layer.index + 1}"
      torch_bn = key_of(layer.block, layer.index + 1)
      for leaf, torch_leaf in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                               ("var", "running_var")):
        table[(bn, leaf)] = Entry(f"{torch_bn}.{torch_leaf}", IDENTITY)
  return table


def heads_table() -> Table:
  """Flax head path -> PyTorch key (`lin{k}.model.1.weight`, a 1x1 conv)."""
  return {(f"lin{k}", "model_1", "kernel"): Entry(f"lin{k}.model.1.weight", CONV)
          for k in range(len(WIDTHS))}


def lpips_table(cfg: LPIPSConfig) -> Table:
  """The whole module: `net/...` and `lin{k}/...`, in the official module layout."""
  table = {("net",) + path: entry for path, entry in trunk_table(cfg.vgg).items()}
  table.update(heads_table())
  return table


def classifier_table(cfg: VGGConfig, head: str) -> Table:
  """`LatentVGGClassifier` params -> the official classifier checkpoint's keys
  (`model.features.{i}.*`, and torchvision's `model.classifier.{0,3,6}.*` for head "vgg";
  `model.classifier.*` for the small "linear" head)."""
  table = {("net",) + path: entry
           for path, entry in trunk_table(cfg, features_key("model.")).items()}
  names = {"vgg": ("classifier_0", "classifier_3", "classifier_6"), "linear": ("classifier",)}[head]
  for name in names:
    torch_name = "model." + name.replace("_", ".")
    table[(name, "kernel")] = Entry(f"{torch_name}.weight", LINEAR)
    table[(name, "bias")] = Entry(f"{torch_name}.bias", IDENTITY)
  return table


# ------------------------------------------------------------------ reading
def read_checkpoint(path: str, what: str = "LPIPS weights") -> dict[str, Any]:
  """A PyTorch pickle's top-level object (weights only), or the tensors of a `.safetensors` file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file {path!r} does not exist")
  if path.endswith(".safetensors"):
    folder, name = os.path.split(os.path.abspath(path))
    source = open_weights(folder, name[: -len(".safetensors")])
    return {k: source.get(k) for k in source.keys()}
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"{path} is a PyTorch pickle; reading it needs torch "
                          "(pip install 'd2g_jax[torch]'), or convert it to safetensors "
                          "elsewhere with `python -m d2g_jax.convert.lpips`.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - pickle errors come in many types
    raise ConversionError(f"cannot read {path} as a weights-only PyTorch checkpoint: {e}") from e
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, expected a state dict")
  return obj


def _trunk_state(obj: dict[str, Any], path: str) -> dict[str, Any]:
  """The state dict of a latent-VGG classifier checkpoint, `module.` prefixes removed."""
  state = obj["state_dict"]
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: 'state_dict' is a {type(state).__name__}, expected a dict")
  return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _convert(table: Table, shapes: Any, source: TensorSource, skip: Callable[[str], bool],
             hint: str):
  ignore = [k for k in source.keys() if skip(k)]
  return to_flax(table, shapes, source, ignore=ignore, hint=hint)


def _latent_hint(encoder: str) -> str:
  return (f"Expected an official E-LatentLPIPS file for encoder {encoder!r} "
          f"({encoder}_latest_vgg16_tuned.pth or {encoder}_latent_vgg16.pth.tar, unmodified; "
          f"{ELATENTLPIPS_URL}) or a .safetensors written by save_lpips.")


PIXEL_HINT = ("Expected a torchvision vgg16() state dict (features.{i}.*, e.g. "
              f"{TORCHVISION_VGG16_URL}), an lpips.LPIPS(net='vgg') state dict, or the lpips "
              "package's weights/v0.1/vgg.pth heads.")


def _check_in_channels(source: TensorSource, key: str, cfg: LPIPSConfig, path: str):
  """A clear error when a checkpoint belongs to another encoder family (4 vs 16 channels)."""
  if key not in source.keys():
    return  # reported with every other missing key by to_flax
  shape = source.shape(key)
  want = cfg.vgg.in_channels
  if len(shape) == 4 and shape[1] != want:
    fams = sorted(n for n, (c, _, _) in ENCODERS.items() if c == shape[1]) or ["none known"]
    what = f"encoder={cfg.encoder!r}" if cfg.encoder else "pixel LPIPS"
    raise ConversionError(
        f"checkpoint {path}: first convolution {key} takes {shape[1]} input channels "
        f"(latents of {', '.join(fams)}), but {what} expects {want}. Pass the checkpoint of "
        f"the matching encoder, or the encoder that this checkpoint was trained for.")


def _check_aliases(source: TensorSource, path: str):
  """`lins.{k}` is the same tensor as `lin{k}` in the official module: make sure."""
  for k in range(len(WIDTHS)):
    alias, key = f"lins.{k}.model.1.weight", f"lin{k}.model.1.weight"
    if alias in source.keys() and key in source.keys():
      if not np.array_equal(source.get(alias), source.get(key)):
        raise ConversionError(f"checkpoint {path}: {alias} differs from {key}; they should be "
                              "the same head. The file is not an E-LatentLPIPS module state dict.")


def _is_extra(key: str) -> bool:
  """Tensors in official files that the distance does not use."""
  return (key.endswith("num_batches_tracked") or key.startswith("lins.")
          or key.startswith("scaling_layer.") or "classifier." in key)


def _random(module: LPIPS, trunk: bool = True) -> dict[str, Any]:
  """Initial params as numpy; without `trunk`, only the heads (all ones, no init pass needed)."""
  if trunk:
    return init_params(module)
  return {f"lin{k}": {"model_1": {"kernel": np.ones((1, 1, w, 1), np.float32)}}
          for k, w in enumerate(module.config.vgg.widths)}


def safetensors_metadata(path: str) -> dict[str, str]:
  """The string metadata of a `.safetensors` file ({} when it has none)."""
  from safetensors import safe_open
  try:
    with safe_open(path, "np") as fh:
      return dict(fh.metadata() or {})
  except Exception as e:  # safetensors raises its own error types
    raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e


def _file_widths(path: str, encoder: str) -> tuple[int, ...]:
  """Trunk widths recorded by `save_lpips` (VGG16's for files without them); checks the
  recorded encoder."""
  if not path.endswith(".safetensors"):
    return WIDTHS
  meta = safetensors_metadata(path)
  if meta.get("encoder", encoder) != encoder:
    raise ConversionError(f"{path} holds E-LatentLPIPS weights for encoder "
                          f"{meta['encoder']!r}, not {encoder!r}; set the loss's encoder to "
                          f"{meta['encoder']!r} or pass the weights of {encoder!r}.")
  try:
    return tuple(int(w) for w in meta["widths"].split(",")) if "widths" in meta else WIDTHS
  except ValueError:
    raise ConversionError(f"{path}: metadata widths={meta['widths']!r} is not a comma-separated "
                          "list of integers") from None


def _warn(message: str):
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def _as_jax(tree, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


# ------------------------------------------------------------ entry points
def find_weights(path: str, encoder: str) -> str:
  """`path` itself, or in a folder the first of {encoder}_latest_vgg16_tuned.pth,
  {encoder}_elatentlpips.safetensors, {encoder}_latent_vgg16.pth.tar."""
  if not os.path.isdir(path):
    return path
  names = [n.format(encoder=encoder) for n in (TUNED_FILE, OURS_FILE, TRUNK_FILE)]
  found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
  if not found:
    raise FileNotFoundError(f"no E-LatentLPIPS weights for encoder {encoder!r} in {path!r}: "
                            f"looked for {', '.join(names)}. Download them from "
                            f"{ELATENTLPIPS_URL}, or train them (latent_vgg_train and "
                            "latent_vgg_calibrate stages).")
  return found[0]


def load_latent_lpips(path: str | None, encoder: str = "sd15", *, augment: str | None = "bg",
                      augment_p: float = 1.0, l1: bool = True, dtype=jnp.float32,
                      param_dtype=jnp.float32) -> tuple[LPIPS, Any]:
  """(module, params) of E-LatentLPIPS for `encoder` (sd15, sd21, sdxl, sd3, flux).

  `path`: `{encoder}_latest_vgg16_tuned.pth` (trunk and heads), `{encoder}_latent_vgg16.pth.tar`
  (trunk only), a `.safetensors` from `save_lpips` (e.g. the `latent_vgg_calibrate` stage's
  `{encoder}_elatentlpips.safetensors`), a folder holding one of those, or None (random
  initialisation; warns). `module.apply({"params": params}, a, b)` gives per-sample
  distances of NHWC latents; `losses.perceptual.make_loss("e_latent_lpips", module=...)` adds
  the ensemble's augmentation.
  """
  if path is not None:
    path = find_weights(path, encoder)
  widths = WIDTHS if path is None or not os.path.isfile(path) else _file_widths(path, encoder)
  cfg = LPIPSConfig.latent(encoder, augment=augment, l1=l1, augment_p=augment_p, widths=widths)
  module = LPIPS(cfg, dtype=dtype, param_dtype=param_dtype)
  shapes = param_shapes(module)
  if path is None:
    _warn(f"E-LatentLPIPS ({encoder}): no weights given, so the VGG trunk is RANDOMLY initialised "
          f"and the heads are uncalibrated (all ones): the loss runs, but it is not the paper's "
          f"E-LatentLPIPS. Download {encoder}_latest_vgg16_tuned.pth from {ELATENTLPIPS_URL} "
          f"and pass its path.")
    return module, _as_jax(_random(module), param_dtype)
  obj = read_checkpoint(path)
  if "state_dict" in obj:  # the latent VGG16-BN classifier: trunk only
    source = from_state_dict(_trunk_state(obj, path), path)
    _check_in_channels(source, "model.features.0.weight", cfg, path)
    params = _random(module, trunk=False)
    params["net"] = _convert(trunk_table(cfg.vgg, features_key("model.")), shapes["net"], source,
                             _is_extra, _latent_hint(encoder))
    _warn(f"E-LatentLPIPS ({encoder}): {path} holds the VGG trunk only; the LPIPS heads are "
          f"uncalibrated (all ones). For the calibrated loss load "
          f"{encoder}_latest_vgg16_tuned.pth from {ELATENTLPIPS_URL}.")
  else:
    source = from_state_dict(obj, path)
    _check_in_channels(source, "net.slice1.0.weight", cfg, path)
    _check_aliases(source, path)
    params = _convert(lpips_table(cfg), shapes, source, _is_extra, _latent_hint(encoder))
  return module, _as_jax(params, param_dtype)


def default_lpips_heads() -> str | None:
  """The `lpips` package's calibrated VGG heads (`lpips/weights/v0.1/vgg.pth`), if installed."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
  return path if os.path.isfile(path) else None


def load_pixel_lpips(vgg_path: str | None = None, lin_path: str | None = "default", *,
                     dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[LPIPS, Any]:
  """(module, params) of pixel LPIPS-VGG (v0.1) on RGB in [-1, 1], as the `lpips` package.

  `vgg_path`: a torchvision `vgg16()` state dict (`features.{i}.*`, e.g. vgg16-397923af.pth), an
  `lpips.LPIPS(net="vgg")` module state dict, a `.safetensors` from `save_lpips`, or None
  (random trunk; warns). `lin_path`: the heads file; "default" takes the one shipped with the
  `lpips` package, None keeps uncalibrated heads (warns). Heads inside `vgg_path` win.
  """
  cfg = LPIPSConfig.pixel()
  module = LPIPS(cfg, dtype=dtype, param_dtype=param_dtype)
  shapes = param_shapes(module)
  params = _random(module, trunk=vgg_path is None)
  heads_done = False
  if vgg_path is None:
    _warn("pixel LPIPS: no VGG16 weights given, so the trunk is RANDOMLY initialised: the loss "
          f"runs but is not LPIPS. Download torchvision's VGG16 ({TORCHVISION_VGG16_URL}) and pass "
          "it as vgg_path.")
  else:
    source = from_state_dict(read_checkpoint(vgg_path), vgg_path)
    if "net.slice1.0.weight" in source.keys():  # a whole LPIPS module
      _check_in_channels(source, "net.slice1.0.weight", cfg, vgg_path)
      _check_aliases(source, vgg_path)
      params = _convert(lpips_table(cfg), shapes, source, _is_extra, PIXEL_HINT)
      heads_done = True
    else:
      _check_in_channels(source, "features.0.weight", cfg, vgg_path)
      params["net"] = _convert(trunk_table(cfg.vgg, features_key("")), shapes["net"], source,
                               _is_extra, PIXEL_HINT)
  if not heads_done:
    if lin_path == "default":
      lin_path = default_lpips_heads()
    if lin_path is None:
      _warn("pixel LPIPS: no calibrated heads (lpips/weights/v0.1/vgg.pth) found; the heads are "
            "all ones (uncalibrated). Install `lpips` or pass lin_path.")
    else:
      source = from_state_dict(read_checkpoint(lin_path), lin_path)
      heads = _convert(heads_table(), {k: v for k, v in shapes.items() if k != "net"}, source,
                       lambda k: False, PIXEL_HINT)
      params.update(heads)
  return module, _as_jax(params, param_dtype)


def save_lpips(module: LPIPS, params: Any, path: str):
  """Writes params as `.safetensors` in the official module layout (loadable without torch);
  the metadata records the encoder and the trunk widths."""
  cfg = module.config
  state = to_torch(lpips_table(cfg), jax.tree.map(np.asarray, params), dtype=np.float32)
  save_safetensors(state, path, metadata={
      "format": "pt", "encoder": cfg.encoder or "pixel",
      "widths": ",".join(str(w) for w in cfg.vgg.widths)})


# ------------------------------------------------------------ official export
def _check_official(cfg: VGGConfig, encoder: str | None, what: str):
  if encoder not in ENCODERS:
    raise ConversionError(f"{what}: the official layout exists for encoders {sorted(ENCODERS)}, "
                          f"not {encoder!r}")
  if tuple(cfg.widths) != WIDTHS or not cfg.batch_norm:
    raise ConversionError(f"{what}: the official layout is VGG16-BN with widths {WIDTHS}; this "
                          f"trunk has widths {tuple(cfg.widths)}. Keep it in the safetensors "
                          "layout (save_lpips), which d2g_jax loads.")


def _bn_counters(cfg: VGGConfig, key_of: KeyOf, count: int) -> dict[str, np.ndarray]:
  """`num_batches_tracked` buffers of every batch norm (torch's strict loading wants them)."""
  return {f"{key_of(l.block, l.index + 1)}.num_batches_tracked": np.asarray(count, np.int64)
          for l in conv_layers(cfg)}


def _torch_save(obj: Any, path: str):
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"writing {path} (a PyTorch pickle) needs torch: pip install "
                          "'d2g_jax[torch]'") from e
  as_torch = lambda d: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}
  if "state_dict" in obj:
    obj = {k: as_torch(v) if k == "state_dict" else v for k, v in obj.items()}
  else:
    obj = as_torch(obj)
  atomic_write(path, lambda tmp: torch.save(obj, tmp))


def official_state_dict(module: LPIPS, params: Any, num_batches_tracked: int = 0
                        ) -> dict[str, np.ndarray]:
  """The `elatentlpips.ELatentLPIPS` state dict of `params` (numpy): trunk, heads, the aliased
  `lins.{k}` heads and the batch norms' `num_batches_tracked`."""
  cfg = module.config
  _check_official(cfg.vgg, cfg.encoder, "export_official")
  state = to_torch(lpips_table(cfg), jax.tree.map(np.asarray, params), dtype=np.float32)
  state.update(_bn_counters(cfg.vgg, module_key, num_batches_tracked))
  for k in range(len(WIDTHS)):
    state[f"lins.{k}.model.1.weight"] = state[f"lin{k}.model.1.weight"]
  return state


def export_official(module: LPIPS, params: Any, folder: str, *, num_batches_tracked: int = 0
                    ) -> str:
  """Writes `{folder}/{encoder}_latest_vgg16_tuned.pth` (needs torch); returns its path.

  `elatentlpips.ELatentLPIPS(encoder=..., pretrained=True)` run from the folder above
  `ckpt/` loads it strictly (put it in `<dir>/ckpt/`).
  """
  path = os.path.join(folder, TUNED_FILE.format(encoder=module.config.encoder))
  _torch_save(official_state_dict(module, params, num_batches_tracked), path)
  return path


def export_classifier(module: Any, params: Any, folder: str, encoder: str, *,
                      best_acc1: float, epoch: int, num_batches_tracked: int = 0) -> str:
  """Writes the trained latent VGG16-BN classifier as `{folder}/{encoder}_latent_vgg16.pth.tar`
  (`{"state_dict", "best_acc1", "epoch", "arch"}`, as the official file); needs torch.

  `module` is a `LatentVGGClassifier`, `params` its params with the batch-norm statistics
  merged in (`latent_vgg.merge_batch_stats`). `best_acc1` is in percent, as torchvision's
  ImageNet recipe writes it.
  """
  cfg = module.config
  _check_official(cfg, encoder, "export_classifier")
  state = to_torch(classifier_table(cfg, module.head), jax.tree.map(np.asarray, params),
                   dtype=np.float32)
  state.update(_bn_counters(cfg, features_key("model."), num_batches_tracked))
  path = os.path.join(folder, TRUNK_FILE.format(encoder=encoder))
  _torch_save({"state_dict": state, "best_acc1": float(best_acc1), "epoch": int(epoch),
               "arch": "vgg16_bn"}, path)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(description="Convert E-LatentLPIPS / pixel-LPIPS PyTorch weights to "
                              "safetensors in the module layout that d2g_jax loads without torch.")
  p.add_argument("--encoder", default="sd15",
                 help=f"latent family ({', '.join(ENCODERS)}) or 'pixel' for pixel LPIPS")
  p.add_argument("--checkpoint", help="E-LatentLPIPS file/folder, or torchvision VGG16 (pixel)")
  p.add_argument("--heads", default="default",
                 help="pixel only: lpips heads file ('default': the lpips package's, '': none)")
  p.add_argument("--out", required=True, help="output .safetensors path")
  args = p.parse_args(argv)
  if args.encoder == "pixel":
    module, params = load_pixel_lpips(args.checkpoint, args.heads or None)
  else:
    module, params = load_latent_lpips(args.checkpoint, args.encoder)
  save_lpips(module, params, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
