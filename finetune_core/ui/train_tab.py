"""Train tab: model, strategy and hyperparameters; Start / Stop; live progress, log and charts.

Training runs in a worker process (finetune_core.jobs); this tab tails its events.jsonl with
finetune_core.events.read_events from the last offset, so a tick reads only what is new. The form's
controls and where each lands in the config are the table in finetune_core/ui/form.py.

Handlers are module-level functions of (ctx, ...); `wire()` binds them to the components.
"""

from __future__ import annotations

import copy
import functools
import html
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import gradio as gr

from .. import plots
from ..audit import preference_rows
from ..config import GENERATIVE_TASKS, LoraSettings, StrategyConfig, dump_config, training_defaults
from ..data import clean_classification, detect_columns, row_to_messages, split_frame, store_columns
from ..errors import FinetuneError
from ..events import Progress as EventProgress
from ..events import format_event, read_events
from ..jobs import ACTIVE, OwnerBusy
from ..models import BUNDLED, SUGGESTED_HUB_MODELS, list_models, model_kind, resolve_model
from ..rundir import metrics_path, read_json
from . import form
from .common import REPO_ROOT, AppContext, bind, error_box, owner_of, user_errors, warm_ml_imports
from .data_source import read_frame, resolve_data

STRATEGY_CHOICES = [("Full fine-tuning: every weight learns", "full"),
                    ("Frozen backbone: only the top learns", "frozen"),
                    ("LoRA: small adapters learn, base stays frozen", "lora")]
STRATEGY_INFO = ("Cheat sheet: under 500 rows → freeze the backbone; 500-5,000 rows → full fine-tuning; "
                 "LoRA when full fine-tuning overfits, and for LLMs (1-2% of the weights train, less forgetting).")
POLL_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------
# models


def model_choices() -> list[tuple[str, str]]:
    out = []
    for row in list_models():
        offline = "offline ✓" if row["available_offline"] else "needs the Hub"
        out.append((f"{row['id']}  ({row['kind']}, {row['params']}, {offline})", row["id"]))
    return out


def model_description(model: str) -> str:
    if model in BUNDLED:
        return BUNDLED[model]["description"]
    if model in SUGGESTED_HUB_MODELS:
        return f"Hub model: {SUGGESTED_HUB_MODELS[model]}."
    return "Any Hugging Face model id or a run's model folder; the Hub must be reachable unless it is cached."


@functools.lru_cache(maxsize=64)
def quick_model_kind(model: str, task: str) -> str:
    """'encoder' or 'causal' without loading weights (falls back on the task when the Hub is unreachable)."""
    if model in BUNDLED:
        return BUNDLED[model]["kind"]
    if model in SUGGESTED_HUB_MODELS:
        return "causal" if "causal" in SUGGESTED_HUB_MODELS[model] else "encoder"
    try:
        return model_kind(resolve_model(model))
    except Exception:  # noqa: BLE001
        return "causal" if task in GENERATIVE_TASKS else "encoder"


@functools.lru_cache(maxsize=32)
def _count_params(path: str, task: str, kind: str, strategy: str, frozen, r: int, alpha: float, dropout: float,
                  targets, num_labels: int) -> dict:
    """Trainable / total parameters, built on the meta device (no weights loaded: instant, no memory)."""
    import torch          # torch-heavy modules load on first use: the page is drawn without them
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..heads import MeanPoolingForSequenceClassification, mean_pooling_config
    from ..strategies import apply_strategy, trainable_summary, transformer_blocks

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        if task == "classification" and strategy == "frozen" and frozen == "all" and kind == "encoder":
            model = MeanPoolingForSequenceClassification(mean_pooling_config(config, num_labels))  # as train.py
        elif task == "classification":
            config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    blocks = len(transformer_blocks(model))
    tgt = list(targets) if isinstance(targets, tuple) else targets
    strat = StrategyConfig(name=strategy, frozen_layers=frozen,
                           lora=LoraSettings(r=r, alpha=alpha, dropout=dropout, target_modules=tgt))
    model = apply_strategy(model, strat, task)
    summary = trainable_summary(model)
    summary["blocks"] = blocks
    return summary


def trainable_params(ctx: AppContext, values: dict, num_labels: int | None, owner: str | None = None) -> dict:
    """The parameter count of the form's model and strategy (form.read gives each setting as trained)."""
    values = dict(form.DEFAULTS, **values)
    model, task, strategy = values["model"], values["task"], values["strategy"]
    path = resolve_model(model, allowed_roots=ctx.model_roots(owner))
    targets = form.read(values, "strategy.lora.target_modules")
    targets = tuple(targets) if isinstance(targets, list) else targets
    frozen = form.read(values, "strategy.frozen_layers") if strategy == "frozen" else "all"
    return _count_params(path, task, quick_model_kind(model, task), strategy, frozen,
                         form.read(values, "strategy.lora.r"), float(values["lora_alpha"]),
                         form.read(values, "strategy.lora.dropout"), targets, int(num_labels or 2))


# ---------------------------------------------------------------------------------------------
# recommended settings


def recommended_training(values: dict, n_train: int, cuda: bool | None = None) -> dict:
    """config.training_defaults for the form's task, model kind and strategy: the values train() fills in
    for empty boxes. cuda=None detects the device the way train() does (it imports torch: handlers only)."""
    values = dict(form.DEFAULTS, **values)
    kind = quick_model_kind(values["model"], values["task"])
    return training_defaults(values["task"], kind, values["strategy"], n_train,
                             form.read(values, "strategy.frozen_layers"), cuda=cuda)


