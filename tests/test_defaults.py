"""The training defaults (issue 2): per model kind x strategy, half precision only on CUDA, a user's
`training:` keys over ours, and best-model tracking kept whenever the schedules allow it.

No training here: the values are what `training_values` / `resolve_training_args` resolve. CUDA is
simulated by monkeypatching torch.cuda only where the dict of values is checked (TrainingArguments
itself is built on CPU values only).
"""

from __future__ import annotations

import pytest

from finetune_core.config import config_from_dict, load_config, training_defaults
from finetune_core.errors import ConfigError


def _cfg(task="classification", strategy="full", frozen_layers="all", training=None):
    return config_from_dict({"task": task, "strategy": {"name": strategy, "frozen_layers": frozen_layers},
                             "training": training or {}})


# ---------------------------------------------------------------------------------------------
# kind x strategy

# (fixture, task, strategy, frozen_layers, learning rate)
MATRIX = [
    ("tiny_bert_dir", "classification", "full", "all", 5e-5),
    ("tiny_bert_dir", "classification", "frozen", "all", 5e-3),
    ("tiny_bert_dir", "classification", "frozen", 1, 5e-5),
    ("tiny_bert_dir", "classification", "lora", "all", 1e-3),
    ("tiny_llama_dir", "instruction", "full", "all", 1e-5),
    ("tiny_llama_dir", "instruction", "frozen", 1, 5e-5),
    ("tiny_llama_dir", "instruction", "lora", "all", 2e-4),
    ("tiny_llama_dir", "classification", "full", "all", 2e-5),
    ("tiny_llama_dir", "classification", "frozen", "all", 1e-3),
    ("tiny_llama_dir", "classification", "lora", "all", 2e-4),
]


@pytest.mark.parametrize("fixture, task, strategy, frozen, lr", MATRIX)
def test_resolved_defaults_per_kind_and_strategy(request, tmp_path, fixture, task, strategy, frozen, lr):
    from finetune_core.models import model_kind
    from finetune_core.training_args import resolve_training_args

    kind = model_kind(request.getfixturevalue(fixture))
    assert kind == ("encoder" if fixture == "tiny_bert_dir" else "causal")
    cfg = _cfg(task, strategy, frozen)
    args, patience = resolve_training_args(cfg, kind, 120, tmp_path / "ckpt")
    assert args.learning_rate == pytest.approx(lr)
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "cosine"
    assert args.warmup_steps == pytest.approx(0.1)
    assert args.weight_decay == pytest.approx(0.01)
    assert getattr(args.eval_strategy, "value", args.eval_strategy) == "epoch"
    assert getattr(args.save_strategy, "value", args.save_strategy) == "epoch"
    assert args.load_best_model_at_end is True
    if task == "classification":
        assert args.metric_for_best_model == "f1_then_loss" and args.greater_is_better is True
        assert args.num_train_epochs == 10
    else:
        assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
        assert args.num_train_epochs <= 10
    assert patience == 2
    assert args.use_cpu is True and not args.bf16 and not args.fp16
    assert args.logging_first_step is True   # the live chart gets its first loss point after step 1


def test_frozen_head_only_trains_at_most_ten_epochs():
    """Issue 2: a good model on 60-150 rows within 10 epochs, for every strategy."""
    for strategy in ("full", "frozen", "lora"):
        for kind in ("encoder", "causal"):
            for task in ("classification", "instruction"):
                assert training_defaults(task, kind, strategy, 100, cuda=False)["num_train_epochs"] <= 10


def test_instruction_frozen_example_relies_on_the_default_learning_rate():
    cfg = load_config("examples/configs/instruction_frozen.yaml")
    assert "learning_rate" not in cfg.training


# ---------------------------------------------------------------------------------------------
# half precision


def _fake_cuda(monkeypatch, native_bf16: bool, emulated_bf16: bool = True):
    import torch

    calls = []

    def is_bf16_supported(including_emulation: bool = True):
        calls.append(including_emulation)
        return native_bf16 or (including_emulation and emulated_bf16)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


