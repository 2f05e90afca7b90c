"""Stopping a run cleanly: SIGTERM (a pre-empted VM, `scancel`, SLURM's requeue) asks the loop
to save a checkpoint at the end of a step and stop; every host stops at the same step.

    with preemption.StopRequest() as stop:
      for step in ...:
        ...
        done = step + 1
        if stop.at(done):        # every process calls it at every step, with the same steps
          save(done)
          raise preemption.Preempted(done, result)

One process: a SIGTERM handler sets a flag that `at` reads (the handler is restored on exit;
outside the `with` block SIGTERM ends the process as usual).

Several processes: on a pod the SIGTERM reaches the hosts at different moments, maybe only
one of them; a host that saved on its own would wait in the checkpoint's collectives for hosts
that went on to the next step's, and the pod would hang. So the hosts agree, through the
coordination service's key-value store (no device work):
  1. the handler of a host that got SIGTERM posts a notice under the run's prefix;
  2. at each step `at` looks for a notice (one small request to the coordinator); a host that
     sees one posts the step it is at, then waits for every host's post;
  3. every host stops after the largest posted step. The hosts' loops are within a step or
     two of each other (each step's collectives tie them together), so none has passed it;
     a host that leaves the loop at the last step without having seen the notice posts that
     step on its way out, so the others stop there too.
JAX's own pre-emption sync manager does the same with a SIGTERM handler in C++, which would
hide ours and leave SIGTERM without effect outside the training loop; `distributed.initialize`
turns it off.

`Preempted` carries the step saved; `run.run` catches it, skips the later stages and returns,
so the process exits 0 and the same command resumes.
"""

from __future__ import annotations

import itertools
import signal
from typing import Any

from d2g_jax.log import get_logger

_log = get_logger(__name__)
_runs = itertools.count()
WAIT_S = 3600  # how long a host waits for the others' posted steps (a lost host ends the run
               # sooner: the coordination service's heartbeat timeout)


class Preempted(Exception):  # noqa: N818 - not an error: a stop on request
  """A stage saved its state at `step` and stopped on SIGTERM; `result` is its return value."""

  def __init__(self, step: int, result: Any = None, stage: str = "train"):
    super().__init__(f"{stage}: stopped by SIGTERM after step {step} (checkpoint saved)")
    self.step, self.result = step, result


class StopRequest:
  """Whether to stop after a step; see the module docstring."""

  def __init__(self):
    self.requested = False  # a SIGTERM reached this process (or, agreed, any process)
    self._old = None
    self._client = None
    self._stop_at: int | None = None
    self._last: int | None = None

  def __enter__(self):
    import jax
    if jax.process_count() > 1:
      from jax._src import distributed
      self._client = distributed.global_state.client
      self._index, self._count = jax.process_index(), jax.process_count()
      self._prefix = f"d2g_stop_{next(_runs)}"
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handler(self, signum, frame):
    self.requested = True
    if self._client is not None:
      try:
        self._client.key_value_set(f"{self._prefix}/notice/{self._index}", "SIGTERM")
      except Exception:  # noqa: BLE001 - a second SIGTERM: the notice is already posted
        return
      _log.warning("SIGTERM: every host saves a checkpoint at the same step, then stops")
    else:
      _log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")

  def at(self, step: int) -> bool:
    """True if the run stops after `step`: the same answer on every process. Call it at every
    step, on every process."""
    if self._client is None:
      return self.requested
    self._last = step
    if self._stop_at is None:
      if not self.requested and not self._client.key_value_dir_get(f"{self._prefix}/notice/"):
        return False
      self._client.key_value_set(f"{self._prefix}/step/{self._index}", str(step))
      posted = [int(self._client.blocking_key_value_get(f"{self._prefix}/step/{i}",
                                                        WAIT_S * 1000))
                for i in range(self._count)]
      self._stop_at = max(posted)
      self.requested = True
      _log.warning("SIGTERM on a host: every host stops after step %d", self._stop_at)
    return step >= self._stop_at

  def __exit__(self, *exc):
    if self._client is not None and self._stop_at is None and self._last is not None:
      # A host may have seen a notice at the last step, after this one looked: it waits for
      # every host's step. Ours is the last, so it stops there, as it would anyway.
      self._client.key_value_set(f"{self._prefix}/step/{self._index}", str(self._last))
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
