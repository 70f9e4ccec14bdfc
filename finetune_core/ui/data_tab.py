"""Data tab: upload / built-in example / Hub dataset, task, column mapping, preview, audit."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gradio as gr

from ..errors import DataError, FinetuneError
from .common import (EXAMPLES, TASK_CHOICES, AppContext, example_path, is_offline, owner_of, user_errors,
                     warning_box)

FILE_TYPES = [".csv", ".tsv", ".json", ".jsonl", ".parquet"]
FORMAT_CHOICES = [("Alpaca: instruction / input / output", "alpaca"), ("Prompt / completion", "prompt_completion"),
                  ("Chat messages (list of {role, content})", "messages")]
SOURCES = [("Built-in example", "example"), ("Upload a file", "upload"), ("Hugging Face dataset", "hub")]


def source_choices() -> list:
    """The source radio's choices; offline, the Hub option says it needs the network."""
    if not is_offline():
        return SOURCES
    return [(label + " (needs internet; offline: cached only)" if value == "hub" else label, value)
            for label, value in SOURCES]
MAX_HUB_ROWS = int(os.environ.get("FINETUNE_MAX_HUB_ROWS", "20000"))
NICE_NAMES = {"n_rows": "rows", "n_classes": "classes", "imbalance_ratio": "imbalance ratio (largest / smallest)",
              "duplicates": "duplicate rows", "n_duplicates": "duplicate rows", "empty_text": "empty texts",
              "missing_labels": "missing labels"}


# ---------------------------------------------------------------------------------------------
# data source


def hub_dataset_file(ctx: AppContext, hub_dataset: str, split: str = "train") -> Path:
    """Download a Hub dataset split once into FINETUNE_HOME/datasets/ as Parquet (cached: works offline later).

    `hub_dataset` is `name`, `org/name`, or `name:config` (e.g. glue:sst2).
    """
    hub_dataset = (hub_dataset or "").strip()
    split = (split or "train").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?(:[A-Za-z0-9_.-]+)?", hub_dataset):
        raise DataError(f"'{hub_dataset}' is not a Hub dataset id.", "Write it as name or org/name "
                        "(add :config for datasets with several configurations, e.g. glue:sst2).")
    if not re.fullmatch(r"[A-Za-z0-9_.\[\]:%+-]+", split):
        raise DataError(f"'{split}' is not a split name.", "Use train, validation, test or a slice like train[:2000].")
    name, _, config = hub_dataset.partition(":")
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{config or 'default'}-{split}")
    target = ctx.home / "datasets" / f"{slug}.parquet"
    if target.exists():
        return target
    if is_offline():
        raise DataError(f"The app is offline (HF_HUB_OFFLINE=1) and '{hub_dataset}' has not been downloaded before.",
                        "Upload a file or pick a built-in example, or run the app online once to fetch the dataset.")
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown id...
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise DataError(f"Could not load the Hub dataset '{hub_dataset}' ({split}): {first}",
                        "Check the id on huggingface.co/datasets and your network, or upload a file.") from None
    if len(ds) > MAX_HUB_ROWS:
        ds = ds.shuffle(seed=42).select(range(MAX_HUB_ROWS))
    df = ds.to_pandas()
    # class labels stored as integers with names: write the names, they read better everywhere
    for col, feat in ds.features.items():
        names = getattr(feat, "names", None)
        if names and col in df:
            df[col] = df[col].map(lambda i, n=names: n[i] if isinstance(i, (int,)) and 0 <= i < len(n) else i)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.parquet")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, target)
    return target


def resolve_data(ctx: AppContext, data_file=None, example: str | None = None, hub_dataset: str | None = None,
                 hub_split: str = "train") -> Path:
    """The data file to use: an uploaded file, else a Hub dataset, else a built-in example."""
    if data_file:
        path = Path(data_file if isinstance(data_file, str) else getattr(data_file, "name", data_file))
        if not path.is_file():
            raise DataError("The uploaded file is no longer on the server.", "Upload it again.")
        return path
    if hub_dataset and str(hub_dataset).strip():
        return hub_dataset_file(ctx, hub_dataset, hub_split)
    if example:
        if example not in EXAMPLES:
            raise DataError(f"Unknown built-in example '{example}'.", f"Pick one of: {', '.join(EXAMPLES)}.")
        return example_path(example)
    raise DataError("No data selected.", "Upload a CSV/TSV/JSON/JSONL/Parquet file, or pick a built-in example.")


