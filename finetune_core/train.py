"""train(config) -> metrics: wires data, model, strategy and Trainer, then writes every run output.

    python -m finetune_core train examples/configs/classification_lora.yaml
    accelerate launch -m finetune_core train CONFIG.yaml      # same code, several processes
    torchrun --standalone --nproc_per_node 2 -m finetune_core train CONFIG.yaml

Outputs in `output_dir/` (DESIGN.md): run.yaml, events.jsonl, audit.json, metrics.json, model/,
predictions.csv (classification), generations.jsonl (instruction). Rank 0 alone writes them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import data as D
from . import limits, rundir
from .config import RunConfig, config_from_dict, dump_config, load_config, uses_mean_pooling_head
from .errors import ConfigError, FinetuneError
from .events import EventWriter, is_main_process
from .models import load_model, load_tokenizer, model_kind, resolve_model
from .checkpoints import drop_incomplete_checkpoints, resume_checkpoint, save_model
from .predictions import write_predictions
from .runtime import peak_rss_mb, process_start_time, resource_error, set_cpu_threads
from .strategies import apply_strategy, can_cache_features, trainable_summary
from .trainer import EventsCallback, FinetuneTrainer, response_only_ok
from .training_args import cap_steps, resolve_training_args

def _coerce_config(config) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


# ---------------------------------------------------------------------------------------------
# data


def _load_frames(cfg: RunConfig, max_bytes: int | None = None):
    if not cfg.data.train:
        raise ConfigError("No training data given (data.train is empty).",
                          "Set data.train to a CSV, TSV, JSON, JSONL or Parquet file.")
    train_df = D.read_table(cfg.data.train, max_bytes=max_bytes)
    cols = D.detect_columns(train_df, cfg.task, cfg.data, name=Path(cfg.data.train).name)
    D.store_columns(cfg.data, cols)
    val_df = None
    if cfg.data.validation:
        val_df = D.read_table(cfg.data.validation, max_bytes=max_bytes)
        D.detect_columns(val_df, cfg.task, cfg.data, name=Path(cfg.data.validation).name)
    return train_df, val_df, cols


class _Prepared:
    """Everything the Trainer needs, plus what evaluation reports on."""


def prepare_classification(cfg: RunConfig, tokenizer, train_df, val_df, cols) -> _Prepared:
    p = _Prepared()
    train_clean = D.clean_classification(train_df, cols["text"], cols["label"], Path(cfg.data.train).name)
    if val_df is not None:
        val_clean = D.clean_classification(val_df, cols["text"], cols["label"], Path(cfg.data.validation).name)
    else:
        train_clean, val_clean = D.split_frame(train_clean, cfg.data.val_size, cfg.seed, stratify="label")
    p.train_frame, p.val_frame = train_clean, val_clean     # what is audited for train/validation overlap
    names = D.label_names_for(train_clean["label"])
    unseen = sorted(set(val_clean["label"]) - set(names))
    if unseen:
        raise FinetuneError(f"The validation data has labels the training data never shows: {', '.join(unseen)}.",
                            "Add training examples for them, or remove those validation rows.")
    label2id = {n: i for i, n in enumerate(names)}
    p.label_names = names
    p.id2label = {i: n for i, n in enumerate(names)}
    p.train_texts = train_clean["text"].tolist()
    p.val_texts = val_clean["text"].tolist()
    p.train_labels = [label2id[v] for v in train_clean["label"]]
    p.val_labels = [label2id[v] for v in val_clean["label"]]
    p.dropped_rows = len(train_df) - len(train_clean) if val_df is not None else \
        len(train_df) - len(train_clean) - len(val_clean)
    p.dropped_reasons = {"missing_label_or_empty_text": int(p.dropped_rows)}
    p.train_tok = D.tokenize_classification(p.train_texts, p.train_labels, tokenizer, cfg.data.max_length)
    p.val_tok = D.tokenize_classification(p.val_texts, p.val_labels, tokenizer, cfg.data.max_length)
    return p


def prepare_instruction(cfg: RunConfig, tokenizer, train_df, val_df, cols) -> _Prepared:
    p = _Prepared()
    if val_df is None:
        train_df, val_df = D.split_frame(train_df, cfg.data.val_size, cfg.seed)
    p.template = D.resolve_template(cfg.data.template, tokenizer)
    p.train_ex = D.tokenize_instruction(train_df, cols, tokenizer, p.template, cfg.data.max_length)
    p.val_ex = D.tokenize_instruction(val_df, cols, tokenizer, p.template, cfg.data.max_length)
    if not p.train_ex.input_ids:
        if not p.train_ex.dropped_too_long:
            raise FinetuneError("Every training row has an empty response, so there is nothing to learn.",
                                "Fill in the response (output/completion/assistant) column, or pick the right "
                                "column with data.output_column.")
        raise FinetuneError(f"Every training row's prompt is longer than max_length={cfg.data.max_length} tokens "
                            "(or its response is empty), so no response token is left to learn from.",
                            "Raise data.max_length or shorten the prompts.")
    if not p.val_ex.input_ids:
        raise FinetuneError("No validation row fits in max_length (or every validation response is empty).",
                            "Raise data.max_length, or fill in the validation responses.")
    p.dropped_reasons = {"prompt_fills_max_length": p.train_ex.dropped_too_long + p.val_ex.dropped_too_long,
                         "empty_response": p.train_ex.dropped_empty_response + p.val_ex.dropped_empty_response}
    p.dropped_rows = sum(p.dropped_reasons.values())
    p.val_rows = val_df.reset_index(drop=True)
    p.train_frame, p.val_frame = train_df, val_df
    return p


def _as_dataset(columns: dict):
    from datasets import Dataset

    return Dataset.from_dict(columns)


# ---------------------------------------------------------------------------------------------
# model + trainer


def _build_classifier(cfg: RunConfig, path: str, kind: str, p: _Prepared, tokenizer):
    if uses_mean_pooling_head(cfg.task, cfg.strategy.name, cfg.strategy.frozen_layers, kind):
        from .heads import MeanPoolingForSequenceClassification

        return MeanPoolingForSequenceClassification.from_encoder(path, len(p.label_names), p.id2label)
    return load_model(path, "classification", kind, num_labels=len(p.label_names), id2label=p.id2label,
                      pad_token_id=tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# outputs


def model_card(cfg: RunConfig, metrics: dict) -> str:
    from .cards import render_model_card

    return render_model_card(cfg, metrics)


# ---------------------------------------------------------------------------------------------
# the run


def train(config, *, stop_file: str | Path | None = None, echo=None, max_bytes: int | None = None) -> dict:
    """Run one fine-tuning job end to end and return metrics (also written to metrics.json).

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
            writer.emit("error", message=message)
        except OSError:      # the disk may be full: the exception still reaches the caller
            pass

    try:
        return _train(cfg, out, writer, stop_path, main, max_bytes)
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


