"""Read data files, map columns, split, format prompts and tokenize with exact label masks.

    df = read_table("examples/data/domains.csv")
    cols = detect_columns(df, "classification")       # {'text': 'text', 'label': 'label'}
    train_df, val_df = split_frame(df, 0.2, seed=42, stratify="label")

Instruction rows become (prompt, response) pairs; `tokenize_instruction` puts -100 on every prompt
position (and the collator on every padding position), so the loss is taken on response tokens only.
The Data tab reads and audits files through this module, so scikit-learn and torch load only inside
the two functions that use them (split_frame, CausalCollator).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import limits
from .errors import ConfigError, DataError

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
TEXT_CANDIDATES = ("text", "sentence", "content", "review", "query", "utterance", "message", "document",
                   "body", "input", "question")
LABEL_CANDIDATES = ("label", "labels", "category", "class", "intent", "target", "sentiment", "y")
CHAT_ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


# ---------------------------------------------------------------------------------------------
# cells


def is_missing(v) -> bool:
    """None, NaN and pandas' NA and NaT (nullable dtypes, e.g. from Parquet) all mean 'no value'."""
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v))


def normalise_label(v) -> str | None:
    """A label cell as training and the audit compare labels: a stripped string, a whole float without
    its '.0' (a CSV column read as numbers gives 1.0 for "1"); None when missing or blank."""
    if is_missing(v) or str(v).strip() == "":
        return None
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


# ---------------------------------------------------------------------------------------------
# reading


def _decode(raw: bytes, name: str) -> tuple[str, str]:
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise DataError(f"'{name}' is not in a text encoding we can read.", "Save it as UTF-8 and upload it again.")


def _check_not_binary(raw: bytes, name: str) -> None:
    head = raw[:8192]
    if head.startswith(b"PK\x03\x04"):
        raise DataError(f"'{name}' is a zip or Excel (.xlsx) file, not plain text.",
                        "Open it in your spreadsheet program and save it as CSV (UTF-8), then upload that.")
    if head.startswith(b"PAR1"):
        raise DataError(f"'{name}' is a Parquet file with a wrong extension.", "Rename it to .parquet.")
    if b"\x00" in head:
        raise DataError(f"'{name}' is a binary file, not text.",
                        "Upload a CSV, TSV, JSON, JSONL or Parquet file.")


def _read_delimited(text: str, name: str, sep: str | None) -> pd.DataFrame:
    if sep is None:
        try:
            sep = csv.Sniffer().sniff(text[:20000], delimiters=",;\t|").delimiter
        except csv.Error:
            sep = ","
    try:
        # Only an empty cell is missing: pandas' default NA strings would turn labels such as "None",
        # "NA", "N/A" or "null" (real class names) into missing values and drop their rows.
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=object, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"'{name}' is empty.", "Upload a file with a header row and at least one data row.") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"'{name}' could not be parsed as a table: {str(exc).strip()}",
                        "Check that every row has the same number of fields and that text with commas is "
                        "quoted.") from exc
    if not isinstance(df.index, pd.RangeIndex):
        raise DataError(f"'{name}' has more fields in its rows than names in its header: a text with commas "
                        "(or another delimiter) is probably not quoted.",
                        'Put quotes around texts that contain the delimiter ("a, b",label), or add the missing '
                        "column names to the header.")
    return df


def _read_json(text: str, name: str) -> pd.DataFrame:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(text, name)   # JSON Lines saved with a .json extension
        raise DataError(f"'{name}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).",
                        "Fix the syntax there, or save one object per line as .jsonl.") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        else:
            raise DataError(f"'{name}' holds a JSON object, not a list of rows.",
                            'Make the file a list of objects: [{"text": "...", "label": "..."}, ...].')
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"'{name}' must be a JSON list of objects (one object per row).",
                        'Example: [{"text": "...", "label": "..."}, ...].')
    return pd.DataFrame(data)


