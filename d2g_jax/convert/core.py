"""Table-driven, strict conversion between PyTorch state dicts and Flax params.

A *table* maps every Flax parameter path to one PyTorch key and a *hook* that
says how the tensor's layout differs (conv OIHW <-> HWIO, linear transpose, or
nothing). The same table drives both directions, so import and export cannot
drift apart. Conversion is strict: every tensor in the source is consumed, every
shape is checked, and any mismatch raises `ConversionError` naming the file and
listing the missing, unexpected and mis-shaped keys.

Tensors are read one at a time (safetensors is memory-mapped), so peak host memory
while loading stays close to one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from flax import traverse_util

from d2g_jax.files import atomic_write, load_json, save_json  # noqa: F401  (re-exported)

Path = tuple[str, ...]


class ConversionError(ValueError):
  """A checkpoint does not match the model it is being loaded into."""


# --------------------------------------------------------------------- hooks
@dataclasses.dataclass(frozen=True)
class Hook:
  """How one tensor's layout differs between PyTorch and Flax."""
  name: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]

  def flax_shape(self, torch_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(self.to_flax(np.empty(torch_shape, np.int8)).shape)


IDENTITY = Hook("identity", lambda x: x, lambda x: x)
# nn.Linear weight (out, in) <-> Dense kernel (in, out).
LINEAR = Hook("linear", lambda x: np.ascontiguousarray(x.T),
              lambda x: np.ascontiguousarray(x.T))
# nn.Conv2d weight (O, I, H, W) <-> Conv kernel (H, W, I, O).
CONV = Hook("conv", lambda x: np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
            lambda x: np.ascontiguousarray(x.transpose(3, 2, 0, 1)))


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  hook: Hook = IDENTITY


Table = dict[Path, Entry]

# Flax leaf name -> PyTorch leaf name. `kernel` takes its hook from its rank.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "embedding": "weight"}


def default_leaf(path: Path, ndim: int,
                 leaves: Mapping[str, str] | None = None) -> tuple[str, Hook]:
  """Torch leaf name and hook of a Flax leaf, decided by its name and rank.

  `leaves` adds Flax leaf name -> PyTorch leaf name pairs copied as they are (e.g.
  batch-norm statistics `mean` -> `running_mean`, CLIP's `class_embedding`).
  """
  leaf = path[-1]
  if leaves and leaf in leaves:
    return leaves[leaf], IDENTITY
  if leaf not in _LEAF_NAMES:
    raise ConversionError(f"no conversion rule for parameter {'/'.join(path)}")
  if leaf == "kernel":
    hook = {2: LINEAR, 4: CONV}.get(ndim)
    if hook is None:
      raise ConversionError(f"kernel {'/'.join(path)} has rank {ndim}; expected 2 or 4")
    return "weight", hook
  return _LEAF_NAMES[leaf], IDENTITY


def module_table(shapes: Any, list_names: Iterable[str],
                 rename: Mapping[str, str] | None = None,
                 leaves: Mapping[str, str] | None = None) -> Table:
  """The table for a Flax tree whose module names mirror PyTorch's.

  Flax names list members `<name>_<i>`; PyTorch names them `<name>.<i>`. Only the
  names in `list_names` (e.g. `down_blocks`, `resnets`) are split this way, so a
  module called `linear_1` keeps its name. `rename` maps a whole Flax component to
  a different PyTorch component when the two genuinely differ. `leaves`: extra leaf
  names, see `default_leaf`.
  """
  list_re = re.compile(r"^(%s)_(\d+)$" % "|".join(map(re.escape, sorted(list_names))))
  rename = dict(rename or {})
  table: Table = {}
  for path, leaf in traverse_util.flatten_dict(_unfreeze(shapes)).items():
    leaf_name, hook = default_leaf(path, len(leaf.shape), leaves)
    parts = []
    for comp in path[:-1]:
      comp = rename.get(comp, comp)
      m = list_re.match(comp)
      parts.append(f"{m.group(1)}.{m.group(2)}" if m else comp)
    table[path] = Entry(".".join(parts + [leaf_name]), hook)
  return table


def _unfreeze(tree):
  return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


# ------------------------------------------------------------ tensor sources
class TensorSource:
  """Read-only access to the tensors of a checkpoint, one tensor at a time."""

  def __init__(self, description: str, shapes: Mapping[str, tuple[int, ...]],
               read: Callable[[str], np.ndarray]):
    self.description = description
    self._shapes = dict(shapes)
    self._read = read

  def keys(self) -> list[str]:
    return list(self._shapes)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def get(self, key: str) -> np.ndarray:
    return self._read(key)

  def __len__(self) -> int:
    return len(self._shapes)


def from_state_dict(state: Mapping[str, Any], description: str = "state dict") -> TensorSource:
  """A source over an in-memory mapping of numpy arrays or torch tensors."""
  arrays = {k: _to_numpy(v) for k, v in state.items()}
  return TensorSource(description, {k: tuple(v.shape) for k, v in arrays.items()},
                      arrays.__getitem__)


def _to_numpy(x) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if hasattr(x, "detach"):  # torch.Tensor, without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _read_safetensors_header(path: str) -> dict:
  with open(path, "rb") as fh:
    raw = fh.read(8)
    if len(raw) < 8:
      raise ConversionError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(raw, "little")
    if n > os.path.getsize(path) - 8:
      raise ConversionError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
    try:
      header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path} has a corrupt safetensors header: {e}") from e
  header.pop("__metadata__", None)
  data_start, size = 8 + n, os.path.getsize(path)
  for key, info in header.items():
    if data_start + info["data_offsets"][1] > size:
      raise ConversionError(f"{path} is truncated: tensor {key!r} ends past the end of the file")
  return {k: (v, data_start) for k, v in header.items()}


