"""Plotly figures built from a run's outputs (events.jsonl, metrics.json, audit.json). No gradio here.

    events = read_all_events("runs/x/events.jsonl")   # finetune_core.events
    training_curves(events)                 # train loss + eval loss per step
    confusion_matrix_figure(metrics, normalize=True)

Every function returns a `plotly.graph_objects.Figure`; an empty input gives an empty figure with a
short note instead of raising, so the app can always render something.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .events import eval_scores, latest_attempt

HEIGHT = 320
COLORS = {"train": "#4C78A8", "eval": "#F58518", "metric": "#54A24B", "base": "#9D9D9D", "finetuned": "#E45756",
          "majority": "#9D9D9D", "tfidf_logreg": "#B279A2", "before_finetuning": "#72B7B2"}
STRATEGY_COLORS = {"full": "#4C78A8", "frozen": "#72B7B2", "lora": "#E45756"}
BASELINE_NAMES = {"majority": "majority class", "tfidf_logreg": "TF-IDF + logistic regression",
                  "before_finetuning": "before fine-tuning"}


def _layout(fig: go.Figure, title: str, x: str = "", y: str = "", height: int = HEIGHT) -> go.Figure:
    fig.update_layout(title={"text": title, "font": {"size": 14}}, height=height, template="plotly_white",
                      margin={"l": 50, "r": 20, "t": 45, "b": 40}, xaxis_title=x, yaxis_title=y,
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1})
    return fig


def empty_figure(message: str = "Nothing to show yet", title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 13, "color": "#888"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title)


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


# ---------------------------------------------------------------------------------------------
# training progress (from events.jsonl)


def curve_points(events: list[dict]) -> dict:
    """{'train': [(step, loss)], 'eval': [(step, eval_loss)], 'metrics': {name: [(step, value)]}} of the
    latest attempt."""
    train, evals, metrics = [], [], {}
    for e in latest_attempt(events):
        step = e.get("step")
        if step is None:
            continue
        if e.get("type") == "log" and _num(e.get("loss")) is not None:
            train.append((step, e["loss"]))
        elif e.get("type") == "eval":
            if _num(e.get("eval_loss")) is not None:
                evals.append((step, e["eval_loss"]))
            for name, v in eval_scores(e).items():
                if name != "loss":
                    metrics.setdefault(name, []).append((step, v))
    return {"train": train, "eval": evals, "metrics": metrics}


def training_curves(events: list[dict], title: str = "Loss") -> go.Figure:
    """Train loss and eval loss against the training step."""
    pts = curve_points(events)
    if not pts["train"] and not pts["eval"]:
        return empty_figure("The loss curve appears after the first logged steps.", title)
    fig = go.Figure()
    if pts["train"]:
        xs, ys = zip(*pts["train"])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name="train loss",
                                 line={"color": COLORS["train"]}, marker={"size": 4}))
    if pts["eval"]:
        xs, ys = zip(*pts["eval"])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name="eval loss",
                                 line={"color": COLORS["eval"], "width": 3}, marker={"size": 7}))
    return _layout(fig, title, "step", "loss")


def eval_metric_curve(events: list[dict], title: str = "Validation metric") -> go.Figure:
    """accuracy / F1 (classification) per evaluation; falls back to perplexity from eval loss."""
    pts = curve_points(events)
    fig = go.Figure()
    rewards = [m for m in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
               if m in pts["metrics"]]
    if rewards:        # a preference run: TRL's rewards on the held-out pairs (step 0: before training)
        for name in rewards:
            xs, ys = zip(*pts["metrics"][name])
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name.replace("rewards/", "reward ")))
        return _layout(fig, "Held-out pairs: reward accuracy and margins (DPO)", "step", "value")
    shown = [m for m in ("accuracy", "f1_weighted", "f1_macro") if m in pts["metrics"]]
    # the three often coincide (balanced data, a perfect model): wide-to-narrow lines with different
    # dashes keep each one visible under the others
    styles = {"accuracy": {"width": 6, "dash": "solid"}, "f1_weighted": {"width": 3.5, "dash": "dash"},
              "f1_macro": {"width": 1.5, "dash": "solid"}}
    for name in shown:
        xs, ys = zip(*pts["metrics"][name])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, line=styles[name],
                                 marker={"size": {"accuracy": 11, "f1_weighted": 8, "f1_macro": 5}[name]}))
    if not shown and pts["eval"]:
        xs, ys = zip(*pts["eval"])
        fig.add_trace(go.Scatter(x=xs, y=[math.exp(min(y, 50)) for y in ys], mode="lines+markers",
                                 name="perplexity", line={"color": COLORS["metric"]}))
        return _layout(fig, "Validation perplexity (lower is better)", "step", "perplexity")
    if not fig.data:
        return empty_figure("Validation scores appear after the first evaluation (end of an epoch).", title)
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, title, "step", "score")


# ---------------------------------------------------------------------------------------------
# data audit


def class_distribution_figure(audit: dict) -> go.Figure:
    dist = audit.get("class_distribution") or {}
    if not dist:
        return empty_figure("No class labels (instruction data).", "Class distribution")
    items = sorted(dist.items(), key=lambda kv: -kv[1])
    names, counts = [str(k) for k, _ in items], [v for _, v in items]
    fig = go.Figure(go.Bar(x=names, y=counts, name="rows", marker_color=COLORS["train"], text=counts,
                           textposition="outside"))
    ratio = audit.get("imbalance_ratio")
    title = "Class distribution" + (f" (imbalance {ratio:.1f}x)" if isinstance(ratio, (int, float)) else "")
    return _layout(fig, title, "class", "rows")


def token_length_figure(audit: dict, max_length: int | None = None) -> go.Figure:
    lengths = audit.get("token_lengths") or []
    if not lengths:
        return empty_figure("Token lengths need a tokenizer.", "Token lengths")
    max_length = max_length or (audit.get("token_length") or {}).get("max_length") or audit.get("max_length")
    fig = go.Figure(go.Histogram(x=lengths, name="rows", marker_color=COLORS["train"], nbinsx=40))
    if max_length:
        fig.add_trace(go.Scatter(x=[max_length, max_length], y=[0, 1], yaxis="y2", mode="lines",
                                 name=f"max_length = {max_length}",
                                 line={"color": COLORS["finetuned"], "dash": "dash", "width": 2}))
        fig.update_layout(yaxis2={"overlaying": "y", "range": [0, 1], "visible": False})
        over = sum(1 for n in lengths if n > max_length)
        title = f"Token lengths ({over} of {len(lengths)} rows longer than max_length are truncated)"
    else:
        title = "Token lengths"
    return _layout(fig, title, "tokens per row", "rows")


# ---------------------------------------------------------------------------------------------
# evaluation: classification


def confusion_matrix_figure(metrics: dict, normalize: bool = False) -> go.Figure:
    cm = metrics.get("confusion_matrix")
    labels = [str(x) for x in metrics.get("labels") or []]
    if not cm or not labels:
        return empty_figure("No confusion matrix in this run.", "Confusion matrix")
    z = [list(map(float, row)) for row in cm]
    if normalize:
        z = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in z]
    text = [[(f"{v:.2f}" if normalize else f"{int(v)}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, text=text, texttemplate="%{text}", colorscale="Blues",
                               zmin=0, zmax=1 if normalize else None, name="confusion",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    title = "Confusion matrix" + (" (row-normalised: recall per class)" if normalize else " (counts)")
    return _layout(fig, title, "predicted", "true", height=360)


def per_class_f1_figure(metrics: dict) -> go.Figure:
    """F1 per class, with the baselines' weighted F1 as horizontal reference lines."""
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return empty_figure("No per-class scores in this run.", "F1 per class")
    names = list(per_class)
    f1 = [per_class[n]["f1"] for n in names]
    fig = go.Figure(go.Bar(x=names, y=f1, name="fine-tuned F1", marker_color=COLORS["finetuned"],
                           text=[f"{v:.2f}" for v in f1], textposition="outside"))
    refs = dict(metrics.get("baselines") or {})
    if metrics.get("before_finetuning"):
        refs["before_finetuning"] = metrics["before_finetuning"]
    for key, row in refs.items():
        value = _num((row or {}).get("f1_weighted"))
        if value is None:
            continue
        fig.add_trace(go.Scatter(x=[names[0], names[-1]], y=[value, value], mode="lines",
                                 name=f"{BASELINE_NAMES.get(key, key)} ({value:.2f})",
                                 line={"dash": "dash", "color": COLORS.get(key, "#666"), "width": 2}))
    fig.update_yaxes(range=[0, 1.1])
    fig = _layout(fig, "F1 per class (dashed: weighted F1 of the baselines)", "", "F1", height=360)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.12, "xanchor": "left", "x": 0},
                      margin={"b": 90})
    return fig


