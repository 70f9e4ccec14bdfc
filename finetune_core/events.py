"""Run events: one JSON object per line in `events.jsonl`, flushed as it happens, rank 0 only.

    writer = EventWriter(rundir.events_path(out))   # its attempt: the file's last attempt + 1
    writer.begin(f"Loading model {model} ...")      # the attempt's first event: phase "loading"
    writer.start(step=0, max_steps=40, epoch=0.0, num_train_epochs=3)
    writer.log(step=5, max_steps=40, epoch=0.4, eta_seconds=30.0, loss=0.9, learning_rate=2e-5)
    writer.phase("saving", "Training ended at step 40 of 40; saving and evaluating the model.")
    writer.end(step=40, max_steps=40, message="Done in 12.3s")      # or writer.error("...")

    events, offset = read_events(path, offset)      # incremental tail (the app's poller)
    p = progress(read_all_events(path))             # where the latest attempt is: a Progress
    format_event(e)                                 # one line for a terminal or the Train tab's log

The app, the CLI and the benchmarks all read this one file. Every event has `type`, `time` (epoch
seconds) and `attempt`: an attempt is one execution of train() on an output_dir, numbered 1, 2, ...
(a resume or a re-run appends a new attempt to the same file). An event that enters a phase carries
`phase` (see PHASES).

| type  | made by          | phase entered        | fields                                                      |
|-------|------------------|----------------------|-------------------------------------------------------------|
| info  | begin()          | loading              | message (the attempt's first event)                         |
| info  | phase()          | the one named        | message, step, max_steps; checkpoint: evaluate, save        |
| info  | info()           | -                    | message; the trainable-parameter line adds trainable_params |
| start | start()          | training             | step, max_steps, epoch, num_train_epochs                    |
| log   | log()            | -                    | step, max_steps, epoch, eta_seconds, loss, learning_rate,   |
|       |                  |                      | grad_norm                                                   |
| eval  | eval()           | -                    | step, max_steps, epoch, eta_seconds, eval_loss, eval_<name> |
| save  | save()           | -                    | step, max_steps, epoch, message ("checkpoint-N")            |
| end   | end()            | done                 | step, max_steps, epoch, message, train_seconds, main_metric,|
|       |                  |                      | stopped_early, stopped_by_user                              |
| error | error()          | error                | message                                                     |

`Progress` is the one reading of a stream: the job manager's kill clock, the plots, the CLI and the
Train tab all use it. Adding an event type: a constructor on EventWriter, a row above, a branch in
Progress.apply if it moves progress, a branch in format_event if it shows a line.

Files written before events carried `attempt` are read through one fallback (`_legacy_attempt_begin`):
an `info` whose message starts with "Loading model" begins an attempt. Their phase names "finishing"
and "evaluating" (a mid-run checkpoint) read as "saving" and "checkpoint" (`_phase_name`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# The phases of one attempt, in order. The job manager's kill clock runs only in "training"
# (kill_clock_runs): every other phase may legitimately take minutes, and a hard kill there would
# lose the model being written.
#   loading     data read, tokenized and audited; model loaded; strategy applied
#   training    the Trainer's loop
#   checkpoint  a mid-run evaluation and/or checkpoint write (training resumes after it)
#   saving      the Trainer has stopped (finished, early-stopped or Stop): the model is being written
#   evaluating  the tuned model measured on the validation data
#   baseline    the base model measured the same way (or read from the cache)
#   generating  held-out prompts answered
#   done, error the attempt's end
PHASES = ("loading", "training", "checkpoint", "saving", "evaluating", "baseline", "generating", "done", "error")
# After the Trainer stopped: one stretch for the kill clock (finish_timeout covers all of it).
AFTER_TRAINING = ("saving", "evaluating", "baseline", "generating", "done", "error")
# eval_* keys that are timings, or the checkpoint-selection key (evaluation.SELECTION_METRIC, F1 with a
# loss tie-break folded in), not scores: never shown or plotted as metrics
TIMING_SUFFIXES = ("runtime", "per_second", "preparation_time", "f1_then_loss")
_TAIL_BYTES = 64_000


def kill_clock_runs(phase: str) -> bool:
    """The job manager's stop_timeout clock runs only while the Trainer trains; loading, a mid-run
    checkpoint and everything after training get finish_timeout instead."""
    return phase == "training"


def after_training(phase: str) -> bool:
    return phase in AFTER_TRAINING


def is_main_process() -> bool:
    # torchrun and accelerate set RANK (global); LOCAL_RANK alone means a single machine.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def rank0_decides(flag: bool) -> bool:
    """Rank 0's `flag`, shared with every rank (one tiny broadcast) under torchrun / accelerate; the
    local flag in a single process. Every rank must call it at the same point of each step: ranks that
    stop at different steps wait forever for each other in the gradient all-reduce, so a stop (a STOP
    file, a time limit) is decided by rank 0 alone and all ranks stop together."""
    try:
        import torch                   # deferred: the app reads events without torch
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


def make_event(type: str, **fields) -> dict:  # noqa: A002 - "type" is the schema's name
    """An event dict: type, time, then `fields` (None dropped, NaN and inf as null)."""
    event = {"type": type, "time": time.time()}
    event.update({k: _clean(v) for k, v in fields.items() if v is not None})
    return event


# ---------------------------------------------------------------------------------------------
# writing


class EventWriter:
    """Appends one attempt's events to a JSONL file; on ranks other than 0 it writes nothing.

    `attempt` is the file's last attempt number plus 1, stamped on every event it writes."""

    def __init__(self, path: str | Path, enabled: bool | None = None, echo=None):
        self.path = Path(path)
        self.enabled = is_main_process() if enabled is None else enabled
        self.echo = echo   # optional callable(event) e.g. printing to the console
        self.attempt = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.attempt = last_attempt(self.path) + 1

    def emit(self, type: str, **fields) -> dict:  # noqa: A002 - "type" is the schema's name
        event = make_event(type, attempt=self.attempt, **fields)
        if self.enabled:
            line = json.dumps(event, default=str)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
            if self.echo:
                self.echo(event)
        return event

    # -- typed constructors (the table in the module docstring) --------------------------------

    def begin(self, message: str, **fields) -> dict:
        """The attempt's first event: phase "loading"."""
        return self.emit("info", phase="loading", message=message, **fields)

    def phase(self, name: str, message: str, **fields) -> dict:
        """Enter phase `name` (one of PHASES), e.g. "checkpoint" with evaluate=/save=, or "saving"."""
        return self.emit("info", phase=name, message=message, **fields)

    def info(self, message: str, **fields) -> dict:
        return self.emit("info", message=message, **fields)

    def start(self, step: int, max_steps: int, epoch: float | None = None, num_train_epochs=None) -> dict:
        return self.emit("start", phase="training", step=step, max_steps=max_steps, epoch=epoch or 0.0,
                         num_train_epochs=num_train_epochs)

    def log(self, step: int, max_steps: int, epoch: float | None = None, eta_seconds: float | None = None,
            loss: float | None = None, learning_rate: float | None = None, grad_norm: float | None = None) -> dict:
        return self.emit("log", step=step, max_steps=max_steps, epoch=epoch, eta_seconds=eta_seconds, loss=loss,
                         learning_rate=learning_rate, grad_norm=grad_norm)

    def eval(self, step: int, max_steps: int, epoch: float | None = None, eta_seconds: float | None = None,
             **metrics) -> dict:
        """An evaluation's numbers: eval_loss, eval_<metric>, eval_runtime ... as the Trainer logs them."""
        return self.emit("eval", step=step, max_steps=max_steps, epoch=epoch, eta_seconds=eta_seconds, **metrics)

    def save(self, step: int, max_steps: int, epoch: float | None = None) -> dict:
        return self.emit("save", step=step, max_steps=max_steps, epoch=epoch, message=f"checkpoint-{step}")

    def end(self, message: str, step: int | None = None, max_steps: int | None = None, epoch=None,
            **fields) -> dict:
        """The attempt finished (also when stopped): phase "done"; `fields` e.g. train_seconds,
        main_metric, stopped_early, stopped_by_user."""
        return self.emit("end", phase="done", step=step, max_steps=max_steps, epoch=epoch, message=message,
                         **fields)

    def error(self, message: str, **fields) -> dict:
        return self.emit("error", phase="error", message=message, **fields)


