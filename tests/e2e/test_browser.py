"""A real browser clicks through the app: upload → audit → train → evaluate → chat → export, then rates
two chat answers and builds preference pairs from them, and races the three strategies.

Bundled models, offline (the rated chat model is a tiny Llama trained here, so the test does not
train SmolLM2). Each tab is saved as a 1280x800 viewport screenshot under docs/screenshots/ (the README
shows them): data, train, evaluate, chat, chat-classifier, export, chat-pairs, compare. Run alone with:

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/e2e -m e2e
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# `make screenshots` (UPDATE_SCREENSHOTS=1) refreshes the README's pictures; a plain test run writes
# them to tests/e2e/artifacts/ (git-ignored), so `make test` leaves the tree clean.
SCREENSHOTS = REPO / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") else \
    REPO / "tests" / "e2e" / "artifacts"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DATA_FILE = REPO / "examples" / "data" / "domains.csv"
CLASSES = ("finance", "legal", "medical", "technology")
TRAIN_TIMEOUT_MS = 180_000
CHAT_TIMEOUT_MS = 180_000     # the first answer loads SmolLM2 (converted once from GGUF, cached after)


def visible_panel(page):
    """The selected tab's panel (Gradio keeps the other tabs in the DOM, hidden)."""
    return page.get_by_role("tabpanel").filter(visible=True)


def open_tab(page, name: str):
    page.get_by_role("tab", name=name).click()
    from playwright.sync_api import expect

    expect(page.get_by_role("tab", name=name)).to_have_attribute("aria-selected", "true")
    return visible_panel(page)


def wait_idle(page, scope, timeout: float = 60_000):
    """Wait until no Gradio event is pending on the components inside `scope` (their status trackers hide)."""
    page.wait_for_function(
        "root => ![...root.querySelectorAll('[data-testid=status-tracker]')].some(e => !e.classList.contains('hide'))",
        arg=scope.element_handle(), timeout=timeout)


def audit_of_upload(request) -> bool:
    """The queue request of an audit whose data file is an upload (its first input is a file, not null)."""
    if request.method != "POST" or "/queue/join" not in request.url:
        return False
    try:
        data = json.loads(request.post_data or "{}").get("data") or []
    except ValueError:
        return False
    return len(data) > 5 and isinstance(data[0], dict) and str(data[0].get("path", "")).endswith("domains.csv")


def no_error_toast(page, server, step: str):
    errors = page.locator(".toast-body.error")
    if errors.count():
        texts = " | ".join(t.strip() for t in errors.all_inner_texts())
        pytest.fail(f"{step}: the app showed an error: {texts}\n--- server log ---\n{server.log_tail()}",
                    pytrace=False)


def screenshot(page, name: str, top=None, bottom=None, offset: int = 8):
    """A 1280x800 viewport screenshot: `top` scrolled to the top edge or, when that would cut `bottom` off,
    `bottom` at the bottom edge; the mouse parked away from the controls."""
    y = 0.0
    if top is not None:
        y = top.first.evaluate("e => e.getBoundingClientRect().top + window.scrollY") - offset
    if bottom is not None:
        end = bottom.first.evaluate("e => e.getBoundingClientRect().bottom + window.scrollY") + 8
        y = max(y, end - page.viewport_size["height"])
    page.evaluate("y => window.scrollTo(0, y)", max(0.0, y))
    page.mouse.move(2, 2)
    page.wait_for_timeout(600)            # plotly transitions, scroll settling
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    if os.environ.get("FINETUNE_E2E_FULLPAGE"):          # debugging aid: the whole page as well
        full = Path(os.environ["FINETUNE_E2E_FULLPAGE"])
        full.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(full / f"{name}-full.png"), full_page=True)
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def plot_text(locator) -> str:
    """Text inside a plotly figure (axis labels, titles, legends) once it has rendered."""
    from playwright.sync_api import expect

    fig = locator.locator(".js-plotly-plot").first
    expect(fig).to_be_visible()
    return " ".join(fig.locator("svg text").all_text_contents())


def pick_option(page, combobox, option: re.Pattern):
    combobox.click()
    page.get_by_role("option", name=option).first.click()


