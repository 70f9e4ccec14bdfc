"""The article's three strategies as three plain branches: full | frozen | lora.

    model = apply_strategy(model, cfg.strategy, task="classification")
    print(trainable_summary(model)["line"])     # Trainable: 1,540 / 22,714,756 (0.0%)

`frozen` freezes the embeddings and the first N transformer blocks (N = strategy.frozen_layers), or
everything but the new head (`all`, classification only). `lora` wraps the model with peft; the
target modules are resolved per architecture when `target_modules: auto`.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import ConfigError

# LoRA targets per architecture: every linear layer of attention and MLP (what works on small data).
LORA_TARGETS = {
    "bert": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "xlm-roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "electra": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "finetune_lab_mean_pooling": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
EMBEDDING_NAMES = ("embeddings", "embed_tokens", "wte", "wpe", "word_embeddings", "embed_positions")


def lora_target_modules(model, requested="auto"):
    if requested not in (None, "auto"):
        return requested
    return LORA_TARGETS.get(model.config.model_type, "all-linear")


def backbone(model) -> nn.Module:
    """The pretrained body (BertModel, LlamaModel, ...) without the task head."""
    if hasattr(model, "encoder") and model.config.model_type == "finetune_lab_mean_pooling":
        return model.encoder
    return model.base_model


def transformer_blocks(model) -> nn.ModuleList:
    """The list of transformer blocks, found as the ModuleList with num_hidden_layers entries."""
    body = backbone(model)
    n = getattr(body.config, "num_hidden_layers", None) or getattr(body.config, "n_layer", None)
    for module in body.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"Could not find the transformer blocks of this {model.config.model_type} model.",
                      "Use strategy full or lora for this architecture.")


def embedding_modules(model) -> list[nn.Module]:
    body = backbone(model)
    found = []
    for name in EMBEDDING_NAMES:
        for holder in (body, getattr(body, "transformer", None), getattr(body, "decoder", None)):
            mod = getattr(holder, name, None) if holder is not None else None
            if isinstance(mod, nn.Module) and mod not in found:
                found.append(mod)
    return found


def apply_strategy(model, strategy, task: str):
    """Set requires_grad (full/frozen) or wrap with LoRA; returns the model to train."""
    name = strategy.name
    if name == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model

    if name == "frozen":
        for p in model.parameters():
            p.requires_grad = True
        n_blocks = len(transformer_blocks(model))
        if strategy.frozen_layers == "all":
            if task != "classification":
                raise ConfigError(
                    "frozen_layers: all freezes the whole model, but an instruction model has no new head "
                    "to train, so nothing would learn.",
                    f"Set strategy.frozen_layers to a number below {n_blocks} (e.g. {n_blocks // 2}: "
                    "embeddings and early blocks stay frozen, later blocks learn), or use lora.")
            for p in backbone(model).parameters():
                p.requires_grad = False
            return model
        n = int(strategy.frozen_layers)
        limit = n_blocks if task == "classification" else n_blocks - 1
        if n > limit:
            raise ConfigError(f"frozen_layers: {n} but this model has {n_blocks} blocks; "
                              f"at most {limit} can be frozen for {task}.",
                              f"Use a number from 0 to {limit}" + (", or all to train only the head."
                                                                   if task == "classification" else "."))
        for module in embedding_modules(model):
            for p in module.parameters():
                p.requires_grad = False
        for block in transformer_blocks(model)[:n]:
            for p in block.parameters():
                p.requires_grad = False
        return model

    if name == "lora":
        from peft import LoraConfig, TaskType, get_peft_model   # seconds to import: only LoRA runs pay them

        lora = strategy.lora
        targets = lora_target_modules(model, lora.target_modules)
        is_cls = task == "classification"
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS if is_cls else TaskType.CAUSAL_LM,
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            fan_in_fan_out=model.config.model_type == "gpt2",
            modules_to_save=_head_names(model) if is_cls else None,
        )
        _check_targets(model, targets)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            if "target module" not in str(exc).lower():
                raise
            shown = targets if isinstance(targets, str) else ", ".join(map(str, targets))
            raise _bad_targets_error(model, shown, str(exc)) from exc

    raise ConfigError(f"Unknown strategy '{name}'.", "Use full, frozen or lora.")


def linear_module_names(model) -> list[str]:
    """Short names (last path part) of the layers LoRA can wrap: Linear, and GPT-2's Conv1D."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def _bad_targets_error(model, bad: str, detail: str = "") -> ConfigError:
    return ConfigError(
        f"strategy.lora.target_modules: {bad} matches no layer of this {model.config.model_type} model"
        + (f" ({detail.rstrip('.')})" if detail else "") + ". "
        f"Its linear layers are: {', '.join(linear_module_names(model))}.",
        "Use target_modules: auto (the right layers for this architecture), all-linear, or a list of the "
        "names above.")


def _check_targets(model, targets) -> None:
    """Every requested name must match a module, by peft's rule: the full name, or its last parts."""
    if targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):        # peft treats a string as a regular expression on full names
        try:
            matched = any(re.fullmatch(targets, n) for n in names)
        except re.error as exc:
            raise _bad_targets_error(model, f"the pattern '{targets}'",
                                     f"it is not a valid regular expression: {exc}") from None
        if not matched:
            raise _bad_targets_error(model, f"the pattern '{targets}'")
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise _bad_targets_error(model, ", ".join(f"'{t}'" for t in missing))


def _head_names(model) -> list[str]:
    """Names of the new classification head's modules (trained in full alongside LoRA)."""
    names = []
    for candidate in ("classifier", "score", "pre_classifier"):
        if isinstance(getattr(model, candidate, None), nn.Module):
            names.append(candidate)
    return names


def trainable_summary(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    pct = 100.0 * trainable / max(total, 1)
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": pct,
            "line": f"Trainable: {trainable:,} / {total:,} ({pct:.2f}%)"}


def can_cache_features(model, strategy, task: str) -> tuple[bool, str]:
    """Frozen head-only runs whose frozen part is deterministic can reuse its outputs across epochs."""
    if strategy.name != "frozen" or strategy.frozen_layers != "all" or task != "classification":
        return False, "feature caching applies to frozen head-only classification"
    if not hasattr(model, "features") or not hasattr(model, "head"):
        return False, "this model's head cannot run on stored features"
    # The frozen encoder runs in eval mode (dropout off), so its output for a text never changes.
    return True, "frozen encoder in eval mode is deterministic: its outputs are computed once"
