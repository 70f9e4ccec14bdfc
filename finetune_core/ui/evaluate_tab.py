"""Evaluate tab: one run's metrics against baselines, errors, confusion; all runs side by side.

Handlers are module-level functions of (ctx, ...); `wire()` binds them to the components.
"""

from __future__ import annotations

import gradio as gr

from ..config import GENERATIVE_TASKS
from .. import plots
from ..events import read_events
from ..plots import classification_summary_rows
from ..rundir import events_path, metrics_path, predictions_path, read_json
from .common import AppContext, bind, dropdown_update, fmt_metric, owner_of, run_choices, user_errors
from .generations import prompt_preview, read_generations


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
        out.append([r["name"] + (" · yours" if r.get("mine") else ""), r["status"], r.get("task") or "",
                    r.get("strategy") or "", r.get("model") or "", fmt_metric(r), _r(r.get("accuracy")),
                    _r(r.get("train_seconds"), 1), f"{r['trainable_params']:,}" if r.get("trainable_params") else "",
                    f"{r['peak_rss_mb']:,.0f}" if r.get("peak_rss_mb") else "", r["run_id"]])
    return out


def only_mine(rows: list[dict], mine: bool) -> list[dict]:
    """The runs the table and chart compare: this session's only (the default) or every visible run."""
    return [r for r in rows if r.get("mine")] if mine else rows


def baseline_rows(metrics: dict) -> list[list]:
    """The fine-tuned model against the baselines, as text: '—' where a score was not measured."""
    return [[row[0]] + [f"{v:.4f}" if isinstance(v, float) else "—" if v is None else str(v) for v in row[1:]]
            for row in classification_summary_rows(metrics)]


def error_rows(metrics: dict) -> list[list]:
    """Misclassified rows as the raw strings they are (the Dataframe shows text, never renders HTML)."""
    ea = metrics.get("error_analysis") or {}
    return [[str(e["text"]), str(e["true"]), str(e["predicted"]), _r(e["confidence"], 3)]
            for e in ea.get("misclassified", [])]


RUN_HEADERS = ["run", "status", "task", "strategy", "model", "main metric", "accuracy", "train s",
               "trainable params", "peak memory MB", "id"]


# ---------------------------------------------------------------------------------------------
# handlers


@user_errors
def refresh(ctx: AppContext, current, mine, owner_state, request: gr.Request, prefer=None):
    owner = owner_of(owner_state, request)
    rows = only_mine(ctx.manager.list_runs(owner), mine)
    choices = run_choices(ctx, owner)
    return (dropdown_update(choices, current, prefer), runs_table(rows), plots.runs_comparison_figure(rows))


def classification_outputs(ctx: AppContext, run_id: str, run_dir, metrics: dict, normalize) -> list:
    """The classification column's outputs (visible), the instruction column's hidden and untouched."""
    ea = metrics.get("error_analysis") or {}
    per = [[n, _r(v["precision"], 3), _r(v["recall"], 3), _r(v["f1"], 3), v["support"]]
           for n, v in (metrics.get("per_class") or {}).items()]
    errs = error_rows(metrics)
    pairs = [[p["true"], p["predicted"], p["count"]] for p in ea.get("confused_pairs", [])]
    pred = predictions_path(run_dir)
    return [gr.update(visible=True), gr.update(visible=False), baseline_rows(metrics),
            plots.per_class_f1_figure(metrics), plots.confusion_matrix_figure(metrics, normalize), per,
            errs or [["(no mistakes on the validation rows)", "", "", None]], pairs,
            ctx.temp_copy(pred, f"predictions-{run_id}.csv") if pred.exists() else None,
            gr.skip(), gr.skip(), gr.skip(), plots.calibration_figure(metrics)]


