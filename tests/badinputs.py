"""A generator of bad (and awkward-but-valid) inputs, shared by the CLI tests and, later, the app tests.

Each case is a `BadInput`: the files to write, the task, config overrides, what the user runs
(`audit` for data-only problems, `train` with a tiny model where the problem shows up in training),
the exit code we expect (2 = refused with a message, 0 = handled) and fragments the message must
contain (the problem and the fix). Handled cases carry a `check(tmp, stdout)` that proves the data
was read right (text intact, formulas escaped in predictions.csv, ...).

    for case in CASES:
        argv = cli_args(case, tmp_dir, models={"tiny-bert": ..., "tiny-llama": ...})
        # python -m finetune_core *argv  ->  case.exit, case.expect in stderr

For the app: `case.data_path(tmp)` is the file to upload, `case.task` and `case.sets` the form's
settings, `case.model` the model field ("tiny-bert"/"tiny-llama" mean a tiny model folder).
`case.env` holds environment variables the case needs (deployment limits).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

FORMULA = "=cmd|' /C calc'!A0"
FORMULAS = [FORMULA, "+SUM(1+1)*cmd|' /C calc'!A0", "-2+3+cmd|' /C notepad'!A0", "@SUM(A1:A9)"]
SCRIPT = "<script>alert('x')</script> <b>bold</b> &amp; <img src=x onerror=alert(1)>"
LATIN1_TEXT = "Café crème brûlée du garçon à l'hôtel"
BOM_TEXT = "naïve résumé — “quoted” ✓"

WORDS = {
    "sport": "goal match team coach striker league referee season stadium penalty",
    "food": "recipe oven flour sauce garlic butter dinner chef spicy bake",
    "tech": "server code python cloud database laptop network kernel compiler api",
}

# Fast TrainingArguments for the tiny-model runs: one step, no evaluation loop, no checkpoints.
FAST_TRAINING = {"max_steps": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
                 "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "warmup_steps": 0,
                 "train_sampling_strategy": "random"}


def class_rows(per_label: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(v.split()) for _ in range(6)) + ".", "label": label}
            for label, v in WORDS.items() for _ in range(per_label)]
    rng.shuffle(rows)
    return rows


def instruction_rows(n: int = 10) -> list[dict]:
    return [{"instruction": "Reply politely to this note.", "input": f"order {i} delayed",
             "output": f"Sorry, order {i} is on its way."} for i in range(n)]


def csv_bytes(rows: list[dict], sep: str = ",", encoding: str = "utf-8") -> bytes:
    import pandas as pd

    return pd.DataFrame(rows).to_csv(index=False, sep=sep).encode(encoding)


def jsonl_bytes(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# builders for files that are not just bytes


def xlsx_file(path: Path) -> None:
    """A real Excel workbook, saved under a .csv name."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(["text", "label"])
    for r in class_rows(3):
        ws.append([r["text"], r["label"]])
    buf = io.BytesIO()
    wb.save(buf)
    path.write_bytes(buf.getvalue())


def big_file(size_mb: float) -> Callable[[Path], None]:
    """A valid CSV just over `size_mb` MB: few rows of ~50 KB texts (cheap to read and audit)."""
    def build(path: Path) -> None:
        rng = random.Random(1)
        target = int(size_mb * 1_000_000) + 1000
        with open(path, "w", encoding="utf-8") as f:
            f.write("text,label\n")
            written, i = 0, 0
            labels = list(WORDS)
            while written < target:
                label = labels[i % 3]
                vocab = WORDS[label].split()
                text = " ".join(rng.choice(vocab) for _ in range(6000))
                line = f"{text},{label}\n"
                f.write(line)
                written += len(line)
                i += 1
    return build


