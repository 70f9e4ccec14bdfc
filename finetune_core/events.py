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


def _make_callback_class():
    # transformers (and torch) load only when a run starts: the app reads events without them.
    from transformers import TrainerCallback

    class EventsCallback(TrainerCallback):
        """Turns Trainer callbacks into events, with an ETA from the measured step rate."""

        def __init__(self, writer: EventWriter, stop_file: str | Path | None = None):
            self.writer = writer
            self.stop_file = Path(stop_file) if stop_file else None
            self.t0 = None
            self.first_step = 0
            self.stopped_by_user = False
            self.finishing = False

        def _eta(self, state) -> float | None:
            done = state.global_step - self.first_step
            if not self.t0 or done <= 0 or not state.max_steps:
                return None
            rate = (time.time() - self.t0) / done
            return max(0.0, rate * (state.max_steps - state.global_step))

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()
            self.first_step = state.global_step
            self.writer.emit("start", step=state.global_step, max_steps=state.max_steps,
                             epoch=state.epoch or 0.0, num_train_epochs=args.num_train_epochs)

        def _finishing(self, state, message: str) -> None:
            # Tells the job manager the Trainer honoured the stop (or is done): from here on, saving and
            # evaluating may take minutes, and a hard kill would lose the model.
            if not self.finishing:
                self.finishing = True
                self.writer.emit("info", phase="finishing", step=state.global_step, max_steps=state.max_steps,
                                 message=message)

        def on_step_end(self, args, state, control, **kwargs):
            # A stop request (file written by the app or by compare) ends training at this step; the
            # Trainer then saves a checkpoint and train() saves and evaluates the model as it is. Rank 0
            # alone looks at the file and every rank follows its decision (see rank0_decides).
            requested = self.stop_file is not None and state.is_world_process_zero and self.stop_file.exists()
            if rank0_decides(requested):
                self.stopped_by_user = True
                control.should_training_stop = True
                control.should_save = True
                self._finishing(state, f"Stop received: training ends at step {state.global_step} of "
                                       f"{state.max_steps}; saving a checkpoint, then the model, then evaluating.")
            else:
                self._maybe_evaluating(state, control)

        def on_epoch_end(self, args, state, control, **kwargs):
            self._maybe_evaluating(state, control)   # eval/save "epoch": the flow callback decides here

        def _maybe_evaluating(self, state, control) -> None:
            # The default flow callback (it runs before this one) has decided to evaluate and/or save now.
            # Tell the job manager: a Stop pressed during a long evaluation or checkpoint write must not
            # hard-kill the worker mid-save (it gets finish_timeout until the next save/eval/log event).
            if self.finishing or not (control.should_evaluate or control.should_save):
                return
            what = " and ".join(w for w, on in (("evaluating", control.should_evaluate),
                                                 ("saving a checkpoint", control.should_save)) if on)
            self.writer.emit("info", phase="evaluating", step=state.global_step, max_steps=state.max_steps,
                             evaluate=bool(control.should_evaluate), save=bool(control.should_save),
                             message=f"Step {state.global_step}: {what}.")

        def on_train_end(self, args, state, control, **kwargs):
            self._finishing(state, f"Training ended at step {state.global_step} of {state.max_steps}; "
                                   "saving and evaluating the model.")

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            common = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                      "eta_seconds": self._eta(state)}
            if any(k.startswith("eval_") for k in logs):
                metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k not in common}
                self.writer.emit("eval", **common, **metrics)
            elif "loss" in logs:
                self.writer.emit("log", **common, loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                                 grad_norm=logs.get("grad_norm"))

        def on_save(self, args, state, control, **kwargs):
            self.writer.emit("save", step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
                             message=f"checkpoint-{state.global_step}")

    return EventsCallback


def __getattr__(name):
    if name == "EventsCallback":
        cls = _make_callback_class()
        globals()["EventsCallback"] = cls
        return cls
    raise AttributeError(name)
