"""Shared test setup: offline hub, a stable cache for the converted bundled model, tiny random models.

Environment (set at import time, before anything imports transformers):
- HF_HUB_OFFLINE=1: nothing is ever downloaded.
- FINETUNE_MODEL_CACHE: the float32 copy of the bundled SmolLM2 (~20 s to convert) is reused across
  test sessions under ~/.cache/finetune_lab/models unless the variable is already set.
- FINETUNE_HOME: a throwaway folder per session (runs written by the app's job manager go there).
- OMP_NUM_THREADS=1 unless set (see below).

Tiny models (session fixtures) are 2-layer, 32-wide random models built from a config, saved with a
real bundled tokenizer into a folder, so `train()` loads them by path like any model directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread: the tiny models' ops take microseconds, and on a shared 2-core machine a second
# OpenMP thread turns each into milliseconds of barrier waiting (measured ~500x slower). train() keeps
# this setting (it only picks a thread count when OMP_NUM_THREADS is unset); the slow tests on real
# models raise it with the `all_cores` fixture.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("FINETUNE_MODEL_CACHE", str(Path.home() / ".cache" / "finetune_lab" / "models"))
if not os.environ.get("FINETUNE_HOME"):
    _home = tempfile.mkdtemp(prefix="finetune_home_")
    os.environ["FINETUNE_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"


# ---------------------------------------------------------------------------------------------
# real bundled tokenizers


@pytest.fixture(scope="session")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from finetune_core.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("bundled:minilm-l6"))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer (BPE, chat template); the first session converts the GGUF once (~20 s)."""
    from finetune_core.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("bundled:smollm2-135m"))


# ---------------------------------------------------------------------------------------------
# tiny random models saved as model folders


def _save_tiny(path: Path, model, tokenizer) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, bert_tokenizer):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(bert_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=128)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), BertModel(cfg), bert_tokenizer)


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory, bert_tokenizer):
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(bert_tokenizer), dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                           max_position_embeddings=128)
    return _save_tiny(tmp_path_factory.mktemp("tiny-distilbert"), DistilBertModel(cfg), bert_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
                      pad_token_id=smol_tokenizer.pad_token_id, tie_word_embeddings=True)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM(cfg), smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smol_tokenizer):
    """GPT-2 architecture (Conv1D layers, no pad token in the config) with a real BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(smol_tokenizer), n_embd=32, n_inner=64, n_layer=2, n_head=2, n_positions=256,
                     bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    return _save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), GPT2LMHeadModel(cfg), smol_tokenizer)


# ---------------------------------------------------------------------------------------------
# tiny data


CLASS_WORDS = {
    "sport": "goal match team coach striker league referee season stadium penalty",
    "food": "recipe oven flour sauce garlic butter dinner chef spicy bake",
    "tech": "server code python cloud database laptop network kernel compiler api",
}


def class_rows(rows_per_label: int = 8, seed: int = 0, words=CLASS_WORDS) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for label, vocab in words.items():
        vocab = vocab.split()
        for _ in range(rows_per_label):
            rows.append({"text": " ".join(rng.choice(vocab) for _ in range(6)) + ".", "label": label})
    rng.shuffle(rows)
    return rows


def instruction_rows(n: int = 12) -> list[dict]:
    notes = ["refund approved", "order delayed", "password reset sent", "invoice corrected", "outage fixed",
             "feature noted", "warranty covers it", "plan upgraded", "account unlocked", "parcel lost"]
    return [{"instruction": "Rewrite this support note as a polite reply.", "input": notes[i % len(notes)] + f" #{i}",
             "output": f"Thank you for your patience. Your case {i} is handled: {notes[i % len(notes)]}."}
            for i in range(n)]


def write_csv(path: Path, rows: list[dict]) -> str:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def class_csv(tmp_path):
    return write_csv(tmp_path / "train.csv", class_rows())


@pytest.fixture
def instr_jsonl(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", instruction_rows())


# Fast TrainingArguments for unit runs on tiny models: a few steps, no checkpoints.
FAST_TRAINING = {"max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                 "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-2,
                 "warmup_steps": 0, "train_sampling_strategy": "random"}


# ---------------------------------------------------------------------------------------------
# short runs of the bundled models, shared by the slow tests that need a real base model


def _all_cores():
    """Real-size models train ~2x faster on both cores; tiny ones are faster on one (see above)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        old = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            yield
        finally:
            torch.set_num_threads(old)
    return scope()


