"""The config a workdir was started with, and the check that a restart uses the same one.

    run_config.ensure(workdir, config)       # first run: writes <workdir>/run_config.json
                                             # later runs: ConfigMismatchError if it differs

Resuming a run with other hyperparameters would silently mix two experiments in one set
of checkpoints, so a restart must bring the same config, except for the keys matched by
`ignore` (fnmatch patterns over dotted keys; a pattern also matches every key below it):
by default how many steps to run and how often to log, which may change between restarts.
Process 0 writes the file (atomically); every process checks it.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Mapping, Sequence

from d2g_jax import files

FILENAME = "run_config.json"
# Keys a restart may change: which stages run, how long, how often things are logged.
DEFAULT_IGNORE = ("stages", "train.num_steps", "train.log_every", "train.sample_every",
                  "distributed")
_ABSENT = "<absent>"


class ConfigMismatchError(ValueError):
  """A restart brought a config that differs from the one the workdir was started with."""


def _as_dict(config: Any) -> dict:
  """A plain JSON-able dict of a ConfigDict / mapping (tuples become lists, as on disk)."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(config, default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict stays a leaf."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _ignored(key: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns)


def diff(old: Mapping[str, Any], new: Mapping[str, Any],
         ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
  """[(dotted key, old value, new value)] for every differing key not matched by `ignore`."""
  a, b = flatten(_as_dict(old)), flatten(_as_dict(new))
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not _ignored(k, ignore)]


def path(workdir: str) -> str:
  return os.path.join(workdir, FILENAME)


def save_run_config(workdir: str, config: Any):
  """Writes <workdir>/run_config.json atomically (whole or absent)."""
  files.save_json(_as_dict(config), path(workdir))


def check_run_config(workdir: str, config: Any, ignore: Sequence[str] = DEFAULT_IGNORE) -> bool:
  """False if the workdir has no run_config.json yet; True if it matches `config`.

  Raises ConfigMismatchError listing every differing key (old -> new) otherwise.
  """
  p = path(workdir)
  if not os.path.exists(p):
    return False
  changes = diff(files.load_json(p, "run config"), config, ignore)
  if changes:
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in changes)
    raise ConfigMismatchError(
        f"{workdir} was started with a different config ({p}); this run differs in "
        f"{len(changes)} key(s) (old -> new):\n{lines}\n"
        f"Resuming would mix two runs in one set of checkpoints. Either start a new run in a "
        f"new workdir (--config.workdir=...), or rerun with the config in {p}. Keys that may "
        f"change between restarts: {', '.join(ignore) or 'none'}.")
  return True


def ensure(workdir: str, config: Any, ignore: Sequence[str] = DEFAULT_IGNORE,
           process_index: int = 0):
  """check_run_config, then (first run, process 0) save_run_config."""
  if not check_run_config(workdir, config, ignore) and process_index == 0:
    save_run_config(workdir, config)
