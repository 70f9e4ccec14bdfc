"""The preference task (DPO on TRL's DPOTrainer): one short LoRA run on a tiny Llama, started through
the app's `train` endpoint with gradio_client and shared by the assertions; the pairs audit; bad
pairs files."""

import json
import math

import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import serve, write_jsonl
from finetune_core.audit import audit_file
from finetune_core.config import ConfigError, config_from_dict
from finetune_core.errors import DataError
from finetune_core.events import read_all_events
from finetune_core.train import train


def pairs(n: int) -> list[dict]:
    """A style the tiny model does not have: short answers chosen over long ones."""
    return [{"prompt": f"Question number {i}: what is {i} plus one?", "chosen": f"It is {i + 1}.",
             "rejected": f"Well, that depends on many things, but after a lot of thought it may be {i + 1}, or so."}
            for i in range(n)]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir):
    """The run goes through the app's public `train` endpoint with gradio_client (task=preference), so
    the app, its job queue and the worker process (the CLI's train) are covered by the same run."""
    import shutil

    from gradio_client import Client, handle_file

    from conftest import REPO
    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app

    work = tmp_path_factory.mktemp("pref")
    manager = JobManager(work / "runs", poll_interval=0.2, cwd=REPO)
    model = shutil.copytree(tiny_llama_dir, manager.runs_dir / "_models" / "tiny-llama")   # a folder the app may load
    data = write_jsonl(work / "pairs.jsonl", pairs(16))
    demo = build_app(manager)
    url = serve(demo)
    try:
        client = Client(url, verbose=False)
        run_id, _status, _loss, _metric, log, result = client.predict(
            data_file=handle_file(data), task="preference", model=str(model), strategy="lora", max_length=64,
            val_size=0.25, learning_rate=5e-3,
            overrides="max_steps=3\neval_strategy=no\nsave_strategy=no\nlogging_steps=1\nseed=1", api_name="/train")
    finally:
        demo.close()
        manager.shutdown(kill=True)
    assert result["status"] == "finished", log
    out = manager.run_dir(run_id)
    m = json.loads((out / "metrics.json").read_text())
    assert result["metrics"]["reward_accuracy"] == m["reward_accuracy"]      # the endpoint's result carries it
    return out, m


