"""lean.apply: the same loss and gradients as the model's own forward, fewer activations kept; and
evaluation.causal_mask_needed: a right-padded batch drops its attention mask without changing the loss."""

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from finetune_core import lean
from finetune_core.evaluation import (
    causal_mask_needed,
    lm_head_parts,
    response_loss_sum,
)

LAYERS = 2
SHAPE = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _tiny(kind=LlamaForCausalLM, config=LlamaConfig, seed=0):
    torch.manual_seed(seed)
    model = kind(config(**SHAPE))
    model.config._attn_implementation = "sdpa"
    return model


def _batch(right_padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    if right_padded:
        mask[1, 9:] = 0
        mask[2, 5:] = 0
    else:
        mask[1, :3] = 0
    labels = ids.clone()
    labels[:, :4] = -100                        # the prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, n = response_loss_sum(model, batch, lm_head_parts(model))
    (loss_sum / n).backward()
    return (loss_sum / n).detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(forward) -> int:
    """Bytes of the tensors autograd saves for backward while forward() runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def _loss_saved_bytes(model, batch) -> int:
    return _saved_bytes(lambda: response_loss_sum(model, batch, lm_head_parts(model)))


@pytest.mark.parametrize("kind,config", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_lean_gives_the_same_loss_and_gradients_and_keeps_less(kind, config):
    standard = _tiny(kind, config)
    slim = copy.deepcopy(standard)
    # every MLP, both norms of every layer and the final norm
    assert lean.apply(slim) == LAYERS + 2 * LAYERS + 1
    batch = _batch()
    loss_a, grads_a = _loss_and_grads(standard, batch)
    loss_b, grads_b = _loss_and_grads(slim, batch)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(standard.parameters()))
    for name, g in grads_a.items():
        assert torch.allclose(grads_b[name], g, rtol=1e-4, atol=1e-6), name
    assert _loss_saved_bytes(slim, batch) < 0.85 * _loss_saved_bytes(standard, batch)


def test_lean_changes_nothing_without_grad(monkeypatch):
    standard = _tiny()
    slim = copy.deepcopy(standard)
    lean.apply(slim)

    def refuse(*args):
        raise AssertionError("a lean Function ran without grad")

    monkeypatch.setattr(lean.SwiGLUDown, "apply", refuse)
    monkeypatch.setattr(lean.RMSNormFn, "apply", refuse)
    batch = _batch()
    with torch.no_grad():
        a = standard(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = slim(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_lean_leaves_lora_wrapped_projections_and_other_architectures_alone():
    from peft import LoraConfig, get_peft_model

    standard = get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.0))
    for name, p in standard.named_parameters():      # LoRA's B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    slim = copy.deepcopy(standard)
    # the MLPs' down projections are LoRA layers: only the norms change (frozen weights: no weight grads)
    assert lean.apply(slim) == 2 * LAYERS + 1
    batch = _batch()
    loss_a, grads_a = _loss_and_grads(standard, batch)
    loss_b, grads_b = _loss_and_grads(slim, batch)
    assert torch.equal(loss_a, loss_b)
    assert grads_a and all("lora_" in k for k in grads_a)
    for name, g in grads_a.items():
        assert torch.allclose(grads_b[name], g, rtol=1e-4, atol=1e-6), name
    assert lean.apply(BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32))) == 0


def test_lean_falls_back_to_the_standard_path_under_autocast():
    slim = _tiny()
    lean.apply(slim)
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _ = response_loss_sum(slim, batch, lm_head_parts(slim))
    loss_sum.backward()                        # a Function's own backward would mix bf16 and fp32 here
    assert torch.isfinite(loss_sum) and all(p.grad is not None for p in slim.parameters())


def test_right_padded_batches_drop_the_mask_and_keep_their_loss():
    batch = _batch(right_padded=True)
    assert causal_mask_needed(batch["attention_mask"]) is None
    assert causal_mask_needed(torch.ones(2, 5, dtype=torch.long)) is None
    left = _batch(right_padded=False)["attention_mask"]
    assert causal_mask_needed(left) is left
    model = _tiny()
    parts = lm_head_parts(model)
    with torch.no_grad():
        hidden = parts[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        masked = torch.nn.functional.cross_entropy(parts[1](hidden[:, :-1][keep]), labels[keep], reduction="sum")
        unmasked, n = response_loss_sum(model, batch, parts)
    assert n == int(keep.sum())
    assert torch.allclose(unmasked, masked, rtol=1e-6)


def _head_case(rows=10, vocab=97, width=8, bias=False):
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(width, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=g))
    hidden = torch.randn(rows, width, generator=g, requires_grad=True)
    return head, hidden, torch.randint(0, vocab, (rows,), generator=g)


@pytest.mark.parametrize("train_head", [True, False], ids=["head-trained", "head-frozen"])
def test_head_loss_in_chunks_equals_the_standard_head_and_loss(monkeypatch, train_head):
    monkeypatch.setattr(lean, "HEAD_CHUNK_ROWS", 3)            # 10 rows: chunks of 3, 3, 3 and 1
    head, hidden, targets = _head_case()
    head.weight.requires_grad_(train_head)
    calls = []
    real_apply = lean.LinearCrossEntropy.apply
    monkeypatch.setattr(lean.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real_apply(*a))
    results = []
    for chunked in (False, True):
        hidden.grad = head.weight.grad = None
        loss = (lean.head_loss_sum(head, hidden, targets) if chunked else
                torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum"))
        (loss * 0.5).backward()                                  # backward scales by the incoming gradient
        results.append((loss.detach(), hidden.grad.clone(),
                        None if head.weight.grad is None else head.weight.grad.clone()))
    assert calls == [1]
    (std_loss, std_h, std_w), (loss, grad_h, grad_w) = results
    torch.testing.assert_close(loss, std_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_h, std_h, rtol=1e-5, atol=1e-6)
    if train_head:
        torch.testing.assert_close(grad_w, std_w, rtol=1e-5, atol=1e-6)
    else:
        assert grad_w is None and std_w is None


def test_head_loss_keeps_no_logits_for_backward():
    head, hidden, targets = _head_case(rows=200, vocab=97, width=8)
    standard = _saved_bytes(lambda: torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum"))
    chunked = _saved_bytes(lambda: lean.head_loss_sum(head, hidden, targets))
    logits_bytes = 200 * 97 * 4
    assert standard >= logits_bytes                            # log_softmax's output
    assert chunked < logits_bytes / 3                          # the two gradients: 200x8 and 97x8 floats


def test_head_loss_without_grad_or_for_other_heads(monkeypatch):
    head, hidden, targets = _head_case()
    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum").detach()
    seen = []
    real_apply = lean.LinearCrossEntropy.apply
    monkeypatch.setattr(lean.LinearCrossEntropy, "apply",
                        lambda h, w, *a: seen.append(h.requires_grad or w.requires_grad) or real_apply(h, w, *a))
    with torch.no_grad():
        loss = lean.head_loss_sum(head, hidden, targets)
    assert seen == [False]              # no gradient computed in its forward (needs_input_grad ignores no_grad)
    assert not loss.requires_grad
    empty = lean.head_loss_sum(head, hidden[:0], targets[:0])          # a batch with no response token
    empty.backward()
    assert float(empty.detach()) == 0.0 and head.weight.grad is None
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)

    def refuse(*args):
        raise AssertionError("LinearCrossEntropy ran for a head it does not handle")

    monkeypatch.setattr(lean.LinearCrossEntropy, "apply", refuse)
    biased, hidden_b, targets_b = _head_case(bias=True)
    assert lean.head_loss_sum(biased, hidden_b, targets_b).requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean.head_loss_sum(head, hidden, targets)
    lean.head_loss_sum(head.double(), hidden.detach().double(), targets)


@pytest.mark.parametrize("scaling", [1.0, 4.0])
def test_models_that_change_their_logits_keep_their_own_loss(scaling):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(**SHAPE, logits_scaling=scaling))      # logits / logits_scaling
    batch = _batch()
    parts = lm_head_parts(model)
    assert (parts is None) == (scaling != 1.0)
    with torch.no_grad():
        loss_sum, n = response_loss_sum(model, batch, parts)
        expected = model(**batch).loss
    torch.testing.assert_close(loss_sum / n, expected, rtol=1e-5, atol=1e-6)
