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
