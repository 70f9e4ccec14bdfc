"""Inference: streaming chat generation, batched held-out generations, class probabilities.

    model, tok, info = load_for_inference("runs/my-run/model")   # on the GPU when there is one
    for text in stream_generate(model, tok, [{"role": "user", "content": "Hi"}], info["template"]):
        print(text)              # the answer so far, growing token by token
    predict_proba(model, tok, "The jury found the defendant not guilty.")   # {'legal': 0.97, ...}
"""

from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Future
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import rundir
from .data import render_prompt
from .errors import ModelError
from .models import adapter_base, load_tokenizer, model_kind, resolve_model


# ---------------------------------------------------------------------------------------------
# one inference thread per process
#
# Why: torch's CPU build uses GNU OpenMP, which gives every OS thread that runs torch ops a thread team
# of its own. Once the teams' threads outnumber the cores, libgomp stops spinning between parallel regions
# and each of generation's many small ops pays a futex wake-up: SmolLM2 measured 31 -> 19 tokens/s on
# 2 cores as soon as a second thread had run torch. Gradio runs handlers on a pool of threads and the
# streamer needs generate() on a thread other than its reader, so the app sends all of its torch work to
# this one thread: one team, full speed. The CLI and the training worker run on their main thread and
# call the functions below directly.

_INFERENCE_NAME = "finetune-inference"
_inference_lock = threading.Lock()
_inference_jobs = None


def on_inference_thread(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) on the process's single inference thread and return its result.

    Calls are served one at a time, in order; a call made from that thread itself runs directly."""
    return submit_inference(fn, *args, **kwargs).result()


def submit_inference(fn, *args, **kwargs):
    """Like on_inference_thread, but returns a concurrent.futures.Future at once."""
    global _inference_jobs
    done: Future = Future()
    if threading.current_thread().name == _INFERENCE_NAME:
        _run_into(done, fn, args, kwargs)
        return done
    with _inference_lock:
        if _inference_jobs is None:
            # A daemon thread (not a ThreadPoolExecutor, whose threads the interpreter joins at exit): Ctrl-C
            # or an app shutdown must not wait for a generation in flight.
            _inference_jobs = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(_inference_jobs,), name=_INFERENCE_NAME, daemon=True).start()
        _inference_jobs.put((done, fn, args, kwargs))
    return done


def _run_into(done, fn, args, kwargs) -> None:
    if not done.set_running_or_notify_cancel():
        return
    try:
        done.set_result(fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
        done.set_exception(exc)


def _serve(jobs) -> None:
    while True:
        _run_into(*jobs.get())


def inference_placement(keep_float32: bool = False):
    """(device, dtype) for every inference load: a CUDA GPU in bf16 where it has it natively, else
    fp16 (config.half_precision_key, the rule training follows); a CPU in float32, never half
    precision (bf16 matmuls are far slower there). keep_float32: float32 on any device."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", torch.float32
    if keep_float32:
        return "cuda", torch.float32
    from .config import half_precision_key

    return "cuda", torch.bfloat16 if half_precision_key() == "bf16" else torch.float16


def load_for_inference(model_ref: str, keep_float32: bool = False):
    """(model, tokenizer, info) for a run's model/ folder, a bundled id or a hub id, in eval mode on
    inference_placement()'s device and dtype. keep_float32: float32 weights on the GPU too (a merge
    that is saved). Cached (3 models); a folder whose weights changed since (a resumed run saved
    again, a new merge) is loaded anew."""
    return _load_for_inference(model_ref, _weights_stamp(model_ref), inference_placement(keep_float32))


def _weights_stamp(model_ref: str) -> tuple:
    path = Path(model_ref)
    if not path.is_dir():
        return ()
    files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".json", ".bin")]
    return tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))


def _on(model, device: str):
    """The model on `device`. On the CPU it is already there: no copy."""
    return model if device == "cpu" else model.to(device)


@lru_cache(maxsize=3)
def _load_for_inference(model_ref: str, stamp: tuple, placement: tuple):

    device, dtype = placement
    path = Path(model_ref)
    run = rundir.read_config(path.parent) if path.is_dir() else {}   # a run's model/: its run.yaml
    if path.is_dir() and (path / "adapter_config.json").exists():
        model, task = load_lora(path, run, placement)
        tokenizer = load_tokenizer(str(path))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        from . import heads  # noqa: F401 - registers the mean-pooling head

        resolved = resolve_model(model_ref) if not path.is_dir() else str(path)
        config = AutoConfig.from_pretrained(resolved)
        archs = " ".join(config.architectures or [])
        task = run.get("task") or ("classification" if "SequenceClassification" in archs or
                                   config.model_type == "finetune_lab_mean_pooling" else "instruction")
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=dtype)
        else:
            if model_kind(resolved) != "causal":
                raise ModelError(f"'{model_ref}' is an encoder: it cannot chat.",
                                 "Pick an instruction run or a causal LM such as bundled:smollm2-135m.")
            model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
        model = _on(model, device)
        tokenizer = load_tokenizer(resolved)
    model.eval()
    if device == "cpu":
        from . import cpu_linear

        cpu_linear.apply(model)       # chat, predictions: oneDNN's linear decodes ~25% faster on a CPU
    template = (run.get("data") or {}).get("template", "auto")
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    return model, tokenizer, {"task": task, "template": template, "run": run}