def test_metrics_before_and_after_on_held_out_pairs(lora_run):
    out, m = lora_run
    assert m["task"] == "preference" and m["strategy"] == "lora" and m["val_samples"] == 4
    assert m["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-4)    # policy == reference: no preference
    assert m["reward_accuracy_before"] == 0.0 and m["reward_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval_loss"] < m["eval_loss_before"] and m["reward_margin"] > 0 and m["reward_accuracy"] > 0.5
    assert {"general_perplexity_before", "general_perplexity", "forgetting_verdict", "train_seconds",
            "total_seconds", "peak_rss_mb"} <= set(m)
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and all({"prompt", "reference", "before", "after"} <= set(g) for g in gens)
    assert gens[0]["reference"].startswith("It is")                  # the chosen answer


def test_lora_trains_the_adapter_only_and_saves_no_reference_copy(lora_run, tiny_llama_dir):
    out, _ = lora_run
    files = sorted(p.name for p in (out / "model").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files and "ref" not in files
    weights = load_file(out / "model" / "adapter_model.safetensors")
    assert weights and all(".ref." not in k for k in weights)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())    # B starts at zero: it moved
    card = (out / "model" / "README.md").read_text()
    assert "reward_accuracy" in card and "pipeline_tag: text-generation" in card


def test_events_carry_the_rewards_from_step_0(lora_run):
    out, _ = lora_run
    evals = [e for e in read_all_events(out / "events.jsonl") if e["type"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/accuracies"] == 0.0       # the "before" evaluation
    assert evals[-1]["eval_rewards/margins"] > 0


def test_the_loaded_model_answers_after_training_as_it_would_have_before(lora_run, tiny_llama_dir, smol_tokenizer):
    """The "before" answers and general-text perplexity are measured after training (the first loss point
    comes sooner), on the model as loaded: the adapter switched off gives the base model's own answers."""
    from transformers import AutoModelForCausalLM

    from finetune_core.generate import generate_batch
    from finetune_core.tasks.instruction import MAX_NEW_TOKENS

    out, m = lora_run
    events = read_all_events(out / "events.jsonl")
    first_loss = next(i for i, e in enumerate(events) if e["type"] == "log" and "loss" in e)
    baseline = next(i for i, e in enumerate(events) if e.get("phase") == "baseline")
    assert first_loss < baseline
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    expected = generate_batch(base, smol_tokenizer, [g["prompt"] for g in gens], m["template"], MAX_NEW_TOKENS)
    assert [g["before"] for g in gens] == expected


def test_pairs_audit_names_each_problem(tmp_path):
    rows = pairs(3) + [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
                       {"prompt": "Empty?", "chosen": "", "rejected": "No."},
                       {"prompt": " ".join(["long"] * 80), "chosen": "a", "rejected": "b"}]
    rows.append(dict(rows[0]))
    report = audit_file(write_jsonl(tmp_path / "p.jsonl", rows), "preference", model=False)
    assert (report["identical_pairs"], report["empty_sides"], report["duplicate_pairs"]) == (1, 1, 1)
    text = " ".join(report["warnings"])
    assert "same chosen and rejected answer" in text and "empty prompt, chosen or rejected" in text
    assert "duplicate pair" in text and "Only 7 pairs" in text
    from finetune_core.config import DataConfig

    with_tok = audit_file(tmp_path / "p.jsonl", "preference", DataConfig(max_length=32))
    assert with_tok["prompt_tokens"]["n_truncated"] >= 1
    assert "max_length=32 tokens, leaving no room for the answers" in " ".join(with_tok["warnings"])


def test_a_pairs_file_without_rejected_answers_says_what_it_needs(tmp_path, tiny_llama_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}] * 6)
    cfg = config_from_dict({"task": "preference", "model": tiny_llama_dir, "data": {"train": bad},
                            "output_dir": str(tmp_path / "run")})
    with pytest.raises(DataError) as exc:
        train(cfg)
    assert "No 'rejected' column found in bad.jsonl" in exc.value.message
    assert "prompt, chosen and rejected" in exc.value.fix


def test_conversational_cells_and_dpo_options_are_read(tmp_path):
    from finetune_core.audit import preference_rows
    from finetune_core.data import detect_columns

    df = pd.DataFrame([{"prompt": [{"role": "user", "content": "Hi?"}],
                        "chosen": [{"role": "assistant", "content": "Hello."}],
                        "rejected": json.dumps([{"from": "gpt", "value": "Go away."}])}])
    assert preference_rows(df, detect_columns(df, "preference")) == [("Hi?", "Hello.", "Go away.")]
    cfg = config_from_dict({"task": "preference", "training": {"beta": 0.2, "precompute_ref_log_probs": False}})
    assert cfg.training["beta"] == 0.2
    with pytest.raises(ConfigError, match="Unknown training option 'training.beta'"):
        config_from_dict({"task": "instruction", "training": {"beta": 0.2}})


def _dpo_trainer(tiny_llama_dir, tmp_path, name: str, strategy: str = "lora", **training):
    """prepare_run + build_trainer of a preference run on pairs(16) (TRL's tokenizing and reference pass,
    the step-0 evaluation): (trainer, metrics, run)."""
    from finetune_core.events import EventWriter
    from finetune_core.train import prepare_run
    from finetune_core.trainer import EventsCallback

    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, pairs(16))
    max_length = training.pop("max_length", 64)
    cfg = config_from_dict({"task": "preference", "model": tiny_llama_dir, "strategy": {"name": strategy},
                            "data": {"train": str(data), "val_size": 0.25, "max_length": max_length},
                            "training": {"max_steps": 1, "logging_steps": 1, "seed": 1, **training},
                            "output_dir": str(tmp_path / name)})
    out = tmp_path / name
    out.mkdir()
    prepared = prepare_run(cfg, out, EventWriter(out / "events.jsonl", enabled=True), main=True)
    metrics: dict = {}
    callbacks = [EventsCallback(prepared.run.writer)]
    trainer = prepared.task.build_trainer(prepared.run, prepared.model, prepared.data, prepared.args, callbacks,
                                          metrics)
    return trainer, metrics, prepared.run


def _reference(trainer) -> list[list[float]]:
    return [list(d["ref_chosen_logps"]) + list(d["ref_rejected_logps"])
            for d in (trainer.train_dataset, trainer.eval_dataset)]


