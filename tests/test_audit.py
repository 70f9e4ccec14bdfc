"""Data audit: exact counts on small frames, the warnings' thresholds, agreement with what training
drops (data.encode_pair), and the real example file. Uses the bundled MiniLM tokenizer (offline, cheap)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune_core import data as D
from finetune_core.audit import audit_dataframe, audit_file, format_audit
from finetune_core.config import DataConfig
from finetune_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ROOT / "examples" / "data" / "domains.csv"
SUPPORT = ROOT / "examples" / "data" / "support_replies.jsonl"


@pytest.fixture(scope="module")
def tok():
    from finetune_core.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("bundled:minilm-l6"))


def frame(counts: dict, prefix: str = "row") -> pd.DataFrame:
    """Distinct texts, `counts[label]` rows per label."""
    rows = [{"text": f"{prefix} {label} number {i}", "label": label}
            for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows)


def audit(df, task="classification", **kw):
    return audit_dataframe(df, task, D.detect_columns(df, task), **kw)


def assert_plain(obj):
    """Only JSON's own types, all the way down (no numpy scalars, no NaN)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            assert_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            assert_plain(v)
    else:
        assert obj is None or type(obj) in (str, int, float, bool), (obj, type(obj))
        if isinstance(obj, float):
            assert math.isfinite(obj)


# ---------------------------------------------------------------------------------------------
# classification


def test_class_counts_share_and_json():
    df = frame({"a": 120, "b": 60, "c": 20})
    r = audit(df)
    assert r["task"] == "classification"
    assert r["n_rows"] == 200 and r["usable_rows"] == 200
    assert r["columns"] == ["text", "label"]
    assert r["column_mapping"] == {"text": "text", "label": "label"}
    assert r["class_distribution"] == {"a": 120, "b": 60, "c": 20}
    assert list(r["class_distribution"]) == ["a", "b", "c"]          # largest first
    assert r["class_share"] == {"a": 0.6, "b": 0.3, "c": 0.1}
    assert r["n_classes"] == 3
    assert r["imbalance_ratio"] == 6.0
    assert r["classes_with_few_examples"] == {}
    assert r["duplicates"] == 0 and r["empty_texts"] == 0 and r["missing_values"]["total"] == 0
    lengths = [len(t) for t in df["text"]]
    assert r["text_length"] == {"min": min(lengths), "median": float(np.median(lengths)),
                                "mean": round(float(np.mean(lengths)), 2), "max": max(lengths)}
    assert "token_length" not in r and "token_lengths" not in r
    assert "overlap_with_validation" not in r
    assert_plain(r)
    json.dumps(r)


def test_labels_compared_as_stripped_strings():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(6)], "label": [" pos", "pos ", "pos", 1.0, 1, "1"]})
    r = audit(df)
    assert r["class_distribution"] == {"1": 3, "pos": 3}
    assert r["imbalance_ratio"] == 1.0


def test_audit_and_training_read_labels_alike():
    """One rule: the audit's classes are the labels clean_classification trains on, cell for cell."""
    cells = [" pos", "pos ", 1.0, 1, "1", 2.5, None, float("nan"), pd.NA, "", "  ", "None", "NA"]
    df = pd.DataFrame({"text": [f"t{i}" for i in range(len(cells))], "label": pd.Series(cells, dtype=object)})
    trained = D.clean_classification(df, "text", "label")["label"].value_counts().to_dict()
    assert audit(df)["class_distribution"] == trained == {"pos": 2, "1": 3, "2.5": 1, "None": 1, "NA": 1}
    assert audit(df)["missing_labels"] == 5


@pytest.mark.parametrize("rows, advice", [(60, "freeze the backbone"), (800, "full fine-tuning"),
                                          (9000, "full fine-tuning pays off")])