def load_lora(path: Path, run: dict | None = None, placement: tuple | None = None):
    """A saved LoRA run as a plain model (adapter merged): (model, task), on placement's (device,
    dtype), inference_placement() by default.

    For classification the base is loaded with the run's saved config (label names, number of
    labels), then the adapter and the trained head are applied. The merge runs in float32 (the
    adapter's small deltas survive it whole), then the model takes the inference dtype.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    device, dtype = placement or inference_placement()
    adapter = json.loads((path / "adapter_config.json").read_text())
    base_path = adapter_base(path)       # the model it trained on, though the adapter names a public Hub id
    if adapter.get("task_type") == "SEQ_CLS":
        config = AutoConfig.from_pretrained(path)
        base = AutoModelForSequenceClassification.from_pretrained(base_path, config=config, dtype=torch.float32)
        task = "classification"
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        task = "instruction"
    model = PeftModel.from_pretrained(_on(base, device), str(path)).merge_and_unload()
    return model.to(dtype), task   # plain weights: faster inference, same outputs; float32 -> float32 copies nothing


def _generation_kwargs(tokenizer, temperature: float, top_p: float, max_new_tokens: int, do_sample: bool) -> dict:
    kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        kwargs.update(temperature=max(float(temperature), 1e-3), top_p=float(top_p))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def stream_generate(model, tokenizer, messages: list[dict], template: str = "chat", temperature: float = 0.7,
                    top_p: float = 0.9, max_new_tokens: int = 128, do_sample: bool = True, seed: int | None = None):
    """Yield the growing answer text as tokens arrive (TextIteratorStreamer; generate() runs on the
    inference thread, see on_inference_thread). seed: sampling starts from torch.manual_seed(seed), so
    the same seed, messages and settings give the same answer; None draws on from torch's current state."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    prompt = render_prompt(messages, template, tokenizer)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=(template != "chat"))
    inputs.pop("token_type_ids", None)   # some tokenizers (Falcon, BERT-style) add it; generate() refuses it
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(inputs, streamer=streamer, **_generation_kwargs(tokenizer, temperature, top_p, max_new_tokens,
                                                                   do_sample))
    if threading.current_thread().name == _INFERENCE_NAME:
        raise RuntimeError("stream_generate() reads the stream: call it from any thread but the inference thread")

    # A reader that goes away (the browser closed, gradio cancelled the event) stops the generation at the
    # next token, so the inference thread is free for the next request.
    cancelled = threading.Event()

    class _ReaderGone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

    kwargs["stopping_criteria"] = StoppingCriteriaList([_ReaderGone()])

    def run():
        try:
            if seed is not None:   # here, not in the caller: a job queued before this one draws from the RNG too
                torch.manual_seed(seed)
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException:
            streamer.end()   # a failed generate() must not leave the reader waiting
            raise

    job = submit_inference(run)
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        cancelled.set()
    job.result()   # re-raises generate()'s error in the caller's thread


GENERATION_BATCH = 20        # held-out prompts answered together (the run's 20 prompts in one batch)