def _read_jsonl(text: str, name: str) -> pd.DataFrame:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"'{name}' line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}).",
                            f"Fix or delete line {lineno}; every line must be one JSON object.") from exc
        if not isinstance(row, dict):
            raise DataError(f"'{name}' line {lineno} is a JSON {type(row).__name__}, not an object.",
                            'Write one object per line, like {"text": "...", "label": "..."}.')
        rows.append(row)
    return pd.DataFrame(rows)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_table(path: str | Path, max_bytes: int | None = None, max_rows: int | None = None) -> pd.DataFrame:
    """Read CSV/TSV/JSON/JSONL/Parquet into a DataFrame, or raise DataError with the fix.

    max_bytes / max_rows: None = the deployment limits from the environment (finetune_core.limits:
    FINETUNE_MAX_UPLOAD_MB when set, FINETUNE_MAX_ROWS), which are unset on a local machine.
    """
    path = Path(path)
    name = path.name
    size_var = rows_var = ""
    if max_bytes is None:
        max_bytes, size_var = limits.engine_max_bytes(), " (FINETUNE_MAX_UPLOAD_MB)"
    if max_rows is None:
        max_rows, rows_var = limits.max_rows(), " (FINETUNE_MAX_ROWS)"
    if not path.exists():
        if _HUB_ID.fullmatch(str(path)) and path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(f"The data file '{path}' does not exist. It looks like a Hugging Face Hub dataset id; "
                            "FineTune Lab reads local files only and never downloads datasets.",
                            "Download the dataset once (datasets.load_dataset(...).to_csv('train.csv')) and give "
                            "the path of that file.")
        raise DataError(f"The data file '{path}' does not exist.", "Check the path and the file name.")
    if path.is_dir():
        raise DataError(f"'{path}' is a folder, not a data file.", "Give the path of a CSV, JSON(L) or Parquet file.")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"'{name}' has an unsupported extension '{ext or '(none)'}'.",
                        f"Use one of: {', '.join(SUPPORTED_EXTENSIONS)}.")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"'{name}' is empty (0 bytes).", "Upload a file with a header row and data rows.")
    if max_bytes is not None and size > max_bytes:
        raise DataError(f"'{name}' is {size / 1e6:.1f} MB, above this app's limit of {max_bytes / 1e6:g} MB"
                        f"{size_var}.",
                        "Upload a smaller sample, or run the CLI on your own machine for large files.")
    if ext == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise DataError(f"'{name}' is not a readable Parquet file ({exc}).",
                            "Re-export it, or save it as CSV.") from exc
    else:
        raw = path.read_bytes()
        _check_not_binary(raw, name)
        text, _encoding = _decode(raw, name)
        if not text.strip():
            raise DataError(f"'{name}' contains only whitespace.", "Upload a file with data rows.")
        if ext == ".csv":
            df = _read_delimited(text, name, None)
        elif ext == ".tsv":
            df = _read_delimited(text, name, "\t")
        elif ext == ".json":
            df = _read_json(text, name)
        else:
            df = _read_jsonl(text, name)
    if len(df.columns) == 0:
        raise DataError(f"'{name}' has no columns.", "Add a header row naming the columns.")
    if len(df) == 0:
        raise DataError(f"'{name}' has a header ({', '.join(map(str, df.columns))}) but no data rows.",
                        "Add rows below the header.")
    if max_rows is not None and len(df) > max_rows:
        raise DataError(f"'{name}' has {len(df):,} rows, above this app's limit of {max_rows:,} rows{rows_var}.",
                        f"Upload a sample of at most {max_rows:,} rows, or run FineTune Lab on your own machine "
                        "for larger data.")
    dupes = [c for c in df.columns if re.fullmatch(r"(.+)\.\d+", str(c)) and
             re.fullmatch(r"(.+)\.\d+", str(c)).group(1) in df.columns]
    if dupes:
        raise DataError(f"'{name}' has duplicate column names ({', '.join(map(str, dupes))} repeat a name).",
                        "Give every column a unique name in the header row.")
    df.columns = [str(c).strip() for c in df.columns]
    return df


# ---------------------------------------------------------------------------------------------
# columns


def _pick(columns, candidates):
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _require(df: pd.DataFrame, column: str, role: str, name: str = "the data") -> str:
    if column not in df.columns:
        raise DataError(f"Column '{column}' (the {role} column) is not in {name}. "
                        f"Columns found: {', '.join(map(str, df.columns))}.",
                        f"Pick the {role} column from those, e.g. --set data.{role}_column=NAME.")
    return column


