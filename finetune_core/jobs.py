"""The job supervisor: each run is `python -m finetune_core train RUN_DIR/run_request.yaml` in a worker.

    manager = JobManager()                                # runs under FINETUNE_HOME/runs/<id>
    job = manager.submit(config_dict, owner="session-token")
    events, offset = read_events(job.events_path, 0)      # tail the worker's progress
    manager.stop(job.run_id, owner="session-token")       # STOP file first, hard kill after a timeout

    # several runs as one group (e.g. full, frozen and LoRA on the same data): one Stop stops them all
    for values in planned_configs:
        manager.submit(values, owner="session-token", group="cmp-1")
    manager.stop_group("cmp-1", owner="session-token")

The worker runs exactly the CLI's code path (same `train()`), writes everything into its run folder
(finetune_core.rundir) and keeps a log of its stdout/stderr in `worker.log`. Job state that must
survive an app restart (owner, status, worker pid) lives in `job.json` next to the outputs, so a
restarted app lists past runs, re-queues jobs that never started and reconnects to workers that are
still running. `start_worker` is the one way a worker process starts (`compare` uses it too).

No gradio and no torch here: this module is imported by the app at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir, settings
from .config import RunConfig, config_from_dict, config_to_dict, dump_config, load_config
from .errors import FinetuneError
from .events import Progress, after_training, kill_clock_runs, read_events
from .limits import demo_mode, max_concurrent_jobs
from .limits import safe_filename as _safe_name
from .procs import kill_worker, pid_alive, process_create_time
from .rundir import error_lines, forget_deleted_runs, run_status_from_disk, summarize_run
from .settings import home as finetune_home

__all__ = ["ACTIVE", "TERMINAL", "Job", "JobError", "JobManager", "OwnerBusy", "default_runs_dir", "finetune_home",
           "new_run_id", "owner_key", "read_events", "start_worker", "worker_command"]

ACTIVE = ("queued", "running", "stopping")
TERMINAL = ("finished", "stopped", "failed", "cancelled", "interrupted")
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)   # `-m finetune_core` works without an install


class JobError(FinetuneError):
    """A job request the user can fix (not the owner, unknown run, queue full...)."""


class OwnerBusy(JobError):
    """submit(one_active_per_owner=True) while this owner has a queued or running job (`.job`)."""

    def __init__(self, job: Job):
        self.job = job
        super().__init__(f"Your run '{job.name or job.run_id}' is still {job.status}: one run at a time.",
                         "Press Stop to end it, then start again.")


def default_runs_dir() -> Path:
    return finetune_home() / "runs"


def owner_key(owner: str | None) -> str | None:
    """What job.json stores about the owner: a hash, never the session token itself."""
    if not owner:
        return None
    return hashlib.sha256(str(owner).encode("utf-8")).hexdigest()[:32]


def new_run_id() -> str:
    return secrets.token_hex(8)   # 64 random bits: run folders cannot be guessed by other users


def private_runs_default() -> bool:
    """Runs are private to their browser session on a public deployment (demo mode) or when
    FINETUNE_PRIVATE_RUNS=1; on a laptop (the default) every run stays reachable after a restart."""
    value = settings.private_runs()
    return demo_mode() if value is None else value


# ---------------------------------------------------------------------------------------------
# starting a worker


def worker_command(python: str, request_path, use_launcher: bool = True) -> list[str]:
    """The worker's command line. FINETUNE_LAUNCHER hands the job to a launcher instead of a plain
    process, e.g. `accelerate launch --config_file examples/accelerate/ddp_multi_gpu.yaml` to train on
    every GPU of the machine; the launcher gets `-m finetune_core train RUN_DIR/run_request.yaml`."""
    prefix = (settings.launcher() if use_launcher else None) or [python]
    return prefix + ["-m", "finetune_core", "train", str(request_path)]


def start_worker(config_path: str | Path, log_path: str | Path, *, python: str | None = None,
                 cwd: str | Path | None = None, use_launcher: bool = True,
                 truncate_log: bool = False) -> subprocess.Popen:
    """Start `python -m finetune_core train CONFIG` with stdout and stderr going to `log_path`
    (appended, after a `$ command` line; truncate_log starts the log afresh). The worker gets its own
    process group, so procs.kill_worker / end_worker reach what it starts too. Raises OSError."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[settings.WORKER_MARK] = "1"
    env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    command = worker_command(python or sys.executable, config_path, use_launcher)
    with open(log_path, "wb" if truncate_log else "ab") as log:   # the child inherits it
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        return subprocess.Popen(command, cwd=str(cwd) if cwd else None, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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
    group: str | None = None              # runs submitted together (stop_group stops them all)
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
    # Where the worker is, from its events (read only once a stop is requested; the kill clock).
    progress: Progress = field(default_factory=Progress, repr=False)
    events_offset: int = field(default=0, repr=False)

    @property
    def phase(self) -> str:
        return self.progress.phase

    @property
    def events_path(self) -> Path:
        return rundir.events_path(self.run_dir)

    @property
    def log_path(self) -> Path:
        return rundir.log_path(self.run_dir)

    @property
    def request_path(self) -> Path:
        return rundir.request_path(self.run_dir)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> dict:
        out = {"run_id": self.run_id, "name": self.name, "owner": self.owner, "created": self.created,
               "task": self.task, "model": self.model, "strategy": self.strategy, "status": self.status,
               "pid": self.pid, "pid_create_time": self.pid_create_time, "returncode": self.returncode,
               "error": self.error, "started": self.started, "ended": self.ended,
               "stop_requested": self.stop_requested, "killed": self.killed}
        if self.group is not None:
            out["group"] = self.group
        return out


def _copy_data_files(cfg: RunConfig, run_dir: Path, cwd: str) -> None:
    """Copy the config's data files into RUN_DIR/data/ and point the config at the copies, so the run
    stays reproducible after uploads expire."""
    for attr in ("train", "validation"):
        src = getattr(cfg.data, attr)
        if not src:
            continue
        path = Path(src).expanduser()
        if not path.is_absolute():
            path = Path(cwd) / path
        if not path.is_file():
            raise JobError(f"The {attr} data file '{src}' does not exist.",
                           "Upload the file again or pick a built-in example.")
        rundir.data_dir(run_dir).mkdir(exist_ok=True)
        target = rundir.data_dir(run_dir) / f"{attr}_{_safe_name(path.name)}"
        shutil.copyfile(path, target)
        setattr(cfg.data, attr, str(target))


def _as_config(config) -> RunConfig:
    """A fresh RunConfig from a RunConfig, a dict or a YAML path (validated)."""
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, RunConfig):
        return config_from_dict(config_to_dict(config))
    return config_from_dict(json.loads(json.dumps(config, default=str)))