def _train(cfg: RunConfig, out: Path, writer: EventWriter, stop_path: Path, main: bool, max_bytes) -> dict:
    import torch
    from transformers import EarlyStoppingCallback, set_seed

    t_start = time.time()
    set_seed(cfg.seed)
    threads = set_cpu_threads()
    # Data first: a bad file is reported in a second, not after a model load.
    train_df, val_df, cols = _load_frames(cfg, max_bytes)
    writer.emit("info", message=f"Loading model {cfg.model} ...")
    path = resolve_model(cfg.model)
    kind = model_kind(path)
    if cfg.task == "instruction" and kind != "causal":
        raise ConfigError(f"The model '{cfg.model}' is an encoder; it cannot generate text for instruction tuning.",
                          "Use a causal LM such as bundled:smollm2-135m or gpt2.")
    tokenizer = load_tokenizer(path, kind)

    if main:
        dump_config(cfg, rundir.config_path(out))
    if cfg.task == "classification":
        p = prepare_classification(cfg, tokenizer, train_df, val_df, cols)
    else:
        p = prepare_instruction(cfg, tokenizer, train_df, val_df, cols)
    if main:
        report = _audit_run(cfg, tokenizer, train_df, val_df, cols, p)
        rundir.write_json(rundir.audit_path(out), report)
        for w in report.get("warnings", []):
            writer.emit("info", message=f"Audit: {w}")

    if cfg.task == "classification":
        model = _build_classifier(cfg, path, kind, p, tokenizer)
        n_train = len(p.train_texts)
    else:
        model = load_model(path, "instruction", kind)
        n_train = len(p.train_ex.input_ids)
        if p.dropped_rows:
            why = []
            if p.dropped_reasons["prompt_fills_max_length"]:
                why.append(f"{p.dropped_reasons['prompt_fills_max_length']} because their prompt fills "
                           f"max_length={cfg.data.max_length}, leaving no response token to learn")
            if p.dropped_reasons["empty_response"]:
                why.append(f"{p.dropped_reasons['empty_response']} because their response is empty")
            writer.emit("info", message=f"{p.dropped_rows} rows dropped: {'; '.join(why)}.")
    model = apply_strategy(model, cfg.strategy, cfg.task)
    summary = trainable_summary(model)
    print(summary["line"], flush=True)
    writer.emit("info", message=summary["line"], trainable_params=summary["trainable_params"],
                total_params=summary["total_params"])

    checkpoints = rundir.checkpoints_dir(out)
    notes: list[str] = []
    args, patience = resolve_training_args(cfg, kind, n_train, checkpoints, notes)
    for note in notes:
        writer.emit("info", message=note)
    if not args.push_to_hub:
        args.hub_token = None        # unused without push_to_hub; never pickled into checkpoints/training_args.bin
    callbacks = [EventsCallback(writer, stop_file=stop_path)]
    capped = cap_steps(args, n_train)
    if capped:
        writer.emit("info", message=capped)
    minutes_cap = limits.max_minutes()
    time_limit = None
    if minutes_cap:
        time_limit = limits.time_limit_callback(t_start + 60 * minutes_cap, writer, minutes_cap)
        callbacks.append(time_limit)
    if patience and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(patience)))
    events_cb = callbacks[0]
    Trainer = FinetuneTrainer

    metrics: dict = {"task": cfg.task, "strategy": cfg.strategy.name, "model": cfg.model,
                     "model_kind": kind, "trainable_params": summary["trainable_params"],
                     "total_params": summary["total_params"], "torch_threads": threads,
                     "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                     "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "dropped_rows": int(p.dropped_rows),
                     "dropped_rows_reasons": p.dropped_reasons,
                     "hugepage_heap": "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")}

    if cfg.task == "classification":
        from .evaluation import compute_metrics_fn

        use_cache = _want_cache(cfg, model)
        metrics["cache_features"] = use_cache
        if use_cache:
            writer.emit("info", message="Caching features: the frozen encoder runs once over the data.")
            t_feat = time.time()
            train_ds, eval_ds, train_model = _cached_datasets(model, p, tokenizer, args)
            metrics["feature_seconds"] = time.time() - t_feat   # counted in train_seconds below
            collator = None
        else:
            from transformers import DataCollatorWithPadding

            train_ds, eval_ds, train_model = _as_dataset(p.train_tok), _as_dataset(p.val_tok), model
            collator = DataCollatorWithPadding(tokenizer)
        trainer = Trainer(model=train_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=collator, processing_class=tokenizer if not use_cache else None,
                          compute_metrics=compute_metrics_fn, callbacks=callbacks)
        before = _classification_eval(trainer, eval_ds, p)
        metrics["before_finetuning"] = {k: before[k] for k in ("accuracy", "f1_weighted", "f1_macro")}
    else:
        collator = D.CausalCollator(tokenizer.pad_token_id)
        train_ds = _as_dataset({"input_ids": p.train_ex.input_ids, "labels": p.train_ex.labels,
                                "length": [len(x) for x in p.train_ex.input_ids]})
        eval_ds = _as_dataset({"input_ids": p.val_ex.input_ids, "labels": p.val_ex.labels})
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=collator, processing_class=tokenizer, callbacks=callbacks)
        trainer.response_only = response_only_ok(model)
        # The base model's loss, perplexities and answers are measured after training (see
        # _measure_base_model), so the first loss point reaches the UI seconds after the model loads.

    resume = None
    if cfg.resume:
        if main:
            # Before the Trainer sees them: its save_total_limit rotation counts a half-written
            # checkpoint-N as the newest one, keeps it and deletes good ones instead.
            drop_incomplete_checkpoints(checkpoints)
        resume = resume_checkpoint(checkpoints)
        if resume is None:
            writer.emit("info", message="resume: true but no checkpoint was found; starting from the beginning.")
    # A Stop pressed while the model loaded (a STOP newer than this process) ends training at the
    # first step: the run ends as stopped with a saved, evaluable model like any other stop.
    t0 = time.time()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:
        friendly = resource_error(exc)
        if friendly is None:
            raise
        if main:
            drop_incomplete_checkpoints(checkpoints)   # a checkpoint cut off by the failure is no "latest"
        raise friendly from exc
    # Feature caching is part of training's cost: count it, so cached and uncached runs compare fairly.
    train_seconds = time.time() - t0 + metrics.get("feature_seconds", 0.0)
    state = trainer.state
    timed_out = bool(time_limit is not None and time_limit.triggered)
    early = any(isinstance(c, EarlyStoppingCallback) for c in callbacks) and \
        state.global_step < state.max_steps and not events_cb.stopped_by_user
    metrics.update({"train_seconds": train_seconds, "train_samples": n_train,
                    "train_loss": float(train_result.training_loss), "global_step": state.global_step,
                    "max_steps": state.max_steps, "epochs_completed": float(state.epoch or 0),
                    "stopped_early": bool(early or events_cb.stopped_by_user or timed_out),
                    "stopped_by_user": events_cb.stopped_by_user, "stopped_by_time_limit": timed_out,
                    "best_checkpoint": state.best_model_checkpoint})
    if cfg.task == "instruction":
        trainer.release_training_state()     # Adam's state goes before the model is saved and a base copy loads
    if main:
        # The model is saved first, the minutes of evaluation after: a run stopped (and, past every
        # timeout, killed) while it evaluates keeps its model. The card gets the final metrics below.
        save_model(cfg, model, tokenizer, out, model_card(cfg, metrics))

    if cfg.task == "classification":
        final = _classification_eval(trainer, eval_ds, p)
        metrics.update({k: final[k] for k in ("accuracy", "f1_weighted", "f1_macro", "labels", "per_class",
                                              "confusion_matrix")})
        from .evaluation import baselines, error_analysis

        metrics["baselines"] = baselines(p.train_texts, p.train_labels, p.val_texts, p.val_labels)
        metrics["error_analysis"] = error_analysis(p.val_texts, p.val_labels, final["pred"], final["probs"],
                                                   p.label_names)
        metrics["val_samples"] = len(p.val_texts)
        if main:
            write_predictions(rundir.predictions_path(out), p.val_texts, p.val_labels, final["pred"], final["probs"],
                              p.label_names)
    else:
        metrics.update(_lm_probe(model, tokenizer, p, collator, cfg, suffix=""))
        writer.emit("info", message="Measuring the base model for comparison: loss, general-text perplexity "
                                    "and answers to the held-out prompts ...")
        before_generations = _measure_base_model(model, path, kind, tokenizer, p, collator, cfg, metrics, main)
        from .evaluation import forgetting_report

        metrics.update(forgetting_report(metrics["general_perplexity_before"], metrics["general_perplexity"]))
        metrics["val_samples"] = len(p.val_ex.input_ids)
        metrics["template"] = p.template
    metrics["peak_rss_mb"] = peak_rss_mb()
    metrics["total_seconds"] = time.time() - t_start

    if main:
        rundir.atomic_write_text(rundir.model_dir(out) / "README.md", model_card(cfg, metrics))
        rundir.write_json(rundir.metrics_path(out), metrics)
        if cfg.task == "instruction":
            from .generate import write_generations

            writer.emit("info", message="Generating answers to held-out prompts after training ...")
            write_generations(out, model, tokenizer, p, metrics, before=before_generations)
            rundir.write_json(rundir.metrics_path(out), metrics)
        if not events_cb.stopped_by_user:
            # A finished run needs no optimizer state (~3x the model's size); a stopped one keeps it to resume.
            shutil.rmtree(checkpoints, ignore_errors=True)
    main_metric = metrics.get("f1_weighted", metrics.get("eval_loss"))
    writer.emit("end", step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
                message=f"Done in {train_seconds:.1f}s", train_seconds=train_seconds, main_metric=main_metric,
                stopped_early=metrics["stopped_early"], stopped_by_user=events_cb.stopped_by_user)
    return metrics


