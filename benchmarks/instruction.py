"""Target 1: instruction full fine-tuning of SmolLM2, the article's recipe vs `finetune_core.train.train()`.

Data: first 48 rows of ../shared/datasets/self_instruct_seed_tasks.jsonl, validation = last 25 rows,
1 epoch, lr 2e-5, max_length 256, alpaca template.

- Article side: the article's own code (pad every example to 256 with pad = eos, labels = input_ids
  clone with the prompt positions -100 and padding NOT masked, batch 1 x accumulation 4,
  warmup_steps=10, plain `Trainer`), changed only where transformers 5 requires it (use_cpu).
- Our side: `train()` with a config that sets only task, model, data, strategy full, template, lr,
  epochs, max_length; eval/save off for timing. Everything else is our defaults.

Both times are taken around `trainer.train()` only (ours: metrics.json `train_seconds`). Both
validation losses come from the same function (`finetune_core.evaluation.token_loss`) on the same
batches: mean cross-entropy over the response tokens of the validation rows, padding excluded.
MFU = 6 x parameters x real tokens / train seconds, against the fp32 matmul peak measured in the run.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path

from . import common as C

NAME = "instruction"
TITLE = "Instruction full fine-tuning, SmolLM2-135M, 48 Self-Instruct rows"
LR = 2e-5


# ---------------------------------------------------------------------------------------------
# data


def split_rows(rows: list[dict], n_train: int = 48, n_val: int = 25) -> tuple[list[dict], list[dict]]:
    return rows[:n_train], rows[-n_val:]


def article_examples(rows: list[dict]) -> list[dict]:
    """The article's prompt/completion pairs: its alpaca prompt text, the row's output as completion."""
    from finetune_core.data import alpaca_prompt

    return [{"prompt": alpaca_prompt(str(r.get("instruction", "")), str(r.get("input") or "")),
             "completion": str(r.get("output", ""))} for r in rows]


def val_batches(tokenizer, val_rows: list[dict], max_length: int, batch_size: int = 8) -> list[dict]:
    """The validation batches `train()` scores (`tasks.instruction.lm_probe`): alpaca template, dynamic padding."""
    import pandas as pd

    from finetune_core import data as D
    from finetune_core.config import DataConfig

    df = pd.DataFrame(val_rows)
    cols = D.detect_columns(df, "instruction", DataConfig(train="val.jsonl"))
    ex = D.tokenize_instruction(df, cols, tokenizer, "alpaca", max_length)
    collate = D.CausalCollator(tokenizer.pad_token_id)
    feats = [{"input_ids": i, "labels": l} for i, l in zip(ex.input_ids, ex.labels)]
    return [collate(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)]


def response_val_loss(model, batches) -> tuple[float, int]:
    from finetune_core.evaluation import token_loss

    return token_loss(model, batches)


# ---------------------------------------------------------------------------------------------
# the article's recipe


def article_tokenize(tokenizer, example: dict, max_length: int = 256) -> dict:
    """The article's `tokenize_instruction`, verbatim but for the function signature."""
    full_text = example['prompt'] + example['completion'] + tokenizer.eos_token
    tokenized = tokenizer(full_text, max_length=max_length, truncation=True, padding='max_length',
                          return_tensors='pt')
    input_ids = tokenized['input_ids'][0]
    labels = input_ids.clone()
    # Mask the prompt tokens in loss (we only want to train on completions)
    prompt_ids = tokenizer(example['prompt'], return_tensors='pt')['input_ids'][0]
    prompt_len = len(prompt_ids)
    labels[:prompt_len] = -100
    return {'input_ids': input_ids, 'attention_mask': tokenized['attention_mask'][0], 'labels': labels}


def article_token_stats(tokenized: list[dict]) -> dict:
    positions = sum(int(t["input_ids"].numel()) for t in tokenized)
    real = sum(int(t["attention_mask"].sum()) for t in tokenized)
    loss_tokens = loss_pad = 0
    for t in tokenized:
        lab, mask = t["labels"][1:], t["attention_mask"][1:]
        keep = lab != -100
        loss_tokens += int(keep.sum())
        loss_pad += int((keep & (mask == 0)).sum())
    return {"positions": positions, "real_tokens": real, "padding_share": 1 - real / positions,
            "loss_tokens": loss_tokens, "loss_padding_share": loss_pad / max(1, loss_tokens)}


