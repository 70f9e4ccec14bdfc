"""Instruction tuning of a causal LM: prepare → datasets → evaluate → outputs (interface: tasks/__init__.py).

Rows are (prompt, response) pairs in any of the instruction formats (data.detect_columns); the loss
is taken on response tokens only. Metrics: validation loss and perplexity, general-text perplexity
(the forgetting probe), each for the tuned model and for the untouched base model, measured after
training; generations.jsonl holds the answers of both to the held-out prompts, with ROUGE-L.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import pandas as pd

from .. import data as D
from .. import evaluation, rundir
from ..audit import audit_run
from ..config import RunConfig
from ..errors import ConfigError, FinetuneError
from ..generate import generate_batch, heldout_prompts, write_generations
from ..models import load_model as load_pretrained
from ..trainer import FinetuneTrainer, release_training_state, response_only_ok
from ..training_args import resolve_training_args
from . import RunContext, as_dataset

MAIN_METRIC = "eval_loss"


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
    run.writer.emit("info", message=f"{data.dropped_rows} rows dropped: {'; '.join(why)}.")


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
    so the first loss point reaches the UI seconds after the model loads."""
    train_ds = as_dataset({"input_ids": data.train_ex.input_ids, "labels": data.train_ex.labels,
                           "length": [len(x) for x in data.train_ex.input_ids]})
    eval_ds = as_dataset({"input_ids": data.val_ex.input_ids, "labels": data.val_ex.labels})
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              data_collator=D.CausalCollator(run.tokenizer.pad_token_id),
                              processing_class=run.tokenizer, callbacks=callbacks)
    trainer.response_only = response_only_ok(model)
    return trainer


# ---------------------------------------------------------------------------------------------
# evaluate and outputs


def lm_probe(model, tokenizer, data: InstructionData, cfg: RunConfig, suffix: str) -> dict:
    """Validation loss/perplexity on response tokens, and general-English perplexity (forgetting)."""
    collator = D.CausalCollator(tokenizer.pad_token_id)
    feats = [{"input_ids": i, "labels": l} for i, l in zip(data.val_ex.input_ids, data.val_ex.labels)]
    batches = [collator(feats[i:i + 8]) for i in range(0, len(feats), 8)]
    loss, _ = evaluation.token_loss(model, batches)
    general = evaluation.perplexity(model, tokenizer, evaluation.general_text_paragraphs(),
                                    max_length=cfg.data.max_length)
    return {f"eval_loss{suffix}": loss, f"perplexity{suffix}": math.exp(loss),
            f"general_perplexity{suffix}": general}


def measure_base_model(run: RunContext, model, data: InstructionData, metrics: dict) -> list[str] | None:
    """The "before" side, measured after training on the untouched base weights: LoRA switches its
    adapters off (the base weights never changed); full and frozen runs load the base model again from
    its files (the same load as at the start, so the same weights). Adds the `_before` metrics; returns
    the base model's answers to the held-out prompts (rank 0 only, which writes them)."""
    def measure(base) -> list[str] | None:
        metrics.update(lm_probe(base, run.tokenizer, data, run.cfg, suffix="_before"))
        return generate_batch(base, run.tokenizer, heldout_prompts(data)[0], data.template) if run.main else None

    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return measure(model)
    gc.collect()
    base = load_pretrained(run.model_path, "instruction", run.model_kind).to(next(model.parameters()).device)
    try:
        return measure(base)
    finally:
        del base
        gc.collect()


def evaluate(run: RunContext, trainer, model, data: InstructionData, metrics: dict) -> list[str] | None:
    """Tuned and base model on the validation pairs and general text; returns the base model's answers."""
    release_training_state(trainer)     # Adam's state goes before a copy of the base model loads
    metrics.update(lm_probe(model, run.tokenizer, data, run.cfg, suffix=""))
    run.writer.emit("info", message="Measuring the base model for comparison: loss, general-text perplexity "
                                    "and answers to the held-out prompts ...")
    before_answers = measure_base_model(run, model, data, metrics)
    metrics.update(evaluation.forgetting_report(metrics["general_perplexity_before"], metrics["general_perplexity"]))
    metrics["val_samples"] = len(data.val_ex.input_ids)
    metrics["template"] = data.template
    return before_answers


def write_outputs(run: RunContext, model, data: InstructionData, metrics: dict,
                  before_answers: list[str] | None) -> None:
    """generations.jsonl: both models' answers to the held-out prompts; ROUGE-L means go to metrics."""
    run.writer.emit("info", message="Generating answers to held-out prompts after training ...")
    write_generations(run.out, model, run.tokenizer, data, metrics, before=before_answers)
