"""Target 2: frozen backbone, head only, with and without cached features (strategy.cache_features).

BANKING77 subset: 15 intents x 30 rows from ../shared/datasets/banking77/train.csv (the first 15 intents
of categories.json, the first 30 rows of each in file order); `train()` holds out 20% (stratified) for
validation. 10 epochs, head only on bundled MiniLM (mean pooling), our defaults otherwise, checkpoints
and best-model restoring off so both sides do exactly 10 epochs (no early stopping). Measured twice:
with train()'s default per-epoch evaluation (what a user's run does: the target is judged here; the
uncached side re-encodes the validation rows every epoch, the cached side reuses their features),
and training only (evaluation off on both sides).

- uncached: cache_features false, the frozen encoder re-runs on every batch of every epoch.
- cached: cache_features auto (must resolve to on): the encoder runs once over train and validation
  rows, the head trains on the stored vectors. Its train_seconds include that feature pass.

Order: a 1-epoch warm-up (not recorded), then cached, uncached, cached, uncached (the ratio uses the
means) for each of the two settings, all in this process. The warm-up matters for fairness: the uncached side's first encoder
passes run in train()'s "before fine-tuning" evaluation, outside its timed region, while the cached
side's first encoder pass is its (timed) feature pass; without a warm-up the first cached run also
pays the process's one-time start-up (thread pool, kernels, heap growth), measured ~0.2 s of ~1.3 s.
The cached side stays charged for encoding the validation rows as well (20% of its feature pass),
which the uncached side does in evaluation, outside train_seconds: the ratio is conservative.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from . import common as C

NAME = "cached_features"
TITLE = "Frozen head-only on BANKING77 (15 intents x 30 rows), cached vs re-run encoder"


def banking_subset(n_intents: int = 15, per_intent: int = 30) -> list[dict]:
    import pandas as pd

    folder = C.datasets_dir() / "banking77"
    df = pd.read_csv(folder / "train.csv")
    cats_file = folder / "categories.json"
    cats = json.loads(cats_file.read_text()) if cats_file.exists() else list(dict.fromkeys(df["category"]))
    cats = [c for c in cats if c in set(df["category"])][:n_intents]
    parts = [df[df["category"] == c].head(per_intent) for c in cats]
    return pd.concat(parts).to_dict("records")


def config(model: str, train_file: str, out_dir: Path, cache, epochs: int, evaluate: bool = False) -> dict:
    """evaluate=False: training only. evaluate=True: the default per-epoch evaluation a user's run does,
    with best-model restoring (and so early stopping) off so that both sides do all epochs."""
    training = ({"eval_strategy": "epoch", "save_strategy": "no", "load_best_model_at_end": False} if evaluate
                else {"eval_strategy": "no", "save_strategy": "no"})
    return {"task": "classification", "model": model, "data": {"train": train_file, "text_column": "text",
                                                                "label_column": "category"},
            "strategy": {"name": "frozen", "frozen_layers": "all", "cache_features": cache},
            "training": {"num_train_epochs": epochs, **training},
            "output_dir": str(out_dir), "seed": 42}


def run_side(model: str, train_file: str, out_dir: Path, cache, epochs: int, evaluate: bool = False) -> dict:
    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        m = train(config_from_dict(config(model, train_file, out_dir, cache, epochs, evaluate)))
    return {"train_seconds": m["train_seconds"], "feature_seconds": m.get("feature_seconds"),
            "cache_features": m.get("cache_features"), "accuracy": m["accuracy"], "f1_weighted": m["f1_weighted"],
            "global_step": m.get("global_step"), "train_samples": m["train_samples"],
            "val_samples": m.get("val_samples")}


def run(quick: bool = False, out_dir: Path | None = None, model: str = C.MINILM) -> dict:
    C.quiet_env()
    import pandas as pd

    from finetune_core.runtime import set_cpu_threads

    threads = set_cpu_threads()
    n_intents, per_intent, epochs = (5, 10, 2) if quick else (15, 30, 10)
    rows = banking_subset(n_intents, per_intent)
    work = C.scratch_dir(NAME)
    train_file = str(work / "banking_subset.csv")
    pd.DataFrame(rows).to_csv(train_file, index=False)

    print(f"[{NAME}] {len(rows)} rows, {epochs} epochs: warm-up, cached, uncached, cached, uncached ...", flush=True)
    warmup = run_side(model, train_file, work / "warmup", "auto", 1)      # not recorded: see the docstring
    cached1 = run_side(model, train_file, work / "cached1", "auto", epochs)
    uncached = run_side(model, train_file, work / "uncached", False, epochs)
    cached2 = run_side(model, train_file, work / "cached2", "auto", epochs)
    uncached2 = run_side(model, train_file, work / "uncached2", False, epochs)
    print(f"[{NAME}] the same with the default per-epoch evaluation: cached, uncached, cached, uncached ...",
          flush=True)
    e_cached1 = run_side(model, train_file, work / "e_cached1", "auto", epochs, evaluate=True)
    e_uncached = run_side(model, train_file, work / "e_uncached", False, epochs, evaluate=True)
    e_cached2 = run_side(model, train_file, work / "e_cached2", "auto", epochs, evaluate=True)
    e_uncached2 = run_side(model, train_file, work / "e_uncached2", False, epochs, evaluate=True)
    mean = lambda a, b: (a["train_seconds"] + b["train_seconds"]) / 2  # noqa: E731
    cached_s, uncached_s = mean(cached1, cached2), mean(uncached, uncached2)
    e_cached_s, e_uncached_s = mean(e_cached1, e_cached2), mean(e_uncached, e_uncached2)
    speedup, e_speedup = uncached_s / cached_s, e_uncached_s / e_cached_s
    acc_diff = max(abs(uncached["accuracy"] - cached1["accuracy"]), abs(e_uncached["accuracy"] - e_cached1["accuracy"]))
    result = {
        "title": TITLE,
        "setup": {"model": model, "intents": n_intents, "rows_per_intent": per_intent, "epochs": epochs,
                  "rows": len(rows), "torch_threads": threads},
        "uncached": uncached, "uncached_repeat": uncached2, "cached": cached1, "cached_repeat": cached2,
        "with_eval": {"uncached": e_uncached, "uncached_repeat": e_uncached2, "cached": e_cached1,
                      "cached_repeat": e_cached2},
        "warmup_seconds": warmup["train_seconds"],
        "cached_feature_seconds_mean": round((cached1["feature_seconds"] + cached2["feature_seconds"]) / 2, 3),
        "speedup_training_only": round(speedup, 2), "speedup": round(e_speedup, 2),
        "accuracy_difference": round(acc_diff, 4),
        "auto_resolved_on": all(bool(r["cache_features"]) for r in (cached1, cached2, e_cached1, e_cached2)),
        "load_average_end": C.load_average(),
    }
    # The target is judged on the run a user gets (per-epoch evaluation, train()'s default); the
    # training-only ratio is shown beside it.
    result["met"] = {"speedup": e_speedup >= 5, "accuracy": acc_diff <= 0.02, "auto": result["auto_resolved_on"]}
    result["summary"] = [
        {"what": "head-only 10 epochs with the default per-epoch evaluation, re-run encoder / cached features",
         "value": f"{e_uncached_s:.1f}s / {e_cached_s:.2f}s = {e_speedup:.1f}x (mean of 2 each, interleaved, "
                  f"after a warm-up)",
         "target": ">= 5x",
         "met": result["met"]["speedup"]},
        {"what": "the same, training only (evaluation off on both sides)",
         "value": f"{uncached_s:.1f}s / {cached_s:.2f}s = {speedup:.1f}x (the feature pass, validation rows "
                  f"included, is {result['cached_feature_seconds_mean']:.2f}s of the cached time)",
         "target": "", "met": None},
        {"what": "accuracy uncached / cached", "value": f"{uncached['accuracy']:.3f} / {cached1['accuracy']:.3f}"
                                                      f" (with evaluation: {e_uncached['accuracy']:.3f} / "
                                                      f"{e_cached1['accuracy']:.3f})",
         "target": "within 0.02", "met": result["met"]["accuracy"]},
        {"what": "cache_features: auto turns it on", "value": str(result["auto_resolved_on"]).lower(),
         "target": "true", "met": result["met"]["auto"]},
    ]
    C.write_result(NAME, result, quick, out_dir)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
