"""estimate(config) -> dict: a run's training time and peak memory on this machine, before it starts.

    python -m finetune_core estimate examples/configs/instruction_lora.yaml [--set k=v ...] [--json]
    from finetune_core.estimate import estimate
    e = estimate("examples/configs/classification_lora.yaml")   # {"train_seconds": 41.2, "peak_rss_mb": ...}

The run is built the way train() builds it (train.prepare_run: the config, the data split and
tokenized, the model with its strategy, the TrainingArguments; then the task's own Trainer and
collator), in a scratch folder, so the steps timed here are steps the run will take: the same batch
size, the same length-grouped batches, the same optimizer and activation checkpointing. Then:

- the schedule: one epoch of the run's own sampler gives every batch's padded size; transformers'
  own flow callback, replayed over the run's steps, counts its evaluations and checkpoint saves;
- the steps: a few real optimizer steps on chosen batches of that epoch, within `budget_seconds`
  (at least three): the largest first (it sets the memory peak and pays the first step's one-off
  costs), then the smallest, the median, the quartiles... A line (seconds = a + b x padded tokens)
  through the steps after the first predicts every step of the schedule; the first step's surplus
  over the line is added once;
- one evaluation pass (on a slice of a large validation set, scaled by padded tokens), one checkpoint
  save and the best-model reload at the end, each timed for real; feature caching (frozen head-only
  encoders) is part of building the trainer, so it is measured whole, as the run counts it.

train_seconds is the full schedule, as metrics.json counts it (trainer.train() plus feature caching).
Early stopping can end a run sooner: `earliest_stop_seconds` is the time if it stops at its first
chance (patience + 1 evaluations). peak_rss_mb is this process's own peak once it has done what the
run does up to and through training, plus what the run does after training and the estimate does not
(an instruction run loads a second copy of the base model to measure it, unless LoRA switches its
adapters off instead). It is meaningful in a fresh process: the CLI and the app run it as
`python -m finetune_core estimate` on its own. Timings taken while other processes share the cores
read high; `load_average` says how busy the machine was.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from . import rundir
from .config import RunConfig, config_from_dict, load_config
from .events import EventWriter
from .runtime import peak_rss_mb, set_cpu_threads
from .train import prepare_run
from .trainer import release_training_state

BUDGET_SECONDS = 10.0      # for the timed steps (at least MIN_STEPS of them, however long they take)
MIN_STEPS = 3              # the first step plus two that show the steady rate
MAX_STEPS = 48             # fast steps: more of them average out the noise of a shared machine
EVAL_ROWS = 64             # a larger validation set is timed on this many rows, scaled by padded tokens


def estimate(config, *, budget_seconds: float = BUDGET_SECONDS, max_bytes: int | None = None) -> dict:
    """Predict `train_seconds` and `peak_rss_mb` of training `config` (a RunConfig, a dict of its fields
    or a YAML file) on this machine; see the module docstring for how. Nothing is written to the run's
    output_dir. Bad input raises the same FinetuneError train() would."""
    t_start = time.time()
    cfg = copy.deepcopy(_as_config(config))
    scratch = Path(tempfile.mkdtemp(prefix="finetune-estimate-"))
    cfg.output_dir, cfg.resume = str(scratch / "run"), False
    try:
        with contextlib.redirect_stdout(io.StringIO()):       # the run's progress lines are not ours to print
            return _estimate(cfg, budget_seconds, max_bytes, t_start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _as_config(config) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    return config_from_dict(config) if isinstance(config, dict) else load_config(config)


def _estimate(cfg: RunConfig, budget_seconds: float, max_bytes, t_start: float) -> dict:
    set_seed(cfg.seed)
    threads = set_cpu_threads()
    out = Path(cfg.output_dir)
    writer = EventWriter(rundir.events_path(out), enabled=False)
    prepared = prepare_run(cfg, out, writer, main=False, max_bytes=max_bytes)
    args = prepared.args
    args.push_to_hub, args.report_to = False, []      # the timed save must not upload, nor log anywhere
    metrics: dict = {}
    t_build = time.perf_counter()
    trainer = prepared.task.build_trainer(prepared.run, prepared.model, prepared.data, args, [StepTimer()], metrics)
    build_seconds = time.perf_counter() - t_build

    plan = schedule(trainer)
    timing = time_steps(trainer, plan, budget_seconds)
    eval_seconds = time_evaluation(trainer) if plan["evaluations"] else 0.0
    save_seconds, load_seconds = time_checkpoint(trainer) if plan["saves"] else (0.0, 0.0)
    time_parts = predict_seconds(plan, timing, eval_seconds, save_seconds, load_seconds,
                                 metrics.get("feature_seconds", 0.0), prepared.patience)
    memory = predict_memory(trainer, prepared.model, cfg)
    available = available_mb()
    result = {
        "train_seconds": round(time_parts["train_seconds"], 1),
        "peak_rss_mb": round(memory["peak_rss_mb"], 0),
        "fits": memory["peak_rss_mb"] <= available,
        "available_mb": round(available, 0),
        "earliest_stop_seconds": round(time_parts["earliest_stop_seconds"], 1),
        "full_schedule": True,
        "method": (f"timed {timing['timed']} real steps of the run's batches (largest first), one evaluation "
                   "pass, one checkpoint save; the full schedule"
                   + (f", early stopping (patience {prepared.patience}) may end it sooner" if
                      time_parts["early_stopping"] else "")),
        "task": cfg.task, "strategy": cfg.strategy.name, "model": cfg.model,
        "trainable_params": prepared.summary["trainable_params"], "total_params": prepared.summary["total_params"],
        "train_rows": prepared.data.n_train, "torch_threads": threads,
        "steps": plan["max_steps"], "steps_per_epoch": plan["steps_per_epoch"], "epochs": plan["epochs"],
        "evaluations": len(plan["evaluations"]), "saves": len(plan["saves"]),
        "seconds_at_evaluations": time_parts["at_evaluations"],
        "seconds": {k: round(v, 3) for k, v in time_parts.items() if k not in ("train_seconds",
                                                                               "earliest_stop_seconds",
                                                                               "early_stopping",
                                                                               "at_evaluations")},
        "seconds_per_step": round(time_parts["steps"] / max(1, plan["max_steps"]), 3),
        "memory_mb": {k: round(v, 0) for k, v in memory.items() if k != "peak_rss_mb"},
        "timed_steps": timing["timed"], "build_trainer_seconds": round(build_seconds, 2),
        "estimate_seconds": round(time.time() - t_start, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }
    return result


# ---------------------------------------------------------------------------------------------
# the schedule: which batches, how many steps, evaluations and saves


def schedule(trainer) -> dict:
    """One epoch of the run's batches (row indices, in its sampler's order, grouped into optimizer steps),
    the run's step count and the steps at which it evaluates and saves (transformers' flow callback,
    replayed: the run's own rules for eval_strategy/save_strategy, steps and epochs)."""
    args = trainer.args
    sampler = trainer._get_train_sampler(trainer.train_dataset)
    order = list(iter(sampler)) if sampler is not None else list(range(len(trainer.train_dataset)))
    size = trainer._train_batch_size
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    gas = max(1, args.gradient_accumulation_steps)
    step_batches = [batches[i:i + gas] for i in range(0, len(batches), gas)]
    steps_per_epoch = len(step_batches)
    epochs_arg = args.num_train_epochs
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(epochs_arg * steps_per_epoch)
    epochs = math.ceil(max_steps / steps_per_epoch)
    evaluations, saves = _replay_flow(args, steps_per_epoch, max_steps, epochs)
    sizer = batch_sizer(trainer.train_dataset)
    return {"step_batches": step_batches, "steps_per_epoch": steps_per_epoch, "max_steps": max_steps,
            "epochs": epochs, "evaluations": evaluations, "saves": saves,
            "sizes": [sum(sizer(b) for b in step) for step in step_batches],
            "full": [all(len(b) == size for b in step) for step in step_batches]}


