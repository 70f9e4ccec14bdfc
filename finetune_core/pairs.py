"""From ratings to preference pairs: the article's Level-3 ratings become training data for DPO.

    python -m finetune_core pairs runs/my-run [--out pairs.jsonl]
    pairs, stats = build_pairs("runs/my-run")     # [{"prompt", "chosen", "rejected"}], counts
    path, stats = write_pairs("runs/my-run")      # runs/my-run/pairs.jsonl

Every prompt whose answers were rated (base vs fine-tuned in the Chat tab, held-out answers) gives
one pair: its best-rated answer is chosen, its worst-rated rejected. A tie (the same score) teaches
no preference: it is skipped and counted, as is a prompt with a single rated answer. Each answer's
score is its latest rating per session (ratings.latest_ratings), averaged over sessions. The file
is TRL's format, what the preference task reads (`task: preference`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .errors import FinetuneError
from .ratings import latest_ratings, user_text
from .rundir import atomic_write_text, pairs_path

MIN_PAIRS = 8       # fewer pairs teach nothing measurable: the held-out split would hold one or two


def build_pairs(run_dir: str | Path) -> tuple[list[dict], dict]:
    """(pairs, {"pairs", "ties", "single", "ratings"}) from the run's ratings."""
    ratings = latest_ratings(run_dir)
    scores: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in ratings:
        prompt, answer = user_text(r["prompt"]), (r.get("answer") or "").strip()
        if prompt and answer:
            scores[prompt][answer].append(r["score"])
    pairs, ties, single = [], 0, 0
    for prompt, answers in scores.items():
        if len(answers) < 2:
            single += 1
            continue
        ranked = sorted(answers.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
        worst, best = ranked[0], ranked[-1]
        if sum(best[1]) / len(best[1]) == sum(worst[1]) / len(worst[1]):
            ties += 1
            continue
        pairs.append({"prompt": prompt, "chosen": best[0], "rejected": worst[0]})
    return pairs, {"pairs": len(pairs), "ties": ties, "single": single, "ratings": len(ratings)}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def too_few_message(stats: dict) -> tuple[str, str]:
    """(problem, fix) when the ratings give fewer than MIN_PAIRS pairs."""
    more = MIN_PAIRS - stats["pairs"]
    return (f"Your ratings give {_count(stats['pairs'], 'preference pair')} "
            f"({_count(stats['ties'], 'prompt')} skipped as ties, "
            f"{stats['single']} with only one rated answer); a preference run needs at least {MIN_PAIRS}.",
            f"Rate both answers of {more} more prompt{'s' if more != 1 else ''} with different scores (base vs "
            "fine-tuned in the Chat tab, or the held-out test), then build the pairs again.")


def write_pairs(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict]:
    """Write the pairs as JSONL (default: the run folder's pairs.jsonl). Refuses with fewer than MIN_PAIRS."""
    pairs, stats = build_pairs(run_dir)
    if stats["pairs"] < MIN_PAIRS:
        raise FinetuneError(*too_few_message(stats))
    path = Path(out) if out else pairs_path(run_dir)
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return path, stats
