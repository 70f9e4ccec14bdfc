"""An instruction run's held-out generations (generations.jsonl) as the Evaluate and Chat tabs show them.

    rows = read_generations(run_dir)                 # [{"prompt", "reference", "before", "after", ...}]
    prompt_preview(rows[0]["prompt"])                # the user's words, without the chat template
"""

from __future__ import annotations

import json
from pathlib import Path

from ..ratings import user_text
from ..rundir import generations_path


def read_generations(run_dir: Path) -> list[dict]:
    path = generations_path(run_dir)
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def prompt_preview(prompt: str, limit: int = 400) -> str:
    """The user's part of a rendered prompt (chat template or Alpaca), for tables."""
    text = user_text(prompt)
    return text if len(text) <= limit else text[:limit - 3] + "..."
