"""Data checks before training: the article's "Data Quality Checklist", and more.

Run it from the command line:

    python -m finetune_core audit FILE --task classification
    python -m finetune_core audit examples/data/support_replies.jsonl --task instruction --json

or from Python:

    from finetune_core.audit import audit_file, format_audit
    report = audit_file("examples/data/domains.csv", "classification")
    print(format_audit(report))

`audit_dataframe` returns a JSON-serialisable dict (plain Python types only): size, column mapping,
missing values, duplicates, empty texts, text lengths, class balance (classification), token
lengths and truncation for a tokenizer, the instruction rows that training would drop because
`max_length` leaves no room for the response (computed with `data.encode_pair`, exactly as training
does), overlap with the validation data, and `warnings`: plain-language sentences that each name a
problem and what to do about it. `ok` is True when there is no warning.

Counting rules (they follow what training does with the data, see data.py):
- texts: a missing cell (NaN / None) counts as an empty text; a text of only whitespace is empty;
- classification labels are compared as stripped strings (1.0 -> "1"); a missing or blank label is
  missing; class counts, token lengths and the size advice use the *usable* rows (a label and a
  non-empty text), the rows `clean_classification` keeps;
- duplicates and overlap compare texts stripped of surrounding whitespace; instruction rows compare
  prompt + response.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import data as D
from .config import TASKS, recommended_strategy
from .errors import ConfigError, DataError, FinetuneError
from .models import load_tokenizer, resolve_model

DEFAULT_MODELS = {"classification": "bundled:minilm-l6", "instruction": "bundled:smollm2-135m",
                  "preference": "bundled:smollm2-135m"}

IMBALANCE_WARN = 5.0          # article: ratio > 5 -> warning
FEW_EXAMPLES = 5              # a class with fewer rows is hard to learn and to evaluate
TRUNCATED_WARN = 0.10         # share of rows longer than max_length
SMALL_CLASSIFICATION = 100    # article: frozen backbone "works with 100+ examples"
FULL_OK_FROM = 1000           # article: full fine-tuning "need 1000+ for reliable results"
SMALL_INSTRUCTION = 50        # article exercise: "50+ examples"
GOOD_INSTRUCTION = 1000       # article: instruction FT "1000 to 10000 good examples"
MAX_HISTOGRAM = 5000          # token_lengths list cap
CHARS_PER_TOKEN = 4           # the article's rough estimate when no tokenizer is at hand


# ---------------------------------------------------------------------------------------------
# small helpers


def _text(v) -> str:
    return "" if D.is_missing(v) else str(v)


def _stats(values) -> dict:
    if len(values) == 0:
        return {"min": None, "median": None, "mean": None, "max": None}
    arr = np.asarray(values, dtype=float)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "mean": round(float(arr.mean()), 2),
            "max": int(arr.max())}


def _sample(values: list[int], cap: int = MAX_HISTOGRAM) -> list[int]:
    """At most `cap` values, evenly spread over the list (deterministic), for a histogram."""
    if len(values) <= cap:
        return [int(v) for v in values]
    idx = np.linspace(0, len(values) - 1, cap).astype(int)
    return [int(values[i]) for i in idx]


def _token_summary(lengths: list[int], max_length: int) -> dict:
    stats = _stats(lengths)
    n_truncated = int(sum(1 for n in lengths if n > max_length))
    stats["p95"] = round(float(np.percentile(lengths, 95)), 2) if lengths else None
    return {"min": stats["min"], "median": stats["median"], "mean": stats["mean"], "p95": stats["p95"],
            "max": stats["max"], "max_length": int(max_length), "n_truncated": n_truncated,
            "truncated_share": round(n_truncated / len(lengths), 4) if lengths else 0.0}


def _names(items, limit: int = 5) -> str:
    items = [f"'{x}'" for x in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _columns_present(df: pd.DataFrame, cols: dict) -> bool:
    used = [v for k, v in cols.items() if k != "format" and v]
    return all(c in df.columns for c in used)


def _missing_values(df: pd.DataFrame) -> dict:
    per_column = {str(c): int(df[c].map(D.is_missing).sum()) for c in df.columns}
    return {"total": int(sum(per_column.values())), "per_column": per_column}


# ---------------------------------------------------------------------------------------------
# per-task row extraction


def _classification_rows(df: pd.DataFrame, cols: dict):
    """texts (NaN -> ''), labels (None if missing) and how many text cells hold lists/dicts."""
    for role in ("text", "label"):
        if cols.get(role) not in df.columns:
            raise DataError(f"Column '{cols.get(role)}' (the {role} column) is not in the data. "
                            f"Columns found: {', '.join(map(str, df.columns))}.",
                            f"Pick the {role} column from those, e.g. --set data.{role}_column=NAME.")
    raw = df[cols["text"]].tolist()
    nested = sum(1 for v in raw if isinstance(v, (dict, list)))
    texts = [_text(v) for v in raw]
    labels = [D.normalise_label(v) for v in df[cols["label"]].tolist()]
    return texts, labels, nested


def _instruction_rows(df: pd.DataFrame, cols: dict):
    """Per row: (row number, record, prompt text, response text) or an error message."""
    rows, errors = [], []
    for i, row in enumerate(df.to_dict("records"), start=1):
        try:
            msgs = D.row_to_messages(row, cols, i)
        except DataError as exc:
            errors.append(str(exc))
            continue
        prompt = "\n\n".join(m["content"] for m in msgs[:-1])
        rows.append((i, row, prompt, msgs[-1]["content"]))
    return rows, errors


def _instruction_key(prompt: str, response: str) -> str:
    return prompt.strip() + "\x00" + response.strip()


# ---------------------------------------------------------------------------------------------
# the audit


def audit_dataframe(df: pd.DataFrame, task: str, cols: dict, tokenizer=None, max_length: int = 256,
                    val_df: pd.DataFrame | None = None, template: str = "auto") -> dict:
    """Check `df` for `task` with the column mapping `cols` (from `data.detect_columns`).

    With a tokenizer, token lengths are measured as training measures them (special tokens
    included; for instruction data the prompt and response as `data.encode_pair` sees them).
    Returns the report dict described in the module docstring.
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown task '{task}'.", f"Use one of: {', '.join(TASKS)}.")
    max_length = int(max_length or 256)
    report: dict = {
        "task": task,
        "n_rows": int(len(df)),
        "columns": [str(c) for c in df.columns],
        "column_mapping": {k: (None if v is None else str(v)) for k, v in cols.items()},
        "max_length": max_length,
        "missing_values": _missing_values(df),
    }
    warnings: list[str] = []
    notes: list[str] = []
    if task == "classification":
        _audit_classification(df, cols, tokenizer, max_length, val_df, report, warnings, notes)
    elif task == "preference":
        _audit_preference(df, cols, tokenizer, max_length, val_df, report, warnings)
    else:
        _audit_instruction(df, cols, tokenizer, max_length, val_df, template, report, warnings, notes)
    report["warnings"] = warnings
    report["notes"] = notes
    report["ok"] = not warnings
    return report


