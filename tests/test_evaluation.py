"""Evaluation people can trust: exact metrics, baselines on the model's own split, error analysis,
the forgetting verdict, and (end to end on tiny models) what train() writes to metrics.json."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from finetune_core.evaluation import (FORGETTING_THRESHOLD, baselines, classification_metrics, error_analysis,
                                      forgetting_report, general_text_paragraphs, softmax)

# ---------------------------------------------------------------------------------------------
# tiny offline models and data (shared by the end-to-end tests below)

WORDS = {
    "sport": "goal match team coach striker league referee season stadium penalty",
    "food": "recipe oven flour sauce garlic butter dinner chef spicy bake",
    "tech": "server code python cloud database laptop network kernel compiler api",
}


def tiny_classification_csv(path, rows_per_label=10, seed=0):
    rng = random.Random(seed)
    rows = []
    for label, words in WORDS.items():
        vocab = words.split()
        for _ in range(rows_per_label):
            rows.append({"text": " ".join(rng.choice(vocab) for _ in range(6)) + ".", "label": label})
    rng.shuffle(rows)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bert_dir):
    """One real classification run (full strategy, 2 steps) on the shared tiny BERT (tests/conftest.py)."""
    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    root = tmp_path_factory.mktemp("eval_run")
    model_dir = tiny_bert_dir
    csv = tiny_classification_csv(root / "data.csv")
    values = {"task": "classification", "model": str(model_dir),
              "data": {"train": str(csv), "val_size": 0.3, "max_length": 32},
              "strategy": {"name": "full"},
              "training": {"max_steps": 2, "per_device_train_batch_size": 8, "eval_strategy": "no",
                           "save_strategy": "no", "logging_steps": 1},
              "output_dir": str(root / "run"), "seed": 7}
    metrics = train(config_from_dict(values))
    return {"values": values, "metrics": metrics, "out": root / "run"}


# ---------------------------------------------------------------------------------------------
# classification metrics: exact on a hand-made example


def test_classification_metrics_exact():
    names = ["a", "b", "c", "d"]            # "d" never occurs: it must still have a row and a column
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y_true, y_pred, names)
    assert m["labels"] == names
    assert m["confusion_matrix"] == [[1, 1, 0, 0],
                                     [0, 2, 0, 0],
                                     [1, 0, 1, 0],
                                     [0, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    assert pc["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert pc["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert all(isinstance(v["support"], int) for v in pc.values())
    f1s = [0.5, 0.8, 2 / 3]
    assert m["f1_weighted"] == pytest.approx(sum(f * 2 for f in f1s) / 6)     # support-weighted, d has 0
    assert m["f1_macro"] == pytest.approx((sum(f1s) + 0.0) / 4)               # unweighted over all labels
    json.dumps(m)                                                              # plain JSON types


def test_checkpoint_selection_prefers_f1_then_the_lower_loss():
    """The best checkpoint of a classifier: a higher weighted F1 always wins; at equal F1 the more
    confident one (lower validation loss) wins, so a run that reaches F1 1.0 early does not keep its
    barely trained first checkpoint."""
    import torch

    from finetune_core.evaluation import SELECTION_METRIC, compute_metrics_fn, cross_entropy

    labels = np.array([0, 1, 2, 0, 1, 2])
    timid = np.eye(3)[labels] * 0.4                     # right, at ~40% probability
    sure = np.eye(3)[labels] * 4.0                      # right, at ~96%
    wrong_once = sure.copy()
    wrong_once[0] = [0.0, 4.0, 0.0]                      # one row wrong, the others confident
    assert cross_entropy(sure, labels) == pytest.approx(
        torch.nn.functional.cross_entropy(torch.tensor(sure), torch.tensor(labels)).item(), rel=1e-9)
    timid_m, sure_m, wrong_m = (compute_metrics_fn((x, labels)) for x in (timid, sure, wrong_once))
    assert timid_m["f1_weighted"] == sure_m["f1_weighted"] == 1.0
    assert sure_m[SELECTION_METRIC] > timid_m[SELECTION_METRIC] > wrong_m[SELECTION_METRIC]
    assert abs(sure_m[SELECTION_METRIC] - 1.0) < 1e-6           # still reads as the F1 it selects on
    huge = np.eye(3)[(labels + 1) % 3] * 1e4                     # every row wrong with a huge loss: no overflow
    assert math.isfinite(compute_metrics_fn((huge, labels))[SELECTION_METRIC])
    # the Trainer is told to choose and early-stop on it, and it never reaches the log or the charts
    from finetune_core.config import training_defaults
    from finetune_core.events import eval_scores

    assert training_defaults("classification", "encoder", "lora", 100, cuda=False)["metric_for_best_model"] == \
        SELECTION_METRIC
    assert set(eval_scores({"eval_" + k: v for k, v in sure_m.items()})) == {"accuracy", "f1_weighted", "f1_macro"}


def test_softmax_rows_sum_to_one_and_are_stable():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]]))
    assert np.allclose(p.sum(-1), 1.0)
    assert np.allclose(p[0], [0.5, 0.5])
    assert np.allclose(p[1], [0.25, 0.75])


# ---------------------------------------------------------------------------------------------
# error analysis on arrays


def test_error_analysis_sorted_by_confidence_and_pairs_counted():
    names = ["cat", "dog", "fox"]
    texts = [f"t{i}" for i in range(7)]
    y_true = [0, 0, 1, 1, 2, 2, 0]
    y_pred = [0, 1, 0, 0, 0, 2, 1]
    probs = np.array([
        [0.9, 0.05, 0.05],   # right
        [0.3, 0.6, 0.1],     # cat->dog 0.6
        [0.8, 0.1, 0.1],     # dog->cat 0.8
        [0.5, 0.4, 0.1],     # dog->cat 0.5
        [0.95, 0.0, 0.05],   # fox->cat 0.95
        [0.1, 0.1, 0.8],     # right
        [0.2, 0.7, 0.1],     # cat->dog 0.7
    ])
    ea = error_analysis(texts, y_true, y_pred, probs, names)
    assert ea["n_errors"] == 5
    confs = [e["confidence"] for e in ea["misclassified"]]
    assert confs == sorted(confs, reverse=True) == [0.95, 0.8, 0.7, 0.6, 0.5]
    first = ea["misclassified"][0]
    assert first == {"index": 4, "text": "t4", "true": "fox", "predicted": "cat", "confidence": 0.95,
                     "true_label_probability": 0.05}
    pairs = {(p["true"], p["predicted"]): p["count"] for p in ea["confused_pairs"]}
    assert pairs == {("cat", "dog"): 2, ("dog", "cat"): 2, ("fox", "cat"): 1}
    counts = [p["count"] for p in ea["confused_pairs"]]
    assert counts == sorted(counts, reverse=True)
    # `top` caps the list of examples, not the error count
    small = error_analysis(texts, y_true, y_pred, probs, names, top=2)
    assert small["n_errors"] == 5 and [e["index"] for e in small["misclassified"]] == [4, 2]


def test_error_analysis_no_errors():
    probs = np.eye(2)
    ea = error_analysis(["a", "b"], [0, 1], [0, 1], probs, ["x", "y"])
    assert ea == {"n_errors": 0, "misclassified": [], "confused_pairs": []}


# ---------------------------------------------------------------------------------------------
# forgetting verdict follows the numbers


def test_forgetting_verdict_changes_with_the_numbers():
    small = forgetting_report(20.0, 21.0)
    assert small["general_perplexity_change"] == pytest.approx(0.05)
    assert small["forgetting_verdict"].startswith("small change")

    big = forgetting_report(20.0, 30.0)
    assert big["general_perplexity_change"] == pytest.approx(0.5)
    assert big["forgetting_verdict"].startswith("noticeable forgetting")
    assert "+50%" in big["forgetting_verdict"]
    for advice in ("lower the learning rate", "freeze early layers", "LoRA"):
        assert advice in big["forgetting_verdict"]

    better = forgetting_report(20.0, 15.0)
    assert better["general_perplexity_change"] == pytest.approx(-0.25)
    assert "no sign of forgetting" in better["forgetting_verdict"]

    # the threshold is the boundary: at it, still small; just above, forgetting
    assert FORGETTING_THRESHOLD == 0.10
    at = forgetting_report(100.0, 110.0)
    above = forgetting_report(100.0, 110.5)
    assert at["forgetting_verdict"].startswith("small change")
    assert above["forgetting_verdict"].startswith("noticeable forgetting")
    assert forgetting_report(20.0, 23.0, threshold=0.2)["forgetting_verdict"].startswith("small change")
    assert forgetting_report(20.0, 23.0, threshold=0.1)["forgetting_verdict"].startswith("noticeable")

    for before in (float("nan"), 0.0):
        r = forgetting_report(before, 10.0)
        assert r["forgetting_verdict"] == "not measured"
    assert set(big) == {"general_perplexity_before", "general_perplexity", "general_perplexity_change",
                        "forgetting_verdict"}


def test_general_text_probe_is_bundled():
    paras = general_text_paragraphs()
    assert len(paras) >= 5 and all(len(p.split()) > 10 for p in paras)


# ---------------------------------------------------------------------------------------------
# baselines


def test_baselines_majority_is_exact():
    train_t = ["good fine", "good nice", "fine nice", "awful bad"]
    train_y = [1, 1, 1, 0]
    val_t = ["good", "bad awful", "nice"]
    val_y = [1, 0, 1]
    b = baselines(train_t, train_y, val_t, val_y)
    # class 1: precision 2/3, recall 1 -> F1 0.8 (support 2); class 0 never predicted -> F1 0 (support 1)
    assert b["majority"] == pytest.approx({"accuracy": 2 / 3, "f1_weighted": (0.8 * 2 + 0.0) / 3,
                                           "f1_macro": (0.8 + 0.0) / 2})
    assert set(b) == {"majority", "tfidf_logreg"}
    assert set(b["tfidf_logreg"]) == {"accuracy", "f1_weighted", "f1_macro"}


def test_baselines_macro_f1_counts_labels_missing_from_validation():
    """Macro F1 averages over every label of the run (as the model's row does): a label only in the
    training split still counts, as F1 0, so the baseline and model columns are comparable."""
    train_t = ["red apple", "red cherry", "blue sky", "blue sea", "green leaf"]
    train_y = [0, 0, 1, 1, 2]
    b = baselines(train_t, train_y, ["red", "blue"], [0, 1])
    assert b["tfidf_logreg"]["accuracy"] == 1.0
    # labels 0 and 1 are perfect, label 2 has no support and no prediction: F1 0 by zero_division
    assert b["tfidf_logreg"]["f1_macro"] == pytest.approx(2 / 3)
    assert b["tfidf_logreg"]["f1_weighted"] == pytest.approx(1.0)
    assert baselines(train_t, train_y, ["red", "blue"], [0, 1], labels=[0, 1])["tfidf_logreg"]["f1_macro"] == 1.0


def test_baselines_survive_texts_without_words():
    """Single characters / emoji leave TF-IDF's word tokenizer an empty vocabulary: it must not crash
    a finished run; a one-class training split falls back to the majority prediction."""
    b = baselines(["a", "b", "a", "b"], [0, 1, 0, 1], ["a", "b"], [0, 1])
    assert b["tfidf_logreg"]["accuracy"] == 1.0
    b = baselines(["x y", "y z"], [0, 0], ["x", "z"], [0, 1])
    assert b["tfidf_logreg"] == b["majority"]


# ---------------------------------------------------------------------------------------------
# end to end: what a classification run writes


def test_run_metrics_before_row_and_required_keys(tiny_run):
    m = tiny_run["metrics"]
    for key in ("task", "strategy", "model", "trainable_params", "total_params", "train_seconds", "train_samples",
                "peak_rss_mb", "stopped_early", "accuracy", "f1_weighted", "f1_macro", "labels", "per_class",
                "confusion_matrix", "baselines", "before_finetuning", "error_analysis", "val_samples"):
        assert key in m, key
    assert set(m["before_finetuning"]) == {"accuracy", "f1_weighted", "f1_macro", "ece"}
    assert all(0.0 <= v <= 1.0 for v in m["before_finetuning"].values())
    assert 0.0 <= m["ece"] <= 1.0
    assert m["train_seconds"] > 0 and m["peak_rss_mb"] > 0
    on_disk = json.loads((tiny_run["out"] / "metrics.json").read_text())
    assert on_disk["baselines"] == m["baselines"] and on_disk["before_finetuning"] == m["before_finetuning"]
    # the Evaluate tab's "model vs baselines" table: every row has all three numbers, no empty cell
    from finetune_core.plots import classification_summary_rows

    rows = classification_summary_rows(m)
    assert len(rows) == 4 and all(isinstance(v, float) for r in rows for v in r[1:]), rows


def test_baselines_use_the_models_split(tiny_run):
    """val_samples == predictions.csv rows, same texts in the same order, and baselines recomputed from
    the run's own split (re-derived from run.yaml) reproduce metrics['baselines'] exactly."""
    from finetune_core.config import load_config
    from finetune_core.data import load_frames
    from finetune_core.events import EventWriter
    from finetune_core.models import load_tokenizer
    from finetune_core.tasks import RunContext, classification

    m, out = tiny_run["metrics"], tiny_run["out"]
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert m["val_samples"] == len(preds)
    assert sum(sum(row) for row in m["confusion_matrix"]) == len(preds)

    cfg = load_config(out / "run.yaml")
    run = RunContext(cfg=cfg, out=out, writer=EventWriter(out / "unused.jsonl", enabled=False), main=False,
                     model_path=cfg.model, model_kind="encoder", tokenizer=load_tokenizer(cfg.model))
    p = classification.prepare(run, load_frames(cfg))
    assert preds["text"].tolist() == p.val_texts
    assert len(p.train_texts) == m["train_samples"]
    assert len(p.train_texts) + len(p.val_texts) == 30
    assert baselines(p.train_texts, p.train_labels, p.val_texts, p.val_labels) == m["baselines"]

    # the model's metrics are those of predictions.csv
    assert m["accuracy"] == pytest.approx(preds["correct"].mean())
    assert preds["true_label"].tolist() == [p.label_names[i] for i in p.val_labels]


def test_predictions_confidence_and_error_analysis_match(tiny_run):
    m, out = tiny_run["metrics"], tiny_run["out"]
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    names = m["labels"]
    prob_cols = [f"p_{n}" for n in names]
    assert np.allclose(preds[prob_cols].sum(axis=1), 1.0, atol=1e-4)
    # confidence = softmax probability of the predicted label, which is the largest one
    picked = [row[f"p_{row['predicted_label']}"] for _, row in preds.iterrows()]
    assert np.allclose(preds["confidence"], picked, atol=1e-5)
    assert np.allclose(preds["confidence"], preds[prob_cols].max(axis=1), atol=1e-5)

    ea = m["error_analysis"]
    wrong = preds[~preds["correct"]]
    assert ea["n_errors"] == len(wrong)
    confs = [e["confidence"] for e in ea["misclassified"]]
    assert confs == sorted(confs, reverse=True)
    for e in ea["misclassified"]:
        row = preds.iloc[e["index"]]
        assert row["text"] == e["text"] and row["true_label"] == e["true"] and row["predicted_label"] == e["predicted"]
    pairs = wrong.groupby(["true_label", "predicted_label"]).size().to_dict()
    assert len(pairs) <= 10          # 3 labels: at most 6 ordered pairs, so none is cut
    assert {(p["true"], p["predicted"]): p["count"] for p in ea["confused_pairs"]} == pairs


# ---------------------------------------------------------------------------------------------
# end to end: instruction run -> generations.jsonl, ROUGE-L, forgetting probe


def wordpiece_llama_dir(path):
    """A 2-layer, 32-wide Llama with the bundled MiniLM (WordPiece) tokenizer: no chat template (alpaca), no
    eos token, and a tokenizer that emits token_type_ids, which generate() must not receive."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune_core.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("bundled:minilm-l6"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_instruction_run_writes_generations_rouge_and_forgetting(tmp_path):
    from finetune_core.config import config_from_dict
    from finetune_core.generate import rouge_l
    from finetune_core.train import train

    model_dir = wordpiece_llama_dir(tmp_path / "tiny-llama")
    rows = [{"instruction": f"Say the colour number {i}.", "input": "", "output": f"colour {i} is blue"}
            for i in range(30)]
    data = tmp_path / "inst.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    values = {"task": "instruction", "model": str(model_dir),
              "data": {"train": str(data), "val_size": 0.8, "max_length": 48, "template": "alpaca"},
              "strategy": {"name": "full"},
              "training": {"max_steps": 1, "per_device_train_batch_size": 4, "eval_strategy": "no",
                           "save_strategy": "no", "logging_steps": 1},
              "output_dir": str(tmp_path / "run"), "seed": 3}
    m = train(config_from_dict(values))
    for key in ("eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "general_perplexity_before",
                "general_perplexity", "general_perplexity_change", "forgetting_verdict", "rougeL", "rougeL_before"):
        assert key in m, key
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["general_perplexity_change"] == pytest.approx(
        (m["general_perplexity"] - m["general_perplexity_before"]) / m["general_perplexity_before"])
    assert m["forgetting_verdict"] == forgetting_report(m["general_perplexity_before"],
                                                        m["general_perplexity"])["forgetting_verdict"]

    lines = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == min(20, m["val_samples"]) == m["generations"] == 20   # capped at 20 prompts
    refs = {r["output"] for r in rows}
    for g in lines:
        assert {"prompt", "reference", "before", "after", "rougeL_before", "rougeL_after"} <= set(g)
        assert g["reference"] in refs and g["reference"] not in g["prompt"]
        assert g["rougeL_after"] == pytest.approx(rouge_l([g["after"]], [g["reference"]])[0])
    assert m["rougeL"] == pytest.approx(np.mean([g["rougeL_after"] for g in lines]))
    assert m["rougeL_before"] == pytest.approx(np.mean([g["rougeL_before"] for g in lines]))
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["rougeL"] == pytest.approx(m["rougeL"])


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_before_side_is_the_untouched_base_model(tmp_path, strategy):
    """The base model is measured after training (LoRA: adapters off; full: the base reloaded): its loss,
    general perplexity and answers must be exactly those of the base model measured on its own, and the
    loss curve must start before that measurement does. LoRA on a causal LM trains with (reentrant)
    activation checkpointing by default on CPU: its adapters must still receive gradients."""
    from safetensors.torch import load_file

    from finetune_core import train as T
    from finetune_core.config import config_from_dict
    from finetune_core.data import load_frames
    from finetune_core.events import EventWriter, read_all_events
    from finetune_core.generate import generate_batch, heldout_prompts
    from finetune_core.models import load_model, load_tokenizer
    from finetune_core.tasks import RunContext, instruction
    from finetune_core.training_args import resolve_training_args

    model_dir = str(wordpiece_llama_dir(tmp_path / "tiny-llama"))
    rows = [{"instruction": f"Say the colour number {i}.", "input": "", "output": f"colour {i} is blue"}
            for i in range(24)]
    data = tmp_path / "inst.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    values = {"task": "instruction", "model": model_dir,
              "data": {"train": str(data), "val_size": 0.25, "max_length": 48, "template": "alpaca"},
              "strategy": {"name": strategy},
              "training": {"max_steps": 4, "per_device_train_batch_size": 4, "eval_strategy": "no",
                           "save_strategy": "no", "logging_steps": 1, "learning_rate": 5e-3},
              "output_dir": str(tmp_path / "run"), "seed": 3}
    cfg = config_from_dict(values)
    m = T.train(cfg)
    assert m["eval_loss"] != pytest.approx(m["eval_loss_before"], rel=1e-4)     # it did train

    tok = load_tokenizer(model_dir, "causal")
    run = RunContext(cfg=cfg, out=tmp_path / "run", writer=EventWriter(tmp_path / "unused.jsonl", enabled=False),
                     main=False, model_path=model_dir, model_kind="causal", tokenizer=tok)
    p = instruction.prepare(run, load_frames(cfg))
    base = load_model(model_dir, "instruction", "causal")
    ref = instruction.lm_probe(base, tok, p, cfg, "_before")
    assert m["eval_loss_before"] == pytest.approx(ref["eval_loss_before"], rel=1e-5)
    assert m["general_perplexity_before"] == pytest.approx(ref["general_perplexity_before"], rel=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [g["before"] for g in lines] == generate_batch(base, tok, heldout_prompts(p)[0], p.template)

    events = read_all_events(tmp_path / "run" / "events.jsonl")
    first_log = next(i for i, e in enumerate(events) if e["type"] == "log")
    measuring = next(i for i, e in enumerate(events) if "Measuring the base model" in (e.get("message") or ""))
    assert first_log < measuring

    args = resolve_training_args(cfg, "causal", 18, tmp_path / "ck")[0]
    assert args.activation_checkpointing is (strategy == "lora")
    if strategy == "lora":
        weights = load_file(str(tmp_path / "run" / "model" / "adapter_model.safetensors"))
        b = [w for n, w in weights.items() if "lora_B" in n]
        assert b and all(float(w.abs().max()) > 0 for w in b)     # B starts at zero: every adapter learned


def test_rouge_l_matches_reference_package():
    from rouge_score import rouge_scorer

    from finetune_core.generate import rouge_l

    pred, ref = "the cat sat on the mat", "a cat sat on a mat today"
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l([pred, ref], [ref, ref]) == pytest.approx([expected, 1.0])


def test_rouge_l_scores_non_latin_text_zero_as_the_readme_says():
    """rouge-score's default tokenizer keeps only a-z and 0-9: an exact answer in Chinese or Cyrillic
    scores 0 (README, Evaluation). If a tokenizer change fixes this, update the README."""
    from finetune_core.generate import rouge_l

    assert rouge_l(["你好世界", "Привет мир", "hello world"], ["你好世界", "Привет мир", "hello world"]) == [0, 0, 1.0]


def test_prefilled_cache_answers_as_a_padded_batch_does(tiny_llama_dir, smol_tokenizer):
    """Held-out prompts prefilled one by one (no padding computed), decoded together: the same greedy
    answers as a plain left-padded generate() of the batch, and as each prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_core.generate import generate_batch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = ["Hi", "A much longer prompt about the weather in spring, in summer and in autumn, then winter",
               "Name three colours of the rainbow, please", "x"]
    ours = generate_batch(model, smol_tokenizer, prompts, "alpaca", max_new_tokens=10)
    alone = [generate_batch(model, smol_tokenizer, [p], "alpaca", max_new_tokens=10)[0] for p in prompts]
    smol_tokenizer.padding_side = "left"
    enc = smol_tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=smol_tokenizer.pad_token_id,
                             eos_token_id=smol_tokenizer.eos_token_id)
    smol_tokenizer.padding_side = "right"
    padded = [smol_tokenizer.decode(r, skip_special_tokens=True).strip() for r in out[:, enc["input_ids"].shape[1]:]]
    assert ours == padded == alone
    assert len(set(ours)) > 1
    # the decode writes into a preallocated cache (the fast path), sized for the prompts and the answer
    from transformers import StaticCache

    from finetune_core.generate import prefilled_cache

    rows = [smol_tokenizer(p)["input_ids"] for p in prompts]
    cache = prefilled_cache(model, rows, room=11)
    assert isinstance(cache, StaticCache)
    assert cache.get_max_length() == max(map(len, rows)) - 1 + 11
    assert int(cache.get_seq_length()) == max(map(len, rows)) - 1
    # a forward wrapped in autocast (a Trainer's mixed precision) gives mixed dtypes: no static cache then
    plain_forward = model.forward
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(plain_forward)
    try:
        assert not isinstance(prefilled_cache(model, rows, room=11), StaticCache)
    finally:
        model.forward = plain_forward


