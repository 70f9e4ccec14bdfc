"""Human ratings (Level-3 exercise): appended to run_dir/ratings.jsonl, persistent, validated."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import functools
import importlib
import json
import multiprocessing as mp

import gradio as gr
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


# ---------------------------------------------------------------------------------------------
# the Chat tab's rating handlers on a real run, through an app restart


OWNER = "a" * 32          # a browser session id as gr.BrowserState stores it
OTHER = "b" * 32


def _handlers(demo) -> dict:
    """The Chat tab's rating handlers (module-level functions of chat_tab) with this app's context."""
    from finetune_core.ui import chat_tab

    return {name: functools.partial(getattr(chat_tab, name), demo.ft_context)
            for name in ("chat", "rate", "heldout", "save_heldout", "show_ratings")}


def _drain(gen):
    out = None
    for out in gen:
        pass
    return out


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_llama_dir):
    """A finished instruction run (tiny Llama, 1 step) in an app's runs folder, owned by OWNER."""
    from conftest import owned_instruction_run

    run_id = "0123456789abcdef"
    runs = owned_instruction_run(tmp_path_factory.mktemp("ratings_app"), run_id, OWNER, tiny_llama_dir, "rated")
    return runs, run_id


def _app(runs, private: bool):
    from finetune_core.jobs import JobManager
    from finetune_core.ui import build_app

    manager = JobManager(runs, poll_interval=0.2, private_runs=private)
    demo = build_app(manager)
    return manager, demo, _handlers(demo)


def test_ratings_from_the_chat_handlers_persist_across_an_app_restart(chat_run):
    from finetune_core.jobs import owner_key
    from finetune_core.ui.generations import prompt_preview, read_generations

    runs, run_id = chat_run
    run_dir = runs / run_id
    (run_dir / "ratings.jsonl").unlink(missing_ok=True)
    gens = read_generations(run_dir)
    assert len(gens) >= 3
    manager, demo, h = _app(runs, private=False)
    try:
        # chat, then rate the fine-tuned answer twice (a double click, then a changed mind)
        _, ft_history, exchange = _drain(h["chat"]("Say hello.", run_id, 0.7, 0.9, 8, False, [], [], OWNER, None))
        assert exchange["run_dir"] == str(run_dir) and exchange["answer"] == ft_history[-1]["content"]
        h["rate"](4, exchange, run_id, OWNER, None)
        h["rate"](4, exchange, run_id, OWNER, None)
        md, cleared = h["rate"](5, exchange, run_id, OWNER, None)
        assert cleared is None and "fine-tuned: **5.00** / 5 (1 ratings)" in md

        # the held-out test: one row per generations.jsonl prompt, both models' answers
        table = _drain(h["heldout"](run_id, 3, 8, OWNER, None))
        assert len(table) == 3 and [r[0] for r in table] == [prompt_preview(g["prompt"]) for g in gens[:3]]
        assert all(isinstance(r[2], str) and isinstance(r[3], str) and r[4] is None and r[5] is None for r in table)
        table[0][4], table[0][5] = 2, 4
        table[2][5] = "3"
        md = h["save_heldout"](table, run_id, OWNER, None)
        md = h["save_heldout"](table, run_id, OWNER, None)          # "Save ratings" pressed twice
        assert "base: **2.00** / 5 (1 ratings)" in md and "fine-tuned: **4.00** / 5 (3 ratings)" in md

        # the log has every save; held-out lines keep the full prompt and the generations.jsonl index
        log = ratings.read_ratings(run_dir)
        assert len(log) == 3 + 3 * 2
        held = [r for r in log if r["index"] is not None]
        assert {(r["index"], r["model"], r["score"]) for r in held} == {(0, "base", 2), (0, "finetuned", 4),
                                                                        (2, "finetuned", 3)}
        for r in held:
            assert r["prompt"] == gens[r["index"]]["prompt"] != prompt_preview(gens[r["index"]]["prompt"])
            assert r["session"] == owner_key(OWNER)

        # a re-run of the held-out test shows this session's ratings again
        again = _drain(h["heldout"](run_id, 3, 8, OWNER, None))
        assert (again[0][4], again[0][5], again[2][5]) == (2, 4, 3)
    finally:
        demo.close()
        manager.shutdown(kill=True)

    # a restarted app: a new JobManager and app context on the same folder, nothing kept in memory
    manager, demo, h = _app(runs, private=False)
    try:
        md, _, _ = h["show_ratings"](run_id, OWNER, None)
        assert "base: **2.00** / 5 (1 ratings)" in md and "fine-tuned: **4.00** / 5 (3 ratings)" in md
        assert ratings.rating_summary(run_dir)["finetuned"]["counts"] == {"1": 0, "2": 0, "3": 1, "4": 1, "5": 1}
    finally:
        demo.close()
        manager.shutdown(kill=True)


