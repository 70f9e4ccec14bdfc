"""Config: one schema for YAML, `--set` and the app; unknown keys named with the nearest valid one."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from finetune_core.config import (TASKS, RunConfig, apply_overrides, config_from_dict, config_to_dict, dump_config,
                                  load_config, parse_override, training_defaults, validate)
from finetune_core.errors import ConfigError, FinetuneError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_design():
    cfg = config_from_dict({})
    assert cfg.task == "classification" and cfg.model == "bundled:minilm-l6"
    assert cfg.strategy.name == "lora" and cfg.strategy.frozen_layers == "all"
    assert cfg.strategy.cache_features == "auto"
    assert (cfg.strategy.lora.r, cfg.strategy.lora.alpha, cfg.strategy.lora.dropout) == (8, 16, 0.05)
    assert cfg.strategy.lora.target_modules == "auto"
    assert cfg.data.template == "auto" and cfg.data.val_size == 0.2 and cfg.data.validation is None
    assert cfg.seed == 42 and cfg.training == {}


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.task in TASKS
    assert Path(REPO / cfg.data.train).exists()


@pytest.mark.parametrize("values, bad, suggestion", [
    ({"modle": "x"}, "modle", "model"),
    ({"data": {"text_colum": "t"}}, "data.text_colum", "text_column"),
    ({"data": {"max_lenght": 64}}, "data.max_lenght", "max_length"),
    ({"strategy": {"frozen_layer": 2}}, "strategy.frozen_layer", "frozen_layers"),
    ({"strategy": {"lora": {"alpah": 32}}}, "strategy.lora.alpha".replace("alpha", "alpah"), "alpha"),
    ({"training": {"learning_rat": 1e-4}}, "training.learning_rat", "learning_rate"),
    ({"training": {"num_train_epoch": 3}}, "training.num_train_epoch", "num_train_epochs"),
])
def test_unknown_keys_name_the_key_and_the_nearest_valid_one(values, bad, suggestion):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    msg = str(err.value)
    assert f"'{bad}'" in msg
    assert f"Did you mean '{suggestion}'?" in msg


def test_unknown_key_without_a_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"zzzzzz": 1}})
    assert "'data.zzzzzz'" in str(err.value) and "text_column" in str(err.value)


def test_renamed_transformers_options_get_the_new_name():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"training": {"evaluation_strategy": "epoch"}})
    assert "eval_strategy" in str(err.value)


def test_training_accepts_every_training_arguments_field():
    from transformers import TrainingArguments

    names = [f.name for f in dataclasses.fields(TrainingArguments)]
    assert len(names) > 50
    cfg = config_from_dict({"training": {n: None for n in names} | {"early_stopping_patience": 3}})
    assert set(cfg.training) == set(names) | {"early_stopping_patience"}


def test_training_fields_reach_training_arguments(tmp_path):
    from finetune_core.training_args import resolve_training_args

    cfg = config_from_dict({"training": {"gradient_accumulation_steps": 3, "adam_beta2": 0.95, "max_grad_norm": 0.5,
                                         "label_smoothing_factor": 0.1, "lr_scheduler_type": "linear",
                                         "learning_rate": 3e-4, "early_stopping_patience": 5}})
    args, patience = resolve_training_args(cfg, "encoder", 100, tmp_path / "ckpt")
    assert args.gradient_accumulation_steps == 3 and args.adam_beta2 == 0.95 and args.max_grad_norm == 0.5
    assert args.label_smoothing_factor == 0.1 and args.learning_rate == 3e-4
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "linear"
    assert patience == 5
    assert args.use_cpu and not args.bf16 and not args.fp16


def test_preference_arguments_are_float32_on_cpu(tmp_path):
    """TRL's DPOConfig defaults bf16 to True even with use_cpu: a preference run on a CPU must not
    inherit it (the Trainer would run every forward under bf16 autocast)."""
    import warnings

    import torch
    from trl import DPOConfig

    from finetune_core.training_args import resolve_training_args

    if torch.cuda.is_available():
        pytest.skip("on a GPU half precision is the default")
    with warnings.catch_warnings():     # TRL's own default, gradient_checkpointing=True, is a renamed field
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        assert DPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True).bf16      # why the test exists
    cfg = config_from_dict({"task": "preference", "model": "bundled:smollm2-135m", "strategy": {"name": "lora"}})
    args, _ = resolve_training_args(cfg, "causal", 80, tmp_path / "ckpt", args_class=DPOConfig)
    assert isinstance(args, DPOConfig)
    assert args.use_cpu and args.bf16 is False and args.fp16 is False


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_half_precision_refused_on_cpu(tmp_path, key):
    import torch

    from finetune_core.training_args import resolve_training_args

    if torch.cuda.is_available():
        pytest.skip("a GPU accepts half precision")
    cfg = config_from_dict({"training": {key: True}})
    with pytest.raises(ConfigError, match=key):
        resolve_training_args(cfg, "encoder", 100, tmp_path / "ckpt")


def test_defaults_never_use_half_precision_on_cpu():
    args = training_defaults("instruction", "causal", "lora", 100, cuda=False)
    assert args["use_cpu"] is True and "bf16" not in args and "fp16" not in args
    gpu = training_defaults("classification", "encoder", "full", 100, cuda=True)
    assert "use_cpu" not in gpu


def test_defaults_follow_task_and_strategy():
    cls = training_defaults("classification", "encoder", "frozen", 160, cuda=False)
    assert cls["metric_for_best_model"] == "f1_then_loss" and cls["greater_is_better"] is True
    assert cls["learning_rate"] == 5e-3 and cls["num_train_epochs"] == 10
    ins = training_defaults("instruction", "causal", "lora", 64, cuda=False)
    assert ins["metric_for_best_model"] == "eval_loss" and ins["greater_is_better"] is False
    assert ins["learning_rate"] == 2e-4


def test_activation_checkpointing_only_for_causal_lora_on_cpu():
    for task, kind, strategy in [("instruction", "causal", "full"), ("instruction", "causal", "frozen"),
                                 ("classification", "encoder", "lora")]:
        assert training_defaults(task, kind, strategy, 64, cuda=False)["activation_checkpointing"] is False
    assert training_defaults("instruction", "causal", "lora", 64, cuda=True)["activation_checkpointing"] is False
    lora = training_defaults("instruction", "causal", "lora", 64, cuda=False)
    assert lora["activation_checkpointing"] is True
    assert lora["activation_checkpointing_kwargs"] == {"use_reentrant": True}


@pytest.mark.parametrize("given, expected", [({}, True), ({"gradient_checkpointing": False}, False),
                                             ({"activation_checkpointing": False}, False),
                                             ({"gradient_checkpointing": True}, True)])
def test_old_gradient_checkpointing_name_still_wins_over_our_default(tmp_path, given, expected):
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing; a config with the old
    name must not be silently overridden by our default under the new one."""
    from finetune_core.training_args import resolve_training_args

    import warnings

    cfg = config_from_dict({"task": "instruction", "strategy": {"name": "lora"}, "training": given})
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)        # passed on under the new name: no rename warning
        args, _ = resolve_training_args(cfg, "causal", 64, tmp_path / "ckpt", notes)
    assert args.activation_checkpointing is expected
    assert any("gradient_checkpointing is called activation_checkpointing" in n for n in notes) == \
        ("gradient_checkpointing" in given)