def read_frame(path: Path):
    from ..data import read_table

    from .common import upload_limit_mb

    return read_table(path, max_bytes=int(upload_limit_mb() * 1e6))


def guess_task(df) -> str:
    from ..data import detect_columns

    try:
        detect_columns(df, "instruction")
        return "instruction"
    except FinetuneError:
        return "classification"


def detected_columns(df, task: str) -> dict:
    """Column mapping pre-filled from finetune_core.data.detect_columns (blank where nothing fits)."""
    from ..data import detect_columns

    out = {"text": None, "label": None, "format": "alpaca", "prompt": None, "input": None, "response": None}
    try:
        cols = detect_columns(df, task)
    except FinetuneError:
        return out
    if task == "classification":
        out.update(text=cols["text"], label=cols["label"])
    elif cols["format"] == "alpaca":
        out.update(format="alpaca", prompt=cols["instruction"], input=cols.get("input"), response=cols["output"])
    elif cols["format"] == "prompt_completion":
        out.update(format="prompt_completion", prompt=cols["prompt"], response=cols["completion"])
    else:
        out.update(format="messages", prompt=cols["messages"])
    return out


def data_config(task: str, text_column=None, label_column=None, instruction_format="alpaca", prompt_column=None,
                input_column=None, response_column=None, max_length: int = 256):
    """A finetune_core.config.DataConfig from the column pickers (blank = detect)."""
    from ..config import DataConfig

    def clean(v):
        return str(v).strip() if v not in (None, "") and str(v).strip() else None

    d = DataConfig(max_length=int(max_length or 256))
    if task == "classification":
        d.text_column, d.label_column = clean(text_column), clean(label_column)
    elif instruction_format == "messages":
        d.messages_column = clean(prompt_column)
    elif instruction_format == "prompt_completion":
        d.prompt_column, d.completion_column = clean(prompt_column), clean(response_column)
    else:
        d.instruction_column, d.output_column = clean(prompt_column), clean(response_column)
        d.input_column = clean(input_column)
    return d


def _preview(df, n: int = 50):
    def short(v):
        if isinstance(v, (list, dict)):
            v = json.dumps(v, ensure_ascii=False, default=str)
        s = "" if v is None else str(v)
        return s if len(s) <= 100 else s[:97] + "..."

    return df.head(n).apply(lambda col: col.map(short))


def _column_widths(preview) -> list[str]:
    """Share the preview's width by typical cell length, so short columns (labels) stay in view."""
    lens = []
    for col in preview.columns:
        cells = preview[col].astype(str).str.len()
        typical = int(cells.quantile(0.9)) if len(cells) else 0
        lens.append(min(60, max(len(str(col)), typical)) + 4)
    total = sum(lens) or 1
    return [f"{100 * n / total:.1f}%" for n in lens]


# ---------------------------------------------------------------------------------------------
# audit rendering


def audit_tables(report: dict) -> list[list]:
    """Readable [check, value] rows from any audit report (scalars and one level of nested scalars)."""
    rows = []
    for key, value in report.items():
        if key in ("warnings", "notes", "token_lengths", "class_distribution", "class_share", "columns", "suggestion",
                   "file", "ok", "column_mapping"):
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    rows.append([f"{NICE_NAMES.get(key, key.replace('_', ' '))}: {sub}", _fmt(v)])
        elif isinstance(value, (int, float, str, bool)):
            rows.append([NICE_NAMES.get(key, key.replace("_", " ")), _fmt(value)])
    for name, count in (report.get("class_distribution") or {}).items():
        rows.append([f"class '{name}'", _fmt(count)])
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.3g}"
    return "" if v is None else str(v)


