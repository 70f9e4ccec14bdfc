"""The base model's measurements, kept between runs: measured once per base model and validation data.

    key = basecache.entry_key(model_path, parts)       # None: this base model cannot be fingerprinted
    cache = basecache.BaseCache(writer)                # FINETUNE_HOME/base_cache/
    entry = cache.read(key)                            # {"metrics": {...}, "answers": [...]} or None
    cache.write(key, {"metrics": {...}, "answers": [...]})
    general = basecache.general_text_key(model_path, text_batches)   # the general-text perplexity alone

An instruction run reports its base model's validation loss, general-text perplexity and answers to
the held-out prompts next to the tuned model's. Those depend only on the base weights, the validation
rows as tokenized (rows, template, tokenizer, max_length), the general text, the generation settings
and the numeric stack (torch, transformers, device), so a second run on the same data (another
strategy, a `compare` class, the app and the CLI alike: they share FINETUNE_HOME) reads them here.
The general-text perplexity has an entry of its own (general_text_key), keyed by the base model and
the probe alone: a first run on other data still reads it (SmolLM2: ~4 s of a ~70 s run).

The key is a SHA-256 over all of those; any change is another key, so a stale entry is never read.
Weight files are fingerprinted by name, size and modification time (rewriting a model folder, as
save_pretrained does, changes them); the small files (config, tokenizer, generation config) by
content. A hub id is fingerprinted through its snapshot folder in the hub cache (its commit).

An entry is one JSON file, written to a temporary name, flushed to disk and renamed into place, with
its key and `"complete": true` inside: a process killed while writing leaves only a temporary file,
which no reader opens. A folder that cannot be written (read-only, full disk) turns the cache off for
the run with one `info` event; the run measures its base model as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from .models import local_model_folder
from .settings import home as finetune_home

VERSION = 1                       # bump when what an entry holds, or how it is measured, changes
SMALL_FILE_BYTES = 8 * 2**20      # files up to this size are fingerprinted by content
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
STALE_TEMP_SECONDS = 3600         # a temporary file this old belongs to a writer that died


def cache_dir() -> Path:
    return finetune_home() / "base_cache"


def digest(value) -> str:
    """SHA-256 of a JSON-able value (lists of token ids, strings, dicts), stable across processes."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def model_fingerprint(model_path: str) -> dict | None:
    """What identifies the base model's files; None when they cannot be found (no cache for it)."""
    folder = local_model_folder(model_path)
    if folder is None:
        return None
    files = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name == "README.md":
            continue
        st = f.stat()
        if f.suffix in WEIGHT_SUFFIXES or st.st_size > SMALL_FILE_BYTES:
            files[f.name] = [st.st_size, st.st_mtime_ns]
        else:
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        return None
    return {"snapshot": folder.name if folder.parent.name == "snapshots" else None, "files": files}


def environment() -> dict:
    """The numeric stack: the same weights give (slightly) other numbers under another one."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "float32"}


def entry_key(model_path: str, parts: dict) -> str | None:
    """The cache key of the base model at `model_path` measured on `parts` (the validation data, the
    general text, the generation and probe settings: JSON-able); None when the model has no fingerprint."""
    model = model_fingerprint(model_path)
    if model is None:
        return None
    return digest({"version": VERSION, "model": model, "environment": environment(), "parts": parts})


def general_text_key(model_path: str, text_batches: list[dict]) -> str | None:
    """The key of a base model's general-text perplexity alone (the forgetting probe's "before" number).
    It depends on the weights and the probe's exact batches (the bundled text, the tokenizer, max_length),
    not on a run's data: a first run on new data with a base model measured before reads it here
    (instruction and preference runs alike), and measures only what its own data changes."""
    return entry_key(model_path, {"general_text_batches": digest([b["input_ids"].tolist() for b in text_batches])})


def read_general_perplexity(cache: BaseCache, key: str | None) -> float | None:
    """The general-text perplexity stored under `key` (general_text_key), or None."""
    entry = cache.read(key)
    value = (entry.get("metrics") or {}).get("general_perplexity") if entry is not None else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_general_perplexity(cache: BaseCache, key: str | None, model: str, value: float) -> bool:
    """Store a base model's general-text perplexity under `key` (a number that is not finite is not kept)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return cache.write(key, {"model": model, "metrics": {"general_perplexity": float(value)}})


class BaseCache:
    """Entries under `folder` (default FINETUNE_HOME/base_cache). `writer` gets the one `info` event
    that says the cache is off when the folder cannot be written."""

    def __init__(self, writer=None, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else cache_dir()
        self.writer = writer
        self.disabled = False

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def read(self, key: str | None) -> dict | None:
        """The complete entry stored under `key`, or None (no key, no entry, a broken or foreign file)."""
        if key is None or self.disabled:
            return None
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or entry.get("complete") is not True:
            return None
        return entry

    def write(self, key: str | None, entry: dict) -> bool:
        """Store `entry` under `key` atomically; False (and the cache off, said once) when it cannot."""
        if key is None or self.disabled:
            return False
        tmp = self.folder / f".{key}.tmp{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"key": key, "written": time.time(), **entry, "complete": True})
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._disable(exc)
            return False
        self._drop_stale_temporaries()
        return True

    def _disable(self, exc: OSError) -> None:
        self.disabled = True
        if self.writer is not None:
            self.writer.info(f"Base-model cache off for this run: {self.folder} cannot be written "
                             f"({exc.strerror or exc}). The base model is measured as usual; free disk "
                             "space or make FINETUNE_HOME writable to reuse its measurements.")

    def _drop_stale_temporaries(self) -> None:
        """Temporary files of writers that died (a killed run) are never read; remove the old ones."""
        now = time.time()
        try:
            for f in self.folder.glob(".*.tmp*"):
                if now - f.stat().st_mtime > STALE_TEMP_SECONDS:
                    f.unlink(missing_ok=True)
        except OSError:
            pass
