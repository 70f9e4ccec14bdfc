"""Data: every file format, every bad input with a clear message, columns, splits, exact label masks."""

import json
import zipfile

import pandas as pd
import pytest

from conftest import EXAMPLES, class_rows, write_csv, write_jsonl
from finetune_core import data as D
from finetune_core.config import DataConfig
from finetune_core.errors import DataError

ROWS = [{"text": "the match ended in a draw", "label": "sport"},
        {"text": "bake the bread, then rest it", "label": "food"},
        {"text": "the server crashed at night", "label": "tech"},
        {"text": "a late goal won it", "label": "sport"}]


# ---------------------------------------------------------------------------------------------
# reading every format


def _write(path, fmt, rows=ROWS):
    df = pd.DataFrame(rows)
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "json-wrapped":
        path.write_text(json.dumps({"data": rows, "version": 1}), encoding="utf-8")
    elif fmt == "json-lines":
        write_jsonl(path, rows)
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("fmt, ext", [("csv", ".csv"), ("tsv", ".tsv"), ("json", ".json"),
                                      ("json-wrapped", ".json"), ("json-lines", ".json"), ("jsonl", ".jsonl"),
                                      ("parquet", ".parquet"), ("csv", ".CSV")])
def test_every_format_reads_the_same_rows(tmp_path, fmt, ext):
    df = D.read_table(_write(tmp_path / f"data{ext}", fmt))
    assert list(df.columns) == ["text", "label"]
    assert df["text"].tolist() == [r["text"] for r in ROWS]
    assert df["label"].tolist() == [r["label"] for r in ROWS]


