"""FinetuneTrainer internals: the response-only loss under the accelerator's autocast, and cached
features computed where training runs and sampled like the uncached path."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import instruction_rows


def _tiny_trainer(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from finetune_core.train import _make_trainer_class, _response_only_ok

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = _make_trainer_class()(model=model, args=args)
    trainer.response_only = _response_only_ok(model)
    return model, trainer


def _batch(tiny_llama_dir):
    from finetune_core import data as D
    from finetune_core.models import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    import pandas as pd

    cols = {"format": "alpaca", "instruction": "instruction", "input": "input", "output": "output"}
    ex = D.tokenize_instruction(pd.DataFrame(instruction_rows(4)), cols, tok, "chat", 64)
    return D.CausalCollator(tok.pad_token_id)([{"input_ids": i, "labels": l}
                                               for i, l in zip(ex.input_ids, ex.labels)])


def test_response_only_loss_runs_under_the_accelerators_autocast(tmp_path, tiny_llama_dir, monkeypatch):
    """accelerate autocasts by wrapping model.forward; the response-only path calls the body and the LM
    head directly, so it must enter accelerator.autocast() itself or bf16/fp16 never applies on a GPU.
    Simulated here with CPU bf16 autocast on a 2-layer, 32-wide model (a handful of ops)."""
    model, trainer = _tiny_trainer(tiny_llama_dir, tmp_path)
    assert trainer.response_only
    entered = []

    @contextlib.contextmanager
    def bf16_autocast(*_, **__):
        entered.append(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    monkeypatch.setattr(trainer.accelerator, "autocast", bf16_autocast)
    head_dtypes = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_dtypes.append(o.dtype))
    loss = trainer.compute_loss(model, _batch(tiny_llama_dir))
    assert entered and head_dtypes == [torch.bfloat16]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)   # cross-entropy stays in float32


def test_accelerator_autocast_is_a_no_op_in_float32(tmp_path, tiny_llama_dir):
    model, trainer = _tiny_trainer(tiny_llama_dir, tmp_path)
    assert trainer.accelerator.mixed_precision == "no"
    batch = _batch(tiny_llama_dir)
    head_dtypes = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_dtypes.append(o.dtype))
    ours = trainer.compute_loss(model, batch)
    standard = model(**batch).loss
    assert head_dtypes[0] == torch.float32
    assert ours.item() == pytest.approx(standard.item(), abs=1e-5)
