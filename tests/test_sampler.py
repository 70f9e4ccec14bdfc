"""Length-grouped batches (FinetuneTrainer's train sampler): every row once per epoch, batches cut from
length-sorted megabatches (so the padding is the lowest rectangular batches can have), random order."""

import random

import pytest
import torch


@pytest.fixture(scope="module")
def make_sampler(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from finetune_core.tasks import as_dataset
    from finetune_core.trainer import FinetuneTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)

    def make(lengths, batch, tmp):
        ds = as_dataset({"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths],
                          "length": list(lengths)})
        args = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=batch, use_cpu=True,
                                 report_to="none", train_sampling_strategy="group_by_length")
        trainer = FinetuneTrainer(model=model, args=args, train_dataset=ds)
        return trainer._get_train_sampler(ds)

    return make


def positions(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_each_row_once_and_padding_at_the_floor(make_sampler, tmp_path):
    rng = random.Random(0)
    lengths = [rng.randint(5, 250) for _ in range(50)]          # a small dataset: transformers would not group
    sampler = make_sampler(lengths, 4, tmp_path)
    assert type(sampler).__name__ == "LengthGroupedBatches"
    torch.manual_seed(1)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and len(sampler) == 50
    batches = [order[i:i + 4] for i in range(0, 50, 4)]
    # Longest first, cut into 4s: the 12 full batches are the contiguous groups of the sorted lengths
    # (the lowest padding any split has), and the partial batch of the 2 shortest rows comes last.
    ordered = sorted(lengths, reverse=True)
    floor = positions([list(range(i, i + 4)) for i in range(0, 48, 4)], ordered)
    assert len(batches[-1]) == 2 and sorted(lengths[i] for i in batches[-1]) == sorted(ordered[48:])
    assert positions(batches[:-1], lengths) == floor
    random_batches = [list(range(i, min(i + 4, 50))) for i in range(0, 50, 4)]
    assert positions(batches, lengths) < positions(random_batches, lengths)   # far less padding than in file order


def test_batch_order_is_random_per_epoch(make_sampler, tmp_path):
    lengths = list(range(10, 58))
    sampler = make_sampler(lengths, 4, tmp_path)
    torch.manual_seed(1)
    first = list(sampler)
    torch.manual_seed(2)
    second = list(sampler)
    assert first != second and sorted(first) == sorted(second)
    # Within each batch the rows are neighbours in length (sorted megabatch), whatever the order.
    for order in (first, second):
        for i in range(0, 48, 4):
            b = sorted(lengths[j] for j in order[i:i + 4])
            assert b[-1] - b[0] == 3
