"""Target 3: peak RSS of LoRA vs full fine-tuning of SmolLM2 on the same batches.

ru_maxrss is a process-wide peak, so each strategy runs `train()` in its own subprocess
(`python -m benchmarks.memory --child STRATEGY ...`). Same data (the first 48 Self-Instruct rows,
validation the last 25), same batch size (8), same max_length (256), one whole epoch, so both sides
see every batch, the longest (8 x 256 tokens) included, whatever order the sampler picks.

Reported per strategy:
- `peak_rss_mb`: the whole process (ru_maxrss), what the issue's target is about;
- `train_peak_rss_mb`: the peak during `trainer.train()` alone (VmHWM reset through
  /proc/self/clear_refs just before training), which separates training from evaluation/generation;
- `rss_before_train_mb`: resident memory when training starts (model, tokenizer, data, libraries).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from . import common as C

NAME = "memory"
TITLE = "Peak RSS, LoRA vs full fine-tuning, SmolLM2-135M, same batches"


def _vm_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def training_phase_probe(store: dict):
    """Record RSS when trainer.train() starts and the peak RSS during it (benchmark instrumentation)."""
    from finetune_core.trainer import FinetuneTrainer

    own = "train" in vars(FinetuneTrainer)
    original = FinetuneTrainer.train

    def probed(self, *args, **kwargs):
        store["rss_before_train_mb"] = (_vm_kb("VmRSS") or 0) / 1024
        store["hwm_reset"] = _reset_hwm()
        try:
            return original(self, *args, **kwargs)
        finally:
            store["train_peak_rss_mb"] = (_vm_kb("VmHWM") or 0) / 1024 if store["hwm_reset"] else None

    FinetuneTrainer.train = probed
    try:
        yield store
    finally:
        if own:
            FinetuneTrainer.train = original
        else:
            del FinetuneTrainer.train


def child(strategy: str, model: str, n_train: int, n_val: int, max_length: int, steps: int, batch: int) -> dict:
    """Runs in its own process: one train() with `strategy`; returns its memory figures."""
    C.quiet_env()
    import resource

    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    from .instruction import split_rows

    rows = C.self_instruct_rows()
    train_rows, val_rows = split_rows(rows, n_train, n_val)
    work = C.scratch_dir(f"{NAME}_{strategy}")
    cfg = {"task": "instruction", "model": model,
           "data": {"train": C.write_jsonl(work / "train.jsonl", train_rows),
                    "validation": C.write_jsonl(work / "val.jsonl", val_rows),
                    "template": "alpaca", "max_length": max_length},
           "strategy": {"name": strategy},
           "training": {"max_steps": steps, "num_train_epochs": 1, "per_device_train_batch_size": batch,
                        "eval_strategy": "no",
                        "save_strategy": "no", "learning_rate": 2e-5 if strategy == "full" else 2e-4},
           "output_dir": str(work / "run"), "seed": 42}
    store: dict = {}
    with training_phase_probe(store), contextlib.redirect_stdout(io.StringIO()):
        m = train(config_from_dict(cfg))
    return {"strategy": strategy, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "metrics_peak_rss_mb": m["peak_rss_mb"], "trainable_params": m["trainable_params"],
            "train_seconds": m["train_seconds"], "global_step": m["global_step"], **store}


def run(quick: bool = False, out_dir: Path | None = None, model: str = C.SMOLLM2) -> dict:
    C.quiet_env()
    n_train, n_val, max_length, steps, batch = (16, 8, 128, -1, 8) if quick else (48, 25, 256, -1, 8)
    args = ["--model", model, "--n-train", str(n_train), "--n-val", str(n_val), "--max-length", str(max_length),
            "--steps", str(steps), "--batch", str(batch)]
    sides = {}
    for strategy in ("full", "lora"):
        print(f"[{NAME}] {strategy} in its own process ...", flush=True)
        sides[strategy] = C.run_json_subprocess("benchmarks.memory", ["--child", strategy, *args])
    full, lora = sides["full"], sides["lora"]
    ratio = lora["peak_rss_mb"] / full["peak_rss_mb"]
    train_ratio = (lora["train_peak_rss_mb"] / full["train_peak_rss_mb"]
                   if lora.get("train_peak_rss_mb") and full.get("train_peak_rss_mb") else None)
    result = {"title": TITLE,
              "setup": {"model": model, "train_rows": n_train, "max_length": max_length, "batch": batch,
                        "steps": steps},
              "full": full, "lora": lora, "ratio": round(ratio, 3),
              "train_phase_ratio": round(train_ratio, 3) if train_ratio else None}
    result["met"] = {"ratio": ratio <= 0.60}
    result["summary"] = [
        {"what": "peak RSS LoRA / full (whole process)",
         "value": f"{lora['peak_rss_mb']:.0f} / {full['peak_rss_mb']:.0f} MB = {ratio:.0%}"
                  + (f" (training phase alone {train_ratio:.0%})" if train_ratio else ""),
         "target": "<= 60%", "met": result["met"]["ratio"]},
    ]
    C.write_result(NAME, result, quick, out_dir)
    return result


def _main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    p.add_argument("--child", choices=("full", "lora"))
    p.add_argument("--model", default=C.SMOLLM2)
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--n-val", type=int, default=25)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=-1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.model, a.n_train, a.n_val, a.max_length, a.steps, a.batch)), flush=True)
    else:
        print(json.dumps(run(quick=a.quick), indent=2, default=str))


if __name__ == "__main__":
    _main(sys.argv[1:])
