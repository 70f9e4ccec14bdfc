"""Export tab: zip download, LoRA merge, push to the Hub, usage snippet."""

from __future__ import annotations

import os

import gradio as gr

from ..errors import FinetuneError
from .common import AppContext, dropdown_update, is_offline, owner_of, run_choices, user_errors


def build(ctx: AppContext, ui) -> None:
    with gr.Row():
        ui.exp_run = gr.Dropdown([], label="Run", allow_custom_value=True, scale=4,
                                 info="Runs with a saved model.")
        ui.exp_refresh = gr.Button("↻ Refresh", size="sm", scale=1)
    ui.exp_info = gr.Markdown("")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("#### Download\nWeights (safetensors), tokenizer and model card. No optimizer state, "
                        "no data, no tokens.")
            ui.zip_btn = gr.Button("Build zip", variant="primary")
            ui.zip_file = gr.File(label="Model zip", interactive=False, elem_id="zip-file")
        with gr.Column():
            gr.Markdown("#### Merge LoRA\nFold the adapter into the base weights: a plain model that loads "
                        "without `peft` and runs as fast as the original.")
            ui.merge_btn = gr.Button("Merge LoRA adapter")
            ui.merge_md = gr.Markdown("")
        with gr.Column(visible=push_allowed(), elem_id="push-column"):
            gr.Markdown("#### Push to the Hugging Face Hub")
            ui.repo_id = gr.Textbox(label="Repository", placeholder="your-name/my-model",
                                    info="Created if it does not exist.")
            ui.hf_token = gr.Textbox(label="Token", type="password", placeholder="hf_... (or leave empty to use HF_TOKEN)",
                                     info="Needs write access. Used for this upload only: never logged or saved.")
            with gr.Row():
                ui.private_repo = gr.Checkbox(True, label="Private repository")
                ui.push_merged = gr.Checkbox(False, label="Push the merged model (LoRA runs)")
            ui.push_btn = gr.Button("Push")
            ui.push_md = gr.Markdown("Offline: pushing is disabled." if is_offline() else "")
    ui.snippet = gr.Code(language="python", label="Use it in Python (ready to paste)", interactive=False)


def push_allowed() -> bool:
    """Demo mode (a public Space) hides push-to-hub unless the Space owner configured HF_TOKEN."""
    from ..limits import demo_mode

    return not demo_mode() or bool(os.environ.get("HF_TOKEN"))


def wire(ctx: AppContext, ui) -> None:
    from .. import export

    @user_errors
    def refresh(current, owner_state, request: gr.Request):
        owner = owner_of(owner_state, request)
        return dropdown_update(run_choices(ctx, owner, with_model=True), current)

    @user_errors
    def show(run_id, owner_state, request: gr.Request):
        if not run_id:
            return "Pick a run with a saved model.", "", gr.update(interactive=False), None
        run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
        model_dir = run_dir / "model"
        if not model_dir.is_dir():
            return "This run has no saved model yet.", "", gr.update(interactive=False), None
        lora = (model_dir / "adapter_config.json").exists()
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
        merged = (model_dir / "merged").is_dir()
        info = (f"`{run_id}` · {'LoRA adapter' if lora else 'full model'} · weights {size:.1f} MB"
                + (" · merged copy available" if merged else ""))
        return info, export.usage_snippet_for_run(run_dir), gr.update(interactive=lora), None

    @user_errors
    def build_zip(run_id, owner_state, request: gr.Request):
        run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
        return str(export.zip_model(run_dir, dest=ctx.temp_dir() / f"{run_id}-model.zip"))

    @user_errors
    def merge(run_id, owner_state, request: gr.Request):
        owner = owner_of(owner_state, request)
        run_dir = ctx.run_dir(run_id, owner)
        if ctx.manager.private_runs and not ctx.manager.is_owner(run_id, owner):
            raise FinetuneError("Only the session that trained this run can change its files.", "")
        path = export.merge_lora(run_dir)
        return f"✅ Merged model written to `model/{path.name}/`. Tick 'Push the merged model' to upload it."

    @user_errors
    def push(run_id, repo_id, token, private, merged, owner_state, request: gr.Request):
        if not push_allowed():
            raise FinetuneError("Pushing to the Hub is off in demo mode.",
                                "The Space owner can enable it by setting the HF_TOKEN secret.")
        run_dir = ctx.run_dir(run_id, owner_of(owner_state, request))
        url = export.push_to_hub(run_dir, repo_id, token=token or None, private=bool(private), merged=bool(merged))
        return f"✅ Pushed to [{repo_id}]({url}).", ""

    def push_failed_clear():
        return ""

    ui.exp_refresh.click(refresh, [ui.exp_run, ui.owner_state], ui.exp_run, api_visibility="private")
    ui.export_tab.select(refresh, [ui.exp_run, ui.owner_state], ui.exp_run, api_visibility="private")
    ui.exp_run.change(show, [ui.exp_run, ui.owner_state], [ui.exp_info, ui.snippet, ui.merge_btn, ui.zip_file],
                      api_visibility="private")
    ui.zip_btn.click(build_zip, [ui.exp_run, ui.owner_state], ui.zip_file, api_visibility="private")
    ui.merge_btn.click(merge, [ui.exp_run, ui.owner_state], ui.merge_md, api_visibility="private")
    # The token never leaves this handler: not in outputs, not in logs; the field is cleared afterwards.
    ui.push_btn.click(push, [ui.exp_run, ui.repo_id, ui.hf_token, ui.private_repo, ui.push_merged, ui.owner_state],
                      [ui.push_md, ui.hf_token], api_visibility="private").then(
        push_failed_clear, None, ui.hf_token, api_visibility="private", queue=False)