def _audit_classification(df, cols, tokenizer, max_length, val_df, report, warnings, notes) -> None:
    texts, labels, nested = _classification_rows(df, cols)
    text_col, label_col = cols["text"], cols["label"]
    empty = [not t.strip() for t in texts]
    usable = [i for i in range(len(texts)) if labels[i] is not None and not empty[i]]
    n_missing_labels = sum(1 for v in labels if v is None)
    n_empty = sum(empty)

    # duplicates (non-empty texts, stripped) and the same text with different labels
    keys = [t.strip() for t in texts]
    seen: dict[str, set] = {}
    n_dupes = 0
    for key, lab in zip(keys, labels):
        if not key:
            continue
        if key in seen:
            n_dupes += 1
        seen.setdefault(key, set())
        if lab is not None:
            seen[key].add(lab)
    conflicts = [k for k, labs in seen.items() if len(labs) > 1]

    counts = pd.Series([labels[i] for i in usable], dtype=object).value_counts()
    items = sorted(((str(k), int(v)) for k, v in counts.items()), key=lambda kv: (-kv[1], kv[0]))
    dist = dict(items)
    n_usable = len(usable)
    ratio = float(max(dist.values()) / min(dist.values())) if dist else None
    few = {k: v for k, v in sorted(dist.items(), key=lambda kv: (kv[1], kv[0])) if v < FEW_EXAMPLES}

    report.update({
        "usable_rows": n_usable,
        "missing_labels": n_missing_labels,
        "empty_texts": n_empty,
        "duplicates": n_dupes,
        "conflicting_labels": len(conflicts),
        "text_length": _stats([len(t) for t in texts]),
        "class_distribution": dist,
        "class_share": {k: round(v / n_usable, 4) for k, v in dist.items()} if n_usable else {},
        "n_classes": len(dist),
        "imbalance_ratio": ratio,
        "classes_with_few_examples": few,
        "suggestion": _suggest_classification(n_usable),
    })

    if nested:
        warnings.append(f"{_plural(nested, 'row')} of column '{text_col}' hold lists or dicts instead of text: "
                        "training refuses them. Flatten them into plain text, or pick another text column.")
    if n_missing_labels:
        warnings.append(f"{_plural(n_missing_labels, 'row')} {'has' if n_missing_labels == 1 else 'have'} no "
                        f"label (missing values in column '{label_col}'): training skips them. Fill in the "
                        "labels or remove those rows.")
    if n_empty:
        warnings.append(f"{_plural(n_empty, 'row')} {'has' if n_empty == 1 else 'have'} an empty or missing text "
                        f"in column '{text_col}': training skips them. Remove them or fill in the text.")
    if n_dupes:
        warnings.append(f"{_plural(n_dupes, 'duplicate text')} (rows repeating an earlier text): remove them "
                        "before training; they overweight those examples and can leak into the validation split.")
    if conflicts:
        warnings.append(f"{_plural(len(conflicts), 'text')} {'appears' if len(conflicts) == 1 else 'appear'} with "
                        f"different labels (e.g. '{conflicts[0][:60]}'): the model cannot learn both; fix the labels.")
    if len(dist) == 1:
        warnings.append(f"Only one class ('{next(iter(dist))}'): a classifier needs at least two. Add examples of "
                        "the other classes, or check the label column.")
    if ratio is not None and ratio > IMBALANCE_WARN:
        biggest = items[0][1]
        small = [k for k, v in dist.items() if v * IMBALANCE_WARN < biggest]
        warnings.append(f"Imbalance ratio {ratio:.1f}x ('{items[0][0]}' has {items[0][1]} rows, '{items[-1][0]}' "
                        f"{items[-1][1]}): consider class weights or more examples of {_names(small)}.")
    tiny = [k for k, v in few.items() if v < 2]
    if tiny:
        warnings.append(f"{'Class' if len(tiny) == 1 else 'Classes'} {_names(tiny)} "
                        f"{'has' if len(tiny) == 1 else 'have'} a single example: the validation split cannot "
                        "be stratified and the model can hardly learn it. Add examples or remove the class.")
    some = [f"'{k}' ({v})" for k, v in few.items() if v >= 2]
    if some:
        warnings.append(f"Very few examples for {', '.join(some[:5])}{' and more' if len(some) > 5 else ''}: "
                        f"fewer than {FEW_EXAMPLES} rows per class is too few to learn or evaluate reliably. "
                        "Add more examples of those classes.")
    if 0 < n_usable < SMALL_CLASSIFICATION:
        warnings.append(f"Small data: only {n_usable} usable rows. Use the frozen (head-only) or LoRA strategy; "
                        f"full fine-tuning needs {FULL_OK_FROM}+ examples for reliable results.")

    usable_texts = [texts[i] for i in usable]
    if tokenizer is not None:
        lengths = [len(ids) for ids in
                   tokenizer(usable_texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]] \
            if usable_texts else []
        summary = _token_summary(lengths, max_length)
        report["token_length"] = summary
        report["token_lengths"] = _sample(lengths)
        _truncation_warning(summary, warnings, "texts")
    else:
        _char_length_warning([len(t) for t in usable_texts], max_length, warnings, notes)

    if val_df is not None:
        vcols = cols if _columns_present(val_df, cols) else D.detect_columns(val_df, "classification")
        vtexts, vlabels, _ = _classification_rows(val_df, vcols)
        vkeys = {t.strip() for t in vtexts if t.strip()}
        overlap = len(vkeys & {k for k in keys if k})
        unseen = sorted({lab for lab in vlabels if lab is not None} - set(dist))
        report["validation_rows"] = int(len(val_df))
        report["overlap_with_validation"] = overlap
        report["validation_unseen_labels"] = unseen
        _overlap_warning(overlap, warnings, "texts")
        if unseen:
            warnings.append(f"The validation data has labels the training data never shows: {_names(unseen)}. "
                            "Add training examples for them, or remove those validation rows.")