def test_bf16_only_where_the_gpu_does_it_natively(monkeypatch):
    """A GPU that only emulates bf16 (torch's default answer counts it) gets fp16."""
    calls = _fake_cuda(monkeypatch, native_bf16=False, emulated_bf16=True)
    args = training_defaults("classification", "encoder", "full", 100)
    assert args.get("fp16") is True and "bf16" not in args and "use_cpu" not in args
    assert calls and all(c is False for c in calls)
    _fake_cuda(monkeypatch, native_bf16=True)
    args = training_defaults("classification", "encoder", "full", 100)
    assert args.get("bf16") is True and "fp16" not in args


@pytest.mark.parametrize("native_bf16, given, expected",
                         [(True, {"fp16": True}, {"fp16": True}), (False, {"bf16": True}, {"bf16": True}),
                          (True, {"bf16": False}, {"bf16": False}), (False, {"fp16": False}, {"fp16": False}),
                          # "not fp16" on a bf16 GPU keeps bf16 (it does not mean float32), and vice versa
                          (True, {"fp16": False}, {"bf16": True, "fp16": False}),
                          (False, {"bf16": False}, {"fp16": True, "bf16": False})])
def test_users_half_precision_replaces_ours(monkeypatch, native_bf16, given, expected):
    """fp16: true on a bf16 GPU must mean fp16, not TrainingArguments' "At most one of fp16 and bf16"."""
    from finetune_core.training_args import training_values

    _fake_cuda(monkeypatch, native_bf16=native_bf16, emulated_bf16=False)
    values, _ = training_values(_cfg(training=given), "encoder", 100)
    assert {k: values[k] for k in ("fp16", "bf16") if k in values} == expected


def test_no_half_precision_on_cpu():
    from finetune_core.training_args import training_values

    values, _ = training_values(_cfg(), "encoder", 100, cuda=False)
    assert values["use_cpu"] is True and values["bf16"] is False and values["fp16"] is False
    with pytest.raises(ConfigError, match="fp16"):
        training_values(_cfg(training={"fp16": True}), "encoder", 100, cuda=False)


# ---------------------------------------------------------------------------------------------
# training: left empty, and best-model tracking


def test_empty_training_section_means_no_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: classification\ntraining:\n", encoding="utf-8")
    assert load_config(path).training == {}


def test_changing_only_eval_strategy_keeps_the_best_model(tmp_path):
    from finetune_core.training_args import resolve_training_args

    notes: list[str] = []
    cfg = _cfg(training={"eval_strategy": "steps", "eval_steps": 5})
    args, _ = resolve_training_args(cfg, "encoder", 100, tmp_path / "ckpt", notes)
    assert getattr(args.save_strategy, "value", args.save_strategy) == "steps" and args.save_steps == 5
    assert args.load_best_model_at_end is True
    assert any("save_strategy follows eval_strategy" in n for n in notes)


def test_conflicting_schedules_turn_best_model_off_with_a_note(tmp_path):
    from finetune_core.training_args import resolve_training_args

    notes: list[str] = []
    cfg = _cfg(training={"eval_strategy": "epoch", "save_strategy": "steps", "save_steps": 7})
    args, _ = resolve_training_args(cfg, "encoder", 100, tmp_path / "ckpt", notes)
    assert args.load_best_model_at_end is False
    assert len(notes) == 1 and "early stopping" in notes[0] and "save_strategy" in notes[0]
    notes.clear()
    cfg = _cfg(training={"eval_strategy": "steps", "eval_steps": 4, "save_strategy": "steps", "save_steps": 6})
    args, _ = resolve_training_args(cfg, "encoder", 100, tmp_path / "ckpt", notes)
    assert args.load_best_model_at_end is False and "multiple" in notes[0]


def test_matching_schedules_need_no_note(tmp_path):
    from finetune_core.training_args import resolve_training_args

    notes: list[str] = []
    resolve_training_args(_cfg(), "encoder", 100, tmp_path / "ckpt", notes)
    assert notes == []