def detect_columns(df: pd.DataFrame, task: str, data_cfg=None, name: str = "the data") -> dict:
    """Return the column mapping for `task`, honouring explicit names in `data_cfg`.

    classification: {'text', 'label'}; instruction: {'format': alpaca|prompt_completion|messages, ...}.
    """
    cols = list(df.columns)
    given = data_cfg
    if len(cols) == 1 and not (task == "instruction" and str(cols[0]).lower() in ("messages", "conversations")):
        raise DataError(f"{name} has only one column ('{cols[0]}'): the file may use a delimiter other than "
                        "comma, semicolon, tab or |, or hold a single field.",
                        "Save it as a comma-separated CSV (or .tsv for tabs) with a header row naming the "
                        "columns, e.g. text,label.")
    if task == "preference":
        return preference_columns(df, given, name)
    if task == "classification":
        text = getattr(given, "text_column", None) or _pick(cols, TEXT_CANDIDATES)
        label = getattr(given, "label_column", None) or _pick(cols, LABEL_CANDIDATES)
        if (text is None or label is None) and len(cols) == 2:
            text, label = cols  # two unnamed-ish columns: text first, label second
        if text is None:
            raise DataError(f"No text column found in {name}. Columns found: {', '.join(cols)}.",
                            "Name it 'text', or set data.text_column to the column that holds the text.")
        if label is None:
            raise DataError(f"No label column found in {name}. Columns found: {', '.join(cols)}.",
                            "Name it 'label', or set data.label_column to the column that holds the class.")
        return {"text": _require(df, text, "text", name), "label": _require(df, label, "label", name)}

    def get(attr, candidates):
        explicit = getattr(given, attr, None)
        return _require(df, explicit, attr.replace("_column", ""), name) if explicit else _pick(cols, candidates)

    messages = get("messages_column", ("messages", "conversations", "conversation"))
    if messages:
        return {"format": "messages", "messages": messages}
    instruction = get("instruction_column", ("instruction",))
    output = get("output_column", ("output", "response", "answer"))
    if instruction and output:
        return {"format": "alpaca", "instruction": instruction,
                "input": get("input_column", ("input", "context")), "output": output}
    prompt = get("prompt_column", ("prompt", "question", "query"))
    completion = get("completion_column", ("completion", "response", "answer", "output"))
    if prompt and completion:
        return {"format": "prompt_completion", "prompt": prompt, "completion": completion}
    raise DataError(f"Could not find instruction columns in {name}. Columns found: {', '.join(cols)}.",
                    "Use instruction/input/output (Alpaca), prompt/completion, or a 'messages' list "
                    "of {role, content}; or map your columns with data.instruction_column etc.")


def preference_columns(df: pd.DataFrame, given=None, name: str = "the data") -> dict:
    """prompt / chosen / rejected (TRL's names), or the columns data.prompt_column, chosen_column and
    rejected_column name."""
    cols = list(df.columns)
    found = {}
    for key, attr, candidates in (("prompt", "prompt_column", ("prompt", "question", "instruction")),
                                  ("chosen", "chosen_column", ("chosen", "preferred", "better")),
                                  ("rejected", "rejected_column", ("rejected", "dispreferred", "worse"))):
        explicit = getattr(given, attr, None)
        found[key] = _require(df, explicit, key, name) if explicit else _pick(cols, candidates)
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise DataError(f"No {' / '.join(repr(m) for m in missing)} column found in {name}, which preference "
                        f"tuning needs. Columns found: {', '.join(map(str, cols))}.",
                        "Give each row a prompt, the better answer and the worse one in columns named prompt, "
                        "chosen and rejected (TRL's format), or map yours with data.prompt_column, "
                        "data.chosen_column and data.rejected_column.")
    return {"format": "preference", **found}


