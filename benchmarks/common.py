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


def _command(argv: list[str]) -> str:
  """`python benchmarks/<script> <args>` without `--record PATH` (where the record went) and
  `--note TEXT` (the record keeps the note in its own field)."""
  import os
  import shlex
  args, skip = [], False
  for a in argv[1:]:
    if skip:
      skip = False
    elif a in ("--record", "--note"):
      skip = True
    elif not a.startswith(("--record=", "--note=")):
      args.append(a)
  return shlex.join(["python", "benchmarks/" + os.path.basename(argv[0])] + args)


def _commit() -> str:
  """The checkout's short commit, `+changes` when the work tree differs from it; '' outside git."""
  import os
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""
  return head + ("+changes" if dirty else "")


def record(path: str, results: dict) -> dict:
  """Appends one benchmark run to `path` as a JSON line, the format of benchmarks/results/*.jsonl.

  The record is `results` (the script's measured and derived figures) after the fields every
  record carries: `benchmark` (the script's name), `date`, `cpu` (lscpu's model name),
  `cores`, `device` (JAX's first device), `command` (the command line, less `--record`),
  `commit` and `source`. `python benchmarks/tables.py` turns the files into the docs' tables.
  Returns the record.
  """
  import datetime
  import json
  import os
  import sys
  try:
    import jax
    device = jax.devices()[0].device_kind
  except Exception:  # noqa: BLE001  (a record without JAX still names the CPU)
    device = ""
  rec = {"benchmark": os.path.splitext(os.path.basename(sys.argv[0]))[0],
         "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
         "device": device, "command": _command(sys.argv), "commit": _commit()}
  rec.update(results)
  rec["source"] = "recorded by the benchmark script (--record)"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as fh:
    fh.write(json.dumps(rec) + "\n")
  print(f"recorded in {path}")
  return rec
