"""`compare`: the same data with full, frozen and LoRA, each in its own process, one row each."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import random

import pandas as pd
import pytest
import yaml

from finetune_core.compare import compare, parse_strategies, plan_runs
from finetune_core.errors import ConfigError

WORDS = {
    "sport": "goal match team coach striker league referee season stadium penalty",
    "food": "recipe oven flour sauce garlic butter dinner chef spicy bake",
    "tech": "server code python cloud database laptop network kernel compiler api",
}


def tiny_csv(path, rows_per_label=10, seed=0):
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(words.split()) for _ in range(6)) + ".", "label": label}
            for label, words in WORDS.items() for _ in range(rows_per_label)]
    rng.shuffle(rows)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_config(path, values):
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def classification_values(tmp_path, model_dir, csv):
    return {"task": "classification", "model": str(model_dir),
            "data": {"train": str(csv), "val_size": 0.3, "max_length": 32},
            "strategy": {"name": "full"},
            "training": {"learning_rate": 3.0e-5, "per_device_train_batch_size": 8},
            "output_dir": str(tmp_path / "cmp"), "seed": 5}


# ---------------------------------------------------------------------------------------------
# planning (no training)


def test_parse_strategies():
    assert parse_strategies("full, lora,full") == ["full", "lora"]
    assert parse_strategies(None) == ["full", "frozen", "lora"]
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        parse_strategies("full,loar")
    with pytest.raises(ConfigError, match="No strategy"):
        parse_strategies(" , ")


def test_plan_learning_rate_and_output_dirs(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", classification_values(tmp_path, tmp_path / "m", tmp_path / "d.csv"))
    base, plans, notes = plan_runs(cfg, "full,frozen,lora", ["training.max_steps=2"])
    by = {p["strategy"]: p["values"] for p in plans}
    assert by["full"]["training"]["learning_rate"] == 3.0e-5          # the config's own strategy keeps it
    assert "learning_rate" not in by["frozen"]["training"] and "learning_rate" not in by["lora"]["training"]
    assert all(v["training"]["max_steps"] == 2 for v in by.values())  # --set applies to every run
    assert {s: v["output_dir"] for s, v in by.items()} == {s: str(tmp_path / "cmp" / s) for s in by}
    assert any("learning rate" in n and "`frozen`, `lora`" in n for n in notes)

    # an explicit --set learning rate is used by every strategy
    _, plans, notes = plan_runs(cfg, "full,lora", ["training.learning_rate=1e-4"])
    assert [p["values"]["training"]["learning_rate"] for p in plans] == [1e-4, 1e-4]
    assert any("applies to every strategy" in n for n in notes)


def test_plan_frozen_instruction_gets_numeric_layers(tmp_path):
    from transformers import LlamaConfig

    model_dir = tmp_path / "llama"
    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(model_dir)
    values = {"task": "instruction", "model": str(model_dir), "data": {"train": "x.jsonl"},
              "strategy": {"name": "lora", "frozen_layers": "all"}, "output_dir": str(tmp_path / "o")}
    _, plans, notes = plan_runs(values, ["frozen", "lora"])
    assert plans[0]["values"]["strategy"]["frozen_layers"] == 4       # 6 blocks, the last 2 learn
    assert any("first 4 of 6 blocks" in n for n in notes)
    values["strategy"]["frozen_layers"] = 3                            # a number is kept as given
    _, plans, notes = plan_runs(values, ["frozen"])
    assert plans[0]["values"]["strategy"]["frozen_layers"] == 3 and not any("blocks" in n for n in notes)


def test_plan_refuses_bad_config_before_training(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"task": "classification", "model": "m", "data": {"train": "x.csv"},
                                             "trainin": {}})
    with pytest.raises(ConfigError, match="Did you mean 'training'"):
        plan_runs(cfg, "full,lora")
    with pytest.raises(ConfigError, match="does not exist"):
        plan_runs(tmp_path / "missing.yaml", "full")


# ---------------------------------------------------------------------------------------------
# the real thing: three strategies, each trained in its own process


def test_compare_cli_three_strategies_rows_files_and_reading(tmp_path, tiny_bert_dir):
    """`python -m finetune_core compare CONFIG --strategies full,frozen,lora --set ...` as a user types it:
    one process per strategy, each row from that strategy's own metrics.json, the files and the reading."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    csv = tiny_csv(tmp_path / "data.csv")
    cfg = write_config(tmp_path / "c.yaml", classification_values(tmp_path, tiny_bert_dir, csv))
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "finetune_core", "compare", str(cfg),
                           "--strategies", "full,frozen,lora", "--set", "training.max_steps=2",
                           "--set", "training.eval_strategy=no", "--set", "training.save_strategy=no"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "cmp"
    saved = json.loads((out / "comparison.json").read_text())
    rows = saved["rows"]
    assert saved["strategies"] == [r["strategy"] for r in rows] == ["full", "frozen", "lora"]
    assert all(r["status"] == "ok" and r["error"] is None for r in rows), [r.get("error") for r in rows]
    for r in rows:
        run = out / r["strategy"]
        m = json.loads((run / "metrics.json").read_text())
        assert m["strategy"] == r["strategy"] and m["global_step"] == 2
        # real timings and per-process numbers, copied from that strategy's own metrics.json
        assert r["train_seconds"] == m["train_seconds"] > 0 and r["wall_seconds"] > r["train_seconds"]
        assert r["peak_rss_mb"] == m["peak_rss_mb"] > 50
        assert r["trainable_params"] == m["trainable_params"] > 0
        assert r["main_metric"] == "f1_weighted" and r["main_metric_value"] == m["f1_weighted"]
        assert r["main_metric_before"] == m["before_finetuning"]["f1_weighted"]
        assert r["forgetting_change"] is None           # encoders have no general-text probe,
        assert r["forgetting_verdict"] == "n/a (classification)"     # and the row says so
        assert (run / "predictions.csv").exists() and (run / "run.yaml").exists()
        assert yaml.safe_load((run / "run.yaml").read_text())["strategy"]["name"] == r["strategy"]
    by = {r["strategy"]: r for r in rows}
    assert by["frozen"]["trainable_params"] < by["lora"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["full"]["trainable_percent"] == pytest.approx(100.0)
    assert by["full"]["learning_rate"] == 3e-5 and by["full"]["learning_rate_source"] == "config"
    assert by["lora"]["learning_rate"] == 1e-3 and by["lora"]["learning_rate_source"] == "default"
    assert by["frozen"]["frozen_layers"] == "all"

    md = (out / "comparison.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| **")]
    assert len(table) == 3
    for r, line in zip(rows, table):
        assert line.startswith(f"| **{r['strategy']}") and f"| {r['train_seconds']:.1f} |" in line
    assert "LoRA reached F1" in md and "of the parameters in" in md
    assert "own default learning rate" in md and "TF-IDF" in md
    assert "- forgetting: n/a (classification)" in md and "None" not in md
    # the CLI prints each run's progress, then the same table and reading it wrote
    assert all(f"[compare {i}/3]" in proc.stdout for i in (1, 2, 3))
    assert proc.stdout.count("[end]") == 3
    assert md in proc.stdout