# ---------------------------------------------------------------------------------------------
# --set overrides: YAML scalars


@pytest.mark.parametrize("raw, expected", [
    ("null", None), ("~", None), ("", None), ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-4", 1e-4), ("2E-5", 2e-5),
    ("5.0e-5", 5e-5), ("true", True), ("false", False), ("lora", "lora"), ("[q, v]", ["q", "v"]),
    ("a=b", "a=b"), ("all", "all"),
])
def test_override_values_are_yaml_scalars(raw, expected):
    keys, value = parse_override(f"a.b={raw}")
    assert keys == ["a", "b"]
    assert value == expected and type(value) is type(expected)


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ConfigError, match="--set key.sub=value"):
        parse_override("training.num_train_epochs")


def test_overrides_apply_to_nested_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: classification\nmodel: bundled:minilm-l6\ndata:\n  train: x.csv\n"
                    "strategy:\n  name: lora\ntraining:\n  learning_rate: 2e-5\n", encoding="utf-8")
    cfg = load_config(path, ["strategy.name=frozen", "strategy.frozen_layers=3", "data.validation=null",
                             "training.num_train_epochs=2", "strategy.lora.target_modules=[query, value]",
                             "data.max_length=64", "seed=7", "strategy.cache_features=false"])
    assert cfg.strategy.name == "frozen" and cfg.strategy.frozen_layers == 3
    assert cfg.training == {"learning_rate": 2e-5, "num_train_epochs": 2}   # 2e-5 in YAML is a float
    assert isinstance(cfg.training["learning_rate"], float)
    assert cfg.strategy.lora.target_modules == ["query", "value"]
    assert cfg.data.max_length == 64 and cfg.seed == 7 and cfg.strategy.cache_features is False
    assert cfg.data.validation is None
    values = apply_overrides({}, ["data.train=a.csv"])
    assert values == {"data": {"train": "a.csv"}}


def test_override_with_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="Did you mean 'num_train_epochs'"):
        load_config(None, ["training.num_train_epoch=3"])


# ---------------------------------------------------------------------------------------------
# validation: every bad value named with a fix