def preference_text(value, row: int, column: str) -> str:
    """A preference cell as text: a string, or conversational messages (the last message's content)."""
    if isinstance(value, str) and value.strip().startswith("[{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        msgs = _parse_messages_any(value, row)
        return msgs[-1]["content"] if msgs else ""
    if isinstance(value, dict):
        raise DataError(f"Row {row}: column '{column}' holds an object, not text or a list of messages.",
                        'Write text, or [{"role": "user", "content": "..."}].')
    return _cell(value)


def store_columns(data_cfg, cols: dict) -> None:
    """Write a detected mapping back into the config so run.yaml records what was used."""
    if cols.get("format") == "preference":
        data_cfg.prompt_column, data_cfg.chosen_column = cols["prompt"], cols["chosen"]
        data_cfg.rejected_column = cols["rejected"]
        return
    if "text" in cols:
        data_cfg.text_column, data_cfg.label_column = cols["text"], cols["label"]
        return
    fmt = cols["format"]
    if fmt == "messages":
        data_cfg.messages_column = cols["messages"]
    elif fmt == "alpaca":
        data_cfg.instruction_column, data_cfg.output_column = cols["instruction"], cols["output"]
        data_cfg.input_column = cols.get("input")
    else:
        data_cfg.prompt_column, data_cfg.completion_column = cols["prompt"], cols["completion"]


@dataclass
class Frames:
    """A run's data files as read: the training file, the validation file (None: split from training)
    and the column mapping detected on the training file."""
    train: pd.DataFrame
    validation: pd.DataFrame | None
    columns: dict


def load_frames(cfg, max_bytes: int | None = None) -> Frames:
    """Read `cfg.data.train` (and `cfg.data.validation`), detect the columns for `cfg.task` and record
    them in `cfg.data`, so run.yaml says which columns were used."""
    if not cfg.data.train:
        raise ConfigError("No training data given (data.train is empty).",
                          "Set data.train to a CSV, TSV, JSON, JSONL or Parquet file.")
    train_df = read_table(cfg.data.train, max_bytes=max_bytes)
    cols = detect_columns(train_df, cfg.task, cfg.data, name=Path(cfg.data.train).name)
    store_columns(cfg.data, cols)
    val_df = None
    if cfg.data.validation:
        val_df = read_table(cfg.data.validation, max_bytes=max_bytes)
        detect_columns(val_df, cfg.task, cfg.data, name=Path(cfg.data.validation).name)
    return Frames(train_df, val_df, cols)


# ---------------------------------------------------------------------------------------------
# classification


def _check_flat_text(series: pd.Series, column: str) -> None:
    nested = series.map(lambda v: isinstance(v, (dict, list)))
    if nested.any():
        first = int(np.flatnonzero(nested.to_numpy())[0])
        raise DataError(f"Column '{column}' holds nested objects (lists or dicts) in {int(nested.sum())} rows, "
                        f"first at row {first + 1}.", "Flatten them into plain text, or pick another column.")


def label_names_for(values: pd.Series) -> list[str]:
    """Sorted label names; integer labels sort numerically and keep their number as the name."""
    uniq = pd.unique(values.dropna())
    as_num = pd.to_numeric(pd.Series(uniq), errors="coerce")
    if len(uniq) and as_num.notna().all() and (as_num % 1 == 0).all():
        return [str(int(v)) for v in sorted(as_num)]
    return sorted(str(v).strip() for v in uniq)


def clean_classification(df: pd.DataFrame, text_col: str, label_col: str, name: str = "the data") -> pd.DataFrame:
    """Rows with a text and a label; labels as stripped strings. Raises on unusable data."""
    _check_flat_text(df[text_col], text_col)
    out = pd.DataFrame({"text": df[text_col], "label": df[label_col]})
    out["label"] = out["label"].map(normalise_label)
    if out["label"].isna().all():
        raise DataError(f"Every row of {name} has an empty label in column '{label_col}'.",
                        "Fill in the labels, or pick the right label column.")
    out["text"] = out["text"].map(lambda v: "" if is_missing(v) else str(v))
    out = out[out["label"].notna()]
    out = out[out["text"].str.strip() != ""]
    if out.empty:
        raise DataError(f"{name} has no row with both a text and a label.", "Check the column mapping.")
    if len(out) < 2:
        raise DataError(f"{name} has only 1 usable row (a text with a label); a classifier needs examples of "
                        "at least two classes, and some to hold out for validation.",
                        "Add more rows (at least 20 is sensible).")
    n_classes = out["label"].nunique()
    if n_classes < 2:
        raise DataError(f"{name} has only one class ('{out['label'].iloc[0]}'); a classifier needs at least two.",
                        "Add examples of the other classes, or check the label column.")
    return out.reset_index(drop=True)


def split_frame(df: pd.DataFrame, val_size: float, seed: int, stratify: str | None = None):
    """Train/validation split; stratified when every class has at least two rows."""
    from sklearn.model_selection import train_test_split

    if len(df) < 2:
        raise DataError(f"Only {len(df)} usable row(s): too few to hold out a validation set.",
                        "Add more rows (at least 20 is sensible), or give a separate validation file.")
    if len(df) - int(np.ceil(val_size * len(df))) < 1:
        raise DataError(f"data.val_size={val_size} leaves no rows for training ({len(df)} usable rows).",
                        "Lower data.val_size (0.2 is usual), add rows, or give a separate validation file.")
    strat, rare = None, None
    if stratify is not None:
        counts = df[stratify].value_counts()
        if counts.max() < 2:
            raise DataError(f"The data has {len(counts)} classes in {len(df)} rows: every class has a single "
                            "example, so nothing can be learned or held out per class.",
                            "Give at least 2 examples per class (20+ is better), or check that the label column "
                            "is the class and not an id or the text.")
        # A class with one row cannot be in both parts: keep it for training (validation never shows a label
        # the model has not seen).
        single = df[stratify].map(counts) < 2
        if single.any():
            rare, df = df[single], df[~single]
            counts = counts[counts >= 2]
        n_val = int(np.ceil(val_size * len(df)))
        if n_val >= len(counts) and len(df) - n_val >= len(counts):
            strat = df[stratify]
    try:
        train_df, val_df = train_test_split(df, test_size=val_size, random_state=seed, stratify=strat)
    except ValueError as exc:
        raise DataError(f"The data ({len(df)} rows) cannot be split with data.val_size={val_size}: {exc}",
                        "Add rows, change data.val_size, or give a separate validation file.") from exc
    if rare is not None:
        train_df = pd.concat([train_df, rare])
    return train_df.reset_index(drop=True), val_df.reset_index(drop=True)


def tokenize_classification(texts, labels, tokenizer, max_length: int) -> dict:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    enc = dict(enc)
    enc["labels"] = list(labels)
    return enc


# ---------------------------------------------------------------------------------------------
# instruction


def _cell(v) -> str:
    return "" if is_missing(v) else str(v)


def _parse_messages_any(value, row: int) -> list[dict]:
    """Messages as {role, content} with ShareGPT keys and role names mapped; any last role."""
    return _parse_messages(value, row, last_must_be_assistant=False)


def _parse_messages(value, row: int, last_must_be_assistant: bool = True) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"Row {row}: the messages cell is not a JSON list.",
                            'Write it as [{"role": "user", "content": "..."}, ...].') from exc
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"Row {row}: 'messages' must be a non-empty list of {{role, content}} objects.",
                        'Example: [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}].')
    msgs = []
    for m in value:
        if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:
            m = {"role": m["from"], "content": m["value"]}          # ShareGPT: {"from": "human", "value": ...}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"Row {row}: every message needs 'role' and 'content' (or ShareGPT's 'from' and "
                            "'value').", 'Example: {"role": "user", "content": "Hi"}.')
        role = str(m["role"]).strip().lower()
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
        if role not in CHAT_ROLES:
            raise DataError(f"Row {row}: unknown message role '{m['role']}'.",
                            f"Use one of: {', '.join(CHAT_ROLES)}.")
        msgs.append({"role": role, "content": _cell(m["content"])})
    if last_must_be_assistant and msgs[-1]["role"] != "assistant":
        raise DataError(f"Row {row}: the last message must be the assistant's answer (the part we train on).",
                        "End every conversation with an assistant message.")
    return msgs


