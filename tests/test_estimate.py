"""The estimate before Start (finetune_core/estimate.py, `python -m finetune_core estimate`, the Train tab's
button): its structure and bounds on tiny models, its schedule arithmetic, the CLI (--json keys, the same
refusals as `train`), and the Train tab handler. No timing is asserted: accuracy is `make bench`'s job
(benchmarks/estimate.py).
"""

import json
import resource
import shutil

import pytest

import badinputs as B
from conftest import class_rows, instruction_rows, write_csv, write_jsonl
from finetune_core.cli import main

KEYS = {"train_seconds", "peak_rss_mb", "fits", "available_mb", "earliest_stop_seconds", "seconds_at_evaluations",
        "steps", "steps_per_epoch", "epochs", "evaluations", "saves", "seconds", "seconds_per_step", "memory_mb",
        "timed_steps", "method", "load_average"}


def classification_config(tmp_path, model_dir, **training) -> dict:
    rows = class_rows(10)                                     # 30 rows: 24 train, 6 validation
    return {"task": "classification", "model": model_dir,
            "data": {"train": write_csv(tmp_path / "train.csv", rows), "max_length": 32},
            "strategy": {"name": "full"},
            "training": {"num_train_epochs": 3, "per_device_train_batch_size": 4, **training},
            "output_dir": str(tmp_path / "run"), "seed": 1}


@pytest.fixture(scope="module")
def bert_estimate(tmp_path_factory, tiny_bert_dir):
    from finetune_core.estimate import estimate

    tmp = tmp_path_factory.mktemp("estimate")
    cfg = classification_config(tmp, tiny_bert_dir)
    return cfg, estimate(cfg, budget_seconds=0.5)


def test_estimate_has_the_runs_schedule_and_consistent_parts(bert_estimate):
    cfg, e = bert_estimate
    assert KEYS <= set(e)
    # 24 training rows in batches of 4, 3 epochs; our defaults evaluate and save every epoch
    assert (e["steps_per_epoch"], e["steps"], e["epochs"]) == (6, 18, 3)
    assert e["evaluations"] == 3 and e["saves"] == 3 and e["train_rows"] == 24
    assert 3 <= e["timed_steps"] <= 48                       # at least three, whatever the budget
    parts = e["seconds"]
    total = sum(parts[k] for k in ("feature_caching", "setup", "first_step_surplus", "steps", "evaluations",
                                   "saves", "best_model_reload"))
    assert e["train_seconds"] == pytest.approx(total, abs=0.1)
    assert parts["steps"] > 0 and parts["evaluations"] == pytest.approx(3 * parts["eval_pass"], abs=0.01)
    assert parts["saves"] == pytest.approx(3 * parts["save"], abs=0.01) and parts["feature_caching"] == 0
    # early stopping (patience 2) can stop after the third evaluation at the earliest: here that is the end
    steps_at = [step for step, _ in e["seconds_at_evaluations"]]
    assert steps_at == [6, 12, 18] and e["seconds_at_evaluations"][-1][1] == pytest.approx(e["train_seconds"], abs=0.1)
    assert e["earliest_stop_seconds"] == pytest.approx(e["train_seconds"], abs=0.1)


def test_estimate_memory_is_this_process_peak_and_nothing_is_written(bert_estimate, tmp_path):
    cfg, e = bert_estimate
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 0 < e["peak_rss_mb"] <= peak_now + 1 and e["memory_mb"]["after_training"] == 0   # classification
    assert isinstance(e["fits"], bool) and e["fits"] == (e["peak_rss_mb"] <= e["available_mb"])
    from pathlib import Path

    assert not Path(cfg["output_dir"]).exists()            # the scratch run lives in a temporary folder


def test_estimate_of_a_long_schedule_stops_early_at_the_earliest_after_patience_plus_one(tmp_path, tiny_bert_dir):
    from finetune_core.estimate import estimate

    cfg = classification_config(tmp_path, tiny_bert_dir, num_train_epochs=6, early_stopping_patience=1)
    cfg["strategy"] = {"name": "lora"}
    e = estimate(cfg, budget_seconds=0.2)
    at = dict((step, s) for step, s in e["seconds_at_evaluations"])
    assert sorted(at) == [6, 12, 18, 24, 30, 36] and e["steps"] == 36
    assert e["earliest_stop_seconds"] == pytest.approx(at[12]) and e["earliest_stop_seconds"] < e["train_seconds"]
    assert "early stopping (patience 1)" in e["method"]


