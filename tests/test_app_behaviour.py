"""The app's behaviours of issue 3 that no other test pins, through the app's own handlers.

The handlers are the tabs' module-level functions, called with the app's context (`demo.ft_context`)
the way `build_app` binds them: generators are iterated here as gradio iterates them, with the browser
session id passed as `owner_state`. The Train form is a dict of form.py's fields.

- page reload: the Train tab's load handler (`reconnect`) follows the session's running job again,
  step and loss chart included; another session gets nothing;
- crash box: a worker killed with SIGKILL, or one that dies with a traceback, turns the Train tab's
  stream into a red box with the worker's last log lines within 5 s;
- "Recommend settings": the values of finetune_core.config.training_defaults for the model kind and
  strategy, advice sized to the data;
- "Show command": a run.yaml that equals what Start submits, and that `finetune_core train` runs;
- strategy radio: only the chosen strategy's options are visible;
- app restart: a finished run of the Start button is listed, evaluated, predicted with and zipped by
  a new JobManager and a new app on the same FINETUNE_HOME;
- Chat: the base model and an instruction run's fine-tuned model both answer, streamed.

Training jobs that only need to be watched use a fake worker (the events.jsonl protocol, no model),
as tests/test_jobs.py does; the restart and chat tests train tiny models for real.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from finetune_core.ui import after_train, chat_tab, data_tab, evaluate_tab, export_tab, form, train_tab

OWNER = "a" * 32          # a browser session id as gr.BrowserState stores it
OTHER = "b" * 32

# The Train form (finetune_core/ui/form.py's table) for a small classification run.
FORM = dict(form.DEFAULTS, max_length=32, strategy="frozen")


# ---------------------------------------------------------------------------------------------
# helpers


def block_fn(demo, name: str):
    """The events (trigger, inputs, outputs) whose handler is called `name`: how the page wires it."""
    found = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name]
    assert found, f"no event runs {name}"
    return found


def upd(value, key):
    """A field of a gr.update(...) (a dict in gradio 6)."""
    assert isinstance(value, dict) and value.get("__type__") == "update", value
    return value.get(key)


def trace_points(fig) -> int:
    return sum(len(t.y or ()) for t in fig.data)


def wait_for(predicate, timeout: float, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def app_for(manager):
    """The app and its context (what every handler takes first)."""
    from finetune_core.ui import build_app

    demo = build_app(manager)
    return demo, demo.ft_context


# ---------------------------------------------------------------------------------------------
# a fake worker: the real command line and files, events like train.py's EventsCallback, no model


FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    import yaml
    cfg = yaml.safe_load(open(sys.argv[-1]))
    out = cfg["output_dir"]
    behaviour = cfg["training"].get("run_name", "normal")   # the test picks the behaviour through run_name
    def emit(t, **kw):
        kw.update(type=t, time=time.time())
        with open(os.path.join(out, "events.jsonl"), "a") as f:
            f.write(json.dumps(kw) + "\\n")
    # "metrics-N": N steps, then a classification metrics.json as train.py writes it (also when stopped)
    steps = int(behaviour.split("-")[1]) if behaviour.startswith("metrics-") else 10000
    t0 = time.time()
    def write_metrics(step, stopped):
        strategy = cfg["strategy"]["name"]
        f1 = {"frozen": 0.6, "lora": 0.7, "full": 0.8}[strategy]
        metrics = {"task": "classification", "strategy": strategy, "model": cfg["model"], "f1_weighted": f1,
                   "accuracy": f1, "f1_macro": f1, "before_finetuning": {"f1_weighted": 0.2, "accuracy": 0.25},
                   "baselines": {"majority": {"f1_weighted": 0.1, "accuracy": 0.25},
                                 "tfidf_logreg": {"f1_weighted": 0.5, "accuracy": 0.5}},
                   "train_seconds": time.time() - t0, "total_seconds": time.time() - t0 + 1.0,
                   "peak_rss_mb": {"frozen": 300.0, "lora": 500.0, "full": 700.0}[strategy],
                   "trainable_params": {"frozen": 10, "lora": 100, "full": 1000}[strategy], "total_params": 1000,
                   "global_step": step, "max_steps": steps, "val_samples": 32, "stopped_by_user": stopped}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    print("fake worker: loading", flush=True)
    emit("info", message="Loading model fake ...")
    emit("start", step=0, max_steps=steps, num_train_epochs=1)
    for step in range(1, steps + 1):
        time.sleep(0.05)
        if os.path.exists(os.path.join(out, "STOP")):
            if steps < 10000:
                write_metrics(step, True)
            emit("end", step=step, max_steps=steps, message="stopped", stopped_by_user=True)
            sys.exit(0)
        if behaviour == "crash" and step == 60:
            raise RuntimeError("fake worker ran out of luck at step 60")
        emit("log", step=step, max_steps=steps, epoch=step / steps, loss=2.0 / step, learning_rate=1e-3,
             eta_seconds=100.0)
        print(f"fake worker: step {step} loss {2.0 / step:.4f}", flush=True)
    write_metrics(steps, False)
    emit("end", step=steps, max_steps=steps, message="done")
""")


