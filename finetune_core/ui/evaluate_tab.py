"""Evaluate tab: one run's metrics against baselines, errors, confusion; all runs side by side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gradio as gr

from ..jobs import read_events
from .common import AppContext, fmt_metric, owner_of, run_choices, dropdown_update, user_errors


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def prompt_preview(prompt: str, limit: int = 400) -> str:
    """The user's part of a rendered prompt (chat template or Alpaca), for tables."""
    text = prompt or ""
    m = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, flags=re.S)
    if m:
        text = m[-1]
    else:
        m = re.search(r"### Instruction:\n(.*?)\n\n### (?:Input|Response):", text, flags=re.S)
        if m:
            text = m.group(1)
            inp = re.search(r"### Input:\n(.*?)\n\n### Response:", prompt, flags=re.S)
            if inp:
                text += "\n\n" + inp.group(1)
        else:
            for marker in ("user\n", "User:", "[INST]"):
                if marker in text:
                    text = text.rsplit(marker, 1)[-1]
                    break
    text = text.strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_generations(run_dir: Path) -> list[dict]:
    path = run_dir / "generations.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _r(v, nd=4):
    return round(v, nd) if isinstance(v, float) else v


def header_md(run: dict, metrics: dict) -> str:
    if not metrics:
        return (f"### {run.get('name', '')}\nStatus **{run.get('status')}**: no metrics yet"
                + (f" ({run['error']})" if run.get("error") else "") + ".")
    bits = [f"**{metrics.get('task')}** · model `{metrics.get('model')}` · strategy **{metrics.get('strategy')}**"]
    if metrics.get("trainable_params"):
        pct = 100 * metrics["trainable_params"] / max(1, metrics.get("total_params") or 1)
        bits.append(f"trainable {metrics['trainable_params']:,} of {metrics.get('total_params', 0):,} ({pct:.2f}%)")
    if isinstance(metrics.get("train_seconds"), (int, float)):
        bits.append(f"trained {metrics['train_seconds']:.0f} s on {metrics.get('train_samples', '?')} rows, "
                    f"validated on {metrics.get('val_samples', '?')}")
    if metrics.get("stopped_by_user"):
        bits.append("stopped by the user (model evaluated at that point)")
    elif metrics.get("stopped_early"):
        bits.append(f"early stopping ended it at step {metrics.get('global_step')} of {metrics.get('max_steps')}")
    return f"### {run.get('name', '')}\n" + " · ".join(bits)