def classification_summary_rows(metrics: dict) -> list[list]:
    """[name, accuracy, f1_weighted, f1_macro] for the fine-tuned model and every baseline."""
    rows = [["fine-tuned", metrics.get("accuracy"), metrics.get("f1_weighted"), metrics.get("f1_macro")]]
    before = metrics.get("before_finetuning") or {}
    if before:
        rows.append(["before fine-tuning (new head, untrained)", before.get("accuracy"), before.get("f1_weighted"),
                     before.get("f1_macro")])
    for key, row in (metrics.get("baselines") or {}).items():
        rows.append([BASELINE_NAMES.get(key, key), row.get("accuracy"), row.get("f1_weighted"),
                     row.get("f1_macro")])
    return [[r[0]] + [round(v, 4) if isinstance(v, float) else v for v in r[1:]] for r in rows]


# ---------------------------------------------------------------------------------------------
# evaluation: instruction


def calibration_figure(metrics: dict) -> go.Figure:
    """The reliability diagram: per confidence bin, how often the model is right vs how sure it was."""
    cal = metrics.get("calibration") or {}
    bins = cal.get("bins") or []
    title = "Calibration: is the model as sure as it is right?"
    if not bins:
        return empty_figure("Calibration is measured on the validation rows after training.", title)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                             line={"dash": "dash", "color": "#999"}))
    fig.add_trace(go.Scatter(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins],
                             mode="lines+markers", name="this model", marker={"size": [6 + min(b["n"], 40) / 2
                                                                                         for b in bins]},
                             text=[f"{b['n']} rows" for b in bins], line={"color": COLORS["finetuned"]}))
    right = cal.get("mean_confidence_correct")
    sub = f"ECE {cal['ece']:.3f}" + (f" · mean confidence when right {right:.0%}" if right is not None else "")
    fig = _layout(fig, f"{title}<br><sup>{sub}</sup>", "confidence (top class probability)", "accuracy")
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def instruction_before_after_figure(metrics: dict) -> go.Figure:
    """Validation loss, perplexity and general-text perplexity (forgetting probe), before vs after."""
    pairs = [("validation loss", "eval_loss_before", "eval_loss"),
             ("validation perplexity", "perplexity_before", "perplexity"),
             ("general-text perplexity", "general_perplexity_before", "general_perplexity")]
    pairs = [p for p in pairs if _num(metrics.get(p[1])) is not None or _num(metrics.get(p[2])) is not None]
    if not pairs:
        return empty_figure("No loss / perplexity in this run.", "Before vs after fine-tuning")
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=[p[0] for p in pairs])
    for i, (label, before, after) in enumerate(pairs, start=1):
        for key, name, color in ((before, "before", COLORS["base"]), (after, "after", COLORS["finetuned"])):
            value = _num(metrics.get(key))
            fig.add_trace(go.Bar(x=[name], y=[value], name=name, marker_color=color, showlegend=(i == 1),
                                 text=[f"{value:.3g}" if value is not None else ""], textposition="outside",
                                 legendgroup=name), row=1, col=i)
    fig = _layout(fig, "Before vs after fine-tuning (lower is better)", height=360)
    fig.update_layout(margin={"t": 80, "b": 60}, legend={"orientation": "h", "yanchor": "top", "y": -0.1,
                                                          "xanchor": "center", "x": 0.5})
    return fig


