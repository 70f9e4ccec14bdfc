"""Batch predictions (finetune_core.batch_predict, `python -m finetune_core predict`): a tiny classifier
and a tiny instruction run over files; bad files get the training data's messages (tests/badinputs.py).
"""

from __future__ import annotations

import csv
import io

import pandas as pd
import pytest

import badinputs as B
from conftest import FAST_TRAINING, class_rows, write_csv, write_jsonl
from finetune_core.batch_predict import predict_file
from finetune_core.cli import main
from finetune_core.errors import DataError, FinetuneError
from finetune_core.predictions import safe_csv_cell

# badinputs cases about the columns training needs (a label, instruction/output, a pair): predicting reads any
# single column as its text, so these files are not bad inputs here. Every other refused audit case is.
TRAINING_COLUMN_CASES = {"wrong delimiter (colon)", ".tsv that is comma-separated", "no text/label columns",
                         "named text column missing", "no instruction columns", "unknown task",
                         "pairs without rejected answers", "a pair cell holds an object"}
FILE_CASES = [c.name for c in B.CASES
              if c.command == "audit" and c.exit == 2 and c.name not in TRAINING_COLUMN_CASES]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert_dir):
    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    root = tmp_path_factory.mktemp("predict-cls")
    rows = [{"sentence": r["text"], "category": r["label"]} for r in class_rows(8)]
    train(config_from_dict({"task": "classification", "model": tiny_bert_dir, "strategy": {"name": "full"},
                            "data": {"train": write_csv(root / "train.csv", rows), "max_length": 32},
                            "training": FAST_TRAINING, "output_dir": str(root / "run"), "seed": 1}))
    return root / "run"


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory, tiny_llama_dir):
    from conftest import owned_instruction_run

    return owned_instruction_run(tmp_path_factory.mktemp("predict-instr"), "instr", "someone", tiny_llama_dir,
                                 "instr") / "instr"


def test_a_classifier_writes_label_confidence_and_every_class_probability(classifier_run, tmp_path):
    from finetune_core.generate import load_for_inference, predict_proba

    texts = ["the striker scored a goal", B.FORMULA, "", "python code on the server", "@SUM(A1:A9) recipe"]
    data = write_csv(tmp_path / "new.csv", [{"id": i, "sentence": t, "note": "=1+1"} for i, t in enumerate(texts)])
    calls = []
    result = predict_file(classifier_run, data, progress=lambda done, total: calls.append((done, total)))
    assert result.path == classifier_run / "export" / "predictions-new.csv"
    assert (result.rows, result.blank_rows, result.source_columns, result.task) == (5, 1, ("sentence",),
                                                                                     "classification")
    assert calls[-1] == (4, 4)
    out = pd.read_csv(result.path, keep_default_na=False)
    labels = ["food", "sport", "tech"]
    assert list(out.columns) == ["id", "sentence", "note", "predicted_label", "confidence"] + \
        [f"p_{label}" for label in labels]
    model, tokenizer, _ = load_for_inference(str(classifier_run / "model"))
    for i, text in enumerate(texts):
        row = out.iloc[i]
        if not text:
            assert row["predicted_label"] == "" and row["confidence"] == ""
            continue
        probs = predict_proba(model, tokenizer, text, max_length=32)
        assert {label: float(row[f"p_{label}"]) for label in labels} == pytest.approx(probs, abs=1e-5)
        assert row["predicted_label"] == max(probs, key=probs.get)
        assert float(row["confidence"]) == pytest.approx(max(probs.values()), abs=1e-5)
    cells = list(csv.reader(io.StringIO(result.path.read_text())))[1:]
    assert cells[1][1] == "'" + B.FORMULA and cells[4][1].startswith("'@") and cells[0][2] == "'=1+1"


def test_the_text_column_is_found_as_training_finds_it(classifier_run, tmp_path):
    single = write_csv(tmp_path / "one.csv", [{"whatever": "oven garlic sauce"}, {"whatever": "cloud api"}])
    assert predict_file(classifier_run, single).source_columns == ("whatever",)
    usual = write_jsonl(tmp_path / "usual.jsonl", [{"n": 1, "text": "goal"}, {"n": 2, "text": "bake"}])
    assert predict_file(classifier_run, usual, out=tmp_path / "o.csv").source_columns == ("text",)
    with pytest.raises(DataError, match=r"No text column found in cols.csv\. Columns found: a, b") as err:
        predict_file(classifier_run, write_csv(tmp_path / "cols.csv", [{"a": "x", "b": "y"}]))
    assert "'sentence' (as in training)" in err.value.fix


