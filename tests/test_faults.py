"""Faults during training: a full disk (torch.save / safetensors raising ENOSPC, or torch's own
"file write failed"), running out of memory in a step. Each gives a clear message (FinetuneError; the
CLI exits 2 without a traceback), the checkpoints written before stay complete, a checkpoint cut off
by the fault is never taken for the latest one, and `resume: true` finishes the run afterwards.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from conftest import class_rows, write_csv
from finetune_core.cli import main
from finetune_core.events import read_all_events
from finetune_core.checkpoints import checkpoint_complete, resume_checkpoint

# 24 rows -> 19 train; batch 4; a checkpoint every 2 steps
TRAINING = {"max_steps": 6, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
            "eval_strategy": "no", "save_strategy": "steps", "save_steps": 2, "save_total_limit": 3,
            "logging_steps": 1, "learning_rate": 5e-3, "warmup_steps": 0, "train_sampling_strategy": "random"}
ENOSPC = OSError(28, "No space left on device")
TORCH_WRITE_FAILED = RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing "
                                  "file data/0: file write failed")


def write_config(tmp: Path, model: str, **extra) -> tuple[str, Path]:
    out = tmp / "run"
    values = {"task": "classification", "model": model,
              "data": {"train": write_csv(tmp / "train.csv", class_rows(8)), "max_length": 32},
              "strategy": {"name": "full"}, "training": TRAINING, "output_dir": str(out), "seed": 1, **extra}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path), out


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return rc, captured.err


def assert_refused(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert err.startswith("Error: ") and "unexpected" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def assert_checkpoints_sound(out: Path, expected_latest: int) -> None:
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert ckpts, "earlier checkpoints were lost"
    assert all(checkpoint_complete(c) for c in ckpts), [c.name for c in ckpts]   # nothing half-written left
    assert resume_checkpoint(out / "checkpoints").endswith(f"checkpoint-{expected_latest}")


@pytest.mark.parametrize("error", [ENOSPC, TORCH_WRITE_FAILED], ids=["ENOSPC", "torch-write-failed"])
def test_disk_full_while_checkpointing(tmp_path, tiny_bert_dir, capsys, monkeypatch, error):
    config, out = write_config(tmp_path, tiny_bert_dir)
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            Path(str(f)).write_bytes(b"\x00" * 10)          # what a full disk leaves: a truncated file
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    rc, err = run_cli(["train", config], capsys)
    assert_refused(rc, err, "The disk is full", "Free disk space", "resume: true")
    assert_checkpoints_sound(out, 2)
    events = read_all_events(out / "events.jsonl")
    assert events[-1]["type"] == "error" and "disk is full" in events[-1]["message"]

    # space freed: resume finishes the run from checkpoint-2
    monkeypatch.setattr(torch, "save", real_save)
    rc, err = run_cli(["train", config, "--set", "resume=true"], capsys)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6
    resumed = [e for e in read_all_events(out / "events.jsonl") if e["type"] == "start"]
    assert resumed[-1]["step"] == 2


def test_disk_full_while_saving_the_final_model(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    import transformers.modeling_utils as mu

    config, out = write_config(tmp_path, tiny_bert_dir)
    real = mu.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if ".model.tmp" in str(filename):
            Path(filename).write_bytes(b"\x00" * 10)
            raise ENOSPC
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    rc, err = run_cli(["train", config], capsys)
    assert_refused(rc, err, "The disk is full", "resume: true")
    assert not (out / ".model.tmp").exists() and not (out / "model").exists()   # no half model
    # The checkpoints survive for a resume. A finished run writes no checkpoint at its last step (model/
    # holds those weights), so a resume after this failure continues from checkpoint-4.
    assert_checkpoints_sound(out, 4)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()], ids=["torch-oom", "MemoryError"])
def test_out_of_memory_in_a_step(tmp_path, tiny_bert_dir, capsys, monkeypatch, error):
    config, out = write_config(tmp_path, tiny_bert_dir)
    real_step = transformers.Trainer.training_step
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                                  # after checkpoint-2
            raise error
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", step)
    rc, err = run_cli(["train", config], capsys)
    assert_refused(rc, err, "ran out of memory", "per_device_train_batch_size", "resume: true")
    assert_checkpoints_sound(out, 2)


def test_resume_only_picks_complete_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert resume_checkpoint(ckpts) is None                 # no folder yet

    def fake(step: int, state: str | None = '{"global_step": %d}', weights: bytes = b"w" * 16) -> Path:
        c = ckpts / f"checkpoint-{step}"
        c.mkdir(parents=True)
        if state is not None:
            (c / "trainer_state.json").write_text(state % step if "%d" in state else state)
        if weights is not None:
            (c / "model.safetensors").write_bytes(weights)
        return c

    fake(2)
    fake(10)
    assert resume_checkpoint(ckpts).endswith("checkpoint-10")   # numeric order, not "10" < "2"
    fake(12, state=None)                                     # cut off before trainer_state.json
    fake(14, state='{"global_step": 1')                       # trainer_state.json itself truncated
    fake(16, weights=b"")                                    # weights file empty
    fake(18, weights=None)                                   # no weights at all
    (ckpts / "checkpoint-tmp").mkdir()                       # not a step number
    assert resume_checkpoint(ckpts).endswith("checkpoint-10")
    assert not any(checkpoint_complete(ckpts / f"checkpoint-{s}") for s in (12, 14, 16, 18))
