"""Evaluation people can trust: metrics, baselines, error analysis, perplexity and forgetting.

    m = classification_metrics(y_true, y_pred, label_names)             # accuracy, F1, per class, confusion
    b = baselines(train_texts, train_labels, val_texts, val_labels)     # same split and metrics as the model
    e = error_analysis(val_texts, y_true, y_pred, probs, label_names)   # confident mistakes, confused pairs
    ppl = batches_perplexity(model, general_text_batches(tokenizer))    # the forgetting probe

Metrics come from scikit-learn (evaluate.load() needs the hub), imported inside the functions that
use it: seconds of imports an instruction run never needs. Nothing here trains the model.
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import torch

from .data import CausalCollator
from .lean import head_loss_sum

FORGETTING_THRESHOLD = 0.10   # relative perplexity rise above which we call it forgetting


def classification_metrics(y_true, y_pred, label_names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    ids = list(range(len(label_names)))
    report = classification_report(y_true, y_pred, labels=ids, target_names=label_names, output_dict=True,
                                   zero_division=0)
    per_class = {name: {"precision": report[name]["precision"], "recall": report[name]["recall"],
                        "f1": report[name]["f1-score"], "support": int(report[name]["support"])}
                 for name in label_names}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_weighted": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "labels": list(label_names),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


# The key a classification run chooses its best checkpoint and early-stops on: weighted F1 first, the
# validation loss breaking ties. On F1 alone, a model that reaches F1 1.0 early keeps that first, barely
# trained checkpoint (right answers at ~40% probability on 3 classes); with the tie-break, a later
# checkpoint with the same F1 and a lower loss (more confident, better calibrated) wins, and early
# stopping waits while the loss still falls at the best F1. F1 is rounded to 6 digits and the loss term
# stays below 1e-6, so a higher F1 always wins, whatever its loss.
SELECTION_METRIC = "f1_then_loss"
_LOSS_WEIGHT = 1e-8          # x the loss clipped to [0, 99]: < 1e-6


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of integer labels under logits (what the classifier's eval_loss is)."""
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), np.asarray(labels)].mean())


def compute_metrics_fn(eval_pred) -> dict:
    """For Trainer: accuracy and F1 from logits (scikit-learn, works offline), and the checkpoint
    selection key (SELECTION_METRIC)."""
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(-1)
    f1 = float(f1_score(labels, preds, average="weighted", zero_division=0))
    loss = min(max(cross_entropy(logits, labels), 0.0), 99.0)
    return {"accuracy": float(accuracy_score(labels, preds)), "f1_weighted": f1,
            "f1_macro": float(f1_score(labels, preds, average="macro", zero_division=0)),
            SELECTION_METRIC: round(f1, 6) - _LOSS_WEIGHT * loss}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _scores(y_true, y_pred, labels) -> dict:
    """The model row's three numbers, for a baseline: accuracy, weighted and macro F1 over `labels`."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "f1_weighted": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
            "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}


def baselines(train_texts, train_labels, val_texts, val_labels, labels=None) -> dict:
    """Majority class and TF-IDF + logistic regression (the article's Level-1 comparison), same split.

    Each gets accuracy, f1_weighted and f1_macro like the model. labels: the label ids macro F1
    averages over (default: every label of either split, as classification_metrics does for the
    model), so a class a baseline never predicts counts as F1 0 instead of disappearing.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train_labels = np.asarray(train_labels)
    val_labels = np.asarray(val_labels)
    labels = list(np.union1d(train_labels, val_labels)) if labels is None else list(labels)
    values, counts = np.unique(train_labels, return_counts=True)
    majority = values[counts.argmax()]
    maj_pred = np.full_like(val_labels, majority)
    out = {"majority": _scores(val_labels, maj_pred, labels)}
    if len(values) < 2:
        pred = maj_pred          # one class in the training split: logistic regression cannot fit
    else:
        try:
            pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                                 LogisticRegression(max_iter=2000, C=10.0))
            pipe.fit(list(train_texts), train_labels)
        except ValueError:
            # "empty vocabulary": texts without any 2+ letter word (codes, emoji, single characters).
            # Character n-grams still work, so the baseline never fails a finished run.
            pipe = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
                                 LogisticRegression(max_iter=2000, C=10.0))
            pipe.fit(list(train_texts), train_labels)
        pred = pipe.predict(list(val_texts))
    out["tfidf_logreg"] = _scores(val_labels, pred, labels)
    return out