def test_the_reference_pass_runs_once_per_base_model_pairs_and_settings(tiny_llama_dir, tmp_path, monkeypatch):
    """TRL's reference log-probabilities depend only on the model as loaded and the tokenized pairs: a
    second run on the same pairs (another beta, another strategy) reads them from FINETUNE_HOME and
    gets the same numbers; another max_length, a damaged entry or another home computes them again.
    The step-0 evaluation (the policy is the reference there) is read back too when the DPO settings
    are the same."""
    from finetune_core.tasks import preference

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    passes, evaluations = [], []
    real = preference.DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(preference.DPOTrainer, "compute_ref_log_probs",
                        lambda self, *a, **k: passes.append(1) or real(self, *a, **k))
    real_evaluate = preference.PreferenceTrainer.evaluate
    monkeypatch.setattr(preference.PreferenceTrainer, "evaluate",
                        lambda *a, **k: evaluations.append(1) or real_evaluate(*a, **k))

    first, m1, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "first")
    n_batches = len(passes)
    assert n_batches > 0 and m1["reference_cache"] == "miss"
    assert m1["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-4)
    reference = _reference(first)

    second, m2, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "beta", beta=0.5)
    assert len(passes) == n_batches and m2["reference_cache"] == "hit"
    assert _reference(second) == reference                                   # the very numbers TRL computed
    assert second.train_dataset.features["ref_chosen_logps"] == first.train_dataset.features["ref_chosen_logps"]
    assert m2["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-4) and m2["reward_accuracy_before"] == 0.0
    events = read_all_events(tmp_path / "beta" / "events.jsonl")
    assert any(e.get("cached") and "Reference log-probabilities" in e.get("message", "") for e in events)

    assert len(evaluations) == 2                  # another beta: the step-0 evaluation is measured again

    # another strategy, the same DPO settings: no reference pass and no step-0 evaluation either; that
    # evaluation's numbers and its eval event at step 0 are the first run's
    full, m3, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "full", strategy="full")
    assert len(passes) == n_batches and m3["reference_cache"] == "hit" and _reference(full) == reference
    assert len(evaluations) == 2 and m3 == {**m1, "reference_cache": "hit"}
    step0 = [e for e in read_all_events(tmp_path / "full" / "events.jsonl") if e["type"] == "eval"]
    assert len(step0) == 1 and step0[0]["step"] == 0 and step0[0]["eval_rewards/accuracies"] == 0.0
    assert full.state.log_history[-1]["eval_loss"] == m1["eval_loss_before"]

    longer, m4, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "longer", max_length=48)
    assert len(passes) == 2 * n_batches and m4["reference_cache"] == "miss"

    for entry in (tmp_path / "home" / "base_cache").glob("*.json"):       # cut the references short
        saved = json.loads(entry.read_text())
        if "chosen" in saved:
            entry.write_text(json.dumps({**saved, "chosen": saved["chosen"][:1]}))
    again, m5, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "damaged")
    assert len(passes) == 3 * n_batches and m5["reference_cache"] == "miss" and _reference(again) == reference

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "other-home"))
    _, m6, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "other-home", precompute_ref_log_probs=False)
    assert len(passes) == 3 * n_batches and m6["reference_cache"] == "off"     # no pass before training at all

    (tmp_path / "a-file").write_text("not a folder")                 # a home that cannot be written
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "a-file"))
    unwritable, m7, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "unwritable")
    assert len(passes) == 4 * n_batches and m7["reference_cache"] == "off" and _reference(unwritable) == reference
    said = [e["message"] for e in read_all_events(tmp_path / "unwritable" / "events.jsonl")
            if "cache off" in e.get("message", "")]
    assert len(said) == 1 and m7["eval_loss_before"] == m1["eval_loss_before"]

    # Several processes: a rank that read an entry would skip the collectives another rank runs, so a
    # warm cache is neither read nor written there (the reference pass and step-0 evaluation run again).
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    entries, measured = sorted((tmp_path / "home" / "base_cache").glob("*.json")), len(evaluations)
    monkeypatch.setattr(preference.DPOConfig, "world_size", property(lambda self: 2))
    ranks, m8, _ = _dpo_trainer(tiny_llama_dir, tmp_path, "ranks")
    assert len(passes) == 5 * n_batches and m8["reference_cache"] == "off" and _reference(ranks) == reference
    assert len(evaluations) == measured + 1
    assert m8["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], abs=1e-6)
    assert sorted((tmp_path / "home" / "base_cache").glob("*.json")) == entries


def test_the_tuned_model_is_not_scored_again_on_the_held_out_pairs(tiny_llama_dir, tmp_path, monkeypatch):
    """The Trainer's evaluation at the last step scored the weights the model ends with: the run reports
    that evaluation instead of a second pass over the held-out pairs, and writes no last checkpoint."""
    from finetune_core.tasks import preference

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    trainer, metrics, run = _dpo_trainer(tiny_llama_dir, tmp_path, "run", eval_strategy="steps", eval_steps=1,
                                         save_strategy="steps", save_steps=1, learning_rate=5e-2,
                                         warmup_steps=0, lr_scheduler_type="constant")
    trainer.train()
    last = trainer.state.log_history[-2]                 # the step-1 evaluation, then the train summary
    assert last["step"] == 1 and "eval_rewards/accuracies" in last
    assert trainer.skipped_final_checkpoint and not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))
    scored = []
    real = preference.PreferenceTrainer.evaluate
    monkeypatch.setattr(preference.PreferenceTrainer, "evaluate", lambda *a, **k: scored.append(1) or real(*a, **k))
    data = preference.prepare(run, preference.D.load_frames(run.cfg))
    preference.evaluate(run, trainer, trainer.model, data, metrics)
    assert scored == [] and metrics["eval_loss"] == last["eval_loss"]
    assert metrics["reward_accuracy"] == last["eval_rewards/accuracies"]
    assert metrics["eval_loss"] != metrics["eval_loss_before"]
