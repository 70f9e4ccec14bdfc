"""The Train form: one table mapping each control to its place in the run's config.

    from finetune_core.ui import form
    values = dict(form.DEFAULTS, task="classification", strategy="frozen")   # {field name: value}
    cfg = form.form_to_config(values, train_file="examples/data/domains.csv")   # a validated RunConfig
    form.read(values, "strategy.frozen_layers")                                 # 'all': one key only

The form spans the Data tab (data source, task, columns, max_length, validation file) and the Train
tab (model, strategy, hyperparameters, overrides). Its fields, in this order, are the `train`
endpoint's parameters for gradio_client (names and defaults), the inputs of Start, Show command,
Recommend and the parameter count, and the initial values of the controls.

Adding a control: create the component as `ui.<name>` with `value=form.DEFAULTS["<name>"]` in its
tab's build(), and add one Field row to its tab's part below (DATA_FORM or TRAIN_FORM: name, config
path, default, cast). Every form handler receives it from then on; the row decides where its value
lands in the config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig, apply_overrides, config_from_dict, config_to_dict
from ..errors import ConfigError, DataError
from .common import as_handler

RECOMMENDED = object()      # a cast's answer for "empty": the key stays out, train() fills the recommended value
TOP_LEVEL_KEYS = {"task", "model", "data", "strategy", "training", "seed"}
# Overrides a shared app refuses: paths on the server, pushing with the server's token, other loggers.
BLOCKED_OVERRIDES = ("output_dir", "resume", "data.train", "data.validation", "training.output_dir",
                     "training.logging_dir", "training.push_to_hub", "training.hub_", "training.report_to",
                     "training.deepspeed", "training.resume_from_checkpoint", "training.fsdp_config")
INSTRUCTION_FORMATS = ("alpaca", "prompt_completion", "messages")


# ---------------------------------------------------------------------------------------------
# casts: the control's value -> the config's value (each gets the whole form: a few read a neighbour)


def keep(value, form: dict):
    return value


def whole(value, form: dict) -> int:
    return int(value)


def real(value, form: dict) -> float:
    return float(value)


def stripped(value, form: dict) -> str:
    return (value or "").strip()


def column(value, form: dict) -> str | None:
    """A column picker: blank = let the engine detect the column."""
    text = "" if value is None else str(value).strip()
    return text or None


def max_length(value, form: dict) -> int:
    return int(value or 256)


def val_size(value, form: dict) -> float:
    return float(value or 0.2)


def validation_upload(value, form: dict):
    """The optional validation upload: its path on the server; empty = Start splits val_size off the
    training data (the key stays out)."""
    if not value:
        return RECOMMENDED
    path = Path(value if isinstance(value, str) else getattr(value, "name", value))
    if not path.is_file():
        raise DataError("The uploaded validation file is no longer on the server.",
                        "Upload it again, or clear it to split validation off the training data.")
    return str(path)


def frozen_blocks(value, form: dict) -> str | int:
    """'all' while 'Freeze the whole backbone' is ticked (only the head trains), else the slider's N."""
    return "all" if form["head_only"] else int(value or 0)


def lora_targets(value, form: dict):
    text = (value or "auto").strip()
    if text in ("auto", "all-linear"):
        return text
    names = [t.strip() for t in text.replace(";", ",").split(",") if t.strip()]
    return names or "auto"


def _positive(value, cast):
    """A hyperparameter box: empty, or 0 and less (the browser sends an empty number box as 0), means
    the recommended value."""
    if value in (None, ""):
        return RECOMMENDED
    number = cast(value)
    return number if number > 0 else RECOMMENDED


def epochs(value, form: dict):
    number = _positive(value, float)
    return int(number) if number is not RECOMMENDED and number == int(number) else number


def learning_rate(value, form: dict):
    return _positive(value, float)


def batch_size(value, form: dict):
    return _positive(value, int)