@pytest.mark.parametrize("room", [13, 0], ids=["static-cache", "dynamic-cache"])
def test_decode_in_segments_drops_ended_rows_and_keeps_generates_tokens(tiny_llama_dir, smol_tokenizer, monkeypatch,
                                                                       room):
    """Rows whose answer has ended leave the batch between segments (the cache shrinks with them), and
    every row's tokens are those of one generate() call over the whole batch, cut after the stop token;
    with the StaticCache and with the DynamicCache that models without one (or under autocast) get."""
    import torch
    from transformers import AutoModelForCausalLM, StaticCache

    from finetune_core import generate as G

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = ["Hi there", "A much longer prompt about the weather in spring, in summer and in autumn",
               "Name three colours of the rainbow, please", "Why is the sky blue?", "Count to five"]
    smol_tokenizer.padding_side = "left"
    enc = dict(smol_tokenizer(prompts, return_tensors="pt", padding=True))
    smol_tokenizer.padding_side = "right"
    width = enc["input_ids"].shape[1]
    kwargs = G._generation_kwargs(smol_tokenizer, 0, 1, 12, False)
    with torch.no_grad():
        free = model.generate(**enc, **kwargs)[:, width:].tolist()
    stop = free[0][2]                     # a token the first answer reaches early: it ends there
    kwargs["eos_token_id"] = [stop]
    with torch.no_grad():
        whole = model.generate(**enc, **kwargs)[:, width:].tolist()
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in whole]
    assert len(expected[0]) <= 3 and max(map(len, expected)) == 12     # one ends early, one runs to the end

    shrunk = []
    real = G._cache_rows
    monkeypatch.setattr(G, "_cache_rows", lambda m, c, i: shrunk.append(len(i)) or real(m, c, i))
    monkeypatch.setattr(G, "DECODE_SEGMENT", 4)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    with torch.no_grad():
        cache = G.prefilled_cache(model, rows, room=room)
        assert isinstance(cache, StaticCache) == bool(room)
        ours = G.decode_in_segments(model, enc, kwargs, cache)
    assert ours == expected
    assert shrunk and shrunk[0] < len(prompts)


