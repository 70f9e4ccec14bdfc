"""Batch predictions: a run's fine-tuned model over every row of a file, written as a CSV.

    python -m finetune_core predict runs/my-run new_texts.csv [--out predictions.csv]
    result = predict_file("runs/my-run", "new_texts.csv", progress=lambda done, total: ...)
    result.path        # runs/my-run/export/predictions-new_texts.csv unless `out` is given

A classifier writes the file's columns, then `predicted_label`, `confidence` and `p_<label>` for every
class; an instruction run writes them and `generated_response` (greedy, generate.generate_batch). The file is read
as training data is (data.read_table: the same formats, limits and messages); the text column is the one
the run trained on when the file has it, else found as training finds it. Prompts are built exactly as
in training (data.prompt_and_response), so a validation file with reference answers works too. Every
text cell is escaped for spreadsheets (predictions.safe_csv_cell). Rows without text stay blank.
Call it on the inference thread from the app (generate.on_inference_thread): it computes with a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from . import data as D
from . import rundir
from .errors import DataError, FinetuneError
from .predictions import safe_csv_cell

CLASSIFY_BATCH = 32
GENERATE_CHUNK = 16               # prompts per generate_batch call: the progress moves after each
RESPONSE_PLACEHOLDER = "\x00response"   # an answer column no file has, for files of prompts only
MESSAGES_CANDIDATES = ("messages", "conversations", "conversation")
PROMPT_CANDIDATES = ("prompt", "question", "query", "text", "input")


@dataclass(frozen=True)
class BatchPrediction:
    path: Path
    task: str
    rows: int
    blank_rows: int               # rows with no text: written without a prediction
    source_columns: tuple[str, ...]   # the columns the model read


def predict_file(run_dir: str | Path, data_file: str | Path, out: str | Path | None = None, progress=None,
                 max_new_tokens: int = 128, max_bytes: int | None = None) -> BatchPrediction:
    """Predict every row of `data_file` with the run's model and write a CSV; returns what was written.

    progress(done, total) is called as rows are done. max_bytes: the largest file accepted (None: the
    deployment's limit, as for training data). Raises DataError for a bad file (before any model
    loads) and FinetuneError for a run without a saved model.
    """
    run_dir = Path(run_dir)
    model_dir = rundir.model_dir(run_dir)
    if not model_dir.is_dir():
        raise FinetuneError(f"The run '{run_dir.name}' has no saved model yet.",
                            "Wait for it to finish, or pick a finished run.")
    run = rundir.read_config(run_dir)
    task = run.get("task", "classification")
    frame = D.read_table(data_file, max_bytes=max_bytes)
    name = Path(data_file).name
    run_data = run.get("data") or {}
    from .generate import load_for_inference   # deferred: torch, transformers

    if task == "classification":
        column = text_column(frame, run_data.get("text_column"), name)
        model, tokenizer, _ = load_for_inference(str(model_dir))
        table, blank = _classify(model, tokenizer, frame, column, int(run_data.get("max_length") or 256), progress)
        used = (column,)
    else:
        cols = prompt_columns(frame, run_data, name)
        model, tokenizer, info = load_for_inference(str(model_dir))
        table, blank = _generate(model, tokenizer, frame, cols, info["template"], max_new_tokens, progress)
        used = tuple(v for k, v in cols.items() if k not in ("format",) and v and v != RESPONSE_PLACEHOLDER)
    path = Path(out) if out else rundir.batch_predictions_path(run_dir, data_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rundir.replacing(path) as tmp:
        table.to_csv(tmp, index=False)
    return BatchPrediction(path, task, len(frame), blank, used)


# ---------------------------------------------------------------------------------------------
# columns


def _lookup(columns, candidates) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def text_column(frame: pd.DataFrame, trained: str | None, name: str) -> str:
    """The column to classify: the one the run trained on, else a usual text name, else the only column."""
    cols = list(frame.columns)
    if trained and trained in cols:
        return trained
    found = _lookup(cols, D.TEXT_CANDIDATES) or (cols[0] if len(cols) == 1 else None)
    if found is None:
        wanted = f"'{trained}' (as in training) or 'text'" if trained else "'text'"
        raise DataError(f"No text column found in {name}. Columns found: {', '.join(map(str, cols))}.",
                        f"Name the column to classify {wanted}, or pass a file with a single column.")
    return found


def prompt_columns(frame: pd.DataFrame, run_data: dict, name: str) -> dict:
    """The instruction columns in data.detect_columns' form. A file with reference answers maps as in
    training; a file of prompts only gets an empty answer column (RESPONSE_PLACEHOLDER)."""
    try:
        return D.detect_columns(frame, "instruction", SimpleNamespace(**run_data), name)
    except DataError:
        pass
    cols = list(frame.columns)

    def find(key: str, candidates) -> str | None:
        explicit = run_data.get(key)
        return explicit if explicit in cols else _lookup(cols, candidates)

    messages = find("messages_column", MESSAGES_CANDIDATES)
    if messages:
        return {"format": "messages", "messages": messages}
    instruction = find("instruction_column", ("instruction",))
    if instruction:
        return {"format": "alpaca", "instruction": instruction, "input": find("input_column", ("input", "context")),
                "output": RESPONSE_PLACEHOLDER}
    prompt = find("prompt_column", PROMPT_CANDIDATES) or (cols[0] if len(cols) == 1 else None)
    if prompt:
        return {"format": "prompt_completion", "prompt": prompt, "completion": RESPONSE_PLACEHOLDER}
    raise DataError(f"No prompt column found in {name}. Columns found: {', '.join(map(str, cols))}.",
                    "Name the column 'prompt' (or 'instruction', with an optional 'input'), or give a "
                    "'messages' list of {role, content}.")


# ---------------------------------------------------------------------------------------------
# the model


def _escaped(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for col in out.columns:       # every column: pandas reads text as object or as its string dtype
        out[col] = out[col].map(safe_csv_cell)
    return out


def _classify(model, tokenizer, frame: pd.DataFrame, column: str, max_length: int, progress):
    import torch

    texts = ["" if D.is_missing(v) else str(v) for v in frame[column]]
    todo = [i for i, t in enumerate(texts) if t.strip()]
    todo.sort(key=lambda i: len(texts[i]))           # similar lengths per batch: less padding
    names = [str(model.config.id2label.get(i, model.config.id2label.get(str(i), i)))
             for i in range(model.config.num_labels)]
    probs = np.full((len(texts), len(names)), np.nan)
    for start in range(0, len(todo), CLASSIFY_BATCH):
        idx = todo[start:start + CLASSIFY_BATCH]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            probs[idx] = torch.softmax(model(**enc).logits.float(), -1).cpu().numpy()
        if progress:
            progress(min(start + len(idx), len(todo)), len(todo))
    table = _escaped(frame)
    done = ~np.isnan(probs[:, 0]) if names else np.zeros(len(texts), bool)
    best = np.where(done, np.nan_to_num(probs).argmax(1), -1)
    table["predicted_label"] = [safe_csv_cell(names[b]) if b >= 0 else "" for b in best]
    table["confidence"] = [round(float(probs[i, b]), 6) if b >= 0 else None for i, b in enumerate(best)]
    for j, label in enumerate(names):
        table[f"p_{label}"] = probs[:, j].round(6)
    return table, len(texts) - len(todo)


def _open_turn(value):
    """A messages cell whose last turn is the user's gets an empty answer to predict."""
    msgs = value.tolist() if isinstance(value, np.ndarray) else value
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            return value                      # prompt_and_response reports it with its row number
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and \
            str(msgs[-1].get("role", "")).lower() not in ("assistant", "gpt", "bot"):
        msgs = [*msgs, {"role": "assistant", "content": ""}]
    return msgs


