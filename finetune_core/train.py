"""train(config) -> metrics: one fine-tuning run, end to end, writing every run output.

    python -m finetune_core train examples/configs/classification_lora.yaml
    accelerate launch -m finetune_core train CONFIG.yaml      # same code, several processes
    torchrun --standalone --nproc_per_node 2 -m finetune_core train CONFIG.yaml

`_run` reads top to bottom in sections: load data; load model; strategy; training arguments; trainer;
train; save; evaluate; write outputs. What depends on the task is in the task's pipeline module
(tasks/classification.py, tasks/instruction.py; the interface is in tasks/__init__.py).

Outputs in `output_dir/` (DESIGN.md, names in rundir.py): run.yaml, events.jsonl, audit.json,
metrics.json, model/, predictions.csv (classification), generations.jsonl (instruction).
Rank 0 alone writes them.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, set_seed

from . import data as D
from . import cpu_linear, lean, limits, rundir
from .cards import render_model_card
from .checkpoints import drop_incomplete_checkpoints, resume_checkpoint, save_model
from .config import TASKS, RunConfig, config_from_dict, dump_config, load_config
from .errors import ConfigError, FinetuneError
from .events import EventWriter, is_main_process
from .malloc import HUGEPAGES_TUNABLE
from .models import copy_trainable_into_memory, load_tokenizer, model_kind, resolve_model
from .runtime import peak_rss_mb, process_start_time, resource_error, set_cpu_threads
from .strategies import apply_strategy, trainable_summary
from .tasks import RunContext, classification, instruction
from .trainer import EventsCallback
from .training_args import cap_steps


def train(config, *, stop_file: str | Path | None = None, echo=None, max_bytes: int | None = None) -> dict:
    """Run one fine-tuning job end to end and return metrics (also written to metrics.json).

    config: a RunConfig, a dict of its fields, or a YAML file. stop_file: the file whose appearance
    ends training at the next step (default output_dir/STOP). echo: called with every event.
    max_bytes: the largest data file accepted (None: the deployment's limit, if any).
    events.jsonl is appended to, never truncated: a resumed (or repeated) run continues the same file.
    """
    cfg = _coerce_config(config)
    out = Path(cfg.output_dir)
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    writer = EventWriter(rundir.events_path(out), enabled=main, echo=echo)
    stop_path = Path(stop_file) if stop_file else rundir.stop_path(out)
    if main and stop_path.exists() and stop_path.stat().st_mtime < process_start_time():
        # A stale request, also when resuming: the STOP that ended the last run is spent. A STOP
        # written after this process started (a Stop clicked during start-up) still counts.
        stop_path.unlink()

    def report(message: str) -> None:
        try:
            writer.error(message)
        except OSError:      # the disk may be full: the exception still reaches the caller
            pass

    try:
        return _run(cfg, out, writer, stop_path, main, max_bytes)
    except FinetuneError as exc:
        report(exc.message)
        raise
    except Exception as exc:
        friendly = resource_error(exc)
        if friendly is not None:
            report(friendly.message)
            raise friendly from exc
        report(f"{type(exc).__name__}: {exc}")
        raise


def _coerce_config(config) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def task_module(task: str):
    """The pipeline module that runs `task` (what one provides: tasks/__init__.py)."""
    if task == "classification":
        return classification
    if task == "instruction":
        return instruction
    if task == "preference":
        from .tasks import preference      # deferred: TRL takes seconds to import, and only this task uses it

        return preference
    raise ConfigError(f"Unknown task '{task}'.", f"Use one of: {', '.join(TASKS)}.")


def audit_as_run(cfg: RunConfig, tokenizer) -> dict:
    """The report a run of `cfg` writes to audit.json, without training: the files are read, mapped,
    split and prepared exactly as train() does (so a bad file gets the same error), then audited by
    the task. The Data tab shows this, so what it says is what Start will train on."""
    frames = D.load_frames(cfg)
    run = RunContext(cfg=cfg, out=Path(cfg.output_dir), writer=EventWriter(rundir.EVENTS_FILE, enabled=False),
                     main=False, model_path="", model_kind="", tokenizer=tokenizer)
    task = task_module(cfg.task)
    return task.audit(run, frames, task.prepare(run, frames))


@dataclass
class PreparedRun:
    """What train() builds before its Trainer: the task's pipeline module, the run context, the prepared
    data, the model with its strategy, the trainable summary and the (step-capped) TrainingArguments."""
    task: Any
    run: RunContext
    data: Any
    model: Any
    summary: dict
    args: Any
    patience: int | None


def prepare_run(cfg: RunConfig, out: Path, writer: EventWriter, main: bool, max_bytes=None) -> PreparedRun:
    """train()'s sections up to the trainer: load data; load model; strategy; training arguments.
    estimate.py builds the same run with it (main=False: nothing is written)."""
    task = task_module(cfg.task)

    # -- load data: first, so a bad file is reported in a second, not after a model load
    frames = D.load_frames(cfg, max_bytes)

    # -- load model (the tokenizer first: preparing the data needs it)
    writer.begin(f"Loading model {cfg.model} ...")
    path = resolve_model(cfg.model)
    kind = model_kind(path)
    task.check_model(cfg, kind)
    run = RunContext(cfg=cfg, out=out, writer=writer, main=main, model_path=path, model_kind=kind,
                     tokenizer=load_tokenizer(path, kind))
    if main:
        dump_config(cfg, rundir.config_path(out))
    data = task.prepare(run, frames)
    if main:
        report = task.audit(run, frames, data)
        rundir.write_json(rundir.audit_path(out), report)
        for w in report.get("warnings", []):
            writer.info(f"Audit: {w}")
    model = task.load_model(run, data)

    # -- strategy
    model = apply_strategy(model, cfg.strategy, cfg.task)
    lean.apply(model)        # fewer activations kept for backward; the same loss and gradients
    if not torch.cuda.is_available():
        copy_trainable_into_memory(model)     # the optimizer's first step would copy it page by page
        cpu_linear.apply(model)               # the answers' decoding steps: oneDNN's faster linear
    summary = trainable_summary(model)
    print(summary["line"], flush=True)
    writer.info(summary["line"], trainable_params=summary["trainable_params"],
                total_params=summary["total_params"])

    # -- training arguments
    notes: list[str] = []
    args, patience = task.training_arguments(run, data, notes)
    for note in notes:
        writer.info(note)
    if not args.push_to_hub:
        args.hub_token = None        # unused without push_to_hub; never pickled into checkpoints/training_args.bin
    capped = cap_steps(args, data.n_train)
    if capped:
        writer.info(capped)
    return PreparedRun(task=task, run=run, data=data, model=model, summary=summary, args=args, patience=patience)


def _run(cfg: RunConfig, out: Path, writer: EventWriter, stop_path: Path, main: bool, max_bytes) -> dict:
    t_start = time.time()
    set_seed(cfg.seed)
    threads = set_cpu_threads()
    prepared = prepare_run(cfg, out, writer, main, max_bytes)
    task, run, data, model = prepared.task, prepared.run, prepared.data, prepared.model
    summary, args, patience = prepared.summary, prepared.args, prepared.patience
    callbacks, time_limit = _callbacks(args, patience, writer, stop_path, t_start)

    # -- trainer
    metrics = {"task": cfg.task, "strategy": cfg.strategy.name, "model": cfg.model, "model_kind": run.model_kind,
               "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
               "torch_threads": threads, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
               "device": "cuda" if torch.cuda.is_available() else "cpu", "dropped_rows": int(data.dropped_rows),
               "dropped_rows_reasons": data.dropped_reasons,
               "hugepage_heap": HUGEPAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")}
    trainer = task.build_trainer(run, model, data, args, callbacks, metrics)

    # -- train
    result, seconds = _fit(cfg, trainer, writer, rundir.checkpoints_dir(out), main)
    # Feature caching is part of training's cost: count it, so cached and uncached runs compare fairly.
    train_seconds = seconds + metrics.get("feature_seconds", 0.0)
    metrics.update(_training_metrics(trainer.state, result, train_seconds, data.n_train, callbacks, time_limit))

    # -- save: the model first, the minutes of evaluation after, so a run stopped (and, past every
    # timeout, killed) while it evaluates keeps its model. The card gets the final metrics below.
    if main:
        writer.phase("saving", "Saving the model to model/ ...")
        save_model(cfg, model, run.tokenizer, out, render_model_card(cfg, metrics))

    # -- evaluate
    evaluated = task.evaluate(run, trainer, model, data, metrics)

    # -- write outputs
    stopped_by_user = callbacks[0].stopped_by_user
    if main:
        _finish_metrics(metrics, t_start)
        rundir.atomic_write_text(rundir.model_dir(out) / "README.md", render_model_card(cfg, metrics))
        rundir.write_json(rundir.metrics_path(out), metrics)
        task.write_outputs(run, model, data, metrics, evaluated)
        if not stopped_by_user:
            # A finished run needs no optimizer state (~3x the model's size); a stopped one keeps it to resume.
            shutil.rmtree(rundir.checkpoints_dir(out), ignore_errors=True)
        _finish_metrics(metrics, t_start)
        rundir.write_json(rundir.metrics_path(out), metrics)      # with what the outputs added
    else:
        _finish_metrics(metrics, t_start)
    state = trainer.state
    writer.end(f"Done: training {metrics['train_seconds']:.1f}s, whole run {metrics['total_seconds']:.1f}s",
               step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
               train_seconds=metrics["train_seconds"], total_seconds=metrics["total_seconds"],
               main_metric=metrics.get(task.MAIN_METRIC), stopped_early=metrics["stopped_early"],
               stopped_by_user=stopped_by_user)
    return metrics


def _finish_metrics(metrics: dict, t_start: float) -> None:
    """The whole run's seconds (train() called to now: loading, training, saving, evaluating, outputs)
    and the process's memory peak so far."""
    metrics["peak_rss_mb"] = peak_rss_mb()
    metrics["total_seconds"] = time.time() - t_start


def _callbacks(args, patience, writer: EventWriter, stop_path: Path, t_start: float):
    """(callbacks, the time-limit callback or None): EventsCallback first (its stop flag tells how the
    run ended), then the deployment's time limit (FINETUNE_MAX_MINUTES) and early stopping."""
    callbacks = [EventsCallback(writer, stop_file=stop_path)]
    time_limit = None
    minutes_cap = limits.max_minutes()
    if minutes_cap:
        time_limit = limits.time_limit_callback(t_start + 60 * minutes_cap, writer, minutes_cap)
        callbacks.append(time_limit)
    if patience and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(patience)))
    return callbacks, time_limit


