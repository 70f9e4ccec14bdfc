"""Every case of tests/badinputs.py through the running app, with gradio_client.

Each bad file is uploaded to the public `audit` endpoint; the cases that only fail at training also go
to `train` (a tiny model folder under the runs folder, one step). A refused case must reach the client
as an AppError whose message carries the engine's FinetuneError text (problem, then fix; html-escaped,
no traceback, never "Unexpected ..."), and a good audit right after each bad request must succeed.
Handled cases (latin-1, BOM, semicolons, a 1 MB cell, formulas, HTML...) load through the app with
their text intact; formula cells and <script> texts come back as raw strings in the tables and
escaped in every HTML output.

Where the app answers differently from the CLI on purpose, APP_EXPECT holds the app's fragments and
why (the app has no config-file input, model folders must lie under the runs folder, the upload limit
applies at upload time, ...). A case's validation file (`data.validation=...`) is the Data tab's
validation upload. CLI_ONLY lists the cases with no app
equivalent. `app_outcome(name)` gives one line per case for the README's reliability table.

One app for the whole module; the train cases run concurrently in one fixture (3 workers at a time).
"""

from __future__ import annotations

import html
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

import badinputs as B  # noqa: E402
from conftest import REPO, serve  # noqa: E402

CASES = {c.name: c for c in B.CASES}

# No app equivalent: the app takes data and settings from the form, never a config file path.
CLI_ONLY = {"missing config file": "the app has no config-file input (settings come from the form)"}

# The app's answer where it differs from the CLI's, and why.
APP_EXPECT = {
    "unsupported extension": (["Invalid file type", ".csv", ".tsv", ".json", ".jsonl", ".parquet"],
                              "the upload field only accepts the supported extensions"),
    "data path is a folder": (["not uploaded by a user"],
                              "a server path the client did not upload is refused by gradio"),
    "missing data file": (["The uploaded file is no longer on the server", "Upload it again"],
                          "an upload that expired (deleted on the server) before the click"),
    "hub dataset id": (["'stanfordnlp/imdb' has not been downloaded before", "Upload a file"],
                       "the Hub source of the Data tab, offline"),
    "file over the upload limit (FINETUNE_MAX_UPLOAD_MB)": (
        ["exceeds the maximum file size of 50000000 bytes"],
        "refused at upload by the app's upload limit (default 50 MB; the CLI case sets 10 MB)"),
    "a 50 MB file (no limit set)": (["exceeds the maximum file size of 50000000 bytes"],
                                    "the app's default upload limit is 50 MB (the local CLI has none)"),
    "model path is a system file": (["'/etc/passwd' is outside the folders this app may read", "bundled model"],
                                    "the app reads model folders only under its runs folder"),
    "config is not YAML": (["Override 'task: classification' has no '='", "key=value"],
                           "the YAML text pasted into the overrides box"),
    "unknown config key": (["Unknown training option 'training.modle'", "TrainingArguments"],
                           "a plain override key belongs to training: in the app"),
    "--set without '='": (["Override 'training.learning_rate' has no '='", "key=value"],
                          "the app's overrides box wording"),
    "--set with an empty key": (["Override '=3' has no key", "key=value"], "the app's overrides box wording"),
    "unknown task": (["'clasification'", "is not in the list of choices", "classification", "instruction"],
                     "the task radio refuses values outside its choices"),
}

# Cases whose refusal only shows in the training worker (after a model load): they run in parallel.
WORKER_REFUSALS = {"every prompt longer than max_length", "model folder without weights", "model weights corrupt",
                   "model folder without a tokenizer", "encoder for instruction tuning", "half precision on CPU",
                   "unseen validation labels"}

# Handled train cases whose training behaviour is the CLI's (tested there): audited here, not trained again.
AUDIT_ONLY = {"a class with a single example", "some prompts longer than max_length"}