# ---------------------------------------------------------------------------------------------
# reading


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


def last_attempt(path: str | Path) -> int:
    """The number of the last attempt in an events file, 0 when it has none. Reads the file's tail;
    a file written before events carried `attempt` is read whole and its attempts counted."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            lines = f.read().splitlines()
    except OSError:
        return 0
    if size > _TAIL_BYTES:
        lines = lines[1:]                     # the first line of the tail may be cut
    for raw in reversed(lines):
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("attempt"), int):
            return event["attempt"]
    return progress(read_all_events(path)).attempt


def _legacy_attempt_begin(e: dict) -> bool:
    """Files without `attempt` fields: train() announced each attempt with this message."""
    return e.get("type") == "info" and str(e.get("message", "")).startswith("Loading model")


def begins_attempt(e: dict, current: int | None) -> bool:
    """Whether `e` is the first event of a new attempt, `current` being the attempt number of the
    events before it (None when they carried none)."""
    if e.get("attempt") is not None:
        return e["attempt"] != current
    return _legacy_attempt_begin(e)


def latest_attempt(events: list[dict]) -> list[dict]:
    """The events of the last attempt in `events`."""
    start, current = 0, None
    for i, e in enumerate(events):
        if begins_attempt(e, current):
            start = i
        if e.get("attempt") is not None:
            current = e["attempt"]
    return events[start:]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def eval_scores(e: dict) -> dict:
    """An eval event's scores by name without the eval_ prefix (loss included, timings left out)."""
    return {k[5:]: v for k, v in e.items() if k.startswith("eval_") and _number(v) and not k.endswith(TIMING_SUFFIXES)}


