"""Training jobs: each run is `python -m finetune_core train RUN_DIR/run_request.yaml` in a worker process.

    manager = JobManager()                                # runs under FINETUNE_HOME/runs/<id>
    job = manager.submit(config_dict, owner="session-token")
    events, offset = read_events(job.events_path, 0)      # tail the worker's progress
    manager.stop(job.run_id, owner="session-token")       # STOP file first, hard kill after a timeout

The worker runs exactly the CLI's code path (same `train()`), writes everything into its run folder
and keeps a log of its stdout/stderr in `worker.log`. Job state that must survive an app restart
(owner, status, worker pid) lives in `job.json` next to the outputs, so a restarted app lists past
runs, re-queues jobs that never started and reconnects to workers that are still running.

No gradio and no torch here: this module is imported by the app at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FinetuneError
from .limits import max_concurrent_jobs as _max_concurrent_jobs
from .limits import safe_filename as _safe_name


from .events import read_events  # noqa: E402,F401 - light: transformers loads only when a run starts


def worker_command(python: str, request_path) -> list[str]:
    """The worker's command line. FINETUNE_LAUNCHER hands the job to a launcher instead of a plain
    process, e.g. `accelerate launch --config_file examples/accelerate/ddp_multi_gpu.yaml` to train on
    every GPU of the machine; the launcher gets `-m finetune_core train RUN_DIR/run_request.yaml`."""
    import shlex

    launcher = os.environ.get("FINETUNE_LAUNCHER", "").strip()
    prefix = shlex.split(launcher) if launcher else [python]
    return prefix + ["-m", "finetune_core", "train", str(request_path)]

STOP_FILE = "STOP"              # train.py's EventsCallback checks output_dir/STOP at every step end
REQUEST_FILE = "run_request.yaml"
JOB_FILE = "job.json"
LOG_FILE = "worker.log"

ACTIVE = ("queued", "running", "stopping")
TERMINAL = ("finished", "stopped", "failed", "cancelled", "interrupted")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class JobError(FinetuneError):
    """A job request the user can fix (not the owner, unknown run, queue full...)."""


class OwnerBusy(JobError):
    """submit(one_active_per_owner=True) while this owner has a queued or running job (`.job`)."""

    def __init__(self, job: "Job"):
        self.job = job
        super().__init__(f"Your run '{job.name or job.run_id}' is still {job.status}: one run at a time.",
                         "Press Stop to end it, then start again.")


def finetune_home() -> Path:
    return Path(os.environ.get("FINETUNE_HOME") or Path.home() / ".cache" / "finetune_lab")


def default_runs_dir() -> Path:
    return finetune_home() / "runs"


def owner_key(owner: str | None) -> str | None:
    """What job.json stores about the owner: a hash, never the session token itself."""
    if not owner:
        return None
    return hashlib.sha256(str(owner).encode("utf-8")).hexdigest()[:32]


def new_run_id() -> str:
    return secrets.token_hex(8)   # 64 random bits: run folders cannot be guessed by other users


# ---------------------------------------------------------------------------------------------
# small file helpers


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def tail_lines(path: Path, n: int = 20, max_bytes: int = 64_000) -> list[str]:
    """The last `n` non-empty lines of a (possibly large) text file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-n:]


def _error_lines(path: Path, n: int = 12) -> list[str]:
    """The informative end of a worker log: from the last traceback / 'Error' line on, if any."""
    lines = tail_lines(path, 200)
    start = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback") or line.startswith("Error:") or "Error" in line.split(":")[0]:
            start = i if start is None or line.startswith("Traceback") else start
    picked = lines[start:] if start is not None else lines
    return picked[-n:]


def latest_attempt(events: list[dict]) -> list[dict]:
    """Events of the last attempt: a resumed or re-run output_dir appends a new 'Loading model' block."""
    start = 0
    for i, e in enumerate(events):
        if e.get("type") == "info" and str(e.get("message", "")).startswith("Loading model"):
            start = i
    return events[start:]


