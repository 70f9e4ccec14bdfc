"""Worker processes by pid: is one alive (and still the same process), when did it start, end it.

    create = process_create_time(proc.pid)     # recorded in job.json next to the pid
    pid_alive(pid, create)                     # False once it exited, or when the pid was reused
    kill_worker(pid)                           # SIGKILL to its process group, then to the pid
    end_worker(proc, grace=30)                 # SIGTERM to its group, SIGKILL after `grace` seconds

A worker runs in its own process group (jobs.start_worker), so signalling the group reaches the
processes it started too (torchrun / accelerate ranks, tokenizer or data-loader workers).
No torch here: the app imports this at start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def pid_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True while `pid` runs and is not a zombie; with `create_time` (from process_create_time) also
    False when the pid now belongs to another process."""
    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time and abs(proc.create_time() - float(create_time)) > 1.0:
            return False          # the pid was reused by another process
        return True
    except (psutil.Error, ValueError, TypeError):
        try:
            os.kill(int(pid), 0)
            return True
        except (OSError, ValueError, TypeError):
            return False


def process_create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _signal_group(pid: int | None, sig: int) -> None:
    """`sig` to the process group led by `pid`, then to `pid` itself (a worker that left its group)."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, sig)
        except (OSError, TypeError):
            continue


def kill_worker(pid: int | None) -> None:
    """Hard kill: SIGKILL to the worker's process group and to the worker."""
    _signal_group(pid, signal.SIGKILL)


def end_worker(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Ask a worker we started to end (SIGTERM to its group), kill it after `grace` seconds, reap it."""
    if proc.poll() is not None:
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill_worker(proc.pid)
        proc.wait()