def test_semicolon_csv_is_sniffed(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("text;label\nhello there;a\ngood bye;b\n", encoding="utf-8")
    assert D.read_table(path)["label"].tolist() == ["a", "b"]


def test_latin1_file_loads(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé crème brûlée,food\nniño pequeño,people\n".encode("latin-1"))
    df = D.read_table(path)
    assert df["text"].tolist() == ["café crème brûlée", "niño pequeño"]


def test_cp1252_and_utf8_bom_load(tmp_path):
    path = tmp_path / "win.csv"
    path.write_bytes("text,label\n\u201csmart quotes\u201d \u2013 dash,a\nplain,b\n".encode("cp1252"))
    assert D.read_table(path)["text"][0] == "\u201csmart quotes\u201d \u2013 dash"
    bom = tmp_path / "bom.csv"
    bom.write_bytes("text,label\nx,a\ny,b\n".encode("utf-8-sig"))
    assert list(D.read_table(bom).columns) == ["text", "label"]


def test_example_data_reads():
    assert len(D.read_table(EXAMPLES / "domains.csv")) == 160
    df = D.read_table(EXAMPLES / "support_replies.jsonl")
    assert len(df) == 80 and {"instruction", "input", "output"} <= set(df.columns)


# ---------------------------------------------------------------------------------------------
# bad files: one clear message each, naming the problem and the fix


def _error(path, **kw) -> str:
    with pytest.raises(DataError) as err:
        D.read_table(path, **kw)
    assert err.value.fix, "every data error carries a fix"
    assert "\n" not in err.value.problem.split(":")[0]
    return str(err.value)


def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.csv")


def test_folder_instead_of_file(tmp_path):
    assert "is a folder" in _error(tmp_path)


@pytest.mark.parametrize("name", ["data.xlsx", "data.txt", "data"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("text,label\na,b\n", encoding="utf-8")
    msg = _error(path)
    assert "unsupported extension" in msg and ".csv" in msg and ".parquet" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert "empty" in _error(path)


def test_whitespace_only_file(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    assert "only whitespace" in _error(path)


def test_header_without_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n", encoding="utf-8")
    msg = _error(path)
    assert "no data rows" in msg and "text, label" in msg


def test_excel_saved_as_csv(tmp_path):
    path = tmp_path / "sheet.csv"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("xl/workbook.xml", "<workbook/>")
    msg = _error(path)
    assert "Excel" in msg and "CSV" in msg


def test_binary_file(tmp_path):
    path = tmp_path / "blob.csv"
    path.write_bytes(b"text,label\n\x00\x01\x02\x03")
    assert "binary" in _error(path)


def test_unparseable_jsonl_line_gives_the_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "ok2", "label": "b"}\n{"text": "broken, "label": "a"}\n',
                    encoding="utf-8")
    msg = _error(path)
    assert "line 3" in msg and "Fix or delete line 3" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n["x", "y"]\n', encoding="utf-8")
    assert "line 2" in _error(path)


def test_invalid_json_file_gives_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a", "label": "x"},\n  {"text": "b" "label": "y"}\n]\n', encoding="utf-8")
    msg = _error(path)
    assert "not valid JSON" in msg and "line 3" in msg


def test_json_object_without_rows(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"a": 1, "b": 2}', encoding="utf-8")
    assert "list" in _error(path)


def test_duplicate_column_names(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("text,label,text\na,b,c\n", encoding="utf-8")
    assert "duplicate column" in _error(path)


def test_ragged_csv(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\na,b\nc,d,e,f\n", encoding="utf-8")
    assert "could not be parsed" in _error(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    assert "Parquet" in _error(path)


def test_size_limit(tmp_path):
    path = write_csv(tmp_path / "big.csv", class_rows(20))
    assert "limit" in _error(path, max_bytes=100)


# ---------------------------------------------------------------------------------------------
# columns


def test_classification_columns_detected():
    df = pd.DataFrame({"id": [1, 2], "Sentence": ["a", "b"], "category": ["x", "y"]})
    assert D.detect_columns(df, "classification") == {"text": "Sentence", "label": "category"}


def test_two_unnamed_columns_are_text_then_label():
    df = pd.DataFrame({"review_body": ["a", "b"], "stars": ["1", "2"]})
    assert D.detect_columns(df, "classification") == {"text": "review_body", "label": "stars"}


def test_missing_explicit_column_lists_the_existing_ones():
    df = pd.DataFrame({"body": ["a"], "topic": ["x"], "id": [1]})
    with pytest.raises(DataError) as err:
        D.detect_columns(df, "classification", DataConfig(text_column="text", label_column="topic"), name="d.csv")
    msg = str(err.value)
    assert "'text'" in msg and "d.csv" in msg and "Columns found: body, topic, id" in msg
    assert "data.text_column" in msg


def test_no_label_column_found_lists_columns():
    df = pd.DataFrame({"text": ["a"], "foo": ["x"], "bar": ["y"]})
    with pytest.raises(DataError) as err:
        D.detect_columns(df, "classification")
    assert "No label column" in str(err.value) and "text, foo, bar" in str(err.value)
    assert "data.label_column" in str(err.value)


@pytest.mark.parametrize("columns, fmt", [
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"),
    (["prompt", "completion"], "prompt_completion"),
    (["question", "answer"], "prompt_completion"),
    (["messages"], "messages"),
])
def test_instruction_formats_detected(columns, fmt):
    df = pd.DataFrame({c: ["x"] for c in columns})
    assert D.detect_columns(df, "instruction")["format"] == fmt


def test_no_instruction_columns_lists_columns():
    df = pd.DataFrame({"a": ["x"], "b": ["y"]})
    with pytest.raises(DataError) as err:
        D.detect_columns(df, "instruction")
    assert "Columns found: a, b" in str(err.value) and "prompt/completion" in str(err.value)


def test_explicit_instruction_column_missing():
    df = pd.DataFrame({"q": ["x"], "a": ["y"]})
    with pytest.raises(DataError, match="Columns found: q, a"):
        D.detect_columns(df, "instruction", DataConfig(prompt_column="question", completion_column="a"))
    cols = D.detect_columns(df, "instruction", DataConfig(prompt_column="q", completion_column="a"))
    assert cols == {"format": "prompt_completion", "prompt": "q", "completion": "a"}


# ---------------------------------------------------------------------------------------------
# classification labels


def test_single_class_refused():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "x"]})
    with pytest.raises(DataError) as err:
        D.clean_classification(df, "text", "label", "d.csv")
    assert "only one class" in str(err.value) and "'x'" in str(err.value) and err.value.fix


def test_labels_missing_refused():
    df = pd.DataFrame({"text": ["a", "b"], "label": [None, "  "]})
    with pytest.raises(DataError, match="empty label"):
        D.clean_classification(df, "text", "label")


def test_rows_without_label_or_text_dropped():
    df = pd.DataFrame({"text": ["a", "b", None, "d", " "], "label": ["x", None, "y", " y ", "x"]})
    out = D.clean_classification(df, "text", "label")
    assert out.to_dict("records") == [{"text": "a", "label": "x"}, {"text": "d", "label": "y"}]


def test_nested_text_refused():
    df = pd.DataFrame({"text": ["a", ["b", "c"]], "label": ["x", "y"]})
    with pytest.raises(DataError, match="row 2"):
        D.clean_classification(df, "text", "label")


def test_int_labels_keep_their_numbers_as_names(tmp_path):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([2, 10, 1, 2, 10, 1])]
    for path in (write_jsonl(tmp_path / "i.jsonl", rows), write_csv(tmp_path / "i.csv", rows)):
        df = D.read_table(path)
        out = D.clean_classification(df, "text", "label")
        assert D.label_names_for(out["label"]) == ["1", "2", "10"]      # numeric order, not "1","10","2"
    floats = pd.DataFrame({"text": ["a", "b"], "label": [1.0, 0.0]})
    out = D.clean_classification(floats, "text", "label")
    assert out["label"].tolist() == ["1", "0"]


def test_string_labels_sorted():
    assert D.label_names_for(pd.Series(["tech", "food", "sport", "food"])) == ["food", "sport", "tech"]


# ---------------------------------------------------------------------------------------------
# splits


def test_split_is_stratified():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(50)], "label": ["a"] * 40 + ["b"] * 10})
    train, val = D.split_frame(df, 0.2, seed=0, stratify="label")
    assert len(val) == 10 and len(train) == 40
    assert val["label"].value_counts().to_dict() == {"a": 8, "b": 2}
    assert not set(train["text"]) & set(val["text"])
    again, _ = D.split_frame(df, 0.2, seed=0, stratify="label")
    assert again["text"].tolist() == train["text"].tolist()          # same seed, same split