def _replay_flow(args, steps_per_epoch: int, max_steps: int, epochs: int) -> tuple[list[int], list[int]]:
    flow, control, state = DefaultFlowCallback(), TrainerControl(), TrainerState()
    state.max_steps = max_steps
    state.compute_steps(args, max_steps)
    evaluations, saves, step = [], [], 0

    def settle():
        if control.should_evaluate:
            evaluations.append(step)
        if control.should_save:
            saves.append(step)
        control.should_evaluate = control.should_save = control.should_log = False

    for epoch in range(epochs):
        for k in range(steps_per_epoch):
            step += 1
            state.global_step, state.epoch = step, epoch + (k + 1) / steps_per_epoch
            flow.on_step_end(args, state, control)
            settle()
            if control.should_training_stop:
                break
        flow.on_epoch_end(args, state, control)
        settle()
        if control.should_training_stop:
            break
    return evaluations, saves


def batch_sizer(dataset):
    """rows -> the batch's padded size: rows x its longest row (the collators pad to the longest), or the
    row count for cached features (a row costs the same whatever its text)."""
    if "input_ids" not in dataset.column_names:
        return len
    lengths = [len(x) for x in dataset["input_ids"]]
    return lambda rows: len(rows) * max((lengths[i] for i in rows), default=0)


