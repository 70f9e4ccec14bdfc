"""Each speed idea of the issue measured on its own: forward+backward of the same rows, one change at a time.

The rows: 16 of the 48 Self-Instruct training rows, the middle of the length distribution (two of the
batches of 8 ours forms; 85-125 tokens), alpaca template, SmolLM2, full fine-tuning. Every variant
processes those rows once (forward + backward, no optimizer step), except "ungrouped", which takes 16
random rows of the 48 (grouping only matters when lengths differ). Rounds are interleaved (variant A,
B, C, ... then again) and each variant's best round is kept, so a burst of load from other processes
does not pick a winner. Reported: time per real token relative to "ours" (what `train()` does by
default on CPU).

Variants:
- article: every row padded to 256, batch 1, logits at every position (the article's recipe);
- batch 1 dynamic: batch 1, no padding, logits at every position;
- ungrouped batches: batch 4 in random order (what transformers' group_by_length gives below ~200
  rows), response-only head;
- full logits: batch 4 grouped by length, logits at every position;
- ours: batch 4 grouped by length, response-only head, SDPA, no checkpointing, one thread per core;
- eager attention / gradient checkpointing / 1 thread / batch 8 / batch 16: ours with that one change;
- torch.compile (full mode only, `--compile`): ours through torch.compile, compile time reported apart.

The optimizer step (fused AdamW over all 134.5M parameters) is timed separately: the article's recipe
and ours both take one per 4 rows.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from . import common as C

NAME = "ideas"
TITLE = "Speed ideas one at a time (forward+backward, time per real token relative to ours)"


def sample_rows(model_path: str, n_train: int, max_length: int):
    """(tokenizer, rows sorted by length) for the first n_train rows; a row is (input_ids, labels)."""
    from .instruction import split_rows, tokenize_rows

    rows, _ = split_rows(C.self_instruct_rows(), n_train, 1)
    tok, ex = tokenize_rows(model_path, rows, max_length)
    order = sorted(range(len(ex.input_ids)), key=lambda i: len(ex.input_ids[i]))
    return tok, [(ex.input_ids[i], ex.labels[i]) for i in order]


def middle_rows(sorted_rows: list, n: int) -> list:
    """n consecutive rows from the middle of the length distribution: two of ours' batches of 8."""
    start = max(0, (len(sorted_rows) - n) // 2)
    return sorted_rows[start:start + n]


def make_batches(tok, rows, batch: int, grouped: bool, pad_to: int | None = None, seed: int = 0):
    import torch

    from finetune_core import data as D

    idx = list(range(len(rows)))
    if grouped:
        idx.sort(key=lambda i: len(rows[i][0]))
    else:
        random.Random(seed).shuffle(idx)
    if pad_to:      # the article: pad with eos to max_length, labels NOT masked on padding
        out = []
        for i in idx:
            ids, labels = rows[i]
            n = len(ids)
            input_ids = torch.tensor([list(ids) + [tok.pad_token_id] * (pad_to - n)])
            lab = torch.tensor([list(labels) + [tok.pad_token_id] * (pad_to - n)])
            mask = torch.tensor([[1] * n + [0] * (pad_to - n)])
            out.append({"input_ids": input_ids, "attention_mask": mask, "labels": lab})
        return out
    collate = D.CausalCollator(tok.pad_token_id)
    return [collate([{"input_ids": rows[i][0], "labels": rows[i][1]} for i in idx[s:s + batch]])
            for s in range(0, len(idx), batch)]


def response_only_loss(model, b):
    import torch

    hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    labels = b["labels"][:, 1:]
    keep = labels != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, labels[keep])


def fwd_bwd(model, batches, response_only: bool, forward=None) -> float:
    t = time.perf_counter()
    for b in batches:
        if forward is not None:
            loss = forward(b)
        elif response_only:
            loss = response_only_loss(model, b)
        else:
            loss = model(**b).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def optimizer_step_seconds(model, repeats: int = 2) -> float:
    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    del opt
    return best


