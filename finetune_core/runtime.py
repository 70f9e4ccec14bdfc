"""The training process's runtime: CPU threads and heap, its memory peak, and resource errors.

    threads = set_cpu_threads()          # once, before the model loads
    peak_rss_mb()                        # the process's peak resident memory so far, in MB
    friendly = resource_error(exc)       # a full disk or exhausted memory as a FinetuneError, else None

Only training processes import this (it loads torch): train.py and the benchmarks.
"""

from __future__ import annotations

import errno
import os
import resource
import time

import psutil
import torch

from .errors import FinetuneError
from .malloc import keep_freed_memory


def set_cpu_threads() -> int:
    """One torch thread per physical core (hyper-threads slow matmul-bound training down); on CPU, a
    malloc setting that keeps freed tensor memory for reuse. Returns the torch thread count."""
    try:
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:  # noqa: BLE001 - some containers hide /sys: count logical CPUs instead
        cores = os.cpu_count() or 1
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = max(1, cores // max(1, world))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        keep_freed_memory()
    return torch.get_num_threads()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: the high-water mark of its own address space
    (VmHWM). Not getrusage's ru_maxrss: Linux carries a parent's peak across fork and exec into it, so
    a worker started by the app (whose RSS is ~1.4 GB with torch and gradio loaded) reported at least
    the app's peak, whatever it used itself."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0          # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # elsewhere: KiB on Linux, bytes on macOS


def process_start_time() -> float:
    """When this process started (time.time() scale); now, where the system does not say."""
    try:
        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - AccessDenied and friends in locked-down containers
        return time.time()


def resource_error(exc: BaseException) -> FinetuneError | None:
    """A FinetuneError for a full disk or exhausted memory anywhere in `exc`'s chain, else None.

    A full disk shows up as OSError(ENOSPC) from Python and safetensors, but as a RuntimeError
    ("file write failed") from torch.save's zip writer.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in text \
                or "file write failed" in text:
            return FinetuneError("The disk is full: a checkpoint or the model could not be written.",
                                 "Free disk space (delete old runs), then run again with resume: true to continue "
                                 "from the last complete checkpoint in checkpoints/.")
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return FinetuneError("Training ran out of memory.",
                                 "Lower per_device_train_batch_size or data.max_length, or use LoRA. Earlier "
                                 "checkpoints in checkpoints/ are intact; resume: true continues from the last one.")
        exc = exc.__cause__ or exc.__context__
    return None