def preference_rows(df: pd.DataFrame, cols: dict) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of every row as text (conversational cells: their last message)."""
    out = []
    for i, row in enumerate(df.to_dict("records"), start=1):
        out.append(tuple(D.preference_text(row[cols[k]], i, str(cols[k])).strip()
                         for k in ("prompt", "chosen", "rejected")))
    return out


def _audit_preference(df, cols, tokenizer, max_length, val_df, report, warnings) -> None:
    """The pairs checklist: what DPO cannot learn from, and what it learns wrong from."""
    rows = preference_rows(df, cols)
    empty = sum(1 for p, c, r in rows if not (p and c and r))
    same = sum(1 for p, c, r in rows if c and c == r)
    keys = [f"{p}\x00{c}\x00{r}" for p, c, r in rows]
    dupes = len(keys) - len(set(keys))
    report.update(pairs=len(rows), empty_sides=empty, identical_pairs=same, duplicate_pairs=dupes)
    if empty:
        warnings.append(f"{_plural(empty, 'pair')} {'has' if empty == 1 else 'have'} an empty prompt, chosen or "
                        "rejected answer: training drops them. Fill them in or remove the rows.")
    if same:
        warnings.append(f"{_plural(same, 'pair')} {'has' if same == 1 else 'have'} the same chosen and rejected "
                        "answer: there is no preference to learn (training drops them). Write a worse answer, or "
                        "remove the rows.")
    if dupes:
        warnings.append(f"{_plural(dupes, 'duplicate pair')} (the same prompt, chosen and rejected as an earlier "
                        "row): each copy counts the preference again. Remove the repeats.")
    if len(rows) < 40:
        warnings.append(f"Only {len(rows)} pairs: DPO learns a style from about 50-100 pairs (the example has 103). "
                        "Add pairs, or rate more answers in the Chat tab and build pairs from them.")
    if tokenizer is not None:
        chat = bool(getattr(tokenizer, "chat_template", None))
        prompt_len = [len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                                  add_generation_prompt=True) if chat else p,
                                    add_special_tokens=not chat)["input_ids"]) for p, _, _ in rows]
        full = sum(1 for n in prompt_len if n >= max_length)
        report["prompt_tokens"] = _token_summary(prompt_len, max_length)
        if full:
            warnings.append(f"{_plural(full, 'prompt')} {'fills' if full == 1 else 'fill'} max_length={max_length} "
                            "tokens, leaving no room for the answers: training cannot compare them. Raise "
                            "data.max_length or shorten the prompts.")
    if val_df is not None:
        seen = set(keys)
        overlap = sum(1 for p, c, r in preference_rows(val_df, cols) if f"{p}\x00{c}\x00{r}" in seen)
        report["validation_rows"], report["overlap_with_validation"] = int(len(val_df)), overlap
        _overlap_warning(overlap, warnings, "pairs")


def _suggest_classification(n: int) -> str:
    _, why = recommended_strategy(n, "encoder")
    return f"{why[:1].upper()}{why[1:]}."


def _truncation_warning(summary: dict, warnings: list[str], what: str) -> None:
    if summary["truncated_share"] > TRUNCATED_WARN:
        warnings.append(f"{summary['truncated_share']:.0%} of {what} ({summary['n_truncated']} rows) are longer "
                        f"than max_length={summary['max_length']} tokens and will be truncated: raise max_length "
                        f"(95% of rows fit in {math.ceil(summary['p95'])} tokens) or shorten the {what}.")


def _char_length_warning(lengths: list[int], max_length: int, warnings: list[str], notes: list[str]) -> None:
    notes.append("Token lengths were not measured (no tokenizer); text lengths are in characters.")
    limit = max_length * CHARS_PER_TOKEN
    over = sum(1 for n in lengths if n > limit)
    if lengths and over / len(lengths) > TRUNCATED_WARN:
        warnings.append(f"{over} rows are longer than about max_length={max_length} tokens (~{CHARS_PER_TOKEN} "
                        "characters per token) and will likely be truncated: raise max_length or shorten them. "
                        "Audit with a tokenizer for exact counts.")


def _overlap_warning(overlap: int, warnings: list[str], what: str) -> None:
    if overlap:
        warnings.append(f"{_plural(overlap, what[:-1], what)} appear in both the training and the validation data: "
                        "this leakage inflates validation scores. Remove them from one of the two files.")


def _audit_instruction(df, cols, tokenizer, max_length, val_df, template, report, warnings, notes) -> None:
    rows, errors = _instruction_rows(df, cols)
    prompts = [p for _, _, p, _ in rows]
    responses = [r for _, _, _, r in rows]
    empty_resp = sum(1 for r in responses if not r.strip())
    empty_prompt = sum(1 for p in prompts if not p.strip())
    keys = [_instruction_key(p, r) for p, r in zip(prompts, responses)]
    n_dupes = len(keys) - len(set(keys))
    n = len(rows)
    report.update({
        "usable_rows": n,
        "invalid_rows": len(errors),
        "empty_texts": empty_resp,
        "empty_prompts": empty_prompt,
        "duplicates": n_dupes,
        "text_length": _stats([len(p) + len(r) for p, r in zip(prompts, responses)]),
        "prompt_length": _stats([len(p) for p in prompts]),
        "response_length": _stats([len(r) for r in responses]),
        "suggestion": _suggest_instruction(n),
    })
    if errors:
        warnings.append(f"{_plural(len(errors), 'row')} cannot be read as an example ({errors[0]}"
                        f"{' ...' if len(errors) > 1 else ''}). Fix or remove {'it' if len(errors) == 1 else 'them'}.")
    if empty_resp:
        warnings.append(f"{_plural(empty_resp, 'row')} {'has' if empty_resp == 1 else 'have'} an empty or missing "
                        "response: there is nothing to learn from them. Fill in the answers or remove those rows.")
    if empty_prompt:
        warnings.append(f"{_plural(empty_prompt, 'row')} {'has' if empty_prompt == 1 else 'have'} an empty or "
                        "missing instruction/prompt. Fill it in or remove those rows.")
    if n_dupes:
        warnings.append(f"{_plural(n_dupes, 'duplicate example')} (same prompt and response as an earlier row): "
                        "remove them before training; they overweight those examples and can leak into validation.")
    if 0 < n < SMALL_INSTRUCTION:
        warnings.append(f"Small data: only {n} examples. Aim for {SMALL_INSTRUCTION}+ (the article suggests "
                        f"{GOOD_INSTRUCTION}-10000 good examples); use LoRA and few epochs to limit overfitting.")

    if tokenizer is not None:
        try:
            tmpl = D.resolve_template(template or "auto", tokenizer)
        except DataError as exc:
            warnings.append(f"Token lengths not checked: {exc}")
            tmpl = None
        if tmpl is not None:
            _instruction_tokens(rows, cols, tokenizer, tmpl, max_length, report, warnings)
    else:
        _char_length_warning([len(p) + len(r) for p, r in zip(prompts, responses)], max_length, warnings, notes)

    if val_df is not None:
        vcols = cols if _columns_present(val_df, cols) else D.detect_columns(val_df, "instruction")
        vrows, _ = _instruction_rows(val_df, vcols)
        vkeys = {_instruction_key(p, r) for _, _, p, r in vrows}
        overlap = len(vkeys & set(keys))
        report["validation_rows"] = int(len(val_df))
        report["overlap_with_validation"] = overlap
        _overlap_warning(overlap, warnings, "examples")


def _suggest_instruction(n: int) -> str:
    _, why = recommended_strategy(n, "causal")
    if n < GOOD_INSTRUCTION:
        return (f"{n} examples. {why[:1].upper()}{why[1:]}; the article suggests {GOOD_INSTRUCTION}-10000 good "
                "examples for instruction tuning.")
    return f"{n} examples. {why[:1].upper()}{why[1:]}; watch the forgetting probe."


def _instruction_tokens(rows, cols, tokenizer, template, max_length, report, warnings) -> None:
    """Measure each row as training does: data.prompt_and_response, then data.encode_pair."""
    lengths, cut_off, truncated, failed = [], 0, 0, []
    for i, row, _, _ in rows:
        try:
            prompt, response = D.prompt_and_response(row, cols, template, tokenizer, i)
        except Exception as exc:  # noqa: BLE001 - chat templates raise several types; report, don't crash
            failed.append(f"row {i}: {exc}")
            continue
        n_prompt = len(tokenizer(prompt, add_special_tokens=(template != "chat"))["input_ids"])
        n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        lengths.append(n_prompt + n_response)
        encoded = D.encode_pair(prompt, response, tokenizer, template, max_length)
        if encoded is None:
            cut_off += 1
        elif encoded[2]:
            truncated += 1
    summary = _token_summary(lengths, max_length)
    report["template"] = template
    report["token_length"] = summary
    report["token_lengths"] = _sample(lengths)
    report["response_cut_off"] = cut_off
    report["response_truncated"] = truncated
    if failed:
        warnings.append(f"The {template} template could not be applied to {_plural(len(failed), 'row')} "
                        f"({failed[0]}). Fix those rows or use template: alpaca.")
    if cut_off:
        warnings.append(f"{_plural(cut_off, 'row')} will be dropped from training: with max_length={max_length} "
                        "tokens no response token is left to learn (the prompt fills it, or the response is "
                        "empty). Raise max_length or shorten those prompts.")
    _truncation_warning(summary, warnings, "examples")


def audit_run(cfg, tokenizer, frames: D.Frames, train_part: pd.DataFrame, val_part: pd.DataFrame,
              part_columns: dict) -> dict:
    """audit.json of a run: the training file's checklist, and the overlap of the validation data used.

    With a validation file that is the file itself. When validation is split from the training file
    (`train_part` / `val_part`, with columns `part_columns`), the file is audited whole and the overlap
    is measured between the two parts of the split (the same text on both sides: duplicates in the
    file that leak into validation)."""
    report = audit_dataframe(frames.train, cfg.task, frames.columns, tokenizer=tokenizer,
                             max_length=cfg.data.max_length, val_df=frames.validation, template=cfg.data.template)
    if frames.validation is not None:
        report["validation_source"] = "file"
        return report
    split = audit_dataframe(train_part, cfg.task, part_columns, tokenizer=None, max_length=cfg.data.max_length,
                            val_df=val_part, template=cfg.data.template)
    report["validation_source"] = f"split from the training file (val_size={cfg.data.val_size})"
    for key in ("validation_rows", "overlap_with_validation", "validation_unseen_labels"):
        if key in split:
            report[key] = split[key]
    for w in split["warnings"]:
        if "appear in both the training and the validation data" in w:
            report["warnings"].append(w.replace("Remove them from one of the two files.",
                                                "Validation is split from the training file: remove the "
                                                "duplicate rows from it."))
    report["ok"] = not report["warnings"]
    return report


# ---------------------------------------------------------------------------------------------
# files


def load_audit_tokenizer(task: str, model, notes: list[str]):
    """(tokenizer or None, model id used or None). model=None: the task's bundled default; False: none."""
    if model is False:
        return None, None
    model_id = model or DEFAULT_MODELS[task]
    try:
        return load_tokenizer(resolve_model(model_id)), model_id
    except FinetuneError as exc:
        if model:            # the user asked for this model: tell them
            raise
        notes.append(f"Token lengths were not measured: the default tokenizer {model_id} is unavailable ({exc})")
        return None, None