def test_rating_handlers_refuse_bad_cells_and_runs_the_session_may_not_view(chat_run):
    runs, run_id = chat_run
    run_dir = runs / run_id
    (run_dir / "ratings.jsonl").unlink(missing_ok=True)
    from finetune_core.ui.generations import prompt_preview, read_generations

    gens = read_generations(run_dir)
    row = [prompt_preview(gens[0]["prompt"]), gens[0]["reference"], "base answer", "ft answer", 4, 9]
    manager, demo, h = _app(runs, private=True)          # runs private to their session (demo mode)
    try:
        with pytest.raises(Exception, match="Row 1, fine-tuned rating: 9 is not a rating; nothing was saved"):
            h["save_heldout"]([row], run_id, OWNER, None)
        with pytest.raises(Exception, match="No ratings to save"):
            h["save_heldout"]([row[:4] + [None, float("nan")]], run_id, OWNER, None)
        stale = ["a prompt this run never had"] + row[1:5] + [3]
        with pytest.raises(Exception, match="not one of this run's held-out prompts"):
            h["save_heldout"]([stale], run_id, OWNER, None)
        assert not (run_dir / "ratings.jsonl").exists()

        # another browser session cannot see this private run, so it cannot rate it either
        exchange = {"run_dir": str(run_dir), "prompt": "hi", "answer": "hello"}
        with pytest.raises(Exception, match="was not found"):
            h["rate"](5, exchange, run_id, OTHER, None)
        with pytest.raises(Exception, match="was not found"):
            h["save_heldout"]([row[:5] + [5]], run_id, OTHER, None)
        assert not (run_dir / "ratings.jsonl").exists()
        h["save_heldout"]([row[:5] + [5]], run_id, OWNER, None)      # its owner can
        assert [(r["model"], r["score"]) for r in ratings.read_ratings(run_dir)] == [("base", 4), ("finetuned", 5)]
    finally:
        demo.close()
        manager.shutdown(kill=True)


def test_ratings_become_preference_pairs_and_start_a_run_on_the_tuned_model(chat_run):
    from finetune_core import rundir
    from finetune_core.pairs import MIN_PAIRS
    from finetune_core.ui import chat_tab

    runs, run_id = chat_run
    run_dir = runs / run_id
    (run_dir / "ratings.jsonl").unlink(missing_ok=True)
    manager, demo, _ = _app(runs, private=True)
    ctx = demo.ft_context
    try:
        for i in range(3):
            ratings.add_rating(run_dir, f"Q{i}?", "base", f"base {i}", 2, session=OWNER)
            ratings.add_rating(run_dir, f"Q{i}?", "finetuned", f"tuned {i}", 2 if i == 0 else 4, session=OWNER)
        md = chat_tab.pairs_from_ratings(ctx, run_id, OWNER, None)
        assert "give 2 preference pairs (1 prompt skipped as ties" in md and f"needs at least {MIN_PAIRS}" in md
        assert f"Rate both answers of {MIN_PAIRS - 2} more prompts" in md
        with pytest.raises(gr.Error, match="at least"):
            chat_tab.start_preference_run(ctx, run_id, OWNER, None)
        for i in range(3, MIN_PAIRS + 1):
            ratings.add_rating(run_dir, f"Q{i}?", "base", f"base {i}", 1, session=OWNER)
            ratings.add_rating(run_dir, f"Q{i}?", "finetuned", f"tuned {i}", 5, session=OWNER)
        assert f"**{MIN_PAIRS} preference pairs** (1 ties skipped" in chat_tab.pairs_from_ratings(ctx, run_id, OWNER, None)
        assert len(rundir.pairs_path(run_dir).read_text().splitlines()) == MIN_PAIRS
        with pytest.raises(gr.Error, match="Ratings are saved with a fine-tuned run"):
            chat_tab.pairs_from_ratings(ctx, "bundled:smollm2-135m", OWNER, None)
        md = chat_tab.start_preference_run(ctx, run_id, OWNER, None)
        new_id = md.split("`")[1]
        cfg = rundir.read_config(runs / new_id)
        assert cfg["task"] == "preference" and cfg["model"] == str(run_dir / "model")
        assert cfg["strategy"]["name"] == "lora" and cfg["data"]["train"].endswith("pairs.jsonl")
        manager.stop(new_id, OWNER)
    finally:
        manager.shutdown(kill=True)
