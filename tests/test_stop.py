"""Stop is safe: the model is saved the moment training ends (before minutes of evaluation), the
job manager's kill clock covers only "the Trainer has not stopped yet", and a Stop pressed while the
model loads ends the run as stopped (at its first step, with a model), never as killed.

In-process runs on tiny models check the order inside train(); real workers (tiny models, a
shimmed worker that makes post-training slow) check the job manager with a stop timeout of seconds.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from conftest import FAST_TRAINING, REPO, class_rows, instruction_rows, write_csv, write_jsonl
from finetune_core.config import config_from_dict
from finetune_core.events import read_all_events
from finetune_core.jobs import JobManager


def run_config(out: Path, model: str, data: str, task: str = "classification", **training) -> dict:
    return {"task": task, "model": model, "data": {"train": data, "max_length": 32 if task == "classification" else 96},
            "strategy": {"name": "full"}, "training": {**FAST_TRAINING, **training}, "output_dir": str(out),
            "seed": 1}


def quiet_train(values: dict) -> dict:
    import contextlib
    import io

    from finetune_core.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        return train(config_from_dict(values))


# ---------------------------------------------------------------------------------------------
# inside train(): the model is on disk before the post-training measurements start


def test_classification_model_is_saved_before_final_evaluation(tmp_path, tiny_bert_dir, monkeypatch):
    import finetune_core.evaluation as evaluation

    out = tmp_path / "run"
    seen = {}
    real = evaluation.baselines

    def baselines(*args, **kwargs):
        seen["model"] = (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
        seen["metrics"] = (out / "metrics.json").exists()
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "baselines", baselines)
    metrics = quiet_train(run_config(out, tiny_bert_dir, write_csv(tmp_path / "t.csv", class_rows(4))))
    assert seen == {"model": True, "metrics": False}        # saved early; metrics.json still comes last
    card = (out / "model" / "README.md").read_text()
    # the card is rewritten with the final metrics, as before the model was saved early
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card and "Baselines on the same split" in card
    events = read_all_events(out / "events.jsonl")
    phases = [i for i, e in enumerate(events) if e.get("phase") == "saving"]
    # the Trainer's end ("saving" as it stops), then train.py's "Saving the model to model/"
    assert len(phases) == 2 and events[phases[0] - 1]["type"] in ("log", "save", "info")
    assert events[phases[1]]["message"].startswith("Saving the model")
    assert events[-1]["type"] == "end" and events[-1]["stopped_by_user"] is False


def test_instruction_model_is_saved_before_the_base_model_is_measured(tmp_path, tiny_llama_dir, monkeypatch):
    from finetune_core.tasks import instruction

    out = tmp_path / "run"
    seen = {}
    real = instruction.measure_base_model

    def measure(*args, **kwargs):
        seen["model"] = (out / "model" / "model.safetensors").is_file()
        return real(*args, **kwargs)

    monkeypatch.setattr(instruction, "measure_base_model", measure)
    metrics = quiet_train(run_config(out, tiny_llama_dir, write_jsonl(tmp_path / "t.jsonl", instruction_rows(12)),
                                     task="instruction"))
    assert seen == {"model": True}
    card = (out / "model" / "README.md").read_text()
    assert f"| eval_loss_before | {metrics['eval_loss_before']:.4f} |" in card


def test_stop_during_start_up_ends_at_the_first_step_with_a_model(tmp_path, tiny_bert_dir):
    """A STOP written after the process started (a Stop clicked while the model loads) is no stale
    request: training ends at its first step, and the run is a stopped one with a saved model."""
    from finetune_core.rundir import run_status_from_disk

    out = tmp_path / "run"
    out.mkdir()
    (out / "STOP").write_text("stop\n")        # newer than this process: a live request
    metrics = quiet_train(run_config(out, tiny_bert_dir, write_csv(tmp_path / "t.csv", class_rows(4)),
                                     max_steps=1000))
    assert metrics["stopped_by_user"] and metrics["global_step"] == 1
    assert (out / "model" / "model.safetensors").is_file()
    events = read_all_events(out / "events.jsonl")
    assert events[-1]["type"] == "end" and events[-1]["stopped_by_user"] is True
    assert run_status_from_disk(out)["status"] == "stopped"


# ---------------------------------------------------------------------------------------------
# the job manager with real workers and a stop timeout of seconds

SLOW_WORKER = textwrap.dedent("""
    # The real worker (`-m finetune_core train RUN_DIR/run_request.yaml`) with slow post-training:
    # the baselines take {slow} s, far longer than the manager's stop timeout.
    import sys, time
    sys.path.insert(0, {repo!r})
    import finetune_core.evaluation as evaluation
    real = evaluation.baselines
    def baselines(*args, **kwargs):
        time.sleep({slow})
        return real(*args, **kwargs)
    evaluation.baselines = baselines
    from finetune_core.cli import main
    sys.exit(main(sys.argv[3:]))      # argv: script -m finetune_core train REQUEST
