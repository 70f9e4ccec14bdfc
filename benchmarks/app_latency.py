"""Target 4: the app's latencies.

- HTTP readiness: `python app.py` on a free port (fresh FINETUNE_HOME) until GET / answers 200;
  target < 6 s (models load lazily). Twice; the best and every value are reported.
- First training event: `python -m finetune_core train CONFIG` in a subprocess, time from the
  "Trainable:" info event (the model is loaded) to the first `start`/`log` event in events.jsonl,
  which is what the UI tails; target < 3 s. For a classification run (bundled MiniLM, LoRA) and an
  instruction run (bundled SmolLM2, full), both a few steps.
- Streaming chat: `finetune_core.generate.stream_generate` vs a bare `model.generate` on the same
  prompt and settings (greedy, same max_new_tokens), interleaved 3 times each in this process;
  target: streamed tokens/s >= 90% of bare.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from . import common as C

NAME = "app_latency"
TITLE = "App: HTTP readiness, first training event, streamed chat"
CHAT_PROMPT = "Give three short tips for staying productive when working from home."


# ---------------------------------------------------------------------------------------------
# HTTP readiness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ready_seconds(timeout: float = 60.0) -> float | None:
    """Seconds from spawning `python app.py` to the first HTTP 200 on /, or None on timeout."""
    port = free_port()
    home = C.scratch_dir("app_home")
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "FINETUNE_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    proc = subprocess.Popen([C.python(), "app.py"], cwd=C.REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with code {proc.returncode} before answering HTTP")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.05)
        return None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# first training event


def first_event_latency(cfg: dict, work: Path, timeout: float = 900) -> dict:
    """Run the CLI on `cfg`; from events.jsonl: model loaded ("Trainable:") -> first start/log event."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "output_dir": str(work / "run")}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    t0 = time.time()
    proc = subprocess.run([C.python(), "-m", "finetune_core", "train", str(path)], cwd=C.REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"finetune_core train failed: {proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (work / "run" / "events.jsonl").read_text().splitlines() if line]
    loaded = next(e["time"] for e in events if e["type"] == "info" and str(e.get("message", "")).startswith("Trainable:"))
    first = next(e["time"] for e in events if e["type"] in ("start", "log"))
    between = [[e.get("message"), round(e["time"] - loaded, 2)] for e in events
               if loaded <= e["time"] <= first and e["type"] == "info"]
    return {"seconds_model_loaded_to_first_event": round(first - loaded, 2),
            "seconds_process_start_to_model_loaded": round(loaded - t0, 2),
            "info_events_in_between": between}


def event_configs(quick: bool) -> dict:
    from .cached_features import banking_subset
    from .instruction import split_rows

    work = C.scratch_dir("events_data")
    import pandas as pd

    cls_file = str(work / "banking.csv")
    pd.DataFrame(banking_subset(5, 12 if quick else 20)).to_csv(cls_file, index=False)
    train_rows, val_rows = split_rows(C.self_instruct_rows(), 8 if quick else 16, 8)
    fast = {"max_steps": 2, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1}
    return {
        "classification_minilm_lora": {
            "task": "classification", "model": C.MINILM,
            "data": {"train": cls_file, "text_column": "text", "label_column": "category"},
            "strategy": {"name": "lora"}, "training": fast},
        "instruction_smollm2_full": {
            "task": "instruction", "model": C.SMOLLM2,
            "data": {"train": C.write_jsonl(work / "train.jsonl", train_rows),
                     "validation": C.write_jsonl(work / "val.jsonl", val_rows), "template": "alpaca",
                     "max_length": 128 if quick else 256},
            "strategy": {"name": "full"}, "training": fast},
    }


# ---------------------------------------------------------------------------------------------
# streaming chat vs bare generate


def chat_inputs(tokenizer, template: str, prompt: str = CHAT_PROMPT):
    from finetune_core.data import render_prompt

    text = render_prompt([{"role": "user", "content": prompt}], template, tokenizer)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=(template != "chat"))
    enc.pop("token_type_ids", None)
    return enc