def patience(value, form: dict):
    """Early stopping patience: empty = recommended, 0 = off, negative = refused."""
    if value in (None, ""):
        return RECOMMENDED
    number = int(value)
    if number < 0:
        raise ConfigError(f"early_stopping_patience must be 0 (off) or more, got {value}.", "Typical: 2.")
    return number


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Field:
    """One control of the form.

    name: the component's attribute on `ui` and the `train` endpoint's parameter.
    path: where the value goes in the config ("strategy.lora.r"); a dict picks the path by the
        instruction format; None for controls that no single key holds (their rule is in the comment).
    default: the API default and the control's initial value.
    cast: (value, form) -> config value, RECOMMENDED to leave the key out, or a ConfigError.
    task: the field applies to this task only.
    """
    name: str
    path: str | dict | None
    default: Any
    cast: Callable = keep
    task: str | None = None

    def config_path(self, form: dict) -> str | None:
        if self.task and form.get("task", "classification") != self.task:
            return None
        if isinstance(self.path, dict):
            fmt = form.get("instruction_format") or "alpaca"
            return self.path.get(fmt if fmt in INSTRUCTION_FORMATS else "alpaca")
        return self.path


# The Data tab's controls: they are also the `audit` endpoint's first parameters.
DATA_FORM = (
    # the data source: resolved to data.train by data_source.resolve_data (upload, else Hub, else example)
    Field("data_file", None, None),
    Field("example", None, "domains.csv"),
    Field("hub_dataset", None, ""),
    Field("hub_split", None, "train"),
    Field("task", "task", "classification"),
    Field("text_column", "data.text_column", "", column, task="classification"),
    Field("label_column", "data.label_column", "", column, task="classification"),
    Field("instruction_format", None, "alpaca"),        # picks the paths of the three columns below
    Field("prompt_column", {"alpaca": "data.instruction_column", "prompt_completion": "data.prompt_column",
                            "messages": "data.messages_column"}, "", column, task="instruction"),
    Field("input_column", {"alpaca": "data.input_column"}, "", column, task="instruction"),
    Field("response_column", {"alpaca": "data.output_column", "prompt_completion": "data.completion_column"},
          "", column, task="instruction"),
    Field("max_length", "data.max_length", 256, max_length),
)
# The Train tab's controls.
TRAIN_FORM = (
    Field("model", "model", "bundled:minilm-l6", stripped),
    Field("strategy", "strategy.name", "lora"),
    Field("head_only", None, True),                      # read by frozen_layers: ticked = 'all'
    Field("frozen_layers", "strategy.frozen_layers", 3, frozen_blocks),
    Field("lora_r", "strategy.lora.r", 8, whole),
    Field("lora_alpha", "strategy.lora.alpha", 16),
    Field("lora_dropout", "strategy.lora.dropout", 0.05, real),
    Field("lora_targets", "strategy.lora.target_modules", "auto", lora_targets),
    Field("num_train_epochs", "training.num_train_epochs", None, epochs),
    Field("learning_rate", "training.learning_rate", None, learning_rate),
    Field("batch_size", "training.per_device_train_batch_size", None, batch_size),
    Field("early_stopping_patience", "training.early_stopping_patience", 2, patience),
    Field("val_size", "data.val_size", 0.2, val_size),
    Field("overrides", None, ""),                        # key=value lines, applied last (parse_overrides)
)
# The Data tab's validation upload. Last in the table (the `train` endpoint's last parameter) and, in
# `audit`, after `model`: a caller passing the other parameters by position is unaffected.
VALIDATION_FORM = (
    Field("validation_file", "data.validation", None, validation_upload),
)
FIELDS = DATA_FORM + TRAIN_FORM + VALIDATION_FORM        # in this order: the `train` endpoint's parameters
NAMES = tuple(f.name for f in FIELDS)
DEFAULTS = {f.name: f.default for f in FIELDS}
DATA_FIELDS = tuple(f.name for f in DATA_FORM)
# The `audit` endpoint's parameters: DATA_FIELDS, `model`, then these, which decide the validation data
# Start uses (the file, else the split of val_size with the run's seed, an override `seed=...`).
AUDIT_LATER_FIELDS = ("validation_file", "val_size", "overrides")
SOURCE = ("data_file", "example", "hub_dataset", "hub_split")      # resolve_data's arguments
SETTINGS = tuple(name for name in NAMES if name not in SOURCE)    # what Recommend and the count read


