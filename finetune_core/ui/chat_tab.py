"""Chat tab: base vs fine-tuned answers side by side (streamed), ratings, held-out test, classifier probe.

Handlers are module-level functions of (ctx, ...); `wire()` binds them to the components. Every model
computation goes through generate.on_inference_thread (one torch thread for the whole app).

Sampled answers carry their seed ("seed 482913" under the answer): typed into "Fixed seed", with the
same message, settings and chat so far, it gives the same answers again.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import gradio as gr

from .. import rundir, settings
from ..config import GENERATIVE_TASKS, load_config
from ..export import merge_lora
from ..errors import FinetuneError, ModelError
from ..generate import (generate_batch, load_for_inference, on_inference_thread, predict_proba,
                        stream_generate)
from ..jobs import owner_key
from ..models import resolve_model
from ..pairs import MIN_PAIRS, build_pairs, too_few_message, write_pairs
from ..ratings import add_rating, latest_ratings, rating_summary
from .common import REPO_ROOT, AppContext, bind, dropdown_update, owner_of, run_choices, user_errors
from .generations import prompt_preview, read_generations

BASE_MODELS = [("bundled:smollm2-135m (base model only, no run)", "bundled:smollm2-135m")]
FT_PLACEHOLDER = ("**No fine-tuned model picked.** Choose an instruction run in 'Model to test' above: its answers "
                  "appear here, next to the base model's.")
RANDOM_SEEDS = 1_000_000          # drawn seeds have at most six digits: easy to read out to a room
MAX_SEED = 2**32 - 1
SEED_NOTE = re.compile(r"\n\n`seed \d+`$")


def resolve_chat_models(ctx: AppContext, choice: str, owner: str) -> tuple[str, str | None, Path | None]:
    """(base model ref, fine-tuned model dir or None, run dir or None) for a Chat dropdown value."""
    choice = (choice or "").strip()
    if not choice:
        raise FinetuneError("No model selected.", "Pick an instruction run or the bundled SmolLM2.")
    if rundir.is_run_id(choice) and (ctx.runs_dir / choice).is_dir():
        run_dir = ctx.run_dir(choice, owner)
        info = rundir.read_config(run_dir)
        if info.get("task") == "classification":
            raise FinetuneError("This run is a classifier: it predicts labels, it does not chat.",
                                "Use 'Try the classifier' below, or pick an instruction run.")
        if not (run_dir / "model").is_dir():
            raise FinetuneError("This run has no saved model yet.", "Wait for it to finish, or pick another run.")
        return info.get("model", "bundled:smollm2-135m"), str(run_dir / "model"), run_dir
    if choice.startswith("bundled:") or "/" in choice and not choice.startswith((".", "/", "~")):
        resolve_model(choice, allowed_roots=ctx.model_roots(owner))    # clear message when offline / unknown
        return choice, None, None
    raise FinetuneError(f"'{choice}' is neither a run nor a model id.", "Pick an entry from the list.")


NOT_CONTEXT = ("⏳ Loading the model", "(Pick a fine-tuned run")


def context_messages(history: list) -> list[dict]:
    """The turns sent to a model: user / assistant / system text only. Notes never are: messages with
    metadata (gradio's notes and thoughts), the loading line, and a '(Pick a fine-tuned run ...)' note
    that a history sent back by an API client may carry."""
    out = []
    for m in history:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system") or m.get("metadata"):
            continue
        text = _text(m.get("content"))
        if m["role"] == "assistant" and text.startswith(NOT_CONTEXT):
            continue
        out.append({"role": m["role"], "content": without_seed(text) if m["role"] == "assistant" else text})
    return out


def sampling_seed(fixed, do_sample) -> int | None:
    """The seed of one message's answers (both models sample from it): None when they are greedy
    (nothing is random), the fixed seed when one is typed, else a new random seed."""
    if not do_sample:
        return None
    text = "" if fixed is None else str(fixed).strip()
    if not text:
        return secrets.randbelow(RANDOM_SEEDS)
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is None or not number.is_integer() or not 0 <= number <= MAX_SEED:
        raise FinetuneError(f"The seed {text!r} is not a whole number from 0 to {MAX_SEED}.",
                            "Type the seed shown under an answer, or leave the box empty for a random seed.")
    return int(number)


def with_seed(answer: str, seed: int | None) -> str:
    """The answer as the chat shows it: with its seed underneath when it was sampled."""
    return answer if seed is None else f"{answer}\n\n`seed {seed}`"


def without_seed(answer: str) -> str:
    """The model's own words: the seed note is the app's, never context for the next turn."""
    return SEED_NOTE.sub("", answer)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(c.get("text", "")) if isinstance(c, dict) else str(c) for c in content)
    return str(content)


def _inference(ref: str):
    try:
        return on_inference_thread(load_for_inference, ref)   # all torch work on one thread (generate.py)
    except FinetuneError:
        raise
    except OSError as exc:
        raise ModelError(f"Could not load the model '{ref}': {str(exc).splitlines()[0]}",
                         "Check the run finished, or that the Hub is reachable for hub models.") from None


def ratings_md(run_dir: Path | None) -> str:
    """The average rating per model, each answer counted once with its latest score (ratings.latest_ratings)."""
    if run_dir is None:
        return "Ratings are saved per run: pick a fine-tuned run to rate its answers."
    s = rating_summary(run_dir)

    def one(name, d):
        return f"{name}: **{d['mean']:.2f}** / 5 ({d['n']} ratings)" if d["n"] else f"{name}: no ratings yet"

    return ("Average rating · " + one("base", s["base"]) + " · " + one("fine-tuned", s["finetuned"])
            + " · an answer rated again counts once, with its latest score")


def ratable_run(ctx: AppContext, run_id: str, owner: str) -> Path:
    """The run folder ratings may go to: a run this session may view (JobManager.can_view, through
    ctx.run_dir), never a path taken from the browser or the session state."""
    return ctx.run_dir(run_id, owner)


def _score_cell(value, row: int, column: str):
    """A rating cell of the held-out table: None when empty, else 1..5 (FinetuneError otherwise)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is not None and number != number:      # NaN: an empty numeric cell of a DataFrame
        return None
    if number is None or not number.is_integer() or not 1 <= number <= 5:
        raise FinetuneError(f"Row {row}, {column}: {value!r} is not a rating; nothing was saved.",
                            "Type a whole number from 1 to 5, or leave the cell empty.")
    return int(number)


def _generation_for(gens: list[dict], position: int, preview: str) -> dict | None:
    """The generations.jsonl row a table row shows: the table lists gens in order, its first column is
    prompt_preview(prompt); a table that no longer matches (the run was re-trained) gives None."""
    if position < len(gens) and prompt_preview(gens[position].get("prompt", "")) == preview:
        return gens[position]
    matches = [g for g in gens if prompt_preview(g.get("prompt", "")) == preview]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------------------------------------
# handlers


@user_errors
def refresh(ctx: AppContext, chat_current, cls_current, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    inst = run_choices(ctx, owner, task="instruction", with_model=True)
    cls = run_choices(ctx, owner, task="classification", with_model=True)
    return dropdown_update(inst + BASE_MODELS, chat_current), dropdown_update(cls, cls_current)


@user_errors
def chat(ctx: AppContext, message="", model="bundled:smollm2-135m", temperature=0.7, top_p=0.9,
         max_new_tokens=128, do_sample=True, base_history=None, finetuned_history=None, owner_state=None,
         request: gr.Request = None, seed=""):
    """Send one message to the base and the fine-tuned model; streams both answers.

    seed: empty = a new random seed; a whole number gives the same sampled answers again. Each
    sampled answer ends with its seed ("seed 1234"); greedy answers (do_sample off) have none.
    Returns (base_history, finetuned_history) in messages format: [{"role", "content"}, ...].
    """
    owner = owner_of(owner_state, request)
    message = (message or "").strip()
    if not message:
        raise FinetuneError("The message is empty.", "Type something to ask the models.")
    seed = sampling_seed(seed, do_sample)
    base_ref, ft_dir, run_dir = resolve_chat_models(ctx, model, owner)
    base_history = [m for m in (base_history or []) if isinstance(m, dict)]
    finetuned_history = [m for m in (finetuned_history or []) if isinstance(m, dict)]
    settings = dict(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                    do_sample=bool(do_sample), seed=seed)
    histories = [base_history, finetuned_history]
    refs = [base_ref, ft_dir]
    # Without a run the fine-tuned side stays empty and shows its placeholder note: a note written
    # into the history would be sent back to the model as one of its own answers.
    for h, ref in zip(histories, refs):
        if ref is not None:
            h.append({"role": "user", "content": message})
    yield base_history, finetuned_history, {}
    answers = {}
    for i, (history, ref) in enumerate(zip(histories, refs)):
        if ref is None:
            continue
        msgs = context_messages(history)
        # Loading can take a while the first time (the bundled SmolLM2 is converted once): say so.
        history.append({"role": "assistant", "content": "⏳ Loading the model ..."})
        yield base_history, finetuned_history, gr.skip()
        try:
            mdl, tok, info = _inference(ref)
        except FinetuneError:
            history.pop()
            raise
        if info["task"] not in GENERATIVE_TASKS:
            history.pop()
            raise FinetuneError(f"'{ref}' is not a generative model.", "Pick an instruction run.")
        text = ""
        history[-1]["content"] = with_seed(text, seed)
        for text in stream_generate(mdl, tok, msgs, info["template"], **settings):
            history[-1]["content"] = with_seed(text, seed)
            yield base_history, finetuned_history, gr.skip()
        answers["base" if i == 0 else "finetuned"] = text
    exchange = {"run_dir": str(run_dir) if run_dir else None, "prompt": message,
                "answer": answers.get("finetuned", "")}
    yield base_history, finetuned_history, exchange


@user_errors
def rate(ctx: AppContext, rating, exchange, model, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    if not exchange or not exchange.get("run_dir"):
        raise FinetuneError("There is no fine-tuned answer to rate yet.", "Pick a run and send a message first.")
    if rating is None:
        raise FinetuneError("No rating chosen.", "Click 1 to 5, then save.")
    # the run the answer came from, looked up again: still there and still visible to this session
    run_dir = ratable_run(ctx, Path(exchange["run_dir"]).name, owner)
    add_rating(run_dir, exchange.get("prompt", ""), "finetuned", exchange.get("answer", ""), rating,
               session=owner_key(owner))
    gr.Info("Rating saved with the run.")
    return ratings_md(run_dir), None


@user_errors
def show_ratings(ctx: AppContext, model, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    try:
        _, _, run_dir = resolve_chat_models(ctx, model, owner)
    except FinetuneError:
        run_dir = None
    return ratings_md(run_dir), [], []


PREFERENCE_CONFIG = REPO_ROOT / "examples" / "configs" / "preference_lora.yaml"


def _rated_run(ctx: AppContext, model, owner: str) -> tuple[Path, str]:
    _, ft_dir, run_dir = resolve_chat_models(ctx, model, owner)
    if run_dir is None:
        raise FinetuneError("Ratings are saved with a fine-tuned run; a base model has none.",
                            "Pick one of your instruction runs, rate its answers, then build the pairs.")
    return run_dir, ft_dir


@user_errors
def pairs_from_ratings(ctx: AppContext, model, owner_state, request: gr.Request):
    """The run's ratings as preference pairs (pairs.build_pairs): how many, and what is missing."""
    run_dir, _ = _rated_run(ctx, model, owner_of(owner_state, request))
    _, stats = build_pairs(run_dir)
    if stats["pairs"] < MIN_PAIRS:
        problem, fix = too_few_message(stats)
        return f"⚠️ {problem} {fix}"
    _, stats = write_pairs(run_dir)
    return (f"✅ **{stats['pairs']} preference pairs** ({stats['ties']} ties skipped, {stats['single']} prompts with "
            "one rated answer) saved with the run as `pairs.jsonl`, the better-rated answer chosen. *Start a "
            "preference run* teaches the fine-tuned model these preferences (DPO, LoRA).")


@user_errors
def start_preference_run(ctx: AppContext, model, owner_state, request: gr.Request):
    """A preference run (examples/configs/preference_lora.yaml) on the run's pairs, starting from the
    fine-tuned model: a LoRA run's adapter is merged into its base first (model/merged/)."""
    owner = owner_of(owner_state, request)
    run_dir, ft_dir = _rated_run(ctx, model, owner)
    path, stats = write_pairs(run_dir)            # refuses with the count when there are too few
    start = Path(ft_dir)
    if (start / "adapter_config.json").exists():
        start = on_inference_thread(merge_lora, run_dir)     # torch work stays on one thread (generate.py)
    cfg = load_config(PREFERENCE_CONFIG)
    cfg.model, cfg.data.train = str(start), str(path)
    resolve_model(cfg.model, allowed_roots=ctx.model_roots(owner))      # this session's own runs only
    job = ctx.manager.submit(cfg, owner, name=f"{run_dir.name}-preference", one_active_per_owner=True)
    return (f"🏃 Preference run `{job.run_id}` started: DPO on {stats['pairs']} pairs from your ratings, "
            "starting from this run's model. Follow it in the Train tab; then chat with it here.")


@user_errors
def heldout(ctx: AppContext, model, n, max_new_tokens, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    base_ref, ft_dir, run_dir = resolve_chat_models(ctx, model, owner)
    if run_dir is None:
        raise FinetuneError("The held-out test needs a fine-tuned run.", "Pick an instruction run above.")
    gens = read_generations(run_dir)[: int(n)]
    if not gens:
        raise FinetuneError("This run has no held-out prompts (generations.jsonl is missing).",
                            "It is written at the end of an instruction run; pick a finished run.")
    base, base_tok, base_info = _inference(base_ref)
    ft, ft_tok, ft_info = _inference(ft_dir)
    # this session's earlier ratings of the same answers fill the rating columns again
    mine = {(r.get("index"), r["model"], r.get("answer")): r["score"]
            for r in latest_ratings(run_dir, session=owner_key(owner))}
    rows = []
    for pos, g in enumerate(gens):
        prompt, index = g["prompt"], g.get("index", pos)
        b = on_inference_thread(generate_batch, base, base_tok, [prompt], ft_info["template"],
                                max_new_tokens=int(max_new_tokens))[0]
        f = on_inference_thread(generate_batch, ft, ft_tok, [prompt], ft_info["template"],
                                max_new_tokens=int(max_new_tokens))[0]
        rows.append([prompt_preview(prompt), g.get("reference", ""), b, f,
                     mine.get((index, "base", b)), mine.get((index, "finetuned", f))])
        yield rows
    gr.Info("Done: type 1-5 in the rating columns and press 'Save ratings'.")


@user_errors
def save_heldout(ctx: AppContext, table, model, owner_state, request: gr.Request):
    """Save the table's ratings with the full prompt and its generations.jsonl index.

    Saving again appends to the log; the summary counts each answer once (ratings.latest_ratings)."""
    owner = owner_of(owner_state, request)
    _, _, run_dir = resolve_chat_models(ctx, model, owner)
    if run_dir is None:
        raise FinetuneError("No run selected.", "Pick an instruction run above.")
    run_dir = ratable_run(ctx, run_dir.name, owner)
    values = table.values.tolist() if hasattr(table, "values") else (table or [])
    gens = read_generations(run_dir)
    todo = []          # validate every cell first: a typo saves nothing rather than half the table
    for pos, row in enumerate(values):
        if len(row) < 6:
            continue
        cells = [(name, answer, _score_cell(row[col], pos + 1, label)) for col, name, answer, label in
                 ((4, "base", row[2], "base rating"), (5, "finetuned", row[3], "fine-tuned rating"))]
        cells = [c for c in cells if c[2] is not None]
        if not cells:
            continue
        g = _generation_for(gens, pos, str(row[0]))
        if g is None:
            raise FinetuneError(f"Row {pos + 1} of the table is not one of this run's held-out prompts "
                                "any more; nothing was saved.", "Run the held-out test again, then rate.")
        todo += [(g, name, answer, score) for name, answer, score in cells]
    if not todo:
        raise FinetuneError("No ratings to save.", "Type numbers from 1 to 5 in the two rating columns.")
    for g, name, answer, score in todo:
        add_rating(run_dir, g["prompt"], name, str(answer or ""), score, session=owner_key(owner),
                   index=int(g.get("index", gens.index(g))))
    gr.Info(f"{len(todo)} ratings saved with the run.")
    return ratings_md(run_dir)


@user_errors
def predict(ctx: AppContext, text="", run="", owner_state=None, request: gr.Request = None):
    """Class probabilities of a fine-tuned classifier for one text: {label: probability}."""
    owner = owner_of(owner_state, request)
    text = (text or "").strip()
    if not text:
        raise FinetuneError("The text is empty.", "Type a sentence to classify.")
    run_dir = ctx.run_dir(run, owner)
    if rundir.read_config(run_dir).get("task") != "classification":
        raise FinetuneError("This run is not a classifier.", "Pick a classification run.")
    if not (run_dir / "model").is_dir():
        raise FinetuneError("This run has no saved model yet.", "Wait for it to finish.")
    model, tok, info = _inference(str(run_dir / "model"))
    max_length = int((info.get("run") or {}).get("data", {}).get("max_length", 256))
    return on_inference_thread(predict_proba, model, tok, text, max_length=max_length)


# ---------------------------------------------------------------------------------------------
# UI


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Ask the **base model** and your **fine-tuned model** the same thing with the same settings. "
                "Rate the answers: averages are saved with the run (`ratings.jsonl`).")
    with gr.Row():
        ui.chat_model = gr.Dropdown(BASE_MODELS, value="bundled:smollm2-135m", label="Model to test",
                                    allow_custom_value=True, scale=4, elem_id="chat-model",
                                    info="An instruction run: its fine-tuned model answers on the right, the base "
                                         "model it started from on the left. Or a base model alone (left only).")
        ui.chat_refresh = gr.Button("↻ Refresh", size="sm", scale=1, elem_id="chat-refresh")
    with gr.Accordion("Generation settings (shared by both models)", open=False):
        with gr.Row():
            ui.temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature",
                                       info="Randomness: 0.2 focused, 0.7 natural, >1 creative / erratic.")
            ui.top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p",
                                 info="Sample only from the most likely words covering this probability mass.")
            ui.max_new_tokens = gr.Slider(8, 512, value=128, step=8, label="Max new tokens",
                                          info="Upper bound on the answer length.")
        with gr.Row():
            ui.do_sample = gr.Checkbox(True, label="Sampling",
                                       info="Off = greedy: always the most likely word (repeatable).")
            ui.chat_seed = gr.Textbox("", label="Fixed seed", placeholder="random", max_lines=1,
                                      elem_id="chat-seed",
                                      info="Empty: a new random seed per message, shown under each answer. Type "
                                           "one (e.g. from an answer) and the same message gives the same answers "
                                           "again: the whole room sees the same text.")
    with gr.Row():
        ui.base_bot = gr.Chatbot(label="Base model", height=360, buttons=["copy"], elem_id="base-bot")
        ui.ft_bot = gr.Chatbot(label="Fine-tuned model", height=360, buttons=["copy"], elem_id="ft-bot",
                               placeholder=FT_PLACEHOLDER)
    with gr.Row():
        # no label or info line: the intro above says what it does, and the box stays level with Send
        ui.chat_msg = gr.Textbox(placeholder="Type a message and press Enter", label="Message", show_label=False,
                                 scale=5, max_lines=4, elem_id="chat-msg")
        ui.chat_send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        ui.chat_clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    with gr.Row():
        ui.chat_rating = gr.Radio([1, 2, 3, 4, 5], label="Rate the last fine-tuned answer (1 = bad, 5 = great)",
                                  scale=3, elem_id="chat-rating",
                                  info="Your judgement is the metric that matters for style: ratings are "
                                       "saved with the run and averaged.")
        ui.chat_rate_btn = gr.Button("Save rating", scale=1)
    ui.ratings_md = gr.Markdown("", elem_id="ratings-md")
    with gr.Accordion("Held-out test: the run's validation prompts, both models, your ratings", open=False):
        with gr.Row():
            ui.heldout_n = gr.Slider(1, 20, value=5, step=1, label="Prompts", info="More prompts take longer on CPU.")
            ui.heldout_btn = gr.Button("Run held-out test", variant="secondary")
        ui.heldout_table = gr.Dataframe(
            headers=["prompt", "reference", "base answer", "fine-tuned answer", "base rating", "fine-tuned rating"],
            datatype=["str", "str", "str", "str", "number", "number"], interactive=True, static_columns=[0, 1, 2, 3],
            column_widths=["20%", "18%", "23%", "23%", "8%", "8%"],
            wrap=True, max_height=420, label="Type 1-5 in the rating columns, then save")
        ui.heldout_save = gr.Button("Save ratings")
        gr.Markdown("**From ratings to preference tuning.** Each prompt whose two answers you rated differently "
                    f"becomes a pair (better answer chosen); a run needs {MIN_PAIRS} pairs.")
        with gr.Row():
            ui.pairs_btn = gr.Button("Build preference pairs from the ratings", elem_id="pairs-btn")
            ui.pairs_run_btn = gr.Button("Start a preference run on them", elem_id="pairs-run-btn")
        ui.pairs_md = gr.Markdown("", elem_id="pairs-md")
    gr.Markdown("### Try the classifier")
    with gr.Row():
        with gr.Column(scale=3):
            ui.cls_run = gr.Dropdown([], label="Classification run", allow_custom_value=True,
                                     info="A finished classification run of the Train tab.")
            ui.cls_text = gr.Textbox(label="Text", lines=3, placeholder="Type a sentence to classify",
                                     info="Try sentences unlike the training rows: that is where models fail.")
            ui.cls_btn = gr.Button("Classify", variant="primary")
        ui.cls_label = gr.Label(label="Class probabilities", num_top_classes=10, scale=2, elem_id="cls-label")
    ui.last_exchange = gr.State({})


def wire(ctx: AppContext, ui) -> None:
    refresh_inputs = [ui.chat_model, ui.cls_run, ui.owner_state]
    refresher = bind(ctx, refresh)
    ui.chat_refresh.click(refresher, refresh_inputs, [ui.chat_model, ui.cls_run], api_visibility="private")
    ui.chat_tab.select(refresher, refresh_inputs, [ui.chat_model, ui.cls_run], api_visibility="private")
    chat_inputs = [ui.chat_msg, ui.chat_model, ui.temperature, ui.top_p, ui.max_new_tokens, ui.do_sample,
                   ui.base_bot, ui.ft_bot, ui.owner_state, ui.chat_seed]
    chat_outputs = [ui.base_bot, ui.ft_bot, ui.last_exchange]
    chatter = bind(ctx, chat)
    for trigger, api in ((ui.chat_send.click, True), (ui.chat_msg.submit, False)):
        trigger(chatter, chat_inputs, chat_outputs, api_name="chat" if api else None,
                api_visibility="public" if api else "private", concurrency_id="inference",
                concurrency_limit=settings.inference_concurrency()).then(lambda: "", None, ui.chat_msg, api_visibility="private",
                                                        queue=False)
    ui.chat_clear.click(lambda: ([], [], {}), None, chat_outputs, api_visibility="private", queue=False)
    ui.chat_model.change(bind(ctx, show_ratings), [ui.chat_model, ui.owner_state],
                         [ui.ratings_md, ui.base_bot, ui.ft_bot], api_visibility="private")
    ui.chat_rate_btn.click(bind(ctx, rate), [ui.chat_rating, ui.last_exchange, ui.chat_model, ui.owner_state],
                           [ui.ratings_md, ui.chat_rating], api_visibility="private")
    ui.heldout_btn.click(bind(ctx, heldout), [ui.chat_model, ui.heldout_n, ui.max_new_tokens, ui.owner_state],
                         ui.heldout_table, api_visibility="private", concurrency_id="inference",
                         concurrency_limit=settings.inference_concurrency())
    ui.heldout_save.click(bind(ctx, save_heldout), [ui.heldout_table, ui.chat_model, ui.owner_state], ui.ratings_md,
                          api_visibility="private")
    ui.pairs_btn.click(bind(ctx, pairs_from_ratings), [ui.chat_model, ui.owner_state], ui.pairs_md,
                       api_visibility="private")
    ui.pairs_run_btn.click(bind(ctx, start_preference_run), [ui.chat_model, ui.owner_state], ui.pairs_md,
                           api_visibility="private")
    predictor = bind(ctx, predict)
    for trigger, api in ((ui.cls_btn.click, True), (ui.cls_text.submit, False)):
        trigger(predictor, [ui.cls_text, ui.cls_run, ui.owner_state], ui.cls_label,
                api_name="predict" if api else None, api_visibility="public" if api else "private",
                concurrency_id="inference", concurrency_limit=settings.inference_concurrency())