def run(quick: bool = False, out_dir: Path | None = None, model: str = C.SMOLLM2, compile: bool = False) -> dict:
    C.quiet_env()
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_core.models import resolve_model
    from finetune_core.runtime import set_cpu_threads

    threads = set_cpu_threads()
    path = resolve_model(model)
    n_train, n_pick, max_length, rounds = (12, 4, 128, 1) if quick else (48, 16, 256, 2)
    tok, all_rows = sample_rows(path, n_train, max_length)
    rows = middle_rows(all_rows, n_pick)
    random_rows = random.Random(0).sample(all_rows, n_pick)     # ungrouped: any rows share a batch
    real = sum(len(r[0]) for r in rows)

    def load(attn: str = "sdpa"):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
        m.config.use_cache = False
        m.train()
        return m

    sdpa, eager = load("sdpa"), load("eager")
    grouped4 = make_batches(tok, rows, 4, grouped=True)
    variants = {
        "article": (sdpa, make_batches(tok, rows, 1, True, pad_to=max_length), False, threads),
        "batch1_dynamic": (sdpa, make_batches(tok, rows, 1, True), False, threads),
        "ungrouped_batches": (sdpa, make_batches(tok, random_rows, 4, grouped=False), True, threads),
        "full_logits": (sdpa, grouped4, False, threads),
        "ours": (sdpa, grouped4, True, threads),
        "eager_attention": (eager, grouped4, True, threads),
        "gradient_checkpointing": (sdpa, grouped4, True, threads),
        "one_thread": (sdpa, grouped4, True, 1),
        "batch8": (sdpa, make_batches(tok, rows, 8, grouped=True), True, threads),
        "batch16": (sdpa, make_batches(tok, rows, 16, grouped=True), True, threads),
    }
    real_tokens = {k: sum(int(b["attention_mask"].sum()) for b in v[1]) for k, v in variants.items()}
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for name, (m, batches, resp, th) in variants.items():
            torch.set_num_threads(th)
            if name == "gradient_checkpointing":
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            try:
                best[name] = min(best[name], fwd_bwd(m, batches, resp))
            finally:
                torch.set_num_threads(threads)
                if name == "gradient_checkpointing":
                    m.gradient_checkpointing_disable()
    positions = {k: sum(int(b["input_ids"].numel()) for b in v[1]) for k, v in variants.items()}
    result: dict = {"title": TITLE,
                    "setup": {"model": model, "rows": len(rows), "real_tokens": real, "rounds": rounds,
                              "torch_threads": threads, "positions": positions},
                    "real_tokens": real_tokens, "seconds": {k: round(v, 3) for k, v in best.items()}}
    if compile and not quick:
        result["compile"] = compile_variant(sdpa, grouped4, rounds)
    if not quick:
        result["malloc"] = malloc_comparison()
    del eager
    opt_s = optimizer_step_seconds(sdpa)
    # Time per real token relative to ours (the ungrouped variant trains other rows than the rest).
    per_token = {k: v / real_tokens[k] for k, v in best.items()}
    ours = per_token["ours"]
    rel = {k: round(v / ours, 3) for k, v in per_token.items()}
    result.update(relative_to_ours=rel, optimizer_step_seconds=round(opt_s, 3),
                  load_average_end=C.load_average())
    if "compile" in result and result["compile"].get("seconds"):
        rel["torch_compile"] = round(result["compile"]["seconds"] / best["ours"], 3)
    notes = {
        "article": f"pad to 256 (padding {1 - real / positions['article']:.0%}), batch 1, full logits",
        "batch1_dynamic": "no padding, batch 1, full logits",
        "ungrouped_batches": "batch 4, any rows together, as transformers groups below ~200 rows (padding "
                             f"{1 - real_tokens['ungrouped_batches'] / positions['ungrouped_batches']:.0%})",
        "full_logits": "batch 4 grouped, logits at every position",
        "ours": f"batch 4 grouped (padding {1 - real / positions['ours']:.0%}), response-only head, SDPA, "
                f"{threads} threads",
        "eager_attention": "ours with eager attention",
        "gradient_checkpointing": "ours with gradient checkpointing",
        "one_thread": "ours on 1 thread",
        "batch8": f"ours with batch 8 (padding {1 - real / positions['batch8']:.0%})",
        "batch16": f"ours with batch 16 (padding {1 - real / positions['batch16']:.0%})",
        "torch_compile": "ours through torch.compile (compile time excluded)",
    }
    result["summary"] = [{"what": f"{k}: {notes.get(k, k)}", "value": f"{v:.2f}x ours' time per token", "target": "",
                          "met": None} for k, v in rel.items()]
    if "malloc" in result:
        mc = result["malloc"]
        result["summary"].append({"what": "malloc setting of set_cpu_threads (training step, separate processes)",
                                  "value": f"{mc['speedup']:.2f}x faster; page faults per step "
                                           f"{mc['page_faults_per_step'][0]:,} -> {mc['page_faults_per_step'][1]:,}",
                                  "target": "", "met": None})
    result["summary"].append({"what": "fused AdamW step, all parameters", "value": f"{opt_s:.2f}s per step "
                              "(one per 4 rows, article and ours)", "target": "", "met": None})
    C.write_result(NAME, result, quick, out_dir)
    return result


