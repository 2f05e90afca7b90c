"""A folder lock, so two runs never write the same workdir (or pairs folder) at once.

    with lock.FolderLock(workdir, process_index=jax.process_index()):
      ...  # a second run on `workdir` raises LockedError at once, naming this one

The lock is a JSON file `<folder>/.lock` (host, pid, start time, command, a token),
created atomically with O_EXCL and removed on release (the `with` block's end or
interpreter exit). While held, a daemon thread touches the file every `heartbeat_s` so
other hosts can tell a live holder from a dead one. A lock left by a killed run is stale,
and the next run takes it over with a warning, when:
  - the holder was on this host and its pid is no longer running (or is our own pid: a
    restarted container reusing it), or
  - its heartbeat (the file's mtime) is older than `stale_after_s` (any host, e.g. a job
    requeued on another node; also a file too damaged to name its holder).
Only process 0 of a multi-host run takes the lock; the others learn whether it did and, if
not, raise the same LockedError (`distributed.on_process_zero`). Standard library only, but
for that.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

from d2g_jax.log import get_logger

LOCK_NAME = ".lock"
_log = get_logger(__name__)


class LockedError(RuntimeError):
  """The folder is locked by a run that looks alive."""


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _describe(info: dict) -> str:
  return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started "
          f"{info.get('start_time', '?')}, command: {info.get('command', '?')}")


class FolderLock:
  """An exclusive, heartbeat-refreshed lock on a folder; see the module docstring."""

  def __init__(self, folder: str, *, process_index: int = 0, heartbeat_s: float = 30.0,
               stale_after_s: float = 300.0, name: str = LOCK_NAME):
    if stale_after_s <= 2 * heartbeat_s:
      raise ValueError(f"stale_after_s={stale_after_s} must exceed 2 x heartbeat_s="
                       f"{heartbeat_s}, or a live holder could be taken for a dead one")
    self.folder = os.path.abspath(folder)
    self.path = os.path.join(self.folder, name)
    self.active = process_index == 0
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self._info: dict | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ------------------------------------------------------------------ holder side
  def acquire(self) -> "FolderLock":
    if self._info is not None:
      return self
    if "jax" in sys.modules:  # a multi-host run: every process learns whether process 0 got it
      from d2g_jax import distributed
      distributed.on_process_zero(f"lock {self.path}", self._acquire)
      return self
    return self._acquire()

  def _acquire(self) -> "FolderLock":
    if not self.active:
      return self
    os.makedirs(self.folder, exist_ok=True)
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]), "token": uuid.uuid4().hex}
    for _ in range(3):  # create; or judge the holder, take a stale lock over, create again
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
      break
    else:
      raise LockedError(f"could not create {self.path}: other runs keep taking it")
    self._info = info
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name=f"lock-heartbeat:{self.path}")
    self._thread.start()
    atexit.register(self.release)
    return self

  def _heartbeat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.path)
      except OSError as e:  # the folder went away: nothing left to protect
        _log.warning("lock heartbeat on %s failed: %s", self.path, e)

  def release(self):
    if self._info is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.read().get("token") == self._info["token"]:  # still ours: remove it
      os.remove(self.path)
    self._info = None
    atexit.unregister(self.release)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  # ------------------------------------------------------------------ challenger side
  def read(self) -> dict:
    """The lock file's contents ({} if absent or unreadable)."""
    try:
      with open(self.path) as fh:
        info = json.load(fh)
      return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
      return {}

  def _take_over_if_stale(self):
    info = self.read()
    try:
      age = time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:  # released meanwhile
      return
    here = info.get("host") == socket.gethostname()
    pid = info.get("pid")
    if here and isinstance(pid, int) and (pid == os.getpid() or not _pid_running(pid)):
      why = f"process {pid} is not running on this host"
    elif age > self.stale_after_s:
      why = f"no heartbeat for {age:.0f} s (> stale_after_s={self.stale_after_s:.0f})"
    else:
      wait = "" if here else (f" If that run was killed, its lock goes stale "
                              f"{self.stale_after_s - age:.0f} s from now; start again then.")
      raise LockedError(
          f"{self.folder} is in use by another run ({_describe(info)}; last heartbeat "
          f"{age:.0f} s ago; lock file {self.path}). Two runs writing one folder would corrupt "
          f"it: wait for that run to finish or stop it, or use another folder.{wait} If you are "
          f"sure no run is using the folder, delete {self.path}.")
    _log.warning("taking over the stale lock %s (%s): %s", self.path, _describe(info), why)
    try:
      os.replace(self.path, self.path + ".stale")  # keep it for inspection
    except FileNotFoundError:
      pass