def _terminal_event(events: list[dict]) -> dict | None:
    for e in reversed(latest_attempt(events)):
        if e.get("type") in ("end", "error"):
            return e
    return None


def _pid_alive(pid: int | None, create_time: float | None = None) -> bool:
    if not pid:
        return False
    try:
        import psutil

        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time and abs(proc.create_time() - float(create_time)) > 1.0:
            return False          # the pid was reused by another process
        return True
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied, psutil missing
        try:
            os.kill(int(pid), 0)
            return True
        except OSError:
            return False


def _process_create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------
# run folders (also those written by the CLI)


_WATCHED = (JOB_FILE, "events.jsonl", "metrics.json", "run.yaml", REQUEST_FILE)
_FILES_CACHE: dict[str, tuple[tuple, dict]] = {}
_FILES_LOCK = threading.Lock()


def _signature(run_dir: Path) -> tuple:
    """(inode, mtime, size) of each file a run row is read from: any write changes it (the JSON files
    are replaced atomically, so even a same-size rewrite gets a new inode; events.jsonl only grows)."""
    sig = []
    for name in _WATCHED:
        try:
            st = os.stat(run_dir / name)
            sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append(None)
    return tuple(sig)


def _load_config_file(run_dir: Path) -> dict:
    for name in ("run.yaml", REQUEST_FILE):
        if (run_dir / name).exists():
            try:
                import yaml

                return yaml.safe_load((run_dir / name).read_text(encoding="utf-8")) or {}
            except Exception:  # noqa: BLE001
                return {}
    return {}


def _run_files(run_dir: Path) -> dict:
    """What a run folder's rows and status are made of (job.json, the last attempt's end or error
    event, metrics.json, the config), parsed once and reused until one of those files changes: the
    run list is rebuilt on every tab select, and a classroom Space holds hundreds of runs whose
    events.jsonl files each have thousands of lines."""
    key = str(run_dir)
    sig = _signature(run_dir)
    with _FILES_LOCK:
        hit = _FILES_CACHE.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    has_events = sig[1] is not None
    events = read_events(run_dir / "events.jsonl", 0)[0] if has_events else []
    files = {"job": _read_json(run_dir / JOB_FILE), "has_events": bool(events), "term": _terminal_event(events),
             "metrics": _read_json(run_dir / "metrics.json"), "cfg": _load_config_file(run_dir),
             "events_mtime": sig[1][1] / 1e9 if has_events else None}
    with _FILES_LOCK:
        _FILES_CACHE[key] = (sig, files)
    return files


def _forget_deleted_runs(runs_dir: Path, seen: set[str]) -> None:
    """Drop cache entries of run folders under `runs_dir` that are gone."""
    with _FILES_LOCK:
        for key in [k for k in _FILES_CACHE if k not in seen and Path(k).parent == runs_dir]:
            del _FILES_CACHE[key]


def run_status_from_disk(run_dir: str | Path) -> dict:
    """Status of a run folder nobody is watching: finished / stopped / failed / interrupted / ...

    A run with events but no end or error event and no live worker is 'interrupted'.
    """
    run_dir = Path(run_dir)
    files = _run_files(run_dir)
    job, events, term = dict(files["job"]), files["has_events"], files["term"]
    error = None
    if term is not None and term["type"] == "end":
        stopped = files["metrics"].get("stopped_by_user") or term.get("stopped_by_user") or job.get("stop_requested")
        status = "stopped" if stopped else "finished"
    elif term is not None:
        status, error = "failed", term.get("message")
    elif job.get("status") in ("cancelled",):
        status = "cancelled"
    elif job.get("status") in ("running", "stopping") and _pid_alive(job.get("pid"), job.get("pid_create_time")):
        status = job["status"]
    elif job.get("status") == "queued" and not events:
        status = "queued"
    elif job.get("status") == "failed":
        status, error = "failed", job.get("error")
    elif events or job.get("status") in ("running", "stopping"):
        status = "interrupted"
        error = "The worker stopped without finishing (app or machine restarted, or the process was killed)."
    else:
        status = "empty"
    return {"status": status, "error": error, "job": job}