def _phase_name(name: str, current: str) -> str:
    """A `phase` field in today's vocabulary; older files said "finishing" for "saving" and, while
    training, "evaluating" for "checkpoint" (after training, "evaluating" is its own phase)."""
    if name == "finishing":
        return "saving"
    if name == "evaluating" and current in ("training", "checkpoint"):
        return "checkpoint"
    return name


@dataclass
class Progress:
    """Where the latest attempt of an event stream is. Feed it events in order (`apply`, `feed`, or
    `progress(events)`); an event of a new attempt starts it over."""

    attempt: int = 0                       # 1, 2, ...; 0 before any event
    phase: str = "loading"                 # one of PHASES
    phase_since: float | None = None       # when the phase began (event time)
    clock_since: float | None = None       # when the kill clock's stretch began: a change of phase,
    #                                        except between the phases after training (one stretch)
    step: int = 0
    max_steps: int | None = None
    epoch: float = 0.0
    eta_seconds: float | None = None
    eta_time: float | None = None          # when eta_seconds was measured
    loss: float | None = None              # the last train loss
    eval_loss: float | None = None
    eval_metrics: dict = field(default_factory=dict)   # the last evaluation's scores (eval_scores)
    message: str | None = None             # the last info or error message
    trainable: str | None = None           # the trainable-parameter line
    terminal: dict | None = None           # the attempt's end or error event
    phase_done: int | None = None          # countable work of the current phase (held-out prompts
    phase_total: int | None = None         # answered, batches measured): `done` / `total` fields
    events: int = 0                        # events of this attempt seen
    _attempt_field: int | None = field(default=None, repr=False)
    _checkpoint_step: int = field(default=0, repr=False)
    _checkpoint_saves: bool = field(default=False, repr=False)

    @property
    def ended(self) -> bool:
        return self.terminal is not None

    @property
    def in_training_loop(self) -> bool:
        """Training or a mid-run checkpoint: the Trainer has not stopped yet."""
        return self.phase in ("training", "checkpoint")

    def remaining_seconds(self, now: float | None = None) -> float | None:
        """The ETA counted down from when it was measured."""
        if self.eta_seconds is None:
            return None
        now = time.time() if now is None else now
        return max(0.0, self.eta_seconds - (now - (self.eta_time or now)))

    def feed(self, events) -> Progress:
        for e in events:
            self.apply(e)
        return self

    def apply(self, e: dict) -> bool:
        """Take one event into account. True when it began a new attempt after an earlier one."""
        when = float(e.get("time") or 0.0)
        new_attempt = begins_attempt(e, self._attempt_field)
        earlier = new_attempt and self.events > 0
        if new_attempt:
            number = e["attempt"] if e.get("attempt") is not None else self.attempt + 1
            self.__dict__.update(Progress(attempt=number, phase_since=when, clock_since=when).__dict__)
        elif self.attempt == 0:
            self.attempt = 1
        if e.get("attempt") is not None:
            self._attempt_field = e["attempt"]
        self.events += 1
        self._take_values(e, when)
        self._take_phase(e, when)
        return earlier

    def _take_values(self, e: dict, when: float) -> None:
        for key in ("step", "max_steps", "epoch", "eta_seconds"):
            if e.get(key) is not None:
                setattr(self, key, e[key])
        if e.get("eta_seconds") is not None:
            self.eta_time = when
        t = e.get("type")
        if t == "log" and e.get("loss") is not None:
            self.loss = e["loss"]
        elif t == "eval":
            self.eval_metrics = eval_scores(e)
            if e.get("eval_loss") is not None:
                self.eval_loss = e["eval_loss"]
        elif t == "info":
            self.message = e.get("message")
            if e.get("trainable_params") is not None:
                self.trainable = e.get("message")
        elif t == "end":
            self.eta_seconds = 0
            self.terminal = e
        elif t == "error":
            self.message = e.get("message")
            self.terminal = e
        if e.get("total") is not None:
            self.phase_done, self.phase_total = e.get("done") or 0, e["total"]

    def _take_phase(self, e: dict, when: float) -> None:
        t = e.get("type")
        if t == "start":
            new = "training"
        elif t == "end":
            new = "done"
        elif t == "error":
            new = "error"
        elif e.get("phase"):
            new = _phase_name(str(e["phase"]), self.phase)
        elif self.phase == "checkpoint" and (t == "save" or (t == "eval" and not self._checkpoint_saves) or
                                             (t == "log" and int(e.get("step") or 0) > self._checkpoint_step)):
            # the checkpoint is written (or its evaluation done, when it saves nothing); the step's own
            # loss point comes before its evaluation, so only a later step's means training again
            new = "training"
        else:
            return
        if new == self.phase:
            return
        if new == "checkpoint":
            self._checkpoint_step, self._checkpoint_saves = int(e.get("step") or 0), bool(e.get("save"))
        if not (after_training(new) and after_training(self.phase)):
            self.clock_since = when
        self.phase, self.phase_since = new, when
        if e.get("total") is None:
            self.phase_done = self.phase_total = None