def test_an_instruction_run_answers_every_prompt_as_it_was_trained(instruction_run, tmp_path):
    """Prompts are built as in training (Alpaca here); a file with reference answers keeps them."""
    from finetune_core.data import alpaca_prompt
    from finetune_core.generate import generate_batch, load_for_inference

    rows = [{"instruction": "Rewrite this note politely.", "input": "refund approved"},
            {"instruction": B.FORMULA, "input": ""}, {"instruction": "", "input": ""}]
    result = predict_file(instruction_run, write_jsonl(tmp_path / "p.jsonl", rows), max_new_tokens=6)
    assert (result.rows, result.blank_rows, result.source_columns) == (3, 1, ("instruction", "input"))
    out = pd.read_csv(result.path, keep_default_na=False, dtype=str)
    model, tokenizer, info = load_for_inference(str(instruction_run / "model"))
    assert info["template"] == "alpaca"
    expected = generate_batch(model, tokenizer, [alpaca_prompt(r["instruction"], r["input"]) for r in rows[:2]],
                              info["template"], max_new_tokens=6)
    assert out["generated_response"].tolist() == [safe_csv_cell(a) for a in expected] + [""]
    assert out["instruction"].tolist()[1] == "'" + B.FORMULA

    refs = [{"prompt": "Say thanks.", "completion": "Thanks!"}, {"prompt": "Say sorry.", "completion": "Sorry!"}]
    with_refs = predict_file(instruction_run, write_jsonl(tmp_path / "refs.jsonl", refs), max_new_tokens=4)
    out = pd.read_csv(with_refs.path)
    assert list(out.columns) == ["prompt", "completion", "generated_response"]
    assert out["completion"].tolist() == ["Thanks!", "Sorry!"]

    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}]
    assert predict_file(instruction_run, write_jsonl(tmp_path / "m.jsonl", chats), max_new_tokens=4).rows == 1


def test_cli_predict_prints_where_it_wrote(classifier_run, tmp_path, capsys):
    data = write_csv(tmp_path / "in.csv", [{"sentence": "goal match"}, {"sentence": "laptop kernel"}])
    assert main(["predict", str(classifier_run), data, "--out", str(tmp_path / "preds.csv")]) == 0
    printed = capsys.readouterr().out
    assert "2 rows predicted from column(s) sentence" in printed and str(tmp_path / "preds.csv") in printed
    assert len(pd.read_csv(tmp_path / "preds.csv")) == 2


def test_a_run_without_a_model_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FinetuneError, match="has no saved model yet"):
        predict_file(tmp_path / "run", write_csv(tmp_path / "x.csv", [{"text": "a"}]))


def test_every_file_case_is_one_that_reading_refuses(tmp_path, monkeypatch):
    """The cases below are exactly the refused audit cases whose file cannot be read at all."""
    from finetune_core.data import read_table

    names = {c.name for c in B.CASES}
    assert TRAINING_COLUMN_CASES <= names and len(FILE_CASES) >= 15
    for name in FILE_CASES:
        case = next(c for c in B.CASES if c.name == name)
        folder = tmp_path / str(FILE_CASES.index(name))
        folder.mkdir()
        B.write_files(case, folder)
        with monkeypatch.context() as m:
            for key, value in case.env.items():
                m.setenv(key, value)
            with pytest.raises(FinetuneError):
                read_table(case.data_path(folder))


@pytest.mark.parametrize("name", FILE_CASES)
def test_a_bad_file_gets_the_training_datas_message(name, classifier_run, tmp_path, capsys, monkeypatch):
    case = next(c for c in B.CASES if c.name == name)
    B.write_files(case, tmp_path)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    assert main(["predict", str(classifier_run), case.data_path(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err
    pos = 0
    for fragment in case.expect:
        pos = err.find(fragment, pos)
        assert pos >= 0, f"{fragment!r} not in {err}"
