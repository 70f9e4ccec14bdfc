"""The Train form's table (finetune_core/ui/form.py) and the handler binding (ui/common.bind): what a
control's value becomes in the RunConfig, and what gradio sees of a bound handler."""

from __future__ import annotations

import inspect
import typing

import gradio as gr
import pytest

from finetune_core.errors import ConfigError, FinetuneError
from finetune_core.ui import form
from finetune_core.ui.common import bind


def config(**values):
    return form.form_to_config(dict(form.DEFAULTS, **values), "data.csv")


def test_each_field_lands_at_its_config_path():
    cfg = config(model=" bundled:minilm-l6 ", strategy="lora", lora_r=16, lora_alpha=32, lora_dropout=0.1,
                 lora_targets="q_proj; v_proj", max_length=64, val_size=0.25, num_train_epochs=3.0,
                 learning_rate=2e-4, batch_size=8.0, early_stopping_patience=0, text_column=" body ")
    assert (cfg.task, cfg.model, cfg.data.train) == ("classification", "bundled:minilm-l6", "data.csv")
    assert (cfg.data.text_column, cfg.data.label_column) == ("body", None)      # blank: detected at run time
    assert (cfg.data.max_length, cfg.data.val_size) == (64, 0.25)
    lora = cfg.strategy.lora
    assert (cfg.strategy.name, lora.r, lora.alpha, lora.dropout, lora.target_modules) == \
        ("lora", 16, 32, 0.1, ["q_proj", "v_proj"])
    assert cfg.training == {"num_train_epochs": 3, "learning_rate": 2e-4, "per_device_train_batch_size": 8,
                            "early_stopping_patience": 0}
    assert isinstance(cfg.training["num_train_epochs"], int)


@pytest.mark.parametrize("fmt,expected", [
    ("alpaca", {"instruction_column": "p", "input_column": "i", "output_column": "r"}),
    ("prompt_completion", {"prompt_column": "p", "completion_column": "r"}),
    ("messages", {"messages_column": "p"}),
])
def test_instruction_columns_follow_the_format(fmt, expected):
    cfg = config(task="instruction", instruction_format=fmt, prompt_column="p", input_column="i",
                 response_column="r", text_column="ignored", label_column="ignored")
    columns = ("text_column", "label_column", "instruction_column", "input_column", "output_column",
               "prompt_column", "completion_column", "messages_column")
    assert {c: getattr(cfg.data, c) for c in columns if getattr(cfg.data, c)} == expected


def test_empty_or_zero_hyperparameters_mean_the_recommended_value():
    for empty in (None, "", 0, -1):
        cfg = config(num_train_epochs=empty, learning_rate=empty, batch_size=empty)
        assert cfg.training == {"early_stopping_patience": 2}
    assert "early_stopping_patience" not in config(early_stopping_patience=None).training
    with pytest.raises(ConfigError, match="early_stopping_patience must be 0 \\(off\\) or more"):
        config(early_stopping_patience=-1)


def test_the_validation_upload_becomes_data_validation(tmp_path):
    upload = tmp_path / "valid.csv"
    upload.write_text("text,label\nhi,a\n")
    assert config(validation_file=str(upload)).data.validation == str(upload)
    assert config(validation_file=None).data.validation is None           # none: Start splits val_size off
    assert config(validation_file="").data.validation is None
    with pytest.raises(FinetuneError, match="validation file is no longer on the server"):
        config(validation_file=str(tmp_path / "expired.csv"))
    with pytest.raises(ConfigError, match="not allowed in the app"):     # a server path typed as an override
        config(overrides=f"data.validation={upload}")


def test_head_only_decides_the_frozen_blocks():
    assert config(strategy="frozen", head_only=True, frozen_layers=4).strategy.frozen_layers == "all"
    assert config(strategy="frozen", head_only=False, frozen_layers=4).strategy.frozen_layers == 4
    assert form.read(dict(form.DEFAULTS, head_only=False, frozen_layers=2), "strategy.frozen_layers") == 2
    # read() casts only the field asked for: a bad value elsewhere does not matter
    assert form.read(dict(form.DEFAULTS, early_stopping_patience=-5), "strategy.lora.r") == 8