def source(form: dict) -> dict:
    """The data source fields as data_source.resolve_data's keyword arguments."""
    return {name: form.get(name, DEFAULTS[name]) for name in SOURCE}


def components(ui, names=NAMES) -> list:
    """The form's components, in the table's order (the inputs of every form handler)."""
    return [getattr(ui, name) for name in names]


# ---------------------------------------------------------------------------------------------
# form -> config


def config_values(form: dict, names=NAMES) -> dict:
    """{config path: value} of the fields that apply to this form (its task and instruction format)."""
    form = dict(DEFAULTS, **form)
    out = {}
    for f in FIELDS:
        path = f.config_path(form) if f.name in names else None
        if path is not None:
            value = f.cast(form[f.name], form)
            if value is not RECOMMENDED:
                out[path] = value
    return out


def read(form: dict, path: str):
    """The value the form gives one config path (None when no field applies or it is left empty).
    Only that field's cast runs: a bad value elsewhere in the form does not matter here."""
    form = dict(DEFAULTS, **form)
    for f in FIELDS:
        if f.config_path(form) == path:
            value = f.cast(form[f.name], form)
            return None if value is RECOMMENDED else value
    return None


def parse_overrides(text: str | None) -> list[str]:
    """`key=value` lines (or `--set key=value`); keys without a section go under training."""
    items = []
    for raw in (text or "").replace(";", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--set"):
            line = line[5:].strip()
        if "=" not in line:
            raise ConfigError(f"Override '{line}' has no '='.",
                              "Write one key=value per line, e.g. max_steps=20 or strategy.lora.r=16.")
        key, value = line.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"Override '{line}' has no key before the '='.",
                              "Write one key=value per line, e.g. max_steps=20 or strategy.lora.r=16.")
        if key.split(".")[0] not in TOP_LEVEL_KEYS | {"output_dir", "resume"}:
            key = "training." + key
        for blocked in BLOCKED_OVERRIDES:
            if key == blocked or (blocked.endswith("_") and key.startswith(blocked)) or key.startswith(blocked + "."):
                raise ConfigError(f"The override '{key}' is not allowed in the app.",
                                  "Pick data in the Data tab and export models in the Export tab; the CLI "
                                  "accepts every key.")
        items.append(f"{key}={value.strip()}")
    return items


def form_to_config(form: dict, train_file: str | Path | None = None) -> RunConfig:
    """The RunConfig the form describes: every applying field at its path, `train_file` as data.train,
    then the overrides. Empty hyperparameters stay out (train() fills the recommended values).
    Raises ConfigError naming a bad value and its fix."""
    cfg = config_to_dict(RunConfig())
    for path, value in config_values(form).items():
        *sections, key = path.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[key] = value
    cfg["data"]["train"] = None if train_file is None else str(train_file)
    return config_from_dict(apply_overrides(cfg, parse_overrides(form.get("overrides"))))


# ---------------------------------------------------------------------------------------------
# handlers of the whole form


PARAMETERS = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default) for f in FIELDS]


def bind_form(ctx, fn, names=NAMES, later=()):
    """`fn(ctx, form, *rest)` as the gradio handler of the form's components, then `rest`, then `later`.

    Its parameters are the fields' names and defaults in the table's order (what gradio_client shows
    for the `train` endpoint), then fn's own after `form` (which need defaults: they follow the
    fields'), then the `later` fields (an endpoint's parameters added after fn's own, as `audit`'s
    AUDIT_LATER_FIELDS). The handler collects all the fields into the `form` dict it passes on.
    """
    rest = list(inspect.signature(fn).parameters.values())[2:]
    fields = [p for p in PARAMETERS if p.name in names]
    after = [next(p for p in PARAMETERS if p.name == name) for name in later]
    signature = inspect.Signature(fields + rest + after)
    collected = [p.name for p in fields + after]

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        values = {name: given.pop(name) for name in collected}
        return fn(ctx, values, **given)

    return as_handler(fn, signature, call)

