"""Security and public-deployment limits.

- no remote code: the package never passes trust_remote_code=True; any torch.load is weights_only=True;
- model references: a hub id, a bundled id, or a folder under the allowed roots (not /etc, not ../..);
- weights are written as safetensors only;
- tokens (HF_TOKEN, training.hub_token) never reach logs, events, run.yaml, cards, metrics, predictions,
  checkpoints or the export zip;
- uploaded file names are sanitised (limits.safe_filename) and stay inside their folder;
- limits from the environment (finetune_core.limits): defaults, demo mode, step and time caps in train().
"""

import re
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import class_rows, write_csv
from finetune_core import limits
from finetune_core.cli import main
from finetune_core.errors import ConfigError, ModelError
from finetune_core.events import read_all_events
from finetune_core.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = sorted((REPO / "finetune_core").rglob("*.py")) + [REPO / "app.py"]
TOKEN_ENV = "hf_PLANTEDenvTOKEN0123456789abcdef"
TOKEN_CFG = "hf_PLANTED2cfgTOKEN0123456789abcdef"
LIMIT_VARS = ("FINETUNE_MAX_UPLOAD_MB", "FINETUNE_MAX_ROWS", "FINETUNE_MAX_STEPS", "FINETUNE_MAX_MINUTES",
              "FINETUNE_MAX_CONCURRENT_JOBS", "FINETUNE_AUTH", "FINETUNE_DEMO_MODE")


def sources():
    for path in PACKAGE_SOURCES:
        if path.exists():
            yield path, path.read_text(encoding="utf-8")


def calls(text: str, name: str):
    """The argument text of every `name(...)` call (balanced parentheses)."""
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[m.end():i - 1]


# ---------------------------------------------------------------------------------------------
# code never runs untrusted code or unpickles untrusted data


def test_trust_remote_code_is_never_enabled():
    for path, text in sources():
        assert not re.search(r"trust_remote_code\s*=\s*(True|1|\"?true)", text), path


def test_every_torch_load_is_weights_only():
    for path, text in sources():
        for args in calls(text, "torch.load"):
            assert re.search(r"weights_only\s*=\s*True", args), f"{path}: torch.load({args})"
        assert "pickle.load" not in text, path


# ---------------------------------------------------------------------------------------------
# model references


@pytest.fixture
def roots(tmp_path, tiny_bert_dir):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(tiny_bert_dir, root / "r1" / "model")
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    return root


@pytest.mark.parametrize("ref", ["/etc/passwd", "/etc", "{root}/../..", "{root}/r1/../../outside", "~/.ssh",
                                 "{root}/link", "../../../../etc"])
def test_model_outside_allowed_roots_is_refused(roots, ref, monkeypatch):
    monkeypatch.chdir(roots)
    with pytest.raises(ModelError) as err:
        resolve_model(ref.format(root=roots), allowed_roots=[roots])
    assert "outside the folders this app may read" in err.value.problem
    assert "bundled model" in err.value.fix


def test_model_inside_allowed_roots_and_ids_are_accepted(roots):
    assert resolve_model(str(roots / "r1" / "model"), allowed_roots=[roots]) == str((roots / "r1" / "model").resolve())
    assert resolve_model("bundled:minilm-l6", allowed_roots=[roots]).endswith("model")
    with pytest.raises(ModelError, match="offline"):        # a hub id is looked up, not read as a path
        resolve_model("someone/some-model", allowed_roots=[roots])