APP_CASES = [name for name in CASES if name not in CLI_ONLY]
TRAIN_CASES = [name for name in APP_CASES if CASES[name].command == "train" and name not in AUDIT_ONLY]
FAST_OVERRIDES = [f"{k}={v}" for k, v in B.FAST_TRAINING.items()] + ["seed=1"]


def app_outcome(name: str) -> str:
    """One line for the README table: what the app answers for this case."""
    case = CASES[name]
    if name in CLI_ONLY:
        return f"CLI only: {CLI_ONLY[name]}"
    if name in APP_EXPECT:
        return f"refused: {APP_EXPECT[name][1]}"
    if name in AUDIT_ONLY:
        return f"loads through audit; training as in the CLI ({case.outcome})"
    if case.exit == 0:
        return case.outcome
    where = "train (worker)" if name in WORKER_REFUSALS else case.command
    return f"refused at {where}: {case.expect[0]}"


# ---------------------------------------------------------------------------------------------
# the app


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_bert_dir, tiny_llama_dir):
    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app

    with pytest.MonkeyPatch.context() as mp:
        for var in ("FINETUNE_MAX_UPLOAD_MB", "FINETUNE_MAX_ROWS", "FINETUNE_MAX_STEPS", "FINETUNE_MAX_MINUTES",
                    "FINETUNE_AUTH", "FINETUNE_DEMO_MODE", "FINETUNE_PRIVATE_RUNS"):
            mp.delenv(var, raising=False)
        mp.setenv("FINETUNE_WARMUP_DELAY", "0")
        runs = tmp_path_factory.mktemp("runs")
        models = runs / "_models"          # under the runs folder: the app may read model folders there
        shutil.copytree(tiny_bert_dir, models / "tiny-bert")
        shutil.copytree(tiny_llama_dir, models / "tiny-llama")
        manager = JobManager(runs, max_concurrent=3, poll_interval=0.2, cwd=REPO)
        demo = build_app(manager)
        serve(demo)
        try:
            yield {"url": demo.local_url.rstrip("/"), "client": Client(demo.local_url, verbose=False),
                   "manager": manager, "models": models}
        finally:
            demo.close()
            manager.shutdown(kill=True)


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.csv"
    path.write_bytes(B.GOOD)
    return str(path)


def assert_in_order(text: str, fragments: list[str]) -> None:
    pos = 0
    for fragment in fragments:
        found = text.find(fragment, pos)
        assert found >= 0, f"{fragment!r} not found (in this order) in:\n{text}"
        pos = found + len(fragment)


def readable(message: str) -> str:
    """The client's error text, unescaped; it must be a message, not a traceback or an internal error."""
    assert message.strip(), "empty error message"
    assert "Traceback" not in message and "Unexpected " not in message, message
    assert "<script" not in message.lower(), message       # user text in errors is escaped
    return html.unescape(message)


def assert_still_serving(client: Client, good_csv: str) -> None:
    *_, report = client.predict(data_file=handle_file(good_csv), task="classification", api_name="/audit")
    assert report["n_rows"] == len(B.class_rows())


# ---------------------------------------------------------------------------------------------
# plain HTTP: what a browser or a script could send without gradio_client


def rest(url: str, api: str, data: list, timeout: float = 120) -> tuple[str, object]:
    """POST /gradio_api/call/<api>, read the event stream: ("complete", outputs) or ("error", message)."""
    with httpx.Client(timeout=timeout) as h:
        r = h.post(f"{url}/gradio_api/call/{api}", json={"data": data})
        r.raise_for_status()
        r = h.get(f"{url}/gradio_api/call/{api}/{r.json()['event_id']}")
    event, payload = None, None
    for line in r.text.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            payload = line.split(":", 1)[1].strip()
    value = json.loads(payload) if payload and payload != "null" else None
    if event == "error":
        return "error", (value or {}).get("error", "") if isinstance(value, dict) else str(value)
    return event, value