def bare_generate(model, tokenizer, template: str, max_new_tokens: int) -> tuple[float, int, str]:
    import torch

    from finetune_core.generate import _generation_kwargs

    enc = chat_inputs(tokenizer, template)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **_generation_kwargs(tokenizer, 0, 1, max_new_tokens, False))
    seconds = time.perf_counter() - t
    new = out[0, enc["input_ids"].shape[1]:]
    return seconds, int(new.numel()), tokenizer.decode(new, skip_special_tokens=True)


def streamed_generate(model, tokenizer, template: str, max_new_tokens: int) -> tuple[float, float, str]:
    from finetune_core.generate import stream_generate

    t = time.perf_counter()
    first = None
    text = ""
    for text in stream_generate(model, tokenizer, [{"role": "user", "content": CHAT_PROMPT}], template,
                                max_new_tokens=max_new_tokens, do_sample=False, seed=None):
        if first is None and text:
            first = time.perf_counter() - t
    return time.perf_counter() - t, first or 0.0, text


def compare_streaming(model_ref: str, max_new_tokens: int, rounds: int = 3) -> dict:
    from finetune_core.generate import load_for_inference

    model, tokenizer, info = load_for_inference(model_ref)
    template = info["template"]
    bare_generate(model, tokenizer, template, 4)          # warm-up, not timed
    bare_s, stream_s, ttft = [], [], []
    tokens, bare_text, stream_text = 0, "", ""
    for _ in range(rounds):
        s, tokens, bare_text = bare_generate(model, tokenizer, template, max_new_tokens)
        bare_s.append(s)
        s, first, stream_text = streamed_generate(model, tokenizer, template, max_new_tokens)
        stream_s.append(s)
        ttft.append(first)
    best_bare, best_stream = min(bare_s), min(stream_s)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"template": template, "new_tokens": tokens, "bare_seconds": bare_s, "stream_seconds": stream_s,
            "bare_tokens_per_s": round(tokens / best_bare, 2), "stream_tokens_per_s": round(tokens / best_stream, 2),
            "ratio_best": round(best_bare / best_stream, 3), "ratio_median": round(med(bare_s) / med(stream_s), 3),
            "stream_first_token_seconds": round(min(ttft), 3), "same_text": bare_text.strip() == stream_text.strip()}


# ---------------------------------------------------------------------------------------------


def run(quick: bool = False, out_dir: Path | None = None) -> dict:
    C.quiet_env()
    result: dict = {"title": TITLE}
    met: dict = {}
    summary: list = []
    if not (C.REPO / "app.py").exists():
        result["http"] = "skipped: app.py missing"
    else:
        print(f"[{NAME}] python app.py until HTTP 200 ...", flush=True)
        times = [http_ready_seconds() for _ in range(1 if quick else 2)]
        ok = [t for t in times if t is not None]
        best = min(ok) if ok else None
        result["http"] = {"seconds": times, "best_seconds": best}
        met["http"] = best is not None and best < 6
        summary.append({"what": "`python app.py` answers HTTP", "value": f"{best:.1f}s" if best else "timeout",
                        "target": "< 6 s", "met": met["http"]})

    result["first_event"] = {}
    for name, cfg in event_configs(quick).items():
        print(f"[{NAME}] first training event: {name} ...", flush=True)
        r = first_event_latency(cfg, C.scratch_dir(f"events_{name}"))
        result["first_event"][name] = r
        met[f"first_event_{name}"] = r["seconds_model_loaded_to_first_event"] < 3
        summary.append({"what": f"model loaded -> first training event ({name})",
                        "value": f"{r['seconds_model_loaded_to_first_event']:.1f}s", "target": "< 3 s",
                        "met": met[f"first_event_{name}"]})

    print(f"[{NAME}] streamed chat vs bare generate ...", flush=True)
    from finetune_core.train import set_cpu_threads

    set_cpu_threads()
    g = compare_streaming(C.SMOLLM2, 16 if quick else 64, rounds=2 if quick else 3)
    result["streaming"] = g
    met["streaming"] = g["ratio_median"] >= 0.9
    summary.append({"what": "streamed chat tokens/s vs bare generate",
                    "value": f"{g['stream_tokens_per_s']:.1f} vs {g['bare_tokens_per_s']:.1f} tok/s best; "
                             f"median ratio {g['ratio_median']:.0%}", "target": ">= 90%", "met": met["streaming"]})
    result["met"], result["summary"] = met, summary
    C.write_result(NAME, result, quick, out_dir)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