def test_estimate_of_instruction_full_adds_the_base_model_copy(tmp_path, tiny_llama_dir):
    from finetune_core.estimate import estimate

    cfg = {"task": "instruction", "model": tiny_llama_dir,
           "data": {"train": write_jsonl(tmp_path / "t.jsonl", instruction_rows(10)), "max_length": 64,
                    "template": "alpaca"},
           "strategy": {"name": "full"}, "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4},
           "output_dir": str(tmp_path / "run"), "seed": 1}
    e = estimate(cfg, budget_seconds=0.2)
    assert e["steps"] == 2 and e["evaluations"] == 1 and e["train_rows"] == 8
    assert e["memory_mb"]["after_training"] > 0 and e["peak_rss_mb"] >= e["memory_mb"]["after_training"]


def test_replayed_flow_counts_evaluations_and_saves_like_the_trainer(tmp_path):
    from transformers import TrainingArguments

    from finetune_core.estimate import _replay_flow

    by_steps = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=5, save_strategy="steps",
                                 save_steps=10, use_cpu=True, report_to="none")
    assert _replay_flow(by_steps, 4, 12, 3) == ([5, 10, 12], [10, 12])       # and at the last step
    by_epoch = TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", save_strategy="epoch",
                                 use_cpu=True, report_to="none")
    assert _replay_flow(by_epoch, 4, 10, 3) == ([4, 8, 10], [4, 8, 10])      # a cut last epoch still ends
    ratio = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=0.25, save_strategy="no",
                              use_cpu=True, report_to="none")
    assert _replay_flow(ratio, 5, 20, 4) == ([5, 10, 15, 20], [])


def test_fit_line_and_step_picks():
    from finetune_core.estimate import fit_line, pick_steps

    a, b = fit_line([100, 200, 400], [1.5, 2.5, 4.5])
    assert a == pytest.approx(0.5) and b == pytest.approx(0.01)
    assert fit_line([100, 101, 100], [1.0, 2.0, 3.0]) == (pytest.approx(2.0), 0.0)   # sizes barely differ: mean
    assert fit_line([100, 200], [3.0, 1.0]) == (pytest.approx(2.0), 0.0)             # never a negative slope
    a, b = fit_line([100, 200], [0.5, 2.5])                                           # never a negative intercept
    assert a == 0 and b == pytest.approx(3.0 / 300)
    sizes = [50, 10, 90, 30, 70, 5]
    full = [True, True, True, True, True, False]                # the last, partial batch is never timed
    picks = pick_steps(sizes, full, limit=5)
    assert picks[:3] == [2, 1, 3] or picks[:3] == [2, 1, 0]      # largest, smallest, a median
    assert 5 not in picks and len(picks) == 5
    assert pick_steps([7], [False], limit=3) == [0, 0, 0]       # a single (partial) batch is repeated


