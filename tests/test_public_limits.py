"""Limits for public deployments, set by environment, through the running app.

One app for the module, launched as a public demo would be: FINETUNE_DEMO_MODE=1 (safe defaults,
push-to-hub hidden without a token), FINETUNE_AUTH (a login), and explicit FINETUNE_MAX_UPLOAD_MB=1,
FINETUNE_MAX_ROWS=50, FINETUNE_MAX_STEPS=2 (an explicit variable wins over demo mode). Checked:

- login: an unauthenticated or wrongly authenticated client is refused, on every route; with it, it works;
- upload size: a 2 MB file is refused at upload (client and server), the app's own check names the variable;
- rows: a 60-row file is refused by audit and train with a message naming FINETUNE_MAX_ROWS;
- steps and minutes: a job asking for 20 steps trains 2 at most and stops at the time limit;
- concurrent jobs: one at a time (demo default);
- the values the app reports (/config: the limits line, the Export tab's push column) and refuses (push).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from conftest import REPO, class_rows, serve, write_csv  # noqa: E402
from finetune_core import limits  # noqa: E402
from finetune_core.settings import SettingError  # noqa: E402

USER, PASSWORD = "alice", "s3cret-pw"
LAUNCH_ENV = {"FINETUNE_DEMO_MODE": "1", "FINETUNE_AUTH": f"{USER}:{PASSWORD}", "FINETUNE_MAX_UPLOAD_MB": "1",
              "FINETUNE_MAX_ROWS": "50", "FINETUNE_MAX_STEPS": "2", "FINETUNE_WARMUP_DELAY": "0"}
UNSET = ("FINETUNE_MAX_MINUTES", "FINETUNE_MAX_CONCURRENT_JOBS", "FINETUNE_PRIVATE_RUNS", "HF_TOKEN",
         "HUGGING_FACE_HUB_TOKEN")


def start(manager=None):
    from finetune_core.ui import build_app

    demo = build_app(manager)
    serve(demo)
    return demo


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_bert_dir):
    import shutil

    from finetune_core.jobs import JobManager

    with pytest.MonkeyPatch.context() as mp:
        for var in UNSET:
            mp.delenv(var, raising=False)
        for key, value in LAUNCH_ENV.items():
            mp.setenv(key, value)
        runs = tmp_path_factory.mktemp("runs")
        model = runs / "_models" / "tiny-bert"        # the app reads model folders under its runs folder
        shutil.copytree(tiny_bert_dir, model)
        manager = JobManager(runs, poll_interval=0.2, cwd=REPO)
        demo = start(manager)
        try:
            yield {"url": demo.local_url.rstrip("/"), "manager": manager, "demo": demo, "model": str(model),
                   "client": Client(demo.local_url, verbose=False, auth=(USER, PASSWORD))}
        finally:
            demo.close()
            manager.shutdown(kill=True)


@pytest.fixture
def logged_in(app):
    with httpx.Client(base_url=app["url"], timeout=60) as h:
        r = h.post("/login", data={"username": USER, "password": PASSWORD})
        assert r.status_code == 200 and r.json().get("success"), r.text
        yield h


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("good") / "good.csv", class_rows(5))


def big_csv(path, size_bytes: int) -> str:
    """A valid CSV of about `size_bytes` bytes in 20 rows (cheap to read)."""
    labels = ["sport", "food"]
    per_row = size_bytes // 20
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for i in range(20):
            f.write("goal " * (per_row // 5 - 2) + f",{labels[i % 2]}\n")
    return str(path)


def error_of(fn) -> str:
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - AppError / ValueError from gradio_client
        return str(exc)
    raise AssertionError(f"not refused: {str(value)[:300]}")


# ---------------------------------------------------------------------------------------------
# the limits module: defaults, demo values, explicit variables win


def test_limit_values_default_demo_and_explicit(monkeypatch):
    for var in ("FINETUNE_DEMO_MODE", "FINETUNE_MAX_UPLOAD_MB", "FINETUNE_MAX_ROWS", "FINETUNE_MAX_STEPS",
                "FINETUNE_MAX_MINUTES", "FINETUNE_MAX_CONCURRENT_JOBS", "FINETUNE_AUTH"):
        monkeypatch.delenv(var, raising=False)
    assert limits.summary() == {"demo_mode": False, "max_upload_mb": 50.0, "max_rows": None, "max_steps": None,
                                "max_minutes": None, "max_concurrent_jobs": 1, "auth": False}
    monkeypatch.setenv("FINETUNE_DEMO_MODE", "1")
    assert limits.summary() == {"demo_mode": True, "max_upload_mb": 10.0, "max_rows": 5000, "max_steps": 300,
                                "max_minutes": 15.0, "max_concurrent_jobs": 1, "auth": False}
    for key, value in LAUNCH_ENV.items():
        monkeypatch.setenv(key, value)
    assert limits.summary() == {"demo_mode": True, "max_upload_mb": 1.0, "max_rows": 50, "max_steps": 2,
                                "max_minutes": 15.0, "max_concurrent_jobs": 1, "auth": True}
    assert PASSWORD not in json.dumps(limits.summary())


def test_the_app_uses_the_limits_it_was_launched_with(app):
    assert app["manager"].max_concurrent == 1                    # demo mode: one training job at a time
    assert app["demo"].max_file_size == 1_000_000                # FINETUNE_MAX_UPLOAD_MB=1, in bytes


# ---------------------------------------------------------------------------------------------
# login


def test_unauthenticated_clients_are_refused(app, good_csv):
    url = app["url"]
    with pytest.raises(Exception, match="credentials were not provided|login"):
        Client(url, verbose=False)
    with pytest.raises(Exception, match="Could not login"):
        Client(url, verbose=False, auth=(USER, "wrong"))
    with httpx.Client(base_url=url, timeout=30) as h:
        assert h.post("/login", data={"username": USER, "password": "wrong"}).status_code in (400, 401)
        for method, route, kwargs in [
                ("GET", "/config", {}), ("GET", "/gradio_api/info", {}),
                ("POST", "/gradio_api/call/audit", {"json": {"data": []}}),
                ("POST", "/gradio_api/queue/join", {"json": {"data": [], "fn_index": 0, "session_hash": "x"}}),
                ("POST", "/gradio_api/upload", {"files": [("files", ("good.csv", Path(good_csv).read_bytes()))]}),
                ("GET", f"/gradio_api/file={good_csv}", {})]:
            r = h.request(method, route, **kwargs)
            assert r.status_code in (401, 403), (route, r.status_code, r.text[:200])


def test_authenticated_client_works(app, good_csv):
    *_, report = app["client"].predict(data_file=handle_file(good_csv), task="classification", api_name="/audit")
    assert report["n_rows"] == 15


def test_a_malformed_auth_variable_stops_the_launch(app, monkeypatch):
    from finetune_core.ui import launch

    monkeypatch.setenv("FINETUNE_AUTH", "no-colon-here")
    with pytest.raises(SettingError, match="FINETUNE_AUTH is not of the form user:password"):
        launch(app["demo"], prevent_thread_lock=True)


# ---------------------------------------------------------------------------------------------
# upload size and rows


def test_a_file_over_the_upload_limit_is_refused(app, logged_in, tmp_path, good_csv, monkeypatch):
    client = app["client"]
    big = big_csv(tmp_path / "two_mb.csv", 2_000_000)
    message = error_of(lambda: client.predict(data_file=handle_file(big), task="classification", api_name="/audit"))
    assert "exceeds the maximum file size of 1000000 bytes" in message
    # a client that skips that check is refused by the server
    with open(big, "rb") as f:
        r = logged_in.post("/gradio_api/upload", files=[("files", ("two_mb.csv", f))])
    assert r.status_code == 413 and "1000000" in r.text
    # just over 1 MB (10^6 bytes, not 1 MiB) is over the limit too
    edge = big_csv(tmp_path / "edge.csv", 1_020_000)
    assert "exceeds the maximum file size" in error_of(
        lambda: client.predict(data_file=handle_file(edge), task="classification", api_name="/audit"))
    # the app's own check behind gradio's (read on each request): a file under the upload cap, over a lower limit
    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_MB", "0.5")
    mid = big_csv(tmp_path / "mid.csv", 700_000)
    message = error_of(lambda: client.predict(data_file=handle_file(mid), task="classification", api_name="/audit"))
    assert "'mid.csv' is 0.7 MB, above this app's limit of 0.5 MB (FINETUNE_MAX_UPLOAD_MB)" in message
    assert "Upload a smaller sample" in message
    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_MB", "1")
    *_, report = client.predict(data_file=handle_file(good_csv), task="classification", api_name="/audit")
    assert report["n_rows"] == 15


def test_too_many_rows_are_refused_by_audit_and_train(app, tmp_path):
    client = app["client"]
    rows = write_csv(tmp_path / "sixty.csv", class_rows(20))          # 60 rows, limit 50
    for api, extra in (("/audit", {}), ("/train", {"model": app["model"], "strategy": "frozen"})):
        message = error_of(lambda: client.predict(data_file=handle_file(rows), task="classification",
                                                  api_name=api, **extra))
        assert "'sixty.csv' has 60 rows, above this app's limit of 50 rows" in message, (api, message)
        assert "at most 50 rows" in message
    assert "FINETUNE_MAX_ROWS" in error_of(
        lambda: client.predict(data_file=handle_file(rows), task="classification", api_name="/audit"))
    assert "above this app's limit of 50 rows" in error_of(      # the built-in example has 160 rows
        lambda: client.predict(example="domains.csv", task="classification", api_name="/audit"))
    assert not app["manager"].jobs()                             # nothing reached the job queue


# ---------------------------------------------------------------------------------------------
# steps and minutes per job


def test_steps_and_minutes_per_job_are_capped(app, good_csv, monkeypatch):
    monkeypatch.setenv("FINETUNE_MAX_MINUTES", "0.0001")        # 6 ms: the job stops at its first step end
    run_id, status, _loss, _metric, log, result = app["client"].predict(
        data_file=handle_file(good_csv), task="classification", model=app["model"], strategy="frozen",
        head_only=True, max_length=32, api_name="/train",
        overrides="max_steps=20\nlogging_steps=1\neval_strategy=no\nsave_strategy=no\nper_device_train_batch_size=4")
    assert result["status"] == "finished", (status, log)
    assert "This deployment limits a run to 2 steps (FINETUNE_MAX_STEPS); training 2 of the 20 planned steps" in log
    assert "training started: 2 steps" in log
    assert "limits a job to 0.0001 minutes (FINETUNE_MAX_MINUTES)" in log
    metrics = json.loads((app["manager"].runs_dir / run_id / "metrics.json").read_text())
    assert metrics["stopped_by_time_limit"] is True and metrics["global_step"] == 1
    assert (app["manager"].runs_dir / run_id / "model").is_dir()          # evaluated and saved as it was


# ---------------------------------------------------------------------------------------------
# what the app reports: limits line, Export tab's push controls


def push_column(config: dict) -> dict:
    return next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "push-column")


def test_demo_mode_reports_its_limits_and_hides_push_to_hub(app, logged_in):
    config = logged_in.get("/config").json()
    intro = next(c["props"]["value"] for c in config["components"] if c["type"] == "markdown")
    for fragment in ("at most 2 training steps", "15 minutes per run", "50 rows per file", "files up to 1 MB",
                     "1 training job(s) at a time"):
        assert fragment in intro, intro
    assert PASSWORD not in json.dumps(config)
    assert push_column(config)["visible"] is False
    # hidden is not enough: the push event itself refuses, even called the way the page calls it
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "push")
    session = "limits0test0session"
    r = logged_in.post("/gradio_api/queue/join", json={"data": ["0123456789abcdef", "me/model", "", True, False, None],
                                                       "fn_index": fn_index, "session_hash": session})
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    with logged_in.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                break
    assert not msg["success"] and "Pushing to the Hub is off in demo mode" in str(msg["output"])


def test_demo_mode_shows_push_to_hub_when_a_token_is_configured(app, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_PLANTEDdemoTOKEN0123456789")
    monkeypatch.delenv("FINETUNE_AUTH")
    demo = start(app["manager"])
    try:
        config = httpx.get(demo.local_url.rstrip("/") + "/config", timeout=30).json()
    finally:
        demo.close()
    assert push_column(config)["visible"] is True
    assert "hf_PLANTEDdemoTOKEN" not in json.dumps(config)
