"""The project's logger: one format, process 0 speaks, libraries' INFO chatter filtered.

    from d2g_jax import log
    logger = log.get_logger(__name__)     # a child of the "d2g_jax" logger
    logger.info("step %d: loss %.4f", step, loss)

`setup()` (called by `d2g_jax.main`, again by `run.run` once `jax.distributed` knows the
process index) gives the "d2g_jax" logger its own handler and format:

    12:03:04 I train: step 100, loss 0.1234          (process 0)
    12:03:04 W p3 train: data runs out at step 9000  (process 3: warnings and errors only)

and drops INFO / DEBUG records from the libraries that narrate every checkpoint (Orbax,
grain, etils: they log through absl, so they are matched by source file) and from JAX's
backend probing (matched by logger name). Their warnings and errors still show; nothing
else is silenced. Standard library only, so every layer may import it.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "d2g_jax"
FORMAT = "%(asctime)s %(levelname).1s %(where)s%(message)s"
DATEFMT = "%H:%M:%S"
# Below WARNING, records from these loggers (by name prefix) are dropped ...
NOISY_LOGGERS = ("jax._src.xla_bridge", "orbax", "grain", "etils")
# ... and records logged through absl from files inside these packages.
NOISY_PACKAGES = ("orbax", "grain", "etils")

_state = {"process_index": 0, "handler": None}


def get_logger(name: str = ROOT) -> logging.Logger:
  """The project logger, or a child of it (`get_logger(__name__)` in d2g_jax modules)."""
  if name != ROOT and not name.startswith(ROOT + "."):
    name = f"{ROOT}.{name}"
  return logging.getLogger(name)


class LibraryNoiseFilter(logging.Filter):
  """Drops records below WARNING that come from NOISY_LOGGERS or NOISY_PACKAGES."""

  def __init__(self, loggers=NOISY_LOGGERS, packages=NOISY_PACKAGES):
    super().__init__()
    self.loggers = tuple(loggers)
    self.dirs = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    if any(record.name == n or record.name.startswith(n + ".") for n in self.loggers):
      return False
    return not any(d in record.pathname for d in self.dirs)


class _Formatter(logging.Formatter):
  """FORMAT with `where`: the logger's name below d2g_jax, and the process when not 0."""

  def format(self, record):
    name = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else ""
    proc = _state["process_index"]
    record.where = (f"p{proc} " if proc else "") + (f"{name}: " if name else "")
    return super().format(record)


def setup(process_index: int | None = None, *, filter_libraries: bool = True,
          stream=None) -> logging.Logger:
  """Configures the "d2g_jax" logger; safe to call again (e.g. once the process is known).

  process_index: this process in a multi-host run (None: keep the last value, 0 at first).
  Process 0 logs INFO and above, every other process WARNING and above.
  filter_libraries: install LibraryNoiseFilter on the "absl" logger, the NOISY_LOGGERS and
  the root logger's handlers (off when the user asked for library logs, e.g. --verbosity).
  """
  if process_index is not None:
    _state["process_index"] = int(process_index)
  logger = logging.getLogger(ROOT)
  if _state["handler"] is None or stream is not None:
    if _state["handler"] is not None:
      logger.removeHandler(_state["handler"])
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(FORMAT, DATEFMT))
    logger.addHandler(handler)
    _state["handler"] = handler
  logger.propagate = False  # our records are printed once, in our format
  logger.setLevel(logging.INFO if _state["process_index"] == 0 else logging.WARNING)
  if filter_libraries:
    targets = [logging.getLogger("absl"), *map(logging.getLogger, NOISY_LOGGERS),
               *logging.getLogger().handlers]
    for target in targets:
      if not any(isinstance(f, LibraryNoiseFilter) for f in target.filters):
        target.addFilter(LibraryNoiseFilter())
  return logger
