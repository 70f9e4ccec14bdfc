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
