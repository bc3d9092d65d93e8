"""The run-folder lock between real processes: a second holder is refused with the first one's pid,
and a lock left by a killed process is taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from dcgan_dist.runlock import LOCK_NAME, RunLock, RunLockedError

HOLD = textwrap.dedent("""
    import sys, time
    from dcgan_dist.runlock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def start_holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_naming_the_first(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()} since " in message
        assert str(tmp_path) in message and "\n" not in message
        record = json.loads((tmp_path / LOCK_NAME).read_text())  # read back independently of the class
        assert record["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path) as lock:  # read through the held descriptor: closing another one would drop the lock
        assert json.loads(os.pread(lock._fd, 4096, 0))["pid"] == os.getpid()


def test_released_on_exit_of_the_with_block(tmp_path):
    with RunLock(tmp_path):
        pass
    with RunLock(tmp_path):  # would raise if the first were still held (locks are per process, so check in a child)
        child = subprocess.run([sys.executable, "-c", "import sys; from dcgan_dist.runlock import RunLock; "
                                "RunLock(sys.argv[1]).acquire()", str(tmp_path)], capture_output=True, text=True)
        assert child.returncode != 0 and "RunLockedError" in child.stderr
    child = subprocess.run([sys.executable, "-c", "import sys; from dcgan_dist.runlock import RunLock; "
                            "RunLock(sys.argv[1]).acquire(); print('ok')", str(tmp_path)], capture_output=True, text=True)
    assert child.stdout.strip() == "ok", child.stderr