# ---------------------------------------------------------------------------------------------
# timing real steps, an evaluation pass, a save


class StepTimer(TrainerCallback):
    """The time of every optimizer step end (and of the start), and a stop once the budget is spent."""

    def __init__(self):
        self.marks: list[float] = []
        self.budget = math.inf
        self.min_steps = MIN_STEPS

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())
        if len(self.marks) - 1 >= self.min_steps and self.marks[-1] - self.marks[0] >= self.budget:
            control.should_training_stop = True


class _FixedOrder(torch.utils.data.Sampler):
    def __init__(self, order: list[int]):
        self.order = order

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


def quantile_order(limit: int) -> list[float]:
    """1, 0, 1/2, then the quarters, the eighths... (each level's new points), repeated up to `limit`."""
    out: list[float] = []
    while len(out) < limit:
        out += [1.0, 0.0, 0.5]
        depth = 2
        while len(out) < limit and depth <= 6:
            out += [k / 2 ** depth for k in range(2 ** depth - 1, 0, -2)]
            depth += 1
    return out[:limit]


def pick_steps(sizes: list[int], full: list[bool], limit: int = MAX_STEPS) -> list[int]:
    """Which of the epoch's steps to time, in order: the largest, the smallest, the median, then the
    quartiles and finer quantiles, so a line fits the whole range. Only steps of full batches (a
    partial one would shift the batches after it); a step is repeated when the epoch has few."""
    candidates = sorted((i for i in range(len(sizes)) if full[i]), key=lambda i: sizes[i]) or [len(sizes) - 1]
    n = len(candidates)
    return [candidates[round(q * (n - 1))] for q in quantile_order(limit)]


def time_steps(trainer, plan: dict, budget_seconds: float) -> dict:
    """Run real optimizer steps of the run's own batches (pick_steps) with trainer.train(); returns the
    seconds and padded size of each, the setup before the first and the wind-down after the last."""
    args, sizes = trainer.args, plan["sizes"]
    picks = pick_steps(sizes, plan["full"])
    order = [i for p in picks for b in plan["step_batches"][p] for i in b]
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
    timer.budget = budget_seconds
    saved = {k: getattr(args, k) for k in ("max_steps", "num_train_epochs", "eval_strategy", "save_strategy",
                                           "load_best_model_at_end")}
    args.max_steps, args.num_train_epochs = len(picks), 1
    args.eval_strategy, args.save_strategy, args.load_best_model_at_end = IntervalStrategy.NO, SaveStrategy.NO, False
    trainer._get_train_sampler = lambda *_a, **_k: _FixedOrder(order)
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        t_end = time.perf_counter()
        for k, v in saved.items():
            setattr(args, k, v)
        del trainer._get_train_sampler
    marks = timer.marks
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    return {"seconds": seconds, "sizes": [sizes[p] for p in picks[:len(seconds)]], "timed": len(seconds),
            "setup": marks[0] - t0 if marks else 0.0, "wind_down": t_end - marks[-1] if marks else 0.0}


def time_evaluation(trainer) -> float:
    """Seconds of one evaluation pass over the whole validation set: timed on up to EVAL_ROWS rows spread
    over it, scaled by padded tokens (evaluation batches follow the data's order)."""
    dataset = trainer.eval_dataset
    n, per = len(dataset), trainer.args.eval_batch_size
    rows = list(range(n)) if n <= EVAL_ROWS else sorted({round(i * (n - 1) / (EVAL_ROWS - 1)) for i in range(EVAL_ROWS)})
    subset = dataset if len(rows) == n else dataset.select(rows)
    t0 = time.perf_counter()
    trainer.evaluate(eval_dataset=subset)
    seconds = time.perf_counter() - t0
    sizer = batch_sizer(dataset)

    def padded(rows: list[int]) -> int:
        return sum(sizer(rows[i:i + per]) for i in range(0, len(rows), per))

    return seconds * padded(list(range(n))) / max(1, padded(rows))


def time_checkpoint(trainer) -> tuple[float, float]:
    """(seconds to save one checkpoint, seconds to load it back as the best model at the end)."""
    t0 = time.perf_counter()
    trainer._save_checkpoint(trainer.model, trial=None)
    save = time.perf_counter() - t0
    if not trainer.args.load_best_model_at_end:
        return save, 0.0
    trainer.state.best_model_checkpoint = str(Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}")
    t0 = time.perf_counter()
    trainer._load_best_model()
    return save, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# predictions


