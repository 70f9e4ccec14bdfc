"""Human ratings of answers, base model vs fine-tuned: the article's Level-3 exercise.

    add_rating("runs/my-run", "How do I reset my password?", "finetuned", "Open Settings ...", 4)
    add_rating("runs/my-run", full_prompt, "base", answer, 2, session=key, index=3)   # generations.jsonl row 3
    read_ratings("runs/my-run")      # every rating ever saved, oldest first (the log)
    latest_ratings("runs/my-run")    # the one that counts per (session, prompt/index, model, answer)
    rating_summary("runs/my-run")    # {"base": {"mean": 2.5, "n": 4, ...}, "finetuned": {"mean": 4.0, "n": 4, ...}}

Ratings live in `<run_dir>/ratings.jsonl`, one JSON object per line, so they survive restarts of
the app and travel with the run folder. The file is an append-only log: saving the same answer's
rating again (a second click on "Save ratings", a changed mind) appends a new line, and the summary
counts only the latest line per (session, generation index, prompt, model, answer), so nothing is
counted twice and a correction replaces the old score. Each append is a single write of one whole
line, under an exclusive file lock where the OS has one, flushed and fsynced before add_rating returns.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path

from .errors import FinetuneError
from .rundir import ratings_path

MODELS = ("base", "finetuned")
MIN_SCORE, MAX_SCORE = 1, 5
MAX_TEXT_CHARS = 20_000          # one rating line stays small; longer answers are cut, and marked


def user_text(prompt: str) -> str:
    """The user's part of a rendered prompt (a chat template's last user turn, or Alpaca's instruction
    and input); a plain question as it is. Held-out ratings store the prompt as the model saw it."""
    text = prompt or ""
    m = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, flags=re.S)
    if m:
        text = m[-1]
    else:
        m = re.search(r"### Instruction:\n(.*?)\n\n### (?:Input|Response):", text, flags=re.S)
        if m:
            text = m.group(1)
            inp = re.search(r"### Input:\n(.*?)\n\n### Response:", prompt, flags=re.S)
            if inp:
                text += "\n\n" + inp.group(1)
        else:
            for marker in ("user\n", "User:", "[INST]"):
                if marker in text:
                    text = text.rsplit(marker, 1)[-1]
                    break
    return text.strip()


def _score(score) -> int:
    """An integer 1..5; integral floats (4.0) and digit strings ("4") from UI widgets are accepted."""
    value = None
    if isinstance(score, bool):
        value = None
    elif isinstance(score, int):
        value = score
    elif isinstance(score, float) and math.isfinite(score) and score.is_integer():
        value = int(score)
    elif isinstance(score, str) and score.strip().lstrip("+").isdigit():
        value = int(score.strip())
    if value is None or not MIN_SCORE <= value <= MAX_SCORE:
        raise FinetuneError(f"A rating must be a whole number from {MIN_SCORE} to {MAX_SCORE}, got {score!r}.",
                            f"Pick a score between {MIN_SCORE} (bad) and {MAX_SCORE} (excellent).")
    return value


def _text(value, what: str, required: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise FinetuneError(f"The {what} to rate must be text, got {type(value).__name__}.", "Pass a string.")
    if required and not value.strip():
        raise FinetuneError(f"The {what} to rate is empty.", f"Enter a {what} first, then rate the answer.")
    if len(value) > MAX_TEXT_CHARS:
        value = value[:MAX_TEXT_CHARS] + " [...]"
    return value


def _append_line(path: Path, line: str) -> None:
    """Append one line atomically: O_APPEND, one write(), lock, flush + fsync."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):   # pragma: no cover - Windows or a filesystem without locks
            pass
        size = os.fstat(fd).st_size
        if size:
            # A crash mid-write could have left a half line: start ours on a fresh line so both survive
            # (read_ratings skips the broken one).
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)      # closing releases the lock