def _audit_run(cfg: RunConfig, tokenizer, train_df, val_df, cols, p: _Prepared) -> dict:
    """audit.json: the training file's checklist, and the overlap of the validation data actually used.

    With a validation file that is the file itself. When validation is split from the training file,
    the file is audited whole and the overlap is measured between the two parts of the split (the same
    text on both sides: duplicates in the file that leak into validation)."""
    from .audit import audit_dataframe

    report = audit_dataframe(train_df, cfg.task, cols, tokenizer=tokenizer, max_length=cfg.data.max_length,
                             val_df=val_df, template=cfg.data.template)
    if val_df is not None:
        report["validation_source"] = "file"
        return report
    split_cols = {"text": "text", "label": "label"} if cfg.task == "classification" else cols
    split = audit_dataframe(p.train_frame, cfg.task, split_cols, tokenizer=None, max_length=cfg.data.max_length,
                            val_df=p.val_frame, template=cfg.data.template)
    report["validation_source"] = f"split from the training file (val_size={cfg.data.val_size})"
    for key in ("validation_rows", "overlap_with_validation", "validation_unseen_labels"):
        if key in split:
            report[key] = split[key]
    for w in split["warnings"]:
        if "appear in both the training and the validation data" in w:
            report["warnings"].append(w.replace("Remove them from one of the two files.",
                                                "Validation is split from the training file: remove the "
                                                "duplicate rows from it."))
    report["ok"] = not report["warnings"]
    return report


