"""glibc heap settings for training processes on CPU (no-ops elsewhere).

Training on a CPU allocates and frees gigabytes of activations and gradients every step. With glibc's
defaults each large block goes back to the kernel when freed and comes back as fresh zero-filled 4 KB
pages: hundreds of thousands of page faults per step, which are expensive (more so in a VM). Three
settings, each measured in `make bench` (benchmarks/ideas.py, benchmarks/instruction.py):

- `keep_freed_memory()`: keep freed blocks in the heap for reuse (mallopt, at run time): ~8% per step.
- `with_hugepages(env)`: glibc backs the heap with 2 MB transparent huge pages (`GLIBC_TUNABLES`,
  read once at process start, so it applies to a process started with that environment), where they
  map fresh memory faster than 4 KB pages. That depends on the machine, so by default
  (FINETUNE_HUGEPAGES unset) `huge_pages_map_faster()` measures it, ~0.1 s: on the AMD VM of
  2026-11-25, 512x fewer faults made the first training step of SmolLM2 ~4 s faster; on the same kind
  of VM on 2026-12-04 (a Firecracker guest whose free memory is handed back to the host), a fresh huge
  page cost 2-4 ms, 64 MB touched took 124 ms in huge pages against 32 ms in 4 KB pages, and SmolLM2's
  48-row training loop took 34.7-37.4 s with the huge-page heap against 31.4-33.9 s without (four
  interleaved pairs); an hour later, with memory just freed by other runs, huge pages mapped the 64 MB
  in 6.3-6.6 ms against 33 ms. FINETUNE_HUGEPAGES=1 forces them, 0 turns them off.
- `release_free_memory()`: hand freed heap memory back (malloc_trim), e.g. between training and a
  second model load, so the two do not stack.

`python -m finetune_core train|compare|estimate` and `make bench` restart themselves once with
`with_hugepages` (`restart_with_hugepages`) when it changes anything.
"""

from __future__ import annotations

import os
import platform
import sys
import time
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


PROBE_BYTES = 64 << 20


def first_touch_ms(nbytes: int, huge: bool) -> float:
    """Milliseconds to write one byte into every 4 KB page of `nbytes` of new anonymous memory, mapped in
    2 MB huge pages (`huge`) or in 4 KB pages: the cost of fresh memory is the page faults that zero-fill
    it (and, in a VM, the host's work behind them), which this measures."""
    import mmap

    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        start = time.perf_counter()
        for offset in range(0, nbytes, 4096):
            region[offset] = 1
        return (time.perf_counter() - start) * 1000
    finally:
        region.close()


def huge_pages_map_faster(nbytes: int = PROBE_BYTES) -> tuple[bool, float, float]:
    """(whether huge pages map fresh memory faster here, their ms, 4 KB pages' ms) for `nbytes` each.
    Huge pages first: a new training process takes its memory as the first probe finds it."""
    try:
        huge = first_touch_ms(nbytes, True)
        small = first_touch_ms(nbytes, False)
    except (OSError, ValueError, AttributeError):       # no madvise, or no huge-page advice here
        return False, float("nan"), float("nan")
    return huge < small, huge, small


def with_hugepages(env) -> dict:
    """`env` plus the glibc tunable for huge-page heaps, where glibc and the kernel support it and either
    FINETUNE_HUGEPAGES=1 or (unset) `huge_pages_map_faster()` says they pay. `env` itself (unchanged) when
    nothing applies; otherwise a copy, which after a measurement also holds its result (FINETUNE_HEAP_PROBE:
    "huge_ms,small_ms", for metrics.json), with or without the tunable."""
    mode = settings.hugepages(env)
    if sys.platform != "linux" or mode == "off":
        return env
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current or not _glibc_supports_hugetlb() or not _thp_available():
        return env
    new = dict(env)
    if mode == "auto":
        faster, huge_ms, small_ms = huge_pages_map_faster()
        if huge_ms == huge_ms:          # not NaN: the probe ran
            new[settings.HEAP_PROBE] = f"{huge_ms:.1f},{small_ms:.1f}"
        if not faster:
            return new
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
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        if settings.HEAP_PROBE in env:
            os.environ[settings.HEAP_PROBE] = env[settings.HEAP_PROBE]    # measured: 4 KB pages stay
        return
    argv = list(getattr(sys, "orig_argv", []))
    if not sys.executable or not argv:
        return
    env[settings.RESTARTED_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        pass        # no restart: everything works as before, only without huge pages
