"""Human ratings (Level-3 exercise): appended to run_dir/ratings.jsonl, persistent, validated."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib
import json
import multiprocessing as mp

import pytest

import finetune_core.ratings as ratings
from finetune_core.errors import FinetuneError


def test_ratings_persist_and_summarise(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert ratings.read_ratings(run) == []
    empty = ratings.rating_summary(run)
    assert empty["base"] == {"mean": None, "n": 0, "counts": {str(i): 0 for i in range(1, 6)}}
    assert empty["finetuned"]["mean"] is None and empty["finetuned"]["n"] == 0

    rec = ratings.add_rating(run, "How do I reset my password?", "base", "No idea.", 2, session="s1")
    assert rec["score"] == 2 and rec["model"] == "base" and rec["session"] == "s1" and rec["id"]
    ratings.add_rating(run, "How do I reset my password?", "finetuned", "Open Settings > Security.", 5, session="s1")
    ratings.add_rating(run, "Where is my order?", "base", "It is 😀 somewhere.", 3)
    ratings.add_rating(str(run), "Where is my order?", "finetuned", "It ships tomorrow.", 4.0)   # str path, 4.0
    ratings.add_rating(run, "Where is my order?", "FineTuned", "Tomorrow.", "4")                 # UI widget values

    # a fresh module object (as after an app restart) reads the same file
    fresh = importlib.reload(ratings)
    rows = fresh.read_ratings(run)
    assert [r["score"] for r in rows] == [2, 5, 3, 4, 4]
    assert [r["model"] for r in rows] == ["base", "finetuned", "base", "finetuned", "finetuned"]
    assert rows[2]["answer"] == "It is 😀 somewhere."
    assert all(isinstance(r["score"], int) for r in rows)
    summary = fresh.rating_summary(run)
    assert summary["base"]["mean"] == pytest.approx(2.5) and summary["base"]["n"] == 2
    assert summary["finetuned"]["mean"] == pytest.approx(13 / 3) and summary["finetuned"]["n"] == 3
    assert summary["finetuned"]["counts"] == {"1": 0, "2": 0, "3": 0, "4": 2, "5": 1}
    assert fresh.rating_summary(run, session="s1")["finetuned"] == {
        "mean": 5.0, "n": 1, "counts": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 1}}

    # the file is plain JSON lines, one per rating
    lines = (run / "ratings.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(json.loads(ln)["prompt"] for ln in lines)


def test_saving_the_same_rating_twice_counts_once_with_the_latest_score(tmp_path):
    """ratings.jsonl is a log (every save appended); the summary counts the latest line per
    (session, generation index, prompt, model, answer)."""
    prompt = "### Instruction:\n" + "Summarise this long text. " * 40      # longer than any table preview
    for _ in range(2):                                  # "Save ratings" pressed twice
        ratings.add_rating(tmp_path, prompt, "base", "meh", 2, session="s1", index=0)
        ratings.add_rating(tmp_path, prompt, "finetuned", "good", 4, session="s1", index=0)
    ratings.add_rating(tmp_path, prompt, "finetuned", "good", 5, session="s1", index=0)     # changed their mind
    assert len(ratings.read_ratings(tmp_path)) == 5                                         # the log keeps all
    s = ratings.rating_summary(tmp_path)
    assert (s["base"]["mean"], s["base"]["n"]) == (2.0, 1)
    assert (s["finetuned"]["mean"], s["finetuned"]["n"]) == (5.0, 1)
    assert ratings.latest_ratings(tmp_path)[-1]["prompt"] == prompt                        # stored whole
    assert ratings.latest_ratings(tmp_path)[-1]["index"] == 0

    # these are different ratings and all count: another person, another held-out row, another answer
    ratings.add_rating(tmp_path, prompt, "finetuned", "good", 1, session="s2", index=0)
    ratings.add_rating(tmp_path, "other prompt", "finetuned", "good", 3, session="s1", index=1)
    ratings.add_rating(tmp_path, prompt, "finetuned", "a new answer after a re-run", 3, session="s1", index=0)
    s = ratings.rating_summary(tmp_path)
    assert s["finetuned"]["n"] == 4 and s["finetuned"]["mean"] == pytest.approx((5 + 1 + 3 + 3) / 4)
    assert ratings.rating_summary(tmp_path, session="s2")["finetuned"]["mean"] == 1.0

    # a chat answer (no index) rated twice also counts once
    ratings.add_rating(tmp_path, "hi", "finetuned", "hello!", 4, session="s1")
    ratings.add_rating(tmp_path, "hi", "finetuned", "hello!", 2, session="s1")
    assert ratings.rating_summary(tmp_path)["finetuned"]["n"] == 5


def test_bad_generation_index_refused(tmp_path):
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(FinetuneError, match="generation index"):
            ratings.add_rating(tmp_path, "p", "base", "a", 3, index=bad)
    assert not (tmp_path / "ratings.jsonl").exists()


def test_hand_edited_lines_with_odd_fields_are_skipped(tmp_path):
    ratings.add_rating(tmp_path, "p", "base", "a", 3)
    with open(tmp_path / "ratings.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": {"x": 1}, "model": "base", "answer": "a", "score": 1}) + "\n")
        f.write(json.dumps({"prompt": "p", "model": "base", "answer": "a", "score": 1, "index": [0]}) + "\n")
    assert ratings.rating_summary(tmp_path)["base"] == {"mean": 3.0, "n": 1,
                                                        "counts": {"1": 0, "2": 0, "3": 1, "4": 0, "5": 0}}


@pytest.mark.parametrize("bad", [0, 6, -1, 2.5, "five", "", None, True, float("nan"), [3]])
def test_bad_score_refused_and_nothing_written(tmp_path, bad):
    with pytest.raises(FinetuneError, match="1 to 5"):
        ratings.add_rating(tmp_path, "p", "base", "a", bad)
    assert not (tmp_path / "ratings.jsonl").exists()


def test_bad_model_prompt_or_run_dir_refused(tmp_path):
    with pytest.raises(FinetuneError, match="'base' or the 'finetuned'"):
        ratings.add_rating(tmp_path, "p", "gpt4", "a", 3)
    with pytest.raises(FinetuneError, match="prompt"):
        ratings.add_rating(tmp_path, "   ", "base", "a", 3)
    with pytest.raises(FinetuneError, match="does not exist"):
        ratings.add_rating(tmp_path / "missing", "p", "base", "a", 3)
    assert ratings.read_ratings(tmp_path) == []


def test_broken_line_is_skipped_and_next_append_survives(tmp_path):
    """A crash mid-write leaves half a line: reading skips it, the next rating still lands whole."""
    ratings.add_rating(tmp_path, "p1", "base", "a", 1)
    with open(tmp_path / "ratings.jsonl", "a", encoding="utf-8") as f:
        f.write('{"prompt": "half a li')               # no newline
    ratings.add_rating(tmp_path, "p2", "finetuned", "b", 5)
    rows = ratings.read_ratings(tmp_path)
    assert [(r["prompt"], r["score"]) for r in rows] == [("p1", 1), ("p2", 5)]
    assert ratings.rating_summary(tmp_path)["finetuned"]["mean"] == 5.0


def _rate_many(run_dir, worker, n):
    for i in range(n):
        ratings.add_rating(run_dir, f"prompt {worker}-{i}", "base" if i % 2 else "finetuned", "x" * 5000, 1 + i % 5)


def test_concurrent_appends_from_processes_do_not_interleave(tmp_path):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    procs = [ctx.Process(target=_rate_many, args=(str(tmp_path), w, 25)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = ratings.read_ratings(tmp_path)
    assert len(rows) == 75
    assert len((tmp_path / "ratings.jsonl").read_text(encoding="utf-8").splitlines()) == 75
    assert ratings.rating_summary(tmp_path)["base"]["n"] + ratings.rating_summary(tmp_path)["finetuned"]["n"] == 75