def test_overrides_apply_last_and_refuse_server_paths():
    cfg = config(learning_rate=1e-3, overrides="learning_rate=5e-4\nstrategy.lora.r=4\n--set seed=3")
    assert (cfg.training["learning_rate"], cfg.strategy.lora.r, cfg.seed) == (5e-4, 4, 3)
    for key in ("output_dir=/tmp/x", "data.train=/etc/passwd", "push_to_hub=true", "hub_token=x"):
        with pytest.raises(ConfigError, match="not allowed in the app"):
            config(overrides=key)
    with pytest.raises(ConfigError, match="has no '='"):
        config(overrides="max_steps 3")


def test_the_table_is_the_train_endpoints_signature():
    def train(ctx, values, owner_state=None, request: gr.Request = None):
        yield ctx, values, owner_state, request

    handler = form.bind_form("CTX", train)
    params = inspect.signature(handler).parameters
    assert list(params) == [*form.NAMES, "owner_state", "request"]
    assert {n: params[n].default for n in form.NAMES} == form.DEFAULTS
    assert handler.__name__ == "train" and inspect.isgeneratorfunction(handler)
    assert typing.get_type_hints(handler) == {"request": gr.Request}     # gradio fills it in
    ctx, values, owner, request = next(handler(None, "domains.csv", owner_state="me"))
    assert ctx == "CTX" and owner == "me" and request is None
    assert values == dict(form.DEFAULTS, data_file=None)

    def audit(ctx, values, model="", request: gr.Request = None):
        return values, model

    part = form.bind_form("CTX", audit, form.DATA_FIELDS)
    assert list(inspect.signature(part).parameters) == [*form.DATA_FIELDS, "model", "request"]
    assert part(task="instruction", model="m") == ({**{n: form.DEFAULTS[n] for n in form.DATA_FIELDS},
                                                    "task": "instruction"}, "m")
    # `later` fields follow fn's own parameters, in the order given, and reach fn in the form
    later = form.bind_form("CTX", audit, form.DATA_FIELDS, later=form.AUDIT_LATER_FIELDS)
    assert list(inspect.signature(later).parameters) == [*form.DATA_FIELDS, "model", "request",
                                                         *form.AUDIT_LATER_FIELDS]
    assert form.AUDIT_LATER_FIELDS[0] == "validation_file" and form.NAMES[-1] == "validation_file"
    values, model = later(*[form.DEFAULTS[n] for n in form.DATA_FIELDS], "m", None, "v.csv", 0.3)
    assert model == "m" and (values["validation_file"], values["val_size"], values["overrides"]) == ("v.csv", 0.3, "")


def test_bind_drops_the_context_and_keeps_what_gradio_reads():
    def refresh(ctx, current, owner_state, request: gr.Request, prefer=None):
        """Doc."""
        return ctx, current, owner_state, request, prefer

    handler = bind("CTX", refresh)
    assert (handler.__name__, handler.__doc__) == ("refresh", "Doc.")
    assert list(inspect.signature(handler).parameters) == ["current", "owner_state", "request", "prefer"]
    assert typing.get_type_hints(handler) == {"request": gr.Request}
    assert not inspect.isgeneratorfunction(handler)
    assert handler("a", "b", None) == ("CTX", "a", "b", None, None)


def test_a_preference_form_leaves_the_pairs_columns_to_detection():
    import pandas as pd

    from finetune_core.ui.common import EXAMPLES, TASK_CHOICES
    from finetune_core.ui.data_tab import guess_task

    cfg = config(task="preference", model="bundled:smollm2-135m", prompt_column="p", text_column="t")
    assert (cfg.task, cfg.data.prompt_column, cfg.data.text_column, cfg.data.chosen_column) == \
        ("preference", None, None, None)
    assert "preference" in [value for _, value in TASK_CHOICES]
    assert EXAMPLES["preference_pairs.jsonl"][1] == "preference"
    assert guess_task(pd.DataFrame([{"prompt": "q", "chosen": "a", "rejected": "b"}])) == "preference"
    assert guess_task(pd.DataFrame([{"prompt": "q", "completion": "a"}])) == "instruction"
