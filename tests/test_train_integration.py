"""train() end to end: tiny random models for every strategy and task (seconds each), then one short
real run per task on the bundled models (marked slow).

What a run must leave behind (DESIGN.md): run.yaml, events.jsonl, audit.json, metrics.json with every
listed key, model/ that loads with the usual Hugging Face entry points, predictions.csv or
generations.jsonl.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import EXAMPLES, FAST_TRAINING, class_rows, instruction_rows, write_csv, write_jsonl
from finetune_core.config import config_from_dict
from finetune_core.errors import ConfigError, FinetuneError
from finetune_core.events import read_all_events
from finetune_core.train import train

COMMON_KEYS = {"task", "strategy", "model", "trainable_params", "total_params", "train_seconds", "total_seconds",
               "train_samples", "peak_rss_mb", "stopped_early"}
CLASSIFICATION_KEYS = {"accuracy", "f1_weighted", "f1_macro", "labels", "per_class", "confusion_matrix", "baselines",
                       "ece", "mean_confidence_correct", "calibration"}
INSTRUCTION_KEYS = {"eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "general_perplexity_before",
                    "general_perplexity"}
EVAL_EVERY_2 = {**FAST_TRAINING, "max_steps": 4, "eval_strategy": "steps", "eval_steps": 2}


def run(out: Path, task: str, model: str, train_file: str, strategy: dict, training: dict | None = None,
        **data) -> tuple[dict, str]:
    """train() with captured stdout; returns (metrics, printed text)."""
    values = {"task": task, "model": model, "data": {"train": train_file, "max_length": 64, **data},
              "strategy": strategy, "training": training or FAST_TRAINING, "output_dir": str(out), "seed": 1}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        metrics = train(config_from_dict(values))
    return metrics, buf.getvalue()


def check_outputs(out: Path, metrics: dict, task: str) -> list[dict]:
    for name in ("run.yaml", "events.jsonl", "audit.json", "metrics.json", "model/README.md"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    keys = COMMON_KEYS | (CLASSIFICATION_KEYS if task == "classification" else INSTRUCTION_KEYS)
    assert keys <= set(saved), f"missing in metrics.json: {keys - set(saved)}"
    assert isinstance(saved["stopped_early"], bool)
    assert saved["task"] == task and saved["train_samples"] > 0 and saved["peak_rss_mb"] > 0
    assert 0 < saved["trainable_params"] <= saved["total_params"]
    if task == "classification":
        assert (out / "predictions.csv").is_file()
        for b in ("majority", "tfidf_logreg"):
            assert set(saved["baselines"][b]) >= {"accuracy", "f1_weighted"}
    else:
        assert (out / "generations.jsonl").is_file()
    assert not (out / "checkpoints").exists()          # a finished run drops optimizer state
    assert yaml.safe_load((out / "run.yaml").read_text())["task"] == task
    events = read_all_events(out / "events.jsonl")
    types = [e["type"] for e in events]
    assert types.count("start") == 1 and types[-1] == "end" and "error" not in types
    assert all("time" in e for e in events)
    logs = [e for e in events if e["type"] == "log"]
    assert logs and all({"step", "max_steps", "loss", "epoch"} <= set(e) for e in logs)
    return events


def trainable_line(printed: str, metrics: dict) -> None:
    t, n = metrics["trainable_params"], metrics["total_params"]
    assert f"Trainable: {t:,} / {n:,} ({100 * t / n:.2f}%)" in printed


# ---------------------------------------------------------------------------------------------
# classification on a tiny BERT


@pytest.fixture(scope="module")
def lora_cls(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("lora_cls")
    csv = write_csv(root / "train.csv", class_rows(8))
    metrics, printed = run(root / "run", "classification", tiny_bert_dir, csv, {"name": "lora"}, EVAL_EVERY_2)
    return root / "run", metrics, printed


def test_lora_classification_outputs(lora_cls):
    out, metrics, printed = lora_cls
    events = check_outputs(out, metrics, "classification")
    assert any(e["type"] == "eval" and "eval_loss" in e for e in events)
    trainable_line(printed, metrics)
    assert metrics["labels"] == ["food", "sport", "tech"]
    assert metrics["stopped_early"] is False and metrics["global_step"] == 4
    model_dir = out / "model"
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "adapter_model.safetensors").is_file()
    run_yaml = yaml.safe_load((out / "run.yaml").read_text())
    assert run_yaml["data"]["text_column"] == "text" and run_yaml["data"]["label_column"] == "label"


def test_lora_classification_reloads_with_auto_peft(lora_cls):
    """The saved adapter + head reproduce the run's own validation probabilities."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoTokenizer

    out, metrics, _ = lora_cls
    model_dir = str(out / "model")
    labels = AutoConfig.from_pretrained(model_dir).id2label
    assert sorted(labels.values()) == ["food", "sport", "tech"]
    model = AutoPeftModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels),
                                                                   id2label=labels).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    preds = pd.read_csv(out / "predictions.csv")
    with torch.no_grad():
        probs = torch.softmax(model(**tok(preds["text"].tolist(), padding=True, return_tensors="pt")).logits, -1)
    expected = preds[[f"p_{labels[i]}" for i in range(len(labels))]].to_numpy()
    assert probs.numpy() == pytest.approx(expected, abs=1e-4)


