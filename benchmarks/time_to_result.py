"""Time to result: the wait from Start to results, phase by phase, for runs on the same and on other data.

    python -m benchmarks.run --only time_to_result            # ~8 minutes on 2 CPU cores
    python -m benchmarks.time_to_result --quick               # 12 rows, 1 optimizer step each

Three SmolLM2 instruction runs, each `python -m finetune_core train` in its own process (as the app's
worker and `compare` run them), one after the other, sharing one fresh FINETUNE_HOME:

1. full fine-tuning (the first run on this data: the base-model cache is cold), then
2. LoRA on the same data and base model (another strategy: the cache is warm), then
3. full fine-tuning on other rows (the next 48 and the 25 validation rows before the last 25): a first
   run on new data whose base model has been measured (its general-text perplexity is cached).

Data: the first 48 Self-Instruct seed rows, validation the last 25; 1 epoch; every other setting is
train()'s default (the chat template, per-epoch evaluation and checkpoint, best model at the end),
as a user of the Train tab gets them. Each run's phases come from its own events.jsonl (the `phase`
field of its events, vocabulary in finetune_core.events.PHASES); peak RSS from its metrics.json.

Reported per run: seconds per phase (loading, training loop, checkpoint, saving, evaluating,
baseline, generating), the whole run (first event to the end event: what train() sees; the process's
wall time adds Python's start-up and imports), whole run / training loop, and peak RSS. The
training loop is the time in the `training` phase (mid-run evaluations and checkpoint writes are
`checkpoint`, counted apart). Other jobs share this machine's cores: absolute seconds drift, the
ratios inside one run are what to read.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from . import common as C

NAME = "time_to_result"
TITLE = "Time to result: whole run vs training loop, SmolLM2, first and second run on the same data"

# The phases a run's events name (finetune_core.events.PHASES) that the table reports.
REPORTED = ("loading", "training", "checkpoint", "saving", "evaluating", "baseline", "generating")


def phase_seconds(events: list[dict]) -> dict:
    """Seconds spent in each phase, first event to the end event, from one attempt's events; the phase
    after each event is the one the app shows (finetune_core.events.Progress)."""
    from finetune_core.events import Progress

    out = {p: 0.0 for p in REPORTED}
    if not events:
        return {**out, "whole_run": None}
    state = Progress()
    state.apply(events[0])
    current, since = state.phase, events[0]["time"]
    for e in events[1:]:
        state.apply(e)
        if state.phase != current:
            if current in out:
                out[current] += e["time"] - since
            current, since = state.phase, e["time"]
        if current in ("done", "error"):
            break
    end = next((e["time"] for e in events if e.get("type") in ("end", "error")), events[-1]["time"])
    return {**{k: round(v, 2) for k, v in out.items()}, "whole_run": round(end - events[0]["time"], 2)}


def split_files(work: Path, n_train: int, n_val: int, other: bool = False) -> tuple[str, str]:
    """The first n_train rows and the last n_val; other: the next n_train and the n_val before those
    (a data set with no row in common with the first)."""
    rows = C.self_instruct_rows()
    if other:
        return (C.write_jsonl(work / "train_other.jsonl", rows[n_train:2 * n_train]),
                C.write_jsonl(work / "val_other.jsonl", rows[-2 * n_val:-n_val]))
    return (C.write_jsonl(work / "train.jsonl", rows[:n_train]), C.write_jsonl(work / "val.jsonl", rows[-n_val:]))


def run_config(model: str, train_file: str, val_file: str, out_dir: Path, strategy: str,
               training: dict | None = None, max_length: int = 256) -> dict:
    return {"task": "instruction", "model": model,
            "data": {"train": train_file, "validation": val_file, "max_length": max_length},
            "strategy": {"name": strategy}, "training": {"num_train_epochs": 1, **(training or {})},
            "output_dir": str(out_dir), "seed": 42}


def one_run(cfg: dict, home: Path, timeout: float = 1800) -> dict:
    """`python -m finetune_core train` on cfg in its own process, FINETUNE_HOME=home; its phases and peak."""
    import yaml

    from finetune_core.events import read_all_events
    from finetune_core.models import model_cache_dir

    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    # The converted bundled model stays where it is (a fresh FINETUNE_HOME would convert it again).
    env = {**os.environ, "FINETUNE_HOME": str(home), "FINETUNE_MODEL_CACHE": str(model_cache_dir())}
    t0 = time.time()
    proc = subprocess.run([C.python(), "-m", "finetune_core", "train", str(path)], cwd=C.REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    events = read_all_events(out / "events.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    phases = phase_seconds(events)
    loop = phases["training"]
    end = next((e for e in reversed(events) if e.get("type") == "end"), {})
    return {"strategy": cfg["strategy"]["name"], "phases": phases, "process_wall_seconds": round(wall, 2),
            "startup_seconds": round(events[0]["time"] - t0, 2) if events else None,
            "whole_over_loop": round(phases["whole_run"] / loop, 2) if loop else None,
            "peak_rss_mb": round(metrics.get("peak_rss_mb") or 0), "train_seconds": metrics.get("train_seconds"),
            "total_seconds": metrics.get("total_seconds"), "end_event": {k: end.get(k) for k in
                                                                          ("train_seconds", "total_seconds", "message")},
            "eval_loss": metrics.get("eval_loss"), "eval_loss_before": metrics.get("eval_loss_before"),
            "rougeL": metrics.get("rougeL"), "rougeL_before": metrics.get("rougeL_before"),
            "base_cache": metrics.get("base_cache"), "global_step": metrics.get("global_step"),
            "last_line": (proc.stdout.strip().splitlines() or [""])[-1]}


def run(quick: bool = False, out_dir: Path | None = None, model: str = C.SMOLLM2) -> dict:
    """First run (full, cold base cache), a second (LoRA, warm cache) on the same data, then a full run on
    other data (its base model measured before)."""
    C.quiet_env()
    n_train, n_val, max_length = (12, 8, 128) if quick else (48, 25, 256)
    training = {"max_steps": 1} if quick else {}
    work = C.scratch_dir(NAME)
    home = work / "home"
    train_file, val_file = split_files(work, n_train, n_val)
    other_train, other_val = split_files(work, n_train, n_val, other=True)
    runs = {}
    for label, strategy, (tr, va) in (("first_full", "full", (train_file, val_file)),
                                      ("second_lora", "lora", (train_file, val_file)),
                                      ("other_data_full", "full", (other_train, other_val))):
        print(f"[{NAME}] {label}: {strategy} on {n_train} rows ...", flush=True)
        cfg = run_config(model, tr, va, work / label, strategy, training, max_length)
        runs[label] = one_run(cfg, home)
    first, second, other = runs["first_full"], runs["second_lora"], runs["other_data_full"]
    result = {"title": TITLE, "setup": {"model": model, "train_rows": n_train, "val_rows": n_val,
                                        "max_length": max_length, "epochs": 1, "training": training,
                                        "load_average_start": C.load_average()},
              "runs": runs,
              "targets": {"first_whole_over_loop": "<= 2", "second_whole_over_loop": "<= 1.5",
                          "first_peak_rss_mb": "<= 3500"}}
    result["met"] = {"first_whole_over_loop": (first["whole_over_loop"] or 99) <= 2,
                     "second_whole_over_loop": (second["whole_over_loop"] or 99) <= 1.5,
                     "first_peak_rss_mb": first["peak_rss_mb"] <= 3500}

    def phases(r: dict) -> str:
        p = r["phases"]
        return ", ".join(f"{k} {p[k]:.0f}" for k in REPORTED if p[k] >= 0.5)

    result["summary"] = [
        {"what": "first run (full, cold base cache): whole run / training loop",
         "value": f"{first['phases']['whole_run']:.0f}s / {first['phases']['training']:.0f}s = "
                  f"{first['whole_over_loop']:.2f}x ({phases(first)})", "target": "<= 2x",
         "met": result["met"]["first_whole_over_loop"]},
        {"what": "second run (LoRA, same data, warm cache): whole run / training loop",
         "value": f"{second['phases']['whole_run']:.0f}s / {second['phases']['training']:.0f}s = "
                  f"{second['whole_over_loop']:.2f}x ({phases(second)})", "target": "<= 1.5x",
         "met": result["met"]["second_whole_over_loop"]},
        {"what": "peak RSS of the full run (metrics.json peak_rss_mb)", "value": f"{first['peak_rss_mb']} MB",
         "target": "<= 3500 MB", "met": result["met"]["first_peak_rss_mb"]},
        {"what": "first run on other data, same base model (full; its general-text perplexity cached): "
                 "whole run / training loop",
         "value": f"{other['phases']['whole_run']:.0f}s / {other['phases']['training']:.0f}s = "
                  f"{other['whole_over_loop']:.2f}x ({phases(other)}; base cache: {other['base_cache']})"},
    ]
    C.write_result(NAME, result, quick, out_dir)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
