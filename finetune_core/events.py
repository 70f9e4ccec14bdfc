"""Run events: one JSON object per line in `events.jsonl`, flushed as it happens, rank 0 only.

    writer = EventWriter("runs/x/events.jsonl")
    writer.emit("start", max_steps=40, message="...")
    events, offset = read_events("runs/x/events.jsonl", offset=0)   # incremental tail for the UI

Types: start, log, eval, save, end, error (and `info` for messages such as the trainable-parameter
line). The app, the CLI and benchmarks all read this one file. One `info` event carries
`phase: "finishing"`: the Trainer has stopped (a Stop was honoured, or training ended) and what is
left is saving and evaluating; the job manager's kill clock covers only the time before it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

# The phases of one attempt, in order. Every event may carry one (`phase`); an attempt is one
# execution of train() on an output_dir (a resume or a re-run appends a new attempt to the same file),
# numbered by the `attempt` field. The job manager's kill clock runs only in "training": every other
# phase may legitimately take minutes, and a hard kill there would lose the model being written.
#   loading     data read, tokenized and audited; model loaded; strategy applied
#   training    the Trainer's loop
#   checkpoint  a mid-run evaluation and/or checkpoint write (training resumes after it)
#   saving      the Trainer has stopped (finished, early-stopped or Stop): the model is being written
#   evaluating  the tuned model measured on the validation data
#   baseline    the base model measured the same way (or read from the cache)
#   generating  held-out prompts answered
#   done, error the attempt's end
PHASES = ("loading", "training", "checkpoint", "saving", "evaluating", "baseline", "generating", "done", "error")


def is_main_process() -> bool:
    # torchrun and accelerate set RANK (global); LOCAL_RANK alone means a single machine.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def rank0_decides(flag: bool) -> bool:
    """Rank 0's `flag`, shared with every rank (one tiny broadcast) under torchrun / accelerate; the
    local flag in a single process. Every rank must call it at the same point of each step: ranks that
    stop at different steps wait forever for each other in the gradient all-reduce, so a stop (a STOP
    file, a time limit) is decided by rank 0 alone and all ranks stop together."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return bool(flag)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return bool(flag)
    device = torch.device("cpu")     # gloo takes CPU tensors; NCCL only CUDA ones
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    decision = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


class EventWriter:
    """Appends events to a JSONL file; on ranks other than 0 it writes nothing."""

    def __init__(self, path: str | Path, enabled: bool | None = None, echo=None):
        self.path = Path(path)
        self.enabled = is_main_process() if enabled is None else enabled
        self.echo = echo   # optional callable(event) e.g. printing to the console
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, type: str, **fields) -> dict:  # noqa: A002 - "type" is the schema's name
        event = {"type": type, "time": time.time()}
        event.update({k: _clean(v) for k, v in fields.items() if v is not None})
        if self.enabled:
            line = json.dumps(event, default=str)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
            if self.echo:
                self.echo(event)
        return event


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events appended since byte `offset`, and the new offset. A half-written last line waits."""
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    events = []
    consumed = 0
    for raw in chunk.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        consumed += len(raw)
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return events, offset + consumed


def read_all_events(path: str | Path) -> list[dict]:
    return read_events(path, 0)[0]