# ---------------------------------------------------------------------------------------------
# runs side by side


def runs_comparison_figure(rows: list[dict]) -> go.Figure:
    """Main metric per run (F1 for classifiers, eval loss for instruction runs), coloured by strategy."""
    done = [r for r in rows if _num(r.get("main_metric")) is not None]
    if not done:
        return empty_figure("Finished runs appear here.", "Runs compared")
    tasks = [t for t in ("classification", "instruction", "preference") if any(r.get("task") == t for r in done)]
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=[
        "weighted F1 (higher is better)" if t == "classification" else
        "eval loss (lower is better)" if t == "instruction" else "DPO loss (lower is better)" for t in tasks])
    seen = set()
    for col, task in enumerate(tasks, start=1):
        for strategy in ("full", "frozen", "lora"):
            sel = [r for r in done if r.get("task") == task and r.get("strategy") == strategy]
            if not sel:
                continue
            fig.add_trace(go.Bar(x=[r["name"] for r in sel], y=[r["main_metric"] for r in sel], name=strategy,
                                 marker_color=STRATEGY_COLORS.get(strategy), legendgroup=strategy,
                                 showlegend=strategy not in seen,
                                 customdata=[[r.get("train_seconds") or 0, r.get("trainable_params") or 0]
                                             for r in sel],
                                 hovertemplate="%{x}<br>%{y:.4f}<br>train %{customdata[0]:.0f}s<br>"
                                               "trainable %{customdata[1]:,}<extra></extra>"), row=1, col=col)
            seen.add(strategy)
    return _layout(fig, "Runs compared", height=340)