# ---------------------------------------------------------------------------------------------
# a tiny LoRA run with planted tokens, stopped from outside so its checkpoints stay on disk


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("secrets")
    out = tmp / "run"
    config = tmp / "c.yaml"
    config.write_text(yaml.safe_dump({
        "task": "classification", "model": tiny_bert_dir,
        "data": {"train": write_csv(tmp / "train.csv", class_rows(6)), "max_length": 32},
        "strategy": {"name": "lora"}, "output_dir": str(out), "seed": 1,
        "training": {"num_train_epochs": 500, "per_device_train_batch_size": 4, "eval_strategy": "no",
                     "save_strategy": "steps", "save_steps": 1, "logging_steps": 1, "warmup_steps": 0}}))
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", TOKEN_ENV)
    import contextlib
    import io

    buf_out, buf_err, result = io.StringIO(), io.StringIO(), {}

    def run():
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            result["rc"] = main(["train", str(config), "--set", f"training.hub_token={TOKEN_CFG}"])

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "save" for e in read_all_events(out / "events.jsonl")):
        time.sleep(0.01)
    (out / "STOP").write_text("stop")
    thread.join(timeout=300)
    zipped = None
    try:
        from finetune_core.export import zip_model

        zipped = zip_model(out)
    except ImportError:      # the app engineer's module; the run outputs are still checked
        pass
    mp.undo()
    return out, result.get("rc"), buf_out.getvalue() + buf_err.getvalue(), zipped


def test_tokens_never_reach_any_output(planted_run):
    out, rc, printed, zipped = planted_run
    assert rc == 0, printed[-3000:]
    assert (out / "checkpoints").is_dir()                     # stopped: checkpoints (training_args.bin) kept
    checked = []
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for token in (TOKEN_ENV, TOKEN_CFG):
                assert token.encode() not in data, f"token leaked into {path.relative_to(out)}"
            checked.append(path.relative_to(out).as_posix())
    for name in ("run.yaml", "events.jsonl", "metrics.json", "audit.json", "predictions.csv", "model/README.md"):
        assert name in checked, name
    assert any(c.endswith("training_args.bin") for c in checked)
    assert TOKEN_ENV not in printed and TOKEN_CFG not in printed
    assert "hub_token" not in yaml.safe_load((out / "run.yaml").read_text())["training"]
    if zipped is not None:
        with zipfile.ZipFile(zipped) as zf:
            names = zf.namelist()
            assert any(n.endswith("README.md") for n in names)    # the card is shared, so it must be clean
            for name in names:
                body = zf.read(name)
                assert TOKEN_ENV.encode() not in body and TOKEN_CFG.encode() not in body, name


