"""`python app.py`: build the FineTune Lab Blocks app from finetune_core/ui and launch it.

Respects GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (default 127.0.0.1:7860). Runs live under
FINETUNE_HOME/runs (default ~/.cache/finetune_lab/runs). torch and transformers load on first use.
"""

from finetune_core.ui import build_app, launch

demo = build_app()

if __name__ == "__main__":
    launch(demo)
