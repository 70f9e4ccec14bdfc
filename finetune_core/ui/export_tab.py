"""Export tab: portable zip, LoRA merge, push to the Hub, GGUF for llama.cpp/Ollama, predictions for a
file, usage snippet.

Handlers are module-level functions of (ctx, ...); `wire()` binds them to the components. Those that
compute with a model (merge, GGUF, predictions) run it on the inference thread (generate.py).
`predict_file` is a public endpoint (gradio_client: api_name="/predict_file").
"""

from __future__ import annotations

import os
import queue
from pathlib import Path

import gradio as gr

from ..config import GENERATIVE_TASKS
from .. import batch_predict, export, rundir
from ..errors import FinetuneError
from ..generate import on_inference_thread, submit_inference
from ..limits import demo_mode, safe_filename
from .common import (AppContext, bind, can_modify, check_owner, dropdown_update, is_offline, owner_of, run_choices,
                     upload_limit_mb, user_errors)


ZIP_CHOICES = [("As trained", "model"), ("Merged LoRA model", "merged")]
QUANT_CHOICES = [("f16 (half of float32)", "f16"), ("q8_0 (8-bit, about half of f16)", "q8_0")]
DATA_TYPES = [".csv", ".tsv", ".json", ".jsonl", ".parquet"]


def push_allowed() -> bool:
    """Demo mode (a public Space) hides push-to-hub unless the Space owner configured HF_TOKEN."""
    return not demo_mode() or bool(os.environ.get("HF_TOKEN"))


def shared_deployment(ctx: AppContext) -> bool:
    """Demo mode or private runs: many visitors, so the server's HF_TOKEN is not theirs to use."""
    return demo_mode() or bool(ctx.manager.private_runs)


def token_placeholder(ctx: AppContext) -> str:
    if not os.environ.get("HF_TOKEN"):
        return "hf_... (a token with write access)"
    if not shared_deployment(ctx):
        return "hf_... (or leave empty to use HF_TOKEN)"
    ns = export.push_namespace()
    return (f"hf_... (or leave empty to push to {ns}/... with the app's token)" if ns
            else "hf_... (your own token: this shared app does not lend its own)")


def short_name(run_id: str, what: str) -> str:
    """'model-39ef49' / 'merged-39ef49': short enough that the file box shows it whole."""
    return f"{'merged' if what == 'merged' else 'model'}-{run_id[:6]}"


# ---------------------------------------------------------------------------------------------
# handlers