def strategy_race_figure(rows: list[dict], task: str) -> go.Figure:
    """The strategy comparison as quality against training time: one point per finished strategy
    (compare.strategy_row rows), its score before fine-tuning as a hollow marker below it, and the
    TF-IDF baseline as a line for classifiers. Up and left is better for F1; down and left for loss."""
    cls = task == "classification"
    metric = "weighted F1 (higher is better)" if cls else \
        "DPO loss (lower is better)" if task == "preference" else "validation loss (lower is better)"
    done = [r for r in rows
            if _num(r.get("main_metric_value")) is not None and _num(r.get("train_seconds")) is not None]
    if not done:
        return empty_figure("Each strategy appears here when its run ends.", "Quality against training time")
    fig = go.Figure()
    for r in done:
        color = STRATEGY_COLORS.get(r["strategy"], "#888")
        x = r["train_seconds"]
        fig.add_trace(go.Scatter(
            x=[x], y=[r["main_metric_value"]], mode="markers+text", name=r["name"], text=[r["name"]],
            textposition="top center", marker={"size": 14, "color": color}, legendgroup=r["strategy"],
            cliponaxis=False,
            customdata=[[r.get("trainable_params") or 0, r.get("peak_rss_mb") or 0]],
            hovertemplate=f"{r['name']}<br>%{{y:.4f}} after {x:.1f}s of training<br>"
                          "trainable %{customdata[0]:,}<br>peak memory %{customdata[1]:,.0f} MB<extra></extra>"))
        before = _num(r.get("main_metric_before"))
        if before is not None:
            fig.add_trace(go.Scatter(x=[x, x], y=[before, r["main_metric_value"]], mode="lines+markers",
                                     line={"color": color, "dash": "dot", "width": 1},
                                     marker={"symbol": ["circle-open", "circle"], "size": [10, 0], "color": color},
                                     legendgroup=r["strategy"], showlegend=False,
                                     hovertemplate=f"{r['name']} before fine-tuning: %{{y:.4f}}<extra></extra>"))
    baselines = next((r.get("baselines") for r in done if r.get("baselines")), None) if cls else None
    tfidf = _num(((baselines or {}).get("tfidf_logreg") or {}).get("f1_weighted"))
    if tfidf is not None:
        fig.add_hline(y=tfidf, line={"color": COLORS["tfidf_logreg"], "dash": "dash"},
                      annotation_text=f"TF-IDF + logistic regression {tfidf:.3f}", annotation_position="bottom right")
    seconds = [r["train_seconds"] for r in done]
    pad = max(0.15 * (max(seconds) - min(seconds)), 0.1 * max(seconds), 0.5)     # room for the names
    fig.update_xaxes(range=[max(0.0, min(seconds) - pad), max(seconds) + pad])
    fig.update_layout(showlegend=False)
    return _layout(fig, "Quality against training time (hollow: before fine-tuning)", "training seconds", metric,
                   height=340)
