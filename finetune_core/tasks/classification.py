"""Text classification: prepare → datasets → evaluate → outputs (the interface: tasks/__init__.py).

Rows are (text, label); labels become ids in sorted order. Metrics: accuracy, weighted and macro F1,
per class and the confusion matrix, before and after training, beside two baselines on the same
split; predictions.csv holds every validation row. A frozen head-only run on an encoder can train
its head on features computed once (strategy.cache_features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding

from .. import data as D
from .. import evaluation, rundir
from ..audit import audit_run
from ..config import RunConfig, uses_mean_pooling_head
from ..errors import ConfigError, FinetuneError
from ..heads import CachedFeatureHead, MeanPoolingForSequenceClassification
from ..models import load_model as load_pretrained
from ..predictions import write_predictions
from ..strategies import can_cache_features
from ..trainer import FinetuneTrainer
from ..training_args import resolve_training_args
from . import RunContext, as_dataset

MAIN_METRIC = "f1_weighted"


@dataclass
class ClassificationData:
    """The cleaned, split and tokenized rows of a classification run."""
    train_frame: pd.DataFrame       # cleaned rows (text, label) trained on: audited for overlap
    val_frame: pd.DataFrame
    label_names: list[str]          # label id i is label_names[i]
    train_texts: list[str]
    train_labels: list[int]
    val_texts: list[str]
    val_labels: list[int]
    train_tok: dict                 # the tokenizer's columns plus labels
    val_tok: dict
    dropped_reasons: dict[str, int]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def n_train(self) -> int:
        return len(self.train_texts)

    @property
    def dropped_rows(self) -> int:
        return sum(self.dropped_reasons.values())


def check_model(cfg: RunConfig, kind: str) -> None:
    """Encoders and causal LMs both classify (a causal LM through its last token's score head)."""


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(run: RunContext, frames: D.Frames) -> ClassificationData:
    cfg = run.cfg
    train_clean = D.clean_classification(frames.train, frames.columns["text"], frames.columns["label"],
                                         Path(cfg.data.train).name)
    if frames.validation is not None:
        val_clean = D.clean_classification(frames.validation, frames.columns["text"], frames.columns["label"],
                                           Path(cfg.data.validation).name)
        dropped = len(frames.train) - len(train_clean)
    else:
        train_clean, val_clean = D.split_frame(train_clean, cfg.data.val_size, cfg.seed, stratify="label")
        dropped = len(frames.train) - len(train_clean) - len(val_clean)
    names = D.label_names_for(train_clean["label"])
    unseen = sorted(set(val_clean["label"]) - set(names))
    if unseen:
        raise FinetuneError(f"The validation data has labels the training data never shows: {', '.join(unseen)}.",
                            "Add training examples for them, or remove those validation rows.")
    label2id = {n: i for i, n in enumerate(names)}
    train_texts, val_texts = train_clean["text"].tolist(), val_clean["text"].tolist()
    train_labels = [label2id[v] for v in train_clean["label"]]
    val_labels = [label2id[v] for v in val_clean["label"]]
    return ClassificationData(
        train_frame=train_clean, val_frame=val_clean, label_names=names,
        train_texts=train_texts, train_labels=train_labels, val_texts=val_texts, val_labels=val_labels,
        train_tok=D.tokenize_classification(train_texts, train_labels, run.tokenizer, cfg.data.max_length),
        val_tok=D.tokenize_classification(val_texts, val_labels, run.tokenizer, cfg.data.max_length),
        dropped_reasons={"missing_label_or_empty_text": int(dropped)})


def audit(run: RunContext, frames: D.Frames, data: ClassificationData) -> dict:
    return audit_run(run.cfg, run.tokenizer, frames, data.train_frame, data.val_frame,
                     {"text": "text", "label": "label"})


def load_model(run: RunContext, data: ClassificationData):
    """The base model with a new head of len(label_names) outputs (the mean-pooling one where it applies)."""
    cfg, n = run.cfg, len(data.label_names)
    if uses_mean_pooling_head(cfg.task, cfg.strategy.name, cfg.strategy.frozen_layers, run.model_kind):
        return MeanPoolingForSequenceClassification.from_encoder(run.model_path, n, data.id2label)
    return load_pretrained(run.model_path, "classification", run.model_kind, num_labels=n, id2label=data.id2label,
                           pad_token_id=run.tokenizer.pad_token_id)


def training_arguments(run: RunContext, data: ClassificationData, notes: list[str]):
    return resolve_training_args(run.cfg, run.model_kind, data.n_train, rundir.checkpoints_dir(run.out), notes)


# ---------------------------------------------------------------------------------------------
# datasets and trainer


def want_cache(cfg: RunConfig, model) -> bool:
    ok, why = can_cache_features(model, cfg.strategy, cfg.task)
    if cfg.strategy.cache_features is True and not ok:
        raise ConfigError(f"strategy.cache_features is true but cannot be used: {why}.",
                          "Set cache_features: auto (it turns on when valid).")
    return ok if cfg.strategy.cache_features in ("auto", True) else False


def cached_datasets(model, data: ClassificationData, tokenizer, args):
    """Run the frozen encoder once (eval mode, no grad) and train the head on its outputs.

    The encoder runs on the training device (the GPU when there is one; the Trainer has not moved the
    model yet). Each row keeps its token count as `length`, so `group_by_length` batches the same rows
    together as the uncached path would: caching is the only difference between the two.
    """
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

    def dataset(tok: dict, labels):
        return as_dataset({"features": features(tok).numpy(), "labels": labels,
                           "length": [len(x) for x in tok["input_ids"]]}).with_format("torch")

    return dataset(data.train_tok, data.train_labels), dataset(data.val_tok, data.val_labels), CachedFeatureHead(model)


def build_trainer(run: RunContext, model, data: ClassificationData, args, callbacks, metrics: dict):
    """The Trainer on token ids (or on cached features), and the model's scores before training."""
    use_cache = want_cache(run.cfg, model)
    metrics["cache_features"] = use_cache
    if use_cache:
        run.writer.info("Caching features: the frozen encoder runs once over the data.")
        t_feat = time.time()
        train_ds, eval_ds, train_model = cached_datasets(model, data, run.tokenizer, args)
        metrics["feature_seconds"] = time.time() - t_feat   # train() counts it in train_seconds
        collator = None
    else:
        train_ds, eval_ds, train_model = as_dataset(data.train_tok), as_dataset(data.val_tok), model
        collator = DataCollatorWithPadding(run.tokenizer)
    trainer = FinetuneTrainer(model=train_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              data_collator=collator, processing_class=run.tokenizer if not use_cache else None,
                              compute_metrics=evaluation.compute_metrics_fn, callbacks=callbacks)
    before = predict(trainer, data)
    metrics["before_finetuning"] = {k: before[k] for k in ("accuracy", "f1_weighted", "f1_macro")}
    metrics["before_finetuning"]["ece"] = evaluation.calibration(before["probs"], data.val_labels)["ece"]
    return trainer


# ---------------------------------------------------------------------------------------------
# evaluate and outputs


def predict(trainer, data: ClassificationData) -> dict:
    """The validation metrics of the trainer's model, with its predictions (`pred`) and probabilities."""
    out = trainer.predict(trainer.eval_dataset, metric_key_prefix="eval")
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    probs = evaluation.softmax(np.asarray(logits, dtype=np.float64))
    pred = probs.argmax(-1).tolist()
    m = evaluation.classification_metrics(data.val_labels, pred, data.label_names)
    m.update(pred=pred, probs=probs)
    return m


def evaluate(run: RunContext, trainer, model, data: ClassificationData, metrics: dict) -> None:
    final = predict(trainer, data)
    metrics.update({k: final[k] for k in ("accuracy", "f1_weighted", "f1_macro", "labels", "per_class",
                                          "confusion_matrix")})
    metrics["baselines"] = evaluation.baselines(data.train_texts, data.train_labels, data.val_texts,
                                                data.val_labels)
    metrics["error_analysis"] = evaluation.error_analysis(data.val_texts, data.val_labels, final["pred"],
                                                          final["probs"], data.label_names)
    metrics["calibration"] = evaluation.calibration(final["probs"], data.val_labels)
    metrics["ece"] = metrics["calibration"]["ece"]
    metrics["mean_confidence_correct"] = metrics["calibration"]["mean_confidence_correct"]
    metrics["val_samples"] = len(data.val_texts)
    if run.main:
        write_predictions(rundir.predictions_path(run.out), data.val_texts, data.val_labels, final["pred"],
                          final["probs"], data.label_names)


def write_outputs(run: RunContext, model, data: ClassificationData, metrics: dict, evaluated: None) -> None:
    """Nothing beyond metrics.json: predictions.csv is written with the numbers it explains (evaluate)."""