def summarize_run(run_dir: str | Path, status: dict | None = None) -> dict:
    """One row for run tables: what was trained, how it went, where the outputs are."""
    run_dir = Path(run_dir)
    status = status or run_status_from_disk(run_dir)
    job = status.get("job") or {}
    files = _run_files(run_dir)
    metrics, cfg = files["metrics"], files["cfg"]
    task = metrics.get("task") or cfg.get("task") or job.get("task")
    strategy = metrics.get("strategy") or (cfg.get("strategy") or {}).get("name") or job.get("strategy")
    model = metrics.get("model") or cfg.get("model") or job.get("model")
    if task == "classification":
        main_name, main = "f1_weighted", metrics.get("f1_weighted")
    else:
        main_name, main = "eval_loss", metrics.get("eval_loss")
    created = job.get("created")
    if created is None:
        created = files["events_mtime"]
    if created is None:
        try:
            created = run_dir.stat().st_mtime
        except OSError:
            created = 0.0
    return {
        "run_id": run_dir.name, "name": job.get("name") or run_dir.name, "run_dir": str(run_dir),
        "status": status["status"], "error": status.get("error"), "task": task, "strategy": strategy,
        "model": model, "main_metric_name": main_name, "main_metric": main,
        "accuracy": metrics.get("accuracy"), "f1_weighted": metrics.get("f1_weighted"),
        "eval_loss": metrics.get("eval_loss"), "perplexity": metrics.get("perplexity"),
        "train_seconds": metrics.get("train_seconds"), "trainable_params": metrics.get("trainable_params"),
        "total_params": metrics.get("total_params"), "created": float(created or 0.0),
        "has_model": (run_dir / "model").is_dir(), "owner": job.get("owner"),
    }


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    run_id: str
    run_dir: Path
    owner: str | None                     # hash of the owner's session token
    name: str
    created: float
    task: str = ""
    model: str = ""
    strategy: str = ""
    status: str = "queued"
    pid: int | None = None
    pid_create_time: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    returncode: int | None = None
    error: str | None = None
    error_lines: list[str] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None
    stop_requested: float | None = None
    killed: bool = False
    # Where the worker is, from its events (read only once a stop is requested): "loading" until the
    # Trainer starts, "training" ("evaluating" during a mid-run evaluation or checkpoint), then
    # "finishing" (saving and evaluating) from the phase event on.
    phase: str = "loading"
    phase_since: float | None = None
    phase_save: bool = False
    phase_step: int = 0
    events_offset: int = field(default=0, repr=False)

    @property
    def events_path(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE

    @property
    def request_path(self) -> Path:
        return self.run_dir / REQUEST_FILE

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "name": self.name, "owner": self.owner, "created": self.created,
                "task": self.task, "model": self.model, "strategy": self.strategy, "status": self.status,
                "pid": self.pid, "pid_create_time": self.pid_create_time, "returncode": self.returncode,
                "error": self.error, "started": self.started, "ended": self.ended,
                "stop_requested": self.stop_requested, "killed": self.killed}


def _private_runs_default() -> bool:
    """Runs are private to their browser session on a public deployment (demo mode) or when
    FINETUNE_PRIVATE_RUNS=1; on a laptop (the default) every run stays reachable after a restart."""
    from .limits import demo_mode

    value = os.environ.get("FINETUNE_PRIVATE_RUNS", "").strip().lower()
    if value:
        return value in ("1", "true", "yes", "on")
    return demo_mode()


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default
    return value if value > 0 else default


DEFAULT_STOP_TIMEOUT = 60.0      # Stop pressed -> the Trainer must have stopped this many seconds later
DEFAULT_FINISH_TIMEOUT = 1800.0  # ... and loading before it, saving and evaluating after it, get this long