def _safetensors_source(files: Sequence[str], description: str) -> TensorSource:
  """Reads tensors with plain file reads rather than mmap, so pages of tensors already
  converted do not stay resident: peak host memory is the params, not params + file."""
  import ml_dtypes
  dtypes = {v: np.dtype(ml_dtypes.bfloat16 if k == "bfloat16" else k) for k, v in _ST_DTYPES.items()}
  entries, owner = {}, {}
  for f in files:
    for k, info in _read_safetensors_header(f).items():
      if k in owner:
        raise ConversionError(f"{description}: tensor {k!r} appears in both {owner[k]} and {f}")
      owner[k], entries[k] = f, info

  def read(key):
    (info, start), f = entries[key], owner[key]
    dtype = dtypes[info["dtype"]]
    begin, end = info["data_offsets"]
    with open(f, "rb") as fh:
      fh.seek(start + begin)
      arr = np.fromfile(fh, dtype=dtype, count=(end - begin) // dtype.itemsize)
    return arr.reshape(info["shape"])

  return TensorSource(description, {k: tuple(v[0]["shape"]) for k, v in entries.items()}, read)


def _torch_bin_source(files: Sequence[str], description: str) -> TensorSource:
  try:
    import torch
  except ImportError as e:
    raise ConversionError(
        f"{description} is a PyTorch pickle (.bin); reading it needs torch. "
        "Install the conversion extra: pip install 'd2g_jax[torch]', or convert the "
        "folder to safetensors first.") from e
  state = {}
  for f in files:
    # weights_only=True: a checkpoint cannot run code while it is read.
    part = torch.load(f, map_location="cpu", weights_only=True)
    state.update(part.get("state_dict", part) if isinstance(part, dict) else part)
  return from_state_dict(state, description)


# Stems whose PyTorch-pickle files are named differently from their safetensors files.
_BIN_STEMS = {"model": "pytorch_model"}


def weight_files(folder: str, stem: str, variant: str | None = None) -> tuple[list[str], str]:
  """(files, description) of the weights `open_weights` would read, without reading them:
  `<stem>[.<variant>].safetensors`, its sharded index form, or `.bin` (see there)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder!r} does not exist")
  variants = [variant] if variant else [None, "fp16"]
  tried = []
  for var in variants:
    name = stem if var is None else f"{stem}.{var}"
    for ext in (".safetensors", ".bin"):
      if ext == ".bin" and stem in _BIN_STEMS:  # transformers: model.safetensors, pytorch_model.bin
        name = _BIN_STEMS[stem] + ("" if var is None else f".{var}")
      single = os.path.join(folder, name + ext)
      index = single + ".index.json"
      tried += [single, index]
      if os.path.isfile(single):
        return [single], single
      if os.path.isfile(index):
        with open(index) as fh:
          weight_map = json.load(fh)["weight_map"]
        files = sorted({os.path.join(folder, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
          raise ConversionError(f"{index} lists shard files that do not exist: {missing}")
        return files, index
  raise FileNotFoundError(
      f"no weights in {folder!r}: looked for " + ", ".join(os.path.basename(t) for t in tried))


def open_weights(folder: str, stem: str, variant: str | None = None) -> TensorSource:
  """Opens `<stem>[.<variant>].safetensors`, its sharded index form, or `.bin`.

  `stem` is e.g. `diffusion_pytorch_model` (diffusers) or `model` (transformers).
  Looks for safetensors first, then PyTorch pickles; with `variant=None` the plain
  files are preferred and a `fp16` variant is used when it is the only one there.
  """
  files, description = weight_files(folder, stem, variant)
  opener = _safetensors_source if files[0].endswith(".safetensors") else _torch_bin_source
  return opener(files, description)


# ---------------------------------------------------------------- converting
def _report(source: str, missing, unexpected, misshaped,
            hint: str | None = None) -> ConversionError:
  lines = [f"checkpoint {source} does not match the model:"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): {sorted(missing)}")
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
  if misshaped:
    lines.append(f"  mis-shaped keys ({len(misshaped)}): " + ", ".join(
        f"{k} (checkpoint {got}, model expects {want})" for k, got, want in sorted(misshaped)))
  lines.append(hint or "Check that config.json belongs to these weights.")
  return ConversionError("\n".join(lines))


def check_table(table: Table, shapes: Any, source: TensorSource, ignore: Iterable[str] = (),
                hint: str | None = None):
  """Raises ConversionError unless `source` holds exactly the tensors of `table`.

  `hint`: the last line of the error, what to do (default: check config.json).
  """
  flat = traverse_util.flatten_dict(_unfreeze(shapes))
  ignore = set(ignore)
  expected = {e.torch_key: p for p, e in table.items()}
  present = set(source.keys()) - ignore
  missing = set(expected) - present
  unexpected = present - set(expected)
  misshaped = []
  for key in set(expected) & present:
    path = expected[key]
    want = tuple(flat[path].shape)
    got = table[path].hook.flax_shape(source.shape(key))
    if got != want:
      misshaped.append((key, tuple(source.shape(key)), table[path].hook.to_torch(
          np.empty(want, np.int8)).shape))
  if missing or unexpected or misshaped:
    raise _report(source.description, missing, unexpected, misshaped, hint)


def to_flax(table: Table, shapes: Any, source: TensorSource, *, dtype=np.float32,
            ignore: Iterable[str] = (), progress: Callable[[Iterator], Iterator] | None = None,
            hint: str | None = None, place: Callable[[np.ndarray], Any] | None = None):
  """Builds Flax params (numpy, `dtype`) from `source`, strictly, one tensor at a time.

  `place` (e.g. `jax.device_put`, or a sharded put) is applied to each tensor as soon as
  it is read, so the host never holds a numpy copy of the whole tree.
  """
  check_table(table, shapes, source, ignore, hint)
  items = list(table.items())
  it = progress(iter(items)) if progress else items
  flat = {}
  for path, entry in it:
    x = np.asarray(entry.hook.to_flax(source.get(entry.torch_key)), dtype=dtype)
    flat[path] = place(x) if place else x
  return traverse_util.unflatten_dict(flat)


def to_torch(table: Table, params: Any, *, dtype=None,
             progress: Callable[[Iterator], Iterator] | None = None) -> dict[str, np.ndarray]:
  """The PyTorch state dict (numpy arrays) of `params`; keys in table order."""
  flat = traverse_util.flatten_dict(_unfreeze(params))
  if set(flat) != set(table):
    extra, lost = set(flat) - set(table), set(table) - set(flat)
    raise ConversionError(f"params do not match the conversion table: extra {sorted(extra)[:10]}, "
                          f"missing {sorted(lost)[:10]}")
  out = {}
  items = list(table.items())
  for path, entry in (progress(iter(items)) if progress else items):
    x = np.asarray(flat[path])
    out[entry.torch_key] = entry.hook.to_torch(x.astype(dtype) if dtype else x)
  return out


# ---------------------------------------------------------------- writing
def save_safetensors(state: Mapping[str, np.ndarray], path: str, metadata=None):
  from safetensors.numpy import save_file
  atomic_write(path, lambda tmp: save_file(dict(state), tmp, metadata=metadata or {"format": "pt"}))


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}


def save_params_safetensors(table: Table, params: Any, path: str, *, dtype=None,
                            metadata: Mapping[str, str] | None = None,
                            progress: Callable[[Iterator], Iterator] | None = None):
  """Streams `params` to a PyTorch-layout safetensors file, one tensor at a time.

  Unlike building the whole state dict first, host memory stays at the params plus
  one converted tensor. Written atomically (temp file + rename).
  """
  import json as _json
  flat = traverse_util.flatten_dict(_unfreeze(params))
  if set(flat) != set(table):
    extra, lost = set(flat) - set(table), set(table) - set(flat)
    raise ConversionError(f"params do not match the conversion table: extra {sorted(extra)[:10]}, "
                          f"missing {sorted(lost)[:10]}")
  header, offset, order = {}, 0, []
  for path_, entry in table.items():
    x = flat[path_]
    dt = np.dtype(dtype) if dtype is not None else np.dtype(x.dtype)
    shape = entry.hook.to_torch(np.empty(x.shape, np.int8)).shape
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if dt.name not in _ST_DTYPES:
      raise ConversionError(f"cannot write dtype {dt.name} of {entry.torch_key} to safetensors")
    header[entry.torch_key] = {"dtype": _ST_DTYPES[dt.name], "shape": list(shape),
                               "data_offsets": [offset, offset + nbytes]}
    order.append((path_, entry, dt))
    offset += nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  blob = _json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)

  def write(tmp):
    with open(tmp, "wb") as fh:
      fh.write(len(blob).to_bytes(8, "little"))
      fh.write(blob)
      for path_, entry, dt in (progress(iter(order)) if progress else order):
        arr = entry.hook.to_torch(np.asarray(flat[path_]).astype(dt, copy=False))
        fh.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
      fh.flush()
      os.fsync(fh.fileno())
  atomic_write(path, write)


def save_model_folder(table: Table, params: Any, config: dict, path: str, weights_name: str, *,
                      dtype=None, progress: Callable[[Iterator], Iterator] | None = None):
  """Writes `path/<weights_name>` then `path/config.json`, each atomically.

  config.json is removed first and written last, so a folder with a config.json always
  has whole weights beside it, even if an overwrite is interrupted.
  """
  os.makedirs(path, exist_ok=True)
  config_path = os.path.join(path, "config.json")
  if os.path.exists(config_path):
    os.remove(config_path)
  save_params_safetensors(table, params, os.path.join(path, weights_name), dtype=dtype,
                          progress=progress)
  save_json(config, config_path)