@user_errors
def refresh(ctx: AppContext, current, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    return dropdown_update(run_choices(ctx, owner, with_model=True), current)


@user_errors
def show(ctx: AppContext, run_id, what, owner_state, request: gr.Request):
    """What the run holds, its loading snippet, and which buttons apply (merge: LoRA; GGUF: chat models)."""
    off = gr.update(interactive=False)
    if not run_id:
        return "Pick a run with a saved model.", "", off, None, off, None, ""
    run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
    model_dir = rundir.model_dir(run_dir)
    if not model_dir.is_dir():
        return "This run has no saved model yet.", "", off, None, off, None, ""
    lora = (model_dir / "adapter_config.json").exists()
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
    merged = rundir.merged_dir(run_dir).is_dir()
    chat = rundir.read_config(run_dir).get("task") in GENERATIVE_TASKS
    info = (f"`{run_id}` · {'LoRA adapter' if lora else 'full model'} · weights {size:.1f} MB"
            + (" · merged copy available" if merged else ""))
    return (info, snippet_for(run_dir, run_id, what), gr.update(interactive=lora), None, gr.update(interactive=chat),
            None, "" if chat else "GGUF is for chat models: pick an instruction run.")


@user_errors
def pick_run(ctx: AppContext, run_id, owner_state, request: gr.Request):
    """A new run: zip what suits it (a LoRA classifier: its merged model, a plain model for pipeline())."""
    if not run_id:
        return "model"
    return "merged" if export.merged_by_default(ctx.run_dir(run_id, owner_of(owner_state, request))) else "model"


def snippet_for(run_dir, run_id, what) -> str:
    """The loading code for the files the zip holds (its top folder is short_name)."""
    merged = what == "merged" and (rundir.model_dir(run_dir) / "adapter_config.json").exists()
    return export.usage_snippet_for_run(run_dir, model_dir=short_name(run_id, "merged" if merged else "model"),
                                        merged=merged)


@user_errors
def build_zip(ctx: AppContext, run_id, owner_state, what="model", request: gr.Request = None):
    owner = owner_of(owner_state, request)
    run_dir = ctx.run_dir(run_id, owner)
    what = what if what in ("model", "merged") else "model"
    merged = what == "merged"
    if merged and not (rundir.model_dir(run_dir) / "adapter_config.json").exists():
        raise FinetuneError("This run trained a full model: there is no LoRA adapter to merge.",
                            "Pick 'As trained' for this run.")
    if merged and not rundir.merged_dir(run_dir).is_dir():
        if not can_modify(ctx, run_id, owner):
            raise FinetuneError("This run has no merged model yet, and merging writes into the run folder, which "
                                "only the session that trained it may change.", "Pick 'As trained'.")
        on_inference_thread(export.merge_lora, run_dir)      # torch work stays on one thread (generate.py)
    name = short_name(run_id, what)
    path = export.zip_model(run_dir, dest=ctx.temp_dir() / f"{name}.zip", merged=merged, folder=name)
    return str(path), snippet_for(run_dir, run_id, what)


@user_errors
def build_gguf(ctx: AppContext, run_id, quant, owner_state, request: gr.Request):
    """A GGUF (adapter merged in) and its Ollama Modelfile to download, with the commands that run them."""
    run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
    quant = quant if quant in export.GGUF_QUANTS else "f16"
    result = on_inference_thread(export.export_gguf_for_run, run_dir, quant, ctx.temp_dir())
    files = [str(result.gguf_path)] + ([str(result.modelfile_path)] if result.modelfile_path else [])
    note = (f"✅ `{result.gguf_path.name}` ({result.size_bytes / 1e6:.0f} MB, {quant}): weights, tokenizer and "
            "chat template in one file. Download both files into one folder, then:\n\n"
            f"```bash\n{export.gguf_commands(result, cd=False)}\n```")
    return files, note


@user_errors
def predict_file(ctx: AppContext, data_file=None, run="", owner_state=None, request: gr.Request = None,
                 progress=gr.Progress()):
    """A fine-tuned model over every row of a CSV/TSV/JSON/JSONL/Parquet file: a CSV of predictions (a
    classifier: label, confidence, class probabilities; an instruction run: generated responses)."""
    run_dir = ctx.run_dir(run, owner_of(owner_state, request))
    if not data_file:
        raise FinetuneError("No file was uploaded.", "Upload a CSV, TSV, JSON, JSONL or Parquet file.")
    source = Path(data_file if isinstance(data_file, str) else getattr(data_file, "name", data_file))
    if not source.is_file():
        raise FinetuneError("The uploaded file is no longer on the server.", "Upload it again.")
    dest = ctx.temp_dir() / f"predictions-{safe_filename(source.stem, 'data')}.csv"
    done = queue.SimpleQueue()
    progress(0, desc="Loading the model")
    job = submit_inference(batch_predict.predict_file, run_dir, source, dest, progress=lambda *n: done.put(n),
                           max_bytes=int(upload_limit_mb() * 1e6))
    while not job.done() or not done.empty():
        try:
            rows, total = done.get(timeout=0.2)
        except queue.Empty:
            continue
        progress((rows, total), desc="Predicting", unit="rows")
    result = job.result()
    blank = f", {result.blank_rows} without text left blank" if result.blank_rows else ""
    what = "labels and class probabilities" if result.task == "classification" else "generated responses"
    return str(result.path), (f"✅ {result.rows} rows ({what}{blank}), read from "
                              f"{', '.join(f'`{c}`' for c in result.source_columns)}.")


@user_errors
def merge(ctx: AppContext, run_id, owner_state, request: gr.Request):
    owner = owner_of(owner_state, request)
    run_dir = ctx.run_dir(run_id, owner)
    # Merging writes into the run folder: only its owner may, private runs or not.
    check_owner(ctx, run_id, owner, "merge this run's adapter")
    path = on_inference_thread(export.merge_lora, run_dir)   # torch work stays on one thread (generate.py)
    return (f"✅ Merged model written to `model/{path.name}/`. Pick 'Merged model' to zip it, or tick "
            "'Push the merged model' to upload it.")


@user_errors
def push(ctx: AppContext, run_id, repo_id, token, private, merged, owner_state, request: gr.Request):
    if not push_allowed():
        raise FinetuneError("Pushing to the Hub is off in demo mode.",
                            "The Space owner can enable it by setting the HF_TOKEN secret.")
    run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
    url = export.push_to_hub(run_dir, repo_id, token=token or None, private=bool(private), merged=bool(merged),
                             shared=shared_deployment(ctx))
    return f"✅ Pushed to [{repo_id}]({url}).", ""


def push_failed_clear():
    return ""


# ---------------------------------------------------------------------------------------------
# UI


def build(ctx: AppContext, ui) -> None:
    offline = is_offline()
    with gr.Row():
        ui.exp_run = gr.Dropdown([], label="Run", allow_custom_value=True, scale=4,
                                 info="Runs with a saved model. Pick one to see what it holds and how to load it.")
        ui.exp_refresh = gr.Button("↻ Refresh", size="sm", scale=1)
    ui.exp_info = gr.Markdown("")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("#### Download\nWeights (safetensors), tokenizer and model card. No optimizer state, "
                        "no data, no tokens.")
            ui.zip_what = gr.Radio(ZIP_CHOICES, value="model", label="What to zip", elem_id="zip-what",
                                   info="LoRA runs save an adapter (needs peft and the base model); merge "
                                        "it first for a plain model that loads on its own.")
            ui.zip_btn = gr.Button("Build zip", variant="primary")
            ui.zip_file = gr.File(label="Model zip", interactive=False, elem_id="zip-file")
        with gr.Column():
            gr.Markdown("#### Merge LoRA\nFold the adapter into the base weights: a plain model that loads "
                        "without `peft` and runs as fast as the original.")
            ui.merge_btn = gr.Button("Merge LoRA adapter")
            ui.merge_md = gr.Markdown("")
        with gr.Column(visible=push_allowed(), elem_id="push-column"):
            gr.Markdown("#### Push to the Hugging Face Hub")
            # Offline, the push controls are disabled (not only explained): nothing could reach the Hub.
            ui.push_md = gr.Markdown("⚠️ **Offline**: pushing is disabled." if offline else "", elem_id="push-md")
            ui.repo_id = gr.Textbox(label="Repository", placeholder="your-name/my-model", interactive=not offline,
                                    info="Created if it does not exist.")
            ui.hf_token = gr.Textbox(label="Token", type="password", placeholder=token_placeholder(ctx),
                                     interactive=not offline,
                                     info="Write access. Used for this upload only, never logged or saved.")
            with gr.Row():
                ui.private_repo = gr.Checkbox(True, label="Private repository", interactive=not offline,
                                              info="Only you can see it.")
                ui.push_merged = gr.Checkbox(False, label="Push the merged model (LoRA runs)",
                                             interactive=not offline,
                                             info="Merge it first.")
            ui.push_btn = gr.Button("Push", interactive=not offline, elem_id="push-btn")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("#### GGUF for llama.cpp, Ollama, LM Studio\nChat models: one file with weights, tokenizer "
                        "and chat template (a LoRA adapter is merged in), plus an Ollama `Modelfile`.")
            ui.gguf_quant = gr.Radio(QUANT_CHOICES, value="f16", label="Weights", elem_id="gguf-quant",
                                     info="f16 answers as the app does; q8_0 is a smaller file, nearly as good.")
            ui.gguf_btn = gr.Button("Build GGUF", interactive=False, elem_id="gguf-btn")
            ui.gguf_files = gr.File(label="GGUF and Modelfile", file_count="multiple", interactive=False,
                                    elem_id="gguf-files")
            ui.gguf_md = gr.Markdown("", elem_id="gguf-md")
        with gr.Column():
            gr.Markdown("#### Predict a file\nEvery row of a CSV/JSONL file through the model: labels and "
                        "probabilities, or generated responses. Formula cells are escaped.")
            ui.bp_file = gr.File(label="File to predict", file_types=DATA_TYPES, type="filepath", elem_id="bp-file")
            ui.bp_btn = gr.Button("Predict file", elem_id="bp-btn")
            ui.bp_out = gr.File(label="Predictions (CSV)", interactive=False, elem_id="bp-out")
            ui.bp_md = gr.Markdown("", elem_id="bp-md")
    ui.snippet = gr.Code(language="python", label="Use it in Python (ready to paste)", interactive=False)


def wire(ctx: AppContext, ui) -> None:
    refresher = bind(ctx, refresh)
    ui.exp_refresh.click(refresher, [ui.exp_run, ui.owner_state], ui.exp_run, api_visibility="private")
    ui.export_tab.select(refresher, [ui.exp_run, ui.owner_state], ui.exp_run, api_visibility="private")
    shower = bind(ctx, show)
    shown = [ui.exp_info, ui.snippet, ui.merge_btn, ui.zip_file, ui.gguf_btn, ui.gguf_files, ui.gguf_md]
    ui.exp_run.change(bind(ctx, pick_run), [ui.exp_run, ui.owner_state], ui.zip_what, api_visibility="private")
    for trigger in (ui.exp_run.change, ui.zip_what.change):
        trigger(shower, [ui.exp_run, ui.zip_what, ui.owner_state], shown, api_visibility="private")
    ui.zip_btn.click(bind(ctx, build_zip), [ui.exp_run, ui.owner_state, ui.zip_what], [ui.zip_file, ui.snippet],
                     api_visibility="private")
    ui.gguf_btn.click(bind(ctx, build_gguf), [ui.exp_run, ui.gguf_quant, ui.owner_state], [ui.gguf_files, ui.gguf_md],
                      api_visibility="private")
    ui.bp_btn.click(bind(ctx, predict_file), [ui.bp_file, ui.exp_run, ui.owner_state], [ui.bp_out, ui.bp_md],
                    api_name="predict_file", api_visibility="public")
    ui.merge_btn.click(bind(ctx, merge), [ui.exp_run, ui.owner_state], ui.merge_md, api_visibility="private")
    # The token never leaves this handler: not in outputs, not in logs; the field is cleared afterwards.
    ui.push_btn.click(bind(ctx, push), [ui.exp_run, ui.repo_id, ui.hf_token, ui.private_repo, ui.push_merged,
                                        ui.owner_state],
                      [ui.push_md, ui.hf_token], api_visibility="private").then(
        push_failed_clear, None, ui.hf_token, api_visibility="private", queue=False)
