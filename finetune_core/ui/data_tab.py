"""Data tab: upload / built-in example / Hub dataset, task, column mapping, validation file, preview, audit.

The task, column, max_length and validation controls built here belong to the Train form
(finetune_core/ui/form.py): their values and defaults come from its table. The audit is the one Start
writes to audit.json, of the data Start would read: the same columns, and the validation file or the
split Start makes (the Train tab's val_size, the run's seed), with the train/validation overlap.
Handlers are module-level functions of (ctx, ...); `wire()` binds them to the components.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from .. import plots
from ..audit import audit_dataframe, load_audit_tokenizer
from ..data import detect_columns, load_frames
from ..errors import FinetuneError
from ..models import resolve_model
from . import form
from .common import (EXAMPLES, TASK_CHOICES, AppContext, bind, is_offline, owner_of, user_errors,
                     warning_box)
from .data_source import read_frame, resolve_data

FILE_TYPES = [".csv", ".tsv", ".json", ".jsonl", ".parquet"]
FORMAT_CHOICES = [("Alpaca: instruction / input / output", "alpaca"), ("Prompt / completion", "prompt_completion"),
                  ("Chat messages (list of {role, content})", "messages")]
SOURCES = [("Built-in example", "example"), ("Upload a file", "upload"), ("Hugging Face dataset", "hub")]
NICE_NAMES = {"n_rows": "rows", "n_classes": "classes", "imbalance_ratio": "imbalance ratio (largest / smallest)",
              "duplicates": "duplicate rows", "n_duplicates": "duplicate rows", "empty_text": "empty texts",
              "missing_labels": "missing labels", "overlap_with_validation": "overlap with validation (leakage)"}
WAITING = {"upload": "Upload a file above to see its preview and audit.",
           "hub": "Type a Hub dataset id above and press 'Load dataset from the Hub'."}


def source_choices() -> list:
    """The source radio's choices; offline, the Hub option says it needs the network."""
    if not is_offline():
        return SOURCES
    return [(label + " (needs internet; offline: cached only)" if value == "hub" else label, value)
            for label, value in SOURCES]


# ---------------------------------------------------------------------------------------------
# reading the data


def guess_task(df) -> str:
    try:
        detect_columns(df, "preference")
        return "preference"
    except FinetuneError:
        pass
    try:
        detect_columns(df, "instruction")
        return "instruction"
    except FinetuneError:
        return "classification"


def detected_columns(df, task: str) -> dict:
    """Column mapping pre-filled from finetune_core.data.detect_columns (blank where nothing fits)."""
    out = {"text": None, "label": None, "format": "alpaca", "prompt": None, "input": None, "response": None}
    try:
        cols = detect_columns(df, task)
    except FinetuneError:
        return out
    if task == "classification":
        out.update(text=cols["text"], label=cols["label"])
    elif task == "preference":
        pass                  # prompt / chosen / rejected are found by name (data.preference_columns)
    elif cols["format"] == "alpaca":
        out.update(format="alpaca", prompt=cols["instruction"], input=cols.get("input"), response=cols["output"])
    elif cols["format"] == "prompt_completion":
        out.update(format="prompt_completion", prompt=cols["prompt"], response=cols["completion"])
    else:
        out.update(format="messages", prompt=cols["messages"])
    return out


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
                   "file", "validation_file", "ok", "column_mapping"):
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


def validation_line(report: dict) -> str:
    """Which validation data Start will use, and how much of it the training data repeats."""
    rows, overlap = report["validation_rows"], report.get("overlap_with_validation") or 0
    if report.get("validation_file"):
        where = f"{rows} rows from `{Path(report['validation_file']).name}`"
    else:
        where = (f"{rows} rows held out of the training file as Start will (val_size {report.get('val_size')}, "
                 f"seed {report.get('seed')})")
    what = "texts" if report.get("task") == "classification" else "examples"
    leak = f"⚠️ **{overlap} {what} also in the training data** (leakage)" if overlap else \
        f"no {what} shared with the training data"
    return f"**Validation:** {where} · {leak}"