def calibration(probs: np.ndarray, y_true, n_bins: int = 10) -> dict:
    """How far the model's confidence (its top class probability) is from how often it is right.

    ece: the expected calibration error over n_bins equal-width confidence bins (the bins' |accuracy -
    mean confidence| weighted by their share of rows); mean_confidence_correct: the mean top probability
    on rows it gets right (a model that is right at 40% confidence is barely trained); bins: per
    non-empty bin, its range, rows, accuracy and mean confidence (the reliability diagram)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if probs.ndim != 2 or len(probs) == 0:
        return {"ece": None, "mean_confidence": None, "mean_confidence_correct": None, "bins": []}
    conf, pred = probs.max(1), probs.argmax(1)
    right = pred == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = which == b
        if not mask.any():
            continue
        acc, mean_conf = float(right[mask].mean()), float(conf[mask].mean())
        ece += mask.mean() * abs(acc - mean_conf)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(mask.sum()), "accuracy": acc,
                     "confidence": mean_conf})
    return {"ece": float(ece), "mean_confidence": float(conf.mean()),
            "mean_confidence_correct": float(conf[right].mean()) if right.any() else None, "bins": bins}


def error_analysis(texts, y_true, y_pred, probs: np.ndarray, label_names: list[str], top: int = 50) -> dict:
    """Misclassified examples, most confident mistakes first, and the most confused label pairs."""
    errors = []
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if t != p:
            errors.append({"index": i, "text": texts[i], "true": label_names[t], "predicted": label_names[p],
                           "confidence": float(probs[i, p]), "true_label_probability": float(probs[i, t])})
    errors.sort(key=lambda e: -e["confidence"])
    pairs: dict[tuple[str, str], int] = {}
    for e in errors:
        pairs[(e["true"], e["predicted"])] = pairs.get((e["true"], e["predicted"]), 0) + 1
    confused = [{"true": a, "predicted": b, "count": n}
                for (a, b), n in sorted(pairs.items(), key=lambda kv: -kv[1])]
    return {"n_errors": len(errors), "misclassified": errors[:top], "confused_pairs": confused[:10]}


# ---------------------------------------------------------------------------------------------
# language-model evaluation


def general_text_paragraphs() -> list[str]:
    """General English paragraphs written for this project: the forgetting probe's reference text."""
    text = resources.files("finetune_core").joinpath("resources/general_english.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def lm_head_parts(model):
    """(body, head) of a causal LM whose logits are the head applied to the body's last hidden states, so
    the loss can project only the positions it scores; None for any other model (a logit soft-cap or
    scale, no separate head). The vocabulary projection is ~20% of SmolLM2's FLOPs, and prompt and
    padding positions (label -100) contribute nothing to the loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(base, "get_output_embeddings") or _changes_logits(cfg):
        return None
    head = base.get_output_embeddings()
    body = getattr(base, getattr(base, "base_model_prefix", "") or "_none_", None)
    return (body, head) if head is not None and body is not None else None


# Config fields with which a model's forward changes the head's output before the loss: a soft cap (Gemma 2/3,
# xLSTM) or a scale (Cohere's logit_scale multiplies, Granite's and MiniCPM3's logits_scaling divides).
_SOFTCAPS = ("final_logit_softcapping", "output_logit_soft_cap")
_SCALES = ("logit_scale", "logits_scaling")


def _changes_logits(cfg) -> bool:
    return any(getattr(cfg, name, None) is not None for name in _SOFTCAPS) or \
        any(getattr(cfg, name, None) not in (None, 1) for name in _SCALES)


def causal_mask_needed(attention_mask):
    """The attention mask a causal LM's forward needs for the loss: None when every row is right-padded
    (ones, then zeros), where causality alone already keeps each real token from seeing padding; the
    mask otherwise (left padding, packed rows). Without a mask, SDPA runs its causal kernel and shares
    each key/value head across its query heads instead of copying it (grouped-query models), which
    keeps less for the backward pass; the loss over real tokens is the same."""
    if attention_mask is None or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    return attention_mask


def response_loss_sum(model, batch: dict, parts=None, capture=None):
    """(sum of the cross-entropy over the labelled positions, their count) for one batch of
    {input_ids, attention_mask, labels}; `parts` = lm_head_parts(model) projects only those positions
    (the same loss as the model's own up to float rounding; the head and loss run in chunks of rows,
    lean.head_loss_sum), None computes the full logits.
    capture: a prompt_kv.PromptKV that keeps the keys and values of the held-out prompts this batch
    starts rows with (the loss is the same: the forward fills a cache it would otherwise not keep)."""
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    mask = causal_mask_needed(batch["attention_mask"])
    cache, picks = (capture.start(model, batch["input_ids"], batch["attention_mask"]) if capture is not None
                    else (None, []))
    kv = {"cache": cache, "use_cache": True} if cache is not None else {}
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=batch["input_ids"], attention_mask=mask, **kv).last_hidden_state
        loss_sum = head_loss_sum(head, hidden[:, :-1][keep], labels[keep])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, **kv).logits[:, :-1][keep]
        loss_sum = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")
    if cache is not None:
        capture.keep(cache, picks)
    return loss_sum, int(keep.sum())


def token_loss(model, batches, progress=None, capture=None) -> tuple[float, int]:
    """Mean cross-entropy per predicted token over batches of {input_ids, attention_mask, labels}.
    progress(done, total) is called after each batch; capture: see response_loss_sum."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = lm_head_parts(model)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, n = response_loss_sum(model, batch, parts, capture)
            if n:
                total += loss_sum.item()
                count += n
            if progress is not None:
                progress(i + 1, len(batches))
    model.train(was_training)
    return (total / count if count else float("nan")), count


def text_batches(tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> list[dict]:
    """Plain texts as loss batches: every token predicted, padding excluded."""
    enc = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    feats = [{"input_ids": ids, "labels": list(ids)} for ids in enc if len(ids) > 1]
    collate = CausalCollator(tokenizer.pad_token_id)
    return [collate(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)]


def general_text_batches(tokenizer, max_length: int = 256) -> list[dict]:
    """The forgetting probe's batches: the bundled general English as text_batches. Every task scores
    these, and the base-model cache keys the base model's number by them (basecache.general_text_key)."""
    return text_batches(tokenizer, general_text_paragraphs(), max_length)


def batches_perplexity(model, batches, progress=None) -> float:
    """exp(mean token loss) over loss batches (token_loss); NaN when they hold no token."""
    loss, _ = token_loss(model, batches, progress=progress)
    return float(math.exp(loss)) if loss == loss else float("nan")


def perplexity(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """exp(mean token loss) of plain texts (every token predicted, padding excluded)."""
    return batches_perplexity(model, text_batches(tokenizer, texts, max_length, batch_size))


def forgetting_report(before: float, after: float, threshold: float = FORGETTING_THRESHOLD) -> dict:
    """Relative change of general-text perplexity with a plain-language verdict."""
    change = (after - before) / before if before and before == before else float("nan")
    if change != change:
        verdict = "not measured"
    elif change <= threshold:
        verdict = ("small change: general language ability looks intact" if change >= -threshold else
                   "general-text perplexity went down: no sign of forgetting")
    else:
        verdict = (f"noticeable forgetting (+{change:.0%} perplexity on general text): lower the learning rate, "
                   "freeze early layers or use LoRA")
    return {"general_perplexity_before": before, "general_perplexity": after,
            "general_perplexity_change": change, "forgetting_verdict": verdict}
