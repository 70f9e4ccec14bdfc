"""The event stream: attempts numbered by the writer, typed constructors, one reducer (Progress) that
reads today's files and older ones alike, one formatter."""

from __future__ import annotations

import json

from finetune_core import events as ev
from finetune_core.events import EventWriter, format_event, last_attempt, progress, read_all_events


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_writer_numbers_its_attempt_and_stamps_every_event(tmp_path):
    path = tmp_path / "events.jsonl"
    first = EventWriter(path)
    assert first.attempt == 1
    first.begin("Loading model x ...")
    first.start(step=0, max_steps=4, num_train_epochs=1)
    first.log(step=1, max_steps=4, loss=float("nan"))             # NaN is written as null, not as NaN
    first.end("Done in 1.0s", step=4, max_steps=4, stopped_by_user=True)
    second = EventWriter(path)                                      # a resume appends attempt 2
    assert second.attempt == 2
    second.begin("Loading model x ...")
    second.error("out of memory")
    events = read_all_events(path)
    assert [e["attempt"] for e in events] == [1, 1, 1, 1, 2, 2]
    assert [(e["type"], e.get("phase")) for e in events] == [
        ("info", "loading"), ("start", "training"), ("log", None), ("end", "done"), ("info", "loading"),
        ("error", "error")]
    assert events[2]["loss"] is None and "NaN" not in path.read_text()
    assert last_attempt(path) == 2 and last_attempt(tmp_path / "missing.jsonl") == 0
    assert EventWriter(tmp_path / "other" / "events.jsonl", enabled=False).emit("log", step=1)["type"] == "log"
    assert not (tmp_path / "other").exists()                         # a rank other than 0 writes nothing


def test_a_file_without_attempt_numbers_reads_by_the_loading_model_message(tmp_path):
    path = tmp_path / "events.jsonl"
    write_lines(path, [{"type": "info", "time": 1, "message": "Loading model a ..."},
                       {"type": "start", "time": 2, "step": 0, "max_steps": 8},
                       {"type": "end", "time": 3, "step": 8, "max_steps": 8, "message": "Done"},
                       {"type": "info", "time": 4, "message": "Loading model a ..."},
                       {"type": "start", "time": 5, "step": 4, "max_steps": 8}])
    p = progress(read_all_events(path))
    assert (p.attempt, p.phase, p.step, p.terminal) == (2, "training", 4, None)
    assert [e["time"] for e in ev.latest_attempt(read_all_events(path))] == [4, 5]
    assert last_attempt(path) == 2
    EventWriter(path).begin("Loading model a ...")                  # the next attempt continues the count
    p = progress(read_all_events(path))
    assert (p.attempt, p.phase, p.step) == (3, "loading", 0)