def render_audit(report: dict, max_length: int):
    from .. import plots

    n = report.get("n_rows")
    parts = [f"**{n} rows**" if n is not None else "**Audit**"]
    dist = report.get("class_distribution") or {}
    if dist:
        parts.append(f"{len(dist)} classes")
    tl = report.get("token_length") or {}
    if tl:
        mean = tl.get("mean")
        p95 = tl.get("p95")
        bits = []
        if isinstance(mean, (int, float)):
            bits.append(f"mean {mean:.0f}")
        if isinstance(p95, (int, float)):
            bits.append(f"95% under {p95:.0f}")
        if bits:
            parts.append("tokens per row: " + ", ".join(bits) + f" (max_length {max_length})")
    warnings = [str(w) for w in report.get("warnings") or []]
    summary = " · ".join(parts) + (f" · **{len(warnings)} warning(s)** below" if warnings else " · no warnings")
    if report.get("suggestion"):
        summary += f"\n\n💡 {report['suggestion']}"
    for note in report.get("notes") or []:
        summary += f"\n\nℹ️ {note}"
    return (summary, warning_box(warnings, "The audit found issues worth a look before training"),
            plots.class_distribution_figure(report), plots.token_length_figure(report, max_length),
            audit_tables(report), {k: v for k, v in report.items() if k != "token_lengths"})


# ---------------------------------------------------------------------------------------------
# UI


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Pick a **built-in example** or upload your own file (CSV, TSV, JSON, JSONL or Parquet). "
                "The audit checks the data *before* you spend time training: class balance, length against "
                "`max_length`, duplicates and leaks between train and validation.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            ui.source = gr.Radio(source_choices(), value="example", label="Data source",
                                 info="Start with an example to learn the workflow, then bring your own data.")
            ui.example = gr.Dropdown([(label, name) for name, (label, _) in EXAMPLES.items()], value="domains.csv",
                                     label="Built-in example", allow_custom_value=True,
                                     info="Small on purpose: a run takes well under a minute on a laptop CPU.")
            ui.data_file = gr.File(label="Your data file", file_types=FILE_TYPES, type="filepath", visible=False,
                                   elem_id="data-file")
            with gr.Row(visible=False) as ui.hub_row:
                ui.hub_dataset = gr.Textbox("", label="Hub dataset id", placeholder="ag_news  or  glue:sst2", scale=3,
                                            info="Needs the internet the first time; then it is cached."
                                                 + (" The app is offline now: only datasets loaded before work."
                                                    if is_offline() else ""))
                ui.hub_split = gr.Textbox(label="Split", value="train", scale=1, info="e.g. train[:2000]")
            ui.hub_load = gr.Button("Load dataset from the Hub", visible=False, size="sm")
            ui.task = gr.Radio(TASK_CHOICES, value="classification", label="Task",
                               info="Classification: each text gets one label (spam/ham, topic...). Instruction "
                                    "tuning: teach a chat model to answer in your style.")
            with gr.Accordion("Column mapping (detected automatically)", open=True):
                with gr.Row():
                    ui.text_column = gr.Dropdown([""], value="", label="Text column", allow_custom_value=True,
                                                 info="The input the model reads.")
                    ui.label_column = gr.Dropdown([""], value="", label="Label column", allow_custom_value=True,
                                                  info="The class to predict.")
                ui.instruction_format = gr.Radio(FORMAT_CHOICES, value="alpaca", label="Instruction format",
                                                 visible=False, info="How each row holds the prompt and the answer.")
                with gr.Row():
                    ui.prompt_column = gr.Dropdown([""], value="", label="Instruction / prompt / messages column",
                                                   allow_custom_value=True, visible=False,
                                                   info="What the user asks (or the whole chat, for messages).")
                    ui.input_column = gr.Dropdown([""], value="", label="Input column (optional)", allow_custom_value=True,
                                                  visible=False, info="Extra context appended to the instruction.")
                    ui.response_column = gr.Dropdown([""], value="", label="Response column", allow_custom_value=True,
                                                     visible=False, info="The answer the model learns to write.")
            ui.max_length = gr.Slider(32, 2048, value=256, step=16, label="max_length (tokens)",
                                      info="Longer rows are cut. Pick it so ~95% of rows fit (see the histogram); "
                                           "memory and time grow with it.")
            ui.audit_btn = gr.Button("Run the data audit", variant="primary", elem_id="audit-btn")
        with gr.Column(scale=3, min_width=420):
            ui.data_summary = gr.Markdown("")
            ui.preview = gr.Dataframe(label="Preview (first 50 rows)", interactive=False, wrap=True,
                                      max_height=300)
            # the audit verdict sits next to the preview: visible without scrolling at 1280x800
            ui.audit_summary = gr.Markdown("", label="summary", elem_id="audit-summary")
            ui.audit_warnings = gr.HTML("", label="warnings")
    with gr.Row():
        ui.class_plot = gr.Plot(label="Class distribution", show_label=False, elem_id="class-plot")
        ui.token_plot = gr.Plot(label="Token lengths", show_label=False, elem_id="token-plot")
    with gr.Row():
        ui.audit_table = gr.Dataframe(headers=["check", "value"], label="Audit details", interactive=False,
                                      max_height=300)
        with gr.Accordion("Full audit report (JSON)", open=False):
            ui.audit_json = gr.JSON(label="audit", elem_id="audit-json")
    ui.data_info = gr.State({})