def upload(url: str, path: str) -> str:
    """Upload a file as the browser does; returns its path on the server."""
    with httpx.Client(timeout=60) as h, open(path, "rb") as f:
        r = h.post(f"{url}/gradio_api/upload", files=[("files", (Path(path).name, f))])
    r.raise_for_status()
    return r.json()[0]


def file_data(server_path: str) -> dict:
    return {"path": server_path, "orig_name": Path(server_path).name, "meta": {"_type": "gradio.FileData"}}


# after data_file: the other data fields, model, validation_file, val_size, overrides
AUDIT_DEFAULTS = ["", "", "train", "classification", "", "", "alpaca", "", "", "", 256, "", None, 0.2, ""]


def load_preview(url: str, path: str, task: str = "classification") -> dict:
    """The Data tab's preview of an uploaded file (the private load_data event, as the page calls it)."""
    event, out = rest(url, "load_data", [file_data(upload(url, path)), "", "", "train", task])
    assert event == "complete", out
    preview = out[1]
    return preview["value"] if "__type__" in preview else preview    # an update carries the table in value


# ---------------------------------------------------------------------------------------------
# building the requests


def case_dir(app, name: str) -> Path:
    """The case's files go under the runs folder, so model folders it names are readable by the app."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)[:60]
    tmp = app["models"] / f"case-{slug}"
    if not tmp.exists():
        tmp.mkdir(parents=True)
        B.write_files(CASES[name], tmp)
    return tmp


def form_for(case: B.BadInput, tmp: Path) -> dict:
    """Audit-endpoint fields for the case (the overrides that have a form field become that field)."""
    kw = {"task": case.task}
    if case.files or case.data is None:
        kw["data_file"] = handle_file(case.data_path(tmp))
    if case.name == "hub dataset id":
        kw.update(data_file=None, example="", hub_dataset="stanfordnlp/imdb")
    for item in case.sets:
        key, _, value = B._fill(item, tmp).partition("=")
        if key == "data.text_column":
            kw["text_column"] = value
        elif key == "data.validation":
            kw["validation_file"] = handle_file(value)
    return kw


def train_form(app, case: B.BadInput, tmp: Path) -> dict:
    kw = form_for(case, tmp)
    kw.pop("text_column", None)                  # every other override goes through the overrides box
    model = {"tiny-bert": str(app["models"] / "tiny-bert"),
             "tiny-llama": str(app["models"] / "tiny-llama")}.get(case.model, B._fill(case.model, tmp))
    overrides = list(FAST_OVERRIDES) + [B._fill(s, tmp) for s in case.sets if not s.startswith("data.validation=")]
    if case.config_text is not None:
        overrides = B._fill(case.config_text, tmp).splitlines()
    kw.update(model=model, strategy="lora", max_length=64, overrides="\n".join(overrides))
    return kw


def expected(name: str) -> list[str]:
    return APP_EXPECT[name][0] if name in APP_EXPECT else CASES[name].expect


def copy_run(app, run_id: str, tmp: Path) -> Path:
    """The run's outputs where the generator's checks look for them (tmp/run)."""
    src = app["manager"].runs_dir / run_id
    dst = tmp / "run"
    dst.mkdir(exist_ok=True)
    for name in ("metrics.json", "predictions.csv", "events.jsonl"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def train_results(app):
    """Every train case through the `train` endpoint, concurrently (a Client per case = its own session)."""
    forms = {name: train_form(app, CASES[name], case_dir(app, name)) for name in TRAIN_CASES}

    def run(name):
        client = Client(app["url"], verbose=False)
        t0 = time.time()
        try:
            return "ok", client.predict(api_name="/train", **forms[name]), time.time() - t0
        except Exception as exc:  # noqa: BLE001 - AppError; anything else fails the case's test
            return "error", exc, time.time() - t0

    with ThreadPoolExecutor(max_workers=6) as pool:
        return dict(zip(TRAIN_CASES, pool.map(run, TRAIN_CASES)))


# ---------------------------------------------------------------------------------------------
# the cases


def test_every_case_is_tried_in_the_app_or_explained():
    assert len(APP_CASES) >= 30 and set(CLI_ONLY) | set(APP_CASES) == set(CASES)
    assert set(APP_EXPECT) <= set(CASES) and WORKER_REFUSALS <= set(TRAIN_CASES)
    assert all(app_outcome(name) for name in CASES)


@pytest.mark.parametrize("name", APP_CASES)
def test_case_through_audit(name, app, good_csv, monkeypatch):
    """Upload to `audit`: refused cases raise a readable AppError; handled ones return a report."""
    case, client = CASES[name], app["client"]
    tmp = case_dir(app, name)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)           # the server reads the limits on each request
    kw = form_for(case, tmp)
    error = None
    if name == "data path is a folder":         # a path on the server the client never uploaded
        event, error = rest(app["url"], "audit", [file_data(str(tmp))] + AUDIT_DEFAULTS)
        assert event == "error"
    elif name == "missing data file":           # an upload that expired before the click
        server_path = upload(app["url"], good_csv)
        Path(server_path).unlink()
        event, error = rest(app["url"], "audit", [file_data(server_path)] + AUDIT_DEFAULTS)
        assert event == "error"
    else:
        try:
            out = client.predict(api_name="/audit", **kw)
        except Exception as exc:  # noqa: BLE001 - gradio_client raises AppError (ValueError for uploads)
            error = str(exc)
    audit_refuses = case.command == "audit" and (case.exit == 2 or name in APP_EXPECT) or name == "hub dataset id"
    monkeypatch.undo()
    if audit_refuses:
        assert error is not None, f"{name}: the audit accepted it"
        assert_in_order(readable(error), expected(name))
    elif error is not None:                      # a train case the audit already refuses: readable
        readable(error)
    else:
        summary, warnings_html, _c, _t, table, report = out
        assert "<script" not in warnings_html.lower()
        if case.exit == 0 and case.command == "audit":
            assert_in_order(summary + html.unescape(warnings_html), case.expect)
            assert report["n_rows"] >= 1 and table["data"]
    assert_still_serving(client, good_csv)


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_case_through_train(name, app, train_results, good_csv):
    """`train`: refused cases raise a readable AppError (before or in the worker); handled ones finish."""
    case = CASES[name]
    kind, value, seconds = train_results[name]
    if case.exit == 2:
        assert kind == "error", f"{name}: training was accepted: {value}"
        message = readable(str(value))
        assert_in_order(message, expected(name))
        if name not in WORKER_REFUSALS:
            assert seconds < 30, f"{name}: refused only after {seconds:.0f} s (should fail before the worker)"
        else:
            assert "failed" in message
    else:
        assert kind == "ok", f"{name}: {value}"
        run_id, status, _loss, _metric, log, result = value
        assert result["status"] == "finished", (status, log)
        tmp = case_dir(app, name)
        copy_run(app, run_id, tmp)
        case.check(tmp, log)
    assert_still_serving(app["client"], good_csv)


@pytest.mark.parametrize("name, expected_cell", [
    ("latin-1 file", f"{B.LATIN1_TEXT} 0"), ("UTF-8 with BOM", f"{B.BOM_TEXT} 0"),
    ("semicolon delimiter", B.class_rows()[0]["text"]), ("a 1 MB text cell", None)])
def test_handled_files_read_right_through_the_app(name, expected_cell, app):
    """The Data tab's preview of the handled files: header without BOM, accents and texts intact."""
    case = CASES[name]
    preview = load_preview(app["url"], case.data_path(case_dir(app, name)))
    assert preview["headers"] == ["text", "label"], preview["headers"]
    cells = [row[0] for row in preview["data"]]
    if expected_cell is not None:
        assert expected_cell in cells, cells[:3]
    else:                                       # the preview shortens long cells; the audit counts them all
        long = [c for c in cells if c.startswith("very long text")]
        assert long and len(long[0]) == 100 and long[0].endswith("...")
        assert len(cells) == 12


