"""The base-model cache: an entry is read only when everything it was measured on is unchanged, a killed
writer's leftovers are never read, an unwritable FINETUNE_HOME only turns it off (one info event), and
a second run on the same data reads the base model's numbers and answers instead of measuring them.
Tiny models only (tests/conftest.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, instruction_rows, write_jsonl
from finetune_core import basecache
from finetune_core.basecache import (BaseCache, entry_key, general_text_key, read_general_perplexity,
                                     write_general_perplexity)
from finetune_core.events import EventWriter, read_all_events

KEY = "a" * 64


def infos(path: Path) -> list[str]:
    return [e.get("message", "") for e in read_all_events(path) if e["type"] == "info"]


# ---------------------------------------------------------------------------------------------
# entries on disk


def test_entry_round_trip_and_what_is_never_read(tmp_path):
    cache = BaseCache(folder=tmp_path / "c")
    assert cache.read(KEY) is None and cache.read(None) is None
    assert cache.write(KEY, {"metrics": {"eval_loss_before": 2.5}, "answers": ["hi"]})
    entry = cache.read(KEY)
    assert entry["metrics"] == {"eval_loss_before": 2.5} and entry["answers"] == ["hi"]
    assert [p.name for p in (tmp_path / "c").iterdir()] == [f"{KEY}.json"]     # no temporary left

    other = "b" * 64
    path = cache.path(other)
    text = json.dumps({"key": other, "metrics": {}, "answers": [], "complete": True})
    path.write_text(text[:len(text) // 2])                          # cut off mid-file
    assert cache.read(other) is None
    path.write_text(json.dumps({"key": other, "metrics": {}, "answers": []}))     # no completion mark
    assert cache.read(other) is None
    path.write_text(json.dumps({"key": KEY, "metrics": {}, "answers": [], "complete": True}))  # another key's
    assert cache.read(other) is None


def test_a_writer_killed_mid_write_leaves_nothing_readable(tmp_path):
    """A real process SIGKILLed after writing its entry's bytes but before the rename into place."""
    folder = tmp_path / "c"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from finetune_core.basecache import BaseCache
        def hang(*args, **kwargs):
            print("written", flush=True)
            time.sleep(600)
        os.replace = hang
        BaseCache(folder={str(folder)!r}).write({KEY!r}, {{"metrics": {{"eval_loss_before": 1.0}}, "answers": ["x"]}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    leftovers = list(folder.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{KEY}.tmp")
    cache = BaseCache(folder=folder)
    assert cache.read(KEY) is None
    # the next writer stores a good entry; a temporary older than an hour is removed then
    os.utime(leftovers[0], (time.time() - 2 * 3600,) * 2)
    assert cache.write(KEY, {"metrics": {"eval_loss_before": 1.5}, "answers": ["y"]})
    assert cache.read(KEY)["answers"] == ["y"] and not leftovers[0].exists()


def test_unwritable_or_full_disk_turns_the_cache_off_with_one_info_line(tmp_path, monkeypatch):
    writer = EventWriter(tmp_path / "events.jsonl", enabled=True)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache = BaseCache(writer, folder=blocker / "base_cache")        # mkdir fails: like a read-only home
    assert cache.write(KEY, {"metrics": {}, "answers": []}) is False
    assert cache.write(KEY, {"metrics": {}, "answers": []}) is False and cache.disabled
    assert cache.read(KEY) is None
    said = [m for m in infos(tmp_path / "events.jsonl") if "cache off" in m]
    assert len(said) == 1 and "cannot be written" in said[0]

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(basecache.os, "fsync", full)
    cache = BaseCache(folder=tmp_path / "c")
    assert cache.write(KEY, {"metrics": {}, "answers": []}) is False
    assert list((tmp_path / "c").iterdir()) == []                   # the temporary file is gone too


# ---------------------------------------------------------------------------------------------
# the key


def test_the_key_changes_with_anything_the_measurement_depends_on(tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    parts = {"val_batches": "v1", "prompts": "p1", "max_length": 96}
    key = entry_key(str(model), parts)
    assert key and key == entry_key(str(model), dict(parts))
    assert entry_key(str(model), {**parts, "val_batches": "v2"}) != key       # other validation rows
    assert entry_key(str(model), {**parts, "max_length": 64}) != key
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    changed_config = entry_key(str(model), parts)
    assert changed_config != key
    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))   # the weights rewritten
    assert entry_key(str(model), parts) not in (key, changed_config)
    assert entry_key("no-such-org/no-such-model", parts) is None                # not on this disk: no cache
    weights.unlink()
    assert entry_key(str(model), parts) is None


def test_general_perplexity_entry_keeps_finite_numbers_only(tmp_path):
    cache = BaseCache(folder=tmp_path / "c")
    assert write_general_perplexity(cache, KEY, "m", 12.5) and read_general_perplexity(cache, KEY) == 12.5
    for bad in (float("nan"), float("inf"), None):
        assert not write_general_perplexity(cache, "b" * 64, "m", bad)
        assert read_general_perplexity(cache, "b" * 64) is None
    cache.write("c" * 64, {"metrics": {"general_perplexity": "12"}})           # not a number: not read
    assert read_general_perplexity(cache, "c" * 64) is None and read_general_perplexity(cache, None) is None


# ---------------------------------------------------------------------------------------------
# in a run


@pytest.fixture
def instruction_run(tmp_path, tiny_llama_dir, monkeypatch):
    """(make_run(rows, out) -> (RunContext, InstructionData), events path) on the tiny Llama, with a
    private FINETUNE_HOME."""
    from finetune_core.config import config_from_dict
    from finetune_core.data import load_frames
    from finetune_core.models import load_tokenizer
    from finetune_core.tasks import RunContext, instruction

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    events = tmp_path / "events.jsonl"

    def make(rows: list[dict], name: str = "data"):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        cfg = config_from_dict({"task": "instruction", "model": tiny_llama_dir, "strategy": {"name": "full"},
                                "data": {"train": data, "val_size": 0.5, "max_length": 96},
                                "output_dir": str(tmp_path / "run")})
        run = RunContext(cfg=cfg, out=tmp_path / "run", writer=EventWriter(events, enabled=True), main=True,
                         model_path=tiny_llama_dir, model_kind="causal", tokenizer=load_tokenizer(tiny_llama_dir))
        return run, instruction.prepare(run, load_frames(cfg))

    return make, events


def test_measure_base_model_reads_the_cache_and_measures_on_any_change(instruction_run, tiny_llama_dir,
                                                                       monkeypatch):
    from finetune_core.models import load_model
    from finetune_core.tasks import instruction

    make, events = instruction_run
    probes = []
    real_probe = instruction.lm_probe
    monkeypatch.setattr(instruction, "lm_probe", lambda *a, **k: probes.append(1) or real_probe(*a, **k))
    model = load_model(tiny_llama_dir, "instruction", "causal")
    run, data = make(instruction_rows(12))

    first: dict = {}
    answers = instruction.measure_base_model(run, model, data, first)
    assert first["base_cache"] == "miss" and len(probes) == 1 and len(answers) == len(data.val_ex.prompts)
    second: dict = {}
    assert instruction.measure_base_model(run, model, data, second) == answers
    assert second.pop("base_cache") == "hit" and len(probes) == 1
    assert second == {k: v for k, v in first.items() if k != "base_cache"}
    assert any(e.get("phase") == "baseline" and e.get("cached") for e in read_all_events(events))

    # other validation rows: another key, measured again, but for the general-text perplexity, which
    # depends on the base model alone (its own entry): no general-text batch is scored
    scored = []
    real_loss = instruction.evaluation.token_loss
    monkeypatch.setattr(instruction.evaluation, "token_loss",
                        lambda m, batches, **k: scored.extend(batches) or real_loss(m, batches, **k))
    rows = [{**r, "output": r["output"] + " Thanks."} for r in instruction_rows(12)]
    run2, data2 = make(rows, "changed")
    third: dict = {}
    instruction.measure_base_model(run2, model, data2, third)
    assert third["base_cache"] == "partial" and len(probes) == 2
    assert third["general_perplexity_before"] == first["general_perplexity_before"]
    assert third["eval_loss_before"] != first["eval_loss_before"]
    val, text = instruction.probe_batches(run2.tokenizer, data2, run2.cfg)
    assert len(scored) == len(val) and all(any(b["input_ids"].equal(v["input_ids"]) for v in val) for b in scored)
    assert any("general-text perplexity is in the cache" in str(e.get("message")) for e in read_all_events(events))

    # an entry cut off by a killed writer under the right name is not read: measured and rewritten
    key = instruction.base_cache_key(run, data)
    path = BaseCache().path(key)
    path.write_text(path.read_text()[:40])
    general_path = BaseCache().path(general_text_key(tiny_llama_dir, text))
    general_path.write_text(general_path.read_text()[:40])
    fourth: dict = {}
    assert instruction.measure_base_model(run, model, data, fourth) == answers
    assert fourth["base_cache"] == "miss" and len(probes) == 3 and BaseCache().read(key) is not None
    assert fourth["general_perplexity_before"] == pytest.approx(first["general_perplexity_before"], rel=1e-6)
    assert read_general_perplexity(BaseCache(), general_text_key(tiny_llama_dir, text)) is not None   # rewritten


def test_an_unwritable_home_only_turns_the_cache_off(instruction_run, tiny_llama_dir, tmp_path, monkeypatch):
    from finetune_core.models import load_model
    from finetune_core.tasks import instruction

    make, events = instruction_run
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FINETUNE_HOME", str(blocker))                # FINETUNE_HOME/base_cache cannot exist
    run, data = make(instruction_rows(12))
    metrics: dict = {}
    answers = instruction.measure_base_model(run, load_model(tiny_llama_dir, "instruction", "causal"), data, metrics)
    assert metrics["base_cache"] == "off" and "eval_loss_before" in metrics and answers
    assert len([m for m in infos(events) if "cache off" in m]) == 1


def test_second_run_with_another_strategy_reads_the_first_runs_base_measurements(tmp_path, tiny_llama_dir,
                                                                                monkeypatch):
    """full then LoRA on the same data: the second run's "before" side (numbers and answers) comes from
    the cache. The full run evaluates at its last step: that evaluation is its final validation loss
    (no second pass, no checkpoint written at the end of a finished run), and it kept the held-out
    prompts' prefill for the tuned model's answers, as the base model's loss pass does for its own."""
    from finetune_core import generate as G
    from finetune_core.config import config_from_dict
    from finetune_core.models import load_model, load_tokenizer
    from finetune_core.tasks import RunContext, instruction
    from finetune_core.train import train

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(16))
    held = []             # per generation: (prompts, prompts whose prefill a loss pass had kept)
    real_prefill = G.prefilled_cache
    monkeypatch.setattr(G, "prefilled_cache", lambda m, rows, room=0, known=None: held.append(
        (len(rows), sum(known is not None and known.get(r) is not None for r in rows)))
        or real_prefill(m, rows, room, known))
    runs = {}
    for strategy in ("full", "lora"):
        values = {"task": "instruction", "model": tiny_llama_dir, "strategy": {"name": strategy},
                  "data": {"train": data, "val_size": 0.25, "max_length": 96},
                  "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "logging_steps": 1,
                               "learning_rate": 5e-3},
                  "output_dir": str(tmp_path / strategy), "seed": 3}
        runs[strategy] = (config_from_dict(values), train(config_from_dict(values)))
    full, lora = runs["full"][1], runs["lora"][1]
    assert full["base_cache"] == "miss" and lora["base_cache"] == "hit"
    for key in ("eval_loss_before", "perplexity_before", "general_perplexity_before", "rougeL_before"):
        assert lora[key] == full[key], key
    before = [[json.loads(x)["before"] for x in (tmp_path / s / "generations.jsonl").read_text().splitlines()]
              for s in ("full", "lora")]
    assert before[0] == before[1]

    events = read_all_events(tmp_path / "full" / "events.jsonl")
    assert not [e for e in events if e["type"] == "save"] and not (tmp_path / "full" / "checkpoints").exists()
    last_eval = [e for e in events if e["type"] == "eval"][-1]
    assert last_eval["step"] == full["global_step"] and full["eval_loss"] == last_eval["eval_loss"]
    phases = [e.get("phase") for e in events if e.get("phase")]
    for phase in ("loading", "training", "saving", "evaluating", "generating", "baseline", "done"):
        assert phase in phases, phase
    end = events[-1]
    assert end["type"] == "end" and end["train_seconds"] == full["train_seconds"]
    assert 0 < full["train_seconds"] < end["total_seconds"] == full["total_seconds"]
    # the reused evaluation is the saved model's validation loss
    cfg = runs["full"][0]
    tok = load_tokenizer(str(tmp_path / "full" / "model"))
    run = RunContext(cfg=cfg, out=tmp_path / "x", writer=EventWriter(tmp_path / "x.jsonl", enabled=False),
                     main=False, model_path=tiny_llama_dir, model_kind="causal", tokenizer=tok)
    from finetune_core.data import load_frames

    probe = instruction.lm_probe(load_model(str(tmp_path / "full" / "model"), "instruction", "causal"), tok,
                                 instruction.prepare(run, load_frames(cfg)), cfg, "")
    assert full["eval_loss"] == pytest.approx(probe["eval_loss"], rel=1e-5)
    # full: tuned and base answers, LoRA: tuned answers (its base side was read from the cache)
    assert len(held) == 3 and all(n == kept == full["generations"] for n, kept in held)
    lines = [json.loads(x) for x in (tmp_path / "full" / "generations.jsonl").read_text().splitlines()]
    saved = load_model(str(tmp_path / "full" / "model"), "instruction", "causal")
    assert [g["after"] for g in lines] == G.generate_batch(saved, tok, [g["prompt"] for g in lines], full["template"])


