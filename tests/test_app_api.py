"""The app through gradio_client: audit → train (a few steps) → metrics → predict → chat; stable API names."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import page_call, serve

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOMAINS = str(REPO / "examples" / "data" / "domains.csv")
PUBLIC = {"/audit", "/train", "/stop", "/chat", "/predict", "/predict_file"}
TRAIN_PARAMETERS = {
    "data_file": None, "example": "domains.csv", "hub_dataset": "", "hub_split": "train", "task": "classification",
    "text_column": "", "label_column": "", "instruction_format": "alpaca", "prompt_column": "", "input_column": "",
    "response_column": "", "max_length": 256, "model": "bundled:minilm-l6", "strategy": "lora", "head_only": True,
    "frozen_layers": 3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_targets": "auto",
    "num_train_epochs": None, "learning_rate": None, "batch_size": None, "early_stopping_patience": 2,
    "val_size": 0.2, "overrides": "", "validation_file": None}
# New parameters go last, so scripts that pass the earlier ones by position keep working.
AUDIT_PARAMETERS = {
    **{name: TRAIN_PARAMETERS[name] for name in list(TRAIN_PARAMETERS)[:12]}, "model": "bundled:minilm-l6",
    "validation_file": None, "val_size": 0.2, "overrides": ""}
PREDICT_FILE_PARAMETERS = {"data_file": None, "run": None}
CHAT_PARAMETERS = {"message": None, "model": "bundled:smollm2-135m", "temperature": 0.7, "top_p": 0.9,
                   "max_new_tokens": 128, "do_sample": True, "base_history": [], "finetuned_history": [], "seed": ""}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app

    manager = JobManager(tmp_path_factory.mktemp("runs"), poll_interval=0.2, cwd=REPO)
    demo = build_app(manager)
    serve(demo)
    client = Client(demo.local_url, verbose=False)
    yield client, manager, demo
    demo.close()
    manager.shutdown(kill=True)


def test_only_the_stable_endpoints_are_public(app):
    client, _, _ = app
    api = client.view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == PUBLIC
    assert not api["unnamed_endpoints"]
    # users' scripts call /train, /audit and /chat by these names, in this order, relying on these defaults
    for name, pinned in (("/train", TRAIN_PARAMETERS), ("/audit", AUDIT_PARAMETERS), ("/chat", CHAT_PARAMETERS),
                         ("/predict_file", PREDICT_FILE_PARAMETERS)):
        params = {p["parameter_name"]: p.get("parameter_default") for p in api["named_endpoints"][name]["parameters"]}
        assert params == pinned and list(params) == list(pinned), name


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
    # runs are not private here, so the other session sees the run, but may not change its files
    url = app[2].local_url.rstrip("/")
    refused = page_call(url, "merge", other.session_hash, [run_id, None])
    assert not refused["success"] and "Only the browser session that trained this run" in str(refused["output"])
    assert not (manager.run_dir(run_id) / "model" / "merged").exists()

    label = client.predict(text="The jury found the defendant not guilty.", run=run_id, api_name="/predict")
    names = {c["label"] for c in label["confidences"]}
    assert names == {"finance", "legal", "medical", "technology"} and label["label"] in names
    assert abs(sum(c["confidence"] for c in label["confidences"]) - 1) < 1e-4

    csv_path, summary = client.predict(data_file=handle_file(DOMAINS), run=run_id, api_name="/predict_file")
    rows = Path(csv_path).read_text().splitlines()
    assert len(rows) == 161 and rows[0].endswith("p_finance,p_legal,p_medical,p_technology")
    assert "160 rows (labels and class probabilities)" in summary

    with pytest.raises(Exception, match="classifier"):
        client.predict(message="hi", model=run_id, api_name="/chat")
    base, finetuned = client.predict(message="Say hello.", model="bundled:smollm2-135m", max_new_tokens=8,
                                     do_sample=False, api_name="/chat")
    assert base[0]["role"] == "user" and base[-1]["role"] == "assistant"
    answer = base[-1]["content"]
    text = answer if isinstance(answer, str) else " ".join(part.get("text", "") for part in answer)
    assert text.strip()
    assert finetuned == []          # no run picked: the fine-tuned side shows its placeholder, no history

    # HTML typed into the chat comes back as the raw text typed (never turned into markup on the
    # server), and both chat panes sanitize what they render.
    script = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    base, _ = client.predict(message=script, model="bundled:smollm2-135m", max_new_tokens=8, do_sample=False,
                             api_name="/chat")
    from finetune_core.ui.chat_tab import _text

    assert _text(base[0]["content"]) == script and "&lt;" not in str(base[0]["content"])
    cfg = app[2].get_config_file()
    bots = [c["props"] for c in cfg["components"] if c["type"] == "chatbot"]
    assert len(bots) == 2 and all(p.get("sanitize_html", True) is True for p in bots)


@pytest.mark.slow
def test_a_second_start_of_the_same_session_follows_its_active_run(app):
    client, manager, _ = app
    train = dict(data_file=handle_file(DOMAINS), task="classification", model="bundled:minilm-l6",
                 strategy="frozen", max_length=32, api_name="/train",
                 overrides="max_steps=100000\nlogging_steps=50\neval_strategy=no\nsave_strategy=no")
    first = client.submit(**train)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (first.outputs() and first.outputs()[-1][0]):
        time.sleep(0.2)
    run_id = first.outputs()[-1][0]
    owner = f"client:{client.session_hash}"
    try:
        second = client.submit(**train)
        while time.time() < deadline and not second.outputs():
            time.sleep(0.2)
        assert second.outputs()[-1][0] == run_id            # no new run: the active one is shown
        assert [j.run_id for j in manager.jobs(owner)].count(run_id) == 1
        assert len(manager.jobs(owner, active_only=True)) == 1
    finally:
        client.predict(run_id=run_id, api_name="/stop")
    assert manager.wait(run_id, timeout=120) in ("stopped", "finished")


# ---------------------------------------------------------------------------------------------
# the page's own (private) events, called the way the page calls them




def config_of(demo) -> dict:
    return demo.get_config_file()


def component(cfg: dict, **props) -> dict:
    found = [c for c in cfg["components"] if all(c["props"].get(k) == v for k, v in props.items())]
    assert len(found) == 1, (props, len(found))
    return found[0]


def dep(cfg: dict, api_name: str) -> dict:
    return next(d for d in cfg["dependencies"] if d.get("api_name") == api_name)


def test_every_beginner_control_has_an_info_line(app):
    """Every control a beginner sets (not read-only outputs, not the hidden-label chat box) teaches."""
    cfg = config_of(app[2])
    missing = [(c["type"], c["props"].get("label")) for c in cfg["components"]
               if c["type"] in ("dropdown", "radio", "slider", "checkbox", "textbox", "number")
               and c["props"].get("interactive") is not False and c["props"].get("show_label") is not False
               and not c["props"].get("info")]
    assert not missing, missing


def test_switching_the_data_source_clears_or_reloads_the_preview(app):
    client, _, demo = app
    cfg = config_of(demo)
    url = demo.local_url.rstrip("/")
    load = dep(cfg, "load_for_source")
    switch = dep(cfg, "switch_source")
    assert load["trigger_after"] == switch["id"]                    # runs after every source switch
    assert dep(cfg, "audit_for_source")["trigger_after"] == load["id"]
    session = "sourceswitch0test"
    # upload / hub without a file or id yet: nothing of the previous file stays on screen
    for source in ("upload", "hub"):
        msg = page_call(url, "load_for_source", session, [source, None, None, "", "train", "classification"])
        assert msg["success"], msg
        summary, preview, _task, *cols, info = msg["output"]["data"]
        assert "domains.csv" not in str(summary) and ("Upload" in summary or "Hub dataset id" in summary)
        assert not (preview or {}).get("data") and not info         # (a gr.State: kept on the server)
        assert all(c.get("value", "") == "" for c in cols if isinstance(c, dict) and "choices" in c)
        cleared = page_call(url, "audit_for_source", session,
                            [None, None, "", "train", "classification", "", "", "alpaca", "", "", "", 256,
                             "bundled:minilm-l6", None, source, {}, None, 0.2, ""])
        assert cleared["success"], cleared
        audit_summary, warnings_html, _class_plot, _token_plot, table, _report = cleared["output"]["data"]
        assert audit_summary == "" and warnings_html == "" and table["data"] == []
    # back to the built-in example: it is loaded again at once
    msg = page_call(url, "load_for_source", session, ["example", None, "domains.csv", "", "train", "classification"])
    assert msg["success"], msg
    summary, preview, *_cols, info = msg["output"]["data"]
    assert "**domains.csv** · 160 rows" in summary and len(preview.get("value", preview)["data"]) == 50


def test_offline_the_hub_source_says_it_needs_the_network(app):
    source = component(config_of(app[2]), label="Data source")
    labels = dict((value, label) for label, value in source["props"]["choices"])
    assert "needs internet" in labels["hub"] and "needs internet" not in labels["example"]


def test_one_stream_at_a_time_draws_the_train_outputs(app):
    """Start, a run id typed in 'Run id' and Resume each cancel the other two streams."""
    cfg = config_of(app[2])
    ids = {name: dep(cfg, name)["id"] for name in ("train", "watch_id", "resume")}
    assert dep(cfg, "train")["trigger_mode"] == "multiple"      # a second Start reaches train() and is answered

    def cancelled_on(name):
        targets = {tuple(t) for t in dep(cfg, name)["targets"]}
        return {i for d in cfg["dependencies"] if d.get("cancels") and {tuple(t) for t in d["targets"]} & targets
                for i in d["cancels"]}

    for name, others in (("train", {"watch_id", "resume"}), ("watch_id", {"train", "resume"}),
                         ("resume", {"train", "watch_id"})):
        assert {ids[o] for o in others} <= cancelled_on(name), name


def test_evaluate_only_my_runs_and_yours_marker():
    from finetune_core.ui.evaluate_tab import baseline_rows, only_mine, runs_table

    rows = [{"run_id": "a1", "name": "mine", "status": "finished", "mine": True, "peak_rss_mb": 1234.4},
            {"run_id": "b2", "name": "theirs", "status": "finished", "mine": False}]
    assert [r["run_id"] for r in only_mine(rows, True)] == ["a1"]
    assert [r["run_id"] for r in only_mine(rows, False)] == ["a1", "b2"]
    table = runs_table(rows)
    assert table[0][0] == "mine · yours" and table[1][0] == "theirs"
    from finetune_core.ui.evaluate_tab import RUN_HEADERS

    assert all(len(row) == len(RUN_HEADERS) for row in table)
    memory = RUN_HEADERS.index("peak memory MB")
    assert table[0][memory] == "1,234" and table[1][memory] == ""        # a run without metrics: blank
    metrics = {"accuracy": 0.9, "f1_weighted": 0.88, "f1_macro": 0.87,
               "baselines": {"majority": {"accuracy": 0.25, "f1_weighted": 0.1}}}
    out = baseline_rows(metrics)
    assert out[0][1:] == ["0.9000", "0.8800", "0.8700"]
    assert out[-1][3] == "—" and "None" not in str(out) and "nan" not in str(out).lower()


def test_evaluate_layout_only_mine_on_and_options_above_their_charts(app):
    cfg = config_of(app[2])
    assert component(cfg, label="Only my runs")["props"]["value"] is True
    order = [c["props"].get("elem_id") or c["props"].get("label") for c in cfg["components"]]
    assert order.index("Normalise rows (recall per class)") < order.index("cm-plot")
    # the Run picker lists every visible run, running ones included: its info line must not say "Finished"
    infos = [str(c["props"].get("info")) for c in cfg["components"] if c["props"].get("label") == "Run"]
    assert infos and not any("Finished runs" in i for i in infos) and any("yours" in i for i in infos)


def test_chat_placeholder_is_a_note_never_context(app):
    from finetune_core.ui.chat_tab import FT_PLACEHOLDER, context_messages

    ft_bot = component(config_of(app[2]), elem_id="ft-bot")
    assert ft_bot["props"]["placeholder"] == FT_PLACEHOLDER
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "(Pick a fine-tuned run above to compare.)"},
               {"role": "assistant", "content": "A note", "metadata": {"title": "note"}},
               {"role": "assistant", "content": "⏳ Loading the model ..."},
               {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
               {"role": "tool", "content": "x"}]
    assert context_messages(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert component(config_of(app[2]), elem_id="chat-model")["props"]["label"] == "Model to test"


def test_export_offline_disables_push_and_offers_the_merged_zip(app):
    cfg = config_of(app[2])
    for label in ("Repository", "Token"):
        assert component(cfg, label=label)["props"]["interactive"] is False
    assert component(cfg, elem_id="push-btn")["props"]["interactive"] is False
    assert "Offline" in component(cfg, elem_id="push-md")["props"]["value"]
    choices = [v for _, v in component(cfg, elem_id="zip-what")["props"]["choices"]]
    assert choices == ["model", "merged"]


def test_only_the_owner_may_change_a_run_private_or_not():
    """common.can_modify / check_owner: what merge (and saving ratings) ask before writing into a run."""
    from types import SimpleNamespace

    from finetune_core.errors import FinetuneError
    from finetune_core.jobs import owner_key
    from finetune_core.ui.common import can_modify, check_owner

    owners = {"mine": owner_key("me"), "cli": None}

    def manager(private):
        return SimpleNamespace(private_runs=private,
                               is_owner=lambda run_id, owner: owners[run_id] is not None
                               and owners[run_id] == owner_key(owner),
                               status=lambda run_id: {"owner": owners[run_id]})

    for private in (False, True):
        ctx = SimpleNamespace(manager=manager(private))
        assert can_modify(ctx, "mine", "me") and not can_modify(ctx, "mine", "you")
        with pytest.raises(FinetuneError, match="Only the browser session that trained this run can merge"):
            check_owner(ctx, "mine", "you", "merge this run's adapter")
    # a run trained with the CLI (no owner): anyone on a laptop, nobody on a shared app
    assert can_modify(SimpleNamespace(manager=manager(False)), "cli", "you")
    assert not can_modify(SimpleNamespace(manager=manager(True)), "cli", "you")
