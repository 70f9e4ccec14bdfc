"""Deployment settings: FINETUNE_LAUNCHER (torchrun / accelerate launch jobs) and demo mode for public Spaces."""

import json
import sys
from pathlib import Path

import pytest

from finetune_core.jobs import JobManager, worker_command

REPO = Path(__file__).resolve().parents[1]


def test_worker_command_plain_and_launcher(monkeypatch):
    monkeypatch.delenv("FINETUNE_LAUNCHER", raising=False)
    assert worker_command("/py", "r.yaml") == ["/py", "-m", "finetune_core", "train", "r.yaml"]
    monkeypatch.setenv("FINETUNE_LAUNCHER", "accelerate launch --config_file 'my dir/ddp.yaml'")
    assert worker_command("/py", "r.yaml") == ["accelerate", "launch", "--config_file", "my dir/ddp.yaml",
                                               "-m", "finetune_core", "train", "r.yaml"]


@pytest.mark.slow
def test_job_through_torchrun_launcher_trains_on_two_processes(tmp_path, monkeypatch):
    torchrun = Path(sys.executable).with_name("torchrun")
    monkeypatch.setenv("FINETUNE_LAUNCHER", f"{torchrun} --standalone --nproc_per_node 2")
    manager = JobManager(tmp_path / "runs", max_concurrent=1, poll_interval=0.2, cwd=REPO)
    try:
        config = {"task": "classification", "model": "bundled:minilm-l6",
                  "data": {"train": str(REPO / "examples/data/domains.csv"), "max_length": 64},
                  "strategy": {"name": "frozen"},
                  "training": {"max_steps": 2, "eval_strategy": "no", "save_strategy": "no"}}
        job = manager.submit(config, owner="alice")
        assert manager.wait(job.run_id, timeout=300) == "finished", (job.error, job.error_lines)
        metrics = json.loads((job.run_dir / "metrics.json").read_text())
        assert metrics["world_size"] == 2
        events = [json.loads(x) for x in (job.run_dir / "events.jsonl").read_text().splitlines()]
        assert [e["type"] for e in events].count("end") == 1
        assert "torchrun" in (job.run_dir / "worker.log").read_text().splitlines()[0]
    finally:
        manager.shutdown(kill=True)


def test_demo_mode_hides_push_to_hub_unless_a_token_is_configured(monkeypatch):
    from finetune_core.ui.export_tab import push_allowed

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("FINETUNE_DEMO_MODE", raising=False)
    assert push_allowed()
    monkeypatch.setenv("FINETUNE_DEMO_MODE", "1")
    assert not push_allowed()
    monkeypatch.setenv("HF_TOKEN", "hf_configured_by_the_space_owner")
    assert push_allowed()


def test_runs_are_private_in_demo_mode_and_shared_on_a_laptop(monkeypatch, tmp_path):
    from finetune_core.jobs import JobManager

    monkeypatch.delenv("FINETUNE_PRIVATE_RUNS", raising=False)
    monkeypatch.delenv("FINETUNE_DEMO_MODE", raising=False)
    assert JobManager(tmp_path / "a").private_runs is False
    monkeypatch.setenv("FINETUNE_DEMO_MODE", "1")
    assert JobManager(tmp_path / "b").private_runs is True
    monkeypatch.setenv("FINETUNE_PRIVATE_RUNS", "0")          # an explicit setting wins
    assert JobManager(tmp_path / "c").private_runs is False
