"""Stop and resume: a STOP file ends a run at the next step with a usable model; `resume: true`
continues from the last complete checkpoint to the same final step, the loss curve continuing in the
same events.jsonl.

No test callback is injected: the STOP file is written from outside the run (another thread or the
test process) once events.jsonl shows the run has reached the wanted point, as the app does.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, class_rows, write_csv
from finetune_core.config import config_from_dict
from finetune_core.events import read_all_events
from finetune_core.rundir import STOP_FILE
from finetune_core.train import _resume_checkpoint, train

# 24 rows -> 19 train / 5 validation; batch 4 -> 5 steps per epoch
TRAINING = {"num_train_epochs": 12, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
            "eval_strategy": "no", "save_strategy": "steps", "save_steps": 3, "save_total_limit": 2,
            "logging_steps": 1, "learning_rate": 5e-3, "warmup_steps": 0, "lr_scheduler_type": "linear",
            "train_sampling_strategy": "random"}


def config(out: Path, model: str, data: str, **extra) -> dict:
    return {"task": "classification", "model": model, "data": {"train": data, "max_length": 32},
            "strategy": {"name": "full"}, "training": dict(TRAINING), "output_dir": str(out), "seed": 3, **extra}


def quiet_train(values: dict) -> dict:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return train(config_from_dict(values))


def stop_when(out: Path, predicate, timeout: float = 120) -> None:
    """Write output_dir/STOP as soon as an event matching `predicate` is in events.jsonl."""
    deadline = time.time() + timeout
    events = out / "events.jsonl"
    while time.time() < deadline:
        if events.exists() and any(predicate(e) for e in read_all_events(events)):
            (out / STOP_FILE).write_text("stop\n")
            return
        time.sleep(0.005)
    raise AssertionError("the run never reached the point to stop at")


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["type"] == "log"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("resume") / "train.csv", class_rows(8))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert_dir, data):
    out = tmp_path_factory.mktemp("full") / "run"
    metrics = quiet_train(config(out, tiny_bert_dir, data))
    return metrics, read_all_events(out / "events.jsonl")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_bert_dir, data):
    """A run stopped from outside right after its first checkpoint."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    result = {}
    thread = threading.Thread(target=lambda: result.update(m=quiet_train(config(out, tiny_bert_dir, data))))
    thread.start()
    stop_when(out, lambda e: e["type"] == "save")
    thread.join(timeout=300)
    return out, result["m"]


def test_stop_file_ends_the_run_with_outputs(stopped, uninterrupted):
    out, metrics = stopped
    assert metrics["stopped_by_user"] and metrics["stopped_early"]
    assert 3 <= metrics["global_step"] < uninterrupted[0]["global_step"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["stopped_by_user"] is True and "accuracy" in saved
    assert (out / "model" / "model.safetensors").is_file()
    # the checkpoint written at the stop is complete and is the one a resume picks
    latest = _resume_checkpoint(out / "checkpoints")
    assert latest and latest.endswith(f"checkpoint-{metrics['global_step']}")
    events = read_all_events(out / "events.jsonl")
    assert events[-1]["type"] == "end"


def test_resume_deletes_broken_checkpoints_before_rotation(stopped, tmp_path, tiny_bert_dir, data, monkeypatch):
    """A half-written checkpoint-999 left by a crash is the newest folder: save_total_limit's rotation
    (2 here) would keep it and delete the good checkpoint the run resumed from. Resume deletes it
    first, so after every rotation the checkpoints kept are complete ones."""
    import shutil

    import transformers.trainer as hf_trainer

    from finetune_core.train import _checkpoint_complete

    out = tmp_path / "run"
    shutil.copytree(stopped[0], out)
    broken = out / "checkpoints" / "checkpoint-999"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    (broken / "trainer_state.json").write_text('{"global_step": 99')
    (out / STOP_FILE).unlink(missing_ok=True)
    real, kept = hf_trainer.rotate_checkpoints, []

    def rotate(*args, **kwargs):
        real(*args, **kwargs)
        kept.append({c.name: _checkpoint_complete(c) for c in (out / "checkpoints").glob("checkpoint-*")})

    monkeypatch.setattr(hf_trainer, "rotate_checkpoints", rotate)
    metrics = quiet_train(config(out, tiny_bert_dir, data, resume=True))
    assert metrics["global_step"] == metrics["max_steps"]
    assert kept, "no checkpoint was saved after the resume"
    for listing in kept:
        assert "checkpoint-999" not in listing and len(listing) == TRAINING["save_total_limit"], listing
        assert all(listing.values()), listing
    # the first rotation after the resume kept the checkpoint it resumed from
    assert f"checkpoint-{stopped[1]['global_step']}" in kept[0]


def test_resume_reaches_the_same_step_and_continues_the_curve(stopped, uninterrupted, tiny_bert_dir, data):
    out, first = stopped
    full_metrics, full_events = uninterrupted
    before = read_all_events(out / "events.jsonl")
    # a half-written newer checkpoint (crash while saving) must be skipped
    broken = out / "checkpoints" / "checkpoint-999"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    (broken / "trainer_state.json").write_text('{"global_step": 99')
    # the STOP that ended the first run, left behind (written before this process, like a real resume's)
    (out / STOP_FILE).write_text("left over from the stop\n")
    os.utime(out / STOP_FILE, (1_000_000_000, 1_000_000_000))

    metrics = quiet_train(config(out, tiny_bert_dir, data, resume=True))

    assert metrics["global_step"] == full_metrics["global_step"] == metrics["max_steps"]
    assert not metrics["stopped_early"]
    events = read_all_events(out / "events.jsonl")
    assert events[:len(before)] == before                        # appended, not rewritten
    resumed = events[len(before):]
    starts = [e for e in resumed if e["type"] == "start"]
    assert len(starts) == 1 and starts[0]["step"] == first["global_step"]
    steps = sorted(losses(resumed))
    assert steps[0] == first["global_step"] + 1 and steps[-1] == full_metrics["global_step"]
    assert steps == list(range(steps[0], steps[-1] + 1))
    # the curve continues where it stopped: the same losses as the uninterrupted run, step for step
    full, again = losses(full_events), losses(resumed)
    for step in steps:
        assert again[step] == pytest.approx(full[step], rel=1e-3, abs=1e-4), step
    assert not (out / "checkpoints").exists()                    # finished: optimizer state dropped


def test_stop_file_through_the_cli_process(tmp_path, tiny_bert_dir, data):
    """`python -m finetune_core train` stopped by a STOP file exits 0 with a model that loads."""
    out = tmp_path / "run"
    values = config(out, tiny_bert_dir, data)
    values["training"].update(num_train_epochs=1000, save_strategy="no")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune_core", "train", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stop_when(out, lambda e: e["type"] == "log")
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_by_user"] and metrics["global_step"] < metrics["max_steps"]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    logits = model(**tok(["goal match team"], return_tensors="pt")).logits
    assert logits.shape == (1, len(metrics["labels"]))
    assert (out / "checkpoints").is_dir()                         # kept, so the run can be resumed