def render_audit(report: dict, max_length: int):
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
    if report.get("validation_rows") is not None:
        summary += "\n\n" + validation_line(report)
    if report.get("suggestion"):
        summary += f"\n\n💡 {report['suggestion']}"
    for note in report.get("notes") or []:
        summary += f"\n\nℹ️ {note}"
    return (summary, warning_box(warnings, "The audit found issues worth a look before training"),
            plots.class_distribution_figure(report), plots.token_length_figure(report, max_length),
            audit_tables(report), {k: v for k, v in report.items() if k != "token_lengths"})


# ---------------------------------------------------------------------------------------------
# UI


def column_updates(columns: list[str], task: str, det: dict) -> list:
    """The six column controls for this task and detected mapping (choices, value, visibility)."""
    cls = task == "classification"
    opts = [""] + columns
    return [gr.update(choices=opts, value=det["text"] or "", visible=cls),
            gr.update(choices=opts, value=det["label"] or "", visible=cls),
            gr.update(value=det["format"], visible=not cls),
            gr.update(choices=opts, value=det["prompt"] or "", visible=not cls),
            gr.update(choices=opts, value=det["input"] or "", visible=not cls and det["format"] == "alpaca"),
            gr.update(choices=opts, value=det["response"] or "", visible=not cls and det["format"] != "messages")]


def info_for(df, path: Path, task: str, det: dict) -> dict:
    """What the other tabs need to know of the loaded data (the data_info state)."""
    n_classes = None
    if task == "classification" and det.get("label") in df.columns:
        n_classes = int(df[det["label"]].dropna().astype(str).str.strip().nunique())
    return {"path": str(path), "name": path.name, "n_rows": int(len(df)), "n_classes": n_classes,
            "columns": list(map(str, df.columns)), "task": task}


# ---------------------------------------------------------------------------------------------
# handlers


@user_errors
def load_data(ctx: AppContext, data_file, example, hub_dataset, hub_split, current_task):
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


@user_errors
def load_for_source(ctx: AppContext, source, data_file, example, hub_dataset, hub_split, current_task):
    """After a source switch: the example loads at once; upload / hub wait for a file or an id, with
    the old file's preview, summary and columns cleared (they would describe data no longer used)."""
    if source == "example" or data_file or (hub_dataset or "").strip():
        return load_data(ctx, data_file, example, hub_dataset, hub_split, current_task)
    cleared = [gr.update(choices=[""], value="") if i != 2 else gr.update() for i in range(6)]
    return [WAITING.get(source, ""), None, gr.update(), *cleared, {}]


def audit_as_start(cfg, model=None) -> dict:
    """The report Start writes to audit.json, for the data `cfg` names (train.audit_as_run: the same
    reading, split and errors as the run), with the training file's checklist and its overlap with
    the validation data.

    model: whose tokenizer counts tokens (None: the task's bundled model, as audit_file)."""
    from .. import train as engine     # imports torch: loaded by the first audit, not to draw the page

    notes: list[str] = []
    tokenizer, model_id = load_audit_tokenizer(cfg.task, model, notes)
    if tokenizer is None:              # no tokenizer to prepare with: the file's checklist alone
        frames = load_frames(cfg)
        report = audit_dataframe(frames.train, cfg.task, frames.columns, max_length=cfg.data.max_length,
                                 val_df=frames.validation, template=cfg.data.template)
    else:
        report = engine.audit_as_run(cfg, tokenizer)
    report.update(notes=notes + report["notes"], file=str(cfg.data.train), validation_file=cfg.data.validation,
                  tokenizer=model_id)
    if not cfg.data.validation and "validation_rows" in report:
        report.update(val_size=cfg.data.val_size, seed=cfg.seed)
    return report