@pytest.fixture
def fake_manager(tmp_path):
    from finetune_core.jobs import JobManager

    from conftest import worker_python

    mgr = JobManager(tmp_path / "runs", max_concurrent=1, stop_timeout=5, poll_interval=0.1,
                     python=worker_python(tmp_path, FAKE_WORKER), cwd=REPO, private_runs=True)
    yield mgr
    mgr.shutdown(kill=True)


@pytest.fixture
def fake_app(fake_manager):
    demo, ctx = app_for(fake_manager)
    yield fake_manager, demo, ctx
    demo.close()


@pytest.fixture(scope="module")
def static_app(tmp_path_factory):
    """An app whose handlers here start no job (Recommend, strategy options)."""
    from finetune_core.jobs import JobManager

    mgr = JobManager(tmp_path_factory.mktemp("static") / "runs", poll_interval=0.5)
    demo, ctx = app_for(mgr)
    yield mgr, demo, ctx
    demo.close()
    mgr.shutdown()


def next_matching(gen, predicate, timeout: float):
    """Iterate a watch stream until an output satisfies `predicate` (the stream yields at least every 2 s)."""
    deadline = time.time() + timeout
    for out in gen:
        if predicate(out):
            return out
        assert time.time() < deadline, f"no matching output within {timeout} s; last: {out[1]}"
    raise AssertionError("the stream ended without a matching output")


def step_of(out) -> int:
    m = re.search(r"step <b>(\d+)</b>", out[1])
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------------------------
# 1. page reload


def test_page_reload_reconnects_to_the_running_job_and_its_charts(fake_app):
    mgr, demo, ctx = fake_app
    # the Train tab's reconnect runs after the page's load event (which restores the session id)
    (event,) = block_fn(demo, "reconnect")
    assert len(event.outputs) == 6 and event.inputs and len(event.inputs) == 1

    first = train_tab.train(ctx, FORM, OWNER, None)
    out = next_matching(first, lambda o: step_of(o) >= 3, 30)
    run_id = out[0]
    first.close()                                   # the reload drops the page's stream; the job keeps running
    seen_before = step_of(out)
    assert mgr.get(run_id).status == "running"

    stream = train_tab.reconnect(ctx, OWNER, None)
    out = next(stream)
    assert out[0] == run_id
    assert "Training" in out[1] and step_of(out) >= seen_before
    assert "step <b>" in out[1] and "/ 10000" in out[1]
    # charts from offset 0: every logged step so far, not only the ones after the reload
    assert trace_points(out[2]) >= step_of(out) >= seen_before and out[2].data[0].name == "train loss"
    assert "step 1/10000" in out[4]                   # the log panel also starts from the beginning
    assert out[5] == {"run_id": run_id, "status": "running", "position": 0}
    out = next_matching(stream, lambda o: step_of(o) > seen_before, 10)     # and it keeps following
    assert step_of(out) > seen_before

    # another browser session reconnects to nothing (its own jobs only)
    assert list(train_tab.reconnect(ctx, OTHER, None)) == []

    assert "Stop requested" in train_tab.stop(ctx, run_id, OWNER, None)
    last = next_matching(stream, lambda o: o[5].get("status") == "stopped", 15)
    assert "Stopped by you" in last[1]
    assert list(stream) == []                        # a terminal status ends the stream
    assert mgr.get(run_id).status == "stopped"


# ---------------------------------------------------------------------------------------------
# 2. the crash box


@pytest.mark.parametrize("how", ["sigkill", "traceback"])
def test_a_crashed_worker_shows_a_failure_box_with_its_last_lines_within_5s(fake_app, how):
    import gradio as gr

    mgr, demo, ctx = fake_app
    values = dict(FORM, overrides="run_name=crash" if how == "traceback" else "")
    stream = train_tab.train(ctx, values, OWNER, None)
    out = next_matching(stream, lambda o: step_of(o) >= 2, 30)
    run_id = out[0]
    job = mgr.get(run_id)
    if how == "sigkill":
        t0 = time.time()
        os.kill(job.pid, signal.SIGKILL)
    failed = None
    with pytest.raises(gr.Error, match=f"Run {run_id} failed"):   # API clients get an error after the box
        for out in stream:
            if "ft-error" in out[1]:
                failed = (time.time(), out)
    assert failed is not None, "no failure box"
    if how == "traceback":        # it died right after its last event (step 59, then the exception)
        t0 = json.loads((job.run_dir / "events.jsonl").read_text().splitlines()[-1])["time"]
    elapsed, out = failed[0] - t0, failed[1]
    assert elapsed < 5.0, f"the failure box came {elapsed:.1f} s after the worker died"
    log = [line for line in (job.run_dir / "worker.log").read_text().splitlines() if line.strip()]
    from html import escape

    assert "❌" in out[1] and escape(log[-1]) in out[1]
    if how == "sigkill":
        assert "SIGKILL" in out[1] and "fake worker: step" in log[-1]
    else:
        assert "RuntimeError: fake worker ran out of luck at step 60" in out[1]
        assert "Traceback" in out[1]
    assert "--- worker.log (last lines) ---" in out[4] and log[-1] in out[4]
    assert out[5]["status"] == "failed" and out[5]["error"]
    # the same box after a reload
    again = list(train_tab.reconnect(ctx, OWNER, None))
    assert len(again) == 1 and "ft-error" in again[0][1] and escape(log[-1]) in again[0][1]


