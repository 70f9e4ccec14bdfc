"""Figures built from a run's outputs (events.jsonl, metrics.json, audit report) have the expected traces."""

from __future__ import annotations

import json

import plotly.graph_objects as go

from finetune_core import plots

LABELS = ["finance", "legal", "medical"]
METRICS = {
    "task": "classification", "strategy": "lora", "model": "bundled:minilm-l6", "accuracy": 0.9,
    "f1_weighted": 0.89, "f1_macro": 0.88, "labels": LABELS,
    "per_class": {n: {"precision": 0.9, "recall": 0.8, "f1": f, "support": 10} for n, f in zip(LABELS, [0.95, 0.8, 0.9])},
    "confusion_matrix": [[9, 1, 0], [2, 8, 0], [0, 1, 9]],
    "baselines": {"majority": {"accuracy": 0.33, "f1_weighted": 0.17, "f1_macro": 0.12},
                  "tfidf_logreg": {"accuracy": 0.7, "f1_weighted": 0.69, "f1_macro": 0.66}},
    "before_finetuning": {"accuracy": 0.3, "f1_weighted": 0.2, "f1_macro": 0.2},
}


def events() -> list[dict]:
    ev = [{"type": "info", "time": 0, "message": "Loading model old ..."},
          {"type": "log", "time": 0.5, "step": 1, "loss": 9.0},            # an earlier attempt: ignored
          {"type": "info", "time": 1, "message": "Loading model bundled:minilm-l6 ..."},
          {"type": "start", "time": 2, "step": 0, "max_steps": 8, "epoch": 0.0}]
    for step in range(1, 9):
        ev.append({"type": "log", "time": 2 + step, "step": step, "max_steps": 8, "epoch": step / 4,
                   "loss": 1.5 / step, "eta_seconds": 8 - step})
        if step % 4 == 0:
            ev.append({"type": "eval", "time": 2 + step, "step": step, "max_steps": 8, "eval_loss": 1.0 / step,
                       "eval_accuracy": 0.5 + step / 20, "eval_f1_weighted": 0.4 + step / 20, "eval_runtime": 0.1})
    ev.append({"type": "end", "time": 20, "step": 8, "max_steps": 8, "message": "Done"})
    return ev


def names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data]


def test_training_curves_from_events(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events()))
    from finetune_core.events import progress, read_events

    evs, _ = read_events(path, 0)
    fig = plots.training_curves(evs)
    assert names(fig) == ["train loss", "eval loss"]
    assert list(fig.data[0].x) == list(range(1, 9)) and fig.data[0].y[0] == 1.5   # the old attempt is dropped
    assert list(fig.data[1].x) == [4, 8]
    metric = plots.eval_metric_curve(evs)
    assert names(metric) == ["accuracy", "f1_weighted"]
    p = progress(evs)
    assert (p.step, p.max_steps, p.phase, p.attempt) == (8, 8, "done", 2)
    assert p.eta_seconds == 0 and progress(evs[:-1]).phase == "training"


def test_empty_inputs_give_a_note_not_an_error():
    for fig in (plots.training_curves([]), plots.eval_metric_curve([]), plots.confusion_matrix_figure({}),
                plots.per_class_f1_figure({}), plots.runs_comparison_figure([]), plots.class_distribution_figure({}),
                plots.token_length_figure({}), plots.instruction_before_after_figure({})):
        assert isinstance(fig, go.Figure) and not fig.data and fig.layout.annotations


def test_classification_figures():
    cm = plots.confusion_matrix_figure(METRICS)
    assert cm.data[0].type == "heatmap" and list(cm.data[0].x) == LABELS
    norm = plots.confusion_matrix_figure(METRICS, normalize=True)
    assert abs(norm.data[0].z[1][0] - 0.2) < 1e-9 and all(abs(sum(r) - 1) < 1e-9 for r in norm.data[0].z)
    f1 = plots.per_class_f1_figure(METRICS)
    assert f1.data[0].type == "bar" and list(f1.data[0].y) == [0.95, 0.8, 0.9]
    refs = [t.name for t in f1.data[1:]]
    assert len(refs) == 3 and any("TF-IDF" in n for n in refs) and any("before fine-tuning" in n for n in refs)
    rows = plots.classification_summary_rows(METRICS)
    assert [r[0] for r in rows][:2] == ["fine-tuned", "before fine-tuning (new head, untrained)"] and len(rows) == 4
    assert [r[3] for r in rows] == [0.88, 0.2, 0.12, 0.66]        # every row has its macro F1


def test_audit_figures():
    audit = {"class_distribution": {"a": 30, "b": 10}, "imbalance_ratio": 3.0, "token_lengths": [10, 20, 300],
             "token_length": {"max_length": 256}}
    dist = plots.class_distribution_figure(audit)
    assert list(dist.data[0].x) == ["a", "b"] and list(dist.data[0].y) == [30, 10]
    tok = plots.token_length_figure(audit)
    assert tok.data[0].type == "histogram" and "max_length = 256" in names(tok)
    assert "1 of 3" in tok.layout.title.text


def test_instruction_and_runs_figures():
    m = {"eval_loss_before": 2.6, "eval_loss": 2.4, "perplexity_before": 14.0, "perplexity": 11.0,
         "general_perplexity_before": 31.0, "general_perplexity": 30.6}
    fig = plots.instruction_before_after_figure(m)
    assert len(fig.data) == 6 and {t.name for t in fig.data} == {"before", "after"}
    rows = [{"name": "a", "task": "classification", "strategy": "lora", "main_metric": 0.9, "train_seconds": 10,
             "trainable_params": 100},
            {"name": "b", "task": "classification", "strategy": "full", "main_metric": 0.8},
            {"name": "c", "task": "instruction", "strategy": "lora", "main_metric": 2.4},
            {"name": "d", "task": "classification", "strategy": "frozen", "main_metric": None}]
    comp = plots.runs_comparison_figure(rows)
    assert sorted(names(comp)) == ["full", "lora", "lora"]
