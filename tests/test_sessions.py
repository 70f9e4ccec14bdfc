"""Five concurrent gradio_client sessions on one app (FINETUNE_MAX_CONCURRENT_JOBS=1, FINETUNE_PRIVATE_RUNS=1).

Session A starts a job (a tiny BERT folder under the runs folder, frozen head only, many short steps);
sessions B..E, each its own Client in its own thread, start jobs while A's runs and see "queued" with
positions 1..4, then cancel them; then A stops its job (evaluated and saved as it is). No session can see, stop, watch, download, chat with or predict with another session's run;
run ids are random (64 bits); the gradio file route serves neither run folders nor paths outside its
cache (traversal included).

The scenario runs once (module fixture); the tests assert on what it recorded.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from conftest import REPO, class_rows, page_call, serve, write_csv  # noqa: E402

QUEUED = 4                                   # sessions B..E
TRAIN = dict(task="classification", strategy="frozen", head_only=True, max_length=32,   # model: a tiny BERT
             overrides="max_steps=100000\nlogging_steps=100\neval_strategy=no\nsave_strategy=no\n"
                       "per_device_train_batch_size=8")      # runs until A stops it: the queue is seen for sure


def wait_for(job, predicate, timeout: float = 120.0):
    """The first streamed output of a gradio_client Job that satisfies `predicate`."""
    deadline = time.time() + timeout
    seen = 0
    while time.time() < deadline:
        outputs = job.outputs()
        for out in outputs[seen:]:
            if predicate(out):
                return out
        seen = len(outputs)
        if job.done() and len(job.outputs()) == seen:
            break
        time.sleep(0.1)
    raise AssertionError(f"no matching output; last: {job.outputs()[-1:] or job.status()}")


def result_of(out) -> dict:
    return out[5] if isinstance(out, (list, tuple)) and len(out) == 6 and isinstance(out[5], dict) else {}


def error_of(fn) -> str:
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - AppError from gradio_client
        return str(exc)
    raise AssertionError(f"not refused: {value!r}")


def rest(url: str, api: str, data: list) -> tuple[str, object]:
    """A plain HTTP call (a fresh session) of any event by its name, as a script could send it."""
    with httpx.Client(timeout=60) as h:
        r = h.post(f"{url}/gradio_api/call/{api}", json={"data": data})
        r.raise_for_status()
        r = h.get(f"{url}/gradio_api/call/{api}/{r.json()['event_id']}")
    event, payload = None, None
    for line in r.text.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            payload = line.split(":", 1)[1].strip()
    return event, json.loads(payload) if payload and payload != "null" else None




@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_bert_dir):
    import shutil

    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app

    with pytest.MonkeyPatch.context() as mp:
        for var in ("FINETUNE_MAX_UPLOAD_MB", "FINETUNE_MAX_ROWS", "FINETUNE_MAX_STEPS", "FINETUNE_MAX_MINUTES",
                    "FINETUNE_AUTH", "FINETUNE_DEMO_MODE"):
            mp.delenv(var, raising=False)
        mp.setenv("FINETUNE_MAX_CONCURRENT_JOBS", "1")
        mp.setenv("FINETUNE_PRIVATE_RUNS", "1")
        mp.setenv("FINETUNE_WARMUP_DELAY", "0")
        runs = tmp_path_factory.mktemp("runs")
        model = runs / "_models" / "tiny-bert"        # the app reads model folders under its runs folder
        shutil.copytree(tiny_bert_dir, model)
        manager = JobManager(runs, poll_interval=0.2, cwd=REPO)
        assert manager.max_concurrent == 1 and manager.private_runs
        demo = build_app(manager)
        serve(demo)
        try:
            yield {"url": demo.local_url.rstrip("/"), "manager": manager, "model": str(model)}
        finally:
            demo.close()
            manager.shutdown(kill=True)


@pytest.fixture(scope="module")
def scenario(app, tmp_path_factory):
    url, manager = app["url"], app["manager"]
    data = write_csv(tmp_path_factory.mktemp("data") / "topics.csv", class_rows(8))
    clients = {name: Client(url, verbose=False) for name in "ABCDE"}
    rec: dict = {"clients": clients, "owners": {n: f"client:{c.session_hash}" for n, c in clients.items()}}

    # A starts a job and is running
    train = dict(TRAIN, model=app["model"])
    job_a = clients["A"].submit(data_file=handle_file(data), api_name="/train", **train)
    first_a = wait_for(job_a, lambda o: result_of(o).get("status") == "running")
    run_a = rec["run_a"] = first_a[0]

    # B..E start jobs at the same time, each in its own thread: all wait in the queue
    barrier = threading.Barrier(QUEUED)
    ids: dict[str, str] = {}

    def queued_session(name):
        client = clients[name]
        job = client.submit(data_file=handle_file(data), api_name="/train", **train)
        out = wait_for(job, lambda o: result_of(o).get("status") == "queued", timeout=60)
        ids[name] = out[0]
        barrier.wait(timeout=60)                 # everyone has seen its position before anyone leaves
        seen = {"run_id": out[0], "position": result_of(out)["position"], "status_html": out[1],
                "outputs": json.dumps(out, default=str)}
        seen["stop_a"] = error_of(lambda: client.predict(run_id=run_a, api_name="/stop"))
        seen["predict_a_running"] = error_of(lambda: client.predict(text="hello", run=run_a, api_name="/predict"))
        if name == "C":                          # another session's queued run cannot be cancelled either
            seen["stop_other_queued"] = error_of(lambda: client.predict(run_id=ids["B"], api_name="/stop"))
        barrier.wait(timeout=60)
        seen["cancel"] = client.predict(run_id=out[0], api_name="/stop")
        final = job.result(timeout=60)
        seen["final_status"] = result_of(final).get("status")
        return name, seen

    with ThreadPoolExecutor(max_workers=QUEUED) as pool:
        rec["queued"] = dict(pool.map(queued_session, "BCDE"))
    rec["a_status_while_queued"] = manager.status(run_a)["status"]
    rec["stop_by_owner"] = clients["A"].predict(run_id=run_a, api_name="/stop")
    final_a = job_a.result(timeout=300)
    rec["final_a"] = final_a
    return rec


# ---------------------------------------------------------------------------------------------


def test_one_trains_the_others_see_their_queue_position(scenario):
    queued = scenario["queued"]
    assert sorted(s["position"] for s in queued.values()) == list(range(1, QUEUED + 1))
    for s in queued.values():
        assert f"position <b>{s['position']}</b>" in s["status_html"]
        assert f"({s['position']} run(s) ahead of yours)" in s["status_html"]   # A's running job + the queue
        assert "Removed from the queue" in s["cancel"] and s["final_status"] == "cancelled"
    assert scenario["a_status_while_queued"] == "running"
    assert "Stop requested" in scenario["stop_by_owner"]
    final = result_of(scenario["final_a"])
    assert final["status"] == "stopped" and final["metrics"]["stopped_by_user"] is True


def test_queued_sessions_learn_nothing_about_the_running_job(scenario):
    run_a = scenario["run_a"]
    for s in scenario["queued"].values():
        assert run_a not in s["outputs"]


def test_run_ids_are_random_and_unguessable(scenario, app):
    ids = [scenario["run_a"]] + [s["run_id"] for s in scenario["queued"].values()]
    assert len(set(ids)) == len(ids) == 5
    for run_id in ids:
        assert re.fullmatch(r"[0-9a-f]{16}", run_id), run_id          # 64 random bits (secrets.token_hex)
    assert len({run_id[:4] for run_id in ids}) > 1                     # not a counter or a timestamp prefix


def test_no_session_can_stop_another_sessions_run(scenario, app):
    for s in scenario["queued"].values():
        assert "Only the browser session that started this run can stop it" in s["stop_a"]
    assert "Only the browser session" in scenario["queued"]["C"]["stop_other_queued"]
    # the owner can (scenario: A stopped its running job); now it has ended, a second stop just says so
    assert "Stop requested" in scenario["stop_by_owner"]
    msg = scenario["clients"]["A"].predict(run_id=scenario["run_a"], api_name="/stop")
    assert "already stopped" in msg


def test_no_session_can_predict_or_chat_with_another_sessions_run(scenario):
    run_a, clients = scenario["run_a"], scenario["clients"]
    for s in scenario["queued"].values():
        assert f"Run '{run_a}' was not found" in s["predict_a_running"]
    label = clients["A"].predict(text="The striker scored a goal.", run=run_a, api_name="/predict")
    assert {c["label"] for c in label["confidences"]} == {"sport", "food", "tech"}
    assert f"Run '{run_a}' was not found" in error_of(
        lambda: clients["B"].predict(text="The striker scored a goal.", run=run_a, api_name="/predict"))
    # chat: the owner is told it is a classifier; another session does not even learn that it exists
    assert "classifier" in error_of(lambda: clients["A"].predict(message="hi", model=run_a, api_name="/chat"))
    other = error_of(lambda: clients["B"].predict(message="hi", model=run_a, api_name="/chat"))
    assert f"Run '{run_a}' was not found" in other and "classifier" not in other


def test_no_session_lists_or_watches_another_sessions_run(scenario, app):
    manager, run_a = app["manager"], scenario["run_a"]
    owners = scenario["owners"]
    assert [r["run_id"] for r in manager.list_runs(owners["A"])] == [run_a]
    for name in "BCDE":
        rows = manager.list_runs(owners[name])
        assert [r["run_id"] for r in rows] == [scenario["queued"][name]["run_id"]] and rows[0]["mine"]
    # the page's private events answer a plain HTTP caller (a new session) like any other session
    event, payload = rest(app["url"], "watch_id", [run_a])
    assert event == "error" and f"Run '{run_a}' was not found" in str(payload)
    event, payload = rest(app["url"], "show_run", [run_a, False])
    assert event == "error" and "was not found" in str(payload)


def test_no_session_can_download_another_sessions_run(scenario, app):
    url, run_a = app["url"], scenario["run_a"]
    event, payload = rest(url, "build_zip", [run_a, "model", None])
    assert event == "error" and f"Run '{run_a}' was not found" in str(payload)
    run_dir = app["manager"].runs_dir / run_a
    for name in ("metrics.json", "run.yaml", "model/config.json", "job.json", "worker.log"):
        path = run_dir / name
        assert path.exists(), path
        r = httpx.get(f"{url}/gradio_api/file={path}", timeout=30)
        assert r.status_code in (403, 404), (name, r.status_code)


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../../../etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                                  "%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/proc/self/environ", "~/.bashrc",
                                  "{home}/.session_secret", "{runs}/../.session_secret", "{repo}/app.py"])
def test_file_route_serves_nothing_outside_its_cache(path, app):
    from finetune_core.jobs import finetune_home

    path = path.format(home=finetune_home(), runs=app["manager"].runs_dir, repo=REPO)
    for route in (f"/gradio_api/file={path}", f"/gradio_api/file={quote(path, safe='')}", f"/file={path}"):
        r = httpx.get(app["url"] + route, timeout=30)
        assert r.status_code in (403, 404), (route, r.status_code, r.text[:200])
        assert "root:" not in r.text and "HOME=" not in r.text



def test_downloads_are_limited_to_the_sessions_own_runs(scenario, app):
    """The Export tab's zip: built for the owner's session, refused to any other session."""
    url, run_a, clients = app["url"], scenario["run_a"], scenario["clients"]
    mine = page_call(url, "build_zip", clients["A"].session_hash, [run_a, "model", None])
    assert mine["success"], mine
    zip_file = mine["output"]["data"][0]
    r = httpx.get(zip_file["url"], timeout=60)
    assert r.status_code == 200 and r.content[:2] == b"PK"
    other = page_call(url, "build_zip", clients["B"].session_hash, [run_a, "model", None])
    assert not other["success"] and f"Run '{run_a}' was not found" in str(other["output"])