def _want_cache(cfg: RunConfig, model) -> bool:
    ok, why = can_cache_features(model, cfg.strategy, cfg.task)
    if cfg.strategy.cache_features is True and not ok:
        raise ConfigError(f"strategy.cache_features is true but cannot be used: {why}.",
                          "Set cache_features: auto (it turns on when valid).")
    return ok if cfg.strategy.cache_features in ("auto", True) else False


def _cached_datasets(model, p: _Prepared, tokenizer, args):
    """Run the frozen encoder once (eval mode, no grad) and train the head on its outputs.

    The encoder runs on the training device (the GPU when there is one; the Trainer has not moved the
    model yet). Each row keeps its token count as `length`, so `group_by_length` batches the same rows
    together as the uncached path would: caching is the only difference between the two.
    """
    import torch
    from transformers import DataCollatorWithPadding

    from .heads import CachedFeatureHead

    collate = DataCollatorWithPadding(tokenizer)
    device = args.device
    model.to(device)
    model.eval()

    def features(tok: dict) -> torch.Tensor:
        n = len(tok["input_ids"])
        order = sorted(range(n), key=lambda i: len(tok["input_ids"][i]))   # similar lengths: less padding
        out = torch.empty(n, model.config.hidden_size)
        with torch.no_grad():
            for start in range(0, n, 64):
                idx = order[start:start + 64]
                batch = collate([{k: tok[k][i] for k in tok if k != "labels"} for i in idx])
                batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                out[idx] = model.features(**batch).float().cpu()
        return out

    def dataset(tok: dict, labels) -> "object":
        feats = features(tok)
        return _as_dataset({"features": feats.numpy(), "labels": labels,
                            "length": [len(x) for x in tok["input_ids"]]}).with_format("torch")

    return dataset(p.train_tok, p.train_labels), dataset(p.val_tok, p.val_labels), CachedFeatureHead(model)


