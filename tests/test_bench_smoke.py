"""Smoke test of benchmarks/: every module imports and the helpers behind --quick work on a tiny model.

No timing is asserted (timings belong in `make bench`); this only keeps the benchmark code runnable.
The response-only loss equality is a correctness check, so it is asserted (on the tiny model).
"""

import json

import pytest

from conftest import REPO

DATASETS = (REPO.parent / "shared" / "datasets").resolve()
needs_datasets = pytest.mark.skipif(not (DATASETS / "self_instruct_seed_tasks.jsonl").exists(),
                                    reason="../shared/datasets is not next to the repository")


def test_every_benchmark_module_imports_and_has_run():
    import importlib

    from benchmarks import common, run

    assert common.datasets_dir() == DATASETS
    for name in run.BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(module.run) and module.NAME == name and module.TITLE


def test_table_and_results_roundtrip(tmp_path):
    from benchmarks import common, run

    path = common.write_result("instruction", {"summary": [{"what": "x", "value": "2.0x", "target": ">= 2.5x",
                                                           "met": False}]}, quick=True, out_dir=tmp_path)
    saved = json.loads(path.read_text())
    assert path.name == "instruction.quick.json" and saved["machine"]["cpu"] and saved["quick"] is True
    text = run.table({"instruction": saved})
    assert "| instruction | x | 2.0x | >= 2.5x | **no** |" in text
    assert "physical cores" in run.machine_line({"instruction": saved})
    assert common.matmul_peak(seconds=0.05, n=64) > 0


@needs_datasets
def test_instruction_helpers_on_tiny_llama(tmp_path, tiny_llama_dir):
    from benchmarks import common as C
    from benchmarks import instruction as I
    from finetune_core.models import load_tokenizer

    train_rows, val_rows = I.split_rows(C.self_instruct_rows(), 6, 3)
    tok = load_tokenizer(tiny_llama_dir)
    tokenized = [I.article_tokenize(tok, ex, 64) for ex in I.article_examples(train_rows)]
    stats = I.article_token_stats(tokenized)
    assert stats["positions"] == 6 * 64 and 0 < stats["real_tokens"] <= stats["positions"]
    assert 0 <= stats["loss_padding_share"] < 1

    art = I.run_article(tiny_llama_dir, train_rows, tmp_path / "article", max_length=64, max_steps=1)
    batches = I.val_batches(tok, val_rows, 64)
    loss, n = I.response_val_loss(art["model"], batches)
    assert art["train_seconds"] > 0 and loss == loss and n > 0

    from finetune_core import data as D

    ids = I.train_ids(tiny_llama_dir, train_rows, 64)
    collate = D.CausalCollator(tok.pad_token_id)
    feats = [{"input_ids": i, "labels": [-100] + i[1:]} for i in ids]
    with I.count_training_batches(ids) as stats:
        collate(feats[:4])
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])   # not a training row: not counted
    assert stats["batches"] == 1 and stats["real_tokens"] == sum(len(i) for i in ids[:4])
    assert stats["positions"] == 4 * max(len(i) for i in ids[:4]) and 0 <= stats["padding_share"] < 1
    cfg = I.our_config("bundled:smollm2-135m", "t.jsonl", "v.jsonl", tmp_path)
    assert cfg["training"]["learning_rate"] == 2e-5 and cfg["strategy"] == {"name": "full"}
    assert I.mfu(100, 10, 1.0, 6.0) == {"achieved_gflops": 0.0, "mfu": 0.0}


