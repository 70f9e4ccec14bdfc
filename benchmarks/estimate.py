"""Issue 15, item 4: `python -m finetune_core estimate` against the run it predicts.

For each case, back to back: the estimate (`python -m finetune_core estimate CONFIG --json`, its own
process, as the app runs it), then the real run (`python -m finetune_core train CONFIG`, its own process,
so metrics.json's peak_rss_mb is the run's alone). Reported: estimate / measured for `train_seconds` and
`peak_rss_mb`.

Cases: every example config in examples/configs/ as it is, and two on data the examples never show:
a BANKING77 slice (12 intents x 25 rows, full fine-tuning of MiniLM) and the first 40 Self-Instruct
seed tasks (LoRA on SmolLM2, alpaca template, max_length 256), both from ../shared/datasets.

The estimate predicts the full schedule; early stopping can end a run sooner. When it does, the time
ratio is also given at the run's own stopping point (the estimate's `seconds_at_evaluations` entry for
the step where it stopped): that is the figure the target is judged on, the full-schedule ratio is shown
beside it. Timings are only as good as the machine is quiet: each JSON records the load average before
the estimate and before the run.

    python -m benchmarks.run --only estimate            # all cases (~15 minutes on 2 quiet cores)
    python -m benchmarks.run --only estimate --quick    # two short cases (4 steps each)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from . import common as C

NAME = "estimate"
TITLE = "Estimate before Start: predicted / measured training time and peak memory"
CONFIGS = C.REPO / "examples" / "configs"
TIME_BAND, MEMORY_BAND = 0.35, 0.25


def unseen_cases(work: Path) -> dict[str, dict]:
    """Configs on data the examples never show (written into `work`)."""
    import pandas as pd

    from .cached_features import banking_subset

    bank = work / "banking77_slice.csv"
    pd.DataFrame(banking_subset(12, 25)).to_csv(bank, index=False)
    rows = C.self_instruct_rows()[:40]
    instruct = C.write_jsonl(work / "self_instruct_40.jsonl", rows)
    return {
        "banking77_slice_full": {"task": "classification", "model": C.MINILM,
                                 "data": {"train": str(bank), "text_column": "text", "label_column": "category",
                                          "max_length": 64},
                                 "strategy": {"name": "full"}, "seed": 42},
        "self_instruct_40_lora": {"task": "instruction", "model": C.SMOLLM2,
                                  "data": {"train": instruct, "template": "alpaca", "max_length": 256},
                                  "strategy": {"name": "lora"}, "seed": 42},
    }


def cases(work: Path, quick: bool) -> dict[str, Path]:
    """{case name: config file}: the example configs, then the unseen-data ones (quick: two short ones)."""
    out = {p.stem: p for p in sorted(CONFIGS.glob("*.yaml"))}
    if quick:
        return {"classification_lora": out["classification_lora"], "instruction_lora": out["instruction_lora"]}
    for name, cfg in unseen_cases(work).items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        out[name] = path
    return out


def _cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([C.python(), "-m", "finetune_core", *args], cwd=C.REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"finetune_core {' '.join(args)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def measure_case(config: Path, out_dir: Path, sets: list[str] = (), timeout: float = 3600) -> dict:
    """Estimate, then train, `config` (each its own process); the ratios of the two."""
    sets = [a for s in [f"output_dir={out_dir}", *sets] for a in ("--set", s)]
    load_estimate = C.load_average()
    t0 = time.perf_counter()
    est = json.loads(_cli(["estimate", str(config), "--json", *sets], timeout).stdout)
    estimate_wall = time.perf_counter() - t0
    load_run = C.load_average()
    _cli(["train", str(config), *sets], timeout)
    m = json.loads((out_dir / "metrics.json").read_text())
    measured = {k: m.get(k) for k in ("train_seconds", "peak_rss_mb", "global_step", "max_steps", "epochs_completed",
                                      "stopped_early", "feature_seconds")}
    at_stop = est["train_seconds"]
    if m.get("stopped_early"):
        at_stop = next((s for step, s in est["seconds_at_evaluations"] if step == m["global_step"]), at_stop)
    return {"estimate": est, "measured": measured, "estimate_wall_seconds": round(estimate_wall, 1),
            "load_average": {"estimate": load_estimate, "run": load_run},
            "time_ratio": round(at_stop / m["train_seconds"], 3),
            "time_ratio_full_schedule": round(est["train_seconds"] / m["train_seconds"], 3),
            "estimate_at_stop_seconds": round(at_stop, 1),
            "memory_ratio": round(est["peak_rss_mb"] / m["peak_rss_mb"], 3)}


def within(ratio: float, band: float) -> bool:
    return 1 - band <= ratio <= 1 + band


def summary_row(name: str, r: dict) -> dict:
    m, e = r["measured"], r["estimate"]
    early = (f", stopped early at step {m['global_step']} of {m['max_steps']}: full schedule "
             f"{r['time_ratio_full_schedule']:.2f}x" if m.get("stopped_early") else "")
    met = within(r["time_ratio"], TIME_BAND) and within(r["memory_ratio"], MEMORY_BAND)
    return {"what": f"{name}: estimate / measured, time · peak memory",
            "value": (f"time {r['time_ratio']:.2f}x ({r['estimate_at_stop_seconds']:.0f}s / "
                      f"{m['train_seconds']:.0f}s{early}) · memory {r['memory_ratio']:.2f}x "
                      f"({e['peak_rss_mb']:.0f} / {m['peak_rss_mb']:.0f} MB) · estimate took "
                      f"{r['estimate_wall_seconds']:.0f}s"),
            "target": f"time within {TIME_BAND:.0%}, memory within {MEMORY_BAND:.0%}", "met": met}


def run(quick: bool = False, out_dir: Path | None = None) -> dict:
    C.quiet_env()
    work = C.scratch_dir(NAME)
    sets = ["training.max_steps=4"] if quick else []
    results = {}
    for name, config in cases(work, quick).items():
        print(f"[{NAME}] {name}: estimate, then the run ...", flush=True)
        results[name] = measure_case(config, work / name, sets)
        r = results[name]
        print(f"[{NAME}] {name}: time {r['time_ratio']:.2f}x, memory {r['memory_ratio']:.2f}x", flush=True)
    result = {"title": TITLE, "cases": results,
              "note": "estimate and run back to back, each in its own process; the machine was shared with other "
                      "jobs while measuring (load averages per case), which inflates and scatters timings"}
    result["summary"] = [summary_row(name, r) for name, r in results.items()]
    result["met"] = {name: row["met"] for name, row in zip(results, result["summary"])}
    C.write_result(NAME, result, quick, out_dir)
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2, default=str))
