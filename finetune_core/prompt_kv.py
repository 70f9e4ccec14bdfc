"""The held-out prompts' keys and values, kept from a validation-loss pass for generation's prefill.

    kv = PromptKV(generate.prompt_rows(tokenizer, prompts, template))   # the rows generation will prefill
    token_loss(model, val_batches, capture=kv)                    # the same loss; kv keeps what it wants
    generate_batch(model, tokenizer, prompts, template, known=kv) # those prompts skip their prefill

Why: an instruction run's held-out prompts are its first validation rows (generate.heldout_prompts), and
each model's validation loss runs a forward over those rows, prompt then response, right-padded, from
position 0. In a causal model the keys and values at the prompt's positions depend only on the prompt's
tokens, so that forward has already computed, up to float rounding (a batch's matrix products group the
sums differently), what prefilling the prompt for generation computes again: 2,380 tokens for the 20
Self-Instruct held-out prompts. Measured in `make bench` (time_to_result, SmolLM2 full fine-tuning, 2
cores), the tuned model's answers took 14.8 s prefilling row by row and 7.5 s from the kept prefill,
the base model's 13.6 s and 7.1 s; the answers, losses and ROUGE-L were the same.

A row is taken only where the loss pass computes exactly what a prefill would: no gradient, no
autocast (mixed precision would keep half-precision values), a right-padded batch (positions count
from 0, as the prefill's do), every layer a plain full-attention cache layer (a sliding-window layer
keeps only its window), and the row's tokens starting with the prompt's tokens (a multi-turn row
tokenized by pieces may not). Every other prompt is prefilled as before. The held tensors are the
model's cache for those prompts: ~46 KB per token for SmolLM2 (110 MB for the 20 prompts), freed with
the PromptKV.
"""

from __future__ import annotations


class PromptKV:
    """Per prompt (all its tokens but the last, what a prefill caches), per layer, its (keys, values) of
    shape (1, key-value heads, tokens, head size), as a loss pass computed them. `step`: the training
    step whose weights computed them (set by whoever captures during training)."""

    def __init__(self, prompts: list[list[int]]):
        self._wanted: dict[int, set[tuple[int, ...]]] = {}
        for ids in prompts:
            if len(ids) > 1:
                self._wanted.setdefault(len(ids) - 1, set()).add(tuple(ids[:-1]))
        self._held: dict[tuple[int, ...], list[tuple]] = {}
        self.step: int | None = None

    def __len__(self) -> int:
        return len(self._held)

    def get(self, prompt: list[int]) -> list[tuple] | None:
        """The held (keys, values) per layer of a whole prompt's prefill (all its tokens but the last)."""
        return self._held.get(tuple(prompt[:-1]))

    def clear(self) -> None:
        self._held.clear()
        self.step = None

    def start(self, model, input_ids, attention_mask) -> tuple:
        """(an empty DynamicCache for this loss batch's forward, [(batch row, prompt prefix)] it fills for
        this PromptKV), or (None, []) when no row starts with a wanted prompt not held yet, or when the
        forward does not compute what a prefill would (see the module docstring)."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        from .evaluation import causal_mask_needed

        if torch.is_grad_enabled() or torch.is_autocast_enabled(input_ids.device.type) or \
                causal_mask_needed(attention_mask) is not None:
            return None, []
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else \
            [input_ids.shape[1]] * input_ids.shape[0]
        picks = []
        for row, (ids, real) in enumerate(zip(input_ids.tolist(), lengths)):
            for n, prefixes in self._wanted.items():
                prefix = tuple(ids[:n])
                if n < real and prefix in prefixes and prefix not in self._held:
                    picks.append((row, prefix))
                    break
        if not picks:
            return None, []
        cache = DynamicCache(config=model.config)
        if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None, []
        return cache, picks

    def keep(self, cache, picks) -> None:
        """Copy each pick's prompt positions out of the batch's filled cache (a copy: the batch's cache,
        responses and padding included, goes with the batch)."""
        for row, prefix in picks:
            n = len(prefix)
            self._held[prefix] = [(layer.keys[row:row + 1, :, :n].clone(), layer.values[row:row + 1, :, :n].clone())
                                  for layer in cache.layers]
