"""BAPPS two-alternative forced-choice (2AFC) triplets, in the published folder layout.

  <root>/2afc/<split>/<distortion>/ref/<stem>.png     the reference patch
                                   p0/<stem>.png      the first distorted patch
                                   p1/<stem>.png      the second distorted patch
                                   judge/<stem>.npy   the fraction of people who judged p1
                                                      closer to the reference (0: all chose p0)

(Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
CVPR 2018.) Splits are `train` (distortions traditional, cnn, mix) and `val` (traditional,
cnn, superres, deblur, color, frameinterp). `root` may also be the `2afc` folder itself.
Triplets are ordered by distortion, then stem; every stem of `ref/` must have its p0, p1 and
judge files, or the reader says which are missing.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from d2g_jax.data.images import ImageSourceError, _decode

PARTS = ("ref", "p0", "p1", "judge")


def split_folder(root: str, split: str) -> str:
  """<root>/2afc/<split>, or <root>/<split> when root is the 2afc folder."""
  for folder in (os.path.join(root, "2afc", split), os.path.join(root, split)):
    if os.path.isdir(folder):
      return folder
  raise FileNotFoundError(f"no BAPPS 2AFC split {split!r} under {root!r}: looked for "
                          f"{os.path.join(root, '2afc', split)} and {os.path.join(root, split)}. "
                          "Expected the published layout 2afc/{train,val}/<distortion>/"
                          "{ref,p0,p1,judge}/ (BAPPS, Zhang et al. 2018).")


class TwoAFC:
  """The triplets of one split: `item(i)` -> (ref, p0, p1 PIL images, judge, distortion, key)."""

  def __init__(self, root: str, split: str):
    self.folder = os.path.abspath(split_folder(root, split))
    self.split = split
    self.distortions = sorted(d for d in os.listdir(self.folder) if not d.startswith(".")
                              and os.path.isdir(os.path.join(self.folder, d)))
    if not self.distortions:
      raise ImageSourceError(f"BAPPS split folder {self.folder} holds no distortion folders")
    self.items: list[tuple[str, str]] = []
    h = hashlib.sha256()
    for dist in self.distortions:
      base = os.path.join(self.folder, dist)
      missing_parts = [p for p in PARTS if not os.path.isdir(os.path.join(base, p))]
      if missing_parts:
        raise ImageSourceError(f"BAPPS folder {base} lacks {missing_parts}; each distortion "
                               f"folder needs {list(PARTS)}")
      stems = sorted(f[:-4] for f in os.listdir(os.path.join(base, "ref"))
                     if f.endswith(".png") and not f.startswith("."))
      if not stems:
        raise ImageSourceError(f"BAPPS folder {base}/ref holds no .png reference patches")
      for stem in stems:
        files = self._files(dist, stem)
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
          raise ImageSourceError(f"BAPPS triplet {dist}/{stem} is incomplete: missing "
                                 f"{absent[:3]}")
        h.update(f"{dist}/{stem}\0{os.path.getsize(files[-1])}\n".encode())
        self.items.append((dist, stem))
    self._sha = h.hexdigest()

  def _files(self, dist: str, stem: str) -> list[str]:
    base = os.path.join(self.folder, dist)
    return [os.path.join(base, p, stem + (".npy" if p == "judge" else ".png")) for p in PARTS]

  def __len__(self) -> int:
    return len(self.items)

  def item(self, i: int):
    """(ref, p0, p1 as PIL RGB images, judge in [0, 1], distortion, key) of triplet i."""
    dist, stem = self.items[i]
    ref, p0, p1, judge_path = self._files(dist, stem)
    try:
      judge = np.load(judge_path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a bad file
      raise ImageSourceError(f"{judge_path}: not a readable .npy judgment ({e})") from e
    judge = np.asarray(judge, np.float64).reshape(-1)
    if judge.size != 1 or not 0.0 <= judge[0] <= 1.0:
      raise ImageSourceError(f"{judge_path}: expected one judgment in [0, 1], found "
                             f"{judge.tolist()[:4]}")
    return (_decode(ref, ref), _decode(p0, p0), _decode(p1, p1), float(judge[0]), dist,
            f"{dist}/{stem}")

  def description(self) -> dict[str, Any]:
    return {"kind": "bapps_2afc", "folder": self.folder, "split": self.split,
            "distortions": self.distortions, "num_examples": len(self),
            "files_sha256": self._sha}
