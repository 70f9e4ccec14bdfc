#!/bin/sh
# Entrypoint of the FineTune Lab Docker image (Hugging Face Docker Space or plain `docker run`).
#
# FINETUNE_HOME (runs, uploaded data, app state) goes to the persistent volume /data when one is
# mounted and writable (Spaces "persistent storage"), else to $HOME/.cache/finetune_lab, which is
# lost when the container restarts. A FINETUNE_HOME set by the user (Space variable,
# `docker run -e`) is kept as is.
#
# The bundled SmolLM2 is de-quantized at build time into FINETUNE_MODEL_CACHE (an ENV of the
# image, inside the image), so it is neither copied to /data nor converted again at start.
set -eu

if [ -z "${FINETUNE_HOME:-}" ]; then
    if [ -d /data ] && [ -w /data ]; then
        FINETUNE_HOME=/data/finetune_lab
    else
        FINETUNE_HOME="${HOME:-/home/user}/.cache/finetune_lab"
    fi
fi
export FINETUNE_HOME
mkdir -p "$FINETUNE_HOME"

# `docker run IMAGE python -m finetune_core train CONFIG` runs that command instead of the app.
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec python app.py
