"""The held-out prompts' keys and values, kept from a validation-loss pass for generation's prefill.

    kv = PromptKV(prompt_rows(tokenizer, prompts, template))     # the rows generation will prefill
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


def prompt_rows(tokenizer, prompts: list[str], template: str) -> list[list[int]]:
    """Each prompt's token ids as generation tokenizes it (and as data.encode_pair starts a loss row): a
    chat template has written its special tokens into the prompt already."""
    if not prompts:
        return []
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=(template != "chat"))["input_ids"]]


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

    def picks(self, model, input_ids, attention_mask) -> list[tuple[int, tuple[int, ...]]]:
        """(batch row, prompt prefix) for the rows of this loss batch whose prompt is wanted and not held
        yet, when the forward about to run computes what a prefill would (see the module docstring)."""
        import torch

        from .evaluation import causal_mask_needed

        if torch.is_grad_enabled() or torch.is_autocast_enabled(input_ids.device.type) or \
                causal_mask_needed(attention_mask) is not None:
            return []
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else \
            [input_ids.shape[1]] * input_ids.shape[0]
        out = []
        for row, (ids, real) in enumerate(zip(input_ids.tolist(), lengths)):
            for n, prefixes in self._wanted.items():
                prefix = tuple(ids[:n])
                if n < real and prefix in prefixes and prefix not in self._held:
                    out.append((row, prefix))
                    break
        return out

    def cache_for(self, model, picks):
        """An empty DynamicCache for the forward of a batch with `picks`, or None where the model's cache
        layers are not all plain full attention."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if not picks:
            return None
        cache = DynamicCache(config=model.config)
        return cache if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers) else None

    def keep(self, cache, picks) -> None:
        """Copy each pick's prompt positions out of the batch's filled cache (a copy: the batch's cache,
        responses and padding included, goes with the batch)."""
        for row, prefix in picks:
            n = len(prefix)
            self._held[prefix] = [(layer.keys[row:row + 1, :, :n].clone(), layer.values[row:row + 1, :, :n].clone())
                                  for layer in cache.layers]