def audit_file(path: str | Path, task: str, data_cfg=None, model=None, max_length: int | None = None) -> dict:
    """Read `path`, map its columns (honouring `data_cfg`), and audit it; adds `file` to the report.

    model: None = the bundled default for the task (bundled:minilm-l6 / bundled:smollm2-135m);
    False = no tokenizer (no token counts); otherwise a model id or folder whose tokenizer counts tokens.
    max_length: None = data_cfg.max_length (256 without a config). The validation file is
    data_cfg.validation when set.
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown task '{task}'.", f"Use one of: {', '.join(TASKS)}.")
    path = Path(path)
    df = D.read_table(path)
    cols = D.detect_columns(df, task, data_cfg, name=path.name)
    max_length = int(max_length or getattr(data_cfg, "max_length", None) or 256)
    template = getattr(data_cfg, "template", None) or "auto"
    val_df = None
    validation = getattr(data_cfg, "validation", None)
    if validation:
        val_df = D.read_table(validation)
        D.detect_columns(val_df, task, data_cfg, name=Path(validation).name)
    notes: list[str] = []
    tokenizer, model_id = load_audit_tokenizer(task, model, notes)
    report = audit_dataframe(df, task, cols, tokenizer=tokenizer, max_length=max_length, val_df=val_df,
                             template=template)
    report["notes"] = notes + report["notes"]
    report["file"] = str(path)
    report["validation_file"] = str(validation) if validation else None
    report["tokenizer"] = model_id
    return report


# ---------------------------------------------------------------------------------------------
# text report


def _fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def format_audit(report: dict) -> str:
    """A readable text report in the article's layout, ending with one WARNING line per problem."""
    bar = "=" * 60
    lines = [bar, "DATASET AUDIT REPORT", bar]
    if report.get("file"):
        lines.append(f"File: {report['file']}")
    lines.append(f"Task: {report['task']}")
    mapping = ", ".join(f"{k} = {v}" for k, v in report.get("column_mapping", {}).items() if v)
    lines.append(f"Columns: {', '.join(report.get('columns', []))}  (using {mapping})")
    lines.append("")
    lines.append(f"Total examples: {report['n_rows']:,}  (usable: {report.get('usable_rows', report['n_rows']):,})")

    dist = report.get("class_distribution")
    if dist is not None:
        lines += ["", f"Class distribution ({report.get('n_classes', len(dist))} classes):"]
        share = report.get("class_share", {})
        width = max([len(k) for k in dist] + [5])
        for label, count in dist.items():
            lines.append(f"  {label:<{width}}  {count:>6,}  ({share.get(label, 0):.1%})")
        if report.get("imbalance_ratio") is not None:
            lines.append(f"  Imbalance ratio (largest / smallest): {report['imbalance_ratio']:.1f}x")

    def length_block(title: str, stats: dict | None) -> None:
        if not stats:
            return
        lines.extend(["", f"{title}:",
                      f"  Min:    {_fmt(stats.get('min'))}", f"  Median: {_fmt(stats.get('median'))}",
                      f"  Mean:   {_fmt(stats.get('mean'))}", f"  Max:    {_fmt(stats.get('max'))}"])

    length_block("Text length (characters)", report.get("text_length"))
    if report["task"] == "instruction":
        length_block("Response length (characters)", report.get("response_length"))
    tok = report.get("token_length")
    if tok:
        source = f", tokenizer {report['tokenizer']}" if report.get("tokenizer") else ""
        lines += ["", f"Token length (max_length {tok['max_length']}{source}):",
                  f"  Min:    {_fmt(tok['min'])}", f"  Median: {_fmt(tok['median'])}",
                  f"  Mean:   {_fmt(tok['mean'])}", f"  p95:    {_fmt(tok['p95'])}", f"  Max:    {_fmt(tok['max'])}",
                  f"  Longer than max_length (truncated): {tok['n_truncated']:,} ({tok['truncated_share']:.1%})"]
        if "response_cut_off" in report:
            lines.append(f"  Rows dropped (response cut off entirely): {report['response_cut_off']:,}")
            lines.append(f"  Rows with a truncated response: {report['response_truncated']:,}")

    mv = report.get("missing_values", {})
    lines += ["", "Checks:",
              f"  Missing values: {mv.get('total', 0):,}" + (
                  "  (" + ", ".join(f"{c}: {n}" for c, n in mv.get("per_column", {}).items() if n) + ")"
                  if mv.get("total") else ""),
              f"  Duplicates: {report.get('duplicates', 0):,}",
              f"  Empty {'responses' if report['task'] == 'instruction' else 'texts'}: {report.get('empty_texts', 0):,}"]
    if "overlap_with_validation" in report:
        lines.append(f"  Overlap with validation: {report['overlap_with_validation']:,}")
    if report.get("suggestion"):
        lines += ["", f"Suggestion: {report['suggestion']}"]
    for note in report.get("notes", []):
        lines.append(f"Note: {note}")
    lines += ["", bar]
    if report.get("warnings"):
        lines += [f"WARNING: {w}" for w in report["warnings"]]
    else:
        lines.append("No problems found.")
    lines.append(bar)
    return "\n".join(lines)
