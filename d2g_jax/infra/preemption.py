"""Stopping a run cleanly: SIGTERM (a pre-empted VM, `scancel`, Ctrl-C's polite cousin) asks
the loop to save a checkpoint at the end of the current step and return.

    with preemption.StopRequest() as stop:
      for step in ...:
        ...
        if stop.requested:
          save(); break

The one mechanism every trainer uses; the handler is restored on exit.
"""

from __future__ import annotations

import signal

from d2g_jax.log import get_logger

_log = get_logger(__name__)


class StopRequest:
  """Set by SIGTERM: the loop saves the current step and returns."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      self.requested = True
      _log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