# ---------------------------------------------------------------------------------------------
# formulas and HTML: raw strings in tables, escaped in HTML


def test_formulas_and_script_are_raw_text_in_tables(app):
    tmp = case_dir(app, "formula cells and HTML (trains; predictions.csv escaped)")
    path = str(tmp / "formulas.csv")
    preview = load_preview(app["url"], path)
    cells = [row[0] for row in preview["data"]]
    assert B.FORMULA in cells and B.SCRIPT in cells              # verbatim: no apostrophe, no escaping
    assert all(not c.startswith("'") for c in cells)
    summary, warnings_html, _c, _t, table, report = app["client"].predict(
        data_file=handle_file(path), task="classification", api_name="/audit")
    assert report["n_rows"] == 24
    # the audit quotes a conflicting text: escaped in the HTML box, never a live tag
    assert "<script" not in warnings_html.lower() and "<img" not in warnings_html.lower()
    assert "&lt;script&gt;" in warnings_html, warnings_html


def test_script_labels_and_column_names_are_escaped(app, tmp_path):
    client = app["client"]
    labels = tmp_path / "labels.csv"
    rows = [{"text": f"ordinary sentence {i}", "label": "ok"} for i in range(12)]
    rows += [{"text": f"odd sentence {i}", "label": B.SCRIPT} for i in range(2)]
    labels.write_bytes(B.csv_bytes(rows))
    summary, warnings_html, _c, _t, table, report = client.predict(
        data_file=handle_file(str(labels)), task="classification", api_name="/audit")
    assert f"class '{B.SCRIPT}'" in [row[0] for row in table["data"]]     # the table shows the raw string
    assert B.SCRIPT in report["class_distribution"]
    assert "<script" not in warnings_html.lower() and "&lt;script&gt;" in warnings_html   # imbalance warning
    assert "<script" not in summary.lower()

    columns = tmp_path / "columns.csv"
    columns.write_text('"<script>alert(1)</script>",other,third\na,b,c\nd,e,f\n', encoding="utf-8")
    with pytest.raises(Exception) as err:
        client.predict(data_file=handle_file(str(columns)), task="classification", api_name="/audit")
    message = str(err.value)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in message and "<script>" not in message