@needs_datasets
def test_response_only_loss_equals_standard_loss(tmp_path, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import loss_head as L

    batches = L.training_batches(tiny_llama_dir, 8, 64, batch=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trainer = L.make_trainer(model, tmp_path)
    assert trainer.response_only
    eq = L.check_equal(model, trainer, batches)
    assert eq["max_abs_loss_diff"] <= 1e-5 and eq["max_abs_loss_diff_num_items"] <= 1e-5
    assert eq["grad_rel_diff"] <= 1e-4
    assert abs(eq["float64_head"]["response_only"]) <= 1e-5 and abs(eq["float64_head"]["standard"]) <= 1e-5
    assert set(L.time_paths(model, trainer, batches[:1], 1)) == {"standard", "response_only"}


@needs_datasets
def test_ideas_helpers_on_tiny_llama(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import ideas

    tok, rows = ideas.sample_rows(tiny_llama_dir, 8, 64)
    rows = ideas.middle_rows(rows, 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    padded = ideas.make_batches(tok, rows, 1, True, pad_to=64)
    grouped = ideas.make_batches(tok, rows, 2, grouped=True)
    assert len(padded) == 4 and padded[0]["input_ids"].shape == (1, 64)
    assert [int(b["input_ids"].shape[1]) for b in grouped] == sorted(int(b["input_ids"].shape[1]) for b in grouped)
    assert ideas.fwd_bwd(model, grouped, True) > 0 and ideas.fwd_bwd(model, padded, False) > 0
    assert ideas.optimizer_step_seconds(model, repeats=1) > 0


@needs_datasets
def test_cached_features_subset_and_configs(tmp_path):
    from benchmarks import cached_features as CF
    from finetune_core.config import config_from_dict

    rows = CF.banking_subset(3, 4)
    assert len(rows) == 12 and len({r["category"] for r in rows}) == 3
    for cache in ("auto", False):
        cfg = config_from_dict(CF.config("bundled:minilm-l6", "x.csv", tmp_path, cache, 10))
        assert cfg.strategy.cache_features == cache and cfg.training["num_train_epochs"] == 10


def test_memory_training_phase_probe(tmp_path, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from benchmarks import memory
    from finetune_core.data import CausalCollator
    from finetune_core.trainer import FinetuneTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    with memory.training_phase_probe({}) as store:
        trainer = FinetuneTrainer(model=model, args=args, train_dataset=rows, data_collator=CausalCollator(0))
        trainer.train()
    assert FinetuneTrainer.train is Trainer.train      # restored
    assert store["rss_before_train_mb"] > 0
    assert store["train_peak_rss_mb"] is None or store["train_peak_rss_mb"] > 0
    assert memory._vm_kb("VmRSS") > 0


@needs_datasets
def test_app_latency_helpers_on_tiny_llama(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import app_latency as A
    from finetune_core.config import config_from_dict
    from finetune_core.models import load_tokenizer

    for cfg in A.event_configs(quick=True).values():
        config_from_dict({**cfg, "output_dir": "x"})
    tok = load_tokenizer(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    seconds, n, _ = A.bare_generate(model, tok, "alpaca", 4)
    total, first, _ = A.streamed_generate(model, tok, "alpaca", 4)
    assert seconds > 0 and 0 < n <= 4 and total >= first >= 0
    assert 1024 <= A.free_port() <= 65535


def test_app_latency_first_loss_through_the_job_manager(tmp_path, tiny_bert_dir):
    """The Train tab's path: a job with default training settings, polled until its first loss point."""
    from benchmarks import app_latency as A
    from conftest import class_rows, write_csv

    cfg = {"task": "classification", "model": tiny_bert_dir,
           "data": {"train": write_csv(tmp_path / "d.csv", class_rows(20)), "max_length": 32},
           "strategy": {"name": "lora"}}
    r = A.first_loss_latency(cfg, tmp_path / "work", timeout=300)
    assert 0 <= r["seconds_model_loaded_to_first_loss_written"] <= r["seconds_model_loaded_to_first_loss_seen"]
    assert r["first_loss_step"] >= 1 and r["max_steps"] > r["first_loss_step"]     # killed long before the end
    assert r["seconds_submit_to_model_loaded"] > 0 and r["poll_seconds"] > 0
    configs = A.event_configs(quick=False)
    assert all("training" not in c for c in configs.values())       # nothing forced: train()'s defaults


def test_padding_floor_is_the_best_rectangular_batching():
    import itertools

    from benchmarks.instruction import padding_floor

    lengths = [1, 2, 3, 10, 4, 9]
    best = 1.0
    for perm in itertools.permutations(lengths):
        groups = [perm[i:i + 2] for i in range(0, len(perm), 2)]
        best = min(best, 1 - sum(lengths) / sum(max(g) * len(g) for g in groups))
    assert padding_floor(lengths, 2) == pytest.approx(best)
    assert padding_floor([5, 5, 5, 5], 2) == 0.0


def test_time_to_result_phases_from_events():
    """Phases from a run's events as the app reads them: the `phase` field, the legacy "finishing"
    (saving) and mid-run "evaluating" (checkpoint) names, the loop resuming after a mid-run evaluation
    that saved nothing."""
    from benchmarks import time_to_result as T
    from finetune_core.config import config_from_dict

    events = [{"type": "info", "time": 0.0, "phase": "loading"},
              {"type": "start", "time": 2.0, "phase": "training"},
              {"type": "log", "time": 5.0, "step": 1},
              {"type": "info", "time": 10.0, "phase": "evaluating", "step": 2},     # mid-run: checkpoint
              {"type": "eval", "time": 13.0, "step": 2},
              {"type": "log", "time": 14.0, "step": 3},                            # the loop goes on
              {"type": "info", "time": 20.0, "phase": "finishing", "step": 4},
              {"type": "info", "time": 21.0, "phase": "saving"},
              {"type": "info", "time": 23.0, "phase": "evaluating", "done": 0},     # after training
              {"type": "info", "time": 26.0, "phase": "generating", "done": 0},
              {"type": "info", "time": 30.0, "phase": "baseline", "cached": True},
              {"type": "end", "time": 30.5, "phase": "done"}]
    p = T.phase_seconds(events)
    assert p == {"loading": 2.0, "training": 15.0, "checkpoint": 3.0, "saving": 3.0, "evaluating": 3.0,
                 "generating": 4.0, "baseline": 0.5, "whole_run": 30.5}
    cfg = T.run_config("bundled:smollm2-135m", "t.jsonl", "v.jsonl", REPO / "x", "lora")
    assert config_from_dict(cfg).strategy.name == "lora" and cfg["training"] == {"num_train_epochs": 1}
