"""Export a run's model: a zip without secrets, a merged LoRA model, a push to the Hugging Face Hub.

    zip_model("runs/x")                       # runs/x/export/x-model.zip: safetensors, tokenizer, model card
    merge_lora("runs/x")                      # runs/x/model/merged/: adapter folded into full weights
    push_to_hub("runs/x", "me/my-model", token)   # the token is used in memory only, never logged or saved

The server's own HF_TOKEN is a fallback for the owner of the machine (a laptop). On a shared deployment
(demo mode or private runs) `server_token_refusal()` keeps visitors from borrowing it: it is lent only for
repositories inside FINETUNE_PUSH_NAMESPACE, when the owner set one.

Only allow-listed files leave the run folder: weights as safetensors (never pickled .bin/.pt files,
optimizer state or checkpoints), config, tokenizer files, the model card. Files whose content holds
an HF token are refused.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from . import rundir, settings
from .cards import usage_snippet
from .errors import FinetuneError

EXPORT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "adapter_config.json",
                   "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "README.md", "SOURCE.txt")
SECRET_FILE_PATTERNS = (".env", "*.env", "*token*", "*secret*", "*.pem", "*.key", ".git-credentials", "*.netrc")
_TOKEN_RE = re.compile(rb"hf_[A-Za-z0-9]{30,}")


class ExportError(FinetuneError):
    pass


def _model_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    model = rundir.model_dir(run_dir)
    if not model.is_dir():
        raise ExportError(f"The run '{run_dir.name}' has no saved model (no model/ folder).",
                          "Wait for the run to finish, or pick a finished run.")
    return model


def _is_secret_name(name: str) -> bool:
    low = name.lower()
    if low in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        return False
    return any(fnmatch.fnmatch(low, p) for p in SECRET_FILE_PATTERNS)


def _holds_token(path: Path) -> bool:
    """True if a small text file contains an HF token (or the current HF_TOKEN value)."""
    if path.suffix == ".safetensors" or path.stat().st_size > 50_000_000:
        return False
    data = path.read_bytes()
    env_token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return bool(_TOKEN_RE.search(data)) or bool(env_token and env_token.encode() in data)


def export_files(model_dir: str | Path, include_merged: bool = False) -> list[tuple[Path, str]]:
    """(file, name in the archive) for every file safe to share from a model folder."""
    model_dir = Path(model_dir)
    out = []
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(model_dir)
        if rel.parts[0] == rundir.MERGED_DIR and not include_merged:
            continue
        if len(rel.parts) > (2 if include_merged else 1):
            continue
        if _is_secret_name(path.name) or not any(fnmatch.fnmatch(path.name, p) for p in EXPORT_PATTERNS):
            continue
        if _holds_token(path):
            continue
        out.append((path, rel.as_posix()))
    if not any(name.endswith(".safetensors") for _, name in out):
        raise ExportError(f"No safetensors weights found in '{model_dir}'.",
                          "Re-run training; the model folder looks incomplete.")
    return out


def zip_model(run_dir: str | Path, dest: str | Path | None = None, include_merged: bool = False,
              merged: bool = False, folder: str | None = None) -> Path:
    """Zip the shareable files of `run_dir/model` (weights, tokenizer, card); returns the zip path.

    merged=True zips only the merged LoRA model (`model/merged/`, from merge_lora) as a plain model;
    include_merged=True adds it under merged/ next to the adapter. `folder` names the top folder
    inside the archive (default RUN-model, or RUN-merged).
    """
    run_dir = Path(run_dir)
    model_dir = _model_dir(run_dir)
    if merged:
        model_dir = rundir.merged_dir(run_dir)
        if not model_dir.is_dir():
            raise ExportError("There is no merged model yet.", "Click 'Merge LoRA adapter' first, then build the zip.")
    files = export_files(model_dir, include_merged=include_merged and not merged)
    folder = folder or f"{run_dir.name}-{'merged' if merged else 'model'}"
    dest = Path(dest) if dest else rundir.export_dir(run_dir) / f"{folder}.zip"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rundir.replacing(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for path, name in files:
                zf.write(path, f"{folder}/{name}")
    return dest


def merge_lora(run_dir: str | Path) -> Path:
    """Fold a LoRA adapter into the base weights; writes model/merged/ and returns its path."""
    run_dir = Path(run_dir)
    model_dir = _model_dir(run_dir)
    if not (model_dir / "adapter_config.json").exists():
        strategy = (rundir.read_config(run_dir).get("strategy") or {}).get("name", "full")
        raise ExportError(f"This run used the '{strategy}' strategy: its model is already a full model, there "
                          "is no LoRA adapter to merge.", "Download the zip instead.")
    from .generate import load_for_inference   # deferred: torch, transformers

    model, tokenizer, info = load_for_inference(str(model_dir))   # AutoPeft ... .merge_and_unload()
    target = rundir.merged_dir(run_dir)
    tmp = model_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    card = model_dir / "README.md"
    note = ("> This folder holds the LoRA adapter merged into the base model's weights: a plain model that "
            "loads without peft.\n\n")
    text = card.read_text(encoding="utf-8") if card.exists() else "# Merged model\n"
    (tmp / "README.md").write_text(note + text, encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def push_namespace() -> str | None:
    """FINETUNE_PUSH_NAMESPACE: the only Hub user/org the server's HF_TOKEN may push to on a shared app."""
    return settings.push_namespace()