def prompt_rows(tokenizer, prompts: list[str], template: str) -> list[list[int]]:
    """Each prompt's token ids as generation tokenizes it (and as data.encode_pair starts a loss row): a
    chat template has written its special tokens into the prompt already."""
    if not prompts:
        return []
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=(template != "chat"))["input_ids"]]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's eos (SmolLM2's chat template ends a turn with it) and
    every eos of the model's generation config (Llama 3's <|eot_id|> next to <|end_of_text|>, say)."""
    ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [tokenizer.eos_token_id] + (configured if isinstance(configured, list) else [configured]):
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def prefilled_cache(model, rows: list[list[int]], room: int = 0, known=None):
    """A left-padded KV cache of each row but its last token, every row computed on its own, with room
    for `room` more positions. known: a prompt_kv.PromptKV whose held rows are taken as they are, not
    computed again (a validation-loss pass computed them).

    A padded batch pays for its padding in the prefill: the 20 Self-Instruct held-out prompts (49-347
    tokens, 2,380 in all) padded to 347 are 6,940 positions, 10 of the 18 s SmolLM2 took to answer
    them on 2 cores. Row by row the prefill computes the 2,380 real ones; decoding stays batched.
    The padded positions hold zeros that the attention mask hides; a row's positions count from its
    first real token, as generate() counts them from the mask.

    With `room`, the cache is a StaticCache of that size where the model's layers allow one (all full
    attention): decoding writes each new position in place, where a DynamicCache copies the whole cache
    at every token (SmolLM2, 20 prompts, 64 tokens: 47% of the decode time went to that copy; decoding
    took 8.7-9.1 s dynamic, 7.4 s static)."""
    import torch
    from transformers import DynamicCache

    width = max(len(r) for r in rows) - 1
    shape = (model.config.num_key_value_heads,
             getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads)
    # Only the cache is wanted: the vocabulary projection of every prompt position (a fifth of SmolLM2's
    # compute per token; ~1 of 5 s for those 20 prompts) is skipped where the model can skip it.
    keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    dtype = next(model.parameters()).dtype
    nothing = torch.zeros((1, shape[0], 0, shape[1]), dtype=dtype, device=model.device)
    per_row = []                   # per row, per layer: (keys, values) of its real positions; None: one token
    with torch.no_grad():
        for ids in rows:
            held = known.get(ids) if known is not None and len(ids) > 1 else None
            if held is not None:
                per_row.append(list(held))     # a list of its own: the static path below empties it
                continue
            cache = DynamicCache(config=model.config)
            if len(ids) > 1:
                model(input_ids=torch.tensor([ids[:-1]], device=model.device), cache=cache, use_cache=True,
                      **keep_last)
            per_row.append([(layer.keys, layer.values) if layer.keys is not None and layer.keys.numel() else
                            (nothing, nothing) for layer in cache.layers] if len(ids) > 1 else None)
    n_layers = next((len(r) for r in per_row if r is not None), 0)

    def padded(layer: int, which: int):
        parts = [r[layer][which] if r is not None else nothing for r in per_row]
        return torch.cat([torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0)) for t in parts])

    # A forward under autocast (a Trainer's mixed precision wraps it) leaves values in half precision and
    # keys in float32 (the rotary embedding promotes them): generate() would then write other dtypes into
    # a static cache. The DynamicCache takes them as they come.
    dtypes = {t.dtype for r in per_row if r is not None for kv in r for t in kv}
    uniform = dtypes == {dtype}
    static = _static_cache(model, width + room) if room and width and n_layers and uniform else None
    if static is not None:
        for i in range(n_layers):
            static.layers[i].update(padded(i, 0), padded(i, 1))
            for r in per_row:          # each row's own copy can go once it is in the batch cache
                if r is not None:
                    r[i] = None
        return static
    if not n_layers:               # every prompt is one token: nothing to cache
        return None
    return DynamicCache([(padded(i, 0), padded(i, 1)) for i in range(n_layers)], config=model.config)


def _static_cache(model, length: int):
    """An empty StaticCache of `length` positions, or None where a layer is not plain full attention
    (sliding-window layers keep only their window: a prefix written into them whole would not fit)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    try:
        cache = StaticCache(config=model.config, max_cache_len=length)
    except (TypeError, ValueError, AttributeError):
        return None
    return cache if cache.layers and all(type(layer) is StaticLayer for layer in cache.layers) else None


DECODE_SEGMENT = 8            # tokens decoded between two looks at which answers have ended


def decode_in_segments(model, enc: dict, kwargs: dict, cache) -> list[list[int]]:
    """Greedy generate() on a prefilled batch, DECODE_SEGMENT tokens at a time: between segments, the rows
    whose answer has ended (a stop token) leave the batch and the cache. Each row's new tokens, up to
    and including its stop token; the same tokens one generate() call gives, as the continuation sees
    the same ids, mask, positions and cache.

    generate() keeps computing a finished row until the whole batch has ended: SmolLM2's answers to 20
    held-out prompts are 36 tokens on average for a 64-token budget. Measured there (2 cores, interleaved,
    3 rounds each, same answers): one call 11.6-12.1 s, segments of 8 tokens 9.8-11.4 s, of 16 11.6-12.7
    s, of 4 11.4-12.7 s. The gain is small because a batch of a few rows reads all the weights per token
    as a full one does (memory-bound), and each segment is a generate() call."""
    import torch

    stops = set(kwargs["eos_token_id"] if isinstance(kwargs["eos_token_id"], list) else [kwargs["eos_token_id"]])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = list(range(ids.shape[0]))          # batch position -> row of `enc`
    answers: list[list[int]] = [[] for _ in rows]
    left = kwargs["max_new_tokens"]
    while left > 0:
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                             **{**kwargs, "max_new_tokens": min(DECODE_SEGMENT, left)})
        new = out[:, ids.shape[1]:]
        left -= new.shape[1]
        keep = []
        for j, tokens in enumerate(new.tolist()):
            end = next((k for k, t in enumerate(tokens) if t in stops), None)
            answers[rows[j]] += tokens if end is None else tokens[:end + 1]
            if end is None:
                keep.append(j)
        if not keep or left <= 0:
            break
        mask = torch.cat([mask, mask.new_ones(new.shape)], dim=1)
        ids = out
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=ids.device)
            ids, mask, rows = ids[index], mask[index], [rows[j] for j in keep]
            cache = _cache_rows(model, cache, index)
    return answers