def test_weights_are_safetensors_only(planted_run):
    out = planted_run[0]
    files = [p for p in (out / "model").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    pickles = [p.name for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not pickles, pickles


def test_predictions_csv_escapes_formulas_in_texts_and_labels(tmp_path):
    import csv

    import numpy as np

    from finetune_core.train import safe_csv_cell, write_predictions

    names = ["=HYPERLINK(\"http://x\")", "-1", "ok"]
    texts = ["=cmd|' /C calc'!A0", "@SUM(A1)", "+1+cmd", "-2+3", "\t=1", "-5", "<script>x</script>"]
    probs = np.full((len(texts), 3), 1 / 3)
    write_predictions(tmp_path / "p.csv", texts, [0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 0], probs, names)
    rows = list(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    for row in rows:
        for key in ("text", "true_label", "predicted_label"):
            cell = row[key]
            assert cell[:1] not in ("=", "+", "@", "\t") and not (cell[:1] == "-" and cell != "-5" and cell != "-1")
    assert [r["text"] for r in rows] == [safe_csv_cell(t) for t in texts]
    assert rows[0]["text"] == "'=cmd|' /C calc'!A0" and rows[5]["text"] == "-5"     # numbers stay numbers
    assert rows[6]["text"] == "<script>x</script>"                                     # HTML is just text
    assert rows[0]["true_label"].startswith("'=") and rows[1]["true_label"] == "-1"


# ---------------------------------------------------------------------------------------------
# uploaded file names


@pytest.mark.parametrize("name,expected", [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\win.ini", "win.ini"),
    ("/abs/path/data.csv", "data.csv"),
    ("..", "upload"),
    ("", "upload"),
    (None, "upload"),
    ("CON.csv", "upload_CON.csv"),
    ("my data (1).csv", "my_data_1_.csv"),
    ("naïve résumé.jsonl", "naive_resume.jsonl"),
    (".bashrc", "bashrc"),
    ("a\x00b.csv", "a_b.csv"),
    ("x/../../y.csv", "y.csv"),
])
def test_safe_filename(name, expected, tmp_path):
    safe = limits.safe_filename(name)
    assert safe == expected
    assert (tmp_path / safe).resolve().parent == tmp_path.resolve()


def test_safe_filename_shortens_and_keeps_the_extension():
    safe = limits.safe_filename("a" * 500 + ".csv")
    assert len(safe) <= 100 and safe.endswith(".csv")


# ---------------------------------------------------------------------------------------------
# limits from the environment


@pytest.fixture
def clean_env(monkeypatch):
    for var in LIMIT_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_limit_defaults(clean_env):
    assert limits.max_upload_mb() == 50 and limits.engine_max_bytes() is None
    assert limits.max_rows() is None and limits.max_steps() is None and limits.max_minutes() is None
    assert limits.max_concurrent_jobs() == 1 and limits.auth() is None and not limits.demo_mode()


def test_demo_mode_sets_safe_values_and_explicit_variables_win(clean_env):
    clean_env.setenv("FINETUNE_DEMO_MODE", "1")
    assert (limits.max_upload_mb(), limits.max_rows(), limits.max_steps(), limits.max_minutes(),
            limits.max_concurrent_jobs()) == (10, 5000, 300, 15, 1)
    assert limits.engine_max_bytes() == 10_000_000
    clean_env.setenv("FINETUNE_MAX_ROWS", "200")
    assert limits.max_rows() == 200


def test_auth_and_bad_values(clean_env):
    clean_env.setenv("FINETUNE_AUTH", "teacher:s3cret:with-colon")
    assert limits.auth() == ("teacher", "s3cret:with-colon")
    assert limits.summary()["auth"] is True and "s3cret" not in str(limits.summary())
    clean_env.setenv("FINETUNE_AUTH", "nopassword")
    with pytest.raises(ConfigError, match="user:password"):
        limits.auth()
    clean_env.setenv("FINETUNE_MAX_STEPS", "-5")
    with pytest.raises(ConfigError, match="FINETUNE_MAX_STEPS"):
        limits.max_steps()


def test_demo_mode_refuses_a_big_upload_in_the_engine(clean_env, tmp_path):
    from finetune_core.data import read_table
    from finetune_core.errors import DataError

    clean_env.setenv("FINETUNE_DEMO_MODE", "1")
    path = tmp_path / "rows.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(5001)))
    with pytest.raises(DataError, match="limit of 5,000 rows"):
        read_table(path)


def limited_run(tmp_path, model, monkeypatch, env: dict, training: dict) -> tuple[dict, list[dict]]:
    import json

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "task": "classification", "model": model, "strategy": {"name": "full"}, "output_dir": str(out),
        "data": {"train": write_csv(tmp_path / "t.csv", class_rows(8)), "max_length": 32},
        "training": {"per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no",
                     "logging_steps": 1, "warmup_steps": 0, **training}}))
    assert main(["train", str(config)]) == 0
    return json.loads((out / "metrics.json").read_text()), read_all_events(out / "events.jsonl")


def test_max_steps_limit_caps_an_epoch_based_run(tmp_path, tiny_bert_dir, clean_env, capsys):
    metrics, events = limited_run(tmp_path, tiny_bert_dir, clean_env, {"FINETUNE_MAX_STEPS": "3"},
                                  {"num_train_epochs": 10})
    assert metrics["global_step"] == metrics["max_steps"] == 3
    assert any("FINETUNE_MAX_STEPS" in e.get("message", "") and "3 of the 50 planned" in e["message"]
               for e in events if e["type"] == "info")


def test_max_minutes_limit_stops_the_run_and_saves(tmp_path, tiny_bert_dir, clean_env, capsys):
    metrics, events = limited_run(tmp_path, tiny_bert_dir, clean_env, {"FINETUNE_MAX_MINUTES": "0.0001"},
                                  {"max_steps": 500})
    assert metrics["global_step"] == 1 and metrics["stopped_by_time_limit"] and metrics["stopped_early"]
    assert any("FINETUNE_MAX_MINUTES" in e.get("message", "") for e in events if e["type"] == "info")
    assert events[-1]["type"] == "end"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