def fmt_rate(rate: float) -> str:
    """A learning rate as the README writes it: 5e-05 -> '5e-5', 0.005 -> '5e-3', 0.00025 -> '2.5e-4'."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def default_rate(task: str, kind: str, strategy: str, frozen="all") -> float:
    """The learning rate a run of this kind gets when the box is empty (config.training_defaults)."""
    return training_defaults(task, kind, strategy, 128, frozen, cuda=False)["learning_rate"]


def default_epochs(task: str) -> int:
    """The epochs a run of this task gets when the box is empty (config.training_defaults)."""
    return training_defaults(task, "causal" if task in GENERATIVE_TASKS else "encoder", "lora", 128,
                             cuda=False)["num_train_epochs"]


def full_rates() -> list[float]:
    """Full fine-tuning's default learning rates (encoder / causal-LM classifier, instruction), low to high."""
    return sorted({default_rate("classification", "encoder", "full"), default_rate("classification", "causal", "full"),
                   default_rate("instruction", "causal", "full")})


def learning_rate_info() -> str:
    """The learning-rate box's info line: the rates Start fills in, from config.training_defaults."""
    def rate(task, kind, strategy):
        return fmt_rate(default_rate(task, kind, strategy))

    c, i = "classification", "instruction"
    return (f"Empty = recommended. Full fine-tuning keeps steps small so the model keeps what it knows: "
            f"{rate(c, 'encoder', 'full')} on an encoder, {rate(c, 'causal', 'full')} for a causal-LM classifier, "
            f"{rate(i, 'causal', 'full')} for instruction tuning. A new head alone takes far larger ones "
            f"({rate(c, 'encoder', 'frozen')} on an encoder), LoRA in between ({rate(c, 'encoder', 'lora')} on a "
            f"small encoder, {rate(i, 'causal', 'lora')} on a causal LM).")


def epochs_info() -> str:
    """The epochs box's info line: the epochs Start fills in, from config.training_defaults."""
    return (f"Passes over the data. Empty = {default_epochs('classification')} for classification, "
            f"{default_epochs('instruction')} for instruction tuning; early stopping usually ends sooner.")


def training_rows(values: dict, n_rows: int) -> int:
    """The rows Start trains on: all of them beside a validation file, else what the split leaves."""
    if values.get("validation_file"):
        return int(n_rows)
    return int(n_rows * (1 - float(values.get("val_size") or 0.2)))