def test_split_falls_back_when_a_class_is_too_small():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(11)], "label": ["a"] * 10 + ["b"]})
    train, val = D.split_frame(df, 0.2, seed=0, stratify="label")
    assert len(train) + len(val) == 11


def test_split_needs_two_rows():
    with pytest.raises(DataError, match="too few"):
        D.split_frame(pd.DataFrame({"text": ["a"], "label": ["x"]}), 0.2, seed=0)


# ---------------------------------------------------------------------------------------------
# templates and exact label masks (real SmolLM2 tokenizer)

ALPACA = {"format": "alpaca", "instruction": "instruction", "input": "input", "output": "output"}
ROW = {"instruction": "Rewrite politely.", "input": "refund ok", "output": "Your refund is approved."}


def test_template_resolution(smol_tokenizer, bert_tokenizer):
    assert D.resolve_template("auto", smol_tokenizer) == "chat"
    assert D.resolve_template("auto", bert_tokenizer) == "alpaca"
    assert D.resolve_template("alpaca", smol_tokenizer) == "alpaca"
    with pytest.raises(DataError, match="no chat template"):
        D.resolve_template("chat", bert_tokenizer)


def _check_mask(ids, labels, prompt_ids, response_ids):
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [D.IGNORE_INDEX] * n                    # every prompt position masked
    assert labels[n:] == ids[n:] == response_ids[:len(ids) - n]  # every response position is its token
    assert len(ids) == len(labels)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_label_mask_is_exact(smol_tokenizer, template):
    tok = smol_tokenizer
    prompt, response = D.prompt_and_response(ROW, ALPACA, template, tok, 1)
    ids, labels, cut = D.encode_pair(prompt, response, tok, template, 512)
    prompt_ids = tok(prompt, add_special_tokens=template != "chat")["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"]
    _check_mask(ids, labels, prompt_ids, response_ids)
    assert not cut
    assert tok.decode([t for t in labels if t != D.IGNORE_INDEX]) == "Your refund is approved.<|im_end|>"
    if template == "chat":
        assert prompt.endswith("<|im_start|>assistant\n") and "refund ok" in prompt
    else:
        assert prompt == "### Instruction:\nRewrite politely.\n\n### Input:\nrefund ok\n\n### Response:\n"


