"""FolderLock: a second run is refused at once, naming the first; a lock left by a killed
run (dead pid on this host, or a stale heartbeat from any host) is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from d2g_jax import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code, *args, **popen):
  """Another process (another run) importing this checkout's d2g_jax."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


ACQUIRE = "import sys; from d2g_jax.lock import FolderLock; FolderLock(sys.argv[1]).acquire()"


def write_lock(folder, age_s, **info):
  path = os.path.join(folder, lock.LOCK_NAME)
  with open(path, "w") as fh:
    json.dump({"host": "elsewhere", "pid": 4242, "start_time": "2026-01-01T00:00:00+00:00",
               "command": "python -m d2g_jax.main --config configs/sd15.py", **info}, fh)
  os.utime(path, (time.time() - age_s,) * 2)
  return path


def test_second_run_refused_naming_the_first(tmp_path):
  with lock.FolderLock(tmp_path) as held:
    info = held.read()
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    out, err = python(ACQUIRE, tmp_path).communicate(timeout=60)
    assert "LockedError" in err, err
    for part in (f"{tmp_path} is in use by another run", f"host {socket.gethostname()}",
                 f"pid {os.getpid()}", f"started {info['start_time']}", "pytest",
                 "wait for that run to finish"):
      assert part in err, (part, err)
  assert not os.path.exists(held.path)  # released
  proc = python(ACQUIRE, tmp_path)  # free again: taken, and released at the process's exit
  assert proc.wait(timeout=60) == 0, proc.stderr.read()
  assert os.listdir(tmp_path) == []


def test_sigkilled_holder_is_taken_over(tmp_path, caplog):
  proc = python(ACQUIRE + "; print('held', flush=True); import time; time.sleep(60)", tmp_path)
  assert proc.stdout.readline() == "held\n", proc.stderr.read()
  dead_pid = proc.pid
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == dead_pid  # left behind
  with caplog.at_level(logging.WARNING, logger="d2g_jax"):
    with lock.FolderLock(tmp_path) as held:
      assert held.read()["pid"] == os.getpid()
  assert f"process {dead_pid} is not running on this host" in caplog.text
  assert "taking over the stale lock" in caplog.text
  assert json.loads((tmp_path / (lock.LOCK_NAME + ".stale")).read_text())["pid"] == dead_pid


def test_other_host_judged_by_heartbeat(tmp_path, caplog):
  write_lock(tmp_path, age_s=5)
  with pytest.raises(lock.LockedError, match=r"host elsewhere, pid 4242, started 2026-01-01"
                     r".*configs/sd15.py.*last heartbeat 5 s ago.*goes stale 5 s from now"):
    lock.FolderLock(tmp_path, heartbeat_s=1, stale_after_s=10).acquire()
  write_lock(tmp_path, age_s=30)  # no heartbeat for 30 s > 10 s: the holder is gone
  with caplog.at_level(logging.WARNING, logger="d2g_jax"):
    with lock.FolderLock(tmp_path, heartbeat_s=1, stale_after_s=10) as held:
      assert held.read()["host"] == socket.gethostname()
  assert "no heartbeat for 30 s" in caplog.text
  # A live pid on this host that stopped its heartbeat (hung, or a reused pid): stale too.
  write_lock(tmp_path, age_s=30, host=socket.gethostname(), pid=os.getppid())
  lock.FolderLock(tmp_path, heartbeat_s=1, stale_after_s=10).acquire().release()
  write_lock(tmp_path, age_s=1, host=socket.gethostname(), pid=os.getppid())
  with pytest.raises(lock.LockedError):
    lock.FolderLock(tmp_path, heartbeat_s=1, stale_after_s=10).acquire()
  (tmp_path / lock.LOCK_NAME).write_text("")  # torn file, fresh: refused, old: taken
  with pytest.raises(lock.LockedError, match="host [?], pid [?]"):
    lock.FolderLock(tmp_path, heartbeat_s=1, stale_after_s=10).acquire()
  os.utime(tmp_path / lock.LOCK_NAME, (time.time() - 60,) * 2)
  lock.FolderLock(tmp_path, heartbeat_s=1, stale_after_s=10).acquire().release()


def test_heartbeat_and_process_index(tmp_path):
  held = lock.FolderLock(tmp_path, heartbeat_s=0.05, stale_after_s=1).acquire()
  os.utime(held.path, (time.time() - 100,) * 2)
  time.sleep(0.3)
  assert time.time() - os.stat(held.path).st_mtime < 5  # refreshed by the daemon thread
  held.release()
  assert not os.path.exists(held.path) and not held._thread.is_alive()
  with lock.FolderLock(tmp_path / "w", process_index=1):  # only process 0 takes it
    assert not os.path.exists(tmp_path / "w")
  with pytest.raises(ValueError, match="must exceed 2 x heartbeat_s"):
    lock.FolderLock(tmp_path, heartbeat_s=30, stale_after_s=45)
