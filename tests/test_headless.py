"""The engine is headless: importing it never imports gradio; the UI defers torch to its handlers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = ["finetune_core", "finetune_core.config", "finetune_core.data", "finetune_core.models",
          "finetune_core.strategies", "finetune_core.events", "finetune_core.train", "finetune_core.evaluation",
          "finetune_core.generate", "finetune_core.audit", "finetune_core.cli", "finetune_core.cards",
          "finetune_core.jobs", "finetune_core.plots", "finetune_core.export", "finetune_core.ratings",
          "finetune_core.compare", "finetune_core.limits", "finetune_core.heads", "finetune_core.trainer",
          "finetune_core.training_args", "finetune_core.checkpoints", "finetune_core.predictions",
          "finetune_core.runtime", "finetune_core.tasks.classification", "finetune_core.tasks.instruction"]


def imported_after(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_engine_never_imports_gradio():
    present = [m for m in ENGINE if (REPO / (m.replace(".", "/") + ".py")).exists()
               or (REPO / m.replace(".", "/") / "__init__.py").exists()]
    mods = imported_after(present)
    assert not any(m == "gradio" or m.startswith("gradio.") for m in mods)
    assert "gradio_client" not in mods


def test_app_modules_load_models_lazily():
    # `python app.py` must answer HTTP within seconds: no torch / transformers at import time.
    mods = imported_after(["finetune_core.ui", "finetune_core.jobs", "finetune_core.plots", "finetune_core.export"])
    assert "gradio" in mods
    assert "torch" not in mods and "transformers" not in mods
