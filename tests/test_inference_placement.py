"""Where the app's models run (generate.inference_placement): a CUDA GPU in bf16 where it has it
natively, else fp16; a CPU in float32. Every inference load (chat, predict, held-out test, merge)
uses it, and inputs follow the model to its device. No GPU here: torch.cuda is mocked, and the load
path is checked with placements a CPU can run (float64, the meta device)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from finetune_core import generate


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine; `gpu(native_bf16)` says whether it runs bf16 natively. Records the bf16 queries."""
    queries = []

    def machine(native_bf16: bool):
        def supported(including_emulation=True):
            queries.append(including_emulation)
            return native_bf16 or including_emulation      # emulated bf16 counts only when asked to

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        return queries

    return machine


def test_a_cpu_gets_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate.inference_placement() == ("cpu", torch.float32)
    assert generate.inference_placement(keep_float32=True) == ("cpu", torch.float32)


def test_a_gpu_with_native_bf16_gets_bf16(gpu):
    queries = gpu(native_bf16=True)
    assert generate.inference_placement() == ("cuda", torch.bfloat16)
    assert queries == [False]                 # asked without emulation: emulated bf16 is slow


def test_a_gpu_without_native_bf16_gets_fp16(gpu):
    gpu(native_bf16=False)                    # e.g. a T4: bf16 only emulated
    assert generate.inference_placement() == ("cuda", torch.float16)


def test_keep_float32_keeps_float32_on_a_gpu(gpu):
    gpu(native_bf16=True)
    assert generate.inference_placement(keep_float32=True) == ("cuda", torch.float32)


def test_every_load_takes_the_chosen_dtype_and_device(monkeypatch, tiny_llama_dir, tiny_bert_dir, tmp_path):
    """A causal LM, a classifier and a LoRA adapter (merged) all load with the placement's dtype, and
    on its device; a different placement is a different cache entry."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    classifier = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).save_pretrained(classifier)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(classifier)
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    for tokenizer_file in Path(tiny_llama_dir).glob("*token*"):
        shutil.copy(tokenizer_file, adapter)

    monkeypatch.setattr(generate, "inference_placement", lambda keep_float32=False: ("cpu", torch.float64))
    for ref in (tiny_llama_dir, str(classifier), str(adapter)):
        model = generate.load_for_inference(ref)[0]
        assert {p.dtype for p in model.parameters()} == {torch.float64}, ref
        assert not model.training
    assert not hasattr(generate.load_for_inference(str(adapter))[0], "peft_config")      # merged: a plain model

    monkeypatch.setattr(generate, "inference_placement", lambda keep_float32=False: ("meta", torch.float32))
    model = generate.load_for_inference(str(classifier))[0]
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_the_cpu_load_is_the_float32_model_as_loaded(monkeypatch, tiny_llama_dir):
    """On a CPU nothing is copied: no .to() call moves or casts the freshly loaded weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    generate._load_for_inference.cache_clear()
    moved = []
    original = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **kw: moved.append((a, kw)) or original(self, *a, **kw))
    model = generate.load_for_inference(tiny_llama_dir)[0]
    assert moved == [] and {p.dtype for p in model.parameters()} == {torch.float32}


def test_predict_moves_the_inputs_to_the_models_device(bert_tokenizer):
    """predict_proba sends the token ids where the model is (a stand-in model records them)."""
    seen = []

    class OnAnotherDevice(torch.nn.Module):
        device = torch.device("meta")
        config = type("Config", (), {"id2label": {0: "a", 1: "b"}})()

        def forward(self, **enc):
            seen.extend(v.device.type for v in enc.values())
            return type("Out", (), {"logits": torch.tensor([[0.0, 0.0]])})()

    assert generate.predict_proba(OnAnotherDevice(), bert_tokenizer, "hello") == {"a": 0.5, "b": 0.5}
    assert seen and set(seen) == {"meta"}