def tiny_instruction_run(runs: Path, tiny_llama_dir: str, tmp_path: Path) -> str:
    """A finished instruction run of a tiny Llama (tests/conftest.py) in the app's runs folder: the Chat
    tab then has a fine-tuned model whose answers can be rated, without training SmolLM2 here."""
    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    data = tmp_path / "replies.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say hi number {i}.", "response": f"Hi {i}!"}) + "\n"
                            for i in range(8)))
    cfg = config_from_dict({"task": "instruction", "model": tiny_llama_dir,
                            "data": {"train": str(data), "max_length": 64, "val_size": 0.25},
                            "strategy": {"name": "full"},
                            "training": {"max_steps": 2, "eval_strategy": "no", "save_strategy": "no"},
                            "output_dir": str(runs / "tiny-chat-run"), "seed": 0})
    train(cfg)
    return "tiny-chat-run"


def test_click_through_all_tabs(page, app_server, tiny_llama_dir, tmp_path):
    from playwright.sync_api import expect

    t0 = time.time()
    timings = {}
    page.goto(app_server.url)
    expect(page.get_by_role("heading", name="FineTune Lab")).to_be_visible()

    # ------------------------------------------------------------------ 1 · Data: upload and audit
    data = open_tab(page, "1 · Data")
    # the first paint loads and audits the default example; let it finish so it cannot race the upload
    expect(data.get_by_text("looks like classification data")).to_be_visible(timeout=60_000)
    wait_idle(page, data)
    data.get_by_role("radio", name="Upload a file").check()
    # the example's preview and columns go: they would describe a file no longer selected
    expect(data.get_by_text("Upload a file above to see its preview")).to_be_visible(timeout=30_000)
    expect(data.get_by_text("looks like classification data")).to_have_count(0)
    file_input = page.locator("#data-file input[type=file]")
    expect(file_input).to_have_count(1)
    # the upload triggers load_data, then an audit of the uploaded file: wait for that audit to be sent
    with page.expect_request(audit_of_upload, timeout=60_000):
        file_input.set_input_files(str(DATA_FILE))
    wait_idle(page, data)
    expect(data.get_by_role("link", name=re.compile(r"KB"))).to_be_visible()          # the uploaded file row
    expect(data.get_by_text(re.compile(r"domains\.csv · 160 rows"))).to_be_visible()
    preview = data.get_by_role("grid", name="Preview (first 50 rows)")
    expect(preview.get_by_role("columnheader", name="label")).to_be_visible()
    expect(preview.get_by_role("gridcell", name="medical").first).to_be_visible()
    data.get_by_role("radio", name="Classification (text → label)").check()
    expect(data.get_by_label("Text column")).to_have_value("text")
    expect(data.get_by_label("Label column")).to_have_value("label")
    ml = data.get_by_label("number input for max_length (tokens)")
    ml.fill("128")
    ml.press("Tab")
    data.get_by_role("button", name="Run the data audit").click()
    summary = page.locator("#audit-summary")
    expect(summary).to_contain_text("max_length 128", timeout=60_000)        # this click's audit, not the upload's
    wait_idle(page, data)
    expect(summary).to_contain_text(re.compile(r"160 rows · 4 classes · tokens per row: .*max_length 128"))
    expect(data.get_by_text("No problems found.")).to_be_visible()
    class_plot = plot_text(page.locator("#class-plot"))
    assert "Class distribution" in class_plot and all(c in class_plot for c in CLASSES), class_plot
    assert "max_length = 128" in plot_text(page.locator("#token-plot"))
    details = data.get_by_role("grid", name="Audit details")
    expect(details.get_by_role("row", name=re.compile(r"^classes 4$"))).to_be_visible()
    # the report names the file it audited: the uploaded copy, not the bundled example
    report = data.get_by_role("button", name=re.compile("Full audit report"))
    report.click()
    report_json = page.locator("#audit-json")
    expect(report_json).to_contain_text("domains.csv")
    expect(report_json).not_to_contain_text("examples/data")
    report.click()
    no_error_toast(page, app_server, "data audit")
    screenshot(page, "data", top=page.get_by_role("tablist"))
    timings["data"] = time.time() - t0

    # ------------------------------------------------------------------ 2 · Train: frozen MiniLM, a short run
    train = open_tab(page, "2 · Train")
    model = train.get_by_label("Base model")
    pick_option(page, model, re.compile(r"bundled:minilm-l6"))
    expect(model).to_have_value(re.compile(r"bundled:minilm-l6"))
    train.get_by_role("radio", name="Frozen backbone: only the top learns").check()
    expect(train.get_by_label("Freeze the whole backbone (train only the new head)")).to_be_checked()
    expect(train.get_by_text(re.compile(r"Trainable: [\d,]+ of [\d,]+ parameters"))).to_be_visible(timeout=60_000)
    train.get_by_label("Advanced overrides (optional)").fill("max_steps=60")
    train.get_by_role("button", name="▶ Start training").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text(re.compile(r"Training|Working|queue|Finished"), timeout=60_000)
    expect(status).to_contain_text("Finished", timeout=TRAIN_TIMEOUT_MS)
    wait_idle(page, train)
    no_error_toast(page, app_server, "training")
    text = status.inner_text()
    f1 = float(re.search(r"weighted F1 ([0-9.]+)", text).group(1))
    assert f1 > 0.5, f"the classifier barely learned: {text}"      # majority class scores 0.10 here
    run_id = train.get_by_label("Run id").input_value().strip()
    assert re.fullmatch(r"[0-9a-f]{8,}", run_id), run_id
    run_name = re.search(r"Finished: (\S+)", text).group(1)
    loss_text = plot_text(page.locator("#loss-plot"))
    assert "train loss" in loss_text and "eval loss" in loss_text, loss_text
    assert "f1_weighted" in plot_text(page.locator("#metric-plot"))
    expect(page.locator("#train-log textarea")).to_have_value(re.compile(r"training started.*step \d+/60", re.S))
    screenshot(page, "train", top=train.get_by_role("button", name="▶ Start training"), offset=16)
    timings["train"] = time.time() - t0

    # ------------------------------------------------------------------ 3 · Evaluate: metrics, baselines, confusion
    evaluate = open_tab(page, "3 · Evaluate")
    expect(evaluate.get_by_label("Run", exact=True)).to_have_value(re.compile(re.escape(run_name)), timeout=30_000)
    header = page.locator("#eval-header")
    expect(header).to_contain_text(run_name, timeout=30_000)
    expect(header).to_contain_text("strategy frozen")
    wait_idle(page, evaluate)
    expect(evaluate.get_by_label("Only my runs")).to_be_checked()
    baselines = page.locator("#eval-baselines")
    for row in ("fine-tuned", "majority class", "TF-IDF + logistic regression"):
        expect(baselines.get_by_role("gridcell", name=row, exact=True)).to_be_visible()
    fine_tuned_row = baselines.get_by_role("row", name=re.compile(r"^fine-tuned "))
    scores = [float(x) for x in re.findall(r"\d\.\d+", fine_tuned_row.inner_text())]
    assert scores and abs(scores[1] - f1) < 0.002, (scores, f1)    # the same weighted F1 as the Train tab
    cm = plot_text(page.locator("#cm-plot"))
    assert "Confusion matrix" in cm and all(c in cm for c in CLASSES), cm
    assert "F1 per class" in plot_text(page.locator("#f1-plot"))
    no_error_toast(page, app_server, "evaluate")
    screenshot(page, "evaluate", top=header, bottom=page.locator("#cm-plot"), offset=12)
    timings["evaluate"] = time.time() - t0

    # ------------------------------------------------------------------ 4 · Chat: classifier probe, then SmolLM2
    chat = open_tab(page, "4 · Chat")
    expect(chat.get_by_label("Classification run")).to_have_value(re.compile(re.escape(run_name)), timeout=30_000)
    chat.get_by_placeholder("Type a sentence to classify").fill(
        "The court dismissed the lawsuit for lack of jurisdiction.")
    chat.get_by_role("button", name="Classify").click()
    label = page.locator("#cls-label")
    expect(label).to_contain_text("%", timeout=60_000)
    probs = dict(re.findall(r"(finance|legal|medical|technology)\s+(\d+)%", label.inner_text()))
    assert set(probs) == set(CLASSES), label.inner_text()
    assert max(probs, key=lambda k: int(probs[k])) == "legal", probs
    assert 97 <= sum(int(v) for v in probs.values()) <= 103, probs

    expect(chat.get_by_label("Model to test")).to_have_value(re.compile(r"smollm2-135m"))
    chat.get_by_text("Generation settings (shared by both models)").click()
    tokens = chat.get_by_label("number input for Max new tokens")
    tokens.fill("16")
    tokens.press("Tab")
    chat.get_by_label("Sampling").uncheck()                     # greedy: the same answer every run
    expect(chat.get_by_label("range slider for Max new tokens")).to_have_value("16")
    chat.get_by_text("Generation settings (shared by both models)").click()   # fold it again for the screenshot
    # record every text the base model's answer bubble shows: a streamed answer grows in several steps
    page.evaluate("""() => {
        window.__answers = [];
        const root = document.querySelector('#base-bot');
        new MutationObserver(() => {
            const bots = root.querySelectorAll('[data-testid="bot"]');
            const t = bots.length ? bots[bots.length - 1].innerText.trim() : '';
            if (t && window.__answers[window.__answers.length - 1] !== t) window.__answers.push(t);
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""")
    message = chat.get_by_placeholder("Type a message and press Enter")
    message.fill("What is the capital of France?")
    chat.get_by_role("button", name="Send").click()
    base_answer = page.locator("#base-bot [data-testid='bot']").last
    # (the first message on a fresh machine waits for the one-off GGUF conversion before it shows)
    expect(page.locator("#base-bot [data-testid='user']").last).to_contain_text("capital of France",
                                                                                timeout=CHAT_TIMEOUT_MS)
    # no run picked: the fine-tuned pane shows a note, and no made-up answer enters its history
    expect(page.locator("#ft-bot")).to_contain_text("No fine-tuned model picked")
    expect(page.locator("#ft-bot [data-testid='bot']")).to_have_count(0)
    expect(base_answer).to_have_text(re.compile(r"\w{2,}"), timeout=CHAT_TIMEOUT_MS)
    expect(message).to_have_value("", timeout=CHAT_TIMEOUT_MS)            # cleared once the stream has ended
    wait_idle(page, chat)
    no_error_toast(page, app_server, "chat")
    answer = base_answer.inner_text().strip()
    seen = page.evaluate("() => window.__answers")
    assert seen and seen[-1] == answer, (seen, answer)
    assert len(seen) >= 2, f"the answer arrived in one piece, not streamed: {seen}"
    assert len(answer.split()) <= 20, f"max new tokens 16 was not applied: {answer!r}"
    screenshot(page, "chat", top=page.get_by_role("tablist"), bottom=page.locator("#chat-send"))

    # sampling: the answer shows its seed, and that seed typed into "Fixed seed" gives the same answer again
    chat.get_by_text("Generation settings (shared by both models)").click()
    chat.get_by_label("Sampling").check()
    sampled = []
    for seed in ("", None):
        page.locator("#chat-clear").click()
        if seed is None:
            page.locator("#chat-seed textarea, #chat-seed input").first.fill(re.search(r"seed (\d+)$", sampled[0])[1])
        message.fill("Say hi in five words.")
        chat.get_by_role("button", name="Send").click()
        expect(base_answer).to_have_text(re.compile(r"seed \d+\s*$"), timeout=CHAT_TIMEOUT_MS)
        expect(message).to_have_value("", timeout=CHAT_TIMEOUT_MS)
        wait_idle(page, chat)
        sampled.append(base_answer.inner_text().strip())
    no_error_toast(page, app_server, "sampled chat")
    assert sampled[1] == sampled[0], sampled
    screenshot(page, "chat-classifier", top=chat.get_by_role("heading", name="Try the classifier"), offset=16)
    timings["chat"] = time.time() - t0

    # ------------------------------------------------------------------ 5 · Export: zip, snippet, predict a file
    export = open_tab(page, "5 · Export")
    expect(export.get_by_label("Run", exact=True)).to_have_value(re.compile(re.escape(run_name)), timeout=30_000)
    expect(export.get_by_text(re.compile(r"full model · weights [\d.]+ MB"))).to_be_visible(timeout=30_000)
    expect(export.get_by_role("button", name="Merge LoRA adapter")).to_be_disabled()      # not a LoRA run
    export.get_by_role("button", name="Build zip").click()
    expect(page.locator("#zip-file")).to_contain_text(re.compile(r"\.zip"), timeout=120_000)
    expect(page.locator("#zip-file").get_by_role("link")).to_have_attribute("href", re.compile(r"\.zip$"))
    expect(page.locator("#zip-file").get_by_role("cell", name=f"model-{run_id[:6]}.zip")).to_be_visible()  # whole
    expect(export.get_by_role("button", name="Push")).to_be_disabled()                    # offline
    expect(export.get_by_placeholder("your-name/my-model")).to_be_disabled()
    expect(export.get_by_text("pipeline(").first).to_be_visible()
    expect(page.locator("#gguf-btn")).to_be_disabled()                                    # a classifier
    expect(page.locator("#gguf-md")).to_contain_text("pick an instruction run")
    page.locator("#bp-file input[type=file]").set_input_files(str(DATA_FILE))           # predict a file
    expect(page.locator("#bp-file").get_by_role("link", name=re.compile(r"KB"))).to_be_visible(timeout=30_000)
    page.locator("#bp-btn").click()
    expect(page.locator("#bp-md")).to_contain_text("160 rows (labels and class probabilities)", timeout=120_000)
    expect(page.locator("#bp-out").get_by_role("link")).to_have_attribute("href",
                                                                          re.compile(r"predictions-domains\.csv$"))
    wait_idle(page, export)
    no_error_toast(page, app_server, "export")
    screenshot(page, "export", top=export, bottom=page.locator("#bp-md"), offset=12)
    timings["export"] = time.time() - t0

    # ------------------------------------------------------------------ 4 · Chat again: rate two answers, build pairs
    # an instruction run of a tiny Llama, trained here into the app's runs folder as the CLI would
    tiny_run = tiny_instruction_run(app_server.home / "runs", tiny_llama_dir, tmp_path)
    chat = open_tab(page, "4 · Chat")
    page.locator("#chat-refresh").click()
    pick_option(page, chat.get_by_label("Model to test"), re.compile(tiny_run))
    page.locator("#chat-seed textarea, #chat-seed input").first.fill("")        # a new random seed per message
    finetuned_answer = page.locator("#ft-bot [data-testid='bot']").last
    for score in ("5", "1"):                   # the same prompt twice: two sampled answers, rated apart
        page.locator("#chat-clear").click()
        message.fill("Say hi in five words.")
        chat.get_by_role("button", name="Send").click()
        expect(finetuned_answer).to_have_text(re.compile(r"seed \d+\s*$"), timeout=CHAT_TIMEOUT_MS)
        expect(message).to_have_value("", timeout=CHAT_TIMEOUT_MS)
        wait_idle(page, chat)
        page.locator("#chat-rating").get_by_label(score, exact=True).check()
        chat.get_by_role("button", name="Save rating").click()
        rated = 1 if score == "5" else 2
        expect(page.locator("#ratings-md")).to_contain_text(re.compile(rf"fine-tuned: \S+ / 5 \({rated} ratings"))
    chat.get_by_text("Held-out test: the run's validation prompts").click()
    page.locator("#pairs-btn").click()
    pairs_md = page.locator("#pairs-md")
    expect(pairs_md).to_contain_text("Your ratings give 1 preference pair (0 prompts skipped as ties", timeout=30_000)
    expect(pairs_md).to_contain_text("7 more prompts")
    no_error_toast(page, app_server, "ratings to pairs")
    screenshot(page, "chat-pairs", top=page.locator("#ratings-md"), offset=60)
    timings["ratings"] = time.time() - t0

    # ------------------------------------------------------------------ 2 · Train again: the strategy race
    train = open_tab(page, "2 · Train")
    train.get_by_label("Advanced overrides (optional)").fill("max_steps=6")
    train.get_by_role("button", name="⚖ Compare strategies").click()
    table = page.locator("#compare-table")
    expect(table).to_be_visible(timeout=30_000)
    for name in ("Frozen backbone", "LoRA", "Full fine-tuning"):
        expect(table.get_by_role("row", name=re.compile(rf"^{name}.* ok ")).first).to_be_visible(
            timeout=TRAIN_TIMEOUT_MS)
    wait_idle(page, train)
    no_error_toast(page, app_server, "compare strategies")
    peaks = {}
    for name in ("Frozen backbone", "LoRA", "Full fine-tuning"):
        cells = [c.strip() for c in table.get_by_role("row", name=re.compile(rf"^{name}")).first
                 .get_by_role("gridcell").all_inner_texts()]
        assert re.fullmatch(r"[0-9.]+ → [0-9.]+", cells[2]), cells               # weighted F1 before → after
        peaks[name] = float(cells[6].replace(",", ""))                            # peak memory, MB
    # each run's own peak (not the app's, which started it): full fine-tuning holds the most
    assert 100 < peaks["Frozen backbone"] < peaks["Full fine-tuning"], peaks
    race = plot_text(page.locator("#compare-plot"))
    assert "Quality against training time" in race and "LoRA" in race, race
    expect(page.locator("#compare-md")).to_contain_text("TF-IDF")
    screenshot(page, "compare", top=page.locator("#compare-panel"), offset=12)
    timings["compare"] = time.time() - t0

    assert not page.page_errors, f"JavaScript errors in the page: {page.page_errors}"
    print("\ncumulative seconds per tab:", {k: round(v, 1) for k, v in timings.items()})