def test_progress_phases_old_and_new_names_and_the_kill_clock_stretch():
    def run(rows):
        p = ev.Progress()
        return [(p.apply(r), p.phase, p.clock_since) for r in rows][-1], p

    # today's names: the phases after training share one kill-clock stretch
    (_, phase, clock), p = run([
        {"type": "info", "time": 1, "attempt": 1, "phase": "loading", "message": "Loading model"},
        {"type": "start", "time": 2, "attempt": 1, "phase": "training", "step": 0, "max_steps": 10},
        {"type": "info", "time": 3, "attempt": 1, "phase": "checkpoint", "step": 5, "save": True},
        {"type": "log", "time": 4, "attempt": 1, "step": 5, "loss": 1.0},       # its own loss point: still saving
        {"type": "save", "time": 5, "attempt": 1, "step": 5},                   # written: training again
        {"type": "info", "time": 6, "attempt": 1, "phase": "saving", "message": "Training ended"},
        {"type": "info", "time": 7, "attempt": 1, "phase": "evaluating", "message": "..."},
        {"type": "info", "time": 8, "attempt": 1, "phase": "baseline", "message": "..."}])
    assert (phase, clock, p.phase_since) == ("baseline", 6, 8)
    assert not ev.kill_clock_runs(phase) and ev.after_training(phase) and p.loss == 1.0

    # the names train.py wrote before: "evaluating" while training is a checkpoint, "finishing" is saving
    old = [{"type": "start", "time": 2, "step": 0},
           {"type": "info", "time": 3, "phase": "evaluating", "step": 5, "evaluate": True, "save": False}]
    assert run(old)[0][1] == "checkpoint"
    assert run(old + [{"type": "eval", "time": 4, "step": 5, "eval_loss": 0.5}])[0][1] == "training"
    assert run(old + [{"type": "log", "time": 4, "step": 6, "loss": 0.5}])[0][1] == "training"
    assert run(old + [{"type": "info", "time": 5, "phase": "finishing"}])[0][1:] == ("saving", 5)
    assert run(old + [{"type": "error", "time": 5, "message": "x"}])[0][1] == "error"

    # a second attempt starts over and says so once
    p = ev.Progress()
    assert not p.apply({"type": "info", "time": 1, "attempt": 1, "phase": "loading"})
    p.apply({"type": "end", "time": 2, "attempt": 1, "message": "Done"})
    assert p.ended and p.eta_seconds == 0
    assert p.apply({"type": "info", "time": 3, "attempt": 2, "phase": "loading"})
    assert (p.attempt, p.phase, p.terminal, p.events) == (2, "loading", None, 1)


def test_progress_values_for_the_train_tab():
    p = progress([{"type": "info", "time": 1, "message": "Trainable: 10 of 100", "trainable_params": 10},
                  {"type": "log", "time": 10, "step": 3, "max_steps": 9, "epoch": 0.5, "eta_seconds": 20.0,
                   "loss": 0.7},
                  {"type": "eval", "time": 11, "step": 3, "eval_loss": 0.6, "eval_accuracy": 0.8,
                   "eval_runtime": 1.2, "eval_model_preparation_time": 0.1}])
    assert (p.step, p.max_steps, p.epoch, p.loss, p.eval_loss) == (3, 9, 0.5, 0.7, 0.6)
    assert p.eval_metrics == {"loss": 0.6, "accuracy": 0.8}                   # timings are not scores
    assert p.trainable == "Trainable: 10 of 100" and p.in_training_loop is False
    assert p.remaining_seconds(now=15.0) == 15.0


def test_format_event_one_line_per_event():
    assert format_event({"type": "log", "step": 3, "max_steps": 9, "epoch": 0.5, "loss": 0.71234,
                         "learning_rate": 2e-5, "eta_seconds": 12.4}) == \
        "step 3/9  epoch 0.50  loss 0.7123  lr 2.00e-05  eta 12s"
    assert format_event({"type": "log", "step": 1, "max_steps": 9, "loss": None}).startswith(
        "step 1/9  epoch 0.00  loss nan")
    assert format_event({"type": "eval", "step": 3, "eval_loss": 0.5, "eval_f1_weighted": 0.25, "eval_runtime": 3.0,
                         "eval_model_preparation_time": 0.1}) == "eval @ step 3: loss 0.5000  f1_weighted 0.2500"
    assert format_event({"type": "start", "max_steps": 9, "num_train_epochs": 3.0}) == \
        "training started: 9 steps, 3.0 epochs"
    assert format_event({"type": "save", "message": "checkpoint-3"}) == "saved checkpoint-3"
    assert format_event({"type": "info", "message": "hello"}) == "[info] hello"
    assert format_event({"type": "error", "message": "boom"}) == "[error] boom"
    assert format_event({"type": "info"}) is None and format_event({"type": "unknown"}) is None
    stamped = format_event({"type": "end", "time": 0.0, "message": "Done"}, stamp=True)
    assert stamped.endswith("  [end] Done") and len(stamped.split("  ")[0]) == 8      # HH:MM:SS
