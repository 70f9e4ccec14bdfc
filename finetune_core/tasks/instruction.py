"""Instruction tuning of a causal LM: prepare → datasets → evaluate → outputs (interface: tasks/__init__.py).

Rows are (prompt, response) pairs in any of the instruction formats (data.detect_columns); the loss
is taken on response tokens only. Metrics: validation loss and perplexity, general-text perplexity
(the forgetting probe), each for the tuned model and for the untouched base model, measured after
training; generations.jsonl holds the answers of both to the held-out prompts, with ROUGE-L.

After training, in this order (each an `info` event with its phase, and done/total where it counts):
evaluating (the tuned model; the Trainer's last evaluation of the same weights is reused when there
is one), generating (its answers), baseline (the base model: read from the base-model cache,
basecache.py, or measured and stored there). The base side is measured on the same in-memory model:
LoRA switches its adapters off; full and frozen runs copy the base weights back into it in place
(the tuned weights are saved in model/ and measured by then), so no second model is ever loaded.
Each model's answers start from the prompts' keys and values its validation-loss pass kept
(prompt_kv.py, heldout_kv): no held-out prompt is prefilled twice.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd

from .. import data as D
from .. import evaluation, rundir
from ..audit import audit_run
from ..basecache import (BaseCache, digest, entry_key, general_text_key, read_general_perplexity,
                         write_general_perplexity)
from ..config import RunConfig
from ..errors import ConfigError, FinetuneError
from ..generate import GENERATION_BATCH, generate_batch, heldout_prompts, prompt_rows, write_generations
from ..models import load_model as load_pretrained
from ..models import load_weights_into
from ..prompt_kv import PromptKV
from ..trainer import FinetuneTrainer, release_training_state, response_only_ok
from ..training_args import resolve_training_args
from . import RunContext, as_dataset

MAIN_METRIC = "eval_loss"
PROBE_BATCH = 8                 # validation rows per batch of the loss probe (and the Trainer's evaluation)
MAX_NEW_TOKENS = 64             # answers to the held-out prompts


@dataclass
class InstructionData:
    """The split and tokenized pairs of an instruction run (label -100 on every prompt token)."""
    train_frame: pd.DataFrame       # rows as read (split from the training file when there is no validation file)
    val_frame: pd.DataFrame
    template: str                   # "chat" or "alpaca", resolved for this tokenizer
    train_ex: D.InstructionExamples
    val_ex: D.InstructionExamples   # its prompts and references are the held-out prompts of generations.jsonl
    dropped_reasons: dict[str, int]

    @property
    def n_train(self) -> int:
        return len(self.train_ex.input_ids)

    @property
    def dropped_rows(self) -> int:
        return sum(self.dropped_reasons.values())


def check_model(cfg: RunConfig, kind: str) -> None:
    if kind != "causal":
        raise ConfigError(f"The model '{cfg.model}' is an encoder; it cannot generate text for instruction tuning.",
                          "Use a causal LM such as bundled:smollm2-135m or gpt2.")


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(run: RunContext, frames: D.Frames) -> InstructionData:
    cfg, tokenizer = run.cfg, run.tokenizer
    train_df, val_df = frames.train, frames.validation
    if val_df is None:
        train_df, val_df = D.split_frame(train_df, cfg.data.val_size, cfg.seed)
    template = D.resolve_template(cfg.data.template, tokenizer)
    train_ex = D.tokenize_instruction(train_df, frames.columns, tokenizer, template, cfg.data.max_length)
    val_ex = D.tokenize_instruction(val_df, frames.columns, tokenizer, template, cfg.data.max_length)
    if not train_ex.input_ids:
        if not train_ex.dropped_too_long:
            raise FinetuneError("Every training row has an empty response, so there is nothing to learn.",
                                "Fill in the response (output/completion/assistant) column, or pick the right "
                                "column with data.output_column.")
        raise FinetuneError(f"Every training row's prompt is longer than max_length={cfg.data.max_length} tokens "
                            "(or its response is empty), so no response token is left to learn from.",
                            "Raise data.max_length or shorten the prompts.")
    if not val_ex.input_ids:
        raise FinetuneError("No validation row fits in max_length (or every validation response is empty).",
                            "Raise data.max_length, or fill in the validation responses.")
    data = InstructionData(
        train_frame=train_df, val_frame=val_df, template=template, train_ex=train_ex, val_ex=val_ex,
        dropped_reasons={"prompt_fills_max_length": train_ex.dropped_too_long + val_ex.dropped_too_long,
                         "empty_response": train_ex.dropped_empty_response + val_ex.dropped_empty_response})
    _report_dropped(run, data)
    return data


def _report_dropped(run: RunContext, data: InstructionData) -> None:
    reasons = data.dropped_reasons
    if not data.dropped_rows:
        return
    why = []
    if reasons["prompt_fills_max_length"]:
        why.append(f"{reasons['prompt_fills_max_length']} because their prompt fills "
                   f"max_length={run.cfg.data.max_length}, leaving no response token to learn")
    if reasons["empty_response"]:
        why.append(f"{reasons['empty_response']} because their response is empty")
    run.writer.info(f"{data.dropped_rows} rows dropped: {'; '.join(why)}.")


def audit(run: RunContext, frames: D.Frames, data: InstructionData) -> dict:
    return audit_run(run.cfg, run.tokenizer, frames, data.train_frame, data.val_frame, frames.columns)


def load_model(run: RunContext, data: InstructionData):
    return load_pretrained(run.model_path, "instruction", run.model_kind)


def training_arguments(run: RunContext, data: InstructionData, notes: list[str]):
    # Evaluation needs the loss only: no logits over the vocabulary are gathered for every position.
    return resolve_training_args(run.cfg, run.model_kind, data.n_train, rundir.checkpoints_dir(run.out), notes,
                                 extra={"prediction_loss_only": True})


# ---------------------------------------------------------------------------------------------
# datasets and trainer


def build_trainer(run: RunContext, model, data: InstructionData, args, callbacks, metrics: dict):
    """The Trainer with the response-only loss. The base model is measured after training (evaluate),
    so the first loss point reaches the UI seconds after the model loads. The validation rows are in
    the loss probe's order (val_features), so the Trainer's evaluation batches are the probe's."""
    train_ds = as_dataset({"input_ids": data.train_ex.input_ids, "labels": data.train_ex.labels,
                           "length": [len(x) for x in data.train_ex.input_ids]})
    feats = val_features(data)
    eval_ds = as_dataset({"input_ids": [f["input_ids"] for f in feats], "labels": [f["labels"] for f in feats]})
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              data_collator=D.CausalCollator(run.tokenizer.pad_token_id),
                              processing_class=run.tokenizer, callbacks=callbacks)
    trainer.response_only = response_only_ok(model)
    trainer.prompt_kv = heldout_kv(run, data)    # the last evaluation keeps the held-out prompts' prefill
    return trainer