def row_to_messages(row: dict, cols: dict, row_number: int) -> list[dict]:
    """Any instruction format as chat messages, the last one the assistant's answer."""
    fmt = cols["format"]
    if fmt == "messages":
        return _parse_messages(row[cols["messages"]], row_number)
    if fmt == "alpaca":
        user = _cell(row[cols["instruction"]]).strip()
        extra = _cell(row[cols["input"]]).strip() if cols.get("input") else ""
        if extra:
            user = f"{user}\n\n{extra}"
        answer = _cell(row[cols["output"]])
    else:
        user, answer = _cell(row[cols["prompt"]]), _cell(row[cols["completion"]])
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def resolve_template(template: str, tokenizer) -> str:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is 'chat' but this model's tokenizer has no chat template.",
                        "Use template: alpaca (or auto).")
    return template


def render_prompt(messages: list[dict], template: str, tokenizer) -> str:
    """The text the model sees before its answer (messages without the final assistant turn)."""
    if template == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    user = turns[-1]["content"] if turns else ""
    history = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns[:-1])
    instruction = "\n\n".join(x for x in (system, history, user) if x)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The article's prompt format, with the Input section only when there is input."""
    if input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def prompt_and_response(row: dict, cols: dict, template: str, tokenizer, row_number: int) -> tuple[str, str]:
    """(prompt text, response text). The response ends with the end-of-turn token the model must learn."""
    msgs = row_to_messages(row, cols, row_number)
    context, answer = msgs[:-1], msgs[-1]["content"]
    if template == "chat":
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):].rstrip("\n")
        return prompt, answer + (tokenizer.eos_token or "")
    if cols["format"] == "alpaca":
        user = _cell(row[cols["instruction"]]).strip()
        extra = _cell(row[cols["input"]]).strip() if cols.get("input") else ""
        prompt = alpaca_prompt(user, extra)
    else:
        prompt = render_prompt(context, "alpaca", tokenizer)
    return prompt, answer + (tokenizer.eos_token or "")


