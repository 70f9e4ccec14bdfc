"""What a run writes that must survive a crash: Trainer checkpoints and the saved model folder.

    drop_incomplete_checkpoints(rundir.checkpoints_dir(out))   # before resuming: half-written ones go
    resume_checkpoint(rundir.checkpoints_dir(out))             # newest complete checkpoint-N, or None
    save_model(cfg, model, tokenizer, out, card_text)          # model/ appears whole or not at all

A full disk or a kill can cut a checkpoint (or the model) off half-written; nothing here ever
treats such a folder as good.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import rundir
from .config import RunConfig
from .portable import make_portable


def checkpoint_complete(c: Path) -> bool:
    """The Trainer writes weights, optimizer, RNG state, then trainer_state.json last: a checkpoint is
    complete when that file parses and names its step, and the weights are there and not empty."""
    if not c.is_dir() or not c.name.split("-")[-1].isdigit():
        return False
    try:
        state = json.loads((c / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or "global_step" not in state:
        return False
    weights = [w for pattern in ("*.safetensors", "pytorch_model*.bin") for w in c.glob(pattern)
               if w.stat().st_size > 0]
    return bool(weights)


def drop_incomplete_checkpoints(checkpoints: Path) -> list[str]:
    """Delete the checkpoint folders a crash or a full disk cut off (rank 0 only); returns their names."""
    dropped = []
    if checkpoints.is_dir():
        for c in checkpoints.glob("checkpoint-*"):
            if c.is_dir() and c.name.split("-")[-1].isdigit() and not checkpoint_complete(c):
                shutil.rmtree(c, ignore_errors=True)
                dropped.append(c.name)
    return sorted(dropped)


def resume_checkpoint(checkpoints: Path) -> str | None:
    """The newest *complete* checkpoint; half-written ones (a crash or a full disk) are skipped."""
    if not checkpoints.is_dir():
        return None
    done = [c for c in checkpoints.glob("checkpoint-*") if checkpoint_complete(c)]
    if not done:
        return None
    return str(max(done, key=lambda c: int(c.name.split("-")[-1])))


def save_model(cfg: RunConfig, model, tokenizer, out: Path, card: str) -> None:
    """Write model/ (weights, tokenizer, the model card `card`) into a temporary folder, then swap it in."""
    target = rundir.model_dir(out)
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)        # safetensors: transformers 5 writes no pickle weights
        tokenizer.save_pretrained(tmp)
        if cfg.strategy.name == "lora" and cfg.task == "classification":
            # Keep the label names next to the adapter: AutoPeft loads the base with this config.
            model.get_base_model().config.save_pretrained(tmp)
        make_portable(tmp, cfg.model)     # the base by its public Hub id, no local paths, the head's code
        (tmp / "README.md").write_text(card, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # never leave half a model behind (e.g. the disk filled up)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