def test_alpaca_prompt_without_input():
    assert D.alpaca_prompt("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert "### Input:" in D.alpaca_prompt("Say hi.", "to Bob")


def test_messages_prompt_and_response_are_the_last_turn(smol_tokenizer):
    tok = smol_tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Hi"},
            {"role": "gpt", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    cols = {"format": "messages", "messages": "messages"}
    for cell in (msgs, json.dumps(msgs)):                             # a list, or JSON text in a CSV cell
        prompt, response = D.prompt_and_response({"messages": cell}, cols, "chat", tok, 1)
        ids, labels, _ = D.encode_pair(prompt, response, tok, "chat", 512)
        assert tok.decode([t for t in labels if t != D.IGNORE_INDEX]) == "Paris.<|im_end|>"
        assert "Hello!" in prompt and "Be brief." in prompt           # earlier turns are context, masked
    parsed = D.row_to_messages({"messages": msgs}, cols, 1)
    assert [m["role"] for m in parsed] == ["system", "user", "assistant", "user", "assistant"]
    alpaca_prompt = D.render_prompt(parsed[:-1], "alpaca", tok)
    assert alpaca_prompt.startswith("### Instruction:\nBe brief.") and "Assistant: Hello!" in alpaca_prompt


def test_multi_turn_conversation_trains_every_assistant_answer(smol_tokenizer):
    """ShareGPT keys (from/value) accepted; both answers and their end-of-turn tokens are labelled,
    every other position (default system prompt, user turns, assistant headers) is -100."""
    tok = smol_tokenizer
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]
    cols = {"format": "messages", "messages": "conversations"}
    df = pd.DataFrame([{"conversations": sharegpt}])
    ex = D.tokenize_instruction(df, cols, tok, "chat", 512)
    ids, labels = ex.input_ids[0], ex.labels[0]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False).rstrip("\n")
    spans, current = [], []
    for t, lab in zip(ids, labels):
        if lab != D.IGNORE_INDEX:
            assert lab == t
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    assert spans == ["Hello!<|im_end|>\n", "Paris.<|im_end|>"]
    assert ex.prompts[0].endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")   # generation: last turn
    assert ex.references == ["Paris."]
    short = D.tokenize_instruction(df, cols, tok, "chat", 40)      # cut inside the first answer: still trains
    assert short.input_ids and len(short.input_ids[0]) == 40 and short.truncated == 1


@pytest.mark.parametrize("cell, fragment", [
    ([{"role": "user", "content": "hi"}], "last message must be the assistant"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown message role"),
    ("[not json", "not a JSON list"),
    ([], "non-empty list"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_bad_messages(cell, fragment):
    with pytest.raises(DataError, match=fragment):
        D.row_to_messages({"messages": cell}, {"format": "messages", "messages": "messages"}, 4)


def test_truncation_and_dropped_rows_counted(smol_tokenizer):
    tok = smol_tokenizer
    long_prompt = " ".join(["word"] * 100)
    df = pd.DataFrame([
        {"prompt": "Short question?", "completion": "Short answer."},                       # fits
        {"prompt": "Short question?", "completion": " ".join(["answer"] * 80)},            # response cut
        {"prompt": long_prompt, "completion": "Never seen."},                              # prompt fills it
    ])
    cols = {"format": "prompt_completion", "prompt": "prompt", "completion": "completion"}
    ex = D.tokenize_instruction(df, cols, tok, "alpaca", max_length=48)
    assert ex.dropped_too_long == 1 and ex.truncated == 1
    assert len(ex.input_ids) == 2 and ex.references == ["Short answer.", " ".join(["answer"] * 80)]
    assert all(len(x) <= 48 for x in ex.input_ids) and len(ex.input_ids[1]) == 48
    for ids, labels, prompt in zip(ex.input_ids, ex.labels, ex.prompts):
        n = len(tok(prompt)["input_ids"])
        assert labels[:n] == [D.IGNORE_INDEX] * n and labels[n:] == ids[n:] and len(labels[n:]) > 0
    assert D.encode_pair(long_prompt, "x", tok, "alpaca", 48) is None


def test_causal_collator_pads_to_the_longest_in_the_batch():
    collate = D.CausalCollator(pad_token_id=0)
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 6, 7, 8, 9], "labels": [-100] * 3 + [8, 9]}]
    batch = collate(feats)
    assert batch["input_ids"].shape == (2, 5)                         # longest row, never max_length
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 6, 7, -100, -100]    # padding never enters the loss
    assert batch["labels"][1].tolist() == [-100, -100, -100, 8, 9]
    assert D.CausalCollator(0, pad_to_multiple_of=8)(feats)["input_ids"].shape == (2, 8)


