"""The app through gradio_client: audit → train (a few steps) → metrics → predict → chat; stable API names."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOMAINS = str(REPO / "examples" / "data" / "domains.csv")
PUBLIC = {"/audit", "/train", "/stop", "/chat", "/predict"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app, launch

    manager = JobManager(tmp_path_factory.mktemp("runs"), poll_interval=0.2, cwd=REPO)
    demo = build_app(manager)
    launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(demo.local_url, verbose=False)
    yield client, manager, demo
    demo.close()
    manager.shutdown(kill=True)


def test_only_the_stable_endpoints_are_public(app):
    client, _, _ = app
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == PUBLIC
    assert not api["unnamed_endpoints"]
    train_params = [p["parameter_name"] for p in api["named_endpoints"]["/train"]["parameters"]]
    assert train_params[:2] == ["data_file", "example"] and "overrides" in train_params


def test_bad_input_is_a_readable_error_and_the_app_keeps_serving(app, tmp_path):
    client, _, _ = app
    bad = tmp_path / "spreadsheet.csv"
    bad.write_bytes(b"PK\x03\x04 an xlsx saved with the wrong extension")
    with pytest.raises(Exception) as err:
        client.predict(data_file=handle_file(str(bad)), task="classification", api_name="/audit")
    assert "save it as CSV" in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(Exception, match="not a valid run id"):
        client.predict(text="hello", run="../../etc", api_name="/predict")
    with pytest.raises(Exception, match="No active job"):
        client.predict(run_id="0123456789abcdef", api_name="/stop")
    summary, *_rest, report = client.predict(data_file=handle_file(DOMAINS), task="classification",
                                             api_name="/audit")
    assert "160 rows" in summary and report["n_rows"] == 160


@pytest.mark.slow
def test_audit_train_predict_chat(app):
    client, manager, _ = app
    summary, warnings_html, class_plot, token_plot, table, report = client.predict(
        data_file=handle_file(DOMAINS), task="classification", max_length=64, api_name="/audit")
    assert report["class_distribution"] == {"finance": 40, "legal": 40, "medical": 40, "technology": 40}
    assert class_plot and token_plot and table["data"]

    run_id, status, loss_plot, metric_plot, log, result = client.predict(
        data_file=handle_file(DOMAINS), task="classification", model="bundled:minilm-l6", strategy="lora",
        max_length=64, overrides="max_steps=3\nlogging_steps=1", api_name="/train")
    assert result["status"] == "finished", (status, log)
    metrics = result["metrics"]
    assert metrics["global_step"] == 3 and 0 <= metrics["f1_weighted"] <= 1
    assert set(metrics["baselines"]) == {"majority", "tfidf_logreg"}
    assert "step 3/3" in log and "[end]" in log
    assert manager.status(run_id)["status"] == "finished"

    # the API session that started the run owns it; another client does not
    other = Client(client.src, verbose=False)
    with pytest.raises(Exception, match="Only the browser session"):
        other.predict(run_id=run_id, api_name="/stop")
    assert "already finished" in client.predict(run_id=run_id, api_name="/stop")

    label = client.predict(text="The jury found the defendant not guilty.", run=run_id, api_name="/predict")
    names = {c["label"] for c in label["confidences"]}
    assert names == {"finance", "legal", "medical", "technology"} and label["label"] in names
    assert abs(sum(c["confidence"] for c in label["confidences"]) - 1) < 1e-4

    with pytest.raises(Exception, match="classifier"):
        client.predict(message="hi", model=run_id, api_name="/chat")
    base, finetuned = client.predict(message="Say hello.", model="bundled:smollm2-135m", max_new_tokens=8,
                                     do_sample=False, api_name="/chat")
    assert base[0]["role"] == "user" and base[-1]["role"] == "assistant"
    answer = base[-1]["content"]
    text = answer if isinstance(answer, str) else " ".join(part.get("text", "") for part in answer)
    assert text.strip()
    assert "fine-tuned run" in str(finetuned[-1]["content"])