def test_adapter_merged_generates_the_same_answers_and_restores_the_adapter(tiny_llama_dir, smol_tokenizer):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune_core.generate import generate_batch
    from finetune_core.tasks.instruction import adapter_merged

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                      init_lora_weights=False))      # a non-zero adapter
    model.eval()
    prompts = ["Hello there", "A much longer prompt about the weather in spring and autumn"]
    ids = smol_tokenizer(prompts[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    unmerged = generate_batch(model, smol_tokenizer, prompts, "alpaca", max_new_tokens=8)
    with adapter_merged(model):
        assert all(m.merged for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
        merged = generate_batch(model, smol_tokenizer, prompts, "alpaca", max_new_tokens=8)
    assert merged == unmerged
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-5)


def test_calibration_on_hand_computed_rows():
    import numpy as np

    from finetune_core.evaluation import calibration
    from finetune_core.plots import calibration_figure

    probs = np.array([[0.95, 0.05], [0.92, 0.08], [0.35, 0.65], [0.42, 0.58], [0.55, 0.45]])
    y = [0, 1, 1, 0, 0]
    # bins are (lo, hi]: 0.95 (right) and 0.92 (wrong) in (0.9, 1]; 0.58 (wrong) and 0.55 (right) in
    # (0.5, 0.6]; 0.65 (right) alone in (0.6, 0.7]
    c = calibration(probs, y)
    by_lo = {round(b["lo"], 1): b for b in c["bins"]}
    assert by_lo[0.9]["n"] == 2 and by_lo[0.9]["accuracy"] == 0.5 and by_lo[0.9]["confidence"] == pytest.approx(0.935)
    assert by_lo[0.5]["n"] == 2 and by_lo[0.5]["accuracy"] == 0.5 and by_lo[0.5]["confidence"] == pytest.approx(0.565)
    assert by_lo[0.6]["n"] == 1 and by_lo[0.6]["accuracy"] == 1.0
    expected = 2 / 5 * abs(0.5 - 0.935) + 2 / 5 * abs(0.5 - 0.565) + 1 / 5 * abs(1.0 - 0.65)
    assert c["ece"] == pytest.approx(expected)
    assert c["mean_confidence_correct"] == pytest.approx((0.95 + 0.65 + 0.55) / 3)
    assert calibration(np.ones((3, 2)) / 2 + [[0.5, -0.5]] * 3, [0, 0, 0])["ece"] == pytest.approx(0.0)
    fig = calibration_figure({"calibration": c})
    assert len(fig.data) == 2 and "ECE 0." in fig.layout.title.text
    assert "measured on the validation rows" in str(calibration_figure({}).layout.annotations[0].text)
