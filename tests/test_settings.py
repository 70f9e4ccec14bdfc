"""settings.py: every FINETUNE_* variable read on use, documented once (and in the README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from finetune_core import settings
from finetune_core.settings import SettingError

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "finetune_core"
# Files that still read the environment themselves; the integration of issue #13 moves them onto settings.
NOT_YET_ON_SETTINGS: set[str] = set()


def engine_sources() -> dict[str, str]:
    return {p.relative_to(ENGINE).as_posix(): p.read_text(encoding="utf-8") for p in ENGINE.rglob("*.py")}


def test_every_variable_is_in_the_settings_table_and_the_readme():
    named = set()
    for name, text in engine_sources().items():
        if name != "settings.py":
            named |= set(re.findall(r"FINETUNE_[A-Z_]+[A-Z]", text))
    table = settings.__doc__
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert named and {v for v in named if f"| {v} " not in table} == set()
    assert {v for v in named if f"`{v}" not in readme} == set()


def test_only_settings_reads_the_finetune_variables():
    reads = re.compile(r"environ(?:\.get\(|\[)\s*[\"']FINETUNE_|getenv\([\"']FINETUNE_")
    readers = {name for name, text in engine_sources().items() if reads.search(text)}
    assert readers - NOT_YET_ON_SETTINGS == {"settings.py"}


def test_values_are_read_on_use(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    monkeypatch.delenv("FINETUNE_MODEL_CACHE", raising=False)
    assert settings.home() == tmp_path and settings.model_cache() == tmp_path / "models"
    monkeypatch.setenv("FINETUNE_STOP_TIMEOUT", "5")
    monkeypatch.setenv("FINETUNE_FINISH_TIMEOUT", "-1")             # not positive: the default
    assert (settings.stop_timeout(), settings.finish_timeout()) == (5.0, settings.DEFAULT_FINISH_TIMEOUT)
    monkeypatch.setenv("FINETUNE_MAX_QUEUED_PER_SESSION", "many")  # not a number: the default
    assert settings.max_queued_per_session() == settings.DEFAULT_QUEUED_PER_SESSION
    monkeypatch.setenv("FINETUNE_LAUNCHER", "accelerate launch --config_file 'my dir/x.yaml'")
    assert settings.launcher() == ["accelerate", "launch", "--config_file", "my dir/x.yaml"]
    monkeypatch.setenv("FINETUNE_PRIVATE_RUNS", "no")
    assert settings.private_runs() is False
    monkeypatch.delenv("FINETUNE_PRIVATE_RUNS")
    assert settings.private_runs() is None
    monkeypatch.setenv("FINETUNE_PUSH_NAMESPACE", " /my-org/ ")
    assert settings.push_namespace() == "my-org"
    assert settings.hugepages({"FINETUNE_HUGEPAGES": "1"}) is True and settings.hugepages({}) is False
    assert settings.hugepages({"FINETUNE_HUGEPAGES": "0"}) is False


def test_a_limit_that_is_not_a_positive_number_is_refused(monkeypatch):
    monkeypatch.setenv("FINETUNE_MAX_ROWS", "lots")
    with pytest.raises(SettingError, match="FINETUNE_MAX_ROWS='lots' is not a number"):
        settings.row_limit()
    monkeypatch.setenv("FINETUNE_MAX_ROWS", "0")
    with pytest.raises(SettingError, match="must be positive"):
        settings.row_limit()
    monkeypatch.setenv("FINETUNE_MAX_ROWS", "1e3")
    assert settings.row_limit() == 1000


def test_a_space_starts_in_demo_mode_unless_told_otherwise():
    env = {"SPACE_ID": "me/app"}
    assert settings.apply_space_defaults(env) and env["FINETUNE_DEMO_MODE"] == "1"
    env = {"SPACE_ID": "me/app", "FINETUNE_DEMO_MODE": "0"}
    assert not settings.apply_space_defaults(env) and env["FINETUNE_DEMO_MODE"] == "0"
    env = {}
    assert not settings.apply_space_defaults(env) and "FINETUNE_DEMO_MODE" not in env
