"""FinetuneTrainer internals: the response-only loss under the accelerator's autocast, wide batches split
into passes with the whole batch's gradients, and cached features computed where training runs and
sampled like the uncached path."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import instruction_rows


def _tiny_trainer(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from finetune_core.trainer import FinetuneTrainer, response_only_ok

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = FinetuneTrainer(model=model, args=args)
    trainer.response_only = response_only_ok(model)
    return model, trainer


def _batch(tiny_llama_dir, max_length: int = 64):
    from finetune_core import data as D
    from finetune_core.models import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    import pandas as pd

    cols = {"format": "alpaca", "instruction": "instruction", "input": "input", "output": "output"}
    ex = D.tokenize_instruction(pd.DataFrame(instruction_rows(4)), cols, tok, "chat", max_length)
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


def test_micro_batches_keep_every_row_whole_within_the_budget(tiny_llama_dir):
    from finetune_core.trainer import micro_batches

    batch = _batch(tiny_llama_dir, 256)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1 and batch["input_ids"].numel() > 2 * max(lengths)
    budget = 2 * max(lengths)
    parts = micro_batches(batch, budget)
    assert parts is not None and len(parts) > 1
    seen = []
    for part in parts:
        width = part["input_ids"].shape[1]
        assert part["input_ids"].numel() <= budget
        assert width == int(part["attention_mask"].sum(1).max())         # trimmed to its own longest row
        for ids, mask, labels in zip(part["input_ids"], part["attention_mask"], part["labels"]):
            n = int(mask.sum())
            seen.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
            assert (labels[n:] == -100).all()
    whole = [(tuple(i[:n].tolist()), tuple(l[:n].tolist()))
             for i, l, n in zip(batch["input_ids"], batch["labels"], lengths)]
    assert sorted(seen) == sorted(whole)                                 # every row once, unchanged
    assert micro_batches(batch, batch["input_ids"].numel()) is None      # fits: one pass
    assert micro_batches(batch, 1) is not None and len(micro_batches(batch, 1)) == len(lengths)   # a row alone
    left = {k: v.flip(1) for k, v in batch.items()}
    assert micro_batches(left, budget) is None                           # left padding: not cut
    assert micro_batches({**batch, "position_ids": batch["input_ids"]}, budget) is None   # other inputs: whole


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_split_training_step_gives_the_whole_batchs_loss_and_gradients(tmp_path, tiny_llama_dir, lora):
    from peft import LoraConfig, get_peft_model

    from finetune_core.evaluation import lm_head_parts
    from finetune_core.trainer import CPU_MICRO_BATCH_TOKENS

    batch = _batch(tiny_llama_dir, 256)
    items = int((batch["labels"][:, 1:] != -100).sum())
    results = {}
    for budget in (None, 2 * int(batch["attention_mask"].sum(1).max())):
        torch.manual_seed(0)
        model, trainer = _tiny_trainer(tiny_llama_dir, tmp_path)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
            trainer.model = trainer.model_wrapped = model
        assert trainer.micro_batch_tokens == CPU_MICRO_BATCH_TOKENS    # on a CPU, by default
        trainer.micro_batch_tokens = budget
        passes = []
        lm_head_parts(model)[0].register_forward_hook(lambda m, i, o: passes.append(1))    # the body
        loss = trainer.training_step(model, dict(batch), torch.tensor(items))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[budget] = (float(loss), grads, len(passes))
    (whole_loss, whole_grads, one), (split_loss, split_grads, several) = results.values()
    assert one == 1 and several > 1
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    assert whole_grads.keys() == split_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


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


# ---------------------------------------------------------------------------------------------
# cached features


def _frozen_setup(tmp_path, tiny_bert_dir, n_rows=8):
    from conftest import class_rows, write_csv
    from finetune_core.config import config_from_dict
    from finetune_core.models import load_tokenizer
    from finetune_core.data import load_frames
    from finetune_core.events import EventWriter
    from finetune_core.strategies import apply_strategy
    from finetune_core.tasks import RunContext, classification

    csv = write_csv(tmp_path / "train.csv", class_rows(n_rows))
    cfg = config_from_dict({"model": tiny_bert_dir, "data": {"train": csv, "max_length": 64},
                            "strategy": {"name": "frozen"}, "output_dir": str(tmp_path / "run")})
    tok = load_tokenizer(tiny_bert_dir, "encoder")
    run = RunContext(cfg=cfg, out=tmp_path / "run", writer=EventWriter(tmp_path / "events.jsonl", enabled=False),
                     main=False, model_path=tiny_bert_dir, model_kind="encoder", tokenizer=tok)
    p = classification.prepare(run, load_frames(cfg))
    model = apply_strategy(classification.load_model(run, p), cfg.strategy, cfg.task)
    args, _ = classification.training_arguments(run, p, [])
    args.per_device_train_batch_size = 4
    return cfg, tok, p, model, args


def test_cached_features_batch_the_same_rows_as_the_uncached_path(tmp_path, tiny_bert_dir):
    """The benchmark compares cached and uncached frozen runs: the sampler (group_by_length by
    default) must put the same rows in the same batches, so caching is the only difference."""
    from transformers import DataCollatorWithPadding

    from finetune_core.tasks import as_dataset
    from finetune_core.tasks.classification import cached_datasets
    from finetune_core.trainer import FinetuneTrainer

    cfg, tok, p, model, args = _frozen_setup(tmp_path, tiny_bert_dir, n_rows=12)
    assert args.train_sampling_strategy == "group_by_length"
    Trainer = FinetuneTrainer
    train_ds, eval_ds, head = cached_datasets(model, p, tok, args)
    assert args.train_sampling_strategy == "group_by_length"
    cached = Trainer(model=head, args=args, train_dataset=train_ds, eval_dataset=eval_ds)
    uncached = Trainer(model=model, args=args, train_dataset=as_dataset(p.train_tok),
                       eval_dataset=as_dataset(p.val_tok), data_collator=DataCollatorWithPadding(tok),
                       processing_class=tok)
    orders = []
    for trainer in (cached, uncached):
        trainer.get_train_dataloader()            # the Trainer's own column pruning, then the sampler
        sampler = trainer._get_train_sampler(trainer._remove_unused_columns(trainer.train_dataset))
        assert type(sampler).__name__ == "LengthGroupedBatches"
        torch.manual_seed(123)
        orders.append(list(iter(sampler)))
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(len(p.train_texts)))
    lengths = [len(x) for x in p.train_tok["input_ids"]]
    assert len(set(lengths)) > 1                              # grouping has something to group
    assert train_ds[:]["length"].tolist() == lengths


def test_cached_features_are_computed_on_the_training_device(tmp_path, tiny_bert_dir, monkeypatch):
    from finetune_core.tasks.classification import cached_datasets

    cfg, tok, p, model, args = _frozen_setup(tmp_path, tiny_bert_dir)
    moved_to, seen = [], []
    original_to, original_features = model.to, model.features
    monkeypatch.setattr(model, "to", lambda *a, **k: (moved_to.append(a[0] if a else k.get("device")),
                                                      original_to(*a, **k))[1])

    def features(**batch):
        seen.extend({v.device for v in batch.values()})
        return original_features(**batch)

    monkeypatch.setattr(model, "features", features)
    train_ds, _, _ = cached_datasets(model, p, tok, args)
    assert moved_to == [args.device] and seen and set(seen) == {args.device}
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert args.device.type == expected.type
    stored = train_ds[:]["features"]
    assert stored.shape == (len(p.train_texts), 32) and stored.device.type == "cpu"   # stored on the host, like any dataset
