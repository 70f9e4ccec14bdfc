"""cpu_linear.apply: oneDNN's linear for forward passes without gradients; training keeps torch's path."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from finetune_core import cpu_linear, lean
from finetune_core.evaluation import lm_head_parts, response_loss_sum

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="oneDNN's linear is not available here")

SHAPE = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.config._attn_implementation = "sdpa"
    return model


def _batch(rows=2):
    ids = torch.randint(3, 97, (rows, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    real = cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda *a: calls.append(1) or real(*a))
    return calls


def test_every_float32_linear_takes_onednn_for_a_few_rows_without_gradients(onednn_calls):
    model, standard = _tiny(), _tiny()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert cpu_linear.apply(model) == len(linears) == 2 * 7 + 1          # q k v o gate up down per layer, head
    assert cpu_linear.apply(model) == 0                                   # once only
    batch = _batch()
    with torch.no_grad():
        fast = model(input_ids=batch["input_ids"]).logits
        ref = standard(input_ids=batch["input_ids"]).logits
    assert len(onednn_calls) == len(linears)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5) and not torch.equal(fast, torch.zeros_like(fast))
    assert fast.argmax(-1).tolist() == ref.argmax(-1).tolist()
    wide = _batch(rows=3)["input_ids"]                    # 36 rows: more than a decoding step has
    assert wide.numel() > cpu_linear.MAX_ROWS
    with torch.no_grad():
        assert torch.equal(model(input_ids=wide).logits, standard(input_ids=wide).logits)
    assert len(onednn_calls) == len(linears)              # torch's own path, bit for bit
    assert model.state_dict().keys() == standard.state_dict().keys()      # nothing added to what is saved
    twin = copy.deepcopy(model)               # a copy keeps the change, on its own weights
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
        assert torch.allclose(twin(input_ids=batch["input_ids"]).logits, 2 * fast, rtol=1e-4, atol=1e-4)
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, fast)


def test_training_keeps_torchs_linear_and_its_gradients(onednn_calls):
    model, standard = _tiny(), _tiny()
    cpu_linear.apply(model)
    for m in (model, standard):
        lean.apply(m)
    batch = _batch(rows=1)          # few rows: only the gradients decide the path
    grads = []
    for m in (model, standard):
        m.zero_grad(set_to_none=True)
        loss_sum, n = response_loss_sum(m, batch, lm_head_parts(m))
        (loss_sum / n).backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    assert onednn_calls == []
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[1])


def test_a_lora_model_merged_or_not_answers_as_torchs_linear_does(onednn_calls):
    """PEFT calls the wrapped base layer, which takes oneDNN; its adapter's own layers do too; merging the
    adapter into the weights is seen at once (the op reads the weight as it is, no copy)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model, standard = get_peft_model(_tiny(), config), get_peft_model(_tiny(), copy.deepcopy(config))
    for m in (model, standard):
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    assert cpu_linear.apply(model) == 2 * 7 + 1 + 2 * 3 * 2              # base layers, head, lora_A/B
    ids = _batch()["input_ids"]
    with torch.no_grad():
        ref = standard(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        assert torch.allclose(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert len(onednn_calls) > 0
