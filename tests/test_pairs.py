"""Ratings -> preference pairs: the best-rated answer is chosen, ties are skipped and counted, and too
few pairs say how many more prompts to rate."""

import json

from finetune_core.cli import main
from finetune_core.pairs import MIN_PAIRS, build_pairs
from finetune_core.ratings import add_rating

CHAT_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ{i}?<|im_end|>\n<|im_start|>assistant\n"


def rate(run, i: int, base: int, tuned: int, held_out: bool = False):
    prompt = CHAT_PROMPT.format(i=i) if held_out else f"Q{i}?"
    add_rating(run, prompt, "base", f"base answer {i}", base, session="s1", index=i if held_out else None)
    add_rating(run, prompt, "finetuned", f"tuned answer {i}", tuned, session="s1", index=i if held_out else None)


def test_higher_rated_answer_is_chosen_ties_skipped_and_held_out_prompts_unwrapped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rate(run, 1, 2, 5)
    rate(run, 2, 4, 1, held_out=True)
    rate(run, 3, 3, 3)                                         # a tie: no preference
    add_rating(run, "Q4?", "base", "lonely answer", 4, session="s1")     # one answer only
    add_rating(run, "Q1?", "base", "base answer 1", 1, session="s1")     # a changed mind: the latest counts
    pairs, stats = build_pairs(run)
    assert pairs == [{"prompt": "Q1?", "chosen": "tuned answer 1", "rejected": "base answer 1"},
                     {"prompt": "Q2?", "chosen": "base answer 2", "rejected": "tuned answer 2"}]
    assert (stats["pairs"], stats["ties"], stats["single"]) == (2, 1, 1)


def test_cli_writes_pairs_or_says_how_many_more_to_rate(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for i in range(MIN_PAIRS - 1):
        rate(run, i, 1, 4)
    rate(run, 99, 2, 2)
    assert main(["pairs", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"give {MIN_PAIRS - 1} preference pairs (1 prompt skipped as ties" in err
    assert "Rate both answers of 1 more prompt with different scores" in err
    rate(run, 50, 5, 1)
    out = tmp_path / "p.jsonl"
    assert main(["pairs", str(run), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == MIN_PAIRS and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert f"{MIN_PAIRS} preference pairs" in capsys.readouterr().out
