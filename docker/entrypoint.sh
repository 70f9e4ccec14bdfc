#!/bin/sh
# Entrypoint of the FineTune Lab Docker image (Hugging Face Docker Space or plain `docker run`).
#
# FINETUNE_HOME (runs, uploaded data, app state) goes to the persistent volume FINETUNE_DATA_DIR
# (default /data, where Spaces mount "persistent storage") when it exists and is writable, else to
# $HOME/.cache/finetune_lab, which is lost when the container restarts. A FINETUNE_HOME set by the
# user (Space variable, `docker run -e`) is kept as is.
#
# On a Space (SPACE_ID is set by Hugging Face) demo mode is on unless FINETUNE_DEMO_MODE says
# otherwise: a Space pushed as is must not start open (no limits, runs shared between visitors,
# the owner's HF_TOKEN usable by anyone). FINETUNE_DEMO_MODE=0 opts out.
#
# The bundled SmolLM2 is de-quantized at build time into FINETUNE_MODEL_CACHE (an ENV of the
# image, inside the image), so it is neither copied to the volume nor converted again at start.
set -eu

FINETUNE_DATA_DIR="${FINETUNE_DATA_DIR:-/data}"
if [ -z "${FINETUNE_HOME:-}" ]; then
    if [ -d "$FINETUNE_DATA_DIR" ] && [ -w "$FINETUNE_DATA_DIR" ]; then
        FINETUNE_HOME="$FINETUNE_DATA_DIR/finetune_lab"
    else
        FINETUNE_HOME="${HOME:-/home/user}/.cache/finetune_lab"
    fi
fi
export FINETUNE_HOME
mkdir -p "$FINETUNE_HOME"

if [ -n "${SPACE_ID:-}" ] && [ -z "${FINETUNE_DEMO_MODE:-}" ]; then
    FINETUNE_DEMO_MODE=1
    export FINETUNE_DEMO_MODE
fi

# `docker run IMAGE python -m finetune_core train CONFIG` runs that command instead of the app.
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec python app.py
