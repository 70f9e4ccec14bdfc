"""TrainingArguments policy: our defaults for this task, model and strategy, the user's `training:` over them.

    values, patience = training_values(cfg, "encoder", n_train=120)      # plain dict, no transformers object
    args, patience = resolve_training_args(cfg, "encoder", 120, Path("runs/x/checkpoints"), notes)
    message = cap_steps(args, n_train=120)          # FINETUNE_MAX_STEPS, or None when no cap applies

`notes` collects sentences a user should read (as `info` events): a setting switched off because
it cannot work with the others, and how to get it back.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from . import limits
from .config import RunConfig, merge_training, training_defaults
from .errors import ConfigError


def _align_checkpoints(values: dict, given: dict, patience, notes: list[str]) -> None:
    """Best-model restoring and early stopping need a checkpoint at every evaluation.

    A user who changes only `eval_strategy` (say to steps) keeps both: our default save schedule
    follows the evaluation one. A user who sets both to schedules that do not line up gets them
    switched off, and a note that says so and how to get them back (TrainingArguments would refuse).
    """
    wants_best = values.get("load_best_model_at_end")
    ev, sv = values.get("eval_strategy", "no"), values.get("save_strategy", "steps")
    if ev == "no":
        if wants_best and ("load_best_model_at_end" in given or "early_stopping_patience" in given):
            notes.append("eval_strategy is 'no', so there are no evaluations: load_best_model_at_end and early "
                         "stopping are off. Set eval_strategy (and save_strategy) to epoch or steps to use them.")
        values["load_best_model_at_end"] = False
        return
    if not wants_best or sv == "best":
        return
    eval_steps = values.get("eval_steps") or values.get("logging_steps")
    if sv != ev and "save_strategy" not in given:
        values["save_strategy"] = sv = ev
        if ev == "steps" and "save_steps" not in given:
            values["save_steps"] = eval_steps
        notes.append(f"save_strategy follows eval_strategy ({ev}"
                     + (f", every {eval_steps} steps" if ev == "steps" else "")
                     + "), so the best checkpoint can be restored at the end.")
    elif ev == "steps" and sv == "steps" and "save_steps" not in given:
        values["save_steps"] = eval_steps
    mismatch = sv != ev or (ev == "steps" and _not_multiple(values.get("save_steps", 500), eval_steps))
    if mismatch:
        values["load_best_model_at_end"] = False
        what = "early stopping " if patience else ""
        where = (f"eval_strategy is '{ev}' but save_strategy is '{sv}'" if sv != ev else
                 f"save_steps={values.get('save_steps', 500)} is not a multiple of eval_steps={eval_steps}")
        notes.append(f"load_best_model_at_end and {what}are off: they need a checkpoint at every evaluation, "
                     f"and {where}. To keep them, set save_strategy to the same value as eval_strategy "
                     "(and save_steps equal to eval_steps).")


def _not_multiple(save_steps, eval_steps) -> bool:
    if not eval_steps:
        return False
    return round(save_steps * 1_000_000) % round(eval_steps * 1_000_000) != 0


def training_values(cfg: RunConfig, kind: str, n_train: int, cuda: bool | None = None,
                    notes: list[str] | None = None) -> tuple[dict, int | None]:
    """The TrainingArguments keyword values: our defaults, overridden by every key of `training:`.
    Returns (values, early_stopping_patience); `notes` collects what a user should be told."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    notes = notes if notes is not None else []
    values = training_defaults(cfg.task, kind, cfg.strategy.name, n_train, cfg.strategy.frozen_layers, cuda=cuda)
    given = dict(cfg.training)
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in given:      # transformers 5 renamed them: the old name still works, under the new one
            value = given.pop(old)
            if new not in given:
                given[new] = value
            notes.append(f"training.{old} is called {new} since transformers 5; it was applied as {new}.")
    values = merge_training(values, given)
    patience = values.pop("early_stopping_patience", None)
    if not cuda:
        # Half precision on CPU is ~400x slower here: refuse it rather than train for hours.
        for key in ("bf16", "fp16"):
            if values.get(key):
                raise ConfigError(f"training.{key} is on but there is no CUDA GPU.",
                                  f"Remove training.{key}; on CPU we train in float32.")
        # Said, not left to the class's default: TRL's configs (DPOConfig) default bf16 to True, even with
        # use_cpu, and the Trainer then runs every forward under bf16 autocast on the CPU.
        values.update(use_cpu=True, bf16=False, fp16=False)
    _align_checkpoints(values, cfg.training, patience, notes)
    return values, patience


def resolve_training_args(cfg: RunConfig, kind: str, n_train: int, checkpoints: Path,
                          notes: list[str] | None = None, *, extra: dict | None = None,
                          args_class: type = TrainingArguments):
    """`args_class` (TrainingArguments, or a task's subclass such as TRL's configs) built from
    training_values plus what every run sets (output folder, seed, no progress bars) and `extra`, the
    task's own keys (e.g. prediction_loss_only). Returns (args, early_stopping_patience)."""
    values, patience = training_values(cfg, kind, n_train, notes=notes)
    values.update(output_dir=str(checkpoints), seed=cfg.seed, disable_tqdm=True,
                  save_only_model=False, remove_unused_columns=True)
    values.update(extra or {})
    try:
        args = args_class(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid training options: {exc}", "Fix the training: section of the config.") from exc
    return args, patience


def cap_steps(args, n_train: int) -> str | None:
    """Lower args.max_steps to the deployment's FINETUNE_MAX_STEPS when the run plans more; returns the
    sentence that tells the user so, or None when no cap applies."""
    step_cap = limits.max_steps()
    if not step_cap:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = -(-n_train // max(1, args.per_device_train_batch_size * world))
    planned = args.max_steps if args.max_steps > 0 else \
        math.ceil(args.num_train_epochs * max(1, batches // args.gradient_accumulation_steps))
    if planned <= step_cap:
        return None
    args.max_steps = step_cap
    return (f"This deployment limits a run to {step_cap} steps (FINETUNE_MAX_STEPS); "
            f"training {step_cap} of the {planned} planned steps.")
