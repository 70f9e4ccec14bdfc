"""glibc heap settings for training processes on CPU (no-ops elsewhere).

Training on a CPU allocates and frees gigabytes of activations and gradients every step. With glibc's
defaults each large block goes back to the kernel when freed and comes back as fresh zero-filled 4 KB
pages: hundreds of thousands of page faults per step, which are expensive (more so in a VM). Three
settings, each measured in `make bench` (benchmarks/ideas.py, benchmarks/instruction.py):

- `keep_freed_memory()`: keep freed blocks in the heap for reuse (mallopt, at run time): ~8% per step.
- `with_hugepages(env)`: glibc backs the heap with 2 MB transparent huge pages (`GLIBC_TUNABLES`,
  read once at process start, so it applies to a process started with that environment): 512x fewer
  faults. Opt-in (FINETUNE_HUGEPAGES=1), because whether it pays depends on the machine: on our AMD VM
  of 2026-11-25 it made the first training step of SmolLM2 ~4 s faster; on the same kind of VM on
  2026-12-04 (a Firecracker guest whose free memory goes back to its host) a fresh huge page cost 2-4 ms
  and SmolLM2's 48-row training loop took 34.7-37.4 s with the huge-page heap against 31.4-33.9 s
  without (four interleaved pairs). A probe that times writing 64 MB of new memory in each page size
  (tried that day as the default, then dropped) did not predict it: in the four first runs where huge
  pages mapped the 64 MB faster (6.3-11 ms against 33-36 ms) and the run took the huge-page heap, the
  loop took 36.6-37.3 s; in the two where they were slower (148-158 ms), 33.1-35.2 s with 4 KB pages.
- `release_free_memory()`: hand freed heap memory back (malloc_trim), e.g. between training and a
  second model load, so the two do not stack.

`python -m finetune_core train|compare|estimate` and `make bench` restart themselves once with
`with_hugepages` (`restart_with_hugepages`) when it changes anything.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from . import settings

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _glibc_supports_hugetlb() -> bool:
    name, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and (major, minor) >= (2, 35)


def _thp_available() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def with_hugepages(env) -> dict:
    """`env` plus the glibc tunable for huge-page heaps, where the user asked for it (FINETUNE_HUGEPAGES=1)
    and glibc and the kernel support it; otherwise `env` unchanged (the same object)."""
    if sys.platform != "linux" or not settings.hugepages(env):
        return env
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current or not _glibc_supports_hugetlb() or not _thp_available():
        return env
    new = dict(env)
    new["GLIBC_TUNABLES"] = f"{current}:{HUGEPAGES_TUNABLE}" if current else HUGEPAGES_TUNABLE
    return new


def keep_freed_memory() -> None:
    """Only blocks over 1 GiB are mmapped, and the heap is not trimmed below 2 GiB free: each step's
    tensors reuse the last step's memory. The peak is about the same; the process keeps it until exit."""
    try:
        libc = _libc()
        libc.mallopt(-3, 1 << 30)          # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 ** 31 - 1)      # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def restart_with_hugepages() -> None:
    """Re-execute this process (same pid, same interpreter flags and arguments) with `with_hugepages`,
    once, if that changes anything. Call it first thing in a `__main__`, before heavy imports."""
    if os.environ.get(settings.RESTARTED_MARK):
        return
    env = with_hugepages(os.environ)
    argv = list(getattr(sys, "orig_argv", []))
    if env is os.environ or not sys.executable or not argv:
        return
    env[settings.RESTARTED_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        pass        # no restart: everything works as before, only without huge pages
