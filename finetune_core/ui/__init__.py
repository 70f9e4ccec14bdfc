"""The Gradio app: Data → Train → Evaluate → Chat → Export. The only package that imports gradio.

    from finetune_core.ui import build_app, launch
    demo = build_app()            # a gr.Blocks; training jobs run in worker processes
    launch(demo)                  # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, default 127.0.0.1:7860

Stable API names (gradio_client): audit, train, stop, chat, predict, predict_file. Every other event is
private.
Each tab module has build(ctx, ui) (its components, kept on the shared `ui` namespace) and
wire(ctx, ui) (its event bindings); its handlers are module-level functions of (ctx, ...).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

# Quiet libraries before anything imports transformers (the server log stays readable).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .. import settings  # noqa: E402
from ..jobs import JobManager  # noqa: E402
from ..limits import auth  # noqa: E402

# Gradio keeps uploads and the files it serves (zips, predictions.csv) in its temp folder: put it
# inside FINETUNE_HOME, the app's workspace, rather than the machine's /tmp (unless set already).
# Set before gradio is imported, which reads it.
os.environ.setdefault("GRADIO_TEMP_DIR", str(settings.home() / "tmp" / "gradio"))
CACHE_MAX_AGE_S = 6 * 3600      # gradio's delete_cache below, and the sweep at launch

import gradio as gr  # noqa: E402

from . import chat_tab, compare_panel, data_tab, evaluate_tab, export_tab, train_tab  # noqa: E402
from .common import (CSS, AppContext, bind, dropdown_update, limits_line, owner_of, run_choices,  # noqa: E402
                     upload_limit_mb, warm_ml_imports)

__all__ = ["build_app", "launch", "AppContext", "apply_space_defaults"]

INTRO = """# FineTune Lab
Fine-tune a classifier or a small chat model on your own data, see how good it is, talk to it, export it.
**1 Data** → **2 Train** → **3 Evaluate** → **4 Chat** → **5 Export**. Everything runs on this machine, offline
with the bundled models."""


def sweep_gradio_temp(max_age_s: float = CACHE_MAX_AGE_S) -> int:
    """Remove what an earlier app process left in gradio's temp folder (uploads, served zips) once older
    than max_age_s. gradio's delete_cache only cleans files of its own process, and on a Space this
    folder sits on the paid persistent volume: a crashed process's files would stay forever."""
    folder = Path(os.environ.get("GRADIO_TEMP_DIR", ""))
    if not folder.is_dir():
        return 0
    removed, cutoff = 0, time.time() - max_age_s
    for entry in folder.iterdir():
        try:
            if entry.lstat().st_mtime < cutoff:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def apply_space_defaults(environ=os.environ) -> bool:
    """On a Hugging Face Space (SPACE_ID is set) turn demo mode on unless FINETUNE_DEMO_MODE is set.

    A Space pushed as is must not start open: no limits, runs shared between visitors, the owner's
    HF_TOKEN within everyone's reach. FINETUNE_DEMO_MODE=0 opts out. docker/entrypoint.sh does the
    same; this covers `python app.py` started some other way. Returns whether demo mode was turned on.
    """
    return settings.apply_space_defaults(environ)


def init_session(stored):
    """A random id per browser, kept in localStorage (encrypted): jobs belong to it across reloads."""
    if not (isinstance(stored, str) and re.fullmatch(r"[0-9a-f]{32}", stored)):
        stored = secrets.token_hex(16)
    return stored, stored


def after_train(ctx: AppContext, run_id, eval_current, chat_current, cls_current, exp_current, owner_state,
                request: gr.Request):
    """The run pickers of Evaluate, Chat (chat and classifier) and Export, the new run selected."""
    owner = owner_of(owner_state, request)
    try:
        inst = run_choices(ctx, owner, task="instruction", with_model=True)
        cls = run_choices(ctx, owner, task="classification", with_model=True)
        every = run_choices(ctx, owner)
        with_model = run_choices(ctx, owner, with_model=True)
    except Exception:  # noqa: BLE001 - a refresh must never break the page
        return [gr.skip()] * 4
    return (dropdown_update(every, eval_current, run_id),
            dropdown_update(inst + chat_tab.BASE_MODELS, chat_current, run_id),
            dropdown_update(cls, cls_current, run_id),
            dropdown_update(with_model, exp_current, run_id))


def build_app(manager: JobManager | None = None, ctx: AppContext | None = None) -> gr.Blocks:
    """Build the Blocks app. Pass a JobManager to choose where runs live (default FINETUNE_HOME/runs)."""
    if ctx is None:
        ctx = AppContext(manager=manager or JobManager())
    ui = SimpleNamespace()
    with gr.Blocks(title="FineTune Lab", fill_width=False, delete_cache=(3600, CACHE_MAX_AGE_S)) as demo:
        demo.ft_context = ctx
        ui.browser_state = gr.BrowserState(None, storage_key="finetune_lab_session", secret=ctx.session_secret)
        ui.owner_state = gr.State(None)
        gr.Markdown(INTRO + ("\n\n" + limits_line() if limits_line() else ""))
        with gr.Tabs():
            with gr.Tab("1 · Data", id="data"):
                data_tab.build(ctx, ui)
            with gr.Tab("2 · Train", id="train") as ui.train_tab:
                train_tab.build(ctx, ui)
                compare_panel.build(ui)
            with gr.Tab("3 · Evaluate", id="evaluate") as ui.eval_tab:
                evaluate_tab.build(ctx, ui)
            with gr.Tab("4 · Chat", id="chat") as ui.chat_tab:
                chat_tab.build(ctx, ui)
            with gr.Tab("5 · Export", id="export") as ui.export_tab:
                export_tab.build(ctx, ui)

        ui.session_load = demo.load(init_session, ui.browser_state, [ui.browser_state, ui.owner_state],
                                    api_visibility="private", queue=False)
        data_tab.wire(ctx, ui)
        train_tab.wire(ctx, ui)
        compare_panel.wire(ctx, ui)
        evaluate_tab.wire(ctx, ui)
        chat_tab.wire(ctx, ui)
        export_tab.wire(ctx, ui)
        # first paint: the default example's preview, then the parameter count and the run lists
        data_tab.first_paint(ctx, ui)
        refresh_pickers = bind(ctx, after_train)
        refresh_inputs = [ui.run_id, ui.eval_run, ui.chat_model, ui.cls_run, ui.exp_run, ui.owner_state]
        refresh_outputs = [ui.eval_run, ui.chat_model, ui.cls_run, ui.exp_run]
        ui.train_event.then(refresh_pickers, refresh_inputs, refresh_outputs, api_visibility="private")
        ui.session_load.then(refresh_pickers, refresh_inputs, refresh_outputs, api_visibility="private")
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Launch with the app's theme and limits; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are respected."""
    max_mb = upload_limit_mb()
    options = dict(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=int(max_mb * 1_000_000),   # bytes: gradio reads "50mb" as 50 MiB, the engine as 50e6
        theme=gr.themes.Soft(), css=CSS, show_error=True,
        max_threads=settings.max_threads(),
    )
    login = auth()                      # FINETUNE_AUTH="user:password"
    if login:
        options["auth"] = [login]
    options.update(kwargs)
    sweep_gradio_temp()
    demo.queue(default_concurrency_limit=settings.default_concurrency())

    def warm():
        time.sleep(settings.warmup_delay())   # let the server answer first
        warm_ml_imports()

    threading.Thread(target=warm, name="warm-ml-imports", daemon=True).start()
    return demo.launch(**options)