def test_compare_reports_a_failed_strategy_and_keeps_going(tmp_path, tiny_bert_dir):
    """A strategy that cannot run gets a row with its error; the others still run."""
    model_dir = tiny_bert_dir
    csv = tiny_csv(tmp_path / "data.csv")
    values = classification_values(tmp_path, model_dir, csv)
    values["strategy"] = {"name": "frozen", "frozen_layers": 9}        # the model has only 2 blocks
    result = compare(values, "frozen,full", ["training.max_steps=1", "training.eval_strategy=no",
                                             "training.save_strategy=no"])
    rows = {r["strategy"]: r for r in result["rows"]}
    assert rows["frozen"]["status"] == "failed" and "frozen_layers" in rows["frozen"]["error"]
    assert rows["full"]["status"] == "ok"
    assert "failed" in result["markdown"] and "Full fine-tuning reached" in result["markdown"]


def test_markdown_for_instruction_shows_forgetting_and_failures():
    from finetune_core.compare import render_markdown

    def row(s, loss, change, verdict, secs, trainable):
        return {"strategy": s, "name": {"full": "Full fine-tuning", "frozen": "Frozen backbone", "lora": "LoRA"}[s],
                "status": "ok", "error": None, "main_metric": "eval_loss", "main_metric_value": loss,
                "main_metric_before": 3.0, "eval_loss": loss, "rougeL": 0.3, "rougeL_before": 0.1,
                "train_seconds": secs, "total_seconds": secs + 5, "global_step": 10, "max_steps": 10,
                "trainable_params": trainable, "total_params": 1000, "trainable_percent": trainable / 10,
                "peak_rss_mb": 900.0, "forgetting_change": change, "forgetting_verdict": verdict,
                "learning_rate": 2e-4, "learning_rate_source": "default", "frozen_layers": 28 if s == "frozen" else None,
                "val_samples": 16, "device": "cpu"}

    rows = [row("full", 1.5, 0.35, "noticeable forgetting (+35% perplexity on general text): lower the learning "
                "rate, freeze early layers or use LoRA", 100.0, 1000),
            row("frozen", 2.0, 0.01, "small change: general language ability looks intact", 30.0, 70),
            {"strategy": "lora", "name": "LoRA", "status": "failed", "error": "out of memory | try less"}]
    md = render_markdown(rows, "instruction", {"model": "m", "seed": 1}, ["a note"], "c.yaml")
    assert "| **full** | 3.000 → **1.500** | 0.100 → 0.300 | 100.0 |" in md
    assert "+35.0% (noticeable forgetting)" in md and "+1.0% (small change)" in md
    assert "**frozen (28 layers)**" in md
    assert "| **lora** | failed: out of memory / try less |" in md        # a pipe in an error cannot break the table
    assert "Best validation loss: Full fine-tuning (1.500)" in md
    assert "Full fine-tuning lost general language ability" in md
    assert "Frozen backbone reached a validation loss of 2.000 with 7.00% of the parameters in 30.0 s" in md
    assert "- a note" in md
