"""prompt_kv.PromptKV: a validation-loss pass keeps the held-out prompts' keys and values, generation's
prefill takes them instead of computing them again, and the answers stay those of a fresh prefill."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config, Qwen2ForCausalLM

from finetune_core.data import CausalCollator, encode_pair
from finetune_core.evaluation import response_loss_sum, token_loss
from finetune_core.generate import prompt_rows
from finetune_core.prompt_kv import PromptKV

PROMPTS = ["Name three colours of the rainbow, please", "Why is the sky blue? Answer in one sentence, for a child",
           "Say hi"]
RESPONSES = [" Red, orange and yellow.", " Sunlight scatters off the air, and blue scatters most.", " Hello!"]


@pytest.fixture()
def tiny(tiny_llama_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _loss_batch(tok, prompts, responses):
    rows = [encode_pair(p, r, tok, "alpaca", 128) for p, r in zip(prompts, responses)]
    return CausalCollator(tok.pad_token_id)([{"input_ids": ids, "labels": labels} for ids, labels, _ in rows])


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:-1]]), cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_the_loss_pass_keeps_each_wanted_prompts_prefill_and_the_same_loss(tiny, smol_tokenizer):
    rows = prompt_rows(smol_tokenizer, PROMPTS[:2], "alpaca")       # the third prompt is not wanted
    kv = PromptKV(rows)
    batch = _loss_batch(smol_tokenizer, PROMPTS, RESPONSES)
    assert bool((batch["attention_mask"] == 0).any())               # padded: the rows differ in length
    plain, _ = token_loss(tiny, [batch])
    kept, _ = token_loss(tiny, [batch], capture=kv)
    assert kept == pytest.approx(plain, rel=1e-6)
    assert len(kv) == 2
    for ids in rows:
        held, fresh = kv.get(ids), _prefill(tiny, ids)
        assert len(held) == len(fresh) == tiny.config.num_hidden_layers
        for (hk, hv), (fk, fv) in zip(held, fresh):
            assert hk.shape == fk.shape == (1, tiny.config.num_key_value_heads, len(ids) - 1, fk.shape[-1])
            torch.testing.assert_close(hk, fk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hv, fv, atol=1e-5, rtol=1e-5)
    assert kv.get(prompt_rows(smol_tokenizer, PROMPTS[2:], "alpaca")[0]) is None
    # held tensors are copies: the batch's cache (responses, padding) is not kept alive through them
    first = kv.get(rows[0])[0][0]
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()


def test_nothing_is_kept_where_the_loss_pass_differs_from_a_prefill(tiny, smol_tokenizer):
    rows = prompt_rows(smol_tokenizer, PROMPTS, "alpaca")
    batch = _loss_batch(smol_tokenizer, PROMPTS, RESPONSES)
    kv = PromptKV(rows)

    def picks(model, ids, mask):
        cache, chosen = kv.start(model, ids, mask)
        assert (cache is None) == (not chosen)
        return chosen

    # training (a gradient is being taken)
    assert picks(tiny, batch["input_ids"], batch["attention_mask"]) == []
    with torch.no_grad():
        assert len(picks(tiny, batch["input_ids"], batch["attention_mask"])) == 3
        # mixed precision: half-precision values, not what a float32 prefill computes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert picks(tiny, batch["input_ids"], batch["attention_mask"]) == []
        # left padding: the rows' positions do not start at 0
        left = batch["attention_mask"].flip(1)
        assert picks(tiny, batch["input_ids"].flip(1), left) == []
        # a row that does not start with the prompt's tokens (a conversation tokenized by pieces, say)
        other = batch["input_ids"].clone()
        other[:, 0] = (other[:, 0] + 1) % tiny.config.vocab_size
        assert picks(tiny, other, batch["attention_mask"]) == []
        # sliding-window attention layers keep only their window: no cache to take from
        qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            use_sliding_window=True, sliding_window=8, max_window_layers=0))
        assert picks(qwen, batch["input_ids"], batch["attention_mask"]) == []


def test_generation_takes_the_held_prefill_and_answers_the_same(tiny, smol_tokenizer, monkeypatch):
    from finetune_core.generate import generate_batch

    fresh = generate_batch(tiny, smol_tokenizer, PROMPTS, "alpaca", max_new_tokens=10)
    kv = PromptKV(prompt_rows(smol_tokenizer, PROMPTS, "alpaca"))
    token_loss(tiny, [_loss_batch(smol_tokenizer, PROMPTS, RESPONSES)], capture=kv)
    assert len(kv) == 3
    widths = []                     # the prefill's forwards read several tokens; decoding's read one per row
    real_forward = tiny.forward
    monkeypatch.setattr(tiny, "forward",
                        lambda *a, **k: widths.append(k["input_ids"].shape[1]) or real_forward(*a, **k))
    reused = generate_batch(tiny, smol_tokenizer, PROMPTS, "alpaca", max_new_tokens=10, known=kv)
    assert reused == fresh and len(set(fresh)) > 1
    assert max(widths) == 1         # no prompt was prefilled again
    widths.clear()
    generate_batch(tiny, smol_tokenizer, PROMPTS, "alpaca", max_new_tokens=10)
    assert max(widths) > 1          # (the spy sees a prefill where there is one)


def test_the_trainers_last_evaluation_keeps_the_prompts_of_its_final_weights(tiny_llama_dir, smol_tokenizer, tmp_path,
                                                                            monkeypatch):
    """Evaluations before the last step keep nothing (their weights change again); the last one keeps
    the held-out prompts' prefill computed by the final weights, tagged with its step."""
    from transformers import TrainingArguments

    from finetune_core import trainer as trainer_module
    from finetune_core.tasks import as_dataset
    from finetune_core.trainer import FinetuneTrainer, response_only_ok

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = [encode_pair(p, r, smol_tokenizer, "alpaca", 128) for p, r in zip(PROMPTS * 2, RESPONSES * 2)]
    ds = as_dataset({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3,
                             per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=1, save_strategy="no",
                             learning_rate=1e-2, use_cpu=True, report_to=[], disable_tqdm=True,
                             prediction_loss_only=True)
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds,
                              data_collator=CausalCollator(smol_tokenizer.pad_token_id))
    trainer.response_only = response_only_ok(model)
    wanted = prompt_rows(smol_tokenizer, PROMPTS, "alpaca")
    trainer.prompt_kv = kv = PromptKV(wanted)
    seen = []                       # (step, training?, capturing?) of every loss the trainer computes
    monkeypatch.setattr(trainer_module, "response_loss_sum", lambda m, b, p=None, c=None: seen.append(
        (trainer.state.global_step, m.training, c is not None)) or response_loss_sum(m, b, p, c))
    trainer.train()
    evaluated = [(step, captured) for step, training, captured in seen if not training]
    assert {step for step, _ in evaluated} == {1, 2}
    assert all(captured == (step == 2) for step, captured in evaluated)
    assert kv.step == 2 and len(kv) == 3
    model.eval()
    for ids in wanted:
        for (hk, hv), (fk, fv) in zip(kv.get(ids), _prefill(model, ids)):
            torch.testing.assert_close(hk, fk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hv, fv, atol=1e-5, rtol=1e-5)