class JobManager:
    """Runs training jobs in worker processes, at most `max_concurrent` at a time, the rest queued.

    Thread-safe. A monitor thread reaps finished workers (no zombies), starts queued jobs, re-asserts
    STOP files and hard-kills workers that ignore a stop: one whose Trainer is still training
    `stop_timeout` seconds after the Stop (FINETUNE_STOP_TIMEOUT, 60 s), or one still loading, or
    saving and evaluating after the Trainer stopped, `finish_timeout` seconds after the Stop or after
    it began finishing (FINETUNE_FINISH_TIMEOUT, 1800 s: an instruction run measures its base model
    and generates answers after training). The worker says which phase it is in through events.
    """

    def __init__(self, runs_dir: str | Path | None = None, max_concurrent: int | None = None,
                 stop_timeout: float | None = None, poll_interval: float = 0.5, python: str | None = None,
                 max_queued_per_owner: int | None = None, cwd: str | Path | None = None,
                 private_runs: bool | None = None, finish_timeout: float | None = None):
        self.runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.max_concurrent = max_concurrent or _max_concurrent_jobs()
        self.max_queued_per_owner = max_queued_per_owner or _env_int("FINETUNE_MAX_QUEUED_PER_SESSION", 3)
        # an explicit argument wins over the environment, which wins over the default
        self.stop_timeout = float(stop_timeout) if stop_timeout is not None else \
            _env_seconds("FINETUNE_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT)
        self.finish_timeout = float(finish_timeout) if finish_timeout is not None else \
            _env_seconds("FINETUNE_FINISH_TIMEOUT", DEFAULT_FINISH_TIMEOUT)
        self.poll_interval = poll_interval
        self.python = python or sys.executable
        self.cwd = str(cwd or os.getcwd())
        if private_runs is None:
            private_runs = _private_runs_default()
        self.private_runs = private_runs
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._closed = False
        self._recover()
        self._thread = threading.Thread(target=self._monitor, name="finetune-jobs", daemon=True)
        self._thread.start()

    # -- recovery after an app restart ----------------------------------------------------------

    def _recover(self) -> None:
        """Re-queue jobs that never started; adopt workers that outlived the previous app."""
        queued = []
        for run_dir in self.runs_dir.iterdir() if self.runs_dir.is_dir() else []:
            info = _read_json(run_dir / JOB_FILE)
            if not info or info.get("run_id") != run_dir.name or info.get("status") not in ACTIVE:
                continue
            status = run_status_from_disk(run_dir)["status"]
            if status not in ACTIVE:                    # record what we found out
                info["status"] = status
                info["ended"] = info.get("ended") or time.time()
                _write_json(run_dir / JOB_FILE, info)
                continue
            job = Job(run_id=info["run_id"], run_dir=run_dir, owner=info.get("owner"), name=info.get("name", ""),
                      created=info.get("created", 0.0), task=info.get("task", ""), model=info.get("model", ""),
                      strategy=info.get("strategy", ""), status=status, pid=info.get("pid"),
                      pid_create_time=info.get("pid_create_time"), started=info.get("started"),
                      stop_requested=info.get("stop_requested"))
            self._jobs[job.run_id] = job
            if status == "queued":
                queued.append(job)
        for job in sorted(queued, key=lambda j: j.created):
            self._queue.append(job.run_id)

    # -- public API ---------------------------------------------------------------------------

    def submit(self, config, owner: str | None, name: str | None = None, one_active_per_owner: bool = False) -> Job:
        """Validate `config` (RunConfig, dict or YAML path), create the run folder and queue the job.

        Data files are copied into RUN_DIR/data/ so the run stays reproducible after uploads expire.
        one_active_per_owner: refuse (OwnerBusy) while this owner has a queued or running job; checked
        under the lock that queues the job, so two Start clicks at once cannot both get through.
        """
        from .config import RunConfig, config_from_dict, config_to_dict, dump_config, load_config

        if isinstance(config, (str, Path)):
            cfg = load_config(config)
        elif isinstance(config, RunConfig):
            cfg = config_from_dict(config_to_dict(config))
        else:
            cfg = config_from_dict(json.loads(json.dumps(config, default=str)))
        okey = owner_key(owner)
        with self._lock:
            if self._closed:
                raise JobError("The job manager is shutting down.", "Try again in a moment.")
            mine = [j for j in self._jobs.values() if j.owner == okey and j.status == "queued"]
            if okey and len(mine) >= self.max_queued_per_owner:
                raise JobError(f"You already have {len(mine)} runs waiting in the queue.",
                               "Wait for one to start, or stop a queued run, before adding another.")
        run_id = new_run_id()
        run_dir = self.runs_dir / run_id
        run_dir.mkdir(parents=True)
        data_dir = run_dir / "data"
        for attr in ("train", "validation"):
            src = getattr(cfg.data, attr)
            if not src:
                continue
            path = Path(src).expanduser()
            if not path.is_absolute():
                path = Path(self.cwd) / path
            if not path.is_file():
                shutil.rmtree(run_dir, ignore_errors=True)
                raise JobError(f"The {attr} data file '{src}' does not exist.",
                               "Upload the file again or pick a built-in example.")
            data_dir.mkdir(exist_ok=True)
            target = data_dir / f"{attr}_{_safe_name(path.name)}"
            shutil.copyfile(path, target)
            setattr(cfg.data, attr, str(target))
        cfg.output_dir = str(run_dir)
        cfg.resume = False
        dump_config(cfg, run_dir / REQUEST_FILE)
        if not name:
            short = cfg.model.split("/")[-1].replace("bundled:", "")
            name = f"{cfg.task[:5]}-{cfg.strategy.name}-{short}-{time.strftime('%m%d-%H%M%S')}"
        job = Job(run_id=run_id, run_dir=run_dir, owner=okey, name=name, created=time.time(), task=cfg.task,
                  model=cfg.model, strategy=cfg.strategy.name)
        with self._lock:
            busy = [j for j in self._jobs.values() if j.owner == okey and j.active] if okey else []
            if one_active_per_owner and busy:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise OwnerBusy(busy[-1])
            self._jobs[run_id] = job
            self._queue.append(run_id)
            self._save(job)
            self._schedule()
        self._wake.set()
        return job

    def resume(self, run_id: str, owner: str | None) -> Job:
        """Queue a stopped, interrupted or failed run again with `resume: true`: training continues
        from its last complete checkpoint, with the same step count; events.jsonl continues."""
        run_dir = self.run_dir(run_id)
        info = _read_json(run_dir / JOB_FILE)
        if not info:
            raise JobError(f"No run with id '{run_id}'.", "Pick a run from the list.")
        if not self.is_owner(run_id, owner):
            raise JobError("Only the browser session that started this run can resume it.",
                           "Open the app in the browser that started it, or use the CLI with resume: true.")
        current = self.get(run_id)
        if current is not None and current.active:
            raise JobError("This run is still queued or running.", "Stop it first, or wait for it to end.")
        complete = [c for c in (run_dir / "checkpoints").glob("checkpoint-*") if (c / "trainer_state.json").exists()]
        if not complete:
            raise JobError("This run has no complete checkpoint to resume from.",
                           "A run keeps checkpoints when it is stopped or interrupted after its first save "
                           "(each epoch); start a new run instead.")
        from .config import dump_config, load_config

        cfg = load_config(run_dir / REQUEST_FILE)
        cfg.resume = True
        dump_config(cfg, run_dir / REQUEST_FILE)
        job = Job(run_id=run_id, run_dir=run_dir, owner=info.get("owner"), name=info.get("name", run_id),
                  created=info.get("created", time.time()), task=info.get("task", ""), model=info.get("model", ""),
                  strategy=info.get("strategy", ""))
        with self._lock:
            self._jobs[run_id] = job
            self._queue.append(run_id)
            self._save(job)
            self._schedule()
        self._wake.set()
        return job

    def get(self, run_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(run_id)

    def is_owner(self, run_id: str, owner: str | None) -> bool:
        job = self.get(run_id)
        okey = owner_key(owner)
        if job is not None:
            return okey is not None and job.owner == okey
        info = _read_json(self.run_dir(run_id) / JOB_FILE)
        return okey is not None and info.get("owner") == okey

    def can_view(self, run_id: str, owner: str | None) -> bool:
        """Everyone sees every run unless private runs are on (FINETUNE_PRIVATE_RUNS=1)."""
        if not self.private_runs:
            return True
        info = _read_json(self.run_dir(run_id) / JOB_FILE)
        return not info.get("owner") or info.get("owner") == owner_key(owner)

    def position(self, run_id: str) -> int | None:
        """0 while running, 1.. in the queue (1 = next), None when not active."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None:
                return None
            if job.status in ("running", "stopping"):
                return 0
            if run_id in self._queue:
                return self._queue.index(run_id) + 1
            return None

    def stop(self, run_id: str, owner: str | None) -> str:
        """Graceful stop (STOP file; the model is saved and evaluated); a hard kill only if the Trainer
        has not stopped within stop_timeout (or loading / finishing outlast finish_timeout)."""
        job = self.get(run_id)
        if job is None:
            raise JobError(f"No active job with id '{run_id}'.", "It may have finished already; refresh the run list.")
        if not self.is_owner(run_id, owner):
            raise JobError("Only the browser session that started this run can stop it.",
                           "Open the app in the browser that started it.")
        with self._lock:
            if job.status == "queued":
                if run_id in self._queue:
                    self._queue.remove(run_id)
                job.status, job.ended = "cancelled", time.time()
                self._save(job)
                return "Removed from the queue before it started."
            if job.status not in ("running", "stopping"):
                return f"The run has already {job.status}."
            if job.stop_requested is None:
                job.stop_requested = time.time()
                job.status = "stopping"
                self._save(job)
            self._write_stop(job)
        self._wake.set()
        return (f"Stop requested: training ends after the current step, then the model is saved and evaluated "
                f"(forced if training has not stopped within {self.stop_timeout:.0f} s).")

    def jobs(self, owner: str | None = None, active_only: bool = False) -> list[Job]:
        okey = owner_key(owner) if owner is not None else None
        with self._lock:
            out = [j for j in self._jobs.values() if (owner is None or j.owner == okey)
                   and (not active_only or j.active)]
        return sorted(out, key=lambda j: j.created)

    def status(self, run_id: str) -> dict:
        """Status of any run (a job of this manager or a folder on disk) with queue position."""
        job = self.get(run_id)
        if job is not None:
            with self._lock:
                return {"run_id": run_id, "status": job.status, "position": self.position(run_id),
                        "error": job.error, "error_lines": list(job.error_lines), "returncode": job.returncode,
                        "owner": job.owner, "name": job.name, "queue_length": len(self._queue),
                        "running": sum(1 for j in self._jobs.values() if j.status in ("running", "stopping"))}
        run_dir = self.run_dir(run_id)
        if not run_dir.is_dir():
            raise JobError(f"Unknown run '{run_id}'.", "Pick a run from the list.")
        st = run_status_from_disk(run_dir)
        return {"run_id": run_id, "status": st["status"], "position": None, "error": st.get("error"),
                "error_lines": _error_lines(run_dir / LOG_FILE) if st["status"] == "failed" else [],
                "returncode": st["job"].get("returncode"), "owner": st["job"].get("owner"),
                "name": st["job"].get("name") or run_id, "queue_length": 0, "running": 0}

    def run_dir(self, run_id: str) -> Path:
        """The folder of a run id, refusing anything that could leave the runs folder."""
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
            raise JobError(f"'{run_id}' is not a valid run id.", "Pick a run from the list.")
        return self.runs_dir / run_id

    def list_runs(self, owner: str | None = None) -> list[dict]:
        """Every run folder (newest first) with status, main metric, time and trainable params."""
        rows = []
        okey = owner_key(owner)
        seen = set()
        for run_dir in self.runs_dir.iterdir() if self.runs_dir.is_dir() else []:
            if not run_dir.is_dir() or not _RUN_ID.match(run_dir.name):
                continue
            seen.add(str(run_dir))
            job = self.get(run_dir.name)
            if job is not None:
                with self._lock:
                    st = {"status": job.status, "error": job.error, "job": job.to_json()}
            else:
                st = run_status_from_disk(run_dir)
            if st["status"] == "empty":
                continue
            row = summarize_run(run_dir, st)
            if self.private_runs and row["owner"] and row["owner"] != okey:
                continue
            row["mine"] = bool(okey and row["owner"] == okey)
            row["position"] = self.position(run_dir.name)
            rows.append(row)
        _forget_deleted_runs(self.runs_dir, seen)
        return sorted(rows, key=lambda r: -r["created"])

    def wait(self, run_id: str, timeout: float | None = None) -> str:
        """Block until the job is no longer active; returns its status."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            job = self.get(run_id)
            if job is None or not job.active:
                return job.status if job else self.status(run_id)["status"]
            if deadline is not None and time.time() > deadline:
                return job.status
            time.sleep(0.2)

    def shutdown(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the monitor. By default running workers keep going (a restarted app reconnects to them);
        kill=True terminates them (tests, or FINETUNE_KILL_WORKERS_ON_EXIT=1)."""
        with self._lock:
            self._closed = True
            running = [j for j in self._jobs.values() if j.status in ("running", "stopping")]
        if kill:
            for job in running:
                self._kill(job)
            for job in running:
                if job.proc is not None:
                    try:
                        job.proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        pass
                self._finalize(job, job.proc.returncode if job.proc else None)
        self._wake.set()
        self._thread.join(timeout=5)

    # -- internals ----------------------------------------------------------------------------

    def _save(self, job: Job) -> None:
        try:
            _write_json(job.run_dir / JOB_FILE, job.to_json())
        except OSError:
            pass

    def _write_stop(self, job: Job) -> None:
        try:
            (job.run_dir / STOP_FILE).write_text("stop requested from the app\n", encoding="utf-8")
        except OSError:
            pass

    def _schedule(self) -> None:
        while self._queue and not self._closed and \
                sum(1 for j in self._jobs.values() if j.status in ("running", "stopping")) < self.max_concurrent:
            job = self._jobs[self._queue.pop(0)]
            self._start(job)

    def _start(self, job: Job) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["FINETUNE_WORKER"] = "1"
        log = open(job.log_path, "ab")   # noqa: SIM115 - the child inherits it; closed right after
        try:
            command = worker_command(self.python, job.request_path)
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            job.proc = subprocess.Popen(
                command,
                cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)   # own process group: a hard kill takes its children too
        except OSError as exc:
            job.status, job.error, job.ended = "failed", f"Could not start the training worker: {exc}", time.time()
            self._save(job)
            return
        finally:
            log.close()
        job.pid = job.proc.pid
        job.pid_create_time = _process_create_time(job.pid)
        job.status, job.started = "running", time.time()
        self._save(job)

    def _alive(self, job: Job) -> tuple[bool, int | None]:
        if job.proc is not None:
            rc = job.proc.poll()          # reaps the child: no zombie is left behind
            return rc is None, rc
        return _pid_alive(job.pid, job.pid_create_time), None   # adopted after an app restart

    def _kill(self, job: Job) -> None:
        job.killed = True
        for target in ("group", "pid"):
            try:
                if target == "group":
                    os.killpg(job.pid, signal.SIGKILL)
                else:
                    os.kill(job.pid, signal.SIGKILL)
            except (OSError, TypeError):
                continue

    def _update_phase(self, job: Job) -> None:
        """Follow the worker's events (incrementally) to know whether its Trainer is still training."""
        new, job.events_offset = read_events(job.events_path, job.events_offset)
        since = (job.started or 0.0) - 1.0      # a resumed run's file holds earlier attempts' events
        for e in new:
            t, when = e.get("type"), float(e.get("time") or 0.0)
            if when < since:
                continue
            if t == "info" and str(e.get("message", "")).startswith("Loading model"):
                job.phase, job.phase_since = "loading", when
            elif t == "start":
                job.phase, job.phase_since = "training", when
            elif (t == "info" and e.get("phase") == "finishing") or t in ("end", "error"):
                if job.phase != "finishing":
                    job.phase, job.phase_since = "finishing", when
            elif t == "info" and e.get("phase") == "evaluating" and job.phase == "training":
                # a mid-run evaluation / checkpoint: slow on a CPU, and a kill now would cut a save short
                job.phase, job.phase_since, job.phase_save = "evaluating", when, bool(e.get("save"))
                job.phase_step = int(e.get("step") or 0)
            elif job.phase == "evaluating" and (t == "save" or (t == "eval" and not job.phase_save) or
                                                (t == "log" and int(e.get("step") or 0) > job.phase_step)):
                # the step's own loss point comes before its evaluation; a later step's means training again
                job.phase, job.phase_since = "training", when

    def _kill_due(self, job: Job, now: float) -> bool:
        """The stop_timeout clock covers only "the Trainer is training"; loading (where train() honours a
        stop before the first step), a mid-run evaluation or checkpoint, and finishing (saving,
        evaluating) get finish_timeout."""
        self._update_phase(job)
        since = max(job.stop_requested or now, job.phase_since or 0.0)
        limit = self.stop_timeout if job.phase == "training" else self.finish_timeout
        return now - since > limit

    def _finalize(self, job: Job, rc: int | None) -> None:
        if job.status in TERMINAL:
            return
        job.returncode = rc
        job.ended = time.time()
        events = read_events(job.events_path, 0)[0]
        term = _terminal_event(events)
        if term is not None and term["type"] == "end":
            job.status = "stopped" if job.stop_requested or term.get("stopped_by_user") else "finished"
        elif term is not None:
            job.status = "failed"
            job.error = term.get("message") or "Training failed."
            job.error_lines = _error_lines(job.log_path)
        else:
            job.status = "failed"
            if job.killed and job.phase == "training":
                job.error = (f"The worker did not stop within {self.stop_timeout:.0f} s and was killed; "
                             "checkpoints written so far are kept in the run folder.")
            elif job.killed:
                what = "load the model" if job.phase == "loading" else "save and evaluate the model"
                job.error = (f"The worker did not {what} within {self.finish_timeout:.0f} s of the stop and was "
                             "killed; what it had written is kept in the run folder"
                             + (" (model/ is saved as soon as training stops)." if job.phase == "finishing" else "."))
            elif rc is not None and rc < 0:
                try:
                    sig = signal.Signals(-rc).name
                except ValueError:
                    sig = str(-rc)
                job.error = f"The training worker was killed by signal {sig} (out of memory, or killed by hand)."
            elif rc is not None:
                job.error = f"The training worker exited with code {rc} before finishing."
            else:
                job.error = "The training worker disappeared before finishing."
            job.error_lines = _error_lines(job.log_path)
        try:
            (job.run_dir / STOP_FILE).unlink()
        except OSError:
            pass
        self._save(job)

    def _tick(self) -> None:
        with self._lock:
            for job in list(self._jobs.values()):
                if job.status not in ("running", "stopping"):
                    continue
                alive, rc = self._alive(job)
                if alive:
                    if job.stop_requested is not None:
                        if not (job.run_dir / STOP_FILE).exists():
                            self._write_stop(job)   # train() clears a stale STOP when it starts
                        if not job.killed and self._kill_due(job, time.time()):
                            self._kill(job)
                    continue
                self._finalize(job, rc)
            self._schedule()

    def _monitor(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the monitor must survive anything
                pass
            with self._lock:
                if self._closed:
                    return
            self._wake.wait(self.poll_interval)
            self._wake.clear()