@dataclass
class InstructionExamples:
    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped_too_long: int        # response entirely cut by max_length
    truncated: int               # response partly cut
    prompts: list[str]
    references: list[str]
    dropped_empty_response: int = 0   # blank answer: only the end-of-turn token would be learned

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_empty_response


def blank_response(response_ids: list[int], tokenizer) -> bool:
    """No answer text, only special tokens (EOS, <|im_end|>) or whitespace."""
    return not response_ids or not tokenizer.decode(response_ids, skip_special_tokens=True).strip()


def encode_pair(prompt: str, response: str, tokenizer, template: str, max_length: int):
    """Token ids and labels for one pair: -100 on every prompt token. None if nothing is left to learn:
    the response is cut off by max_length, or it is blank (training on a lone EOS teaches the model to
    answer nothing)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=(template != "chat"))["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length or blank_response(response_ids, tokenizer):
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return ids, labels, len(prompt_ids) + len(response_ids) > max_length


def conversation_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]] | None:
    """A chat-template conversation cut into (text, trained) pieces: every assistant answer with its
    end-of-turn token is trained, everything else (system, user turns, the assistant header) is not.
    None when the template does not render each turn as a prefix of the next (the pieces would not add
    up to what the model sees): then only the last answer is trained, as for a single turn."""
    pieces, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            return None
        answer = full[len(prompt):]
        if k == len(messages) - 1:
            answer = answer.rstrip("\n")      # as prompt_and_response ends the last answer
        pieces += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return pieces


def encode_conversation(pieces: list[tuple[str, bool]], tokenizer, max_length: int):
    """encode_pair for several turns: -100 on every piece that is not trained. None if no trained
    token is left within max_length or every answer is blank."""
    ids, labels, answers = [], [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if trained:
            answers += piece
    if blank_response(answers, tokenizer) or all(x == IGNORE_INDEX for x in labels[:max_length]):
        return None
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def tokenize_instruction(df: pd.DataFrame, cols: dict, tokenizer, template: str, max_length: int) -> InstructionExamples:
    """Token ids and label masks. A multi-turn conversation (messages data, chat template) trains every
    assistant answer in it (conversation_segments); other rows train their one response."""
    out = InstructionExamples([], [], 0, 0, [], [])
    for i, row in enumerate(df.to_dict("records"), start=1):
        prompt, response = prompt_and_response(row, cols, template, tokenizer, i)
        msgs = row_to_messages(row, cols, i) if cols["format"] == "messages" else []
        pieces = conversation_segments(msgs, tokenizer) \
            if template == "chat" and sum(m["role"] == "assistant" for m in msgs) > 1 else None
        if pieces is not None:
            encoded = encode_conversation(pieces, tokenizer, max_length)
        else:
            encoded = encode_pair(prompt, response, tokenizer, template, max_length)
        if encoded is None:
            if blank_response(tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer):
                out.dropped_empty_response += 1
            else:
                out.dropped_too_long += 1
            continue
        ids, labels, cut = encoded
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.truncated += int(cut)
        out.prompts.append(prompt)
        out.references.append(row_to_messages(row, cols, i)[-1]["content"])
    return out


class CausalCollator:
    """Pads a batch to its longest row (never to max_length): pad ids, attention 0, labels -100."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
        ids, mask, labels = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            mask.append([1] * n + [0] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long)}