@pytest.mark.parametrize("values, fragment", [
    ({"task": "clasification"}, "Did you mean 'classification'"),
    ({"task": "summarize"}, "Unknown task"),
    ({"model": ""}, "No model"),
    ({"strategy": {"name": "lorra"}}, "Did you mean 'lora'"),
    ({"strategy": {"name": "frozen", "frozen_layers": -1}}, "frozen_layers"),
    ({"strategy": {"name": "frozen", "frozen_layers": "some"}}, "frozen_layers"),
    ({"strategy": {"cache_features": "sometimes"}}, "cache_features"),
    ({"strategy": {"lora": {"r": 0}}}, "lora.r"),
    ({"strategy": {"lora": {"alpha": -1}}}, "lora.alpha"),
    ({"strategy": {"lora": {"dropout": 1.0}}}, "lora.dropout"),
    ({"data": {"template": "chatml"}}, "Did you mean 'chat'"),
    ({"data": {"val_size": 0}}, "val_size"),
    ({"data": {"val_size": 1.5}}, "val_size"),
    ({"data": {"max_length": 8}}, "max_length"),
    ({"data": {"max_length": "long"}}, "max_length"),
    ({"training": [1, 2]}, "'training' must be a mapping"),
    ({"data": "file.csv"}, "'data' must be a mapping"),
    ({"seed": "abc"}, "seed"),
    # YAML `true` is an int to isinstance(); it is never a layer count, rank, length or seed
    ({"strategy": {"name": "frozen", "frozen_layers": True}}, "frozen_layers"),
    ({"strategy": {"lora": {"r": True}}}, "lora.r"),
    ({"strategy": {"lora": {"alpha": True}}}, "lora.alpha"),
    ({"data": {"max_length": True}}, "max_length"),
    ({"seed": False}, "seed"),
])
def test_invalid_values_are_refused_with_a_fix(values, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    assert fragment in str(err.value)
    assert err.value.fix, "every config error carries a fix"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert isinstance(load_config(empty), RunConfig)


def test_errors_are_one_paragraph_problem_then_fix():
    err = FinetuneError("Something is wrong.", "Do this.")
    assert str(err) == "Something is wrong. Do this." and "\n" not in str(err)
    assert issubclass(ConfigError, FinetuneError)


# ---------------------------------------------------------------------------------------------
# dump / round trip / secrets


def test_dump_round_trips_and_drops_secrets(tmp_path):
    cfg = config_from_dict({"task": "instruction", "model": "bundled:smollm2-135m",
                            "data": {"train": "d.jsonl", "template": "alpaca"},
                            "strategy": {"name": "frozen", "frozen_layers": 3},
                            "training": {"learning_rate": 1e-4, "hub_token": "hf_secret", "max_steps": 5}})
    path = tmp_path / "run.yaml"
    text = dump_config(cfg, path)
    assert "hf_secret" not in text and "hub_token" not in text
    again = load_config(path)
    assert again.strategy.frozen_layers == 3 and again.training == {"learning_rate": 1e-4, "max_steps": 5}
    assert config_to_dict(again)["data"] == config_to_dict(cfg)["data"]
    assert yaml.safe_load(text)["task"] == "instruction"


def test_validate_returns_config():
    cfg = RunConfig()
    assert validate(cfg) is cfg


@pytest.mark.parametrize("targets", [[], 5, [1, "q_proj"], ""])
def test_lora_target_modules_type_is_checked(targets):
    with pytest.raises(ConfigError, match="target_modules"):
        config_from_dict({"strategy": {"lora": {"target_modules": targets}}})


@pytest.mark.parametrize("rows, kind, pick", [(60, "encoder", "frozen"), (499, "encoder", "frozen"),
                                              (500, "encoder", "full"), (5000, "encoder", "full"),
                                              (9000, "encoder", "full"), (60, "causal", "lora"),
                                              (9000, "causal", "lora")])
def test_cheat_sheet_picks_the_strategy_by_rows_and_model_kind(rows, kind, pick):
    from finetune_core.config import FREEZE_BELOW, FULL_UP_TO, STRATEGY_CHEAT_SHEET, recommended_strategy

    strategy, why = recommended_strategy(rows, kind, strong="**")
    assert strategy == pick and why.count("**") == 2
    assert "**" not in recommended_strategy(rows, kind)[1]
    assert f"under {FREEZE_BELOW} rows" in STRATEGY_CHEAT_SHEET and f"{FULL_UP_TO:,} rows" in STRATEGY_CHEAT_SHEET


def test_mean_pooling_head_only_for_head_only_classification_on_an_encoder():
    from finetune_core.config import uses_mean_pooling_head

    assert uses_mean_pooling_head("classification", "frozen", "all", "encoder")
    assert not uses_mean_pooling_head("classification", "frozen", "all", "causal")
    assert not uses_mean_pooling_head("classification", "frozen", 2, "encoder")
    assert not uses_mean_pooling_head("classification", "lora", "all", "encoder")
    assert not uses_mean_pooling_head("instruction", "frozen", "all", "encoder")