def _fit(cfg: RunConfig, trainer, writer: EventWriter, checkpoints: Path, main: bool):
    """trainer.train(), resumed from the newest complete checkpoint when cfg.resume; returns (its result,
    seconds). A full disk or exhausted memory becomes the FinetuneError that says what to do."""
    resume = None
    if cfg.resume:
        if main:
            # Before the Trainer sees them: its save_total_limit rotation counts a half-written
            # checkpoint-N as the newest one, keeps it and deletes good ones instead.
            drop_incomplete_checkpoints(checkpoints)
        resume = resume_checkpoint(checkpoints)
        if resume is None:
            writer.info("resume: true but no checkpoint was found; starting from the beginning.")
    # A Stop pressed while the model loaded (a STOP newer than this process) ends training at the
    # first step: the run ends as stopped with a saved, evaluable model like any other stop.
    t0 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:
        friendly = resource_error(exc)
        if friendly is None:
            raise
        if main:
            drop_incomplete_checkpoints(checkpoints)   # a checkpoint cut off by the failure is no "latest"
        raise friendly from exc
    return result, time.time() - t0


def _training_metrics(state, result, train_seconds: float, n_train: int, callbacks: list, time_limit) -> dict:
    """How training went: loss, steps, seconds, and why it ended (finished, early stopping, Stop, time limit)."""
    events_cb = callbacks[0]
    timed_out = bool(time_limit is not None and time_limit.triggered)
    early = any(isinstance(c, EarlyStoppingCallback) for c in callbacks) and \
        state.global_step < state.max_steps and not events_cb.stopped_by_user
    return {"train_seconds": train_seconds, "train_samples": n_train,
            "train_loss": float(result.training_loss), "global_step": state.global_step,
            "max_steps": state.max_steps, "epochs_completed": float(state.epoch or 0),
            "stopped_early": bool(early or events_cb.stopped_by_user or timed_out),
            "stopped_by_user": events_cb.stopped_by_user, "stopped_by_time_limit": timed_out,
            "best_checkpoint": state.best_model_checkpoint}
