"""Portable model folders: a saved model names its base by a public Hub id and carries the code it needs.

    make_portable(folder, "bundled:minilm-l6")       # in place: model/ (checkpoints.save_model), model/merged/
    portable_bytes(path, base_id)                    # one file's content as it leaves this machine (zip, push)
    extra_files(folder)                              # {"modeling_finetune_lab.py": ...} for a mean-pooling head

What a receiver needs and what this machine must not leak:
- `adapter_config.json` names the base by its public Hub id (`sentence-transformers/all-MiniLM-L6-v2`,
  `HuggingFaceTB/SmolLM2-135M-Instruct`: models.public_model_id), never the bundled copy's path in this
  virtualenv or model cache. This project's own loaders map the id back (models.adapter_base).
- `config.json` drops `_name_or_path`; a mean-pooling head (heads.py) gets `auto_map` and
  `modeling_finetune_lab.py`, a copy of heads.py (which imports only torch and transformers), so
  `pipeline(..., trust_remote_code=True)` loads it without FineTune Lab (the Hub's convention).
- `tokenizer_config.json` drops what a load on this machine added (`is_local`, `local_files_only`).
A base that is a local folder (no public id) keeps its path in the run's own model/ (that machine is the
only one with it); exports name it by the folder's name and offer the merged model instead.
No torch here: the app and the exports use it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .models import public_model_id

MODEL_CODE_FILE = "modeling_finetune_lab.py"
MEAN_POOLING_TYPE = "finetune_lab_mean_pooling"       # heads.MeanPoolingConfig.model_type
AUTO_MAP = {"AutoConfig": "modeling_finetune_lab.MeanPoolingConfig",
            "AutoModelForSequenceClassification": "modeling_finetune_lab.MeanPoolingForSequenceClassification"}
CONFIG_PATH_KEYS = ("_name_or_path", "_model_name_or_path", "name_or_path")
# written by transformers when a tokenizer was loaded from a local folder: how it was loaded, not what it is
TOKENIZER_LOAD_KEYS = ("is_local", "local_files_only", "name_or_path", "_name_or_path", "tokenizer_file")
_HEADER = ("# The mean-pooling classification head of FineTune Lab (a copy of finetune_core/heads.py), shipped\n"
           "# with the model so that it loads without FineTune Lab: config.json's auto_map points here, and\n"
           "# transformers runs it when you pass trust_remote_code=True. It imports only torch and transformers.\n")


def head_code() -> str:
    """The source shipped as modeling_finetune_lab.py: heads.py itself, the one definition of the head."""
    return _HEADER + Path(__file__).with_name("heads.py").read_text(encoding="utf-8")


def export_base_name(model_ref: str | None) -> str | None:
    """The base an export names: the public Hub id, else (a local folder) the folder's name, else None."""
    public = public_model_id(model_ref)
    if public:
        return public
    ref = (model_ref or "").strip().rstrip("/")
    return (Path(ref).name or None) if ref else None


def is_mean_pooling(config: dict) -> bool:
    return config.get("model_type") == MEAN_POOLING_TYPE


def portable_json(name: str, data: dict, base_id: str | None) -> dict:
    """`data` (the parsed file `name`) as a receiver should get it; other files are returned unchanged."""
    data = dict(data)
    if name == "adapter_config.json" and base_id:
        data["base_model_name_or_path"] = base_id
    elif name == "config.json":
        for key in CONFIG_PATH_KEYS:
            data.pop(key, None)
        if is_mean_pooling(data):
            data["auto_map"] = dict(AUTO_MAP)
            if isinstance(data.get("encoder"), dict):
                data["encoder"] = {k: v for k, v in data["encoder"].items() if k not in CONFIG_PATH_KEYS}
    elif name == "tokenizer_config.json":
        for key in TOKENIZER_LOAD_KEYS:
            data.pop(key, None)
    return data


_REWRITTEN = ("adapter_config.json", "config.json", "tokenizer_config.json")


def portable_bytes(path: Path, base_id: str | None) -> bytes:
    """The bytes of `path` as they leave this machine (rewritten JSON for the files above, else as is)."""
    raw = path.read_bytes()
    if path.name not in _REWRITTEN:
        return raw
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw
    if not isinstance(data, dict):
        return raw
    new = portable_json(path.name, data, base_id)
    return raw if new == data else (json.dumps(new, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def extra_files(folder: Path) -> dict[str, str]:
    """Files a receiver needs that the folder may lack: the head's code for a mean-pooling model."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {MODEL_CODE_FILE: head_code()} if isinstance(config, dict) and is_mean_pooling(config) else {}


def make_portable(folder: str | Path, base_model: str | None) -> None:
    """Rewrite a saved model folder in place: the base by its public id (when it has one), no local
    paths in its JSON, the head's code next to a mean-pooling model. `base_model` is the run's model
    (a bundled id, a Hub id or a folder)."""
    folder = Path(folder)
    base_id = public_model_id(base_model)
    for name in _REWRITTEN:
        path = folder / name
        if path.is_file():
            new = portable_bytes(path, base_id)
            if new != path.read_bytes():
                path.write_bytes(new)
    for name, text in extra_files(folder).items():
        (folder / name).write_text(text, encoding="utf-8")
