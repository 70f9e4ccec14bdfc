"""The run folder's contract: every file name in `output_dir/`, atomic writes, readers, status.

    from finetune_core import rundir
    rundir.write_json(rundir.metrics_path(out), metrics)     # atomic: readers never see half a file
    cfg = rundir.read_config(out)                            # run.yaml, else run_request.yaml, else {}
    rundir.request_stop(out, "stop requested from the app")  # train() ends at the next step
    rundir.run_status_from_disk(out)["status"]               # finished / stopped / failed / interrupted ...
    rundir.summarize_run(out)                                # one row for the run tables

Everything that reads or writes a run folder (train, jobs, compare, export, generate, the UI) takes
the names from here. No torch, no gradio: the app imports this at start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path

import yaml

from .events import progress, read_events
from .procs import pid_alive

# A run folder's name as the app creates it (jobs.new_run_id) or accepts it: no path separators, no
# leading dot, so a name can never reach outside the runs folder.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def is_run_id(name) -> bool:
    return isinstance(name, str) and bool(RUN_ID_PATTERN.match(name)) and ".." not in name


# The files of a run folder (DESIGN.md "Outputs of a run").
CONFIG_FILE = "run.yaml"              # the resolved config train() ran with (no secrets)
REQUEST_FILE = "run_request.yaml"     # what the app submitted, before the worker resolved it
EVENTS_FILE = "events.jsonl"          # the event stream (finetune_core.events)
AUDIT_FILE = "audit.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"  # classification: the validation rows with predictions
GENERATIONS_FILE = "generations.jsonl"  # instruction: held-out prompts answered before and after
JOB_FILE = "job.json"                 # the app's job state (owner hash, status, worker pid)
LOG_FILE = "worker.log"               # the worker's stdout and stderr
STOP_FILE = "STOP"                    # its presence asks train() to stop at the next step end
MODEL_DIR = "model"                   # the trained model: weights, tokenizer, card
MERGED_DIR = "merged"                 # model/merged/: a LoRA adapter folded into the base (export)
CHECKPOINTS_DIR = "checkpoints"       # Trainer checkpoints; removed when a run finishes
EXPORT_DIR = "export"                 # what Export writes (zips, GGUF, Modelfile, batch predictions)
DATA_DIR = "data"                     # the app's copies of the data files a job trains on
RATINGS_FILE = "ratings.jsonl"        # human ratings of answers (finetune_core.ratings)
PAIRS_FILE = "pairs.jsonl"            # preference pairs built from the ratings (finetune_core.pairs)
COMPARE_INPUT_FILE = "compare_input.yaml"  # compare: the config one strategy's run trains with
COMPARE_LOG_FILE = "compare.log"      # compare: that run's stdout and stderr

# The files of a comparison folder (`compare`'s output_dir, one run folder per strategy inside).
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def request_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / REQUEST_FILE


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS_FILE


def audit_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / AUDIT_FILE


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def predictions_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PREDICTIONS_FILE


def generations_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / GENERATIONS_FILE


def job_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / JOB_FILE


def log_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOG_FILE


def stop_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STOP_FILE


def model_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / MODEL_DIR


def merged_dir(run_dir: str | Path) -> Path:
    return model_dir(run_dir) / MERGED_DIR


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT_DIR


def batch_predictions_path(run_dir: str | Path, data_file: str | Path) -> Path:
    """export/predictions-<data file name>.csv: `predict`'s output for a file (finetune_core.batch_predict)."""
    return export_dir(run_dir) / f"predictions-{Path(data_file).stem}.csv"


def data_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DATA_DIR


def ratings_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RATINGS_FILE


def pairs_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PAIRS_FILE


# ---------------------------------------------------------------------------------------------
# atomic writes: a reader (the app's poller, another process) sees the old file or the new one


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing(path: str | Path):
    """Write a file that is not text (a zip) atomically: yields a temporary path next to `path`,
    which replaces `path` when the block ends without an error (and is removed when it fails)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(o):
    """numpy scalars and arrays (metrics carry them) as plain JSON; anything else as its str()."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def to_json(obj, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_json_default)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, to_json(obj))


# ---------------------------------------------------------------------------------------------
# readers: a missing or half-broken file reads as empty, never raises


def read_json(path: str | Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_config(run_dir: str | Path) -> dict:
    """The run's config as a plain dict: run.yaml (what ran), else run_request.yaml (what was asked
    for, while the worker has not started), else {}."""
    for path in (config_path(run_dir), request_path(run_dir)):
        if path.exists():
            try:
                value = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def read_metrics(run_dir: str | Path) -> dict:
    return read_json(metrics_path(run_dir))


def stop_requested(run_dir: str | Path) -> bool:
    return stop_path(run_dir).exists()


def request_stop(run_dir: str | Path, reason: str) -> None:
    stop_path(run_dir).write_text(reason.rstrip("\n") + "\n", encoding="utf-8")


def clear_stop(run_dir: str | Path) -> None:
    stop_path(run_dir).unlink(missing_ok=True)


def tail_lines(path: str | Path, n: int = 20, max_bytes: int = 64_000) -> list[str]:
    """The last `n` non-empty lines of a (possibly large) text file; [] when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-n:]


def error_lines(log: str | Path, n: int = 12) -> list[str]:
    """The informative end of a worker log: from the last traceback / 'Error' line on, if any."""
    lines = tail_lines(log, 200)
    start = None
    for i, line in enumerate(lines):
        if line.startswith("Traceback") or line.startswith("Error:") or "Error" in line.split(":")[0]:
            start = i if start is None or line.startswith("Traceback") else start
    picked = lines[start:] if start is not None else lines
    return picked[-n:]


# ---------------------------------------------------------------------------------------------
# status and summary of a run folder nobody is watching (also those written by the CLI)


_WATCHED = (JOB_FILE, EVENTS_FILE, METRICS_FILE, CONFIG_FILE, REQUEST_FILE)
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
    events = read_events(events_path(run_dir), 0)[0] if has_events else []
    files = {"job": read_json(job_path(run_dir)), "has_events": bool(events), "term": progress(events).terminal,
             "metrics": read_json(metrics_path(run_dir)), "cfg": read_config(run_dir),
             "events_mtime": sig[1][1] / 1e9 if has_events else None}
    with _FILES_LOCK:
        _FILES_CACHE[key] = (sig, files)
    return files


def forget_deleted_runs(runs_dir: str | Path, seen: set[str]) -> None:
    """Drop cached entries of run folders under `runs_dir` that are gone (`seen`: the folders listed)."""
    runs_dir = Path(runs_dir)
    with _FILES_LOCK:
        for key in [k for k in _FILES_CACHE if k not in seen and Path(k).parent == runs_dir]:
            del _FILES_CACHE[key]


def run_status_from_disk(run_dir: str | Path) -> dict:
    """{"status", "error", "job"} of a run folder nobody is watching: finished / stopped / failed /
    cancelled / running / stopping / queued / interrupted / empty.

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
    elif job.get("status") in ("running", "stopping") and pid_alive(job.get("pid"), job.get("pid_create_time")):
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
        "total_params": metrics.get("total_params"), "peak_rss_mb": metrics.get("peak_rss_mb"),
        "created": float(created or 0.0), "has_model": model_dir(run_dir).is_dir(), "owner": job.get("owner"),
        "group": job.get("group"),
    }
