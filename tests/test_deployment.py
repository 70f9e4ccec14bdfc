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


# ---------------------------------------------------------------------------------------------
# docker/entrypoint.sh: persistent storage and demo mode on a Space

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
SHOW_ENV = [sys.executable, "-c", "import os; print(os.environ['FINETUNE_HOME']); "
                                  "print(os.environ.get('FINETUNE_DEMO_MODE', '<unset>'))"]


def entrypoint(env_extra: dict, tmp_path) -> list[str]:
    """Run the entrypoint with a command (it execs it instead of the app); returns its two lines."""
    import os
    import shutil
    import subprocess

    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh on this machine")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FINETUNE_HOME", "FINETUNE_DEMO_MODE", "SPACE_ID", "FINETUNE_DATA_DIR")}
    env.update(HOME=str(tmp_path / "home"), **env_extra)
    out = subprocess.run([sh, str(ENTRYPOINT), *SHOW_ENV], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_entrypoint_uses_the_persistent_volume_when_it_is_writable(tmp_path):
    volume = tmp_path / "data"
    volume.mkdir()
    home, demo = entrypoint({"FINETUNE_DATA_DIR": str(volume)}, tmp_path)
    assert home == str(volume / "finetune_lab") and (volume / "finetune_lab").is_dir()
    assert demo == "<unset>"                                  # not a Space: no demo mode
    not_a_dir = tmp_path / "data-file"                       # no usable volume: the home cache instead
    not_a_dir.write_text("")
    home, _ = entrypoint({"FINETUNE_DATA_DIR": str(not_a_dir)}, tmp_path)
    assert home == str(tmp_path / "home" / ".cache" / "finetune_lab")


def test_entrypoint_turns_demo_mode_on_for_a_space_unless_opted_out(tmp_path):
    no_volume = {"FINETUNE_DATA_DIR": str(tmp_path / "none")}
    assert entrypoint({**no_volume, "SPACE_ID": "someone/finetune-lab"}, tmp_path)[1] == "1"
    assert entrypoint({**no_volume, "SPACE_ID": "someone/finetune-lab", "FINETUNE_DEMO_MODE": "0"},
                      tmp_path)[1] == "0"
    assert entrypoint({**no_volume, "SPACE_ID": ""}, tmp_path)[1] == "<unset>"


def test_app_turns_demo_mode_on_for_a_space_unless_opted_out():
    from finetune_core.ui import apply_space_defaults

    env = {"SPACE_ID": "someone/finetune-lab"}
    assert apply_space_defaults(env) and env["FINETUNE_DEMO_MODE"] == "1"
    env = {"SPACE_ID": "someone/finetune-lab", "FINETUNE_DEMO_MODE": "0"}
    assert not apply_space_defaults(env) and env["FINETUNE_DEMO_MODE"] == "0"
    env = {}
    assert not apply_space_defaults(env) and "FINETUNE_DEMO_MODE" not in env
    assert "apply_space_defaults()" in (REPO / "app.py").read_text()      # before build_app()


# ---------------------------------------------------------------------------------------------
# the README front matter: what Hugging Face reads to build the Space


def front_matter() -> dict:
    import yaml

    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "README.md must start with the Spaces front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_readme_front_matter_is_a_valid_docker_space():
    meta = front_matter()
    assert meta["sdk"] == "docker" and meta["app_port"] == 7860
    assert meta["title"] and isinstance(meta["title"], str)
    assert meta["emoji"] and len(meta["emoji"]) <= 2
    # Hugging Face refuses a short_description longer than 60 characters
    assert 0 < len(meta["short_description"]) <= 60, meta["short_description"]