def test_predict_seconds_adds_the_first_step_surplus_once():
    from finetune_core.estimate import predict_seconds

    plan = {"sizes": [100, 200], "max_steps": 6, "evaluations": [2, 4, 6], "saves": [2, 4, 6]}
    timing = {"seconds": [5.0, 1.5, 2.5, 2.5], "sizes": [200, 100, 200, 200], "setup": 0.4, "wind_down": 0.1}
    p = predict_seconds(plan, timing, eval_seconds=1.0, save_seconds=0.5, load_seconds=0.2, feature_seconds=0.0,
                        patience=1)
    assert p["steps"] == pytest.approx(3 * (1.5 + 2.5)) and p["first_step_surplus"] == pytest.approx(2.5)
    assert p["train_seconds"] == pytest.approx(0.5 + 2.5 + 12 + 3 + 1.5 + 0.2)
    assert p["earliest_stop_seconds"] == pytest.approx(0.5 + 2.5 + 8 + 2 + 1.0 + 0.2)   # after 2 evaluations
    assert [s for s, _ in p["at_evaluations"]] == [2, 4, 6]


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_estimate_json(tmp_path, tiny_bert_dir, capsys):
    cfg = classification_config(tmp_path, tiny_bert_dir, num_train_epochs=1)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")          # JSON is YAML
    assert main(["estimate", str(path), "--set", "training.per_device_train_batch_size=8", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert KEYS <= set(e) and e["steps"] == 3 and e["train_seconds"] > 0 and e["peak_rss_mb"] > 0
    assert main(["estimate", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Estimated training time" in text and "Estimated peak memory" in text


# A sample of the refusals `train` gives (tests/badinputs.py): `estimate` builds the same run, so it refuses
# the same input with the same message, before any step is timed.
REFUSED = ["missing config file", "unknown config key", "unknown training option", "negative learning rate",
           "half precision on CPU", "a single class", "unseen validation labels", "model path is not a model directory",
           "encoder for instruction tuning", "val_size leaves no training rows"]


@pytest.mark.parametrize("name", REFUSED)
def test_cli_estimate_refuses_what_train_refuses(name, tmp_path, tiny_bert_dir, capsys):
    case = next(c for c in B.CASES if c.name == name)
    assert case.command == "train" and case.exit == 2
    argv = B.cli_args(case, tmp_path, {"tiny-bert": tiny_bert_dir})
    argv[0] = "estimate"
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("Error: ") and "Traceback" not in err, err
    pos = 0
    for fragment in case.expect:
        pos = err.find(fragment, pos)
        assert pos >= 0, f"{fragment!r} not in {err}"


# ---------------------------------------------------------------------------------------------
# the Train tab


@pytest.fixture(scope="module")
def app_ctx(tmp_path_factory, tiny_bert_dir):
    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app

    mgr = JobManager(tmp_path_factory.mktemp("estimate_app") / "runs", poll_interval=0.5)
    model_dir = mgr.runs_dir / "_models" / "tiny-bert"          # where the app may load models from
    shutil.copytree(tiny_bert_dir, model_dir)
    demo = build_app(mgr)
    yield demo.ft_context, str(model_dir)
    demo.close()
    mgr.shutdown()


def test_train_tab_estimate_shows_time_and_memory(app_ctx):
    from finetune_core.ui import form, train_tab

    ctx, model_dir = app_ctx
    values = dict(form.DEFAULTS, model=model_dir, strategy="full", max_length=32, overrides="max_steps=4")
    outputs = list(train_tab.estimate(ctx, values, "a" * 32, None))
    assert outputs[0].startswith("⏳") and len(outputs) == 2
    assert "Training ≈" in outputs[1] and "peak memory ≈" in outputs[1] and "4 steps" in outputs[1]


def test_train_tab_estimate_refuses_a_bad_setting_with_its_fix(app_ctx):
    import gradio as gr

    from finetune_core.ui import form, train_tab

    ctx, model_dir = app_ctx
    values = dict(form.DEFAULTS, model=model_dir, overrides="learning_rat=1e-4")
    with pytest.raises(gr.Error, match="learning_rat"):
        list(train_tab.estimate(ctx, values, "a" * 32, None))


def test_estimate_markdown_warns_when_memory_will_not_fit():
    from finetune_core.ui.train_tab import estimate_markdown

    e = {"train_seconds": 125.0, "earliest_stop_seconds": 60.0, "steps": 40, "epochs": 10, "evaluations": 10,
         "peak_rss_mb": 3000.0, "available_mb": 2000.0, "fits": False, "timed_steps": 4, "estimate_seconds": 12.0}
    md = estimate_markdown(e)
    assert "Training ≈ 2:05" in md and "early stopping can end it from 1:00" in md
    assert "will not fit in memory" in md and "2.9 GB" in md and "LoRA" in md
    ok = estimate_markdown(dict(e, peak_rss_mb=1000.0, fits=True), busy=True)
    assert "will not fit" not in md.split("\n")[0] and "will not fit" not in ok and "tight" not in ok
    assert "A run is training" in ok
    assert "tight" in estimate_markdown(dict(e, peak_rss_mb=1800.0, fits=True))