def progress(events) -> Progress:
    """The Progress of the latest attempt in `events`."""
    return Progress().feed(events)


# ---------------------------------------------------------------------------------------------
# one line per event


def format_event(e: dict, stamp: bool = False) -> str | None:
    """The line a person reads for an event (None for events that show none); stamp=True puts the
    event's local time (HH:MM:SS) in front, as the Train tab's log does."""
    line = _event_line(e)
    if line is None or not stamp:
        return line
    return time.strftime("%H:%M:%S", time.localtime(e.get("time") or time.time())) + "  " + line


def _event_line(e: dict) -> str | None:
    t = e.get("type")
    if t == "log":
        loss = e.get("loss")
        eta = e.get("eta_seconds")
        return (f"step {e.get('step')}/{e.get('max_steps')}  epoch {e.get('epoch') or 0:.2f}  "
                f"loss {loss if loss is not None else float('nan'):.4f}  lr {e.get('learning_rate') or 0:.2e}"
                + (f"  eta {eta:.0f}s" if eta is not None else ""))
    if t == "eval":
        return f"eval @ step {e.get('step')}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_scores(e).items())
    if t == "start" and not e.get("message"):
        epochs = e.get("num_train_epochs")
        return f"training started: {e.get('max_steps')} steps" + (f", {epochs} epochs" if epochs is not None else "")
    if t == "save":
        return f"saved {e.get('message') or 'checkpoint'}"
    if t in ("start", "info", "end", "error") and e.get("message"):
        return f"[{t}] {e['message']}"
    return None