def malloc_child(tuned: bool, steps: int = 3) -> dict:
    """One process: ours' training step (fwd+bwd+fused AdamW) with or without set_cpu_threads' malloc setting."""
    C.quiet_env()
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from finetune_core.models import resolve_model
    from finetune_core.runtime import set_cpu_threads

    if tuned:
        set_cpu_threads()
    else:
        import psutil

        torch.set_num_threads(psutil.cpu_count(logical=False) or 1)
    path = resolve_model(C.SMOLLM2)
    tok, rows = sample_rows(path, 48, 256)
    batch = make_batches(tok, middle_rows(rows, 8), 8, grouped=True)[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-12, fused=True)

    def step():
        response_only_loss(model, batch).backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    step()
    walls, faults, system = [], 0, 0.0
    for _ in range(steps):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults += r1.ru_minflt - r0.ru_minflt
        system += r1.ru_stime - r0.ru_stime
    return {"tuned": tuned, "best_step_seconds": round(min(walls), 3), "step_seconds": [round(w, 3) for w in walls],
            "page_faults_per_step": faults // steps, "system_seconds_per_step": round(system / steps, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def malloc_comparison(pairs: int = 2) -> dict:
    """Alternating processes (plain, tuned, plain, tuned): the effect of the malloc setting on a step."""
    runs = [C.run_json_subprocess("benchmarks.ideas", ["--malloc-child", str(int(tuned))])
            for _ in range(pairs) for tuned in (False, True)]
    plain = [r for r in runs if not r["tuned"]]
    tuned = [r for r in runs if r["tuned"]]
    best = lambda rs: min(r["best_step_seconds"] for r in rs)  # noqa: E731
    return {"runs": runs, "speedup": round(best(plain) / best(tuned), 3),
            "page_faults_per_step": [plain[0]["page_faults_per_step"], tuned[0]["page_faults_per_step"]],
            "system_seconds_per_step": [plain[0]["system_seconds_per_step"], tuned[0]["system_seconds_per_step"]]}


def compile_variant(model, batches, rounds: int) -> dict:
    """torch.compile the response-only forward; compile time (first pass) apart from the steady state."""
    import torch

    try:
        body = torch.compile(model.model, dynamic=True)

        def forward(b):
            hidden = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            labels = b["labels"][:, 1:]
            keep = labels != -100
            return torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), labels[keep])

        t = time.perf_counter()
        first = fwd_bwd(model, batches, True, forward)
        best = min(fwd_bwd(model, batches, True, forward) for _ in range(rounds))
        return {"first_pass_seconds": round(first, 2), "seconds": round(best, 3),
                "compile_overhead_seconds": round(first - best, 2), "wall": round(time.perf_counter() - t, 2)}
    except Exception as exc:  # noqa: BLE001 - report, do not fail the suite
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


if __name__ == "__main__":
    import sys

    if "--malloc-child" in sys.argv:
        print(json.dumps(malloc_child(sys.argv[sys.argv.index("--malloc-child") + 1] == "1")), flush=True)
    else:
        print(json.dumps(run(quick="--quick" in sys.argv, compile="--compile" in sys.argv), indent=2, default=str))
