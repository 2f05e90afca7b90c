"""On-disk format of a sharded dataset (pairs, latents, ...): ArrayRecord shards, sidecars
and a manifest.

A dataset folder holds (`pairs` is the layout's prefix: `latents` for a latent cache)

  manifest.json                          the run's config and, once complete, every shard
  pairs-SSSSS-of-NNNNN.array_record      one record per example, examples in index order
  pairs-SSSSS-of-NNNNN.json              sidecar: written last, marks the shard as complete

Shard `s` of size `S` holds the examples with global indices [s*S, min((s+1)*S, N)).
A record is a msgpack map (flax.serialization): str -> int | str | numpy array, arrays
stored with their dtype name and shape (`decode_record` restores them). ArrayRecord
files are written with `group_size:1` (random access, as grain requires), uncompressed
(latents and noise are floats that do not compress), and each chunk carries a hash
that the reader checks.

Writes are atomic and durable: a shard is written to a hidden temp file, fsynced and
renamed; its sidecar (size, sha256, record count) is then written the same way. A
shard without a sidecar is unfinished and is rewritten on resume.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from flax import serialization

from d2g_jax import files
from d2g_jax.files import load_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1,uncompressed"
VERIFY_MODES = ("none", "size", "sha256")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One kind of sharded dataset: file prefix, manifest format name, the stage that writes it."""
  prefix: str   # file names: <prefix>-SSSSS-of-NNNNN.array_record
  format: str   # the manifest's "format"
  stage: str    # named in errors: "run the <stage> stage again"
  unit: str     # what one record is, in messages: "pair", "latent"


PAIRS = Layout("pairs", "d2g_jax.pairs", "pairs", "pair")
LATENTS = Layout("latents", "d2g_jax.latents", "latent_cache", "example")
LAYOUTS = {layout.format: layout for layout in (PAIRS, LATENTS)}
FORMAT = PAIRS.format


class ShardError(ValueError):
  """A shard is missing, truncated, corrupt or from another run."""


# ---------------------------------------------------------------- names
def shard_name(shard: int, num_shards: int, layout: Layout = PAIRS) -> str:
  width = max(5, len(str(num_shards)))
  return f"{layout.prefix}-{shard:0{width}d}-of-{num_shards:0{width}d}.array_record"


def sidecar_name(shard: int, num_shards: int, layout: Layout = PAIRS) -> str:
  return shard_name(shard, num_shards, layout)[:-len(".array_record")] + ".json"


def temp_name(name: str) -> str:
  return f".{name}.tmp"


# -------------------------------------------------------------- records
def encode_record(record: Mapping[str, Any]) -> bytes:
  """msgpack bytes of a flat dict of ints, strings and numpy arrays."""
  return serialization.msgpack_serialize(dict(record))


def decode_record(data: bytes) -> dict[str, Any]:
  """The dict `encode_record` stored; arrays are read-only numpy views of `data`."""
  return serialization.msgpack_restore(data)


# ------------------------------------------------------------- durable IO
class ShardWriter:
  """Appends records to a hidden temp file; `commit` makes it the shard, atomically."""

  def __init__(self, folder: str, name: str, options: str = WRITER_OPTIONS):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.folder, self.name = folder, name
    self.path = os.path.join(folder, name)
    self.tmp = os.path.join(folder, temp_name(name))
    if os.path.exists(self.tmp):
      os.remove(self.tmp)
    self._writer = ArrayRecordWriter(self.tmp, options)
    self.num_records = 0

  def write(self, record: bytes):
    self._writer.write(record)
    if not self._writer.ok():
      raise OSError(f"writing a record to {self.tmp} failed (disk full?)")
    self.num_records += 1

  def commit(self) -> dict[str, Any]:
    """Closes, fsyncs and renames the shard into place; returns its size and sha256."""
    self._writer.close()
    with open(self.tmp, "rb+") as fh:
      os.fsync(fh.fileno())
    info = {"name": self.name, "num_records": self.num_records,
            "bytes": os.path.getsize(self.tmp), "sha256": files.file_sha256(self.tmp)}
    os.replace(self.tmp, self.path)
    files.fsync_dir(self.folder)
    return info

  def abort(self):
    self._writer.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


# ------------------------------------------------------------- checking
def check_shard(folder: str, info: Mapping[str, Any], verify: str = "size",
                layout: Layout = PAIRS):
  """Raises ShardError unless the shard file matches `info` (its sidecar/manifest entry).

  `verify`: "none" (exists), "size" (exists, byte size: catches truncation) or
  "sha256" (whole-file checksum: catches any change; reads the file).
  """
  if verify not in VERIFY_MODES:
    raise ValueError(f"verify={verify!r}; expected one of {VERIFY_MODES}")
  path = os.path.join(folder, info["name"])
  if not os.path.isfile(path):
    raise ShardError(f"shard {path} is missing (listed as complete with "
                     f"{info['num_records']} {layout.unit}s). If it was deleted on purpose, "
                     f"delete its .json sidecar too and run the {layout.stage} stage again to "
                     "regenerate it.")
  if verify == "none":
    return
  size = os.path.getsize(path)
  if size != info["bytes"]:
    raise ShardError(f"shard {path} is {size} bytes; its record says {info['bytes']}: the file "
                     "is truncated or was overwritten. Delete it and its .json sidecar, then "
                     f"run the {layout.stage} stage again to regenerate it.")
  if verify == "sha256":
    digest = files.file_sha256(path)
    if digest != info["sha256"]:
      raise ShardError(f"shard {path} is corrupt: sha256 {digest}, expected {info['sha256']}. "
                       f"Delete it and its .json sidecar, then run the {layout.stage} stage "
                       "again.")


def read_manifest(folder: str, layout: Layout | None = PAIRS) -> dict[str, Any]:
  """The manifest of a dataset folder, with its format checked (`layout=None`: any layout)."""
  path = os.path.join(folder, MANIFEST)
  what = f"{layout.prefix} dataset" if layout else "sharded dataset"
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{what} folder {folder!r} does not exist")
  manifest = load_json(path, f"{what} manifest")
  expected = [layout.format] if layout else sorted(LAYOUTS)
  if manifest.get("format") not in expected:
    raise ValueError(f"{path} is not a {what} manifest (format {manifest.get('format')!r}, "
                     f"expected {' or '.join(map(repr, expected))})")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format version {manifest.get('format_version')}; this code "
                     f"reads version {FORMAT_VERSION}")
  return manifest


def read_sidecar(folder: str, shard: int, num_shards: int,
                 layout: Layout = PAIRS) -> dict[str, Any] | None:
  """A shard's completion record, or None when the shard is not complete."""
  path = os.path.join(folder, sidecar_name(shard, num_shards, layout))
  if not os.path.isfile(path):
    return None
  return load_json(path, "shard sidecar")