# ---------------------------------------------------------------------------------------------
# the base weights back into the trained model, in place


def test_load_weights_into_restores_the_base_weights_in_place(tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file, save_file

    from finetune_core.models import load_model, load_weights_into

    model = load_model(tiny_llama_dir, "instruction", "causal")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert load_weights_into(model, tiny_llama_dir)
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs        # the same tensors
    assert model.lm_head.weight is model.model.embed_tokens.weight                # still tied

    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    tensors = load_file(str(other / "model.safetensors"))
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(other / "model.safetensors"))
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    changed = model.model.norm.weight.clone()
    assert not load_weights_into(model, str(other))                 # not exactly this model's tensors
    assert torch.equal(model.model.norm.weight, changed)            # untouched
    assert not load_weights_into(model, str(tmp_path / "missing"))


def test_a_preference_runs_before_side_comes_from_the_cache_where_an_earlier_run_measured_it(
        instruction_run, tiny_llama_dir, tmp_path, monkeypatch):
    """Both tasks score the same general-text batches on the base model: the number one measured is the
    other's "before" side, and a preference run on a model measured before scores no general text; the
    answers to the same held-out prompts are read back too (another strategy on the same pairs)."""
    from finetune_core.config import config_from_dict
    from finetune_core.data import load_frames
    from finetune_core.models import load_model, load_tokenizer
    from finetune_core.tasks import RunContext, instruction, preference

    make, events = instruction_run
    model = load_model(tiny_llama_dir, "instruction", "causal")
    run, data = make(instruction_rows(12))
    measured: dict = {}
    instruction.measure_base_model(run, model, data, measured)

    pairs = [{"prompt": f"What is {i} plus one?", "chosen": f"{i + 1}.", "rejected": "Hard to say."} for i in range(8)]
    cfg = config_from_dict({"task": "preference", "model": tiny_llama_dir, "strategy": {"name": "full"},
                            "data": {"train": write_jsonl(tmp_path / "pairs.jsonl", pairs), "val_size": 0.5,
                                     "max_length": 96},
                            "output_dir": str(tmp_path / "dpo")})
    prun = RunContext(cfg=cfg, out=tmp_path / "dpo", writer=EventWriter(events, enabled=True), main=True,
                      model_path=tiny_llama_dir, model_kind="causal", tokenizer=load_tokenizer(tiny_llama_dir))
    pdata = preference.prepare(prun, load_frames(cfg))
    calls, generated = [], []
    real, real_generate = preference.evaluation.batches_perplexity, preference.generate_batch
    monkeypatch.setattr(preference.evaluation, "batches_perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(preference, "generate_batch", lambda *a, **k: generated.append(1) or real_generate(*a, **k))
    metrics: dict = {}
    answers = preference.measure_base_model(prun, model, pdata, metrics, ["Say hi.", "Say bye."])
    assert calls == [] and generated == [1] and len(answers) == 2 and metrics["base_cache"] == "partial"
    assert metrics["general_perplexity_before"] == measured["general_perplexity_before"]

    # another strategy on the same pairs: nothing measured, the same answers
    second: dict = {}
    assert preference.measure_base_model(prun, model, pdata, second, ["Say hi.", "Say bye."]) == answers
    assert calls == [] and generated == [1] and second == {**metrics, "base_cache": "hit"}
    # other held-out prompts: their answers are measured, the perplexity still read
    third: dict = {}
    preference.measure_base_model(prun, model, pdata, third, ["Say hi."])
    assert calls == [] and generated == [1, 1] and third["base_cache"] == "partial"

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "other-home"))      # nothing cached there: measured
    again: dict = {}
    assert preference.measure_base_model(prun, model, pdata, again, ["Say hi.", "Say bye."]) == answers
    assert calls == [1] and generated == [1, 1, 1] and again["base_cache"] == "miss"
    assert again["general_perplexity_before"] == pytest.approx(measured["general_perplexity_before"], rel=1e-5)
