"""Small file helpers every layer uses: atomic writes and JSON with clear errors.

The lowest module of the package (standard library only), so that models/, sampling/,
data/, train/ and convert/ all import from here and no lower layer reaches into another.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Sequence

# Files up to this size are fingerprinted by content (configs, tokenizers), larger ones
# (weights) by name and size: a changed config or a swapped checkpoint changes it, and
# hashing gigabytes of weights at every start is avoided.
FINGERPRINT_CONTENT_BYTES = 8 << 20


def atomic_write(path: str, write: Callable[[str], None]):
  """Calls `write(tmp)` and renames tmp to `path`, so `path` is whole or absent."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_json(obj: Any, path: str):
  """Writes JSON atomically and durably (fsync of the file and of its folder): after a crash
  the file is the old one or the new one, whole."""
  def write(tmp):
    with open(tmp, "w") as fh:
      json.dump(obj, fh, indent=2, sort_keys=True)
      fh.write("\n")
      fh.flush()
      os.fsync(fh.fileno())
  atomic_write(path, write)
  fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(folder: str):
  """Makes a rename inside `folder` durable."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
  """sha256 of a file's bytes, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    while block := fh.read(chunk):
      h.update(block)
  return h.hexdigest()


def load_json(path: str, what: str = "config") -> dict:
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    hint = "" if os.path.isdir(folder) else f" (folder {folder!r} does not exist)"
    raise FileNotFoundError(f"{what} file {path!r} not found{hint}")
  try:
    with open(path) as fh:
      return json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} file {path!r} is not valid JSON: {e}") from e


def fingerprint(path: str, parts: Sequence[str] = ("",)) -> str:
  """sha256 over the files of `parts` (files or folders, relative to `path`; default: all of
  `path`): small files by content, large ones by name and size (FINGERPRINT_CONTENT_BYTES)."""
  h = hashlib.sha256()
  for part in parts:
    top = os.path.join(path, part) if part else path
    files = [top] if os.path.isfile(top) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs)
    for file in files:
      rel, size = os.path.relpath(file, path), os.path.getsize(file)
      h.update(f"{rel}\0{size}\0".encode())
      if size <= FINGERPRINT_CONTENT_BYTES:
        with open(file, "rb") as fh:
          h.update(hashlib.sha256(fh.read()).digest())
  return h.hexdigest()
