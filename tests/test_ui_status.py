"""The Train tab's status line says how a run ended: early stopping, a time limit, a user's Stop."""

from finetune_core.ui.train_tab import Progress, status_html

ST = {"run_id": "abc123", "name": "cls-lora", "status": "finished"}
BASE = {"task": "classification", "f1_weighted": 0.9, "accuracy": 0.9, "global_step": 40, "max_steps": 60,
        "train_seconds": 12.0}


def test_early_stopping_is_named_with_its_step():
    html = status_html(ST, Progress(), BASE | {"stopped_early": True, "stopped_by_user": False})
    assert "✅ Finished: <b>cls-lora</b>" in html       # the browser test reads the run name from here
    assert "Finished early at step 40 of 60" in html and "best checkpoint was kept" in html


def test_time_limit_and_plain_finish():
    limited = status_html(ST, Progress(), BASE | {"stopped_early": True, "stopped_by_time_limit": True})
    assert "step 40 of 60 by this deployment's time limit" in limited and "Finished early" not in limited
    plain = status_html(ST, Progress(), BASE | {"stopped_early": False})
    assert "✅ Finished:" in plain and "early" not in plain


def test_the_result_says_the_training_loop_and_the_whole_run():
    html = status_html(ST, Progress(), BASE | {"stopped_early": False, "total_seconds": 31.0})
    assert "trained in 12 s, whole run 31 s" in html


def test_stopped_by_user_is_not_called_early_stopping():
    html = status_html(ST | {"status": "stopped"}, Progress(), BASE | {"stopped_early": True, "stopped_by_user": True})
    assert "Stopped by you" in html and "Finished early" not in html


def _fed(events) -> Progress:
    prog = Progress()
    for e in events:
        prog.state.apply(e)
    prog.events.extend(events)
    return prog


def test_each_phase_after_training_is_named_with_its_own_progress():
    running = ST | {"status": "running"}
    loop = [{"type": "info", "phase": "loading", "attempt": 1, "time": 1.0, "message": "Loading model x ..."},
            {"type": "start", "attempt": 1, "time": 2.0, "step": 0, "max_steps": 10},
            {"type": "log", "attempt": 1, "time": 3.0, "step": 5, "max_steps": 10, "loss": 1.0, "eta_seconds": 4}]
    training = status_html(running, _fed(loop))
    assert "🏃 Training" in training and "width:50.0%" in training and "ETA" in training
    after = loop + [{"type": "info", "phase": "saving", "attempt": 1, "time": 4.0, "message": "saving"},
                    {"type": "info", "phase": "generating", "attempt": 1, "time": 5.0, "done": 3, "total": 12,
                     "message": "Answering the held-out prompts"}]
    generating = status_html(running, _fed(after))
    assert "Answering the held-out prompts (3/12)" in generating and "width:25.0%" in generating
    assert "ETA" not in generating                        # the training ETA means nothing after training
    baseline = status_html(running, _fed(after + [{"type": "info", "phase": "baseline", "attempt": 1,
                                                   "time": 6.0, "message": "Measuring the base model"}]))
    assert "Measuring the base model for comparison" in baseline and "width:100.0%" in baseline
