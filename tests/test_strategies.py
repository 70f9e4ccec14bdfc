"""Strategies on tiny random models: each one changes exactly the parameters it should.

Every test takes a snapshot of the weights, runs a few AdamW steps (no weight decay, so a tensor
moves only if it gets a gradient) and compares: the set of tensors that changed must equal the set
the strategy makes trainable, and that set must be what the strategy promises.
"""

import re

import pytest
import torch

from finetune_core.config import LoraSettings, StrategyConfig
from finetune_core.errors import ConfigError
from finetune_core.models import load_model, load_tokenizer
from finetune_core.strategies import (apply_strategy, can_cache_features, lora_target_modules, trainable_summary,
                                      transformer_blocks)

TEXTS = ["the striker scored a late goal", "bake the bread for an hour", "the server crashed again", "a draw"]


def strategy(name, frozen_layers="all", **lora):
    return StrategyConfig(name=name, frozen_layers=frozen_layers, lora=LoraSettings(**lora))


def cls_model(path, n_labels=3):
    kind = "causal" if "llama" in path or "gpt2" in path else "encoder"
    tok = load_tokenizer(path, kind)
    torch.manual_seed(0)
    model = load_model(path, "classification", kind, num_labels=n_labels,
                       id2label={i: f"c{i}" for i in range(n_labels)}, pad_token_id=tok.pad_token_id)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 2, 0])
    return model, batch


def lm_model(path):
    tok = load_tokenizer(path, "causal")
    torch.manual_seed(0)
    model = load_model(path, "instruction", "causal")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_steps(model, batch, steps=3):
    batch = {k: v for k, v in batch.items() if k != "token_type_ids" or "bert" in model.config.model_type}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def changed(before, model) -> set:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def check_exact(model, batch, expected_trainable=None):
    before = snapshot(model)
    run_steps(model, batch)
    moved = changed(before, model)
    assert moved == trainable(model), "a frozen tensor moved, or a trainable one got no gradient"
    if expected_trainable is not None:
        assert trainable(model) == expected_trainable
    return moved


# ---------------------------------------------------------------------------------------------
# full


def test_full_changes_every_parameter(tiny_bert_dir):
    model, batch = cls_model(tiny_bert_dir)
    model = apply_strategy(model, strategy("full"), "classification")
    moved = check_exact(model, batch)
    assert moved == {n for n, _ in model.named_parameters()}


