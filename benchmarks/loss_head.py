"""The response-only LM head of FinetuneTrainer: same loss and gradients as the standard path, and its gain.

FinetuneTrainer projects only response positions (labels != -100) through the LM head and the
cross-entropy; the standard path (`model(**batch).loss`) computes logits for every position. Checked
on SmolLM2 with real batches (the first 48 Self-Instruct rows, alpaca template, batch 8, grouped by
length):
- loss equality to 1e-5 (absolute), with the Trainer's normalisation both ways (per batch, and by a
  given `num_items_in_batch` as under gradient accumulation);
- gradient equality (relative difference of the full gradient);
- which rounds less: each path's loss against the same hidden states through the head in float64. The
  response-only path runs the head and loss in chunks (lean.head_loss_sum); on SmolLM2's 49k vocabulary
  the standard float32 cross-entropy comes out ~8e-6 per token below the float64 value and the chunked
  one within ~2e-7, so the two paths now differ by ~8e-6 (2e-7 when both used the standard loss);
- forward+backward time of both paths, interleaved, best of N rounds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import common as C

NAME = "loss_head"
TITLE = "Response-only LM head vs full logits (same loss, time)"


def training_batches(model_path: str, n_rows: int, max_length: int, batch: int = 8) -> list[dict]:
    from finetune_core import data as D

    from .ideas import sample_rows

    tok, rows = sample_rows(model_path, n_rows, max_length)
    collate = D.CausalCollator(tok.pad_token_id)
    feats = [{"input_ids": ids, "labels": labels} for ids, labels in rows]
    return [collate(feats[i:i + batch]) for i in range(0, len(feats), batch)]


def make_trainer(model, work: Path):
    from transformers import TrainingArguments

    from finetune_core.trainer import FinetuneTrainer, response_only_ok

    args = TrainingArguments(output_dir=str(work), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = FinetuneTrainer(model=model, args=args)
    trainer.response_only = response_only_ok(model)
    return trainer


def grads(model) -> "torch.Tensor":
    import torch

    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def check_equal(model, trainer, batches) -> dict:
    """Max |loss difference| over batches, both normalisations, gradient relative difference, and each path's
    loss minus the float64 head's on the middle batch."""
    import torch

    model.train()
    worst_mean = worst_items = 0.0
    middle = len(batches) // 2
    for i, b in enumerate(batches):
        with torch.no_grad():
            standard = model(**b).loss.item()
            ours = trainer.compute_loss(model, b).item()
            n = int((b["labels"][:, 1:] != -100).sum()) * 3      # as if 3 batches were accumulated
            standard_n = model(**b, num_items_in_batch=n).loss.item()
            ours_n = trainer.compute_loss(model, b, num_items_in_batch=n).item()
        worst_mean = max(worst_mean, abs(standard - ours))
        worst_items = max(worst_items, abs(standard_n - ours_n))
        if i == middle:
            exact = float64_head_loss(model, b)
            reference = {"standard": standard - exact, "response_only": ours - exact}
    b = batches[middle]
    model.zero_grad(set_to_none=True)
    model(**b).loss.backward()
    g_std = grads(model)
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, b).backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)
    rel = ((g_std - g_ours).norm() / g_std.norm()).item()
    return {"max_abs_loss_diff": worst_mean, "max_abs_loss_diff_num_items": worst_items, "grad_rel_diff": rel,
            "float64_head": reference}


def float64_head_loss(model, batch) -> float:
    """The mean loss of the batch's final hidden states through the head and cross-entropy in float64: the
    reference that shows which path's head rounds less. (transformers' own loss casts the logits to float32
    whatever the model's dtype, so a float64 model's `.loss` is no float64 reference.)"""
    import torch
    import torch.nn.functional as F

    from finetune_core.evaluation import lm_head_parts

    body, head = lm_head_parts(model)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    with torch.no_grad():
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return F.cross_entropy(hidden[:, :-1][keep].double() @ head.weight.double().t(), labels[keep]).item()


def time_paths(model, trainer, batches, rounds: int) -> dict:
    model.train()
    best = {"standard": float("inf"), "response_only": float("inf")}
    for _ in range(rounds):
        for name in best:
            t = time.perf_counter()
            for b in batches:
                loss = model(**b).loss if name == "standard" else trainer.compute_loss(model, b)
                loss.backward()
                model.zero_grad(set_to_none=True)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def run(quick: bool = False, out_dir: Path | None = None, model: str = C.SMOLLM2) -> dict:
    C.quiet_env()
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_core.models import resolve_model
    from finetune_core.runtime import set_cpu_threads

    threads = set_cpu_threads()
    path = resolve_model(model)
    n_rows, max_length, rounds = (8, 128, 1) if quick else (48, 256, 2)
    batches = training_batches(path, n_rows, max_length)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.config.use_cache = False
    trainer = make_trainer(m, C.scratch_dir(NAME))
    eq = check_equal(m, trainer, batches)
    # Timing on two mid-length batches (a full pass over 48 rows costs ~1 minute per path).
    timed_batches = batches[len(batches) // 2 - 1: len(batches) // 2 + 1] if len(batches) > 2 else batches
    t = time_paths(m, trainer, timed_batches, rounds)
    positions = sum(int(b["input_ids"].numel()) for b in timed_batches)
    response = sum(int((b["labels"][:, 1:] != -100).sum()) for b in timed_batches)
    speedup = t["standard"] / t["response_only"]
    result = {"title": TITLE,
              "setup": {"model": model, "rows": n_rows, "batches": len(batches), "timed_positions": positions,
                        "timed_response_positions": response, "rounds": rounds, "torch_threads": threads},
              "equality": eq, "seconds": t, "speedup": round(speedup, 3),
              "response_only_enabled": trainer.response_only}
    ok = max(eq["max_abs_loss_diff"], eq["max_abs_loss_diff_num_items"]) <= 1e-5
    result["met"] = {"same_loss": ok, "faster": speedup > 1.0}
    result["summary"] = [
        {"what": "response-only head: max abs(loss - standard loss)", "value":
         f"{max(eq['max_abs_loss_diff'], eq['max_abs_loss_diff_num_items']):.1e} (grad rel. diff "
         f"{eq['grad_rel_diff']:.1e}; vs the head in float64: standard {eq['float64_head']['standard']:+.1e}, "
         f"ours {eq['float64_head']['response_only']:+.1e})", "target": "<= 1e-5", "met": ok},
        {"what": "response-only head: fwd+bwd speed-up", "value": f"{speedup:.2f}x "
         f"({response}/{positions} positions are response)", "target": "> 1x", "met": result["met"]["faster"]},
    ]
    C.write_result(NAME, result, quick, out_dir)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