def test_full_classification_int_labels_validation_file_and_pipeline(tmp_path, tiny_bert_dir):
    from transformers import pipeline

    rows = [{"sentence": r["text"], "category": {"food": 0, "sport": 1, "tech": 2}[r["label"]]} for r in class_rows(8)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:18])
    val_file = write_jsonl(tmp_path / "val.jsonl", rows[18:])
    metrics, printed = run(tmp_path / "run", "classification", tiny_bert_dir, train_file, {"name": "full"},
                           validation=val_file)
    check_outputs(tmp_path / "run", metrics, "classification")
    trainable_line(printed, metrics)
    assert metrics["trainable_params"] == metrics["total_params"]
    assert metrics["labels"] == ["0", "1", "2"] and metrics["val_samples"] == 6
    classify = pipeline("text-classification", model=str(tmp_path / "run" / "model"), device="cpu")
    assert classify("the chef baked bread")[0]["label"] in {"0", "1", "2"}
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv")
    got = [r["label"] for r in classify(preds["text"].tolist())]
    assert got == preds["predicted_label"].astype(str).tolist()


def test_frozen_head_only_keeps_the_encoder_and_loads_with_pipeline(tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file
    from transformers import pipeline

    import finetune_core.heads  # noqa: F401 - registers the mean-pooling head with the Auto classes

    csv = write_csv(tmp_path / "train.csv", class_rows(8))
    metrics, printed = run(tmp_path / "run", "classification", tiny_bert_dir, csv, {"name": "frozen"}, EVAL_EVERY_2)
    check_outputs(tmp_path / "run", metrics, "classification")
    trainable_line(printed, metrics)
    assert metrics["cache_features"] is True and metrics["trainable_params"] == 2 * 32 + 32 * 3 + 3
    original = load_file(Path(tiny_bert_dir) / "model.safetensors")
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    encoder = {k: v for k, v in saved.items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(v, original[k[len("encoder."):]]) for k, v in encoder.items())
    classify = pipeline("text-classification", model=str(tmp_path / "run" / "model"), device="cpu")
    assert classify("the server crashed")[0]["label"] in {"food", "sport", "tech"}


@pytest.mark.parametrize("fixture", ["tiny_distilbert_dir", "tiny_gpt2_dir"])
def test_lora_classification_other_architectures(request, tmp_path, fixture):
    csv = write_csv(tmp_path / "train.csv", class_rows(6))
    metrics, _ = run(tmp_path / "run", "classification", request.getfixturevalue(fixture), csv, {"name": "lora"})
    check_outputs(tmp_path / "run", metrics, "classification")
    assert metrics["trainable_params"] < metrics["total_params"]


def test_audit_reports_overlap_of_the_split_actually_used(tmp_path, tiny_bert_dir):
    """Validation split from the training file: audit.json gives the overlap between the two parts
    (duplicates in the file that land on both sides), not nothing."""
    from finetune_core import data as D

    rows = class_rows(8) + [{"text": "the striker scored twice.", "label": "sport"}] * 8
    csv = write_csv(tmp_path / "train.csv", rows)
    training = {**FAST_TRAINING, "max_steps": 1}
    run(tmp_path / "run", "classification", tiny_bert_dir, csv, {"name": "full"}, training)
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    clean = D.clean_classification(pd.read_csv(csv), "text", "label")
    tr, va = D.split_frame(clean, 0.2, 1, stratify="label")
    expected = len(set(tr["text"]) & set(va["text"]))
    assert expected >= 1
    assert report["overlap_with_validation"] == expected and report["validation_rows"] == len(va)
    assert report["validation_source"].startswith("split from the training file")
    assert any("appear in both the training and the validation data" in w and "split from the training file" in w
               for w in report["warnings"])
    assert report["n_rows"] == len(rows)                   # the file itself is still audited whole

    clean_csv = write_csv(tmp_path / "clean.csv", class_rows(8))
    run(tmp_path / "run2", "classification", tiny_bert_dir, clean_csv, {"name": "full"}, training)
    report = json.loads((tmp_path / "run2" / "audit.json").read_text())
    assert report["overlap_with_validation"] == 0


def test_audit_reports_overlap_for_a_split_instruction_run(tmp_path, tiny_llama_dir):
    rows = instruction_rows(10) + [instruction_rows(1)[0]] * 6
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run(tmp_path / "run", "instruction", tiny_llama_dir, data, {"name": "lora"}, {**FAST_TRAINING, "max_steps": 1})
    report = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert report["overlap_with_validation"] >= 1 and report["validation_rows"] == 4


def test_unseen_validation_label_refused(tmp_path, tiny_bert_dir):
    train_file = write_csv(tmp_path / "train.csv", class_rows(4))
    val_file = write_csv(tmp_path / "val.csv", [{"text": "a poem", "label": "poetry"}, {"text": "x", "label": "food"}])
    with pytest.raises(FinetuneError, match="poetry"):
        run(tmp_path / "run", "classification", tiny_bert_dir, train_file, {"name": "full"}, validation=val_file)
    assert read_all_events(tmp_path / "run" / "events.jsonl")[-1]["type"] == "error"


def test_half_precision_on_cpu_refused_in_a_run(tmp_path, tiny_bert_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU accepts bf16")
    csv = write_csv(tmp_path / "train.csv", class_rows(4))
    with pytest.raises(ConfigError, match="bf16"):
        run(tmp_path / "run", "classification", tiny_bert_dir, csv, {"name": "full"}, {**FAST_TRAINING, "bf16": True})
    assert read_all_events(tmp_path / "run" / "events.jsonl")[-1]["type"] == "error"


# ---------------------------------------------------------------------------------------------
# instruction on a tiny Llama (SmolLM2's tokenizer and chat template)


@pytest.fixture(scope="module")
def lora_instr(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("lora_instr")
    rows = instruction_rows(12)
    rows.insert(3, {"instruction": "Summarise.", "input": " ".join(["word"] * 200), "output": "Too long."})
    rows.insert(6, {"instruction": "Say nothing.", "input": "", "output": "  "})     # blank response
    data = write_jsonl(root / "train.jsonl", rows)
    metrics, printed = run(root / "run", "instruction", tiny_llama_dir, data, {"name": "lora"}, EVAL_EVERY_2)
    return root / "run", metrics, printed


def test_lora_instruction_outputs(lora_instr):
    out, metrics, printed = lora_instr
    events = check_outputs(out, metrics, "instruction")
    assert any(e["type"] == "eval" and "eval_loss" in e for e in events)
    trainable_line(printed, metrics)
    assert metrics["template"] == "chat"
    for key in ("general_perplexity_change", "forgetting_verdict", "rougeL", "rougeL_before"):
        assert key in metrics
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert rows and all({"prompt", "reference", "after", "rougeL_after", "before"} <= set(r) for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)


def test_rows_cut_by_max_length_or_blank_are_dropped_and_counted(lora_instr):
    out, metrics, _ = lora_instr
    assert metrics["dropped_rows"] == 2
    assert metrics["dropped_rows_reasons"] == {"prompt_fills_max_length": 1, "empty_response": 1}
    events = read_all_events(out / "events.jsonl")
    dropped = [e["message"] for e in events if "rows dropped" in (e.get("message") or "")]
    assert len(dropped) == 1 and dropped[0].startswith("2 rows dropped")
    assert "fills max_length=64" in dropped[0] and "1 because their response is empty" in dropped[0]
    assert metrics["train_samples"] + metrics["val_samples"] == 12


def test_lora_instruction_reloads_with_auto_peft(lora_instr):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    out, _, _ = lora_instr
    model = AutoPeftModelForCausalLM.from_pretrained(str(out / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    enc = tok("Hello", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_frozen_instruction_keeps_early_blocks_and_loads_with_pipeline(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file
    from transformers import pipeline

    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(10))
    metrics, printed = run(tmp_path / "run", "instruction", tiny_llama_dir, data,
                           {"name": "frozen", "frozen_layers": 1}, template="alpaca")
    check_outputs(tmp_path / "run", metrics, "instruction")
    trainable_line(printed, metrics)
    assert metrics["template"] == "alpaca"
    original = load_file(Path(tiny_llama_dir) / "model.safetensors")
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    for name, tensor in original.items():
        if name.startswith(("model.embed_tokens.", "model.layers.0.")):
            assert torch.equal(saved[name], tensor), f"{name} should be frozen"
        elif name.startswith("model.layers.1.") and name.endswith("proj.weight"):
            assert not torch.equal(saved[name], tensor), f"{name} should have trained"
    generator = pipeline("text-generation", model=str(tmp_path / "run" / "model"), device="cpu")
    out = generator("### Instruction:\nSay hi.\n\n### Response:\n", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("### Instruction:")


def test_frozen_all_refused_for_instruction_in_a_run(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(6))
    with pytest.raises(ConfigError, match="no new head"):
        run(tmp_path / "run", "instruction", tiny_llama_dir, data, {"name": "frozen", "frozen_layers": "all"})


def test_encoder_refused_for_instruction(tmp_path, tiny_bert_dir):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(6))
    with pytest.raises(ConfigError, match="encoder"):
        run(tmp_path / "run", "instruction", tiny_bert_dir, data, {"name": "lora"})


# ---------------------------------------------------------------------------------------------
# real bundled models (one short run per task)


@pytest.fixture
def all_cores():
    """Real-size models train ~2x faster on both cores; tiny ones are faster on one (see conftest)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:  # noqa: BLE001
        cores = os.cpu_count() or 1
    old = torch.get_num_threads()
    torch.set_num_threads(cores)
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
def test_bundled_minilm_classification(tmp_path):
    out = tmp_path / "run"
    metrics, printed = run(out, "classification", "bundled:minilm-l6", str(EXAMPLES / "domains.csv"),
                           {"name": "full"}, {"num_train_epochs": 2, "save_strategy": "no", "eval_strategy": "epoch"},
                           max_length=64)
    events = check_outputs(out, metrics, "classification")
    assert sum(e["type"] == "eval" for e in events) == 2
    trainable_line(printed, metrics)
    assert metrics["labels"] == ["finance", "legal", "medical", "technology"] and metrics["val_samples"] == 32
    majority = metrics["baselines"]["majority"]["accuracy"]
    assert majority == pytest.approx(0.25)
    assert metrics["accuracy"] >= majority + 0.3, metrics["accuracy"]
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_bundled_smollm2_instruction(smollm2_lora_run):
    out, metrics, printed = smollm2_lora_run       # conftest: shared with the GGUF and export tests
    check_outputs(out, metrics, "instruction")
    trainable_line(printed, metrics)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["template"] == "chat" and metrics["general_perplexity_before"] > 1
    assert "forgetting_verdict" in metrics and "general_perplexity_change" in metrics
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["val_samples"] and all(0 <= r["rougeL_after"] <= 1 for r in rows)
    assert 0 <= metrics["rougeL"] <= 1
