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


def test_stopped_by_user_is_not_called_early_stopping():
    html = status_html(ST | {"status": "stopped"}, Progress(), BASE | {"stopped_early": True, "stopped_by_user": True})
    assert "Stopped by you" in html and "Finished early" not in html