def test_tables_render_text_not_html(app):
    """Preview and audit tables are plain-text Dataframes; Markdown outputs sanitize HTML."""
    cfg = httpx.get(app["url"] + "/config", timeout=30).json()
    frames = [c["props"] for c in cfg["components"] if c["type"] == "dataframe"
              and (c["props"].get("label") in ("Preview (first 50 rows)", "Audit details")
                   or c["props"].get("elem_id") in ("eval-errors", "eval-baselines"))]
    assert len(frames) == 4
    for props in frames:
        datatype = props.get("datatype")
        kinds = datatype if isinstance(datatype, list) else [datatype]
        assert not set(kinds) & {"html", "markdown"}, props
    markdowns = [c["props"] for c in cfg["components"] if c["type"] == "markdown"]
    assert markdowns and all(p.get("sanitize_html", True) for p in markdowns)


def test_misclassified_rows_reach_the_evaluate_table_as_raw_text():
    """What the Evaluate tab puts in its misclassified table: the strings themselves, unescaped (the
    Dataframe shows text), never HTML built from them."""
    from finetune_core.ui.evaluate_tab import error_rows

    metrics = {"error_analysis": {"misclassified": [
        {"text": B.SCRIPT, "true": "<b>ok</b>", "predicted": B.FORMULA, "confidence": 0.91234}]}}
    assert error_rows(metrics) == [[B.SCRIPT, "<b>ok</b>", B.FORMULA, 0.912]]
    assert "&lt;" not in str(error_rows(metrics))
