"""The app's torch work runs on one inference thread (generate.on_inference_thread).

Why it matters: with GNU OpenMP, a second thread that runs torch ops makes every thread's small ops
slower (SmolLM2 streamed 19 instead of 31 tokens/s on 2 cores; `make bench`, app_latency). These tests
check the plumbing: which thread generates, that calls from that thread do not deadlock, that errors
reach the reader, and that a reader who leaves stops the generation.
"""

from __future__ import annotations

import threading

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama_dir):
    from finetune_core.generate import load_for_inference, on_inference_thread

    model, tok, info = on_inference_thread(load_for_inference, tiny_llama_dir)
    return model, tok


def _spy_generate(model, monkeypatch, **force):
    """Record the thread and the number of new tokens of each model.generate call."""
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        kwargs.update(force)
        out = original(*args, **kwargs)
        calls.append({"thread": threading.current_thread(), "new": out.shape[1] - kwargs["input_ids"].shape[1]})
        return out

    monkeypatch.setattr(model, "generate", spy)
    return calls


MSG = [{"role": "user", "content": "Say hello."}]


def test_stream_generates_on_one_inference_thread(tiny_chat, monkeypatch):
    from finetune_core.generate import stream_generate

    model, tok = tiny_chat
    calls = _spy_generate(model, monkeypatch)
    # two readers on two different threads, as gradio's handler threads are
    for _ in range(2):
        t = threading.Thread(target=lambda: list(stream_generate(model, tok, MSG, "chat", max_new_tokens=4,
                                                                  do_sample=False)))
        t.start()
        t.join(60)
    assert len(calls) == 2
    assert calls[0]["thread"] is calls[1]["thread"], "each stream started a thread of its own"
    assert calls[0]["thread"].name.startswith("finetune-inference")
    assert calls[0]["thread"] is not threading.current_thread()


def test_calls_from_the_inference_thread_run_directly():
    from finetune_core.generate import on_inference_thread

    def inner():
        return threading.current_thread().name

    def outer():
        # would deadlock on a one-worker pool if it were queued behind outer itself
        return threading.current_thread().name, on_inference_thread(inner)

    here, nested = on_inference_thread(outer)
    assert here == nested and here.startswith("finetune-inference")


def test_errors_reach_the_reader(tiny_chat, monkeypatch):
    from finetune_core.generate import stream_generate

    model, tok = tiny_chat

    def broken(**kwargs):
        raise ValueError("generation failed on purpose")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(ValueError, match="on purpose"):
        list(stream_generate(model, tok, MSG, "chat", max_new_tokens=4, do_sample=False))


def test_a_reader_who_leaves_stops_the_generation(tiny_chat, monkeypatch):
    from finetune_core.generate import on_inference_thread, stream_generate

    model, tok = tiny_chat
    calls = _spy_generate(model, monkeypatch, eos_token_id=None)   # no early end: only the reader can stop it
    stream = stream_generate(model, tok, MSG, "chat", max_new_tokens=2000, do_sample=False)
    next(stream)
    stream.close()
    on_inference_thread(lambda: None)   # queued after the generation: returns once it has ended
    assert len(calls) == 1 and calls[0]["new"] < 2000


def test_stream_refuses_to_run_on_the_inference_thread(tiny_chat):
    from finetune_core.generate import on_inference_thread, stream_generate

    model, tok = tiny_chat
    with pytest.raises(RuntimeError, match="inference thread"):
        on_inference_thread(lambda: list(stream_generate(model, tok, MSG, "chat", max_new_tokens=2)))


def test_full_length_stream_matches_bare_generate(tiny_chat):
    """Same greedy answer streamed and bare (the benchmark compares their speed, this their text)."""
    from finetune_core.data import render_prompt
    from finetune_core.generate import _generation_kwargs, on_inference_thread, stream_generate

    model, tok = tiny_chat
    enc = tok(render_prompt(MSG, "chat", tok), return_tensors="pt", add_special_tokens=False)
    enc.pop("token_type_ids", None)

    def bare():
        with torch.no_grad():
            out = model.generate(**enc, **_generation_kwargs(tok, 0, 1, 8, False))
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    streamed = list(stream_generate(model, tok, MSG, "chat", max_new_tokens=8, do_sample=False, seed=None))
    assert (streamed[-1] if streamed else "").strip() == on_inference_thread(bare).strip()


def test_a_folder_saved_again_is_loaded_again(tmp_path, tiny_llama_dir):
    """The inference cache serves the same model until its folder's weights change (a resumed run
    that saved model/ again must not chat with the old weights)."""
    import os
    import shutil

    from finetune_core.generate import load_for_inference

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    first = load_for_inference(str(folder))[0]
    assert load_for_inference(str(folder))[0] is first
    weights = next(folder.glob("*.safetensors"))
    later = weights.stat().st_mtime + 10
    os.utime(weights, (later, later))
    assert load_for_inference(str(folder))[0] is not first


def test_a_seed_reproduces_a_sampled_answer_and_another_seed_changes_it(tiny_chat):
    """Sampling starts from the seed given: the same seed gives the same text, another seed another text
    (a random tiny model's next-token distribution is wide: 8 sampled tokens never repeat by chance)."""
    from finetune_core.generate import stream_generate

    model, tok = tiny_chat

    def answer(seed):
        return list(stream_generate(model, tok, MSG, "chat", temperature=1.5, top_p=1.0, max_new_tokens=8,
                                    do_sample=True, seed=seed))[-1]

    first = answer(1234)
    assert first and answer(1234) == first
    assert answer(1235) != first