def advice(kind, strategy, frozen, n_rows, n_train, d) -> str:
    lines = []
    if n_rows:
        if kind == "causal":
            best = "lora"
            why = "for an LLM the article recommends **LoRA**: 1-2% of the weights train and it forgets less"
        elif n_rows < 500:
            best = "frozen"
            why = f"with {n_rows} rows the cheat sheet says **freeze the backbone** (full fine-tuning overfits)"
        elif n_rows <= 5000:
            best = "full"
            why = f"with {n_rows} rows the cheat sheet says **full fine-tuning** (LoRA if it overfits)"
        else:
            best = "full"
            why = f"with {n_rows} rows **full fine-tuning** pays off; LoRA is cheaper on big models"
        lines.append(f"- Strategy: {why}." + ("" if best == strategy else
                                               f" You picked **{strategy}**: fine if you are comparing."))
    else:
        lines.append("- Load data in the Data tab to get advice sized to your rows.")
    lr = d["learning_rate"]
    low, *_, high = full_rates()
    if strategy == "full" or (strategy == "frozen" and frozen != "all"):
        lines.append(f"- Learning rate **{fmt_rate(lr)}**: low on purpose, large steps erase what pretraining "
                     f"taught (full fine-tuning here uses {fmt_rate(low)} to {fmt_rate(high)}, by model and task).")
    else:
        lines.append(f"- Learning rate **{fmt_rate(lr)}**: only new, small weights learn ({strategy}), so they need "
                     f"larger steps than full fine-tuning's {fmt_rate(low)} to {fmt_rate(high)}.")
    lines.append(f"- **{d['num_train_epochs']} epochs** at batch {d['per_device_train_batch_size']} "
                 f"(~{max(1, -(-n_train // d['per_device_train_batch_size']))} steps per epoch); early stopping "
                 f"(patience {d['early_stopping_patience']}) ends training when the validation score stops "
                 "improving and keeps the best checkpoint.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# progress rendering


def _fmt_seconds(s) -> str:
    if not isinstance(s, (int, float)) or s < 0:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# What the status line says in each phase of a running attempt (events.PHASES).
PHASE_LABELS = {"loading": "⏳ Loading the data and the model",
                "training": "🏃 Training",
                "checkpoint": "💾 Evaluating and saving a checkpoint",
                "saving": "💾 Saving the model",
                "evaluating": "📏 Evaluating the fine-tuned model",
                "baseline": "📐 Measuring the base model for comparison",
                "generating": "✍️ Answering the held-out prompts"}


class Progress:
    """A run's events, read incrementally, as the Train tab shows them: the log lines, the reducer's
    state of the latest attempt (events.Progress), and whether the curves need redrawing."""

    def __init__(self):
        self.events: list[dict] = []
        self.log: deque[str] = deque(maxlen=500)
        self.offset = 0
        self.changed_curves = True
        self.state = EventProgress()

    def read(self, path: Path) -> int:
        new, self.offset = read_events(path, self.offset)
        for e in new:
            if self.state.apply(e):
                self.log.append("— new attempt —")
            line = format_event(e, stamp=True)
            if line:
                self.log.append(line)
        self.events.extend(new)
        if any(e.get("type") in ("log", "eval", "start") for e in new):
            self.changed_curves = True
        return len(new)


def _phase_bar(p: EventProgress, status: str) -> tuple[float, str]:
    """(percent of the bar, label) for a running attempt: training fills the bar by steps; each phase
    after it by its own countable work when the worker reports it (done / total), else it stays full."""
    step, max_steps = p.step or 0, p.max_steps or 0
    if status == "stopping":
        return (100.0 * step / max_steps if max_steps else 0.0,
                "✋ Stopping after the current step; the model is then saved and evaluated")
    if p.in_training_loop:
        return 100.0 * step / max_steps if max_steps else 0.0, PHASE_LABELS[p.phase]
    label = PHASE_LABELS.get(p.phase, "⚙️ Working")
    if p.phase_total:
        label += f" ({p.phase_done}/{p.phase_total})"
        return 100.0 * (p.phase_done or 0) / p.phase_total, label
    return (0.0 if p.phase == "loading" else 100.0), label


def status_html(st: dict, prog: Progress, metrics: dict | None = None) -> str:
    p = prog.state
    status = st["status"]
    name = html.escape(st.get("name") or st["run_id"])
    head = f"<b>{name}</b> <code>{html.escape(st['run_id'])}</code>"
    if status == "queued":
        pos = st.get("position") or 1
        ahead = pos - 1 + st.get("running", 0)
        return (f'<div class="ft-status">⏳ {head}: waiting in the queue, position <b>{pos}</b> '
                f"({ahead} run(s) ahead of yours). It starts by itself; you can leave this page and come back.</div>")
    if status in ("failed", "interrupted"):
        return error_box(f"Run {st.get('name') or st['run_id']} {status}: {st.get('error') or ''}",
                         st.get("error_lines"))
    if status == "cancelled":
        return f'<div class="ft-status">🚫 {head}: removed from the queue.</div>'
    running = status in ("running", "stopping")
    step, max_steps = p.step or 0, p.max_steps or 0
    bits = []
    if max_steps:
        bits.append(f"step <b>{step}</b> / {max_steps}")
    if p.epoch:
        bits.append(f"epoch {p.epoch:.2f}")
    if running and p.in_training_loop and p.eta_seconds is not None:
        bits.append(f"ETA {_fmt_seconds(p.remaining_seconds())}")
    if p.loss is not None:
        bits.append(f"train loss {p.loss:.4f}")
    if p.eval_loss is not None:
        bits.append(f"eval loss {p.eval_loss:.4f}")
    if running:
        pct, label = _phase_bar(p, status)
    else:
        pct = 100.0
        label = "⏹️ Stopped by you; the model was evaluated and saved" if status == "stopped" else "✅ Finished"
    extra = ""
    if status == "finished" and metrics and metrics.get("stopped_by_time_limit"):
        extra = (f"<br><small>⏱️ Stopped at step {metrics.get('global_step')} of {metrics.get('max_steps')} by this "
                 "deployment's time limit; the model was evaluated and saved.</small>")
    elif status == "finished" and metrics and metrics.get("stopped_early"):
        extra = (f"<br><small>Finished early at step {metrics.get('global_step')} of {metrics.get('max_steps')}: "
                 "early stopping saw the validation score stop improving; the best checkpoint was kept.</small>")
    if running and p.message and not p.in_training_loop:
        extra = f"<br><small>{html.escape(str(p.message))}</small>"
    if metrics and status in ("finished", "stopped"):
        extra += "<br>" + result_line(metrics)
    return (f'<div class="ft-status">{label}: {head}<div class="ft-progress"><div style="width:{pct:.1f}%"></div>'
            f'</div>{" · ".join(bits)}{extra}</div>')


def result_line(m: dict) -> str:
    if m.get("task") == "classification":
        base = (m.get("baselines") or {}).get("tfidf_logreg", {}).get("f1_weighted")
        s = f"weighted F1 <b>{m.get('f1_weighted', 0):.3f}</b>, accuracy {m.get('accuracy', 0):.3f}"
        if isinstance(base, float):
            s += f" (TF-IDF baseline F1 {base:.3f})"
    elif m.get("task") == "preference":
        s = (f"reward accuracy <b>{m.get('reward_accuracy', float('nan')):.2f}</b> (before "
             f"{m.get('reward_accuracy_before', float('nan')):.2f}), DPO loss {m.get('eval_loss', float('nan')):.3f} "
             f"(before {m.get('eval_loss_before', float('nan')):.3f})")
    else:
        s = (f"eval loss <b>{m.get('eval_loss', float('nan')):.3f}</b> (before {m.get('eval_loss_before', float('nan')):.3f})"
             f", forgetting: {html.escape(str(m.get('forgetting_verdict', '?')))}")
    if isinstance(m.get("train_seconds"), (int, float)):
        s += f" · trained in {m['train_seconds']:.0f} s"
        if isinstance(m.get("total_seconds"), (int, float)):
            s += f", whole run {m['total_seconds']:.0f} s"
    return s + " · details in the Evaluate tab."




def result_json(ctx: AppContext, st: dict) -> dict:
    out = {"run_id": st["run_id"], "status": st["status"]}
    if st.get("error"):
        out["error"] = st["error"]
    path = metrics_path(ctx.runs_dir / st["run_id"])
    if path.exists():
        m = read_json(path)
        keep = ("task", "strategy", "model", "accuracy", "f1_weighted", "f1_macro", "baselines", "before_finetuning",
                "eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "general_perplexity_before",
                "general_perplexity", "forgetting_verdict", "rougeL", "rougeL_before", "trainable_params",
                "total_params", "train_seconds", "total_seconds", "train_samples", "global_step", "stopped_early",
                "stopped_by_user", "reward_accuracy", "reward_accuracy_before", "reward_margin", "reward_margin_before")
        out["metrics"] = {k: m[k] for k in keep if k in m}
    return out


# ---------------------------------------------------------------------------------------------
# following a run


def watch(ctx: AppContext, run_id: str, owner: str):
    """Yield the watch outputs (run id, status, loss chart, metric chart, log, result) until the run ends."""
    run_dir = ctx.run_dir(run_id, owner)
    prog = Progress()
    last_sig, last_yield = None, 0.0
    while True:
        prog.read(run_dir / "events.jsonl")
        st = ctx.manager.status(run_id)
        terminal = st["status"] not in ACTIVE
        sig = (len(prog.events), st["status"], st.get("position"))
        now = time.time()
        if terminal or sig != last_sig or now - last_yield >= 2.0:
            metrics = (read_json(metrics_path(run_dir)) or None) if terminal else None
            log_text = "\n".join(prog.log)
            if terminal and st["status"] == "failed" and st.get("error_lines"):
                log_text += "\n--- worker.log (last lines) ---\n" + "\n".join(st["error_lines"])
            curves = prog.changed_curves or terminal
            prog.changed_curves = False
            yield (run_id, status_html(st, prog, metrics),
                   plots.training_curves(prog.events) if curves else gr.skip(),
                   plots.eval_metric_curve(prog.events) if curves else gr.skip(),
                   log_text, result_json(ctx, st) if terminal else {"run_id": run_id, "status": st["status"],
                                                                     "position": st.get("position")})
            last_sig, last_yield = sig, now
        if terminal:
            return
        time.sleep(POLL_SECONDS)


def active_job(ctx: AppContext, owner: str):
    """This session's queued or running job, if any."""
    active = ctx.manager.jobs(owner, active_only=True)
    return active[-1] if active else None


def follow_busy(ctx: AppContext, busy, owner: str):
    """One run per session at a time (its page shows one progress stream, the queue stays fair): say why
    no new run starts and follow the active one."""
    where = "waiting in the queue" if busy.status == "queued" else busy.status
    gr.Warning(f"Your run '{busy.name or busy.run_id}' is still {where}: one run per session at a time. "
               "Showing its progress. Press Stop to end it, then Start again.")
    yield from watch(ctx, busy.run_id, owner)


def check_before_submit(ctx: AppContext, cfg, path: Path, owner: str) -> None:
    """Fail fast on what the worker would only find after loading a model: the engine's own column and
    row checks (labels, classes, split, chat messages) run here in milliseconds, on the training file
    and the validation file, and a model the session may not use (unknown bundled id, hub id offline,
    another session's folder) is refused."""
    validation = Path(cfg.data.validation) if cfg.data.validation else None
    data_cfg = copy.deepcopy(cfg.data)       # the validation file must hold the training file's columns
    for source in (path, validation):
        if source is None:
            continue
        df = read_frame(source)
        cols = detect_columns(df, cfg.task, data_cfg, name=source.name)
        store_columns(data_cfg, cols)
        if cfg.task == "classification":
            rows = clean_classification(df, cols["text"], cols["label"], source.name)
            if validation is None:
                split_frame(rows, cfg.data.val_size, cfg.seed, stratify="label")
        elif cfg.task == "preference":
            preference_rows(df, cols)          # every cell text or messages
        else:
            for i, row in enumerate(df.to_dict("records"), start=1):
                row_to_messages(row, cols, i)
    if cfg.model not in BUNDLED:
        resolve_model(cfg.model, allowed_roots=ctx.model_roots(owner))   # private: own runs only


# ---------------------------------------------------------------------------------------------
# handlers


@user_errors
def train(ctx: AppContext, values: dict, owner_state=None, request: gr.Request = None):
    """Start a fine-tuning run in a worker process and stream its progress until it ends.

    Yields (run_id, status_html, loss_plot, metric_plot, log, result); the last result holds the metrics.
    """
    owner = owner_of(owner_state, request)
    busy = active_job(ctx, owner)
    if busy is not None:
        yield from follow_busy(ctx, busy, owner)
        return
    path = resolve_data(ctx, **form.source(values))
    cfg = form.form_to_config(values, path)
    check_before_submit(ctx, cfg, path, owner)
    try:
        job = ctx.manager.submit(cfg, owner, one_active_per_owner=True)
    except OwnerBusy as exc:          # a second Start that raced the first one past the check above
        yield from follow_busy(ctx, exc.job, owner)
        return
    yield from watch(ctx, job.run_id, owner)
    st = ctx.manager.status(job.run_id)
    if st["status"] in ("failed", "interrupted"):      # API clients get an error, not just a red box
        raise FinetuneError(f"Run {job.run_id} {st['status']}: {st.get('error') or 'see the log'}",
                            "The log shows the worker's last lines.")


@user_errors
def reconnect(ctx: AppContext, owner_state, request: gr.Request):
    """After a page reload: follow this session's active (or latest) job again, charts from offset 0."""
    owner = owner_of(owner_state, request)
    jobs = ctx.manager.jobs(owner)
    active = [j for j in jobs if j.active]
    job = (active or jobs or [None])[-1]
    if job is None or (job.group and job.active):     # a comparison: compare_panel.reconnect_comparison
        return
    yield from watch(ctx, job.run_id, owner)


@user_errors
def watch_id(ctx: AppContext, run_id, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    run_id = (run_id or "").strip()
    if not run_id:
        return
    yield from watch(ctx, run_id, owner)


@user_errors
def stop(ctx: AppContext, run_id="", owner_state=None, request: gr.Request = None):
    """Stop a run you started: training ends after the current step, then the model is evaluated and saved.
    A run of a strategy comparison stops the comparison: the strategies still queued never start."""
    owner = owner_of(owner_state, request)
    run_id = (run_id or "").strip()
    if not run_id:
        raise FinetuneError("No run to stop.", "Start a run first.")
    job = ctx.manager.get(run_id)
    if job is not None and job.group and job.active:     # a comparison: its queued runs never start
        message = ctx.manager.stop_group(job.group, owner)
    else:
        message = ctx.manager.stop(run_id, owner)
    gr.Info(message)
    return message


@user_errors
def resume(ctx: AppContext, run_id="", owner_state=None, request: gr.Request = None):
    """Continue a stopped or interrupted run of yours from its last checkpoint, then watch it."""
    owner = owner_of(owner_state, request)
    run_id = (run_id or "").strip()
    if not run_id:
        raise FinetuneError("No run to resume.", "Paste the run id of a stopped or interrupted run.")
    ctx.manager.resume(run_id, owner)
    gr.Info("Resuming from the last checkpoint.")
    yield from watch(ctx, run_id, owner)


@user_errors
def recommend(ctx: AppContext, values: dict, info=None):
    """Fill the hyperparameter boxes with the values train() would pick, and say why."""
    values = dict(form.DEFAULTS, **values)
    n_rows = (info or {}).get("n_rows")
    n_train = training_rows(values, n_rows) if n_rows else 128
    d = recommended_training(values, n_train)
    rec = {"epochs": d["num_train_epochs"], "lr": d["learning_rate"], "batch": d["per_device_train_batch_size"],
           "patience": d["early_stopping_patience"]}
    kind = quick_model_kind(values["model"], values["task"])
    frozen = form.read(values, "strategy.frozen_layers")
    return (rec["epochs"], rec["lr"], rec["batch"], rec["patience"],
            advice(kind, values["strategy"], frozen, n_rows, n_train, d), rec)


@user_errors
def context_changed(ctx: AppContext, values: dict, info=None, last_rec=None):
    """Refresh the 'auto' placeholders; values filled by Recommend follow the new context, edits stay."""
    values = dict(form.DEFAULTS, **values)
    n_rows = (info or {}).get("n_rows") or 160
    d = recommended_training(values, training_rows(values, n_rows))
    auto = {"epochs": d["num_train_epochs"], "lr": d["learning_rate"], "batch": d["per_device_train_batch_size"]}
    epochs, lr, batch = values["num_train_epochs"], values["learning_rate"], values["batch_size"]
    following = bool(last_rec) and [epochs, lr, batch] == [last_rec.get("epochs"), last_rec.get("lr"),
                                                            last_rec.get("batch")]
    updates = []
    for key, current in (("epochs", epochs), ("lr", lr), ("batch", batch)):
        hint = f"auto: {auto[key]:g}"
        if not current or current <= 0:
            updates.append(gr.update(value=None, placeholder=hint))     # shows empty = recommended
        elif following:
            updates.append(gr.update(value=auto[key], placeholder=hint))
        else:
            updates.append(gr.update(placeholder=hint))                 # the user's own value stays
    rec = dict(auto, patience=values["early_stopping_patience"]) if following else last_rec
    return (*updates, rec)


def show_strategy(strategy, head_only):
    return (gr.update(visible=strategy == "frozen"), gr.update(visible=strategy == "lora"),
            gr.update(visible=strategy == "frozen" and not head_only))


def count(ctx: AppContext, values: dict, info=None, owner_state=None, request: gr.Request = None):
    """The trainable-parameter line, the frozen-blocks slider's range and the model's description."""
    warm_ml_imports()
    model, task = values["model"], values["task"]
    try:
        s = trainable_params(ctx, values, (info or {}).get("n_classes") or 2, owner_of(owner_state, request))
    except FinetuneError as exc:
        return f"⚠️ {exc.message}", gr.update(), model_description(model)
    except Exception as exc:  # noqa: BLE001
        return f"⚠️ Cannot count parameters for this setting: {type(exc).__name__}: {exc}", gr.update(), \
            model_description(model)
    text = (f"**Trainable: {s['trainable_params']:,}** of {s['total_params']:,} parameters "
            f"(**{s['trainable_percent']:.2f}%**) · {s['blocks']} transformer blocks")
    return text, gr.update(maximum=max(0, s["blocks"] - (1 if task in GENERATIVE_TASKS else 0))), \
        model_description(model)


# ---------------------------------------------------------------------------------------------
# estimate before Start

ESTIMATE_HINT = ("Press **Estimate time and memory** to time a few real steps of this run on this machine "
                 "(10-30 s) and see whether it fits in memory.")
ESTIMATE_TIMEOUT = 900


def run_estimate(cfg, folder: Path) -> dict:
    """`python -m finetune_core estimate CONFIG --json` in its own process, as a run trains in its own: its
    memory peak is then a fresh process's, like the worker's, and its torch work stays off the app's
    threads (the app computes with models on its one inference thread, and training steps would leave
    this process a heap the size of a run's). Its FinetuneError comes back as the same FinetuneError."""
    path = folder / "estimate.yaml"
    dump_config(cfg, path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([sys.executable, "-m", "finetune_core", "estimate", str(path), "--json"], cwd=REPO_ROOT,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=ESTIMATE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise FinetuneError(f"The estimate took more than {ESTIMATE_TIMEOUT // 60} minutes.",
                            "The machine is busy: try again when no run is training.") from None
    if proc.returncode != 0:
        text = proc.stderr.strip()
        message = text.rsplit("Error: ", 1)[-1].strip() if "Error: " in text else \
            (text.splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode == 2:          # the CLI's refusal: the problem and its fix
            raise FinetuneError(message)
        raise FinetuneError(f"The estimate failed: {message}", "Press Start: the run's log shows the same problem.")
    return json.loads(proc.stdout)


def estimate_markdown(e: dict, busy: bool = False) -> str:
    """The estimate under the parameter count: time, memory against what the machine has, and the warnings."""
    def gb(mb: float) -> str:
        return f"{mb / 1024:.1f} GB"

    line = (f"⏱️ **Training ≈ {_fmt_seconds(e['train_seconds'])}** ({e['steps']} steps, {e['epochs']} epochs, "
            f"{e['evaluations']} evaluations)")
    if e["earliest_stop_seconds"] < e["train_seconds"]:
        line += f"; early stopping can end it from {_fmt_seconds(e['earliest_stop_seconds'])}"
    lines = [line + f" · 💾 **peak memory ≈ {gb(e['peak_rss_mb'])}** of {gb(e['available_mb'])} available"]
    if not e["fits"]:
        lines.append(f"⚠️ **This run will not fit in memory**: it needs about {gb(e['peak_rss_mb'])}, the machine "
                     f"has {gb(e['available_mb'])} available. Lower the batch size or the max length, or use LoRA.")
    elif e["peak_rss_mb"] > 0.8 * e["available_mb"]:
        lines.append("⚠️ Memory is tight: other programs starting meanwhile could make the run fail.")
    if busy:
        lines.append("ℹ️ A run is training on this machine now: the estimate shared its cores, so it reads high.")
    lines.append(f"<small>Timed {e['timed_steps']} real steps of this run in {e['estimate_seconds']:.0f} s; "
                 "the time is the full schedule, as metrics.json counts train_seconds.</small>")
    return "\n\n".join(lines)


@user_errors
def estimate(ctx: AppContext, values: dict, owner_state=None, request: gr.Request = None):
    """Predict the training time and peak memory of the run Start would submit (finetune_core.estimate)."""
    owner = owner_of(owner_state, request)
    path = resolve_data(ctx, **form.source(values))
    cfg = form.form_to_config(values, path)
    check_before_submit(ctx, cfg, path, owner)
    yield "⏳ Estimating: building this run and timing a few of its real steps ..."
    busy = any(j.status in ("running", "stopping") for j in ctx.manager.jobs(active_only=True))
    e = run_estimate(cfg, ctx.temp_dir())
    if not e["fits"]:
        gr.Warning(f"This run needs about {e['peak_rss_mb'] / 1024:.1f} GB of memory; "
                   f"{e['available_mb'] / 1024:.1f} GB are available.")
    yield estimate_markdown(e, busy)


@user_errors
def show_command(ctx: AppContext, values: dict):
    """The run.yaml Start would submit, with a portable data path, and the command that runs it."""
    path = resolve_data(ctx, **form.source(values))
    cfg = form.form_to_config(values, path)
    try:
        portable = str(path.resolve().relative_to(REPO_ROOT))
        note = ""
    except ValueError:
        portable = path.name
        note = f" Put your data file `{path.name}` in the folder you run the command from."
    cfg.data.train = portable
    if cfg.data.validation:
        cfg.data.validation = Path(cfg.data.validation).name
        note += f" Put the validation file `{cfg.data.validation}` in the folder you run the command from."
    cfg.output_dir = f"runs/{cfg.task[:5]}-{cfg.strategy.name}"
    text = dump_config(cfg)
    out = ctx.temp_dir() / "run.yaml"
    out.write_text(text, encoding="utf-8")
    md = ("Same run from a terminal (the app runs exactly this in its worker):\n\n"
          "```bash\npython -m finetune_core train run.yaml\n```\n"
          f"Empty hyperparameters are filled with the recommended values at start.{note}")
    return gr.update(visible=True), md, text, str(out)


def task_defaults(task, model, head_only):
    """Instruction tuning needs a causal LM, and a frozen LLM has no new head to train."""
    if task in GENERATIVE_TASKS and quick_model_kind(model, task) == "encoder":
        return gr.update(value="bundled:smollm2-135m"), gr.update(value=False)
    if task == "classification" and model == "bundled:smollm2-135m":
        return gr.update(value="bundled:minilm-l6"), gr.update(value=True)
    return gr.update(), gr.update(value=False) if task in GENERATIVE_TASKS else gr.update()


# ---------------------------------------------------------------------------------------------
# UI


def build(ctx: AppContext, ui) -> None:
    v = form.DEFAULTS
    # Drawn before the device is known (torch is not imported to draw the page). The form opens on
    # classification, whose defaults are the same on CPU and GPU; the load event's context_changed
    # redraws the placeholders with the device train() will use.
    defaults = recommended_training(v, 128, cuda=False)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=360):
            gr.Markdown("### Model and strategy")
            ui.model = gr.Dropdown(model_choices(), value=v["model"], label="Base model", allow_custom_value=True,
                                   info="Bundled models work offline. Encoders (MiniLM, BERT) classify; causal "
                                        "LMs (SmolLM2, GPT-2) also learn to answer instructions. Or type any Hub id.")
            ui.model_info = gr.Markdown(model_description(v["model"]))
            ui.strategy = gr.Radio(STRATEGY_CHOICES, value=v["strategy"], label="Strategy", info=STRATEGY_INFO)
            with gr.Group(visible=v["strategy"] == "frozen") as ui.frozen_group:
                ui.head_only = gr.Checkbox(v["head_only"], label="Freeze the whole backbone (train only the new head)",
                                           info="Fastest and safest with few rows. Untick to let the top blocks learn.")
                ui.frozen_layers = gr.Slider(0, 48, value=v["frozen_layers"], step=1, label="Frozen blocks",
                                             visible=False,
                                             info="Embeddings + this many lower blocks stay frozen; the blocks "
                                                  "above learn. Lower blocks hold general language, upper ones the task.")
            with gr.Group(visible=v["strategy"] == "lora") as ui.lora_group:
                with gr.Row():
                    ui.lora_r = gr.Slider(1, 64, value=v["lora_r"], step=1, label="LoRA rank r",
                                          info="Size of each adapter: 8-16 is plenty on small data.")
                    ui.lora_alpha = gr.Slider(1, 128, value=v["lora_alpha"], step=1, label="LoRA alpha",
                                              info="Scales the adapters' effect; 2 × r is the usual choice.")
                with gr.Row():
                    ui.lora_dropout = gr.Slider(0.0, 0.5, value=v["lora_dropout"], step=0.01, label="LoRA dropout",
                                                info="Regularises the adapters; raise it if the model overfits.")
                    ui.lora_targets = gr.Textbox(v["lora_targets"], label="Target modules",
                                                 info="auto = every attention and MLP projection of this "
                                                      "architecture; or all-linear, or names like q_proj,v_proj.")
            ui.params_md = gr.Markdown("")
            ui.estimate_btn = gr.Button("Estimate time and memory", size="sm", elem_id="estimate-btn")
            ui.estimate_md = gr.Markdown(ESTIMATE_HINT, elem_id="estimate-md")
        with gr.Column(scale=1, min_width=360):
            gr.Markdown("### Hyperparameters")
            with gr.Row():
                ui.recommend_btn = gr.Button("Recommend settings", size="sm")
                ui.command_btn = gr.Button("Show command", size="sm")
            ui.recommend_md = gr.Markdown("Empty fields use the recommended value shown in grey.")
            with gr.Row():
                ui.num_train_epochs = gr.Number(v["num_train_epochs"], label="Epochs", minimum=0,
                                                placeholder=f"auto: {defaults['num_train_epochs']}",
                                                info=epochs_info())
                ui.learning_rate = gr.Number(v["learning_rate"], label="Learning rate", minimum=0,
                                             placeholder=f"auto: {defaults['learning_rate']:g}",
                                             info=learning_rate_info())
            with gr.Row():
                ui.batch_size = gr.Number(v["batch_size"], label="Batch size", minimum=1, precision=0,
                                          placeholder=f"auto: {defaults['per_device_train_batch_size']}",
                                          info="Rows per step. Lower it if memory runs out.")
                ui.early_stopping_patience = gr.Number(v["early_stopping_patience"], label="Early stopping patience",
                                                       minimum=0, precision=0,
                                                       info="Stop after this many evaluations without improvement "
                                                            "and keep the best checkpoint: it guards against "
                                                            "overfitting. 0 = off.")
            ui.val_size = gr.Slider(0.05, 0.5, value=v["val_size"], step=0.05, label="Validation share",
                                    info="Rows held out to measure the model; never trained on. Unused when the "
                                         "Data tab has a validation file.")
            ui.overrides = gr.Textbox(v["overrides"], label="Advanced overrides (optional)", lines=2,
                                      placeholder="max_steps=20\nweight_decay=0.0\nseed=1",
                                      info="One key=value per line, like the CLI's --set. Plain keys are "
                                           "TrainingArguments fields (max_steps=20 makes a quick test run).")
            with gr.Group(visible=False) as ui.command_group:
                ui.command_md = gr.Markdown("")
                ui.command_code = gr.Code(language="yaml", label="run.yaml", interactive=False)
                ui.command_file = gr.File(label="Download run.yaml", interactive=False)
    build_run_panel(ui)


def build_run_panel(ui) -> None:
    """Start / Stop / Resume, the run id, the status line, the live charts, the log and the result."""
    with gr.Row():
        ui.start_btn = gr.Button("▶ Start training", variant="primary", scale=2, elem_id="start-btn")
        ui.compare_btn = gr.Button("⚖ Compare strategies", scale=2, elem_id="compare-btn")
        ui.stop_btn = gr.Button("■ Stop", variant="stop", scale=1)
        ui.resume_btn = gr.Button("↻ Resume", scale=1, elem_id="resume-btn")
        ui.run_id = gr.Textbox("", label="Run id", interactive=True, scale=2, max_lines=1,
                               info="Your current run. Paste an id to watch another run.")
    ui.status = gr.HTML(label="status", elem_id="train-status",
                        value='<div class="ft-status">No run yet. Set things up above and press Start.</div>')
    ui.compare_slot = gr.Column()        # compare_panel.build fills it: the comparison sits under the status
    with gr.Row():
        ui.loss_plot = gr.Plot(plots.empty_figure("Train and eval loss appear here while training.", "Loss"),
                               label="Loss", show_label=False, elem_id="loss-plot")
        ui.metric_plot = gr.Plot(plots.empty_figure("Validation scores appear after each evaluation.",
                                                    "Validation metric"), label="Validation metric", show_label=False,
                                 elem_id="metric-plot")
    ui.result_msg = gr.Markdown("", label="message")
    ui.log = gr.Textbox("", label="Log", lines=10, max_lines=10, autoscroll=True, interactive=False,
                        elem_id="train-log")
    with gr.Accordion("Result (JSON)", open=False):
        ui.result = gr.JSON(label="result")
    ui.last_rec = gr.State({})


def wire(ctx: AppContext, ui) -> None:
    watch_outputs = [ui.run_id, ui.status, ui.loss_plot, ui.metric_plot, ui.log, ui.result]
    fields = form.components(ui)
    # Watchers are generators that only read files: they do not count against the queue's concurrency.
    ui.reconnect_event = reconnect_event = ui.session_load.then(
        bind(ctx, reconnect), [ui.owner_state], watch_outputs, api_visibility="private", concurrency_limit=None)
    # One stream at a time writes the watch outputs: each new one (Start, an id typed in Run id, Resume)
    # cancels the others, or two streams would take turns drawing different runs. Cancelling a stream
    # never stops a job; the worker keeps training. trigger_mode="multiple": a second Start reaches
    # train(), which says why no new run starts.
    ui.train_event = ui.start_btn.click(form.bind_form(ctx, train), fields + [ui.owner_state], watch_outputs,
                                        api_name="train", api_visibility="public", concurrency_limit=None,
                                        trigger_mode="multiple", cancels=[reconnect_event])
    ui.watch_event = watch_event = ui.run_id.submit(
        bind(ctx, watch_id), [ui.run_id, ui.owner_state], watch_outputs, api_visibility="private",
        concurrency_limit=None, cancels=[reconnect_event, ui.train_event])
    ui.stop_btn.click(bind(ctx, stop), [ui.run_id, ui.owner_state], ui.result_msg, api_name="stop",
                      api_visibility="public", concurrency_limit=None)
    ui.resume_event = resume_event = ui.resume_btn.click(
        bind(ctx, resume), [ui.run_id, ui.owner_state], watch_outputs, api_visibility="private",
        concurrency_limit=None, cancels=[reconnect_event, watch_event, ui.train_event])
    # the cancels that point forward (an event can only name events defined before it)
    ui.start_btn.click(None, None, None, cancels=[watch_event, resume_event], api_visibility="private",
                       queue=False)
    ui.run_id.submit(None, None, None, cancels=[resume_event], api_visibility="private", queue=False)

    ui.task.change(task_defaults, [ui.task, ui.model, ui.head_only], [ui.model, ui.head_only],
                   api_visibility="private")
    # Recommend, the placeholders and the parameter count read every setting but the data file itself.
    settings = form.components(ui, form.SETTINGS)
    hyperparameters = [ui.num_train_epochs, ui.learning_rate, ui.batch_size]
    ui.recommend_btn.click(form.bind_form(ctx, recommend, form.SETTINGS), settings + [ui.data_info],
                           hyperparameters + [ui.early_stopping_patience, ui.recommend_md, ui.last_rec],
                           api_visibility="private")
    placeholders = form.bind_form(ctx, context_changed, form.SETTINGS)
    counter = form.bind_form(ctx, count, form.SETTINGS)
    count_outputs = [ui.params_md, ui.frozen_layers, ui.model_info]
    for comp in (ui.task, ui.model, ui.strategy, ui.head_only, ui.data_info):
        comp.change(placeholders, settings + [ui.data_info, ui.last_rec], hyperparameters + [ui.last_rec],
                    api_visibility="private")
    for comp in (ui.task, ui.model, ui.strategy, ui.head_only, ui.data_info, ui.lora_targets):
        comp.change(counter, settings + [ui.data_info, ui.owner_state], count_outputs, api_visibility="private")
    for comp in (ui.frozen_layers, ui.lora_r, ui.lora_alpha, ui.lora_dropout):
        comp.release(counter, settings + [ui.data_info, ui.owner_state], count_outputs, api_visibility="private")
    for comp in (ui.strategy, ui.head_only):
        comp.change(show_strategy, [ui.strategy, ui.head_only], [ui.frozen_group, ui.lora_group, ui.frozen_layers],
                    api_visibility="private", queue=False)
    # One estimate at a time (it trains a few steps); any change to the form makes a shown estimate stale.
    ui.estimate_btn.click(form.bind_form(ctx, estimate), fields + [ui.owner_state], ui.estimate_md,
                          api_visibility="private", concurrency_limit=1)
    for comp in fields:
        comp.change(None, None, ui.estimate_md, js=f"() => {json.dumps(ESTIMATE_HINT)}", api_visibility="private")
    ui.command_btn.click(form.bind_form(ctx, show_command), fields,
                         [ui.command_group, ui.command_md, ui.command_code, ui.command_file],
                         api_visibility="private")