def _index(index) -> int | None:
    if index is None:
        return None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise FinetuneError(f"A held-out rating's generation index must be a whole number >= 0, got {index!r}.",
                            "Pass the row's 'index' from generations.jsonl, or None for a chat answer.")
    return index


def add_rating(run_dir: str | Path, prompt: str, model: str, answer: str, score, session: str | None = None,
               index: int | None = None) -> dict:
    """Append one rating to `<run_dir>/ratings.jsonl` and return the stored record.

    model: 'base' (the model before fine-tuning) or 'finetuned'. score: 1..5, else FinetuneError.
    prompt: the whole prompt (texts over MAX_TEXT_CHARS are cut and marked). index: the prompt's
    row in the run's generations.jsonl for held-out ratings, None for a chat answer.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FinetuneError(f"The run folder '{run}' does not exist, so the rating has nowhere to go.",
                            "Pick a finished run first (its folder holds metrics.json and model/).")
    model = str(model).strip().lower() if model is not None else ""
    if model not in MODELS:
        raise FinetuneError(f"A rating is for the 'base' or the 'finetuned' model, got {model!r}.",
                            "Use model='base' or model='finetuned'.")
    record = {
        "id": uuid.uuid4().hex,
        "time": time.time(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prompt": _text(prompt, "prompt", required=True),
        "model": model,
        "answer": _text(answer, "answer", required=False),
        "score": _score(score),
        "session": None if session is None else str(session),
        "index": _index(index),
    }
    _append_line(ratings_path(run), json.dumps(record, ensure_ascii=False))
    return record


def _valid(rec) -> bool:
    if not (isinstance(rec, dict) and rec.get("model") in MODELS and isinstance(rec.get("score"), int)
            and not isinstance(rec.get("score"), bool) and MIN_SCORE <= rec["score"] <= MAX_SCORE):
        return False
    index = rec.get("index")
    # the fields rating_key reads must be plain values (a hand-edited line must not break the summary)
    return (isinstance(rec.get("prompt"), str) and isinstance(rec.get("answer", ""), str)
            and isinstance(rec.get("session"), (str, type(None)))
            and (index is None or (isinstance(index, int) and not isinstance(index, bool))))


def read_ratings(run_dir: str | Path, session: str | None = None) -> list[dict]:
    """Every valid rating of the run, oldest first (broken or foreign lines are skipped).

    session: only that session's ratings (None = all)."""
    path = ratings_path(run_dir)
    if not path.exists():
        return []
    out = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _valid(rec) and (session is None or rec.get("session") == session):
                out.append(rec)
    return out


def rating_key(rec: dict) -> tuple:
    """What makes two log lines the same rating: who, which prompt (held-out row), which model, which answer."""
    return (rec.get("session"), rec.get("index"), rec.get("prompt"), rec["model"], rec.get("answer"))


def latest_ratings(run_dir: str | Path, session: str | None = None) -> list[dict]:
    """The ratings that count: the latest line per rating_key, in the order they were last saved."""
    latest: dict[tuple, dict] = {}
    for rec in read_ratings(run_dir, session=session):
        key = rating_key(rec)
        latest.pop(key, None)          # re-insert: a re-rated answer moves to its newest position
        latest[key] = rec
    return list(latest.values())


def rating_summary(run_dir: str | Path, session: str | None = None) -> dict:
    """{"base": {"mean", "n", "counts"}, "finetuned": {...}}; mean is None when there is no rating.

    Counts latest_ratings(): a rating saved twice counts once, with its latest score."""
    ratings = latest_ratings(run_dir, session=session)
    summary = {}
    for m in MODELS:
        scores = [r["score"] for r in ratings if r["model"] == m]
        summary[m] = {"mean": (sum(scores) / len(scores)) if scores else None, "n": len(scores),
                      "counts": {str(s): scores.count(s) for s in range(MIN_SCORE, MAX_SCORE + 1)}}
    return summary