class JobManager:
    """Runs training jobs in worker processes, at most `max_concurrent` at a time, the rest queued.

    Thread-safe. A monitor thread reaps finished workers (no zombies), starts queued jobs, re-asserts
    STOP files and hard-kills workers that ignore a stop: one whose Trainer is still training
    `stop_timeout` seconds after the Stop (FINETUNE_STOP_TIMEOUT, 60 s), or one still loading, in a
    mid-run checkpoint, or saving and evaluating after the Trainer stopped, `finish_timeout` seconds
    after the Stop or after that phase began (FINETUNE_FINISH_TIMEOUT, 1800 s: an instruction run
    measures its base model and generates answers after training). The worker says which phase it is
    in through its events (events.Progress, events.kill_clock_runs).
    """

    def __init__(self, runs_dir: str | Path | None = None, max_concurrent: int | None = None,
                 stop_timeout: float | None = None, poll_interval: float = 0.5, python: str | None = None,
                 max_queued_per_owner: int | None = None, cwd: str | Path | None = None,
                 private_runs: bool | None = None, finish_timeout: float | None = None):
        self.runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.max_concurrent = max_concurrent or max_concurrent_jobs()
        self.max_queued_per_owner = max_queued_per_owner or settings.max_queued_per_session()
        # an explicit argument wins over the environment, which wins over the default
        self.stop_timeout = float(stop_timeout) if stop_timeout is not None else settings.stop_timeout()
        self.finish_timeout = float(finish_timeout) if finish_timeout is not None else settings.finish_timeout()
        self.poll_interval = poll_interval
        self.python = python or sys.executable
        self.cwd = str(cwd or os.getcwd())
        self.private_runs = private_runs_default() if private_runs is None else private_runs
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
            info = rundir.read_json(rundir.job_path(run_dir))
            if not info or info.get("run_id") != run_dir.name or info.get("status") not in ACTIVE:
                continue
            status = run_status_from_disk(run_dir)["status"]
            if status not in ACTIVE:                    # record what we found out
                info["status"] = status
                info["ended"] = info.get("ended") or time.time()
                rundir.write_json(rundir.job_path(run_dir), info)
                continue
            job = Job(run_id=info["run_id"], run_dir=run_dir, owner=info.get("owner"), name=info.get("name", ""),
                      created=info.get("created", 0.0), task=info.get("task", ""), model=info.get("model", ""),
                      strategy=info.get("strategy", ""), group=info.get("group"), status=status, pid=info.get("pid"),
                      pid_create_time=info.get("pid_create_time"), started=info.get("started"),
                      stop_requested=info.get("stop_requested"))
            self._jobs[job.run_id] = job
            if status == "queued":
                queued.append(job)
        for job in sorted(queued, key=lambda j: j.created):
            self._queue.append(job.run_id)

    # -- public API ---------------------------------------------------------------------------

    def submit(self, config, owner: str | None, name: str | None = None, one_active_per_owner: bool = False,
               group: str | None = None) -> Job:
        """Validate `config` (RunConfig, dict or YAML path), create the run folder and queue the job.

        Data files are copied into RUN_DIR/data/ so the run stays reproducible after uploads expire.
        one_active_per_owner: refuse (OwnerBusy) while this owner has a queued or running job; checked
        under the lock that queues the job, so two Start clicks at once cannot both get through.
        group: a name shared by runs submitted together; stop_group() stops them all, jobs(group=)
        lists them. The jobs of a group count one by one against the queue limits.
        """
        cfg = _as_config(config)
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
        try:
            _copy_data_files(cfg, run_dir, self.cwd)
        except JobError:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        cfg.output_dir = str(run_dir)
        cfg.resume = False
        dump_config(cfg, rundir.request_path(run_dir))
        if not name:
            short = cfg.model.split("/")[-1].replace("bundled:", "")
            name = f"{cfg.task[:5]}-{cfg.strategy.name}-{short}-{time.strftime('%m%d-%H%M%S')}"
        job = Job(run_id=run_id, run_dir=run_dir, owner=okey, name=name, created=time.time(), task=cfg.task,
                  model=cfg.model, strategy=cfg.strategy.name, group=group)
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
        info = rundir.read_json(rundir.job_path(run_dir))
        if not info:
            raise JobError(f"No run with id '{run_id}'.", "Pick a run from the list.")
        if not self.is_owner(run_id, owner):
            raise JobError("Only the browser session that started this run can resume it.",
                           "Open the app in the browser that started it, or use the CLI with resume: true.")
        current = self.get(run_id)
        if current is not None and current.active:
            raise JobError("This run is still queued or running.", "Stop it first, or wait for it to end.")
        complete = [c for c in rundir.checkpoints_dir(run_dir).glob("checkpoint-*")
                    if (c / "trainer_state.json").exists()]
        if not complete:
            raise JobError("This run has no complete checkpoint to resume from.",
                           "A run keeps checkpoints when it is stopped or interrupted after its first save "
                           "(each epoch); start a new run instead.")
        cfg = load_config(rundir.request_path(run_dir))
        cfg.resume = True
        dump_config(cfg, rundir.request_path(run_dir))
        job = Job(run_id=run_id, run_dir=run_dir, owner=info.get("owner"), name=info.get("name", run_id),
                  created=info.get("created", time.time()), task=info.get("task", ""), model=info.get("model", ""),
                  strategy=info.get("strategy", ""), group=info.get("group"))
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
        info = rundir.read_json(rundir.job_path(self.run_dir(run_id)))
        return okey is not None and info.get("owner") == okey

    def can_view(self, run_id: str, owner: str | None) -> bool:
        """Everyone sees every run unless private runs are on (FINETUNE_PRIVATE_RUNS=1)."""
        if not self.private_runs:
            return True
        info = rundir.read_json(rundir.job_path(self.run_dir(run_id)))
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
        outcome = self._stop(job)
        self._wake.set()
        return {"cancelled": "Removed from the queue before it started.",
                "stopping": (f"Stop requested: training ends after the current step, then the model is saved and "
                             f"evaluated (forced if training has not stopped within {self.stop_timeout:.0f} s).")
                }.get(outcome, f"The run has already {outcome}.")

    def stop_group(self, group: str, owner: str | None) -> str:
        """Stop every active job of `group` owned by `owner`: queued ones leave the queue (the later
        runs of the group never start), running ones stop like stop() does."""
        okey = owner_key(owner)
        with self._lock:
            members = [j for j in self._jobs.values() if j.group == group]
            if not members:
                raise JobError(f"No job group '{group}'.", "It may have finished already; refresh the run list.")
            if okey is None or any(j.owner != okey for j in members):
                raise JobError("Only the browser session that started these runs can stop them.",
                               "Open the app in the browser that started them.")
            # queued ones first: a running one ending now must not let the next one start
            ordered = sorted(members, key=lambda j: j.status != "queued")
            outcomes = [self._stop(j) for j in ordered if j.active]
        self._wake.set()
        if not outcomes:
            return "Every run of the group has already ended."
        return (f"Stop requested for {outcomes.count('stopping')} running and "
                f"{outcomes.count('cancelled')} queued run(s) of the group.")

    def jobs(self, owner: str | None = None, active_only: bool = False, group: str | None = None) -> list[Job]:
        okey = owner_key(owner) if owner is not None else None
        with self._lock:
            out = [j for j in self._jobs.values() if (owner is None or j.owner == okey)
                   and (not active_only or j.active) and (group is None or j.group == group)]
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
                "error_lines": error_lines(rundir.log_path(run_dir)) if st["status"] == "failed" else [],
                "returncode": st["job"].get("returncode"), "owner": st["job"].get("owner"),
                "name": st["job"].get("name") or run_id, "queue_length": 0, "running": 0}

    def run_dir(self, run_id: str) -> Path:
        """The folder of a run id, refusing anything that could leave the runs folder."""
        if not rundir.is_run_id(run_id):
            raise JobError(f"'{run_id}' is not a valid run id.", "Pick a run from the list.")
        return self.runs_dir / run_id

    def list_runs(self, owner: str | None = None) -> list[dict]:
        """Every run folder (newest first) with status, main metric, time and trainable params."""
        rows = []
        okey = owner_key(owner)
        seen = set()
        for run_dir in self.runs_dir.iterdir() if self.runs_dir.is_dir() else []:
            if not run_dir.is_dir() or not rundir.RUN_ID_PATTERN.match(run_dir.name):
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
        forget_deleted_runs(self.runs_dir, seen)
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
        kill=True terminates them (tests)."""
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
            rundir.write_json(rundir.job_path(job.run_dir), job.to_json())
        except OSError:
            pass

    def _write_stop(self, job: Job) -> None:
        try:
            rundir.request_stop(job.run_dir, "stop requested from the app")
        except OSError:
            pass

    def _stop(self, job: Job) -> str:
        """Under the lock: cancel a queued job, or mark a running one stopping and write its STOP file.
        Returns "cancelled", "stopping", or the status of a job that had already ended."""
        with self._lock:
            if job.status == "queued":
                if job.run_id in self._queue:
                    self._queue.remove(job.run_id)
                job.status, job.ended = "cancelled", time.time()
                self._save(job)
                return "cancelled"
            if job.status not in ("running", "stopping"):
                return job.status
            if job.stop_requested is None:
                job.stop_requested = time.time()
                job.status = "stopping"
                self._save(job)
            self._write_stop(job)
            return "stopping"

    def _schedule(self) -> None:
        """Start queued jobs in order while slots are free. The runs of a group go one at a time, even
        with free slots, so each one's time and peak memory are its own (what a comparison reports)."""
        while self._queue and not self._closed:
            running = [j for j in self._jobs.values() if j.status in ("running", "stopping")]
            if len(running) >= self.max_concurrent:
                return
            busy_groups = {j.group for j in running if j.group is not None}
            ready = next((rid for rid in self._queue if self._jobs[rid].group not in busy_groups), None)
            if ready is None:
                return
            self._queue.remove(ready)
            self._start(self._jobs[ready])

    def _start(self, job: Job) -> None:
        try:
            job.proc = start_worker(job.request_path, job.log_path, python=self.python, cwd=self.cwd)
        except OSError as exc:
            job.status, job.error, job.ended = "failed", f"Could not start the training worker: {exc}", time.time()
            self._save(job)
            return
        job.pid = job.proc.pid
        job.pid_create_time = process_create_time(job.pid)
        job.status, job.started = "running", time.time()
        self._save(job)

    def _alive(self, job: Job) -> tuple[bool, int | None]:
        if job.proc is not None:
            rc = job.proc.poll()          # reaps the child: no zombie is left behind
            return rc is None, rc
        return pid_alive(job.pid, job.pid_create_time), None   # adopted after an app restart

    def _kill(self, job: Job) -> None:
        job.killed = True
        kill_worker(job.pid)

    def _kill_due(self, job: Job, now: float) -> bool:
        """Follow the worker's events (incrementally) into job.progress; the stop_timeout clock covers
        only "the Trainer is training" (kill_clock_runs). Loading (where train() honours a stop before
        the first step), a mid-run evaluation or checkpoint, and everything after training (saving,
        evaluating) get finish_timeout, counted from the stop or from when that stretch began."""
        new, job.events_offset = read_events(job.events_path, job.events_offset)
        since = (job.started or 0.0) - 1.0      # a resumed run's file holds earlier attempts' events
        job.progress.feed(e for e in new if float(e.get("time") or 0.0) >= since)
        start = max(job.stop_requested or now, job.progress.clock_since or 0.0)
        limit = self.stop_timeout if kill_clock_runs(job.phase) else self.finish_timeout
        return now - start > limit

    def _finalize(self, job: Job, rc: int | None) -> None:
        if job.status in TERMINAL:
            return
        job.returncode = rc
        job.ended = time.time()
        term = Progress().feed(read_events(job.events_path, 0)[0]).terminal
        if term is not None and term["type"] == "end":
            job.status = "stopped" if job.stop_requested or term.get("stopped_by_user") else "finished"
        elif term is not None:
            job.status = "failed"
            job.error = term.get("message") or "Training failed."
            job.error_lines = error_lines(job.log_path)
        else:
            job.status = "failed"
            if job.killed and job.phase == "training":
                job.error = (f"The worker did not stop within {self.stop_timeout:.0f} s and was killed; "
                             "checkpoints written so far are kept in the run folder.")
            elif job.killed:
                what = "load the model" if job.phase == "loading" else "save and evaluate the model"
                job.error = (f"The worker did not {what} within {self.finish_timeout:.0f} s of the stop and was "
                             "killed; what it had written is kept in the run folder"
                             + (" (model/ is saved as soon as training stops)." if after_training(job.phase) else "."))
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
            job.error_lines = error_lines(job.log_path)
        try:
            rundir.clear_stop(job.run_dir)
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
                        if not rundir.stop_requested(job.run_dir):
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