def fit_line(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(a, b) of seconds = a + b x size by least squares, with a, b >= 0; a flat line (the mean) when the
    sizes barely differ."""
    n = len(sizes)
    if n == 0:
        return 0.0, 0.0
    mean_s, mean_t = sum(sizes) / n, sum(seconds) / n
    var = sum((s - mean_s) ** 2 for s in sizes)
    if n < 2 or var <= (0.05 * mean_s) ** 2 * n:
        return mean_t, 0.0
    b = sum((s - mean_s) * (t - mean_t) for s, t in zip(sizes, seconds)) / var
    a = mean_t - b * mean_s
    if b < 0:
        return mean_t, 0.0
    if a < 0:
        return 0.0, sum(seconds) / max(1, sum(sizes))
    return a, b


def predict_seconds(plan: dict, timing: dict, eval_seconds: float, save_seconds: float, load_seconds: float,
                    feature_seconds: float, patience) -> dict:
    """train_seconds of the full schedule, its parts, and the time if early stopping ends it at its first
    chance (patience + 1 evaluations without improvement after the first)."""
    seconds, sizes = timing["seconds"], timing["sizes"]
    steady = (sizes[1:], seconds[1:]) if len(seconds) > 1 else (sizes, seconds)
    a, b = fit_line(*steady)
    first_surplus = max(0.0, seconds[0] - (a + b * sizes[0])) if seconds else 0.0
    per_epoch = plan["sizes"]

    def through(step: int) -> dict:
        steps = sum(a + b * per_epoch[i % len(per_epoch)] for i in range(step))
        evals = sum(1 for s in plan["evaluations"] if s <= step)
        saves = sum(1 for s in plan["saves"] if s <= step)
        parts = {"feature_caching": feature_seconds, "setup": timing["setup"] + timing["wind_down"],
                 "first_step_surplus": first_surplus, "steps": steps, "evaluations": evals * eval_seconds,
                 "saves": saves * save_seconds, "best_model_reload": load_seconds if saves else 0.0}
        parts["total"] = sum(parts.values())
        return parts

    full = through(plan["max_steps"])
    early = bool(patience) and len(plan["evaluations"]) > int(patience) + 1
    earliest = through(plan["evaluations"][int(patience)])["total"] if early else full["total"]
    result = {k: v for k, v in full.items() if k != "total"}
    at_evaluations = [[step, round(through(step)["total"], 1)] for step in plan["evaluations"]]
    result.update(train_seconds=full["total"], earliest_stop_seconds=earliest, early_stopping=early,
                  at_evaluations=at_evaluations,
                  eval_pass=eval_seconds, save=save_seconds, step_intercept=a, step_per_token=b)
    return result


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def predict_memory(trainer, model, cfg: RunConfig) -> dict:
    """The run's peak RSS: this process's peak so far (loading, preparing, the largest batch, an
    evaluation, a save), or what the run adds after training, whichever is higher: an instruction run
    frees the optimizer, then loads the base model again to measure it (full and frozen runs; LoRA
    switches its adapters off instead)."""
    through_training = peak_rss_mb()
    after = 0.0
    if cfg.task == "instruction" and not hasattr(model, "disable_adapter"):
        release_training_state(trainer)
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        after = _rss_mb() + weights
    return {"peak_rss_mb": max(through_training, after), "through_training": through_training,
            "after_training": after}


def available_mb() -> float:
    """Memory a run could use once this estimate has ended: what is available now plus this process's own."""
    return psutil.virtual_memory().available / 2**20 + _rss_mb()


def describe(e: dict) -> str:
    """The estimate as a few lines for a terminal."""
    def clock(s: float) -> str:
        s = int(round(s))
        return f"{s // 60}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

    lines = [f"Estimated training time: {clock(e['train_seconds'])} ({e['train_seconds']:.0f} s) for "
             f"{e['steps']} steps, {e['epochs']} epochs, {e['evaluations']} evaluations",
             f"Estimated peak memory:   {e['peak_rss_mb']:.0f} MB of {e['available_mb']:.0f} MB available"
             + ("" if e["fits"] else "  -- WILL NOT FIT: lower the batch size or max_length, or use LoRA")]
    if e["earliest_stop_seconds"] < e["train_seconds"]:
        lines.append(f"Early stopping may end it sooner: at the earliest after {clock(e['earliest_stop_seconds'])}.")
    lines.append(f"How: {e['method']}. Machine load {e['load_average']} while timing "
                 f"({e['torch_threads']} torch threads); other work on the cores makes it read high.")
    return "\n".join(lines)