def runs_table(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        out.append([r["name"] + (" · yours" if r.get("mine") else ""), r["status"], r.get("task") or "", r.get("strategy") or "", r.get("model") or "",
                    fmt_metric(r), _r(r.get("accuracy")), _r(r.get("train_seconds"), 1),
                    f"{r['trainable_params']:,}" if r.get("trainable_params") else "", r["run_id"]])
    return out


def only_mine(rows: list[dict], mine: bool) -> list[dict]:
    """The runs the table and chart compare: this session's only (the default) or every visible run."""
    return [r for r in rows if r.get("mine")] if mine else rows


def baseline_rows(metrics: dict) -> list[list]:
    """The fine-tuned model against the baselines, as text: '—' where a score was not measured."""
    from ..plots import classification_summary_rows

    return [[row[0]] + [f"{v:.4f}" if isinstance(v, float) else "—" if v is None else str(v) for v in row[1:]]
            for row in classification_summary_rows(metrics)]


def error_rows(metrics: dict) -> list[list]:
    """Misclassified rows as the raw strings they are (the Dataframe shows text, never renders HTML)."""
    ea = metrics.get("error_analysis") or {}
    return [[str(e["text"]), str(e["true"]), str(e["predicted"]), _r(e["confidence"], 3)]
            for e in ea.get("misclassified", [])]


RUN_HEADERS = ["run", "status", "task", "strategy", "model", "main metric", "accuracy", "train s",
               "trainable params", "id"]


def build(ctx: AppContext, ui) -> None:
    with gr.Row():
        ui.eval_run = gr.Dropdown([], label="Run", allow_custom_value=True, scale=4,
                                  info="Every run you can see, newest first; yours are marked 'yours' (others' "
                                       "appear unless runs are private). Metrics appear once a run has finished.")
        ui.eval_refresh = gr.Button("↻ Refresh", size="sm", scale=1)
    ui.eval_header = gr.Markdown("Pick a run.", elem_id="eval-header")
    with gr.Column(visible=False) as ui.cls_col:
        gr.Markdown("#### Fine-tuned model vs baselines (same validation rows)\nA fine-tuned model should beat "
                    "TF-IDF + logistic regression; if not, the data may be too small or too easy for a transformer.")
        ui.cls_summary = gr.Dataframe(headers=["model", "accuracy", "f1_weighted", "f1_macro"], interactive=False,
                                       datatype=["str", "str", "str", "str"], buttons=[], elem_id="eval-baselines")
        with gr.Row():
            ui.f1_plot = gr.Plot(show_label=False, elem_id="f1-plot")
            with gr.Column():
                # the option sits above the chart it changes, like "Only my runs" above its table
                ui.cm_normalize = gr.Checkbox(False, label="Normalise rows (recall per class)",
                                              info="Counts show volumes; normalised rows compare classes of "
                                                   "different sizes.")
                ui.cm_plot = gr.Plot(show_label=False, elem_id="cm-plot")
        ui.per_class = gr.Dataframe(headers=["class", "precision", "recall", "f1", "support"], interactive=False,
                                    label="Per-class report")
        with gr.Row():
            ui.errors_table = gr.Dataframe(headers=["text", "true", "predicted", "confidence"], interactive=False,
                                           datatype=["str", "str", "str", "number"], wrap=True,
                                           elem_id="eval-errors", column_widths=["58%", "14%", "14%", "14%"], max_height=360, scale=3,
                                           label="Misclassified validation rows (most confident mistakes first)")
            ui.confused = gr.Dataframe(headers=["true", "predicted", "count"], interactive=False, scale=1,
                                       label="Most confused pairs")
        ui.pred_file = gr.File(label="predictions.csv (every validation row with class probabilities)",
                               interactive=False)
    with gr.Column(visible=False) as ui.inst_col:
        with gr.Row():
            ui.ba_plot = gr.Plot(show_label=False, scale=2)
            ui.forgetting_md = gr.Markdown("")
        ui.gen_table = gr.Dataframe(headers=["prompt", "reference", "before", "after", "ROUGE-L before",
                                             "ROUGE-L after"], interactive=False, wrap=True,
                                    column_widths=["22%", "22%", "22%", "22%", "6%", "6%"], max_height=420,
                                    label="Held-out prompts: answers before and after fine-tuning")
    # results first (above the fold), then how training went
    with gr.Row():
        ui.eval_loss_plot = gr.Plot(show_label=False)
        ui.eval_metric_plot = gr.Plot(show_label=False)
    gr.Markdown("### Runs side by side")
    ui.only_mine = gr.Checkbox(True, label="Only my runs", elem_id="only-mine",
                               info="Untick to compare with every run you can see (others' and command-line runs).")
    ui.runs_table = gr.Dataframe(headers=RUN_HEADERS, interactive=False, wrap=True, max_height=320,
                                 column_widths=["18%", "7%", "12%", "7%", "13%", "8%", "7%", "7%", "8%", "13%"])
    ui.runs_plot = gr.Plot(show_label=False)


def wire(ctx: AppContext, ui) -> None:
    from .. import plots

    @user_errors
    def refresh(current, mine, owner_state, request: gr.Request, prefer=None):
        owner = owner_of(owner_state, request)
        rows = only_mine(ctx.manager.list_runs(owner), mine)
        choices = run_choices(ctx, owner)
        return (dropdown_update(choices, current, prefer), runs_table(rows), plots.runs_comparison_figure(rows))

    @user_errors
    def show_run(run_id, normalize, owner_state, request: gr.Request):
        owner = owner_of(owner_state, request)
        hidden = [gr.update(visible=False), gr.update(visible=False)]
        if not run_id:
            return ["Pick a run.", plots.empty_figure(""), plots.empty_figure(""), *hidden] + [gr.skip()] * 10
        run_dir = ctx.run_dir(run_id, owner)
        run = next((r for r in ctx.manager.list_runs(owner) if r["run_id"] == run_id), {"name": run_id})
        metrics = _load_json(run_dir / "metrics.json")
        events = read_events(run_dir / "events.jsonl", 0)[0]
        out = [header_md(run, metrics), plots.training_curves(events), plots.eval_metric_curve(events)]
        task = metrics.get("task")
        if task == "classification":
            ea = metrics.get("error_analysis") or {}
            per = [[n, _r(v["precision"], 3), _r(v["recall"], 3), _r(v["f1"], 3), v["support"]]
                   for n, v in (metrics.get("per_class") or {}).items()]
            errs = error_rows(metrics)
            pairs = [[p["true"], p["predicted"], p["count"]] for p in ea.get("confused_pairs", [])]
            pred = run_dir / "predictions.csv"
            out += [gr.update(visible=True), gr.update(visible=False), baseline_rows(metrics),
                    plots.per_class_f1_figure(metrics), plots.confusion_matrix_figure(metrics, normalize), per,
                    errs or [["(no mistakes on the validation rows)", "", "", None]], pairs,
                    ctx.temp_copy(pred, f"predictions-{run_id}.csv") if pred.exists() else None,
                    gr.skip(), gr.skip(), gr.skip()]
        elif task == "instruction":
            gens = read_generations(run_dir)
            table = [[prompt_preview(g.get("prompt", "")), g.get("reference", ""), g.get("before", ""),
                      g.get("after", ""), _r(g.get("rougeL_before"), 3), _r(g.get("rougeL_after"), 3)] for g in gens]
            change = metrics.get("general_perplexity_change")
            fmd = ("#### Forgetting probe\nPerplexity on general English text (not your data), before and after. "
                   "If it rises a lot, the model is losing general ability.\n\n"
                   f"- before: **{_r(metrics.get('general_perplexity_before'), 2)}**, after: "
                   f"**{_r(metrics.get('general_perplexity'), 2)}**"
                   + (f" ({change:+.1%})" if isinstance(change, float) else "") +
                   f"\n- verdict: **{metrics.get('forgetting_verdict', 'not measured')}**")
            if isinstance(metrics.get("rougeL"), float):
                fmd += (f"\n\n#### ROUGE-L on held-out prompts\nbefore **{metrics.get('rougeL_before', 0):.3f}** → "
                        f"after **{metrics['rougeL']:.3f}** (overlap with the reference answers)")
            out += [gr.update(visible=False), gr.update(visible=True)] + [gr.skip()] * 7 + \
                [plots.instruction_before_after_figure(metrics), fmd, table]
        else:
            out += hidden + [gr.skip()] * 10
        return out

    @user_errors
    def confusion(run_id, normalize, owner_state, request: gr.Request):
        run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
        return plots.confusion_matrix_figure(_load_json(run_dir / "metrics.json"), normalize)

    run_outputs = [ui.eval_header, ui.eval_loss_plot, ui.eval_metric_plot, ui.cls_col, ui.inst_col, ui.cls_summary,
                   ui.f1_plot, ui.cm_plot, ui.per_class, ui.errors_table, ui.confused, ui.pred_file, ui.ba_plot,
                   ui.forgetting_md, ui.gen_table]
    refresh_outputs = [ui.eval_run, ui.runs_table, ui.runs_plot]
    refresh_inputs = [ui.eval_run, ui.only_mine, ui.owner_state]
    ui.eval_refresh.click(refresh, refresh_inputs, refresh_outputs, api_visibility="private")
    ui.only_mine.input(refresh, refresh_inputs, refresh_outputs, api_visibility="private")
    ui.eval_run.change(show_run, [ui.eval_run, ui.cm_normalize, ui.owner_state], run_outputs,
                       api_visibility="private")
    ui.cm_normalize.change(confusion, [ui.eval_run, ui.cm_normalize, ui.owner_state], ui.cm_plot,
                           api_visibility="private")
    ui.eval_tab.select(refresh, refresh_inputs, refresh_outputs, api_visibility="private")
    ui.eval_refresh_fn = refresh
    ui.eval_refresh_outputs = refresh_outputs
