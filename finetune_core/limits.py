"""Limits for public deployments (a Hugging Face Space, a classroom server): the values in force.

Every function reads its setting (finetune_core.settings, the table of every FINETUNE_* variable) on
each call, so a test or a launcher can change a variable without re-importing anything. Unset (or
empty) means the default below; `FINETUNE_DEMO_MODE=1` turns every default into the safe value in
the "demo" column. An explicit variable always wins; one that is not a positive number raises
settings.SettingError naming it.

| variable                       | default   | demo  | where it is enforced                                    |
|--------------------------------|-----------|-------|---------------------------------------------------------|
| FINETUNE_MAX_UPLOAD_MB         | 50        | 10    | the app refuses bigger uploads; the engine              |
|                                |           |       | (`data.read_table`, hence CLI and `train()`) refuses    |
|                                |           |       | them only when the variable or demo mode is set         |
|                                |           |       | (`engine_max_bytes()`), so a local CLI user is not      |
|                                |           |       | limited.                                                |
| FINETUNE_MAX_ROWS              | none      | 5000  | `data.read_table` raises DataError naming the limit.    |
| FINETUNE_MAX_STEPS             | none      | 300   | `train()` lowers the run's optimizer steps to this and  |
|                                |           |       | says so in an `info` event.                             |
| FINETUNE_MAX_MINUTES           | none      | 15    | wall-clock minutes per job, from the start of `train()`:|
|                                |           |       | `time_limit_callback` stops the Trainer at the next     |
|                                |           |       | step end; the model is evaluated and saved as it is, an |
|                                |           |       | `info` event says why and metrics.json has              |
|                                |           |       | `stopped_by_time_limit`.                                |
| FINETUNE_MAX_CONCURRENT_JOBS   | 1         | 1     | training jobs running at once (the app's job queue).    |
| FINETUNE_AUTH                  | none      | none  | "user:password": the app asks for this login.           |

`safe_filename(name)` turns an uploaded file's name into one plain name that stays inside the folder
it is joined to (no path parts, no `..`, no hidden or device names).
"""

from __future__ import annotations

import re
import time
import unicodedata

from . import settings
from .events import rank0_decides

DEFAULT_UPLOAD_MB = 50.0
DEFAULT_CONCURRENT_JOBS = 1
DEMO = {"max_upload_mb": 10.0, "max_rows": 5000, "max_steps": 300, "max_minutes": 15.0, "max_concurrent_jobs": 1}


def demo_mode() -> bool:
    return settings.demo_mode()


def _limit(explicit, demo_value, default):
    if explicit is not None:
        return explicit
    if demo_mode():
        return demo_value
    return default


def max_upload_mb() -> float:
    """Largest accepted data file in MB (the app's upload limit)."""
    return _limit(settings.upload_limit_mb(), DEMO["max_upload_mb"], DEFAULT_UPLOAD_MB)


def max_upload_bytes() -> int:
    return int(max_upload_mb() * 1_000_000)


def engine_max_bytes() -> int | None:
    """The size limit the engine enforces: only when FINETUNE_MAX_UPLOAD_MB or demo mode is set."""
    if settings.upload_limit_mb() is not None or demo_mode():
        return max_upload_bytes()
    return None


def max_rows() -> int | None:
    return _limit(settings.row_limit(), DEMO["max_rows"], None)


def max_steps() -> int | None:
    return _limit(settings.step_limit(), DEMO["max_steps"], None)


def max_minutes() -> float | None:
    return _limit(settings.minute_limit(), DEMO["max_minutes"], None)


def max_concurrent_jobs() -> int:
    return _limit(settings.concurrent_jobs_limit(), DEMO["max_concurrent_jobs"], DEFAULT_CONCURRENT_JOBS)


def auth() -> tuple[str, str] | None:
    """(user, password) from FINETUNE_AUTH="user:password", or None when no login is required."""
    return settings.auth()


def summary() -> dict:
    """The limits in force, for a status line in the app or the logs (never the password)."""
    return {"demo_mode": demo_mode(), "max_upload_mb": max_upload_mb(), "max_rows": max_rows(),
            "max_steps": max_steps(), "max_minutes": max_minutes(),
            "max_concurrent_jobs": max_concurrent_jobs(), "auth": auth() is not None}


def time_limit_callback(deadline: float, writer=None, minutes: float | None = None):
    """A TrainerCallback that stops training at the first step end after `deadline` (time.time()).

    The Trainer then ends normally: train() evaluates and saves the model as it is. `triggered` tells
    whether it fired; an `info` event (through `writer`, an events.EventWriter) says why. Under
    torchrun / accelerate rank 0's clock decides for every rank (each rank started its clock at a
    slightly different time; ranks stopping at different steps would hang in the all-reduce).
    """
    from transformers import TrainerCallback   # deferred: the app imports limits at start-up

    class TimeLimitCallback(TrainerCallback):
        def __init__(self):
            self.triggered = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.triggered:
                return
            if rank0_decides(state.is_world_process_zero and time.time() >= deadline):
                self.triggered = True
                control.should_training_stop = True
                if writer is not None:
                    writer.info(f"Stopped at step {state.global_step} of {state.max_steps}: this deployment "
                                f"limits a job to {minutes:g} minutes (FINETUNE_MAX_MINUTES). The model is "
                                "evaluated and saved as it is now.",
                                step=state.global_step, max_steps=state.max_steps)

    return TimeLimitCallback()


# ---------------------------------------------------------------------------------------------
# uploaded file names

_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                    *(f"lpt{i}" for i in range(1, 10))}


def safe_filename(name: str, default: str = "upload", max_length: int = 100) -> str:
    """A plain file name safe to join to a folder: 'C:\\x\\..\\my data (1).csv' -> 'my_data_1_.csv'.

    Keeps only the last path component (either slash), ASCII letters, digits, '.', '_' and '-';
    strips leading dots (no hidden files, no '..'), refuses Windows device names, keeps the
    extension when shortening to `max_length`. Never returns an empty name.
    """
    name = unicodedata.normalize("NFKD", str(name or "")).encode("ascii", "ignore").decode("ascii")
    name = re.split(r"[\\/]", name)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._ -") or default
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if stem.lower() in _WINDOWS_DEVICES or not stem:
        stem = f"{default}_{stem}" if stem else default
    ext = ext[:16]
    stem = stem[: max(1, max_length - len(ext) - 1)]
    return f"{stem}.{ext}" if ext else stem
