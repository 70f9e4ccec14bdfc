"""Security and public-deployment limits.

- no remote code: the package never passes trust_remote_code=True; any torch.load is weights_only=True;
- model references: a hub id, a bundled id, or a folder under the allowed roots (not /etc, not ../..);
- weights are written as safetensors only;
- tokens (HF_TOKEN, training.hub_token) never reach logs, events, run.yaml, cards, metrics, predictions,
  checkpoints or the export zip;
- uploaded file names are sanitised (limits.safe_filename) and stay inside their folder;
- limits from the environment (finetune_core.limits): defaults, demo mode, step and time caps in train().
"""

import ast
import json
import os
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import class_rows, page_call, serve, write_csv
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


def remote_code_enabled(text: str) -> list[str]:
    """Every place the code passes trust_remote_code with a value other than the literal False: a keyword
    argument, a dict entry or a subscript assignment holding True, 1, a variable, a setting, anything
    that could turn it on. Read from the syntax tree: text inside strings (the loading code a model card
    shows to the people who receive a model) is not code this project runs."""
    found = []

    def enabled(value) -> bool:
        return not (isinstance(value, ast.Constant) and value.value is False)

    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and enabled(node.value):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Dict):
            found += [f"{ast.unparse(k)}: {ast.unparse(v)}" for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and enabled(v)]
        elif isinstance(node, ast.Assign) and enabled(node.value):
            found += [ast.unparse(t) for t in node.targets if isinstance(t, ast.Subscript)
                      and isinstance(t.slice, ast.Constant) and t.slice.value == "trust_remote_code"]
    return found


def test_trust_remote_code_is_never_enabled():
    for path, text in sources():
        assert not remote_code_enabled(text), f"{path}: {remote_code_enabled(text)}"