def _cache_rows(model, cache, index):
    """The cache with only the batch rows at `index` (a StaticCache copied into a smaller one)."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache):
        cache.batch_select_indices(index)
        return cache
    length = int(cache.get_seq_length())
    smaller = _static_cache(model, cache.get_max_length())
    for old, new in zip(cache.layers, smaller.layers):
        new.update(old.keys[index, :, :length], old.values[index, :, :length])
    return smaller


def generate_batch(model, tokenizer, prompts: list[str], template: str, max_new_tokens: int = 64,
                   batch_size: int = GENERATION_BATCH, progress=None, known=None) -> list[str]:
    """Greedy answers for ready-made prompt strings, in the prompts' order.

    Prompts of similar length share a batch (left padding, KV cache; each prompt's prefill computed on
    its own, prefilled_cache), and an answer ends at the first stop token (stop_token_ids); a batch
    ends when all its answers have. progress(done, total) is called after each batch with the number
    of prompts answered so far. known: a prompt_kv.PromptKV of these prompts' prefills, computed by a
    loss pass of this same model (prefilled_cache)."""
    import torch

    special = template != "chat"      # a chat template already wrote its special tokens into the prompt
    lengths = [len(ids) for ids in prompt_rows(tokenizer, prompts, template)]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    answers: list[str] = [""] * len(prompts)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    use_cache = model.config.use_cache
    model.config.use_cache = True
    kwargs = _generation_kwargs(tokenizer, 0, 1, max_new_tokens, False)
    kwargs["eos_token_id"] = stop_token_ids(model, tokenizer) or kwargs["eos_token_id"]
    try:
        done = 0
        for chunk in batches:
            enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=special)
            enc.pop("token_type_ids", None)   # some tokenizers (Falcon, BERT-style) add it; generate() refuses it
            enc = {k: v.to(model.device) for k, v in enc.items()}
            rows = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
            cache = prefilled_cache(model, rows, room=max_new_tokens + 1, known=known) if len(chunk) > 1 else None
            with torch.no_grad():
                if cache is None:
                    out = model.generate(**enc, **kwargs)
                    new_tokens = [row.tolist() for row in out[:, enc["input_ids"].shape[1]:]]
                else:
                    new_tokens = decode_in_segments(model, enc, kwargs, cache)
            for i, row in zip(chunk, new_tokens):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            done += len(chunk)
            if progress is not None:
                progress(done, len(prompts))
    finally:
        tokenizer.padding_side = old_side
        model.config.use_cache = use_cache
        model.train(was_training)
    return answers


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def heldout_prompts(p, limit: int = 20) -> tuple[list[str], list[str]]:
    return p.val_ex.prompts[:limit], p.val_ex.references[:limit]


def write_generations(out: Path, prompts: list[str], references: list[str], after: list[str],
                      metrics: dict, before: list[str] | None = None) -> None:
    """generations.jsonl: prompt, reference, before/after answers and ROUGE-L; means go to metrics."""
    after_scores = rouge_l(after, references)
    before_scores = rouge_l(before, references) if before else [None] * len(prompts)
    lines = []
    for i, prompt in enumerate(prompts):
        row = {"index": i, "prompt": prompt, "reference": references[i], "after": after[i],
               "rougeL_after": after_scores[i]}
        if before:
            row.update(before=before[i], rougeL_before=before_scores[i])
        lines.append(json.dumps(row) + "\n")
    rundir.atomic_write_text(rundir.generations_path(out), "".join(lines))
    metrics["rougeL"] = float(np.mean(after_scores)) if after_scores else None
    if before:
        metrics["rougeL_before"] = float(np.mean(before_scores))
    metrics["generations"] = len(prompts)


def predict_proba(model, tokenizer, text: str, max_length: int = 256) -> dict[str, float]:
    import torch

    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    enc = {k: v.to(model.device) for k, v in enc.items()}      # on the CPU: the same tensors, no copy
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    probs = torch.softmax(logits, -1).tolist()
    names = model.config.id2label
    return {str(names.get(i, names.get(str(i), i))): float(pr) for i, pr in enumerate(probs)}