def test_classification_tokenization_is_dynamic(bert_tokenizer):
    from transformers import DataCollatorWithPadding

    enc = D.tokenize_classification(["short", "a somewhat longer text here", "mid size text"], [0, 1, 0],
                                    bert_tokenizer, max_length=128)
    lengths = [len(x) for x in enc["input_ids"]]
    assert len(set(lengths)) == 3 and max(lengths) < 128 and enc["labels"] == [0, 1, 0]
    batch = DataCollatorWithPadding(bert_tokenizer)([{k: enc[k][i] for k in enc} for i in range(3)])
    assert batch["input_ids"].shape[1] == max(lengths)
    long = D.tokenize_classification(["word " * 300], [0], bert_tokenizer, max_length=32)
    assert len(long["input_ids"][0]) == 32


def test_store_columns_records_detected_mapping():
    cfg = DataConfig()
    D.store_columns(cfg, {"text": "body", "label": "topic"})
    assert (cfg.text_column, cfg.label_column) == ("body", "topic")
    cfg = DataConfig()
    D.store_columns(cfg, {"format": "alpaca", "instruction": "i", "input": None, "output": "o"})
    assert (cfg.instruction_column, cfg.input_column, cfg.output_column) == ("i", None, "o")


# ---------------------------------------------------------------------------------------------
# NA-looking labels, blank responses


@pytest.mark.parametrize("ext, sep", [(".csv", ","), (".tsv", "\t")])
def test_na_looking_labels_are_class_names_and_only_empty_cells_are_missing(tmp_path, ext, sep):
    """pandas reads "None", "NA", "N/A", "null", "nan" as missing by default: here they are labels."""
    names = ["None", "NA", "N/A", "null", "nan", "#N/A"]
    lines = ["text" + sep + "label"] + [f"text number {i}{sep}{n}" for i, n in enumerate(names)]
    lines += [f"a row without a label{sep}", f"{sep}sport"]
    path = tmp_path / f"d{ext}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    df = D.read_table(path)
    assert df["label"].iloc[:6].tolist() == names
    assert df["label"].isna().tolist() == [False] * 6 + [True, False]
    assert df["text"].isna().tolist() == [False] * 7 + [True]
    out = D.clean_classification(df, "text", "label")
    assert sorted(out["label"]) == sorted(names)          # the unlabelled row and the empty text are dropped


def _alpaca(rows):
    return pd.DataFrame(rows), {"format": "alpaca", "instruction": "instruction", "input": "input",
                                "output": "output"}


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_blank_responses_are_dropped_and_counted(smol_tokenizer, template):
    """A blank answer would train the model on a lone end-of-turn token: the row is dropped and counted
    apart from rows cut by max_length."""
    df, cols = _alpaca([{"instruction": "Greet.", "input": "", "output": "Hello there."},
                        {"instruction": "Say nothing.", "input": "", "output": ""},
                        {"instruction": "Say nothing again.", "input": "", "output": "   \n "},
                        {"instruction": "Also nothing.", "input": "", "output": None},
                        {"instruction": " ".join(["word"] * 100), "input": "", "output": "Cut."}])
    ex = D.tokenize_instruction(df, cols, smol_tokenizer, template, max_length=48)
    assert len(ex.input_ids) == 1 and ex.references == ["Hello there."]
    assert ex.dropped_empty_response == 3 and ex.dropped_too_long == 1 and ex.dropped == 4
    prompt, response = D.prompt_and_response(df.iloc[1].to_dict(), cols, template, smol_tokenizer, 2)
    assert smol_tokenizer(response, add_special_tokens=False)["input_ids"]   # only the EOS/<|im_end|> ...
    assert D.encode_pair(prompt, response, smol_tokenizer, template, 48) is None   # ... so nothing to learn