# ---------------------------------------------------------------------------------------------
# 3. Recommend settings


@pytest.mark.parametrize("task,model,kind,strategy,head_only", [
    ("classification", "bundled:minilm-l6", "encoder", "frozen", True),
    ("classification", "bundled:minilm-l6", "encoder", "full", True),
    ("instruction", "bundled:smollm2-135m", "causal", "lora", False),
])
def test_recommend_fills_the_engine_defaults_for_model_kind_and_strategy(task, model, kind, strategy,
                                                                         head_only, static_app):
    import torch

    from finetune_core.config import training_defaults

    _, _, ctx = static_app
    rows = 160
    values = dict(form.DEFAULTS, task=task, model=model, strategy=strategy, head_only=head_only, frozen_layers=3)
    epochs, lr, batch, patience, md, rec = train_tab.recommend(ctx, values, {"n_rows": rows})
    d = training_defaults(task, kind, strategy, int(rows * 0.8), "all" if head_only else 3,
                          cuda=torch.cuda.is_available())
    assert (epochs, lr, batch, patience) == (d["num_train_epochs"], d["learning_rate"],
                                             d["per_device_train_batch_size"], d["early_stopping_patience"])
    assert rec == {"epochs": epochs, "lr": lr, "batch": batch, "patience": patience}
    assert f"**{train_tab.fmt_rate(lr)}**" in md and f"**{epochs} epochs** at batch {batch}" in md
    steps = -(-int(rows * 0.8) // batch)
    assert f"~{steps} steps per epoch" in md                  # sized to the rows of the data
    advice = {"frozen": "freeze the backbone", "full": "freeze the backbone", "lora": "**LoRA**"}[strategy]
    assert advice in md                                       # 160 rows: the cheat sheet's pick
    assert ("You picked" in md) == (strategy == "full")       # full on 160 rows is not the cheat sheet's pick


def test_recommend_depends_on_strategy_and_data_size(static_app):
    _, _, ctx = static_app

    def rec(strategy, info):
        return train_tab.recommend(ctx, dict(form.DEFAULTS, strategy=strategy), info)

    lrs = {s: rec(s, {"n_rows": 160})[1] for s in ("frozen", "full", "lora")}
    assert len(set(lrs.values())) == 3 and lrs["full"] < lrs["lora"] < lrs["frozen"]
    assert "cheat sheet says **full fine-tuning**" in rec("full", {"n_rows": 2000})[4]
    assert "Load data in the Data tab" in rec("full", None)[4]


RATE = r"(\d+(?:\.\d+)?e-\d+)"
# Each rate the learning-rate info line quotes: the words after it, and the run it is the default of.
QUOTED_RATES = [("on an encoder, ", "classification", "encoder", "full"),
                ("for a causal-LM classifier", "classification", "causal", "full"),
                ("for instruction tuning", "instruction", "causal", "full"),
                ("on an encoder)", "classification", "encoder", "frozen"),
                ("on a small encoder", "classification", "encoder", "lora"),
                ("on a causal LM", "instruction", "causal", "lora")]
RUN_KINDS = [(task, kind, strategy, frozen) for task, kind in (("classification", "encoder"),
                                                               ("classification", "causal"), ("instruction", "causal"))
             for strategy in ("full", "frozen", "lora") for frozen in (("all", 3) if strategy == "frozen" else ("all",))]


def test_info_lines_and_advice_quote_the_defaults_the_run_uses(static_app):
    """The learning rates and epochs in the Train tab's info lines and in Recommend's advice are
    config.training_defaults' values for each model kind and strategy (issue 15: no copied numbers)."""
    from finetune_core.config import training_defaults

    _, demo, _ = static_app

    def default(task, kind, strategy, frozen="all", key="learning_rate"):
        return training_defaults(task, kind, strategy, 128, frozen, cuda=False)[key]

    infos = {c.label: c.info for c in demo.blocks.values() if getattr(c, "label", None) in ("Learning rate", "Epochs")}
    rate_info, epochs_info = infos["Learning rate"], infos["Epochs"]
    for after, task, kind, strategy in QUOTED_RATES:
        found = re.search(RATE + " " + re.escape(after), rate_info)
        assert found and float(found.group(1)) == default(task, kind, strategy), (after, rate_info)
    assert len(re.findall(RATE, rate_info)) == len(QUOTED_RATES)            # no other number in the line
    full = [default(t, k, "full") for t, k in (("classification", "encoder"), ("classification", "causal"),
                                                ("instruction", "causal"))]
    head = default("classification", "encoder", "frozen")
    loras = [default("classification", "encoder", "lora"), default("instruction", "causal", "lora")]
    assert head > 10 * max(full) and all(max(full) < r < head for r in loras)   # "far larger", "in between"
    for task in ("classification", "instruction"):
        epochs = {default(t, k, s, f, key="num_train_epochs") for t, k, s, f in RUN_KINDS if t == task}
        assert len(epochs) == 1 and f"{epochs.pop()} for {task}" in epochs_info, epochs_info

    for task, kind, strategy, frozen in RUN_KINDS:
        d = training_defaults(task, kind, strategy, 128, frozen, cuda=False)
        md = train_tab.advice(kind, strategy, frozen, 160, 128, d)
        said = re.search(r"Learning rate \*\*" + RATE + r"\*\*", md)
        assert said and float(said.group(1)) == d["learning_rate"], md
        assert f"**{d['num_train_epochs']} epochs**" in md
        low, high = (float(x) for x in re.search(RATE + " to " + RATE, md).groups())
        assert (low, high) == (min(full), max(full)), md


@pytest.mark.parametrize("cuda", [False, True])
def test_placeholders_show_what_recommend_and_the_run_use_on_this_device(static_app, monkeypatch, cuda):
    """On a GPU an instruction batch is 8, on a CPU 4: the 'auto' placeholders say what Recommend says."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    _, _, ctx = static_app
    values = dict(form.DEFAULTS, task="instruction", model="bundled:smollm2-135m", strategy="lora", head_only=False)
    info = {"n_rows": 80}
    epochs, lr, batch, *_ = train_tab.recommend(ctx, values, info)
    assert batch == (8 if cuda else 4)
    shown = train_tab.context_changed(ctx, values, info, {})
    assert [upd(u, "placeholder") for u in shown[:3]] == [f"auto: {epochs:g}", f"auto: {lr:g}", f"auto: {batch:g}"]
    assert all(upd(u, "value") is None for u in shown[:3])      # empty boxes: the recommended value


# ---------------------------------------------------------------------------------------------
# 3b. the Data tab's audit and the validation data Start uses


def test_without_a_validation_file_the_audit_checks_the_split_start_makes(static_app, tmp_path):
    """The Train tab's val_size and the run's seed (an override) decide the split, as in train(); texts
    repeated in the file land on both sides and the audit counts them, as audit.json does."""
    import pandas as pd

    from finetune_core.data import clean_classification, split_frame

    _, _, ctx = static_app
    rows = [{"text": f"{label} sentence {i}", "label": label} for label in ("a", "b", "c") for i in range(10)]
    rows += rows[:12]                                       # 12 repeated texts
    data = tmp_path / "repeats.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    values = dict(form.DEFAULTS, data_file=str(data), val_size=0.3, overrides="seed=7")
    summary, warnings_html, *_, report = data_tab.audit(ctx, values, "", OWNER, None)

    train_part, val_part = split_frame(clean_classification(pd.DataFrame(rows), "text", "label", "repeats.csv"),
                                       0.3, 7, stratify="label")
    shared = len(set(train_part["text"]) & set(val_part["text"]))
    assert 0 < shared < 12
    assert (report["validation_rows"], report["overlap_with_validation"]) == (len(val_part), shared)
    assert (report["val_size"], report["seed"]) == (0.3, 7) and report["validation_file"] is None
    assert f"{len(val_part)} rows held out of the training file as Start will (val_size 0.3, seed 7)" in summary
    assert f"**{shared} texts also in the training data**" in summary
    assert "Validation is split from the training file: remove the duplicate rows" in warnings_html


def test_a_bad_validation_file_gets_the_training_files_messages(static_app, tmp_path):
    _, _, ctx = static_app
    other = tmp_path / "other.csv"
    other.write_text("text,category\nhello,a\nbye,b\n", encoding="utf-8")
    for upload, message in ((other, "Column 'label' (the label column) is not in other.csv"),
                            (tmp_path / "gone.csv", "The uploaded validation file is no longer on the server")):
        values = dict(form.DEFAULTS, validation_file=str(upload))
        with pytest.raises(Exception, match=re.escape(message)):
            data_tab.audit(ctx, values, "", OWNER, None)
        with pytest.raises(Exception, match=re.escape(message)):
            next(train_tab.train(ctx, values, OWNER, None))       # refused before a job starts
    assert not ctx.manager.jobs(OWNER)


def test_show_command_names_the_validation_file(static_app, tmp_path):
    _, _, ctx = static_app
    held_out = tmp_path / "held_out.csv"
    held_out.write_text("text,label\nhello,a\n", encoding="utf-8")
    _, md, text, _ = train_tab.show_command(ctx, dict(form.DEFAULTS, validation_file=str(held_out)))
    assert "validation: held_out.csv" in text and "Put the validation file `held_out.csv`" in md
    _, md, text, _ = train_tab.show_command(ctx, dict(form.DEFAULTS))
    assert "validation: null" in text and "validation file" not in md


# ---------------------------------------------------------------------------------------------
# 4. Show command


def test_show_command_yaml_is_what_start_submits_and_the_cli_runs_it(fake_app, tiny_bert_dir, tmp_path,
                                                                     monkeypatch):
    from finetune_core.cli import main
    from finetune_core.config import config_from_dict, config_to_dict, load_config

    mgr, _, ctx = fake_app
    # a tiny BERT where the app may load models from (the runs folder's operator folders)
    model_dir = mgr.runs_dir / "_models" / "tiny-bert"
    shutil.copytree(tiny_bert_dir, model_dir)
    values = dict(FORM, model=str(model_dir), learning_rate=0.01, overrides="max_steps=1\neval_strategy=no\n"
                  "save_strategy=no\nlogging_steps=1\nper_device_train_batch_size=8")
    group, md, text, path = train_tab.show_command(ctx, values)
    assert upd(group, "visible") is True
    assert "```bash\npython -m finetune_core train run.yaml\n```" in md
    assert Path(path).name == "run.yaml" and Path(path).read_text(encoding="utf-8") == text
    shown = load_config(path)
    assert shown.data.train == "examples/data/domains.csv"          # portable: relative to the repository

    # what Start submits for the same form
    submitted = []
    real_submit = mgr.submit
    monkeypatch.setattr(mgr, "submit", lambda cfg, owner, **kw: submitted.append(config_to_dict(cfg))
                        or real_submit(cfg, owner, **kw))
    stream = train_tab.train(ctx, values, OWNER, None)
    run_id = next(stream)[0]
    stream.close()
    train_tab.stop(ctx, run_id, OWNER, None)
    assert len(submitted) == 1
    start = config_from_dict(submitted[0])
    a, b = config_to_dict(shown), config_to_dict(start)
    assert Path(b["data"]["train"]) == REPO / a["data"]["train"]
    a["data"]["train"] = b["data"]["train"] = None
    assert a.pop("output_dir") == "runs/class-frozen"
    b.pop("output_dir")
    assert a == b
    assert a["strategy"]["frozen_layers"] == "all" and a["training"]["learning_rate"] == 0.01

    # the command, run from the repository with the downloaded run.yaml (output elsewhere than runs/)
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "cli-run"
    assert main(["train", path, "--set", f"output_dir={out_dir}"]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 1 and metrics["strategy"] == "frozen"
    assert load_config(out_dir / "run.yaml").training["learning_rate"] == 0.01


# ---------------------------------------------------------------------------------------------
# 5. strategy options


def _contains(block, label: str) -> bool:
    if getattr(block, "label", None) == label:
        return True
    return any(_contains(c, label) for c in getattr(block, "children", []) or [])


def test_strategy_radio_shows_only_that_strategys_options(static_app):
    _, demo, ctx = static_app
    events = block_fn(demo, "show_strategy")
    assert len(events) == 2                                  # the strategy radio and the head-only box
    frozen_group, lora_group, frozen_layers = events[0].outputs
    assert _contains(frozen_group, "Freeze the whole backbone (train only the new head)")
    assert frozen_layers.label == "Frozen blocks" and _contains(frozen_group, "Frozen blocks")
    for label in ("LoRA rank r", "LoRA alpha", "LoRA dropout", "Target modules"):
        assert _contains(lora_group, label) and not _contains(frozen_group, label)
    # the page opens on LoRA: its options only
    assert (frozen_group.visible, lora_group.visible) == (False, True)

    show = train_tab.show_strategy
    visible = {(s, head): tuple(upd(u, "visible") for u in show(s, head))
               for s in ("full", "frozen", "lora") for head in (True, False)}
    assert visible[("full", True)] == visible[("full", False)] == (False, False, False)
    assert visible[("lora", True)] == visible[("lora", False)] == (False, True, False)
    assert visible[("frozen", True)] == (True, False, False)        # head only: no slider
    assert visible[("frozen", False)] == (True, False, True)        # top blocks learn: how many frozen


# ---------------------------------------------------------------------------------------------
# 6. after an app restart: listed, evaluated, predicted, exported


def test_a_finished_run_after_an_app_restart_is_listed_evaluated_predicted_and_exported(tmp_path, monkeypatch,
                                                                                       tiny_bert_dir):
    from finetune_core.jobs import JobManager

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    mgr = JobManager(poll_interval=0.2, cwd=REPO, private_runs=True)
    assert mgr.runs_dir == tmp_path / "home" / "runs"
    model_dir = mgr.runs_dir / "_models" / "tiny-bert"
    shutil.copytree(tiny_bert_dir, model_dir)
    demo, ctx = app_for(mgr)
    # a validation file (the Data tab's upload): 3 rows of each class, 2 of them copied from the training data
    domains = (REPO / "examples" / "data" / "domains.csv").read_text(encoding="utf-8").splitlines()
    validation = tmp_path / "upload" / "held_out.csv"
    validation.parent.mkdir()
    rows = [domains[1], domains[41]] + [f"A fresh {label} sentence number {i}.,{label}"
                                        for label in ("finance", "legal", "medical", "technology") for i in range(3)]
    validation.write_text("\n".join([domains[0]] + rows) + "\n", encoding="utf-8")
    try:
        values = dict(FORM, model=str(model_dir), learning_rate=0.01, validation_file=str(validation),
                      overrides="max_steps=4\neval_strategy=no\nsave_strategy=no\nlogging_steps=1\n"
                                "per_device_train_batch_size=8")
        outs = list(train_tab.train(ctx, values, OWNER, None))
        run_id, status, loss, _, _, result = outs[-1]
        assert result["status"] == "finished", (status, outs[-1][4][-2000:])
        assert "Finished" in status and trace_points(loss) >= 1      # the real worker's events drew the chart
        run_dir = mgr.runs_dir / run_id
        assert result["metrics"]["train_samples"] == 160             # every training row: none held out
        assert json.loads((run_dir / "metrics.json").read_text())["val_samples"] == 14
        # the Data tab's audit of the same form is the run's audit.json, overlap included
        written = json.loads((run_dir / "audit.json").read_text())
        summary, warnings_html, *_, report = data_tab.audit(ctx, values, str(model_dir), OWNER, None)
        assert written["validation_source"] == "file" and written["overlap_with_validation"] == 2
        written.pop("token_lengths")                                # the page's JSON leaves the histogram out
        assert {k: report[k] for k in written} == written
        assert "**Validation:** 14 rows from `held_out.csv`" in summary and "**2 texts also in the training data**" \
            in summary and "appear in both the training and the validation data" in warnings_html
    finally:
        demo.close()
        mgr.shutdown()

    # the app restarts: new JobManager, new app context, nothing kept in memory
    mgr = JobManager(poll_interval=0.2, cwd=REPO, private_runs=True)
    demo, ctx = app_for(mgr)
    try:
        assert demo.ft_context.runs_dir == tmp_path / "home" / "runs"
        every, chat, cls, exp = after_train(ctx, "", None, None, None, None, OWNER, None)
        assert run_id in [v for _, v in upd(every, "choices")] and upd(every, "value") == run_id
        assert run_id in [v for _, v in upd(cls, "choices")] and run_id in [v for _, v in upd(exp, "choices")]
        assert run_id not in [v for _, v in upd(chat, "choices")]                  # a classifier does not chat
        other = after_train(ctx, "", None, None, None, None, OTHER, None)[0]
        assert run_id not in [v for _, v in upd(other, "choices")]                  # private to its session

        out = evaluate_tab.show_run(ctx, run_id, False, OWNER, None)
        header, cls_col, baselines, cm, per_class, pred_file = out[0], out[3], out[5], out[7], out[8], out[11]
        assert "**classification**" in header and "strategy **frozen**" in header
        assert upd(cls_col, "visible") is True
        assert [r[0] for r in baselines][:1] and any("TF-IDF" in r[0] or "tfidf" in r[0].lower() for r in baselines)
        assert sorted(r[0] for r in per_class) == ["finance", "legal", "medical", "technology"]
        assert cm.data and len(cm.data[0].z) == 4
        assert Path(pred_file).read_text().splitlines()[0].startswith("text")
        with pytest.raises(Exception, match="was not found"):
            evaluate_tab.show_run(ctx, run_id, False, OTHER, None)

        probs = chat_tab.predict(ctx, "The court ruled in favour of the plaintiff.", run_id, OWNER, None)
        assert set(probs) == {"finance", "legal", "medical", "technology"}
        assert abs(sum(probs.values()) - 1) < 1e-4

        zip_path, snippet = export_tab.build_zip(ctx, run_id, OWNER, "model", None)
        names = zipfile.ZipFile(zip_path).namelist()
        assert any(n.endswith(".safetensors") for n in names)
        assert any(n.endswith("tokenizer.json") or n.endswith("vocab.txt") for n in names)
        assert any(n.endswith("README.md") for n in names)
        assert not any("optimizer" in n or n.endswith(".csv") for n in names)   # no optimizer state, no data
        top = {n.split("/")[0] for n in names}
        assert top == {f"model-{run_id[:6]}"} and f'"{top.pop()}"' in snippet   # the snippet loads the zip's folder
    finally:
        demo.close()
        mgr.shutdown()


# ---------------------------------------------------------------------------------------------
# 7. Chat: base and fine-tuned side by side


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory, tiny_llama_dir):
    """A finished instruction run (tiny Llama, a few steps) in an app's runs folder, owned by OWNER."""
    from conftest import owned_instruction_run

    run_id = "fedcba9876543210"
    runs = owned_instruction_run(tmp_path_factory.mktemp("chat"), run_id, OWNER, tiny_llama_dir, "chatty", max_steps=3,
                                 learning_rate=1e-2, warmup_steps=0)
    return runs, run_id


def test_sampled_answers_show_their_seed_and_the_seed_gives_them_again(instruction_run):
    """Sampling: each message draws a new seed, shown under both answers; typed into "Fixed seed" it
    gives the same answers again, and the note never goes back to the model as context."""
    from finetune_core.jobs import JobManager

    runs, run_id = instruction_run
    mgr = JobManager(runs, poll_interval=0.2, private_runs=True)
    demo, ctx = app_for(mgr)

    def send(seed, history=((), ())):
        base, ft, exchange = list(chat_tab.chat(ctx, "Rewrite this note: refund approved.", run_id, 1.5, 1.0, 8,
                                                True, list(history[0]), list(history[1]), OWNER, None, seed))[-1]
        seeds = {re.search(r"`seed (\d+)`$", h[-1]["content"]).group(1) for h in (base, ft)}
        assert len(seeds) == 1                                    # one seed per message, for both models
        assert exchange["answer"] == chat_tab.without_seed(ft[-1]["content"]) and "seed" not in exchange["answer"]
        return base, ft, int(seeds.pop())

    try:
        first, second = send(""), send(None)
        assert first[2] != second[2]                               # random by default
        assert [h[-1]["content"] for h in first[:2]] != [h[-1]["content"] for h in second[:2]]
        again = send(str(first[2]))
        assert again[2] == first[2] and [h[-1] for h in again[:2]] == [h[-1] for h in first[:2]]
        assert send(first[2])[:2] == again[:2]                      # an API client may send the number itself
        # the next turn's context holds the model's words, not the app's seed note
        context = chat_tab.context_messages(first[1])
        assert context[-1]["role"] == "assistant" and "seed" not in context[-1]["content"]
        for bad in ("abc", "-1", "1.5", str(2**32)):
            with pytest.raises(Exception, match="is not a whole number from 0 to 4294967295"):
                list(chat_tab.chat(ctx, "hi", run_id, 0.7, 0.9, 8, True, [], [], OWNER, None, bad))
    finally:
        demo.close()
        mgr.shutdown()


def test_chat_streams_the_base_and_the_fine_tuned_model_side_by_side(instruction_run, tiny_llama_dir):
    from finetune_core.jobs import JobManager
    from finetune_core.ui.chat_tab import resolve_chat_models

    runs, run_id = instruction_run
    mgr = JobManager(runs, poll_interval=0.2, private_runs=True)
    demo, ctx = app_for(mgr)
    try:
        base_ref, ft_dir, run_dir = resolve_chat_models(demo.ft_context, run_id, OWNER)
        assert (base_ref, ft_dir, run_dir) == (tiny_llama_dir, str(runs / run_id / "model"), runs / run_id)
        chat_choices = upd(chat_tab.refresh(ctx, None, None, OWNER, None)[0], "choices")
        assert run_id in [v for _, v in chat_choices]

        # the handler appends to the same lists it yields: keep a copy of each streamed output
        outs = [copy.deepcopy(o) for o in chat_tab.chat(ctx, "Rewrite this note: refund approved.", run_id, 0.7,
                                                             0.9, 12, False, [], [], OWNER, None)]
        base, ft, exchange = outs[-1]
        for history in (base, ft):
            assert [m["role"] for m in history] == ["user", "assistant"]
            assert history[0]["content"] == "Rewrite this note: refund approved."
            answer = history[1]["content"]
            # streamed tokens (random weights: often blank lines), never the loading note
            assert isinstance(answer, str) and answer and not answer.startswith("⏳")
        assert exchange == {"run_dir": str(runs / run_id), "prompt": "Rewrite this note: refund approved.",
                            "answer": ft[1]["content"]}
        # streamed: the base answer appears (and grows) before the fine-tuned model starts answering
        base_first = [o for o in outs[:-1] if len(o[0]) == 2 and len(o[1]) == 1]
        assert base_first and len(outs) >= 5
        assert any(len(o[1]) == 2 and o[1][1]["content"].startswith("⏳") for o in outs)   # loading note first

        # a second turn keeps both conversations
        outs = list(chat_tab.chat(ctx, "And shorter?", run_id, 0.7, 0.9, 8, False, base, ft, OWNER, None))
        base, ft, _ = outs[-1]
        assert [m["role"] for m in base] == [m["role"] for m in ft] == ["user", "assistant"] * 2
        assert "seed" not in base[-1]["content"]                     # greedy: nothing random, no seed
        with pytest.raises(Exception, match="was not found"):
            list(chat_tab.chat(ctx, "hi", run_id, 0.7, 0.9, 8, False, [], [], OTHER, None))
    finally:
        demo.close()
        mgr.shutdown()


# ---------------------------------------------------------------------------------------------
# 8. "Compare strategies": one job group, one run at a time, the table filled as runs end


def compare_outputs(stream, timeout: float = 60) -> list:
    outs, deadline = [], time.time() + timeout
    for out in stream:
        outs.append(out)
        assert time.time() < deadline, "the comparison did not end in time"
    return outs


def test_compare_strategies_queues_a_group_and_fills_the_table_as_runs_end(fake_app):
    from finetune_core.ui import compare_panel

    mgr, demo, ctx = fake_app
    (event,) = block_fn(demo, "compare_strategies")
    assert len(event.outputs) == 10
    values = dict(FORM, overrides="run_name=metrics-20", learning_rate=0.003)    # a rate typed for frozen
    outs = compare_outputs(compare_panel.compare_strategies(ctx, values, OWNER, None))
    first = outs[0]
    assert upd(first[6], "visible") is True
    assert [r[:2] for r in upd(first[7], "value")] == [["Frozen backbone", "queued"], ["LoRA", "queued"],
                                                       ["Full fine-tuning", "queued"]]
    assert "weighted F1 before → after" in upd(first[7], "headers")
    assert any(isinstance(o[7], list) and ["Frozen backbone", "running"] == o[7][0][:2] for o in outs)

    jobs = sorted(mgr.jobs(OWNER), key=lambda j: j.created)
    assert [j.strategy for j in jobs] == ["frozen", "lora", "full"] and len({j.group for j in jobs}) == 1
    assert all(j.status == "finished" for j in jobs), [(j.status, j.error) for j in jobs]
    for a, b in zip(jobs, jobs[1:]):                 # one after the other: each one's time and memory its own
        assert b.started >= a.ended - 0.5, (a.ended, b.started)
    # the typed rate belongs to the form's strategy; the others train at their own default (compare.plan_runs)
    from finetune_core.config import load_config

    rates = {j.strategy: load_config(j.request_path).training.get("learning_rate") for j in jobs}
    assert rates["frozen"] == 0.003 and rates["lora"] is None and rates["full"] is None

    final_table = [o[7] for o in outs if isinstance(o[7], list)][-1]
    assert [r[0].split(" (")[0] for r in final_table] == ["Frozen backbone", "LoRA", "Full fine-tuning"]
    assert [r[1] for r in final_table] == ["ok", "ok", "ok"]
    assert [r[2] for r in final_table] == ["0.200 → 0.600", "0.200 → 0.700", "0.200 → 0.800"]
    assert [r[6] for r in final_table] == ["300", "500", "700"]                   # peak memory, MB
    assert final_table[0][7] == "3e-03" and final_table[2][7] != "3e-03"
    chart = [o[8] for o in outs if hasattr(o[8], "data")][-1]
    points = [t for t in chart.data if t.mode == "markers+text"]
    assert [t.name for t in points] == ["Frozen backbone", "LoRA", "Full fine-tuning"]
    assert [t.y[0] for t in points] == [0.6, 0.7, 0.8]
    reading = [o[9] for o in outs if isinstance(o[9], str) and o[9]][-1]
    assert "Best F1: Full fine-tuning (0.800)" in reading and "TF-IDF" in reading
    assert "| strategy |" not in reading and "## Reading" in reading       # the table is the panel's own
    # the Evaluate tab's runs table lists them with their peak memory
    rows = evaluate_tab.runs_table(ctx.manager.list_runs(OWNER))
    memory = evaluate_tab.RUN_HEADERS.index("peak memory MB")
    assert sorted(r[memory] for r in rows) == ["300", "500", "700"]


def test_one_stop_stops_the_whole_comparison(fake_app):
    from finetune_core.ui import compare_panel

    mgr, demo, ctx = fake_app
    stream = compare_panel.compare_strategies(ctx, dict(FORM, overrides="run_name=metrics-2000"), OWNER, None)
    out = next_matching(stream, lambda o: isinstance(o[1], str) and step_of(o) >= 2, 30)
    run_id = out[0]
    assert mgr.get(run_id).strategy == "frozen"
    assert "1 running and 2 queued" in train_tab.stop(ctx, run_id, OWNER, None)
    outs = compare_outputs(stream)
    final_table = [o[7] for o in outs if isinstance(o[7], list)][-1]
    assert [r[1] for r in final_table] == ["stopped", "skipped: stop requested", "skipped: stop requested"], final_table
    assert final_table[0][2] == "0.200 → 0.600"            # the stopped run was evaluated as it was
    assert [j.status for j in sorted(mgr.jobs(OWNER), key=lambda j: j.created)] == ["stopped", "cancelled", "cancelled"]
    # a second comparison while one runs follows the running one instead of queueing three more


def test_a_page_reload_redraws_a_running_comparison(fake_app):
    """The comparison's table lives in the page: after a reload, the rows of the runs that ended come
    back and the running strategy is followed again; Train's own reconnect leaves it to the panel."""
    from finetune_core.ui import compare_panel

    mgr, demo, ctx = fake_app
    stream = compare_panel.compare_strategies(ctx, dict(FORM, overrides="run_name=metrics-2000"), OWNER, None)
    next_matching(stream, lambda o: isinstance(o[1], str) and step_of(o) >= 1, 30)
    frozen = next(j for j in mgr.jobs(OWNER) if j.strategy == "frozen")
    mgr.stop(frozen.run_id, OWNER)                      # the frozen run ends (with metrics); LoRA starts
    assert mgr.wait(frozen.run_id, timeout=20) == "stopped"
    stream.close()                                      # the reload drops the page's stream
    lora = next(j for j in mgr.jobs(OWNER) if j.strategy == "lora")
    assert wait_for(lambda: mgr.get(lora.run_id).status == "running", 10)

    assert list(train_tab.reconnect(ctx, OWNER, None)) == []
    again = compare_panel.reconnect_comparison(ctx, OWNER, None)
    first = next(again)
    assert upd(first[6], "visible") is True
    rows = upd(first[7], "value")
    assert [r[:2] for r in rows] == [["Frozen backbone (head only)", "stopped"], ["LoRA", "queued"],
                                     ["Full fine-tuning", "queued"]]
    assert rows[0][2] == "0.200 → 0.600" and "Frozen backbone" in first[9]
    out = next_matching(again, lambda o: isinstance(o[1], str) and step_of(o) >= 1, 30)
    assert out[0] == lora.run_id                        # the running strategy is followed again
    assert list(compare_panel.reconnect_comparison(ctx, OTHER, None)) == []      # another session: nothing
    train_tab.stop(ctx, lora.run_id, OWNER, None)
    list(again)
