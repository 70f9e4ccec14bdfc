"""The same train() under torchrun: 2 CPU processes (gloo), rank 0 alone writes the outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "finetune_core", "train",
           "examples/configs/classification_full.yaml", "--set", f"output_dir={out}",
           "--set", "training.max_steps=3", "--set", "training.eval_strategy=no",
           "--set", "training.save_strategy=no"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("end") == 1          # rank 1 wrote nothing
    assert [e["type"] for e in events].count("start") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == 3
    assert (out / "model" / "model.safetensors").exists()
    assert proc.stdout.count("Results (validation):") == 1        # one report, from rank 0


# ---------------------------------------------------------------------------------------------
# stopping together: rank 0 decides, every rank follows (ranks stopping at different steps would
# wait forever for each other in the gradient all-reduce)

DECIDE = r'''
import json, sys, time
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerControl, TrainerState

from finetune_core.events import EventWriter
from finetune_core.limits import time_limit_callback
from finetune_core.trainer import EventsCallback

dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(sys.argv[1])
state = TrainerState(global_step=5, max_steps=100, is_world_process_zero=rank == 0)


def step_end(callback) -> bool:
    control = TrainerControl()
    callback.on_step_end(None, state, control)
    return control.should_training_stop


writer = EventWriter(out / "events.jsonl", enabled=rank == 0)
# each rank looks at its own file, and only rank 0's exists: only rank 0 sees a stop request
(out / "STOP-0").write_text("stop")
stop_file = EventsCallback(writer, stop_file=out / f"STOP-{rank}")
# rank 0's time limit has passed, rank 1's has not: only rank 0's clock says stop
time_limit = time_limit_callback(time.time() + (-1 if rank == 0 else 3600), writer, 1.0)
quiet = EventsCallback(writer, stop_file=out / "never")
result = {"stop_file": step_end(stop_file), "time_limit": step_end(time_limit), "nothing": step_end(quiet),
          "stopped_by_user": stop_file.stopped_by_user, "triggered": time_limit.triggered}
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
'''


def test_rank0_decides_the_stop_for_every_rank(tmp_path):
    script = tmp_path / "decide.py"
    script.write_text(DECIDE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result == {"stop_file": True, "time_limit": True, "nothing": False, "stopped_by_user": True,
                          "triggered": True}, (rank, result)
    # rank 0 alone writes events: one "saving" phase event (the Trainer stopped), one time-limit message
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e.get("phase") for e in events].count("saving") == 1
    assert sum("FINETUNE_MAX_MINUTES" in e.get("message", "") for e in events) == 1


@pytest.mark.slow
def test_torchrun_stop_file_ends_every_rank_at_the_same_step(tmp_path, tiny_bert_dir):
    """A STOP written mid-run (as the app does) ends both ranks at one step: no hang, one end event,
    and the stop's checkpoint holds both ranks' RNG states at the step metrics.json reports."""
    import time

    import yaml

    from conftest import class_rows, write_csv

    out = tmp_path / "run"
    config = {"task": "classification", "model": tiny_bert_dir,
              "data": {"train": write_csv(tmp_path / "train.csv", class_rows(8)), "max_length": 32},
              "strategy": {"name": "full"}, "output_dir": str(out),
              "training": {"max_steps": 100000, "per_device_train_batch_size": 2, "logging_steps": 1,
                           "eval_strategy": "no", "save_strategy": "no", "warmup_steps": 0,
                           "train_sampling_strategy": "random"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "finetune_core",
                             "train", str(tmp_path / "c.yaml")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            events = out / "events.jsonl"
            if events.exists() and events.read_text().count('"type": "log"') >= 3:
                (out / "STOP").write_text("stop\n")
                break
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=240)      # a hang (ranks at different steps) times out here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("end") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_by_user"] and metrics["world_size"] == 2
    step = metrics["global_step"]
    assert 3 <= step < 100000
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == [checkpoint.name]
    assert (out / "model" / "model.safetensors").is_file()
