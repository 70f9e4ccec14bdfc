"""Task pipelines: one module per task (classification.py, instruction.py), each read top to bottom.

`train()` (train.py) runs what every task shares: the data files, the base model's files, the
strategy, the TrainingArguments policy, the training loop with its stop and resume, saving the model,
metrics.json and the end event. Everything that depends on the task is in the task's module, picked
by `train.task_module(cfg.task)`. A task module provides, in the order train() calls them:

    check_model(cfg, kind)                       refuse a base model that cannot do the task (ConfigError)
    prepare(run, frames) -> Data                 clean, split, tokenize; Data is the task's own dataclass
    audit(run, frames, data) -> dict             the report written to audit.json (rank 0 only)
    load_model(run, data) -> model               the base model with the task's head, before the strategy
    training_arguments(run, data, notes)         -> (args, early_stopping_patience): training_args.
                                                 resolve_training_args with the task's extra keys and
                                                 arguments class (a TRL config is a TrainingArguments)
    build_trainer(run, model, data, args, callbacks, metrics) -> trainer
                                                 the datasets and the task's Trainer (any transformers
                                                 Trainer subclass, with `callbacks`); may measure the model
                                                 before training into `metrics`
    evaluate(run, trainer, model, data, metrics) -> evaluated
                                                 after the model is saved: measure it into `metrics`; rank 0
                                                 writes the files of those numbers (predictions.csv).
                                                 Returns what write_outputs needs (or None)
    write_outputs(run, model, data, metrics, evaluated)
                                                 rank 0, after metrics.json is on disk: slower extras
                                                 (generations.jsonl) that may add metrics; metrics.json is
                                                 written again after it
    MAIN_METRIC                                  the metrics key the end event reports as main_metric

Every `Data` has `n_train` (rows trained on), `dropped_rows` and `dropped_reasons` (reason -> rows).
A new task is a new module here, one branch in train.task_module, and its rows in config.TASKS,
config.training_defaults, data.detect_columns and audit (see DEVELOPERS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..config import RunConfig
from ..events import EventWriter


@dataclass
class RunContext:
    """What every step of a task's pipeline may need about the run in progress."""
    cfg: RunConfig
    out: Path               # the run folder (output_dir)
    writer: EventWriter     # events.jsonl
    main: bool              # rank 0: the only process that writes files
    model_path: str         # the base model, resolved (a folder or a hub id)
    model_kind: str         # "encoder" | "causal"
    tokenizer: Any


def as_dataset(columns: dict) -> Dataset:
    """A datasets.Dataset from {column: list} (what Trainer takes)."""
    return Dataset.from_dict(columns)
