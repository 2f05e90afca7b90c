"""Joining a multi-host run: one JAX process per host, all running the same command.

    config.distributed.enabled = True   # --config.distributed.enabled=True

`initialize(config.distributed)` calls `jax.distributed.initialize` before any stage. Each of
the three cluster settings is taken, in this order, from the config, from the environment,
or else from JAX's own detection of the cluster (Cloud TPU pods, SLURM, Open MPI, ...):

    setting               config key                        environment
    coordinator address   distributed.coordinator_address   D2G_COORDINATOR_ADDRESS (or JAX's
                                                            JAX_COORDINATOR_ADDRESS)
    number of processes   distributed.num_processes         D2G_NUM_PROCESSES
    this process's index  distributed.process_id            D2G_PROCESS_ID

The coordination service (on process 0) watches every process's heartbeat: when a process
dies or stops answering for `heartbeat_timeout_s`, every other process is stopped with an
error naming the lost task, so a pod never hangs in a collective waiting for a dead peer.
`shutdown_timeout_s` bounds how long a finished process waits for the others at exit.

On CPUs (`launch/local.sh` rehearsals, the tests) the processes' collectives run over gloo.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import sys
from typing import Any, Callable, Mapping, TypeVar

from d2g_jax.log import get_logger

_log = get_logger(__name__)
T = TypeVar("T")

ENV = {"coordinator_address": ("D2G_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
       "num_processes": ("D2G_NUM_PROCESSES",),
       "process_id": ("D2G_PROCESS_ID",)}


def _int_env(name: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def settings(cfg, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
  """Keyword arguments for `jax.distributed.initialize` from `config.distributed` and the
  environment; a setting given nowhere is left out (JAX detects it from the cluster)."""
  kwargs: dict[str, Any] = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = int(cfg.num_processes)
  if cfg.process_id >= 0:
    kwargs["process_id"] = int(cfg.process_id)
  for key, names in ENV.items():
    for name in names:
      if key not in kwargs and environ.get(name, "") != "":
        value = environ[name]
        kwargs[key] = value if key == "coordinator_address" else _int_env(name, value)
  n, i = kwargs.get("num_processes"), kwargs.get("process_id")
  if n is not None and n < 1:
    raise ValueError(f"distributed.num_processes={n}: expected at least 1")
  if n is not None and i is not None and not 0 <= i < n:
    raise ValueError(f"distributed.process_id={i} with num_processes={n}: expected "
                     f"0 <= process_id < {n}")
  for key in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
    if cfg[key] <= 0:
      raise ValueError(f"distributed.{key}={cfg[key]}: expected a positive number of seconds")
  kwargs.update(initialization_timeout=int(cfg.initialization_timeout_s),
                heartbeat_timeout_seconds=int(cfg.heartbeat_timeout_s),
                shutdown_timeout_seconds=int(cfg.shutdown_timeout_s))
  return kwargs


def initialize(cfg, environ: Mapping[str, str] = os.environ) -> None:
  """Joins the run (once per process; a second call does nothing)."""
  import jax
  if jax.distributed.is_initialized():
    return
  kwargs = settings(cfg, environ)
  platforms = environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
  if platforms.strip() == "cpu":
    # CPU devices of several processes talk over gloo (TCP); set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Pre-emption is agreed by `infra.preemption` (JAX's sync manager would catch SIGTERM in C++,
  # leaving it without effect outside the training loop).
  jax.config.update("jax_enable_preemption_service", False)
  shown = {k: v for k, v in kwargs.items() if k in ENV} or "detected from the cluster"
  _log.info("joining a multi-host run: %s", shown)
  jax.distributed.initialize(**kwargs)


_barrier_ids = itertools.count()


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
  """Every process waits here until all have arrived (the coordination service's barrier, no
  device work); a no-op in a one-process run. Call it on every process in the same order."""
  import jax
  if jax.process_count() == 1:
    return
  _client().wait_at_barrier(f"d2g_{next(_barrier_ids)}_{name}",
                            timeout_in_ms=int(timeout_s * 1000))


def _client():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def on_process_zero(name: str, fn: Callable[[], T], timeout_s: float = 24 * 3600) -> T | None:
  """`fn()` on process 0 only, and every process learns how it ended: an exception raised on
  process 0 is raised on every process (the same type when it takes a message, else
  RuntimeError; the same message), so all of them stop with the same readable error instead
  of the others hanging in their next collective. Returns fn's result on process 0, None on
  the others. One process: just `fn()`."""
  import jax
  if jax.process_count() == 1:
    return fn()
  key = f"d2g_outcome_{next(_barrier_ids)}_{name}"
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:
      _client().key_value_set(key, json.dumps({"module": type(e).__module__,
                                               "type": type(e).__qualname__, "message": str(e)}))
      raise
    _client().key_value_set(key, "null")
    return result
  error = json.loads(_client().blocking_key_value_get(key, int(timeout_s * 1000)))
  if error is None:
    return None
  cls = getattr(importlib.import_module(error["module"]), error["type"], None) \
      if error["module"] in sys.modules else None
  try:
    raised = cls(error["message"]) if isinstance(cls, type) and issubclass(cls, Exception) \
        else RuntimeError(error["message"])
  except TypeError:
    raised = RuntimeError(error["message"])
  raise raised


def compile_then_wait(fn, *args, name: str) -> None:
  """`fn` (a jitted function) compiled for `args` now (its next call reuses the program), then
  every host waits for the others: a host that compiles slower (no cache entry: JAX writes the
  persistent cache from process 0 only) would otherwise leave the others waiting in the first
  collective, and CPU collectives (gloo) give up after ~30 s. One process: only the compile."""
  fn.lower(*args).compile()
  barrier(f"{name} compiled")