@user_errors
def audit(ctx: AppContext, values: dict, model="", owner_state=None, request: gr.Request = None):
    """Audit the data before training: the data file, and the validation file or the split Start would make.

    Returns (summary, warnings_html, class_plot, token_plot, table, report)."""
    path = resolve_data(ctx, **form.source(values))
    cfg = form.form_to_config(values, path)
    model = (model or "").strip() or None
    if model and not model.startswith("bundled:"):
        try:
            resolve_model(model, allowed_roots=ctx.model_roots(owner_of(owner_state, request)))
        except FinetuneError as exc:
            gr.Warning(f"Counting tokens with the bundled tokenizer instead: {exc.message}")
            model = None
    return render_audit(audit_as_start(cfg, model), cfg.data.max_length)


def audit_for_source(ctx: AppContext, values: dict, model="", owner_state=None, source=None, info=None):
    """The audit of what the switch loaded; cleared while upload / hub wait for their data."""
    if info and info.get("path"):
        return audit(ctx, values, model, owner_state)
    return "", "", None, None, [], None


# ---------------------------------------------------------------------------------------------
# UI


def build(ctx: AppContext, ui) -> None:
    v = form.DEFAULTS
    gr.Markdown("Pick a **built-in example** or upload your own file (CSV, TSV, JSON, JSONL or Parquet). "
                "The audit checks the data *before* you spend time training: class balance, length against "
                "`max_length`, duplicates, and leaks between training and validation (your validation file, "
                "or the split Start will make).")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            ui.source = gr.Radio(source_choices(), value="example", label="Data source",
                                 info="Start with an example to learn the workflow, then bring your own data.")
            ui.example = gr.Dropdown([(label, name) for name, (label, _) in EXAMPLES.items()], value=v["example"],
                                     label="Built-in example", allow_custom_value=True,
                                     info="Small on purpose: a run takes well under a minute on a laptop CPU.")
            ui.data_file = gr.File(v["data_file"], label="Your data file", file_types=FILE_TYPES, type="filepath",
                                   visible=False, elem_id="data-file")
            with gr.Row(visible=False) as ui.hub_row:
                ui.hub_dataset = gr.Textbox(v["hub_dataset"], label="Hub dataset id",
                                            placeholder="ag_news  or  glue:sst2", scale=3,
                                            info="Needs the internet the first time; then it is cached."
                                                 + (" The app is offline now: only datasets loaded before work."
                                                    if is_offline() else ""))
                ui.hub_split = gr.Textbox(label="Split", value=v["hub_split"], scale=1, info="e.g. train[:2000]")
            ui.hub_load = gr.Button("Load dataset from the Hub", visible=False, size="sm")
            with gr.Accordion("Validation data (optional)", open=False):
                ui.validation_file = gr.File(v["validation_file"], label="Validation file", file_types=FILE_TYPES,
                                             type="filepath", elem_id="validation-file", height=90)
                gr.Markdown("Rows the model never trains on, used to measure it, with the same columns as the "
                            "training data. Without a file, Start holds out the Train tab's *Validation share* "
                            "of the training rows; the audit checks either for overlap with training.")
            ui.task = gr.Radio(TASK_CHOICES, value=v["task"], label="Task",
                               info="Classification: each text gets one label (spam/ham, topic...). Instruction "
                                    "tuning: teach a chat model to answer in your style.")
            with gr.Accordion("Column mapping (detected automatically)", open=True):
                with gr.Row():
                    ui.text_column = gr.Dropdown([""], value=v["text_column"], label="Text column",
                                                 allow_custom_value=True, info="The input the model reads.")
                    ui.label_column = gr.Dropdown([""], value=v["label_column"], label="Label column",
                                                  allow_custom_value=True, info="The class to predict.")
                ui.instruction_format = gr.Radio(FORMAT_CHOICES, value=v["instruction_format"],
                                                 label="Instruction format", visible=False,
                                                 info="How each row holds the prompt and the answer.")
                with gr.Row():
                    ui.prompt_column = gr.Dropdown([""], value=v["prompt_column"],
                                                   label="Instruction / prompt / messages column",
                                                   allow_custom_value=True, visible=False,
                                                   info="What the user asks (or the whole chat, for messages).")
                    ui.input_column = gr.Dropdown([""], value=v["input_column"], label="Input column (optional)",
                                                  allow_custom_value=True, visible=False,
                                                  info="Extra context appended to the instruction.")
                    ui.response_column = gr.Dropdown([""], value=v["response_column"], label="Response column",
                                                     allow_custom_value=True, visible=False,
                                                     info="The answer the model learns to write.")
            ui.max_length = gr.Slider(32, 2048, value=v["max_length"], step=16, label="max_length (tokens)",
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


def source_inputs(ui) -> list:
    return [ui.data_file, ui.example, ui.hub_dataset, ui.hub_split, ui.task]


def load_outputs(ui) -> list:
    return [ui.data_summary, ui.preview, ui.task, *column_outputs(ui), ui.data_info]


def column_outputs(ui) -> list:
    return [ui.text_column, ui.label_column, ui.instruction_format, ui.prompt_column, ui.input_column,
            ui.response_column]


def audit_inputs(ui, *extra) -> list:
    """The inputs of an audit handler bound with audit_binding: the data fields, model, owner, `extra`
    (the handler's own parameters), then the fields that decide the validation data."""
    return (form.components(ui, form.DATA_FIELDS) + [ui.model, ui.owner_state, *extra]
            + form.components(ui, form.AUDIT_LATER_FIELDS))


def audit_binding(ctx: AppContext, fn):
    return form.bind_form(ctx, fn, form.DATA_FIELDS, later=form.AUDIT_LATER_FIELDS)


def audit_outputs(ui) -> list:
    return [ui.audit_summary, ui.audit_warnings, ui.class_plot, ui.token_plot, ui.audit_table, ui.audit_json]


def wire(ctx: AppContext, ui) -> None:
    loader, auditor = bind(ctx, load_data), audit_binding(ctx, audit)
    ui.audit_btn.click(auditor, audit_inputs(ui), audit_outputs(ui), api_name="audit", api_visibility="public")
    ui.source.input(switch_source, [ui.source, ui.example],
                    [ui.example, ui.data_file, ui.hub_row, ui.hub_load, ui.hub_dataset],
                    api_visibility="private", queue=False).then(
        bind(ctx, load_for_source), [ui.source] + source_inputs(ui), load_outputs(ui), api_visibility="private").then(
        audit_binding(ctx, audit_for_source), audit_inputs(ui, ui.source, ui.data_info),
        audit_outputs(ui), api_visibility="private")
    for trigger in (ui.example.input, ui.data_file.upload, ui.hub_load.click, ui.hub_dataset.submit):
        trigger(loader, source_inputs(ui), load_outputs(ui), api_visibility="private").success(
            auditor, audit_inputs(ui), audit_outputs(ui), api_name="audit_after_load", api_visibility="private")
    # a new validation file, or none (back to the split): the overlap is measured again
    for trigger in (ui.validation_file.upload, ui.validation_file.clear):
        trigger(audit_binding(ctx, audit_for_source), audit_inputs(ui, ui.source, ui.data_info), audit_outputs(ui),
                api_visibility="private")
    ui.task.input(change_task, [ui.task, ui.data_info], [*column_outputs(ui), ui.data_info],
                  api_visibility="private")
    ui.instruction_format.input(change_format, ui.instruction_format, [ui.input_column, ui.response_column],
                                api_visibility="private", queue=False)
    ui.data_file.clear(lambda: (WAITING["upload"], None, {}, "", "", None, None, [], None), None,
                       [ui.data_summary, ui.preview, ui.data_info] + audit_outputs(ui),
                       api_visibility="private", queue=False)


def first_paint(ctx: AppContext, ui) -> None:
    """On page load, once the session id is restored: the default example's preview, then its audit."""
    ui.session_load.then(bind(ctx, load_data), source_inputs(ui), load_outputs(ui), api_visibility="private").success(
        audit_binding(ctx, audit), audit_inputs(ui), audit_outputs(ui), api_visibility="private")