def instruction_outputs(run_dir, metrics: dict) -> list:
    """The instruction column's outputs (visible), the classification column's hidden and untouched."""
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
    if isinstance(metrics.get("reward_accuracy"), float):
        fmd = ("#### Preference (DPO) on the held-out pairs\n"
               f"- DPO loss: before **{_r(metrics.get('eval_loss_before'), 3)}** (ln 2 = 0.693: no preference "
               f"yet) → after **{_r(metrics.get('eval_loss'), 3)}**\n"
               f"- reward accuracy (chosen beats rejected): **{_r(metrics.get('reward_accuracy_before'), 2)}** → "
               f"**{_r(metrics.get('reward_accuracy'), 2)}**\n"
               f"- reward margin: **{_r(metrics.get('reward_margin_before'), 3)}** → "
               f"**{_r(metrics.get('reward_margin'), 3)}**\n\n") + fmd
    if isinstance(metrics.get("rougeL"), float):
        fmd += (f"\n\n#### ROUGE-L on held-out prompts\nbefore **{metrics.get('rougeL_before', 0):.3f}** → "
                f"after **{metrics['rougeL']:.3f}** (overlap with the reference answers)")
    return [gr.update(visible=False), gr.update(visible=True)] + [gr.skip()] * 7 + \
        [plots.instruction_before_after_figure(metrics), fmd, table, gr.skip()]


@user_errors
def show_run(ctx: AppContext, run_id, normalize, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    hidden = [gr.update(visible=False), gr.update(visible=False)]
    if not run_id:
        return ["Pick a run.", plots.empty_figure(""), plots.empty_figure(""), *hidden] + [gr.skip()] * 11
    run_dir = ctx.run_dir(run_id, owner)
    run = next((r for r in ctx.manager.list_runs(owner) if r["run_id"] == run_id), {"name": run_id})
    metrics = read_json(metrics_path(run_dir))
    events = read_events(events_path(run_dir), 0)[0]
    out = [header_md(run, metrics), plots.training_curves(events), plots.eval_metric_curve(events)]
    task = metrics.get("task")
    if task == "classification":
        return out + classification_outputs(ctx, run_id, run_dir, metrics, normalize)
    if task in GENERATIVE_TASKS:
        return out + instruction_outputs(run_dir, metrics)
    return out + hidden + [gr.skip()] * 11


@user_errors
def confusion(ctx: AppContext, run_id, normalize, owner_state, request: gr.Request):
    run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
    return plots.confusion_matrix_figure(read_json(metrics_path(run_dir)), normalize)


# ---------------------------------------------------------------------------------------------
# UI


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
                                           elem_id="eval-errors", column_widths=["58%", "14%", "14%", "14%"],
                                           max_height=360, scale=3,
                                           label="Misclassified validation rows (most confident mistakes first)")
            ui.confused = gr.Dataframe(headers=["true", "predicted", "count"], interactive=False, scale=1,
                                       label="Most confused pairs")
        ui.pred_file = gr.File(label="predictions.csv (every validation row with class probabilities)",
                               interactive=False)
        ui.calib_plot = gr.Plot(show_label=False, elem_id="calib-plot")
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
                                 column_widths=["17%", "7%", "11%", "7%", "12%", "8%", "7%", "7%", "8%", "6%", "10%"])
    ui.runs_plot = gr.Plot(show_label=False)


def wire(ctx: AppContext, ui) -> None:
    run_outputs = [ui.eval_header, ui.eval_loss_plot, ui.eval_metric_plot, ui.cls_col, ui.inst_col, ui.cls_summary,
                   ui.f1_plot, ui.cm_plot, ui.per_class, ui.errors_table, ui.confused, ui.pred_file, ui.ba_plot,
                   ui.forgetting_md, ui.gen_table, ui.calib_plot]
    refresher = bind(ctx, refresh)
    refresh_inputs = [ui.eval_run, ui.only_mine, ui.owner_state]
    refresh_outputs = [ui.eval_run, ui.runs_table, ui.runs_plot]
    ui.eval_refresh.click(refresher, refresh_inputs, refresh_outputs, api_visibility="private")
    ui.only_mine.input(refresher, refresh_inputs, refresh_outputs, api_visibility="private")
    ui.eval_run.change(bind(ctx, show_run), [ui.eval_run, ui.cm_normalize, ui.owner_state], run_outputs,
                       api_visibility="private")
    ui.cm_normalize.change(bind(ctx, confusion), [ui.eval_run, ui.cm_normalize, ui.owner_state], ui.cm_plot,
                           api_visibility="private")
    ui.eval_tab.select(refresher, refresh_inputs, refresh_outputs, api_visibility="private")
