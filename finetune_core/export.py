"""Export a run's model: a portable zip, a merged LoRA model, a GGUF for llama.cpp/Ollama, a Hub push.

    zip_model("runs/x")                       # runs/x/export/x-model.zip (a LoRA classifier: x-merged.zip)
    merge_lora("runs/x")                      # runs/x/model/merged/: adapter folded into full weights
    export_gguf_for_run("runs/x", "q8_0")     # runs/x/export/x-q8_0.gguf + x-q8_0.Modelfile (causal LMs)
    push_to_hub("runs/x", "me/my-model", token)   # the token is used in memory only, never logged or saved

Everything that leaves the machine is portable (finetune_core.portable): a bundled base is named by its
public Hub id, no file names a path of this machine, the model card is rendered anew for what is
exported (cards.render_model_card), and a mean-pooling head carries its code. A LoRA classifier zips
as its merged model by default: a plain model that `pipeline()` loads without peft or the base.

The server's own HF_TOKEN is a fallback for the owner of the machine (a laptop). On a shared deployment
(demo mode or private runs) `server_token_refusal()` keeps visitors from borrowing it: it is lent only for
repositories inside FINETUNE_PUSH_NAMESPACE, when the owner set one.

Only allow-listed files leave the run folder: weights as safetensors (never pickled .bin/.pt files,
optimizer state or checkpoints), config, tokenizer files, the model card, the head's code. Files whose
content holds an HF token are refused.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

from . import rundir, settings
from .cards import render_model_card, usage_snippet
from .config import GENERATIVE_TASKS, config_from_dict, uses_mean_pooling_head
from .errors import FinetuneError
from .models import adapter_base, public_model_id
from .portable import (MODEL_CODE_FILE, export_base_name, extra_files, is_mean_pooling, make_portable,
                       portable_bytes)

EXPORT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "adapter_config.json",
                   "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "README.md", "SOURCE.txt", MODEL_CODE_FILE)
SECRET_FILE_PATTERNS = (".env", "*.env", "*token*", "*secret*", "*.pem", "*.key", ".git-credentials", "*.netrc")
_TOKEN_RE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
GGUF_QUANTS = ("f16", "q8_0")


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


def _run_info(run_dir: Path) -> dict:
    return rundir.read_config(run_dir)


def _is_lora(run_dir: Path) -> bool:
    return (rundir.model_dir(run_dir) / "adapter_config.json").exists()


def merged_by_default(run_dir: str | Path) -> bool:
    """A LoRA classifier exports its merged model: small, and a plain model that pipeline() loads alone
    (the adapter needs peft, the base and the label count passed by hand)."""
    run_dir = Path(run_dir)
    return _is_lora(run_dir) and _run_info(run_dir).get("task") == "classification"


def _card(run_dir: Path, merged: bool, folder: str) -> str | None:
    """The model card rendered anew from run.yaml and metrics.json, or None for a run folder without a
    readable config (then the saved card is kept)."""
    values = _run_info(run_dir)
    if not values.get("model") or not values.get("task"):
        return None
    try:
        cfg = config_from_dict(values)
    except FinetuneError:
        return None
    return render_model_card(cfg, rundir.read_metrics(run_dir), merged=merged, model_dir=folder)


def _entries(run_dir: Path, source: Path, merged: bool, include_merged: bool, folder: str) -> list[tuple[str, object]]:
    """(name in the export, a Path to copy or the bytes to write) for every file that leaves the machine."""
    base = export_base_name(_run_info(run_dir).get("model"))
    out: list[tuple[str, object]] = []
    for path, name in export_files(source, include_merged=include_merged):
        in_merged = name.startswith(f"{rundir.MERGED_DIR}/")
        if path.name == "README.md":
            card = _card(run_dir, merged or in_merged, folder)
            out.append((name, card.encode() if card is not None else path.read_bytes()))
        elif path.suffix == ".json":
            out.append((name, portable_bytes(path, base)))
        else:
            out.append((name, path))
    names = {n for n, _ in out}
    for name, text in extra_files(source).items():
        if name not in names:
            out.append((name, text.encode()))
    return out


def _source(run_dir: Path, merged: bool) -> Path:
    if not merged:
        return _model_dir(run_dir)
    if not _is_lora(run_dir):
        strategy = (_run_info(run_dir).get("strategy") or {}).get("name", "full")
        raise ExportError(f"This run used the '{strategy}' strategy: its model is already a full model, there is "
                          "no LoRA adapter to merge.", "Export the model as trained.")
    target = rundir.merged_dir(run_dir)
    if not target.is_dir():
        raise ExportError("There is no merged model yet.", "Click 'Merge LoRA adapter' first, then export it.")
    return target


def zip_model(run_dir: str | Path, dest: str | Path | None = None, include_merged: bool = False,
              merged: bool | None = None, folder: str | None = None) -> Path:
    """Zip the shareable files of `run_dir/model` (weights, tokenizer, card); returns the zip path.

    merged=True zips only the merged LoRA model (`model/merged/`, written by merge_lora first when
    missing) as a plain model; None (the default) does so for a LoRA classifier (merged_by_default).
    include_merged=True adds model/merged/ under merged/ next to the adapter. `folder` names the top
    folder inside the archive (default RUN-model, or RUN-merged).
    """
    run_dir = Path(run_dir)
    _model_dir(run_dir)
    if merged is None:
        merged = merged_by_default(run_dir)
    if merged and _is_lora(run_dir) and not rundir.merged_dir(run_dir).is_dir():
        merge_lora(run_dir)
    source = _source(run_dir, merged)
    folder = folder or f"{run_dir.name}-{'merged' if merged else 'model'}"
    entries = _entries(run_dir, source, merged, include_merged and not merged, folder)
    dest = Path(dest) if dest else rundir.export_dir(run_dir) / f"{folder}.zip"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with rundir.replacing(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, content in entries:
                if isinstance(content, Path):
                    zf.write(content, f"{folder}/{name}")
                else:
                    zf.writestr(f"{folder}/{name}", content)
    return dest


def merge_lora(run_dir: str | Path) -> Path:
    """Fold a LoRA adapter into the base weights; writes model/merged/ and returns its path.

    The base is the model the run trained on (models.adapter_base, also offline when the adapter names
    a public Hub id), in float32 on any device, so the saved weights keep full precision.
    """
    run_dir = Path(run_dir)
    model_dir = _model_dir(run_dir)
    if not (model_dir / "adapter_config.json").exists():
        strategy = (_run_info(run_dir).get("strategy") or {}).get("name", "full")
        raise ExportError(f"This run used the '{strategy}' strategy: its model is already a full model, there "
                          "is no LoRA adapter to merge.", "Download the zip instead.")
    from .generate import load_for_inference   # deferred: torch, transformers

    model, tokenizer, info = load_for_inference(str(model_dir), keep_float32=True)   # adapter merged in
    target = rundir.merged_dir(run_dir)
    tmp = model_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    make_portable(tmp, _run_info(run_dir).get("model"))
    card = _card(run_dir, merged=True, folder="path/to/model")
    if card is None:
        note = ("> This folder holds the LoRA adapter merged into the base model's weights: a plain model that "
                "loads without peft.\n\n")
        saved = model_dir / "README.md"
        card = note + (saved.read_text(encoding="utf-8") if saved.exists() else "# Merged model\n")
    (tmp / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def gguf_name(run_dir: str | Path, quant: str) -> str:
    """`<run>-<quant>`: one file per quantization, so f16 and q8_0 exports sit side by side."""
    return f"{Path(run_dir).name[:90]}-{quant}"


def export_gguf_for_run(run_dir: str | Path, quant: str = "f16", out_dir: str | Path | None = None):
    """Write RUN/export/<run>-<quant>.gguf (weights, tokenizer, chat template) and <run>-<quant>.Modelfile
    for Ollama (into `out_dir` when given); a LoRA adapter is merged in memory first. Returns
    gguf_export.GgufExport.

    The prompt format is the one the run trained with: its chat template, or the Alpaca format for a run
    trained with `data.template: alpaca` (written into the GGUF and the Modelfile alike).
    """
    run_dir = Path(run_dir)
    model_dir = _model_dir(run_dir)
    info = _run_info(run_dir)
    if info.get("task", "instruction") not in GENERATIVE_TASKS:
        raise ExportError("GGUF export is for chat models (instruction runs); this run is a classifier.",
                          "Download the zip instead: it loads with transformers' pipeline().")
    if quant not in GGUF_QUANTS:
        raise ExportError(f"Unknown GGUF quantization '{quant}'.", f"Use one of: {', '.join(GGUF_QUANTS)}.")
    from .gguf_export import export_gguf, export_gguf_from_model, merge_lora_adapter   # deferred: gguf, torch

    name = gguf_name(run_dir, quant)
    out = Path(out_dir) if out_dir else rundir.export_dir(run_dir)
    base = public_model_id(info.get("model"))
    prompt = _trained_prompt_format(run_dir, info)
    options = dict(quant=quant, base_model=base, modelfile_name=f"{name}.Modelfile", prompt_format=prompt)
    if (model_dir / "adapter_config.json").exists():
        model, tokenizer = merge_lora_adapter(model_dir, base_model_dir=adapter_base(model_dir))
        return export_gguf_from_model(model, tokenizer, out, name, **options)
    return export_gguf(model_dir, out, name, **options)


def _trained_prompt_format(run_dir: Path, info: dict) -> str:
    """"chat" or "alpaca": what the run trained on (metrics.json records how `auto` resolved)."""
    template = rundir.read_metrics(run_dir).get("template") or (info.get("data") or {}).get("template") or "auto"
    return "alpaca" if template == "alpaca" else "chat"


def gguf_commands(export, cd: bool = True) -> str:
    """The shell commands that run an exported GGUF, shown by the CLI and (cd=False: wherever the
    files were downloaded to) the Export tab."""
    model = export.gguf_path.stem
    lines = [f"cd {export.gguf_path.parent}"] if cd else []
    if export.modelfile_path is not None:
        lines += [f"ollama create {model} -f {export.modelfile_path.name}", f"ollama run {model}"]
    lines.append(f"llama-cli -m {export.gguf_path.name} --jinja -cnv")
    return "\n".join(lines)


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
    _model_dir(run_dir)
    entries = _entries(run_dir, _source(run_dir, merged), merged, False, repo_id)
    from huggingface_hub import HfApi   # deferred: only a push needs it

    api = HfApi(token=token)
    with _staged(run_dir, entries) as folder:
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=[n for n, _ in entries],
                              commit_message="Upload model fine-tuned with FineTune Lab")
        except Exception as exc:  # noqa: BLE001 - network / auth errors, shown without the token
            message = str(exc).replace(token, "***").splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise ExportError(f"Pushing to '{repo_id}' failed: {message}",
                              "Check the token has write access and the repository name is yours.") from None
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")


@contextlib.contextmanager
def _staged(run_dir: Path, entries: list[tuple[str, object]]):
    """A folder holding exactly `entries` (weights hard-linked, not copied), removed afterwards."""
    folder = rundir.export_dir(run_dir) / f".push-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        for name, content in entries:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                try:
                    os.link(content, target)
                except OSError:          # another file system, or links not allowed: copy
                    shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def usage_snippet_for_run(run_dir: str | Path, model_dir: str | None = None, merged: bool = False) -> str:
    """The ready-to-paste loading code for this run (finetune_core.cards.usage_snippet).

    merged=True: the code for the merged LoRA model, a plain transformers model (no peft).
    """
    run_dir = Path(run_dir)
    info = _run_info(run_dir)
    task = info.get("task", "classification")
    strategy = (info.get("strategy") or {}).get("name", "full")
    if merged:
        return usage_snippet(task, "full", model_dir or f"{run_dir.name}-merged", False)
    config = rundir.read_json(rundir.model_dir(run_dir) / "config.json")
    frozen = (info.get("strategy") or {}).get("frozen_layers", "all")
    mean_pooling = is_mean_pooling(config) if config else \
        uses_mean_pooling_head(task, strategy, frozen, rundir.read_metrics(run_dir).get("model_kind", "encoder"))
    return usage_snippet(task, strategy, model_dir or f"{run_dir.name}-model", mean_pooling)
