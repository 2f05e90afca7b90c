"""Output folders of the digits stages: written whole or not at all, and marked with the
settings that made them, so a rerun keeps a finished folder only if it is the one asked for.

    if folders.finished(out, settings, "digits_vae") is None:
      folders.build(out, lambda tmp: ..., settings, figures)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from d2g_jax.files import load_json, save_json

MARKER = "d2g_digits.json"  # {"stage", "settings", "figures"}; ignored by diffusers


def as_json(obj: Any) -> Any:
  """`obj` as JSON reads it back (tuples -> lists, numpy scalars -> Python), for comparing."""
  return json.loads(json.dumps(obj, default=lambda v: np.asarray(v).tolist()))


def differing(found: dict, wanted: dict) -> list[str]:
  """Keys whose values differ between two settings dicts."""
  return sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))


def finished(out: str, settings: dict, stage: str) -> dict | None:
  """The marker of a finished `out` made with `settings` (None if `out` is absent).

  Raises if `out` exists but was made with other settings or by something else: a
  stale teacher must not be kept silently."""
  if not os.path.exists(out):
    return None
  path = os.path.join(out, MARKER)
  if not os.path.isfile(path):
    raise FileExistsError(f"{out!r} exists but was not written by the {stage} stage (no {MARKER}); "
                          "move it away, or point the config at another folder (e.g. another "
                          "--config.workdir)")
  marker = load_json(path, f"{stage} marker")
  diff = differing(marker.get("settings", {}), as_json(settings))
  if diff:
    raise ValueError(f"{out!r} was made by {stage} with other settings (differing: {diff}); "
                     f"delete it to redo the stage with these settings, or use another workdir")
  return marker


def build(out: str, fill: Callable[[str], None], stage: str, settings: dict, figures: dict):
  """Writes folder `out` through `fill(tmp)` in a temporary folder beside it, adds the
  marker, then renames it into place: `out` is whole or absent."""
  if os.path.exists(out):
    raise FileExistsError(f"{out!r} exists; remove it to write a new one there")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out) + ".")
  try:
    fill(tmp)
    save_json({"stage": stage, "settings": as_json(settings), "figures": as_json(figures)},
              os.path.join(tmp, MARKER))
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