# ---------------------------------------------------------------------------------------------
# evaluate and outputs


def val_features(data: InstructionData) -> list[dict]:
    """The validation rows shortest first: batches of similar lengths pad little."""
    feats = [{"input_ids": i, "labels": l} for i, l in zip(data.val_ex.input_ids, data.val_ex.labels)]
    return sorted(feats, key=lambda f: len(f["input_ids"]))


def probe_batches(tokenizer, data: InstructionData, cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """(validation batches, general-text batches) that lm_probe scores."""
    collator = D.CausalCollator(tokenizer.pad_token_id)
    feats = val_features(data)
    val = [collator(feats[i:i + PROBE_BATCH]) for i in range(0, len(feats), PROBE_BATCH)]
    text = evaluation.general_text_batches(tokenizer, cfg.data.max_length)
    return val, text


def lm_probe(model, tokenizer, data: InstructionData, cfg: RunConfig, suffix: str, progress=None,
             val_loss: float | None = None, capture: PromptKV | None = None, general: float | None = None) -> dict:
    """Validation loss/perplexity on response tokens, and general-English perplexity (forgetting).
    val_loss: the validation loss when it is already known (the Trainer's last evaluation of these
    weights): only general text is scored. general: the general-text perplexity when it is already known
    (the base-model cache): only the validation rows are scored. progress(done, total) counts batches.
    capture: keeps the held-out prompts' prefill from the validation pass (heldout_kv)."""
    val, text = probe_batches(tokenizer, data, cfg)
    if val_loss is not None:
        val = []
    if general is not None:
        text = []
    total = len(val) + len(text)
    step = (lambda offset: (lambda done, _n: progress(offset + done, total))) if progress else (lambda offset: None)
    if val:
        val_loss, _ = evaluation.token_loss(model, val, progress=step(0), capture=capture)
    if text:
        general = evaluation.batches_perplexity(model, text, progress=step(len(val)))
    return {f"eval_loss{suffix}": val_loss, f"perplexity{suffix}": math.exp(val_loss),
            f"general_perplexity{suffix}": general}


def heldout_kv(run: RunContext, data: InstructionData) -> PromptKV | None:
    """An empty PromptKV for the held-out prompts (rank 0 answers them; None elsewhere): a validation-loss
    pass fills it, and the answers of the same weights start from it (prompt_kv.py)."""
    if not run.main:
        return None
    return PromptKV(prompt_rows(run.tokenizer, heldout_prompts(data)[0], data.template))


@dataclass
class Answers:
    """The held-out prompts, their references, and the tuned (after) and base (before) models' answers
    (rank 0 only; None elsewhere)."""
    prompts: list[str]
    references: list[str]
    after: list[str] | None
    before: list[str] | None


def _progress(run: RunContext, phase: str, what: str, unit: str):
    def report(done: int, total: int) -> None:
        run.writer.phase(phase, f"{what}: {done}/{total} {unit}", done=done, total=total, unit=unit)
    return report


def base_cache_key(run: RunContext, data: InstructionData) -> str | None:
    """The base-model cache key of this run's "before" side: base weights (basecache.entry_key), the
    probe's exact batches, the held-out prompts and the generation settings."""
    cfg, tok = run.cfg, run.tokenizer
    val, text = probe_batches(tok, data, cfg)
    prompts, _ = heldout_prompts(data)
    parts = {"val_batches": digest([b["input_ids"].tolist() + b["labels"].tolist() for b in val]),
             "text_batches": digest([b["input_ids"].tolist() for b in text]),
             "prompts": digest(prompts), "template": data.template, "max_length": cfg.data.max_length,
             "generation": {"greedy": True, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": GENERATION_BATCH,
                            "prefill": "per row or from the loss pass", "cache": "static",
                            "pad": tok.pad_token_id}}
    return entry_key(run.model_path, parts)


@contextmanager
def adapter_merged(model):
    """A LoRA model with its adapter folded into the base weights, unfolded on exit: generating, the
    adapter's extra matrix products at every layer and token cost more than the fold (held-out answers
    for SmolLM2 LoRA: 17 s unmerged, as fast as the full run's 14 s merged). Other models as they are.
    The tuned model is saved before this runs; unfolding leaves float rounding (~1e-7) in the base."""
    if not hasattr(model, "merge_adapter"):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


@contextmanager
def base_weights(run: RunContext, model):
    """The base model, from the in-memory `model` wherever possible: LoRA with its adapters off; full and
    frozen runs get the base weights copied into `model` in place (it holds the base model from then on:
    call this once the tuned model is saved and measured). Else a second copy loads from the files."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
        return
    gc.collect()
    if load_weights_into(model, run.model_path):
        yield model
        return
    base = load_pretrained(run.model_path, "instruction", run.model_kind).to(next(model.parameters()).device)
    try:
        yield base
    finally:
        del base
        gc.collect()


def measure_base_model(run: RunContext, model, data: InstructionData, metrics: dict) -> list[str] | None:
    """The "before" side on the untouched base weights: read from the base-model cache, else measured
    (base_weights) and stored there; its general-text perplexity alone is read from its own entry when an
    earlier run on other data measured it (basecache.general_text_key). Adds the `_before` metrics and
    `base_cache` (hit | partial: only the general-text perplexity was cached | miss | off); returns the
    base model's answers to the held-out prompts (rank 0 only, which writes them)."""
    cache = BaseCache(run.writer)
    key = base_cache_key(run, data)
    entry = cache.read(key)
    if entry is not None:
        metrics.update(entry["metrics"])
        metrics["base_cache"] = "hit"
        run.writer.phase("baseline", "Base model: loss, general-text perplexity and answers read from the cache "
                                     "(same base model, validation rows and settings as an earlier run).", cached=True)
        return entry["answers"] if run.main else None
    general_key = general_text_key(run.model_path, evaluation.general_text_batches(run.tokenizer,
                                                                                  run.cfg.data.max_length))
    general = read_general_perplexity(cache, general_key)
    what = ("loss and answers to the held-out prompts (its general-text perplexity is in the cache) ..."
            if general is not None else "loss, general-text perplexity and answers to the held-out prompts ...")
    run.writer.phase("baseline", f"Measuring the base model for comparison: {what}", done=0)
    kv = heldout_kv(run, data)
    with base_weights(run, model) as base:
        before = lm_probe(base, run.tokenizer, data, run.cfg, suffix="_before",
                          progress=_progress(run, "baseline", "Base model: loss", "batches"), capture=kv,
                          general=general)
        answers = None
        if run.main:
            answers = generate_batch(base, run.tokenizer, heldout_prompts(data)[0], data.template, MAX_NEW_TOKENS,
                                     progress=_progress(run, "baseline", "Base model: answers", "prompts"), known=kv)
    del kv
    metrics.update(before)
    stored = run.main and answers is not None and cache.write(key, {"model": run.cfg.model, "metrics": before,
                                                                     "answers": answers})
    if stored and general is None:
        write_general_perplexity(cache, general_key, run.cfg.model, before["general_perplexity_before"])
    metrics["base_cache"] = ("partial" if general is not None else "miss") if stored else "off"
    return answers


def evaluate(run: RunContext, trainer, model, data: InstructionData, metrics: dict) -> Answers:
    """The tuned model on the validation pairs and general text, its answers to the held-out prompts, then
    the base model (measure_base_model). Returns both models' answers for write_outputs."""
    release_training_state(trainer)     # Adam's state goes before anything else is computed
    run.writer.phase("evaluating", "Evaluating the tuned model: validation loss and general-text perplexity ...",
                     done=0)
    known = trainer.eval_loss_of_weights() if hasattr(trainer, "eval_loss_of_weights") else None
    # The Trainer's last evaluation kept the held-out prompts' prefill when it measured these weights;
    # else the validation pass below (when it runs) keeps it.
    kv = getattr(trainer, "prompt_kv", None)
    trainer.prompt_kv = None
    if known is None or kv is None or kv.step != trainer.weights_step():
        kv = heldout_kv(run, data)
    metrics.update(lm_probe(model, run.tokenizer, data, run.cfg, suffix="", val_loss=known,
                            progress=_progress(run, "evaluating", "Tuned model", "batches"), capture=kv))
    prompts, refs = heldout_prompts(data)
    after = None
    if run.main:
        run.writer.phase("generating", "Generating answers to held-out prompts after training ...", done=0,
                         total=len(prompts), unit="prompts")
        with adapter_merged(model):
            after = generate_batch(model, run.tokenizer, prompts, data.template, MAX_NEW_TOKENS,
                                   progress=_progress(run, "generating", "Answers", "prompts"), known=kv)
    del kv             # the tuned model's prefill (~110 MB for SmolLM2) goes before the base model's comes
    before = measure_base_model(run, model, data, metrics)
    metrics.update(evaluation.forgetting_report(metrics["general_perplexity_before"], metrics["general_perplexity"]))
    metrics["val_samples"] = len(data.val_ex.input_ids)
    metrics["template"] = data.template
    return Answers(prompts=prompts, references=refs, after=after, before=before)


def write_outputs(run: RunContext, model, data: InstructionData, metrics: dict, answers: Answers) -> None:
    """generations.jsonl: both models' answers to the held-out prompts; ROUGE-L means go to metrics."""
    write_generations(run.out, answers.prompts, answers.references, answers.after, metrics, before=answers.before)