def _classification_eval(trainer, eval_ds, p: _Prepared) -> dict:
    from .evaluation import classification_metrics, softmax

    out = trainer.predict(eval_ds, metric_key_prefix="eval")
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    probs = softmax(np.asarray(logits, dtype=np.float64))
    pred = probs.argmax(-1).tolist()
    m = classification_metrics(p.val_labels, pred, p.label_names)
    m.update(pred=pred, probs=probs)
    return m


def _measure_base_model(model, path: str, kind: str, tokenizer, p: _Prepared, collator, cfg: RunConfig,
                        metrics: dict, main: bool) -> list[str] | None:
    """The "before" side of an instruction run, measured after training on the untouched base weights:
    LoRA switches its adapters off (the base weights never changed); full and frozen runs load the base
    model again from its files (the same load as at the start, so the same weights). Adds the `_before`
    metrics; returns the base model's answers to the held-out prompts (rank 0 only, which writes them)."""
    import gc

    from .generate import generate_batch, heldout_prompts

    def measure(base) -> list[str] | None:
        metrics.update(_lm_probe(base, tokenizer, p, collator, cfg, suffix="_before"))
        return generate_batch(base, tokenizer, heldout_prompts(p)[0], p.template) if main else None

    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return measure(model)
    gc.collect()
    base = load_model(path, "instruction", kind).to(next(model.parameters()).device)
    try:
        return measure(base)
    finally:
        del base
        gc.collect()


def _lm_probe(model, tokenizer, p: _Prepared, collator, cfg: RunConfig, suffix: str) -> dict:
    """Validation loss/perplexity on response tokens, and general-English perplexity (forgetting)."""
    import math

    from .evaluation import general_text_paragraphs, perplexity, token_loss

    feats = [{"input_ids": i, "labels": l} for i, l in zip(p.val_ex.input_ids, p.val_ex.labels)]
    batches = [collator(feats[i:i + 8]) for i in range(0, len(feats), 8)]
    loss, _ = token_loss(model, batches)
    general = perplexity(model, tokenizer, general_text_paragraphs(), max_length=cfg.data.max_length)
    return {f"eval_loss{suffix}": loss, f"perplexity{suffix}": math.exp(loss),
            f"general_perplexity{suffix}": general}