def _train_quietly(values: dict) -> tuple[dict, str]:
    import contextlib
    import io

    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), _all_cores():
        metrics = train(config_from_dict(values))
    return metrics, buf.getvalue()


@pytest.fixture(scope="session")
def smollm2_lora_run(tmp_path_factory):
    """(run folder, metrics, printed): a LoRA instruction run of the bundled SmolLM2 on 24 support replies,
    4 steps at max_length 128. Shared by the training, GGUF and portable-export tests (slow ones only)."""
    import pandas as pd

    root = tmp_path_factory.mktemp("smollm2-lora")
    data = root / "subset.jsonl"
    pd.read_json(EXAMPLES / "support_replies.jsonl", lines=True).head(24).to_json(data, orient="records", lines=True)
    metrics, printed = _train_quietly({
        "task": "instruction", "model": "bundled:smollm2-135m", "data": {"train": str(data), "max_length": 128},
        "strategy": {"name": "lora"}, "output_dir": str(root / "run"), "seed": 1,
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "save_strategy": "no", "eval_strategy": "no",
                     "logging_steps": 1}})
    return root / "run", metrics, printed


@pytest.fixture(scope="session")
def minilm_runs(tmp_path_factory) -> dict:
    """{"lora": run folder, "frozen_all": run folder}: the bundled MiniLM as a LoRA classifier and as a
    frozen encoder under the mean-pooling head, 3 steps each on 24 short rows (the exports of a real
    public base model; slow tests only)."""
    root = tmp_path_factory.mktemp("minilm-runs")
    data = write_csv(root / "train.csv", class_rows(8))
    runs = {}
    for name, strategy in (("lora", {"name": "lora"}), ("frozen_all", {"name": "frozen", "frozen_layers": "all"})):
        _train_quietly({"task": "classification", "model": "bundled:minilm-l6", "strategy": strategy,
                        "data": {"train": data, "max_length": 32}, "output_dir": str(root / name), "seed": 1,
                        "training": {**FAST_TRAINING, "learning_rate": 1e-3}})
        runs[name] = root / name
    return runs


# ---------------------------------------------------------------------------------------------
# calling the app's private events the way its page does


def page_call(url: str, api_name: str, session_hash: str, data: list, timeout: float = 180) -> dict:
    """Call a private event the way the page does (queue join) inside session `session_hash`;
    `data` has a value for every input, None for a gr.State. Returns the process_completed message."""
    import json

    import httpx

    with httpx.Client(timeout=timeout) as h:
        cfg = h.get(f"{url}/config").json()
        fn_index = next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == api_name)
        r = h.post(f"{url}/gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                          "session_hash": session_hash})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        with h.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("no process_completed message")


# ---------------------------------------------------------------------------------------------
# job managers with a stand-in worker, and finished runs owned by a session


def worker_python(tmp_path: Path, source: str) -> str:
    """A 'python' for JobManager(python=...) that runs `source` instead of `-m finetune_core train`
    (it gets the same arguments: `-m finetune_core train RUN_DIR/run_request.yaml`)."""
    import sys

    script = tmp_path / "stand_in_worker.py"
    script.write_text(source)
    shim = tmp_path / "stand_in_python"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    shim.chmod(0o755)
    return str(shim)


def owned_instruction_run(root: Path, run_id: str, owner: str, model_dir: str, name: str, **training) -> Path:
    """A finished instruction run of `model_dir` (a tiny causal LM, a few steps) in root/runs, with the
    job.json the app's JobManager writes for a run it started for `owner`. Returns the runs folder."""
    import json

    from finetune_core.config import config_from_dict
    from finetune_core.jobs import owner_key
    from finetune_core.train import train

    runs = root / "runs"
    data = write_jsonl(root / "train.jsonl", instruction_rows(12))
    train(config_from_dict({
        "task": "instruction", "model": model_dir,
        "data": {"train": data, "val_size": 0.34, "max_length": 64, "template": "alpaca"},
        "strategy": {"name": "full"},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "eval_strategy": "no",
                     "save_strategy": "no", "logging_steps": 1, **training},
        "output_dir": str(runs / run_id), "seed": 1}))
    (runs / run_id / "job.json").write_text(json.dumps({"run_id": run_id, "owner": owner_key(owner),
                                                        "status": "finished", "name": name}))
    return runs


def serve(demo) -> str:
    """Launch a built app in this process on a free local port (what gradio_client and HTTP tests
    talk to); returns its URL. Close it with demo.close()."""
    import socket

    from finetune_core.ui import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo.local_url