def test_size_suggestion_is_the_cheat_sheets_pick(rows, advice):
    from finetune_core.config import recommended_strategy

    r = audit(frame({"a": rows // 2, "b": rows - rows // 2}))
    assert advice in r["suggestion"] and recommended_strategy(rows)[1][1:] in r["suggestion"]


@pytest.mark.parametrize("small, warned", [(40, False), (21, False), (20, False), (19, True), (10, True)])
def test_imbalance_warning_only_above_5x(small, warned):
    r = audit(frame({"big": 100, "small": small}))
    assert r["imbalance_ratio"] == pytest.approx(100 / small)
    msgs = [w for w in r["warnings"] if w.startswith("Imbalance ratio")]
    if warned:
        assert len(msgs) == 1
        assert msgs[0].startswith(f"Imbalance ratio {100 / small:.1f}x")
        assert "class weights" in msgs[0] and "'small'" in msgs[0]
        assert not r["ok"]
    else:
        assert msgs == []
        assert r["ok"], r["warnings"]


def test_duplicates_and_conflicting_labels_counted():
    base = frame({"a": 60, "b": 60})
    extra = pd.DataFrame({"text": ["row a number 0", "  row a number 0 ", "row b number 1", "row a number 2"],
                          "label": ["a", "a", "b", "b"]})            # 4 repeats; the last one with another label
    r = audit(pd.concat([base, extra], ignore_index=True))
    assert r["duplicates"] == 4
    assert r["conflicting_labels"] == 1
    assert any("4 duplicate texts" in w and "remove" in w for w in r["warnings"])
    assert any("different labels" in w for w in r["warnings"])
    assert r["class_distribution"] == {"a": 62, "b": 62}          # duplicates still count as rows


def test_missing_values_and_empty_texts():
    df = frame({"a": 60, "b": 60})
    df["note"] = None
    df.loc[0, "label"] = np.nan           # missing label
    df.loc[1, "label"] = "   "            # blank label counts as missing, but is not NaN
    df.loc[2, "text"] = np.nan            # NaN text -> empty
    df.loc[3, "text"] = "  "              # whitespace text -> empty
    df.loc[4, "text"] = None
    df.loc[4, "label"] = None
    r = audit(df)
    assert r["missing_values"]["per_column"] == {"text": 2, "label": 2, "note": 120}
    assert r["missing_values"]["total"] == 124
    assert r["missing_labels"] == 3
    assert r["empty_texts"] == 3
    assert r["usable_rows"] == 120 - 5
    assert r["class_distribution"] == {"b": 60, "a": 55}
    assert r["text_length"]["min"] == 0                            # NaN text counted as ""
    assert any("3 rows have no label" in w for w in r["warnings"])
    assert any("3 rows have an empty or missing text" in w for w in r["warnings"])
    # agrees with what training keeps
    assert len(D.clean_classification(df, "text", "label")) == r["usable_rows"]


def test_small_data_and_few_examples_per_class():
    r = audit(frame({"a": 60, "b": 39}))
    assert any(w.startswith("Small data: only 99 usable rows") and "frozen" in w and "LoRA" in w
               for w in r["warnings"])
    assert not any(w.startswith("Small data") for w in audit(frame({"a": 60, "b": 40}))["warnings"])

    r = audit(frame({"a": 100, "b": 30, "c": 3, "d": 1}))
    assert r["classes_with_few_examples"] == {"d": 1, "c": 3}
    assert any("'d'" in w and "single example" in w and "stratified" in w for w in r["warnings"])
    assert any("'c' (3)" in w and "fewer than 5" in w for w in r["warnings"])
    assert r["imbalance_ratio"] == 100.0


def test_single_class_warned():
    r = audit(frame({"only": 150}))
    assert r["n_classes"] == 1 and r["imbalance_ratio"] == 1.0
    assert any("Only one class" in w for w in r["warnings"])


def test_token_lengths_and_truncation_share(tok):
    texts = ["one", "one two", "one two three", "one two three four", "one two three four five"]
    df = pd.DataFrame({"text": texts * 30, "label": ["x", "y", "x", "y", "x"] * 30})
    r = audit(df, tokenizer=tok, max_length=5)
    expected = [len(tok(t)["input_ids"]) for t in df["text"]]
    assert expected[:5] == [3, 4, 5, 6, 7]                         # [CLS] words [SEP]
    t = r["token_length"]
    assert (t["min"], t["max"], t["median"], t["max_length"]) == (3, 7, 5.0, 5)
    assert t["mean"] == 5.0 and t["p95"] == pytest.approx(float(np.percentile(expected, 95)))
    assert t["n_truncated"] == 60
    assert t["truncated_share"] == 0.4
    assert r["token_lengths"] == expected
    assert any(w.startswith("40% of texts (60 rows) are longer than max_length=5") and "raise max_length" in w
               for w in r["warnings"])
    # 10% or less truncated: no warning
    r = audit(df, tokenizer=tok, max_length=7)
    assert r["token_length"]["n_truncated"] == 0
    assert not any("truncated" in w for w in r["warnings"])


def test_token_lengths_capped_for_histogram(tok):
    df = frame({"a": 3000, "b": 3000})
    r = audit(df, tokenizer=tok, max_length=64)
    assert len(r["token_lengths"]) == 5000
    assert r["token_length"]["n_truncated"] == 0


def test_overlap_with_validation():
    train = frame({"a": 60, "b": 60})
    val = pd.concat([frame({"a": 5, "b": 5}, prefix="val"),
                     pd.DataFrame({"text": ["row a number 1", " row b number 2", "row b number 2", ""],
                                   "label": ["a", "b", "b", "a"]})], ignore_index=True)
    r = audit(train, val_df=val)
    assert r["overlap_with_validation"] == 2                       # distinct texts in both
    assert r["validation_rows"] == 14
    assert r["validation_unseen_labels"] == []
    assert any("2 texts appear in both" in w and "leakage" in w for w in r["warnings"])
    assert audit(train, val_df=frame({"a": 3, "b": 3}, prefix="val"))["overlap_with_validation"] == 0

    r = audit(train, val_df=pd.DataFrame({"text": ["new one"], "label": ["zzz"]}))
    assert r["validation_unseen_labels"] == ["zzz"]
    assert any("'zzz'" in w for w in r["warnings"])


def test_format_audit_text():
    r = audit(frame({"alpha": 120, "beta": 20}))
    text = format_audit(r)
    assert "DATASET AUDIT REPORT" in text
    assert "Total examples: 140" in text
    assert "alpha" in text and "120" in text and "(85.7%)" in text and "(14.3%)" in text
    assert "WARNING: Imbalance ratio 6.0x" in text
    ok_text = format_audit(audit(frame({"alpha": 60, "beta": 60})))
    assert "WARNING" not in ok_text and "No problems found." in ok_text


def test_unknown_task_rejected():
    with pytest.raises(ConfigError):
        audit_dataframe(frame({"a": 2, "b": 2}), "regression", {"text": "text", "label": "label"})


# ---------------------------------------------------------------------------------------------
# instruction


def instruction_frame():
    rows = []
    for i in range(12):
        # prompts grow with i; responses are 6-8 words
        rows.append({"instruction": "Answer briefly. " + " ".join(["context"] * (3 * i)),
                     "input": f"case {i}" if i % 2 else None,
                     "output": f"Here is the answer number {i} for you."})
    rows.append(dict(rows[0]))                                     # exact duplicate of row 1
    rows.append({"instruction": "Say nothing.", "input": None, "output": None})   # empty response
    return pd.DataFrame(rows)


def test_instruction_cut_off_agrees_with_encode_pair(tok):
    df = instruction_frame()
    cols = D.detect_columns(df, "instruction")
    max_length = 30
    r = audit_dataframe(df, "instruction", cols, tokenizer=tok, max_length=max_length, template="alpaca")
    template = D.resolve_template("alpaca", tok)
    cut = trunc = 0
    lengths = []
    for i, row in enumerate(df.to_dict("records"), start=1):
        prompt, response = D.prompt_and_response(row, cols, template, tok, i)
        enc = D.encode_pair(prompt, response, tok, template, max_length)
        lengths.append(len(tok(prompt)["input_ids"]) + len(tok(response, add_special_tokens=False)["input_ids"]))
        if enc is None:
            cut += 1
        elif enc[2]:
            trunc += 1
    assert cut >= 3 and trunc >= 1                                 # the frame exercises all three cases
    assert r["response_cut_off"] == cut
    assert r["response_truncated"] == trunc
    assert D.tokenize_instruction(df, cols, tok, template, max_length).dropped == cut   # too long or empty
    assert r["token_lengths"] == lengths
    assert r["token_length"]["n_truncated"] == sum(n > max_length for n in lengths)
    assert r["template"] == "alpaca"
    assert any(w.startswith(f"{cut} rows will be dropped") and "max_length=30" in w for w in r["warnings"])
    assert r["duplicates"] == 1
    assert r["empty_texts"] == 1
    assert r["n_rows"] == 14 and r["usable_rows"] == 14
    assert r["missing_values"]["per_column"] == {"instruction": 0, "input": 8, "output": 1}
    assert "class_distribution" not in r
    assert any("Small data" in w for w in r["warnings"])
    assert_plain(r)

    roomy = audit_dataframe(df, "instruction", cols, tokenizer=tok, max_length=512, template="alpaca")
    assert roomy["response_cut_off"] == 1                         # only the empty response (no eos in MiniLM)
    assert roomy["response_truncated"] == 0
    assert "WARNING" in format_audit(roomy)


def test_instruction_overlap_and_bad_rows(tok):
    df = pd.DataFrame({"prompt": ["p1", "p2", "p3"], "completion": ["c1", "c2", "c3"]})
    val = pd.DataFrame({"prompt": ["p1", " p2", "p2", "p9"], "completion": ["c1", "c2 ", "other", "c9"]})
    r = audit_dataframe(df, "instruction", D.detect_columns(df, "instruction"), val_df=val)
    assert r["overlap_with_validation"] == 2
    assert any("2 examples appear in both" in w for w in r["warnings"])

    msgs = pd.DataFrame({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                      [{"role": "user", "content": "no answer"}]]})
    r = audit_dataframe(msgs, "instruction", D.detect_columns(msgs, "instruction"), tokenizer=tok,
                        template="alpaca")
    assert r["invalid_rows"] == 1 and r["usable_rows"] == 1
    assert any("cannot be read" in w and "Row 2" in w for w in r["warnings"])

    # template 'chat' with a tokenizer that has none: reported, not a crash
    r = audit_dataframe(df, "instruction", D.detect_columns(df, "instruction"), tokenizer=tok, template="chat")
    assert "token_length" not in r
    assert any("no chat template" in w for w in r["warnings"])


# ---------------------------------------------------------------------------------------------
# files


def test_domains_csv_is_clean():
    r = audit_file(DOMAINS, "classification", model="bundled:minilm-l6")
    assert r["file"] == str(DOMAINS)
    assert r["tokenizer"] == "bundled:minilm-l6"
    assert r["n_rows"] == 160
    assert r["class_distribution"] == {"finance": 40, "legal": 40, "medical": 40, "technology": 40}
    assert r["n_classes"] == 4 and r["imbalance_ratio"] == 1.0
    assert r["duplicates"] == 0 and r["missing_values"]["total"] == 0 and r["empty_texts"] == 0
    assert r["token_length"]["max_length"] == 256 and r["token_length"]["n_truncated"] == 0
    assert len(r["token_lengths"]) == 160
    assert r["warnings"] == [] and r["ok"] is True
    assert_plain(r)
    assert "No problems found." in format_audit(r)


def test_audit_file_without_tokenizer_and_with_validation(tmp_path):
    df = D.read_table(DOMAINS)
    val_path = tmp_path / "val.csv"
    df.iloc[:7].to_csv(val_path, index=False)
    cfg = DataConfig(train=str(DOMAINS), validation=str(val_path), max_length=64)
    r = audit_file(DOMAINS, "classification", data_cfg=cfg, model=False)
    assert "token_length" not in r and r["tokenizer"] is None
    assert r["max_length"] == 64
    assert r["validation_file"] == str(val_path)
    assert r["overlap_with_validation"] == 7
    assert not r["ok"]


def test_audit_file_instruction_with_minilm_tokenizer():
    cfg = DataConfig(template="alpaca")
    r = audit_file(SUPPORT, "instruction", data_cfg=cfg, model="bundled:minilm-l6", max_length=512)
    assert r["n_rows"] == 80 and r["column_mapping"]["format"] == "alpaca"
    assert r["duplicates"] == 0 and r["response_cut_off"] == 0 and r["response_truncated"] == 0
    r = audit_file(SUPPORT, "instruction", data_cfg=cfg, model="bundled:minilm-l6", max_length=40)
    assert r["response_cut_off"] > 0
    assert any("will be dropped" in w for w in r["warnings"])