def _tokenizer_files(path: Path) -> None:
    import shutil

    from finetune_core.models import resolve_model

    path.mkdir(parents=True, exist_ok=True)
    src = Path(resolve_model("bundled:minilm-l6"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)


def model_without_weights(path: Path) -> None:
    _tokenizer_files(path)
    (path / "config.json").write_bytes(TINY_BERT_CONFIG)


def model_with_corrupt_weights(path: Path) -> None:
    model_without_weights(path)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\x00" * 100)


def model_without_tokenizer(path: Path) -> None:
    """A loadable tiny BERT (config + safetensors weights) with no tokenizer files next to it."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(path)


def huge_cell_file(path: Path) -> None:
    rows = class_rows(4)
    rows[5]["text"] = ("very long text, with commas and \"quotes\"\n and newlines " * 20000)[:1_000_000]
    path.write_bytes(csv_bytes(rows))


def many_rows(n: int) -> bytes:
    return csv_bytes([{"text": f"row {i} " + ("goal match" if i % 2 else "oven sauce"), "label": ["sport", "food"][i % 2]}
                      for i in range(n)])


# ---------------------------------------------------------------------------------------------
# checks for handled cases


def _read(tmp: Path, name: str):
    from finetune_core.data import read_table

    return read_table(tmp / name)


def check_text(name: str, expected: str, column: str = "text") -> Callable:
    def check(tmp: Path, output: str) -> None:
        df = _read(tmp, name)
        assert column in df.columns, f"{column!r} not in {list(df.columns)} (BOM kept in the header?)"
        assert expected in df[column].tolist(), f"{expected!r} not read back from {name}: {df[column].tolist()[:3]}"
    return check


def check_predictions_escaped(tmp: Path, output: str) -> None:
    """predictions.csv: formula cells start with an apostrophe, HTML is kept verbatim as text."""
    import csv

    text = (tmp / "run" / "predictions.csv").read_text(encoding="utf-8")
    cells = [row[0] for row in csv.reader(io.StringIO(text))][1:]
    assert cells, "predictions.csv has no rows"
    for cell in cells:
        assert cell[:1] not in ("=", "+", "-", "@"), f"unescaped formula in predictions.csv: {cell!r}"
    df = _read(tmp, "formulas.csv")
    assert FORMULA in df["text"].tolist() and SCRIPT in df["text"].tolist()   # kept as text on the way in
    escaped = {c for c in cells if c.startswith("'")}
    assert escaped, "no formula row reached predictions.csv"
    originals = {c[1:] for c in escaped}
    in_val = originals | {c for c in cells if not c.startswith("'")}
    assert in_val <= set(df["text"]), "predictions.csv texts differ from the input"
    assert all(o[:1] in ("=", "+", "-", "@") for o in originals)


def check_dropped_counted(tmp: Path, output: str) -> None:
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert metrics["dropped_rows"] >= 1, metrics["dropped_rows"]
    events = [json.loads(line) for line in (tmp / "run" / "events.jsonl").read_text().splitlines()]
    assert any("rows dropped" in str(e.get("message", "")) for e in events)


def check_huge_cell(tmp: Path, output: str) -> None:
    df = _read(tmp, "huge.csv")
    assert list(df.columns) == ["text", "label"] and len(df) == 12
    assert max(len(t) for t in df["text"]) == 1_000_000


def check_rare_class_trained(tmp: Path, output: str) -> None:
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert "rare" in metrics["labels"], metrics["labels"]


def check_audit_ran(tmp: Path, output: str) -> None:
    assert "rows" in output.lower(), output[:500]


# ---------------------------------------------------------------------------------------------
# the cases


@dataclass
class BadInput:
    name: str
    command: str                                  # "audit" | "train"
    files: dict = field(default_factory=dict)     # file name -> bytes | callable(path)
    expect: list = field(default_factory=list)    # fragments of the message (problem first, then fix)
    exit: int = 2
    task: str = "classification"
    sets: list = field(default_factory=list)      # --set overrides
    model: str = "tiny-bert"                      # train: "tiny-bert", "tiny-llama", or a literal id ({tmp})
    data: str | None = None                       # data.train; default: the first file
    raw: list = field(default_factory=list)       # extra raw CLI arguments (after the command's own)
    config_text: str | None = None                # a config file written verbatim (YAML)
    config_path: str | None = None                # train this config path as given (nothing written)
    env: dict = field(default_factory=dict)
    tokenizer: bool = False                       # audit: count tokens (slower)
    check: Callable | None = None                 # handled cases: check(tmp, stdout)
    outcome: str = ""                             # one line for the README table

    def data_path(self, tmp: Path) -> str:
        if self.data is not None:
            return _fill(self.data, tmp)
        return str(tmp / next(iter(self.files)))


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def write_files(case: BadInput, tmp: Path) -> None:
    for name, content in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)


def cli_args(case: BadInput, tmp: Path, models: dict[str, str]) -> list[str]:
    """Write the case's files (and config) into `tmp` and return the argv for `python -m finetune_core`."""
    tmp.mkdir(parents=True, exist_ok=True)
    write_files(case, tmp)
    sets = [a for s in case.sets for a in ("--set", _fill(s, tmp))]
    if case.command == "audit":
        argv = ["audit", case.data_path(tmp), "--task", case.task]
        if not case.tokenizer:
            argv.append("--no-tokenizer")
        return argv + sets + list(case.raw)
    if case.config_path is not None:
        return ["train", _fill(case.config_path, tmp)] + sets + list(case.raw)
    config = tmp / "config.yaml"
    if case.config_text is not None:
        config.write_text(_fill(case.config_text, tmp), encoding="utf-8")
    else:
        model = _fill(models.get(case.model, case.model), tmp)
        values = {"task": case.task, "model": model,
                  "data": {"train": case.data_path(tmp), "max_length": 64},
                  "strategy": {"name": "lora"}, "training": dict(FAST_TRAINING),
                  "output_dir": str(tmp / "run"), "seed": 1}
        config.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return ["train", str(config)] + sets + list(case.raw)


GOOD = csv_bytes(class_rows())
TINY_BERT_CONFIG = json.dumps({"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522,
                               "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2}).encode()
LONG_PROMPT = "Explain this in detail please. " * 40     # ~280 tokens: fills max_length=64 on its own

CASES: list[BadInput] = [
    # --- files that cannot be read -------------------------------------------------------------
    BadInput("empty file", "audit", {"empty.csv": b""}, ["'empty.csv' is empty (0 bytes)", "Upload a file with"]),
    BadInput("whitespace only", "audit", {"blank.csv": b"  \n\n \t\n"}, ["only whitespace", "Upload a file"]),
    BadInput("header only", "audit", {"header.csv": b"text,label\n"},
             ["has a header (text, label) but no data rows", "Add rows below the header"]),
    BadInput("binary file", "audit", {"data.csv": bytes(range(256)) * 40},
             ["'data.csv' is a binary file", "Upload a CSV, TSV, JSON, JSONL or Parquet"]),
    BadInput("xlsx renamed .csv", "audit", {"sheet.csv": xlsx_file},
             ["'sheet.csv' is a zip or Excel (.xlsx) file", "save it as CSV (UTF-8)"]),
    BadInput("unsupported extension", "audit", {"notes.txt": GOOD},
             ["unsupported extension '.txt'", ".csv, .tsv, .json, .jsonl, .parquet"]),
    BadInput("data path is a folder", "audit", {}, ["is a folder, not a data file", "Give the path of a CSV"],
             data="{tmp}"),
    BadInput("missing data file", "audit", {}, ["does not exist", "Check the path"], data="{tmp}/nope.csv"),
    BadInput("hub dataset id", "train", {}, ["'stanfordnlp/imdb' does not exist", "Hugging Face Hub dataset id",
                                             "Download the dataset once"], data="stanfordnlp/imdb"),
    BadInput("unclosed quote", "audit", {"quote.csv": b'text,label\n"never closed,sport\nok,food\n'},
             ["could not be parsed as a table", "quoted"]),
    BadInput("wrong delimiter (colon)", "audit", {"colon.csv": csv_bytes(class_rows(), sep=":")},
             ["has only one column ('text:label')", "delimiter", "comma-separated"]),
    BadInput("unquoted commas in every text", "audit",
             {"commas.csv": b"text,label\n" + b"".join(b"hello, world %d,sport\n" % i for i in range(6))},
             ["more fields in its rows than names in its header", "Put quotes around texts"]),
    BadInput(".tsv that is comma-separated", "audit", {"data.tsv": GOOD},
             ["has only one column ('text,label')", "delimiter"]),
    BadInput("corrupt parquet", "audit", {"data.parquet": b"PAR1 garbage garbage"},
             ["not a readable Parquet file", "save it as CSV"]),
    # --- JSON --------------------------------------------------------------------------------------
    BadInput("JSON object instead of list", "audit", {"obj.json": b'{"text": "a", "label": "b"}'},
             ["holds a JSON object, not a list of rows", "Make the file a list of objects"]),
    BadInput("JSON list of numbers", "audit", {"nums.json": b"[1, 2, 3]"},
             ["must be a JSON list of objects", "Example"]),
    BadInput("invalid JSON", "audit", {"bad.json": b'[{"text": "a", "label": "b"},\n {"text": }]'},
             ["is not valid JSON (line 2", "Fix the syntax there"]),
    BadInput("JSONL with one broken line", "audit",
             {"broken.jsonl": jsonl_bytes(class_rows()[:4]) + b'{"text": "oops", label: sport}\n'
              + jsonl_bytes(class_rows()[4:8])},
             ["'broken.jsonl' line 5 is not valid JSON", "Fix or delete line 5"]),
    BadInput("JSONL line that is a list", "audit", {"list.jsonl": jsonl_bytes(class_rows()[:3]) + b'["a", "b"]\n'},
             ["line 4 is a JSON list, not an object", "one object per line"]),
    BadInput("nested objects in the text column", "train",
             {"nested.jsonl": jsonl_bytes([{"text": {"title": "t", "body": "b"} if i == 2 else r["text"],
                                            "label": r["label"]} for i, r in enumerate(class_rows())])},
             ["Column 'text' holds nested objects", "first at row 3", "Flatten them into plain text"]),
    # --- columns -----------------------------------------------------------------------------------
    BadInput("no text/label columns", "audit", {"cols.csv": b"foo,bar,baz\n1,2,3\n4,5,6\n"},
             ["No text column found", "Columns found: foo, bar, baz", "data.text_column"]),
    BadInput("named text column missing", "audit", {"good.csv": GOOD},
             ["Column 'body' (the text column) is not in", "Columns found: text, label", "data.text_column"],
             sets=["data.text_column=body"]),
    BadInput("duplicate columns", "audit", {"dup.csv": b"text,label,label\nhello,a,b\nbye,b,a\n"},
             ["duplicate column names", "unique name"]),
    BadInput("no instruction columns", "audit", {"i.jsonl": jsonl_bytes([{"q": "a", "a": "b"}])},
             ["Could not find instruction columns", "Columns found: q, a", "instruction/input/output"],
             task="instruction"),
    # --- labels / rows -------------------------------------------------------------------------------
    BadInput("all labels empty (NaN)", "train",
             {"nolabel.csv": csv_bytes([{"text": r["text"], "label": None} for r in class_rows()])},
             ["Every row of nolabel.csv has an empty label in column 'label'", "Fill in the labels"]),
    BadInput("all texts empty", "train",
             {"notext.csv": csv_bytes([{"text": "  ", "label": r["label"]} for r in class_rows()])},
             ["no row with both a text and a label", "Check the column mapping"]),
    BadInput("a single class", "train", {"one.csv": csv_bytes([{"text": f"t {i}", "label": "spam"} for i in range(8)])},
             ["only one class ('spam')", "Add examples of the other classes"]),
    BadInput("one row", "train", {"row.csv": b"text,label\nhello there,greeting\n"},
             ["only 1 usable row", "Add more rows"]),
    BadInput("more classes than rows can teach", "train",
             {"classes.csv": csv_bytes([{"text": f"text number {i}", "label": f"class{i}"} for i in range(6)])},
             ["6 classes in 6 rows", "every class has a single example", "at least 2 examples per class"]),
    BadInput("unseen validation labels", "train",
             {"t.csv": GOOD, "v.csv": csv_bytes([{"text": "x y", "label": "music"}, {"text": "z", "label": "sport"}])},
             ["labels the training data never shows: music", "Add training examples"],
             sets=["data.validation={tmp}/v.csv"]),
    BadInput("validation file with other column names", "train",
             {"t.csv": GOOD, "v.csv": csv_bytes([{"text": r["text"], "category": r["label"]} for r in class_rows(2)])},
             ["Column 'label' (the label column) is not in v.csv", "Columns found: text, category"],
             sets=["data.validation={tmp}/v.csv"]),
    BadInput("validation file is an Excel workbook", "train", {"t.csv": GOOD, "v.csv": xlsx_file},
             ["'v.csv' is a zip or Excel (.xlsx) file", "save it as CSV (UTF-8)"],
             sets=["data.validation={tmp}/v.csv"]),
    BadInput("file over the upload limit (FINETUNE_MAX_UPLOAD_MB)", "audit", {"big.csv": big_file(50.5)},
             ["'big.csv' is 50.5 MB, above this app's limit of 10 MB (FINETUNE_MAX_UPLOAD_MB)",
              "Upload a smaller sample"], env={"FINETUNE_MAX_UPLOAD_MB": "10"}),
    BadInput("too many rows (FINETUNE_MAX_ROWS)", "audit", {"rows.csv": many_rows(60)},
             ["has 60 rows, above this app's limit of 50 rows (FINETUNE_MAX_ROWS)", "at most 50 rows"],
             env={"FINETUNE_MAX_ROWS": "50"}),
    BadInput("bad limit variable", "audit", {"good.csv": GOOD},
             ["FINETUNE_MAX_ROWS='lots' is not a number", "positive number"], env={"FINETUNE_MAX_ROWS": "lots"}),
    # --- instruction data ----------------------------------------------------------------------------
    BadInput("chat message with an unknown role", "train",
             {"chat.jsonl": jsonl_bytes([{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "wizard", "content": "poof"}]}] * 6)},
             ["Row 1: unknown message role 'wizard'", "Use one of: system, user, assistant"],
             task="instruction", model="tiny-llama"),
    BadInput("messages cell is not a list", "train",
             {"chat.jsonl": jsonl_bytes([{"messages": "hello"}] * 6)},
             ["Row 1: the messages cell is not a JSON list", '[{"role": "user"'],
             task="instruction", model="tiny-llama"),
    BadInput("every prompt longer than max_length", "train",
             {"long.jsonl": jsonl_bytes([{"instruction": LONG_PROMPT + str(i), "output": "ok"} for i in range(8)])},
             ["Every training row's prompt is longer than max_length=64", "Raise data.max_length"],
             task="instruction", model="tiny-llama"),
    # --- models ----------------------------------------------------------------------------------------
    BadInput("hub model id offline", "train", {"good.csv": GOOD},
             ["'no-such-org/no-such-model' is not bundled or cached", "cannot be reached (offline)",
              "bundled:minilm-l6"], model="no-such-org/no-such-model"),
    BadInput("unknown bundled model", "train", {"good.csv": GOOD},
             ["Unknown bundled model 'bundled:gpt-17'", "bundled:minilm-l6, bundled:smollm2-135m"],
             model="bundled:gpt-17"),
    BadInput("model path is not a model directory", "train", {"good.csv": GOOD, "junk/notes.txt": b"hi"},
             ["is not a model directory (no config.json", "Point to the folder that holds config.json"],
             model="{tmp}/junk"),
    BadInput("model path is a system file", "train", {"good.csv": GOOD},
             ["'/etc/passwd' does not exist or is not a folder", "contains config.json"], model="/etc/passwd"),
    BadInput("model config is not JSON", "train", {"good.csv": GOOD, "m/config.json": b"{not json"},
             ["config.json in", "cannot be read", "Re-save the model"], model="{tmp}/m"),
    BadInput("model needs remote code", "train",
             {"good.csv": GOOD, "m/config.json": json.dumps({"model_type": "evil-net", "auto_map": {
                 "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}).encode()},
             ["custom code", "never runs", "bundled"], model="{tmp}/m"),
    BadInput("model folder without weights", "train", {"good.csv": GOOD, "m": model_without_weights},
             ["has no weights", "model.safetensors"], model="{tmp}/m"),
    BadInput("model weights corrupt", "train", {"good.csv": GOOD, "m": model_with_corrupt_weights},
             ["The weights of", "cannot be loaded", "re-save the model"], model="{tmp}/m"),
    BadInput("model folder without a tokenizer", "train", {"good.csv": GOOD, "m": model_without_tokenizer},
             ["The tokenizer of", "cannot be loaded", "needs its tokenizer files"], model="{tmp}/m"),
    BadInput("encoder for instruction tuning", "train", {"i.jsonl": jsonl_bytes(instruction_rows())},
             ["is an encoder", "causal LM"], task="instruction"),
    # --- config ----------------------------------------------------------------------------------------
    BadInput("missing config file", "train", {}, ["none.yaml' does not exist", "examples/configs"],
             config_path="{tmp}/none.yaml"),
    BadInput("config is not YAML", "train", {"good.csv": GOOD}, ["is not valid YAML", "Fix the indentation"],
             config_text="task: classification\n  model: [unclosed\n"),
    BadInput("unknown config key", "train", {"good.csv": GOOD},
             ["Unknown config key 'modle'. Did you mean 'model'?", "Valid keys here"], sets=["modle=x"]),
    BadInput("unknown nested key", "train", {"good.csv": GOOD},
             ["Unknown config key 'data.text_colum'. Did you mean 'text_column'?", "Valid keys here"],
             sets=["data.text_colum=text"]),
    BadInput("unknown training option", "train", {"good.csv": GOOD},
             ["Unknown training option 'training.learning_rat'. Did you mean 'learning_rate'?",
              "TrainingArguments"], sets=["training.learning_rat=1e-4"]),
    BadInput("--set without '='", "train", {"good.csv": GOOD},
             ["Override 'training.learning_rate' has no '='", "--set key.sub=value"],
             sets=["training.learning_rate"]),
    BadInput("--set with an empty key", "train", {"good.csv": GOOD},
             ["Override '=3' has no key", "--set key.sub=value"], sets=["=3"]),
    BadInput("--set into a plain value", "train", {"good.csv": GOOD},
             ["'task' is a value ('classification'), not a section", "--set task=..."], sets=["task.name=x"]),
    BadInput("negative learning rate", "train", {"good.csv": GOOD},
             ["training.learning_rate must be a positive number, got -0.001",
              "The defaults: full 5e-5 (encoder)", "LoRA 1e-3 (encoder), 2e-4 (causal LM)"],
             sets=["training.learning_rate=-1e-3"]),
    BadInput("learning rate as words", "train", {"good.csv": GOOD},
             ["training.learning_rate must be a positive number, got 'fast'"], sets=["training.learning_rate=fast"]),
    BadInput("zero epochs", "train", {"good.csv": GOOD},
             ["training.num_train_epochs must be a positive number, got 0",
              "The defaults: 10 (classification, with early stopping), 3 (instruction)"],
             sets=["training.num_train_epochs=0", "training.max_steps=-1"]),
    BadInput("batch size zero", "train", {"good.csv": GOOD},
             ["training.per_device_train_batch_size must be a whole number >= 1, got 0"],
             sets=["training.per_device_train_batch_size=0"]),
    BadInput("max_length too small", "train", {"good.csv": GOOD},
             ["data.max_length must be a whole number >= 16, got 4", "Typical"], sets=["data.max_length=4"]),
    BadInput("val_size above 1", "train", {"good.csv": GOOD},
             ["data.val_size must be a fraction between 0 and 1, got 1.5"], sets=["data.val_size=1.5"]),
    BadInput("val_size leaves no training rows", "train", {"good.csv": csv_bytes(class_rows(2))},
             ["leaves no rows", "data.val_size"], sets=["data.val_size=0.95"]),
    BadInput("unknown task", "audit", {"good.csv": GOOD}, ["invalid choice: 'clasification'"],
             task="clasification"),
    BadInput("half precision on CPU", "train", {"good.csv": GOOD},
             ["training.bf16 is on but there is no CUDA GPU", "float32"], sets=["training.bf16=true"]),
    # --- preference pairs (task preference, TRL's prompt / chosen / rejected) ----------------------------
    BadInput("pairs without rejected answers", "audit",
             {"pairs.jsonl": jsonl_bytes([{"prompt": f"Question {i}?", "chosen": f"Answer {i}."} for i in range(6)])},
             ["No 'rejected' column found in pairs.jsonl", "Columns found: prompt, chosen",
              "map yours with data.prompt_column"], task="preference"),
    BadInput("a pair cell holds an object", "audit",
             {"pairs.jsonl": jsonl_bytes([{"prompt": "Hi?", "chosen": {"text": "Hello."}, "rejected": "Go away."}]
                                         + [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(5)])},
             ["Row 1: column 'chosen' holds an object, not text", "Write text"], task="preference"),
    BadInput("every pair has the same answer twice", "train",
             {"pairs.jsonl": jsonl_bytes([{"prompt": f"Question {i}?", "chosen": "Same.", "rejected": "Same."}
                                          for i in range(8)])},
             ["No usable training pair", "the same answer on both sides", "a worse (rejected) answer"],
             task="preference", model="tiny-llama"),
    # --- handled: these must load / train correctly --------------------------------------------------
    BadInput("latin-1 file", "audit",
             {"latin.csv": ("text,label\n" + "\n".join(f"{LATIN1_TEXT} {i},{l}" for i, l in
                                                        enumerate(["food", "sport"] * 4)) + "\n").encode("latin-1")},
             [], exit=0, check=check_text("latin.csv", f"{LATIN1_TEXT} 0"), outcome="loads, accents intact"),
    BadInput("UTF-8 with BOM", "audit",
             {"bom.csv": b"\xef\xbb\xbf" + ("text,label\n" + "\n".join(f"{BOM_TEXT} {i},{l}" for i, l in
                                                                      enumerate(["food", "sport"] * 4)) + "\n").encode()},
             [], exit=0, check=check_text("bom.csv", f"{BOM_TEXT} 0"), outcome="loads; header has no BOM"),
    BadInput("semicolon delimiter", "audit", {"semi.csv": csv_bytes(class_rows(), sep=";")}, [], exit=0,
             check=check_text("semi.csv", class_rows()[0]["text"]), outcome="delimiter sniffed"),
    BadInput("some labels empty", "audit",
             {"some.csv": csv_bytes([{**r, "label": None if i < 3 else r["label"]} for i, r in enumerate(class_rows())])},
             ["missing"], exit=0, outcome="rows without a label are dropped and counted"),
    BadInput("a 1 MB text cell", "audit", {"huge.csv": huge_cell_file}, [], exit=0,
             check=check_huge_cell, outcome="loads intact; training truncates to max_length"),
    BadInput("a class with a single example", "train",
             {"rare.csv": csv_bytes(class_rows() + [{"text": "a lonely example", "label": "rare"}])}, [], exit=0,
             check=check_rare_class_trained, outcome="trains; the lone row stays in the training split"),
    BadInput("a 50 MB file (no limit set)", "audit", {"big.csv": big_file(50.5)}, [], exit=0,
             check=check_audit_ran, outcome="handled (local CLI has no size limit)"),
    BadInput("formula cells and HTML (trains; predictions.csv escaped)", "train",
             {"formulas.csv": csv_bytes([{"text": (FORMULAS[i % 4] if i % 3 == 0 else SCRIPT if i % 3 == 1 else r["text"]),
                                          "label": r["label"]} for i, r in enumerate(class_rows(8))])},
             [], exit=0, check=check_predictions_escaped, sets=["data.val_size=0.5"],
             outcome="kept as text; predictions.csv cells start with an apostrophe"),
    BadInput("some prompts longer than max_length", "train",
             {"mixed.jsonl": jsonl_bytes([{"instruction": (LONG_PROMPT if i < 3 else "Say hi.") + str(i),
                                           "output": "Hi there."} for i in range(12)])},
             [], exit=0, check=check_dropped_counted, task="instruction", model="tiny-llama",
             outcome="dropped and counted (metrics dropped_rows, info event)"),
]
