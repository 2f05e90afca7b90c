"""Timing helper shared by the benchmark scripts."""

import platform
import statistics
import subprocess
import time


def interleaved_medians(fns: dict, repeats: int, pause: float = 1.0) -> dict:
  """Median wall time of each (already warmed-up) `fns[name]()`, timed in turns.

  Round r times every function once, starting from a different one each round, so a
  slow spell of a shared machine (other tenants, frequency changes) lands on all of
  them rather than on whichever happened to be timed during it. Each call starts
  `pause` seconds after the previous one ends: the worker threads of one runtime
  (PyTorch's OpenMP pool, XLA's Eigen pool) keep spinning for a while after their work,
  and on a 2-core machine measurably slow whichever runtime is timed next.
  """
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      time.sleep(pause)
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_name() -> str:
  """lscpu's model name (every CPU figure names its processor), else platform.processor()."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Model name" in l)
  except (OSError, StopIteration):
    return platform.processor()
