"""Every `FINETUNE_*` environment variable, read on use (never at import time), documented once.

    from finetune_core import settings
    settings.home()                # Path: FINETUNE_HOME, default ~/.cache/finetune_lab
    settings.stop_timeout()        # 60.0 unless FINETUNE_STOP_TIMEOUT says otherwise

Each function reads `os.environ` when called, so a test (monkeypatch.setenv) or a launcher can change
a variable without re-importing anything. Policies built on these values live with their users:
`limits.py` turns the deployment limits and demo mode into the numbers in force, `jobs.py` applies
the timeouts. README.md ("Environment variables") has the same table with longer explanations.

| variable                        | function                 | default               | meaning                        |
|---------------------------------|--------------------------|-----------------------|--------------------------------|
| FINETUNE_HOME                   | home()                   | ~/.cache/finetune_lab | workspace: runs/, uploads ...  |
| FINETUNE_MODEL_CACHE            | model_cache()            | $FINETUNE_HOME/models | converted bundled models       |
| FINETUNE_DEMO_MODE              | demo_mode()              | off (Space: on)       | safe public defaults (limits)  |
| FINETUNE_MAX_UPLOAD_MB          | upload_limit_mb()        | 50 (demo 10)          | largest data file, MB          |
| FINETUNE_MAX_ROWS               | row_limit()              | none (demo 5000)      | rows per data file             |
| FINETUNE_MAX_STEPS              | step_limit()             | none (demo 300)       | optimizer steps per run        |
| FINETUNE_MAX_MINUTES            | minute_limit()           | none (demo 15)        | wall-clock minutes per run     |
| FINETUNE_MAX_CONCURRENT_JOBS    | concurrent_jobs_limit()  | 1 (demo 1)            | jobs running at once           |
| FINETUNE_MAX_QUEUED_PER_SESSION | max_queued_per_session() | 3                     | queued jobs per session        |
| FINETUNE_PRIVATE_RUNS           | private_runs()           | off (demo on)         | a session sees only its runs   |
| FINETUNE_AUTH                   | auth()                   | none                  | "user:password" login          |
| FINETUNE_STOP_TIMEOUT           | stop_timeout()           | 60 s                  | Stop -> kill while training    |
| FINETUNE_FINISH_TIMEOUT         | finish_timeout()         | 1800 s                | ... while not training         |
| FINETUNE_LAUNCHER               | launcher()               | none                  | e.g. accelerate launch ...     |
| FINETUNE_PUSH_NAMESPACE         | push_namespace()         | none                  | Hub org a shared app pushes to |
| FINETUNE_HUGEPAGES              | hugepages(env)           | off (1 = on)          | huge-page heap restart         |
| FINETUNE_SESSION_SECRET         | session_secret()         | a file in the home    | session ids survive restarts   |
| FINETUNE_MAX_THREADS            | max_threads()            | 80                    | gradio's worker threads        |
| FINETUNE_DEFAULT_CONCURRENCY    | default_concurrency()    | 4                     | gradio's limit per event       |
| FINETUNE_WARMUP_DELAY           | warmup_delay()           | 2 s                   | then torch loads in background |
| FINETUNE_MAX_HUB_ROWS           | max_hub_rows()           | 20000                 | rows taken from a Hub dataset  |
| FINETUNE_INFERENCE_CONCURRENCY  | inference_concurrency()  | 1                     | chat / predict calls at once   |
| FINETUNE_WORKER                 | WORKER_MARK              | (set)                 | 1 in a training worker's env   |
| FINETUNE_RESTARTED              | RESTARTED_MARK           | (set)                 | the huge-page restart is done  |

Read elsewhere, not by the engine: FINETUNE_DATA_DIR (docker/entrypoint.sh: the persistent volume,
default /data), FINETUNE_DATASETS and FINETUNE_BENCH_KEEP (benchmarks/), FINETUNE_CHROMIUM (tests/e2e).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .errors import ConfigError

WORKER_MARK = "FINETUNE_WORKER"
RESTARTED_MARK = "FINETUNE_RESTARTED"

DEFAULT_QUEUED_PER_SESSION = 3
DEFAULT_STOP_TIMEOUT = 60.0      # Stop pressed -> the Trainer must have stopped this many seconds later
DEFAULT_FINISH_TIMEOUT = 1800.0  # ... and loading before it, saving and evaluating after it, get this long


class SettingError(ConfigError):
    """A FINETUNE_* variable holds a value that cannot be used (the CLI exits 2, the app shows it)."""


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip()


def _flag(name: str) -> bool | None:
    """True / False for a yes/no variable, None when unset or empty."""
    value = _raw(name).lower()
    if not value:
        return None
    return value in ("1", "true", "yes", "on")


def _positive(name: str, cast):
    """The variable as a positive `cast` (int or float), None when unset or empty; anything else is
    refused with a SettingError naming the variable."""
    raw = _raw(name)
    if not raw:
        return None
    try:
        value = cast(float(raw)) if cast is int else cast(raw)
    except ValueError as exc:
        raise SettingError(f"The environment variable {name}={raw!r} is not a number.",
                           f"Set {name} to a positive number, or unset it for no limit.") from exc
    if value <= 0:
        raise SettingError(f"The environment variable {name}={raw!r} must be positive.",
                           f"Set {name} to a positive number, or unset it for no limit.")
    return value


def _lenient_int(name: str, default: int) -> int:
    """At least 1; a value that is not a whole number falls back to the default."""
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def _lenient_seconds(name: str, default: float) -> float:
    """A positive number of seconds; unset, bad or not positive falls back to the default."""
    try:
        value = float(_raw(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


# ---------------------------------------------------------------------------------------------
# folders


def home() -> Path:
    return Path(os.environ.get("FINETUNE_HOME") or Path.home() / ".cache" / "finetune_lab")


def model_cache() -> Path:
    return Path(os.environ.get("FINETUNE_MODEL_CACHE") or home() / "models")


# ---------------------------------------------------------------------------------------------
# public deployments (the policies are in limits.py)


def demo_mode() -> bool:
    return bool(_flag("FINETUNE_DEMO_MODE"))


def apply_space_defaults(environ=None) -> bool:
    """On a Hugging Face Space (SPACE_ID is set) turn demo mode on unless FINETUNE_DEMO_MODE is set.

    A Space pushed as is must not start open: no limits, runs shared between visitors, the owner's
    HF_TOKEN within everyone's reach. FINETUNE_DEMO_MODE=0 opts out. docker/entrypoint.sh does the
    same; this covers `python app.py` started some other way. Returns whether demo mode was turned on.
    """
    environ = os.environ if environ is None else environ
    if environ.get("SPACE_ID", "").strip() and not environ.get("FINETUNE_DEMO_MODE", "").strip():
        environ["FINETUNE_DEMO_MODE"] = "1"
        return True
    return False


def upload_limit_mb() -> float | None:
    return _positive("FINETUNE_MAX_UPLOAD_MB", float)


def row_limit() -> int | None:
    return _positive("FINETUNE_MAX_ROWS", int)


def step_limit() -> int | None:
    return _positive("FINETUNE_MAX_STEPS", int)


def minute_limit() -> float | None:
    return _positive("FINETUNE_MAX_MINUTES", float)


def concurrent_jobs_limit() -> int | None:
    return _positive("FINETUNE_MAX_CONCURRENT_JOBS", int)


def private_runs() -> bool | None:
    """FINETUNE_PRIVATE_RUNS as given; None when unset (jobs.py then follows demo mode)."""
    return _flag("FINETUNE_PRIVATE_RUNS")


def auth() -> tuple[str, str] | None:
    """(user, password) from FINETUNE_AUTH="user:password", or None when no login is required."""
    raw = os.environ.get("FINETUNE_AUTH", "")
    if not raw.strip():
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user.strip() or not password:
        raise SettingError("The environment variable FINETUNE_AUTH is not of the form user:password.",
                           "Set it as FINETUNE_AUTH=name:password, or unset it for no login.")
    return user.strip(), password


def push_namespace() -> str | None:
    ns = _raw("FINETUNE_PUSH_NAMESPACE").strip("/")
    return ns or None


def session_secret() -> str | None:
    return os.environ.get("FINETUNE_SESSION_SECRET") or None


# ---------------------------------------------------------------------------------------------
# the job manager


def max_queued_per_session() -> int:
    return _lenient_int("FINETUNE_MAX_QUEUED_PER_SESSION", DEFAULT_QUEUED_PER_SESSION)


def stop_timeout() -> float:
    return _lenient_seconds("FINETUNE_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT)


def finish_timeout() -> float:
    return _lenient_seconds("FINETUNE_FINISH_TIMEOUT", DEFAULT_FINISH_TIMEOUT)


def launcher() -> list[str] | None:
    """FINETUNE_LAUNCHER split like a shell would, None when unset."""
    raw = _raw("FINETUNE_LAUNCHER")
    return shlex.split(raw) if raw else None


def hugepages(environ=None) -> bool:
    """True for FINETUNE_HUGEPAGES=1 (in `environ`, default os.environ): the huge-page heap is opt-in (malloc.py)."""
    return (os.environ if environ is None else environ).get("FINETUNE_HUGEPAGES", "").strip() == "1"


# ---------------------------------------------------------------------------------------------
# the app's server (a bad value raises ValueError when the app starts, as int()/float() do)


def max_threads() -> int:
    return int(os.environ.get("FINETUNE_MAX_THREADS", "80"))


def default_concurrency() -> int:
    return int(os.environ.get("FINETUNE_DEFAULT_CONCURRENCY", "4"))


def warmup_delay() -> float:
    return float(os.environ.get("FINETUNE_WARMUP_DELAY", "2"))


def max_hub_rows() -> int:
    return int(os.environ.get("FINETUNE_MAX_HUB_ROWS", "20000"))


def inference_concurrency() -> int:
    return int(os.environ.get("FINETUNE_INFERENCE_CONCURRENCY", "1"))