@pytest.mark.parametrize("code,flagged", [
    ("f(trust_remote_code=True)", True), ("f(trust_remote_code = 1)", True), ("f(trust_remote_code=flag)", True),
    ("f(trust_remote_code=cfg.trust)", True), ("kw = {'trust_remote_code': True}", True),
    ('kw = {"trust_remote_code": allow}', True), ("kw['trust_remote_code'] = True", True),
    ("f(**dict(trust_remote_code=1))", True), ("f(trust_remote_code=False)", False),
    ("# never passes trust_remote_code", False), ("if trust_remote_code == x:\n    pass", False),
    ('card = "pipeline(m, trust_remote_code=True)"', False),
])
def test_the_remote_code_check_flags_every_value_but_false(code, flagged):
    assert bool(remote_code_enabled(code)) is flagged


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

    from finetune_core.predictions import safe_csv_cell, write_predictions

    names = ["=HYPERLINK(\"http://x\")", "-1", "ok"]
    texts = ["=cmd|' /C calc'!A0", "@SUM(A1)", "+1+cmd", "-2+3", "\t=1", "-5", "<script>x</script>"]
    probs = np.full((len(texts), 3), 1 / 3)
    write_predictions(tmp_path / "p.csv", texts, [0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 0], probs, names)
    with open(tmp_path / "p.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
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


# ---------------------------------------------------------------------------------------------
# push to the Hub: the server's HF_TOKEN is not every visitor's token


def model_run(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"weights")
    (run / "model" / "config.json").write_text("{}")
    return run


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub.HfApi replaced: records the token each push would have used, touches no network."""
    import huggingface_hub

    used = []

    class FakeApi:
        def __init__(self, token=None):
            used.append(token)

        def create_repo(self, repo_id, **kw):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            return None

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN_ENV)
    monkeypatch.delenv("FINETUNE_PUSH_NAMESPACE", raising=False)
    return used


def test_shared_app_never_lends_its_token_without_a_namespace(tmp_path, fake_hub):
    from finetune_core.export import ExportError, push_to_hub

    run = model_run(tmp_path)
    with pytest.raises(ExportError) as err:
        push_to_hub(run, "victim-org/anything", token="", shared=True)
    assert "does not lend its own Hugging Face token" in err.value.problem
    assert "Paste your own token" in err.value.fix and "FINETUNE_PUSH_NAMESPACE" in err.value.fix
    assert fake_hub == []                                        # no Hub call was even prepared
    # a visitor's own token is used, and only it
    assert push_to_hub(run, "visitor/model", token="hf_visitorOWNtoken0123456789abcdef", shared=True)
    assert fake_hub == ["hf_visitorOWNtoken0123456789abcdef"]


def test_shared_app_lends_its_token_only_inside_the_namespace(tmp_path, fake_hub, monkeypatch):
    from finetune_core.export import ExportError, push_to_hub

    run = model_run(tmp_path)
    monkeypatch.setenv("FINETUNE_PUSH_NAMESPACE", "class-2026")
    for outside in ("victim-org/model", "class-2026-other/model", "Class-2026x/model"):
        with pytest.raises(ExportError) as err:
            push_to_hub(run, outside, shared=True)
        assert "may only push to repositories under 'class-2026/'" in err.value.problem
        assert "class-2026/your-model-name" in err.value.fix
    assert fake_hub == []
    assert push_to_hub(run, "class-2026/student-7", shared=True) == "https://huggingface.co/class-2026/student-7"
    assert fake_hub == [TOKEN_ENV]


def test_own_machine_keeps_the_hf_token_fallback(tmp_path, fake_hub):
    from finetune_core.export import push_to_hub

    assert push_to_hub(model_run(tmp_path), "anyone/model", shared=False)
    assert fake_hub == [TOKEN_ENV]


def test_the_export_tab_treats_demo_mode_and_private_runs_as_shared(monkeypatch):
    from types import SimpleNamespace

    from finetune_core.ui.export_tab import shared_deployment, token_placeholder

    monkeypatch.delenv("FINETUNE_DEMO_MODE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN_ENV)
    monkeypatch.delenv("FINETUNE_PUSH_NAMESPACE", raising=False)
    laptop = SimpleNamespace(manager=SimpleNamespace(private_runs=False))
    private = SimpleNamespace(manager=SimpleNamespace(private_runs=True))
    assert not shared_deployment(laptop) and shared_deployment(private)
    assert "leave empty to use HF_TOKEN" in token_placeholder(laptop)
    assert "your own token" in token_placeholder(private) and "HF_TOKEN" not in token_placeholder(private)
    monkeypatch.setenv("FINETUNE_PUSH_NAMESPACE", "class-2026")
    assert "class-2026/" in token_placeholder(private)
    monkeypatch.setenv("FINETUNE_DEMO_MODE", "1")
    assert shared_deployment(laptop)


# ---------------------------------------------------------------------------------------------
# the planted tokens through the app: a LoRA run, zip, merge, a typed token in Export's field


TOKEN_TYPED = "hf_PLANTED3typedTOKEN0123456789abcdef"




@pytest.mark.slow
def test_tokens_never_reach_any_file_of_an_app_run(tmp_path, tiny_bert_dir, monkeypatch):
    import shutil

    from gradio_client import Client, handle_file

    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app

    for var in LIMIT_VARS + ("FINETUNE_PUSH_NAMESPACE",):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN_ENV)
    monkeypatch.setenv("FINETUNE_PRIVATE_RUNS", "1")           # a shared app: the token must not be lent
    monkeypatch.setenv("FINETUNE_WARMUP_DELAY", "0")
    uploads = tmp_path / "gradio-uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    runs = tmp_path / "runs"
    shutil.copytree(tiny_bert_dir, runs / "_models" / "tiny-bert")
    data = write_csv(tmp_path / "train.csv", class_rows(8))
    manager = JobManager(runs, poll_interval=0.2, cwd=REPO)
    demo = build_app(manager)
    serve(demo)
    try:
        url = demo.local_url.rstrip("/")
        client = Client(url, verbose=False)
        run_id, _status, _l, _m, log, result = client.predict(
            data_file=handle_file(data), task="classification", model=str(runs / "_models" / "tiny-bert"),
            strategy="lora", max_length=32, api_name="/train",
            overrides="max_steps=2\nlogging_steps=1\neval_strategy=no\nsave_strategy=steps\nsave_steps=1")
        assert result["status"] == "finished", log
        session = client.session_hash
        merged = page_call(url, "merge", session, [run_id, None])
        assert merged["success"], merged
        for what in ("model", "merged"):
            zipped = page_call(url, "build_zip", session, [run_id, None, what])   # what: the 'What to zip' radio
            assert zipped["success"], zipped
        # the typed token: the push fails (offline), the message does not echo it
        typed = page_call(url, "push", session, [run_id, "me/model", TOKEN_TYPED, True, False, None])
        assert not typed["success"] and "offline" in str(typed["output"]).lower()
        assert TOKEN_TYPED not in json.dumps(typed)
        # no typed token on a shared app: the server's HF_TOKEN is refused, not used
        empty = page_call(url, "push", session, [run_id, "victim-org/model", "", True, False, None])
        assert not empty["success"] and "does not lend its own Hugging Face token" in str(empty["output"])
        temp = demo.ft_context.tmp
    finally:
        demo.close()
        manager.shutdown(kill=True)

    run_dir = runs / run_id
    checked = []
    for root in (run_dir, temp, uploads):
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            bodies = [path.read_bytes()]
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as zf:
                    bodies += [zf.read(n) for n in zf.namelist()]
            for body in bodies:
                for token in (TOKEN_ENV, TOKEN_TYPED):
                    assert token.encode() not in body, f"token leaked into {path}"
            checked.append(path)
    names = {p.name for p in checked}
    for needed in ("worker.log", "job.json", "run.yaml", "events.jsonl", "metrics.json",
                   f"model-{run_id[:6]}.zip", f"merged-{run_id[:6]}.zip"):
        assert needed in names, (needed, sorted(names))
    assert any(uploads in p.parents for p in checked)                  # the uploaded CSV, as gradio stored it
    assert any(p.parent == run_dir / "data" for p in checked)         # the run's own copy of it


# ---------------------------------------------------------------------------------------------
# the app's model field with private runs: own runs and the model cache, not other sessions' runs


def test_private_model_field_reaches_only_own_runs_and_the_model_cache(tmp_path, tiny_bert_dir, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from finetune_core.jobs import owner_key
    from finetune_core.ui.common import AppContext

    runs, cache = tmp_path / "runs", tmp_path / "models"
    for folder in ("mine0000aaaa/model", "theirs00bbbb/model", "_models/shared", "../models/cached"):
        shutil.copytree(tiny_bert_dir, runs / folder)
    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(cache))
    rows = [{"run_id": "mine0000aaaa", "owner": owner_key("me")}, {"run_id": "theirs00bbbb", "owner": owner_key("you")}]

    def list_runs(owner):
        return rows

    for private in (True, False):
        manager = SimpleNamespace(private_runs=private, runs_dir=runs, list_runs=list_runs)
        ctx = AppContext(manager=manager, home=tmp_path / "home", tmp=tmp_path / "tmp")
        roots = ctx.model_roots("me")
        for ok in ("mine0000aaaa/model", "_models/shared"):
            assert resolve_model(str(runs / ok), allowed_roots=roots)
        assert resolve_model(str(cache / "cached"), allowed_roots=roots)
        if private:
            with pytest.raises(ModelError, match="outside the folders this app may read"):
                resolve_model(str(runs / "theirs00bbbb" / "model"), allowed_roots=roots)
            assert ctx.model_roots(None) == [runs / "_models", cache]        # no session: no run folder
        else:                                                                # a laptop: every run
            assert resolve_model(str(runs / "theirs00bbbb" / "model"), allowed_roots=roots)


def test_gradio_keeps_uploads_inside_the_workspace(tmp_path):
    """Uploads and served files go to FINETUNE_HOME/tmp/gradio, not the machine's /tmp."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env["FINETUNE_HOME"] = str(tmp_path / "home")
    code = "import finetune_core.ui, gradio.utils as u; print(u.get_upload_folder())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    folder = Path(out.stdout.strip().splitlines()[-1]).resolve()
    assert folder == (tmp_path / "home" / "tmp" / "gradio").resolve()


def test_launch_sweeps_old_leftovers_from_gradios_temp_folder(tmp_path, monkeypatch):
    """What a crashed app process left in gradio's temp folder goes once older than the cache age;
    recent files (a live process's uploads) stay."""
    import os as _os
    import time as _time

    from finetune_core.ui import CACHE_MAX_AGE_S, sweep_gradio_temp

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    old_dir, old_file, fresh = tmp_path / "abc123", tmp_path / "old.zip", tmp_path / "def456"
    old_dir.mkdir()
    (old_dir / "upload.csv").write_text("text,label\n")
    old_file.write_text("zip")
    fresh.mkdir()
    stale = _time.time() - CACHE_MAX_AGE_S - 60
    for p in (old_dir, old_file):
        _os.utime(p, (stale, stale))
    assert sweep_gradio_temp() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["def456"]