def test_full_on_causal_lm(tiny_llama_dir):
    model, batch = lm_model(tiny_llama_dir)
    model = apply_strategy(model, strategy("full"), "instruction")
    assert check_exact(model, batch) == {n for n, _ in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# frozen


def test_frozen_all_trains_only_the_head(tiny_bert_dir):
    model, batch = cls_model(tiny_bert_dir)
    model = apply_strategy(model, strategy("frozen", "all"), "classification")
    moved = check_exact(model, batch)
    assert moved == {"classifier.weight", "classifier.bias"}


def test_frozen_all_mean_pooling_head(tiny_bert_dir):
    from finetune_core.heads import MeanPoolingForSequenceClassification

    _, batch = cls_model(tiny_bert_dir)
    model = MeanPoolingForSequenceClassification.from_encoder(tiny_bert_dir, 3, {0: "a", 1: "b", 2: "c"})
    model = apply_strategy(model, strategy("frozen", "all"), "classification")
    moved = check_exact(model, batch)
    assert moved == {"norm.weight", "norm.bias", "classifier.weight", "classifier.bias"}
    model.train()
    assert not model.encoder.training          # frozen encoder: no dropout noise, features are fixed
    assert can_cache_features(model, strategy("frozen", "all"), "classification")[0]
    assert not can_cache_features(model, strategy("frozen", 1), "classification")[0]
    assert not can_cache_features(model, strategy("lora"), "classification")[0]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_frozen_n_freezes_embeddings_and_first_blocks(tiny_bert_dir, n):
    model, batch = cls_model(tiny_bert_dir)
    model = apply_strategy(model, strategy("frozen", n), "classification")
    moved = check_exact(model, batch)
    frozen = {name for name, _ in model.named_parameters()
              if name.startswith("bert.embeddings.")
              or any(name.startswith(f"bert.encoder.layer.{i}.") for i in range(n))}
    assert moved == {name for name, _ in model.named_parameters()} - frozen
    assert any(name.startswith("classifier.") for name in moved)


def test_frozen_n_on_causal_lm(tiny_llama_dir):
    model, batch = lm_model(tiny_llama_dir)
    model = apply_strategy(model, strategy("frozen", 1), "instruction")
    moved = check_exact(model, batch)
    assert moved == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")} | {"model.norm.weight"}
    # the LM head is tied to the (frozen) embeddings
    assert not model.get_output_embeddings().weight.requires_grad


def test_frozen_all_refused_for_instruction_with_explanation(tiny_llama_dir):
    model, _ = lm_model(tiny_llama_dir)
    with pytest.raises(ConfigError) as err:
        apply_strategy(model, strategy("frozen", "all"), "instruction")
    msg = str(err.value)
    assert "no new head" in msg and "nothing would learn" in msg
    assert "frozen_layers to a number below 2" in msg and "lora" in msg


def test_frozen_n_at_or_above_block_count_refused_for_causal(tiny_llama_dir):
    model, _ = lm_model(tiny_llama_dir)
    for n in (2, 5):
        with pytest.raises(ConfigError, match=rf"frozen_layers: {n} but this model has 2 blocks"):
            apply_strategy(model, strategy("frozen", n), "instruction")
    apply_strategy(model, strategy("frozen", 1), "instruction")       # the last block still learns


def test_frozen_n_limit_for_classification(tiny_bert_dir):
    model, _ = cls_model(tiny_bert_dir)
    apply_strategy(model, strategy("frozen", 2), "classification")  # every block frozen, head learns
    with pytest.raises(ConfigError, match="at most 2"):
        apply_strategy(model, strategy("frozen", 3), "classification")


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_classification_changes_adapters_and_head_only(tiny_bert_dir):
    model, batch = cls_model(tiny_bert_dir)
    model = apply_strategy(model, strategy("lora", r=4, alpha=8, dropout=0.0), "classification")
    moved = check_exact(model, batch)
    head = {n for n in moved if "classifier" in n}
    adapters = {n for n in moved if "lora_" in n}
    assert moved == head | adapters
    assert head and all("modules_to_save" in n for n in head)      # the new head trains in full
    assert len(adapters) == 2 * 6 * 2                                # A and B, 6 linears, 2 layers
    assert not any("original_module" in n for n in moved)


def test_lora_causal_changes_adapters_only(tiny_llama_dir):
    model, batch = lm_model(tiny_llama_dir)
    model = apply_strategy(model, strategy("lora", r=4, alpha=8, dropout=0.0), "instruction")
    moved = check_exact(model, batch)
    assert moved and all(re.search(r"lora_[AB]\.default\.weight$", n) for n in moved)
    assert len(moved) == 2 * 7 * 2


def _wrapped(model) -> list[str]:
    """Names of the modules LoRA wrapped, without the peft prefix, layer number generalised."""
    names = {re.sub(r"\.lora_A\.default\.weight$", "", n) for n, _ in model.named_parameters() if ".lora_A." in n}
    return sorted({re.sub(r"^base_model\.model\.", "", re.sub(r"\.\d+\.", ".N.", n)) for n in names})


@pytest.mark.parametrize("fixture, task, expected, head", [
    ("tiny_bert_dir", "classification",
     ["bert.encoder.layer.N.attention.output.dense", "bert.encoder.layer.N.attention.self.key",
      "bert.encoder.layer.N.attention.self.query", "bert.encoder.layer.N.attention.self.value",
      "bert.encoder.layer.N.intermediate.dense", "bert.encoder.layer.N.output.dense"], {"classifier"}),
    ("tiny_distilbert_dir", "classification",
     ["distilbert.transformer.layer.N.attention.k_lin", "distilbert.transformer.layer.N.attention.out_lin",
      "distilbert.transformer.layer.N.attention.q_lin", "distilbert.transformer.layer.N.attention.v_lin",
      "distilbert.transformer.layer.N.ffn.lin1", "distilbert.transformer.layer.N.ffn.lin2"],
     {"pre_classifier", "classifier"}),
    ("tiny_gpt2_dir", "classification",
     ["transformer.h.N.attn.c_attn", "transformer.h.N.attn.c_proj", "transformer.h.N.mlp.c_fc",
      "transformer.h.N.mlp.c_proj"], {"score"}),
    ("tiny_llama_dir", "instruction",
     ["model.layers.N.mlp.down_proj", "model.layers.N.mlp.gate_proj", "model.layers.N.mlp.up_proj",
      "model.layers.N.self_attn.k_proj", "model.layers.N.self_attn.o_proj", "model.layers.N.self_attn.q_proj",
      "model.layers.N.self_attn.v_proj"], set()),
    ("tiny_llama_dir", "classification",
     ["model.layers.N.mlp.down_proj", "model.layers.N.mlp.gate_proj", "model.layers.N.mlp.up_proj",
      "model.layers.N.self_attn.k_proj", "model.layers.N.self_attn.o_proj", "model.layers.N.self_attn.q_proj",
      "model.layers.N.self_attn.v_proj"], {"score"}),
])
def test_lora_auto_targets_per_architecture(request, fixture, task, expected, head):
    path = request.getfixturevalue(fixture)
    model, batch = cls_model(path) if task == "classification" else lm_model(path)
    assert lora_target_modules(model, "auto") != "all-linear"
    model = apply_strategy(model, strategy("lora", r=2, alpha=4, dropout=0.0), task)
    assert _wrapped(model) == expected
    moved = check_exact(model, batch)            # trains (GPT-2's Conv1D needs fan_in_fan_out)
    heads = {n.split(".")[2] for n in moved if "modules_to_save" in n}
    assert heads == head
    assert all("lora_" in n or "modules_to_save" in n for n in moved)


def test_lora_explicit_targets(tiny_bert_dir):
    model, batch = cls_model(tiny_bert_dir)
    model = apply_strategy(model, strategy("lora", r=2, alpha=4, dropout=0.0, target_modules=["query", "value"]),
                           "classification")
    assert _wrapped(model) == ["bert.encoder.layer.N.attention.self.query", "bert.encoder.layer.N.attention.self.value"]
    check_exact(model, batch)


@pytest.mark.parametrize("fixture, task, targets, bad, listed", [
    ("tiny_bert_dir", "classification", ["query", "q_proj"], "'q_proj'", "classifier, dense, key, query, value"),
    ("tiny_llama_dir", "instruction", ["q_lin"], "'q_lin'", "down_proj, gate_proj, k_proj, lm_head, o_proj"),
    ("tiny_llama_dir", "instruction", r".*attn\.nothing", "the pattern", "q_proj, up_proj, v_proj"),
    ("tiny_llama_dir", "instruction", "q_proj(", "the pattern 'q_proj('", "not a valid regular expression"),
])
def test_lora_bad_targets_name_the_model_layers(request, fixture, task, targets, bad, listed):
    path = request.getfixturevalue(fixture)
    model = cls_model(path)[0] if task == "classification" else lm_model(path)[0]
    with pytest.raises(ConfigError) as err:
        apply_strategy(model, strategy("lora", target_modules=targets), task)
    assert f"target_modules: {bad}" in err.value.problem and listed in err.value.problem
    assert "target_modules: auto" in err.value.fix


def test_unknown_architecture_falls_back_to_all_linear():
    class Cfg:
        model_type = "something-new"

    class M:
        config = Cfg()

    assert lora_target_modules(M(), "auto") == "all-linear"
    assert lora_target_modules(M(), ["a"]) == ["a"]


# ---------------------------------------------------------------------------------------------
# summaries


def test_trainable_summary_line(tiny_bert_dir):
    model, _ = cls_model(tiny_bert_dir)
    model = apply_strategy(model, strategy("frozen", "all"), "classification")
    s = trainable_summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert s["trainable_params"] == 32 * 3 + 3 and s["total_params"] == total
    assert re.fullmatch(r"Trainable: [\d,]+ / [\d,]+ \(\d+\.\d\d%\)", s["line"])
    assert s["line"] == f"Trainable: 99 / {total:,} ({100 * 99 / total:.2f}%)"


def test_transformer_blocks_found(tiny_bert_dir, tiny_llama_dir, tiny_gpt2_dir, tiny_distilbert_dir):
    for path in (tiny_bert_dir, tiny_gpt2_dir, tiny_distilbert_dir):
        assert len(transformer_blocks(cls_model(path)[0])) == 2
    assert len(transformer_blocks(lm_model(tiny_llama_dir)[0])) == 2


@pytest.mark.parametrize("fixture, embed, block0", [
    ("tiny_distilbert_dir", r"^distilbert\.embeddings\.", r"^distilbert\.transformer\.layer\.0\."),
    ("tiny_gpt2_dir", r"^transformer\.(wte|wpe)\.", r"^transformer\.h\.0\."),
    ("tiny_llama_dir", r"^model\.embed_tokens\.", r"^model\.layers\.0\."),
])
def test_frozen_one_block_other_architectures(request, fixture, embed, block0):
    model, batch = cls_model(request.getfixturevalue(fixture))
    model = apply_strategy(model, strategy("frozen", 1), "classification")
    moved = check_exact(model, batch)
    names = {n for n, _ in model.named_parameters()}
    frozen = {n for n in names if re.search(embed, n) or re.search(block0, n)}
    assert frozen and any(re.search(embed, n) for n in frozen)
    assert moved == names - frozen


# ---------------------------------------------------------------------------------------------
# trainable weights out of the file mapping (models.copy_trainable_into_memory)


def _mapped_file(tensor) -> str | None:
    """The file whose mapping holds the tensor's data ('' for anonymous memory), from /proc/self/maps."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_trainable_weights_leave_the_file_mapping_frozen_ones_stay(tiny_llama_dir):
    """A partly frozen model: the last block trains (loaded from the file, so mapped until copied), the
    embeddings and the first block stay frozen and mapped."""
    from finetune_core.models import copy_trainable_into_memory

    model, batch = lm_model(tiny_llama_dir)
    model = apply_strategy(model, strategy("frozen", frozen_layers=1), "instruction")
    names = dict(model.named_parameters())
    trained = {n for n, p in names.items() if p.requires_grad}
    frozen = set(names) - trained
    assert trained and frozen
    # what transformers loaded is a view of model.safetensors (the premise of the copy), trained or not
    assert all((_mapped_file(names[n]) or "").endswith("model.safetensors") for n in names if names[n].dim() > 1)
    before = snapshot(model)
    frozen_ptrs = {n: p.data_ptr() for n, p in names.items() if not p.requires_grad}

    copied = copy_trainable_into_memory(model)

    assert copied == sum(names[n].numel() * 4 for n in trained)
    assert all(not (_mapped_file(p) or "").endswith(".safetensors") for n, p in model.named_parameters()
               if n in trained)
    assert {n: p.data_ptr() for n, p in model.named_parameters() if not p.requires_grad} == frozen_ptrs
    assert all((_mapped_file(p) or "").endswith("model.safetensors") for n, p in model.named_parameters()
               if n in frozen and p.dim() > 1)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    check_exact(model, batch)         # still trains what the strategy chose, nothing else


def test_full_copy_keeps_tied_embeddings_tied(tiny_llama_dir):
    from finetune_core.models import copy_trainable_into_memory

    model, batch = lm_model(tiny_llama_dir)
    model = apply_strategy(model, strategy("full"), "instruction")
    total = sum(p.numel() * 4 for p in model.parameters())        # a tied pair is one Parameter
    assert copy_trainable_into_memory(model) == total
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if __import__("os").path.exists("/proc/self/maps"):
        assert not (_mapped_file(model.lm_head.weight) or "").endswith(".safetensors")
    check_exact(model, batch)