def wire(ctx: AppContext, ui) -> None:
    col_outputs = [ui.text_column, ui.label_column, ui.instruction_format, ui.prompt_column, ui.input_column,
                   ui.response_column]

    def column_updates(columns: list[str], task: str, det: dict):
        cls = task == "classification"
        opts = [""] + columns
        return [gr.update(choices=opts, value=det["text"] or "", visible=cls),
                gr.update(choices=opts, value=det["label"] or "", visible=cls),
                gr.update(value=det["format"], visible=not cls),
                gr.update(choices=opts, value=det["prompt"] or "", visible=not cls),
                gr.update(choices=opts, value=det["input"] or "", visible=not cls and det["format"] == "alpaca"),
                gr.update(choices=opts, value=det["response"] or "", visible=not cls and det["format"] != "messages")]

    def info_for(df, path: Path, task: str, det: dict) -> dict:
        n_classes = None
        if task == "classification" and det.get("label") in df.columns:
            n_classes = int(df[det["label"]].dropna().astype(str).str.strip().nunique())
        return {"path": str(path), "name": path.name, "n_rows": int(len(df)), "n_classes": n_classes,
                "columns": list(map(str, df.columns)), "task": task}

    @user_errors
    def load_data(data_file, example, hub_dataset, hub_split, current_task):
        path = resolve_data(ctx, data_file, example, hub_dataset, hub_split)
        df = read_frame(path)
        if example and not data_file and not (hub_dataset or "").strip():
            task = EXAMPLES.get(example, (None, current_task))[1]
        else:
            task = guess_task(df)
        det = detected_columns(df, task)
        columns = list(map(str, df.columns))
        summary = (f"**{path.name}** · {len(df)} rows · columns: {', '.join(f'`{c}`' for c in columns)} · "
                   f"looks like **{task}** data.")
        preview = _preview(df)
        table = gr.update(value=preview, column_widths=_column_widths(preview))
        return [summary, table, task, *column_updates(columns, task, det), info_for(df, path, task, det)]

    load_outputs = [ui.data_summary, ui.preview, ui.task, *col_outputs, ui.data_info]

    @user_errors
    def change_task(task, info):
        if not info or not info.get("path") or not Path(info["path"]).exists():
            return [*[gr.update(visible=(task == "classification") if i < 2 else (task != "classification"))
                      for i in range(6)], info]
        df = read_frame(Path(info["path"]))
        det = detected_columns(df, task)
        return [*column_updates(info["columns"], task, det), info_for(df, Path(info["path"]), task, det)]

    def change_format(fmt):
        return gr.update(visible=fmt == "alpaca"), gr.update(visible=fmt != "messages")

    def switch_source(source, example):
        """Show the chosen source's inputs; the other sources' values are cleared, so nothing stale is used."""
        return (gr.update(visible=source == "example",
                          value=(example or "domains.csv") if source == "example" else None),
                gr.update(visible=source == "upload", value=None),
                gr.update(visible=source == "hub"), gr.update(visible=source == "hub"),
                gr.update(value="") if source != "hub" else gr.update())

    WAITING = {"upload": "Upload a file above to see its preview and audit.",
               "hub": "Type a Hub dataset id above and press 'Load dataset from the Hub'."}

    @user_errors
    def load_for_source(source, data_file, example, hub_dataset, hub_split, current_task):
        """After a source switch: the example loads at once; upload / hub wait for a file or an id, with
        the old file's preview, summary and columns cleared (they would describe data no longer used)."""
        if source == "example" or data_file or (hub_dataset or "").strip():
            return load_data(data_file, example, hub_dataset, hub_split, current_task)
        cleared = [gr.update(choices=[""], value="") if i != 2 else gr.update() for i in range(6)]
        return [WAITING.get(source, ""), None, gr.update(), *cleared, {}]

    def audit_for_source(source, info, *args):
        """The audit of what the switch loaded; cleared while upload / hub wait for their data."""
        if info and info.get("path"):
            return audit(*args)
        return "", "", None, None, [], None

    @user_errors
    def audit(data_file=None, example="domains.csv", hub_dataset="", hub_split="train", task="classification",
              text_column="", label_column="", instruction_format="alpaca", prompt_column="", input_column="",
              response_column="", max_length=256, model="", owner_state=None, request: gr.Request = None):
        """Audit a data file before training. Returns (summary, warnings_html, class_plot, token_plot, table, report)."""
        from ..audit import audit_file

        path = resolve_data(ctx, data_file, example, hub_dataset, hub_split)
        max_length = int(max_length or 256)
        dcfg = data_config(task, text_column, label_column, instruction_format, prompt_column, input_column,
                           response_column, max_length)
        model = (model or "").strip() or None
        if model and not model.startswith("bundled:"):
            try:
                from ..models import resolve_model

                resolve_model(model, allowed_roots=ctx.model_roots(owner_of(owner_state, request)))
            except FinetuneError as exc:
                gr.Warning(f"Counting tokens with the bundled tokenizer instead: {exc.message}")
                model = None
        report = audit_file(str(path), task, data_cfg=dcfg, model=model, max_length=max_length)
        return render_audit(report, max_length)

    audit_outputs = [ui.audit_summary, ui.audit_warnings, ui.class_plot, ui.token_plot, ui.audit_table,
                     ui.audit_json]
    audit_inputs = [ui.data_file, ui.example, ui.hub_dataset, ui.hub_split, ui.task, ui.text_column,
                    ui.label_column, ui.instruction_format, ui.prompt_column, ui.input_column, ui.response_column,
                    ui.max_length, ui.model, ui.owner_state]
    ui.audit_fn = audit
    ui.audit_inputs, ui.audit_outputs = audit_inputs, audit_outputs

    ui.audit_btn.click(audit, audit_inputs, audit_outputs, api_name="audit", api_visibility="public")
    src_inputs = [ui.data_file, ui.example, ui.hub_dataset, ui.hub_split, ui.task]
    ui.source.input(switch_source, [ui.source, ui.example],
                    [ui.example, ui.data_file, ui.hub_row, ui.hub_load, ui.hub_dataset],
                    api_visibility="private", queue=False).then(
        load_for_source, [ui.source] + src_inputs, load_outputs, api_visibility="private").then(
        audit_for_source, [ui.source, ui.data_info] + audit_inputs, audit_outputs, api_visibility="private")
    for trigger in (ui.example.input, ui.data_file.upload, ui.hub_load.click, ui.hub_dataset.submit):
        trigger(load_data, src_inputs, load_outputs, api_visibility="private").success(
            audit, audit_inputs, audit_outputs, api_name="audit_after_load", api_visibility="private")
    ui.task.input(change_task, [ui.task, ui.data_info], [*col_outputs, ui.data_info],
                  api_visibility="private")
    ui.instruction_format.input(change_format, ui.instruction_format, [ui.input_column, ui.response_column],
                                api_visibility="private", queue=False)
    ui.data_file.clear(lambda: (WAITING["upload"], None, {}, "", "", None, None, [], None), None,
                       [ui.data_summary, ui.preview, ui.data_info] + audit_outputs,
                       api_visibility="private", queue=False)
    ui.load_data_fn = load_data
    ui.load_outputs = load_outputs
    ui.src_inputs = src_inputs
