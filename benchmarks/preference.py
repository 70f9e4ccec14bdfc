"""Issue 14: a LoRA DPO run against LoRA instruction tuning on the same rows, time and peak memory;
then a second, short DPO run on the same pairs, whose reference pass comes from the base-model cache.

    python -m benchmarks.run --only preference            # ~7 minutes on 2 CPU cores
    python -m benchmarks.preference --quick               # 12 pairs, 2 optimizer steps each

The rows: examples/data/preference_pairs.jsonl (103 pairs). Instruction tuning trains on
prompt -> chosen (prompt/completion), the preference run on prompt / chosen / rejected, both with the
bundled SmolLM2, LoRA, one epoch, the same validation split (val_size 0.2, seed 42), every other
setting each task's default (examples/configs/preference_lora.yaml's values are the preference
defaults). Each run is `python -m finetune_core train` in its own process, one after the other, so
metrics.json's peak_rss_mb is that run's alone. Reported: training-loop seconds (train_seconds) and
peak RSS of each, their ratios (targets: at most 2.5x the time, 1.3x the memory), the DPO run's
reference pass (computed once before its loop) in seconds, and both runs' held-out results. The third
run (beta 0.3, 4 steps, same FINETUNE_HOME) reports how long it waited before its loop: its reference
log-probabilities are the first DPO run's, read from the cache.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from . import common as C

NAME = "preference"
TITLE = "Preference tuning: LoRA DPO vs LoRA instruction tuning on the same rows (SmolLM2)"
PAIRS = C.REPO / "examples" / "data" / "preference_pairs.jsonl"


def one_run(cfg: dict, work: Path, timeout: float = 3600) -> dict:
    """`python -m finetune_core train` on cfg in its own process, with FINETUNE_HOME=work/home (empty at
    the start of the benchmark, shared by its runs: the base-model cache holds only what they wrote)."""
    import os

    from finetune_core.events import read_all_events
    from finetune_core.models import model_cache_dir

    path = work / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    # The converted bundled model stays where it is (a fresh FINETUNE_HOME would convert it again).
    env = {**os.environ, "FINETUNE_HOME": str(work / "home"), "FINETUNE_MODEL_CACHE": str(model_cache_dir())}
    t0 = time.time()
    proc = subprocess.run([C.python(), "-m", "finetune_core", "train", str(path)], cwd=C.REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{cfg['task']} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    out = Path(cfg["output_dir"])
    m = json.loads((out / "metrics.json").read_text())
    events = read_all_events(out / "events.jsonl")
    start = next(e["time"] for e in events if e["type"] == "start")
    # The reference pass runs between "Preparing ..." and the next event (the step-0 evaluation's, or the
    # line saying the reference came from the cache).
    prepared_at = next((i for i, e in enumerate(events) if "Preparing" in str(e.get("message"))), None)
    prepared = events[prepared_at]["time"] if prepared_at is not None else None
    measuring = events[prepared_at + 1]["time"] if prepared_at is not None and prepared_at + 1 < len(events) else None
    end = next((e["time"] for e in reversed(events) if e["type"] == "end"), None)
    last_step = max((e["time"] for e in events if e["type"] in ("log", "step")), default=None)
    return {"train_seconds": round(m["train_seconds"], 2), "total_seconds": round(m["total_seconds"], 2),
            "process_wall_seconds": round(wall, 2), "peak_rss_mb": round(m["peak_rss_mb"]),
            "global_step": m["global_step"], "train_samples": m["train_samples"],
            "reference_pass_seconds": round(measuring - prepared, 2) if prepared and measuring else None,
            "seconds_before_loop": round(start - events[0]["time"], 2),
            "seconds_after_loop": round(end - last_step, 2) if end and last_step else None,
            **{k: m.get(k) for k in ("reference_cache", "base_cache", "eval_loss_before", "eval_loss",
                                     "reward_accuracy_before", "reward_accuracy", "reward_margin",
                                     "general_perplexity_before", "general_perplexity")}}


def run(quick: bool = False, out_dir: Path | None = None, model: str = C.SMOLLM2) -> dict:
    C.quiet_env()
    work = C.scratch_dir(NAME)
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if quick:
        rows = rows[:15]
    pairs = C.write_jsonl(work / "pairs.jsonl", rows)
    sft = C.write_jsonl(work / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    training = {"num_train_epochs": 1, **({"max_steps": 2} if quick else {})}
    common = {"model": model, "strategy": {"name": "lora"}, "seed": 42, "training": training}
    load = C.load_average()
    print(f"[{NAME}] LoRA instruction tuning on {len(rows)} prompt -> chosen rows ...", flush=True)
    instruction = one_run({**common, "task": "instruction", "output_dir": str(work / "instruction"),
                           "data": {"train": sft, "val_size": 0.2, "max_length": 256}}, work)
    print(f"[{NAME}] LoRA DPO on the same {len(rows)} pairs ...", flush=True)
    preference = one_run({**common, "task": "preference", "output_dir": str(work / "preference"),
                          "data": {"train": pairs, "val_size": 0.2, "max_length": 256}}, work)
    again_steps = 2 if quick else 4
    print(f"[{NAME}] LoRA DPO again on the same pairs, beta 0.3, {again_steps} steps ...", flush=True)
    again = one_run({**common, "task": "preference", "output_dir": str(work / "preference_again"),
                     "training": {**training, "beta": 0.3, "max_steps": again_steps},
                     "data": {"train": pairs, "val_size": 0.2, "max_length": 256}}, work)
    time_ratio = preference["train_seconds"] / instruction["train_seconds"]
    memory_ratio = preference["peak_rss_mb"] / instruction["peak_rss_mb"]
    with_reference = (preference["train_seconds"] + (preference["reference_pass_seconds"] or 0)) / \
        instruction["train_seconds"]
    result = {"title": TITLE, "setup": {"model": model, "rows": len(rows), "epochs": 1, "quick": quick,
                                        "load_average_start": load},
              "instruction": instruction, "preference": preference, "preference_again": again,
              "ratios": {"time": round(time_ratio, 2), "time_with_reference_pass": round(with_reference, 2),
                         "memory": round(memory_ratio, 2)},
              "targets": {"time": "<= 2.5", "memory": "<= 1.3"},
              "met": {"time": time_ratio <= 2.5, "memory": memory_ratio <= 1.3}}
    result["summary"] = [
        {"what": "training loop, LoRA DPO / LoRA instruction tuning (same rows, 1 epoch)",
         "value": f"{preference['train_seconds']:.0f}s / {instruction['train_seconds']:.0f}s = {time_ratio:.2f}x "
                  f"({with_reference:.2f}x with the one-off reference pass, "
                  f"{preference['reference_pass_seconds']}s)", "target": "<= 2.5x", "met": result["met"]["time"]},
        {"what": "peak RSS, LoRA DPO / LoRA instruction tuning",
         "value": f"{preference['peak_rss_mb']} / {instruction['peak_rss_mb']} MB = {memory_ratio:.2f}x",
         "target": "<= 1.3x", "met": result["met"]["memory"]},
        {"what": f"a second DPO run on the same pairs (beta 0.3, {again_steps} steps): seconds before its loop, "
                 "first run / second (reference log-probabilities from the base-model cache)",
         "value": f"{preference['seconds_before_loop']:.0f}s / {again['seconds_before_loop']:.0f}s (reference pass "
                  f"{preference['reference_pass_seconds']}s / {again['reference_pass_seconds']}s; reference_cache "
                  f"{preference['reference_cache']} / {again['reference_cache']})", "target": "", "met": None},
        {"what": "held-out pairs after 1 epoch: DPO loss, reward accuracy",
         "value": f"{preference['eval_loss_before']:.3f} -> {preference['eval_loss']:.3f}, "
                  f"{preference['reward_accuracy_before']:.2f} -> {preference['reward_accuracy']:.2f}",
         "target": "", "met": None},
    ]
    C.write_result(NAME, result, quick, out_dir)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