def _generate(model, tokenizer, frame: pd.DataFrame, cols: dict, template: str, max_new_tokens: int, progress):
    from .generate import generate_batch

    rows = frame.to_dict("records")
    prompts: list[str | None] = []
    for n, row in enumerate(rows, start=1):
        row = {**row, RESPONSE_PLACEHOLDER: ""}
        if cols["format"] == "messages":
            row[cols["messages"]] = _open_turn(row[cols["messages"]])
        prompt, _ = D.prompt_and_response(row, cols, template, tokenizer, n)
        user_text = "".join(str(row.get(cols[k]) or "") for k in ("prompt", "instruction", "messages")
                            if cols.get(k) and not D.is_missing(row.get(cols[k])))
        prompts.append(prompt if user_text.strip() else None)
    todo = [i for i, p in enumerate(prompts) if p is not None]
    answers: list[str] = [""] * len(rows)
    for start in range(0, len(todo), GENERATE_CHUNK):
        idx = todo[start:start + GENERATE_CHUNK]
        for i, answer in zip(idx, generate_batch(model, tokenizer, [prompts[i] for i in idx], template,
                                                 max_new_tokens=max_new_tokens)):
            answers[i] = answer
        if progress:
            progress(min(start + len(idx), len(todo)), len(todo))
    table = _escaped(frame)
    table["generated_response"] = [safe_csv_cell(a) for a in answers]
    return table, len(rows) - len(todo)
