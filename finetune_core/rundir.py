"""The run folder's contract: every file name in `output_dir/`, atomic writes, and the readers.

    from finetune_core import rundir
    rundir.write_json(rundir.metrics_path(out), metrics)     # atomic: readers never see half a file
    cfg = rundir.read_config(out)                            # run.yaml, else run_request.yaml, else {}
    rundir.request_stop(out, "stop requested from the app")  # train() ends at the next step

Everything that reads or writes a run folder (train, jobs, compare, export, generate, the UI) takes
the names from here. No torch, no gradio: the app imports this at start-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
CHECKPOINTS_DIR = "checkpoints"       # Trainer checkpoints; removed when a run finishes
EXPORT_DIR = "export"                 # what Export writes (zips, GGUF, Modelfile)


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


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT_DIR


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
    import yaml

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