def server_token_refusal(repo_id: str, shared: bool) -> ExportError | None:
    """Why the server's HF_TOKEN may not be used for this push, or None when it may.

    On a laptop (shared=False) the owner's token is theirs to use. On a shared deployment (demo mode,
    private runs) any visitor could otherwise push with the owner's token to every repository it can
    write: it is lent only for repositories inside FINETUNE_PUSH_NAMESPACE.
    """
    if not shared:
        return None
    ns = push_namespace()
    if ns is None:
        return ExportError("This shared app does not lend its own Hugging Face token to visitors.",
                           "Paste your own token with write access (huggingface.co/settings/tokens). The app "
                           "owner can allow pushes with the app's token by setting FINETUNE_PUSH_NAMESPACE.")
    if (repo_id or "").strip().split("/", 1)[0] != ns:
        return ExportError(f"The app's own token may only push to repositories under '{ns}/', not '{repo_id}'.",
                           f"Name the repository {ns}/your-model-name, or paste your own token.")
    return None


def push_to_hub(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = True,
                merged: bool = False, shared: bool = False) -> str:
    """Upload the shareable model files to `repo_id`; returns the repo URL. The token is never logged.

    Without a typed `token` the server's HF_TOKEN is used, on a shared deployment (shared=True) only
    inside FINETUNE_PUSH_NAMESPACE (server_token_refusal).
    """
    run_dir = Path(run_dir)
    repo_id = (repo_id or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", repo_id):
        raise ExportError(f"'{repo_id}' is not a Hub repository id.", "Write it as your-name/model-name.")
    token = (token or "").strip() or None
    if token is None and os.environ.get("HF_TOKEN"):
        refusal = server_token_refusal(repo_id, shared)
        if refusal is not None:
            raise refusal
        token = os.environ["HF_TOKEN"]
    if _offline():
        raise ExportError("The app is offline (HF_HUB_OFFLINE=1), so nothing can be pushed to the Hub.",
                          "Download the zip instead, or run the app with network access.")
    if not token:
        raise ExportError("No Hugging Face token was given.",
                          "Paste a token with write access (huggingface.co/settings/tokens)"
                          + ("." if shared else " or set HF_TOKEN."))
    model_dir = _model_dir(run_dir)
    folder = rundir.merged_dir(run_dir) if merged else model_dir
    if merged and not folder.is_dir():
        raise ExportError("There is no merged model yet.", "Click 'Merge LoRA adapter' first.")
    files = [name for _, name in export_files(folder)]
    from huggingface_hub import HfApi   # deferred: only a push needs it

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=files,
                          commit_message="Upload model fine-tuned with FineTune Lab")
    except Exception as exc:  # noqa: BLE001 - network / auth errors, shown without the token
        message = str(exc).replace(token, "***").splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ExportError(f"Pushing to '{repo_id}' failed: {message}",
                          "Check the token has write access and the repository name is yours.") from None
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")


def usage_snippet_for_run(run_dir: str | Path, model_dir: str | None = None, merged: bool = False) -> str:
    """The ready-to-paste loading code for this run (finetune_core.cards.usage_snippet).

    merged=True: the code for the merged LoRA model, a plain transformers model (no peft).
    """
    run_dir = Path(run_dir)
    info = rundir.read_config(run_dir)
    task = info.get("task", "classification")
    strategy = (info.get("strategy") or {}).get("name", "full")
    frozen_all = (info.get("strategy") or {}).get("frozen_layers", "all") == "all"
    if merged:
        return usage_snippet(task, "full", model_dir or f"{run_dir.name}-merged", False)
    mean_pooling = False
    config = rundir.model_dir(run_dir) / "config.json"
    if config.exists():
        try:
            mean_pooling = json.loads(config.read_text()).get("model_type") == "finetune_lab_mean_pooling"
        except ValueError:
            mean_pooling = task == "classification" and strategy == "frozen" and frozen_all
    return usage_snippet(task, strategy, model_dir or f"{run_dir.name}-model", mean_pooling)
