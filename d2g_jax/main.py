"""Entry point: one config, one or more stages.

    python -m d2g_jax.main --config configs/demo.py
    python -m d2g_jax.main --config configs/sd15.py --config.teacher.path=/models/sd15 \
        --config.stages=pairs

Kept short on purpose: flags in, `run.run(config)` out. See configs/ for every option.
A user's mistake (a flag or config key, a missing or malformed input, a config changed on
resume, a locked workdir) prints one `error: ...` message and exits with status 2; a run that
fails while running (a non-finite loss) exits with 1. --debug (or D2G_DEBUG=1) adds the
Python traceback.
"""

import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from d2g_jax import log, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_DEBUG = flags.DEFINE_bool("debug", False, "On an error, also print the Python traceback "
                           "(or set D2G_DEBUG=1).")
PACKAGE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; options are flags, e.g. --config.stages=train")
  if _CONFIG.value is None:
    fail("--config is required, e.g. python -m d2g_jax.main --config configs/demo.py")
  # Our logger on process 0; Orbax's / grain's INFO narration dropped unless asked for.
  log.setup(filter_libraries=not flags.FLAGS["verbosity"].present)
  try:
    config = _CONFIG.value
    config.stages  # noqa: B018 - a config file that failed to load raises here
  except OSError as e:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    fail(f"--config={path}: " + ("no such file" if not os.path.isfile(path) else
                                 str(e.__cause__ or e)))
  try:
    run.run(config)
  except Exception as e:  # noqa: BLE001 - sorted into the user's errors and our bugs
    status = exit_status(e)
    if status is None:
      raise
    fail(str(e), status, e)


def exit_status(e: BaseException) -> int | None:
  """1 for a run that failed while running, 2 for a user's error (a config or an input), None
  for anything else (a bug: its traceback is shown)."""
  from d2g_jax.data.shards import ShardError
  from d2g_jax.infra.metrics import NonFiniteError
  from d2g_jax.infra.run_config import ConfigMismatchError
  from d2g_jax.lock import LockedError
  from d2g_jax.preflight import PreflightError
  if isinstance(e, NonFiniteError):
    return 1
  if isinstance(e, (PreflightError, ConfigMismatchError, LockedError, ShardError)):
    return 2
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  ours = tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE)
  return 2 if isinstance(e, (FileNotFoundError, ValueError)) and ours else None


def fail(message: str, status: int = 2, error: BaseException | None = None):
  if error is not None and (_DEBUG.value or _debug_env()):
    traceback.print_exception(error)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _debug_env() -> bool:
  return os.environ.get("D2G_DEBUG", "") not in ("", "0")


def parse_flags(argv):
  """absl's flag parsing, its errors (an unknown flag or config key, a bad value, a config
  file that raises) as one `error:` line and status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, SyntaxError) as e:
    if "--debug" in argv or _debug_env():
      traceback.print_exc()
    fail(_flag_error(e, argv))


def _flag_error(e: Exception, argv) -> str:
  if isinstance(e, SyntaxError):
    return f"config file {e.filename}, line {e.lineno}: {e.msg}"
  if isinstance(e, flags.Error):
    head, sep, trace = str(e).partition("Error whilst parsing config file:")
    lines = [line for line in trace.splitlines() if line.strip()]
    return (head + "the config file raised " + lines[-1].strip() if sep and lines else str(e)) \
        + " (--helpshort lists the flags)"
  while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
    e = e.args[0]
  name, _, hint = str(e.args[0] if e.args else e).partition("\n")
  name = name.strip("'\"")
  named = [a.split("=")[0] for a in argv if a.startswith("--config.")
           and name in a.split("=")[0].split(".")]
  return (f"{', '.join(named) or '--config.<key>'}: the config has no option {name!r}"
          + (f" ({hint.strip()})" if hint.strip() else "")
          + "; every option is listed in d2g_jax/config_defaults.py")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