""")


@pytest.fixture
def slow_manager(tmp_path):
    from conftest import worker_python

    mgr = JobManager(tmp_path / "runs", max_concurrent=1, stop_timeout=2, poll_interval=0.1,
                     python=worker_python(tmp_path, SLOW_WORKER.format(repo=str(REPO), slow=6)), cwd=REPO)
    yield mgr
    mgr.shutdown(kill=True)


def events_of(job) -> list[dict]:
    return read_all_events(job.run_dir / "events.jsonl") if (job.run_dir / "events.jsonl").exists() else []


def wait_for(predicate, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.slow
def test_stop_with_slow_post_training_is_not_killed_and_keeps_the_model(tmp_path, slow_manager, tiny_bert_dir):
    mgr = slow_manager
    config = run_config(tmp_path / "unused", tiny_bert_dir, write_csv(tmp_path / "t.csv", class_rows(4)),
                        max_steps=100000)
    job = mgr.submit(config, owner="alice")
    assert wait_for(lambda: any(e["type"] == "log" for e in events_of(job)), 120), job.error_lines
    mgr.stop(job.run_id, owner="alice")
    # post-training (6 s) outlasts the stop timeout (2 s): the old kill clock killed the worker here
    assert mgr.wait(job.run_id, timeout=120) == "stopped", (job.error, job.error_lines)
    assert not job.killed
    assert (job.run_dir / "model" / "model.safetensors").is_file()
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["stopped_by_user"] and metrics["global_step"] < 100000
    assert any(e.get("phase") == "saving" for e in events_of(job))


@pytest.mark.slow
def test_stop_while_the_worker_starts_ends_as_stopped(tmp_path, slow_manager, tiny_bert_dir):
    mgr = slow_manager
    config = run_config(tmp_path / "unused", tiny_bert_dir, write_csv(tmp_path / "t.csv", class_rows(4)),
                        max_steps=100000)
    job = mgr.submit(config, owner="alice")
    assert mgr.get(job.run_id).status == "running"
    mgr.stop(job.run_id, owner="alice")           # the worker is still importing torch: longer than 2 s
    assert mgr.wait(job.run_id, timeout=120) == "stopped", (job.error, job.error_lines)
    assert not job.killed
    assert mgr.status(job.run_id)["status"] == "stopped"
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["stopped_by_user"] and metrics["global_step"] == 1      # honoured at the first step
    assert (job.run_dir / "model" / "model.safetensors").is_file()


def test_kill_clock_covers_only_training(tmp_path):
    """The manager's rule, from the worker's events: past stop_timeout a training worker is killed;
    a loading or finishing one gets finish_timeout, counted from when it began finishing."""
    from finetune_core.jobs import Job

    mgr = JobManager(tmp_path / "runs", stop_timeout=60, finish_timeout=600, poll_interval=60)
    try:
        run_dir = tmp_path / "runs" / "r1"
        run_dir.mkdir()
        job = Job(run_id="r1", run_dir=run_dir, owner=None, name="r1", created=0.0, started=1000.0,
                  stop_requested=1100.0)

        def add(**event):
            with open(run_dir / "events.jsonl", "a") as f:
                f.write(json.dumps(event) + "\n")

        add(type="start", time=900.0)                                  # an earlier attempt's: ignored
        assert job.phase == "loading" and not mgr._kill_due(job, 1100.0 + 599)
        assert mgr._kill_due(job, 1100.0 + 601)
        add(type="info", time=1001.0, message="Loading model x ...")
        add(type="start", time=1050.0, step=0)
        assert not mgr._kill_due(job, 1100.0 + 59) and mgr._kill_due(job, 1100.0 + 61)
        assert job.phase == "training"
        add(type="info", time=1130.0, phase="finishing", message="Stop received")
        assert not mgr._kill_due(job, 1130.0 + 599) and job.phase == "saving"     # legacy "finishing"
        assert mgr._kill_due(job, 1130.0 + 601)
    finally:
        mgr.shutdown()


def test_kill_clock_spares_a_mid_run_evaluation_and_checkpoint(tmp_path):
    """A Stop pressed while the Trainer evaluates and writes a checkpoint between epochs gets
    finish_timeout (a kill would cut the save short); training again once the save is written."""
    from finetune_core.jobs import Job

    mgr = JobManager(tmp_path / "runs", stop_timeout=60, finish_timeout=600, poll_interval=60)
    try:
        run_dir = tmp_path / "runs" / "r2"
        run_dir.mkdir()
        job = Job(run_id="r2", run_dir=run_dir, owner=None, name="r2", created=0.0, started=1000.0,
                  stop_requested=1100.0)

        def add(**event):
            with open(run_dir / "events.jsonl", "a") as f:
                f.write(json.dumps(event) + "\n")

        add(type="start", time=1010.0, step=0)
        add(type="info", time=1090.0, phase="evaluating", step=10, evaluate=True, save=True, message="Step 10")
        add(type="log", time=1090.5, step=10, loss=1.0)          # the step's own loss point comes first
        add(type="eval", time=1150.0, step=10, eval_loss=0.9)    # evaluation done, the checkpoint is next
        assert not mgr._kill_due(job, 1100.0 + 300) and job.phase == "checkpoint"   # legacy "evaluating"
        add(type="save", time=1400.0, step=10)
        assert job.phase == "checkpoint"   # (not read yet)
        assert not mgr._kill_due(job, 1400.0 + 59) and job.phase == "training"
        assert mgr._kill_due(job, 1400.0 + 61)
    finally:
        mgr.shutdown()


def test_events_say_when_the_trainer_evaluates_or_saves(tmp_path, tiny_bert_dir):
    """A real run writes a checkpoint phase event at each epoch end, before its eval and its save; the last
    epoch's says it saves nothing (model/ holds those weights), and no checkpoint follows it."""
    from conftest import class_rows, write_csv
    from finetune_core.config import config_from_dict
    from finetune_core.events import read_all_events
    from finetune_core.train import train

    cfg = config_from_dict({"task": "classification", "model": tiny_bert_dir,
                            "data": {"train": write_csv(tmp_path / "t.csv", class_rows(6)), "max_length": 32},
                            "strategy": {"name": "full"},
                            "training": {"num_train_epochs": 2, "per_device_train_batch_size": 8},
                            "output_dir": str(tmp_path / "run")})
    train(cfg)
    events = read_all_events(tmp_path / "run" / "events.jsonl")
    kept = [e for e in events if e["type"] in ("info", "eval", "save")]
    kinds = [(e["type"], e.get("phase")) for e in kept]
    checkpoints = [i for i, k in enumerate(kinds) if k == ("info", "checkpoint")]
    assert len(checkpoints) == 2
    assert [kept[i]["save"] for i in checkpoints] == [True, False]
    assert all(kept[i]["evaluate"] for i in checkpoints)
    first, last = checkpoints
    assert kinds[first + 1][0] == "eval" and kinds[first + 2][0] == "save"
    assert kinds[last + 1][0] == "eval" and ("save", None) not in kinds[last:]


def test_stop_timeouts_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_STOP_TIMEOUT", "5")
    monkeypatch.setenv("FINETUNE_FINISH_TIMEOUT", "77")
    mgr = JobManager(tmp_path / "a", poll_interval=60)
    explicit = JobManager(tmp_path / "b", stop_timeout=9, finish_timeout=10, poll_interval=60)
    monkeypatch.setenv("FINETUNE_STOP_TIMEOUT", "soon")
    fallback = JobManager(tmp_path / "c", poll_interval=60)
    try:
        assert (mgr.stop_timeout, mgr.finish_timeout) == (5, 77)
        assert (explicit.stop_timeout, explicit.finish_timeout) == (9, 10)   # an argument wins
        assert fallback.stop_timeout == 60
    finally:
        for m in (mgr, explicit, fallback):
            m.shutdown()