def run_article(model_path: str, train_rows: list[dict], out_dir: Path, max_length: int = 256,
                max_steps: int = -1) -> dict:
    """The article's instruction fine-tuning code on `train_rows`; returns model, time and token stats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False   # required for gradient checkpointing

    tokenized_data = [article_tokenize(tokenizer, ex, max_length) for ex in article_examples(train_rows)]

    class InstructionDataset(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, idx):
            return self.data[idx]

    train_ds = InstructionDataset(tokenized_data)
    training_args = TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=1,               # the article trains 3; the benchmark compares one epoch
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,    # effective batch size = 4
        learning_rate=LR,
        warmup_steps=10,
        logging_steps=5,
        save_steps=50,
        report_to='none',
        use_cpu=True,                     # transformers 5: no_cuda became use_cpu
        max_steps=max_steps,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    stats = article_token_stats(tokenized_data)
    return {"model": model, "train_seconds": seconds, "train_loss": float(result.training_loss),
            "global_step": trainer.state.global_step, "torch_threads": torch.get_num_threads(), **stats}


# ---------------------------------------------------------------------------------------------
# ours


@contextmanager
def count_training_batches(train_input_ids: list[list[int]]):
    """Count real and padded positions of the batches `CausalCollator` builds from training rows.

    Validation/probe batches (other rows) are not counted. Counting only: the batches are unchanged.
    """
    from finetune_core import data as D

    train_set = {tuple(ids) for ids in train_input_ids}
    stats = {"batches": 0, "positions": 0, "real_tokens": 0, "loss_tokens": 0, "batch_sizes": []}
    original = D.CausalCollator.__call__

    def counting(self, features):
        batch = original(self, features)
        if features and tuple(features[0]["input_ids"]) in train_set:
            stats["batches"] += 1
            stats["positions"] += int(batch["input_ids"].numel())
            stats["real_tokens"] += int(batch["attention_mask"].sum())
            stats["loss_tokens"] += int((batch["labels"][:, 1:] != -100).sum())
            stats["batch_sizes"].append(int(batch["input_ids"].shape[0]))
        return batch

    D.CausalCollator.__call__ = counting
    try:
        yield stats
    finally:
        D.CausalCollator.__call__ = original
        stats["padding_share"] = 1 - stats["real_tokens"] / max(1, stats["positions"])


def our_config(model: str, train_file: str, val_file: str, out_dir: Path, max_length: int = 256,
               training: dict | None = None) -> dict:
    return {"task": "instruction", "model": model,
            "data": {"train": train_file, "validation": val_file, "template": "alpaca", "max_length": max_length},
            "strategy": {"name": "full"},
            "training": {"learning_rate": LR, "num_train_epochs": 1, "eval_strategy": "no",
                         "save_strategy": "no", **(training or {})},
            "output_dir": str(out_dir), "seed": 42}


def tokenize_rows(model_path: str, rows: list[dict], max_length: int):
    """(tokenizer, tokenized examples) of Self-Instruct rows the way train() tokenizes them (alpaca)."""
    import pandas as pd

    from finetune_core import data as D
    from finetune_core.config import DataConfig
    from finetune_core.models import load_tokenizer

    tok = load_tokenizer(model_path)
    df = pd.DataFrame(rows)
    cols = D.detect_columns(df, "instruction", DataConfig(train="train.jsonl"))
    return tok, D.tokenize_instruction(df, cols, tok, "alpaca", max_length)


def train_ids(model_path: str, train_rows: list[dict], max_length: int) -> list[list[int]]:
    return tokenize_rows(model_path, train_rows, max_length)[1].input_ids


def run_ours(model: str, model_path: str, train_rows: list[dict], val_rows: list[dict], work: Path,
             max_length: int = 256, training: dict | None = None) -> dict:
    """`train()` on the same rows; returns its metrics, padding stats and the trained model folder."""
    import contextlib
    import io

    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    work.mkdir(parents=True, exist_ok=True)
    train_file = C.write_jsonl(work / "train.jsonl", train_rows)
    val_file = C.write_jsonl(work / "val.jsonl", val_rows)
    cfg = config_from_dict(our_config(model, train_file, val_file, work / "ours", max_length, training))
    ids = train_ids(model_path, train_rows, max_length)
    with count_training_batches(ids) as stats, contextlib.redirect_stdout(io.StringIO()):
        metrics = train(cfg)
    return {"metrics": metrics, "padding": stats, "model_dir": work / "ours" / "model",
            "real_tokens": sum(len(x) for x in ids)}


# ---------------------------------------------------------------------------------------------
# the benchmark


def padding_floor(lengths: list[int], batch: int) -> float:
    """The lowest padding share any split of these rows into batches of `batch` can have (rectangular
    batches): sort by length and cut contiguous groups, which is optimal for fixed-size groups."""
    ordered = sorted(lengths)
    groups = [ordered[i:i + batch] for i in range(0, len(ordered), batch)]
    positions = sum(max(g) * len(g) for g in groups)
    return 1 - sum(ordered) / positions


def mfu(params: int, tokens: int, seconds: float, peak_gflops: float) -> dict:
    achieved = 6 * params * tokens / seconds / 1e9
    return {"achieved_gflops": round(achieved, 1), "mfu": round(achieved / peak_gflops, 3)}


def run(quick: bool = False, out_dir: Path | None = None, model: str = C.SMOLLM2, repeats: int | None = None) -> dict:
    """Both sides back to back in this process (article, ours, article, ours, ...); result also written as JSON."""
    C.quiet_env()
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_core.models import load_tokenizer, resolve_model
    from finetune_core.runtime import set_cpu_threads

    threads = set_cpu_threads()
    rows = C.self_instruct_rows()
    n_train, n_val, max_length = (12, 8, 128) if quick else (48, 25, 256)
    repeats = repeats or (1 if quick else 3)
    train_rows, val_rows = split_rows(rows, n_train, n_val)
    model_path = resolve_model(model)
    tok = load_tokenizer(model_path)
    batches = val_batches(tok, val_rows, max_length)
    work = C.scratch_dir(NAME)
    peaks = {"start": C.matmul_peak()}
    loads = {"start": C.load_average()}

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    params = sum(p.numel() for p in base.parameters())
    before_loss, n_val_tokens = response_val_loss(base, batches)
    del base

    arts, ours_runs = [], []
    for r in range(repeats):
        print(f"[{NAME}] ({r + 1}/{repeats}) article recipe: {n_train} rows, pad to {max_length}, "
              "batch 1 x accumulation 4 ...", flush=True)
        art = run_article(model_path, train_rows, work / f"article{r}", max_length)
        art["val_loss"], _ = response_val_loss(art.pop("model"), batches)
        gc.collect()
        arts.append(art)
        peaks[f"after_article{r}"] = C.matmul_peak()
        loads[f"after_article{r}"] = C.load_average()

        print(f"[{NAME}] ({r + 1}/{repeats}) finetune_core.train() ...", flush=True)
        ours = run_ours(model, model_path, train_rows, val_rows, work / f"ours{r}", max_length)
        trained = AutoModelForCausalLM.from_pretrained(str(ours["model_dir"]), dtype=torch.float32)
        ours["val_loss"], _ = response_val_loss(trained, batches)
        del trained
        gc.collect()
        ours_runs.append(ours)
        peaks[f"after_ours{r}"] = C.matmul_peak()
        loads[f"after_ours{r}"] = C.load_average()

    peak = max(peaks.values())
    real = ours_runs[0]["real_tokens"]
    art_s = [a["train_seconds"] for a in arts]
    our_s = [o["metrics"]["train_seconds"] for o in ours_runs]
    speedup = sum(art_s) / sum(our_s)
    art, ours, m = arts[0], ours_runs[0], ours_runs[0]["metrics"]
    art_loss, our_loss = art["val_loss"], ours["val_loss"]
    result = {
        "title": TITLE,
        "setup": {"model": model, "train_rows": len(train_rows), "val_rows": len(val_rows),
                  "val_response_tokens": n_val_tokens, "max_length": max_length, "epochs": 1, "lr": LR,
                  "params": params, "real_train_tokens": real, "torch_threads": threads, "repeats": repeats,
                  "order": "article, ours" + ", article, ours" * (repeats - 1)},
        "matmul_peak_gflops": peaks, "peak_gflops": peak, "load_average": loads,
        "article": {"train_seconds": [round(x, 2) for x in art_s], "val_loss": art_loss,
                    "val_loss_all": [a["val_loss"] for a in arts], "train_loss": art["train_loss"],
                    "optimizer_steps": art["global_step"], "positions": art["positions"],
                    "padding_share": round(art["padding_share"], 4), "loss_tokens": art["loss_tokens"],
                    "loss_padding_share": round(art["loss_padding_share"], 4), "torch_threads": art["torch_threads"],
                    **mfu(params, real, min(art_s), peak)},
        "ours": {"train_seconds": [round(x, 2) for x in our_s], "val_loss": our_loss,
                 "val_loss_all": [o["val_loss"] for o in ours_runs],
                 "val_loss_from_metrics": m.get("eval_loss"), "train_loss": m.get("train_loss"),
                 "optimizer_steps": m.get("global_step"), "batch_sizes": ours["padding"]["batch_sizes"],
                 "positions": ours["padding"]["positions"],
                 "padding_share": round(ours["padding"]["padding_share"], 4),
                 "padding_floor_same_batch": round(padding_floor(
                     [len(x) for x in train_ids(model_path, train_rows, max_length)],
                     max(ours["padding"]["batch_sizes"] or [1])), 4),
                 "loss_padding_share": 0.0, "torch_threads": m.get("torch_threads"),
                 "total_seconds_of_train_call": round(m.get("total_seconds", 0), 1),
                 **mfu(params, real, min(our_s), peak)},
        "val_loss_before": before_loss,
        "speedup": round(speedup, 2),
        "speedup_per_pair": [round(a / o, 2) for a, o in zip(art_s, our_s)],
        "targets": {"speedup": ">= 2.5", "val_loss": "ours <= article", "mfu": ">= 0.5 (aim)",
                    "padding_share": "< 0.10 (aim)"},
    }
    result["met"] = {"speedup": speedup >= 2.5, "val_loss": our_loss <= art_loss + 1e-4,
                     "mfu": result["ours"]["mfu"] >= 0.5, "padding_share": result["ours"]["padding_share"] < 0.10}
    pairs = ", ".join(f"{x:.2f}x" for x in result["speedup_per_pair"])
    result["summary"] = [
        {"what": "train time, article recipe / ours (sum over pairs)",
         "value": f"{sum(art_s):.0f}s / {sum(our_s):.0f}s = {speedup:.2f}x (pairs: {pairs})", "target": ">= 2.5x",
         "met": result["met"]["speedup"]},
        {"what": "val loss (response tokens), article / ours", "value": f"{art_loss:.4f} / {our_loss:.4f} "
         f"(before training {before_loss:.4f})", "target": "ours <= article", "met": result["met"]["val_loss"]},
        {"what": "MFU (best run) ours / article", "value": f"{result['ours']['mfu']:.0%} / {result['article']['mfu']:.0%}"
         f" of {peak:.0f} GFLOP/s measured peak", "target": ">= 50% (aim)", "met": result["met"]["mfu"]},
        {"what": "padding share of positions, ours / article", "value":
         f"{result['ours']['padding_share']:.1%} / {result['article']['padding_share']:.1%} (article: "
         f"{result['article']['loss_padding_share']:.0%} of its loss tokens are padding; the lowest any batching "
         f"of these rows in batches of {max(ours['padding']['batch_sizes'] or [1])} can reach: "
         f"{result['ours']['padding_floor_same_batch']:.1%})", "target": "< 10% (aim)",
         "met": result["met"]["padding_share"]},
    ]
    C.write_result(NAME, result, quick, out_dir)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
