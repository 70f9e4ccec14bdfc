"""`python app.py`: build the FineTune Lab Blocks app from finetune_core/ui and launch it.

Respects GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (default 127.0.0.1:7860). Runs live under
FINETUNE_HOME/runs (default ~/.cache/finetune_lab/runs). torch and transformers load on first use.
On a Hugging Face Space (SPACE_ID set) demo mode is on unless FINETUNE_DEMO_MODE is set (0 = off).
"""

from finetune_core.ui import apply_space_defaults, build_app, launch

apply_space_defaults()
demo = build_app()

if __name__ == "__main__":
    launch(demo)
