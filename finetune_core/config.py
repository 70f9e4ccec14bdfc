"""Run configuration: one dataclass family, the same field names in YAML, CLI `--set` and the app.

    cfg = load_config("examples/configs/classification_lora.yaml", ["training.num_train_epochs=3"])
    cfg.strategy.name            # 'lora'
    dump_config(cfg, "run.yaml")

`training:` is a free-form dict of `transformers.TrainingArguments` fields (plus
`early_stopping_patience`); `training_defaults()` fills what the user left out with the article's
best practices for this task, model kind and strategy; `recommended_strategy()` is the article's
cheat sheet. The app imports this module at start-up: torch and transformers load only inside the
functions that need them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

TASKS = ("classification", "instruction", "preference")
GENERATIVE_TASKS = ("instruction", "preference")     # their models answer prompts (chat, GGUF, generations)
STRATEGIES = ("full", "frozen", "lora")
TEMPLATES = ("auto", "alpaca", "chat")
# Keys of `training:` that are ours, not TrainingArguments fields.
EXTRA_TRAINING_KEYS = ("early_stopping_patience",)


@dataclass
class DataConfig:
    train: str | None = None
    validation: str | None = None       # a file, or None to split `train`
    val_size: float = 0.2               # stratified for classification
    text_column: str | None = None      # classification; None = detect (text, sentence, ...)
    label_column: str | None = None     # None = detect (label, category, ...)
    instruction_column: str | None = None
    input_column: str | None = None
    output_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    messages_column: str | None = None
    chosen_column: str | None = None    # preference: the better answer (prompt_column: the prompt)
    rejected_column: str | None = None  # preference: the worse answer
    template: str = "auto"              # auto | alpaca | chat
    max_length: int = 256


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Any = "auto"        # "auto", "all-linear" or a list of module names


@dataclass
class StrategyConfig:
    name: str = "lora"                  # full | frozen | lora
    frozen_layers: Any = "all"          # N = embeddings + first N blocks frozen; all = head only
    cache_features: Any = "auto"        # frozen head-only: run the frozen encoder once, reuse its outputs
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class RunConfig:
    task: str = "classification"
    model: str = "bundled:minilm-l6"
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    training: dict = field(default_factory=dict)
    output_dir: str = "runs/run"
    seed: int = 42
    resume: bool = False                # continue from the last checkpoint in output_dir


# ---------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; people mean the float (YAML 1.2).


class _YamlLoader(yaml.SafeLoader):
    pass


_YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
                                  list("-+.0123456789"))


def yaml_load(text: str):
    """yaml.safe_load that also reads 1e-4 and 2E5 as floats."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def _is_int(value) -> bool:
    """A whole number, but not a boolean (YAML `true` is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _build(cls, values: dict, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys to values, got {type(values).__name__}.",
                          "Indent its keys under it in the YAML file.")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"Unknown config key '{path}'.{_closest(key, names)}",
                              f"Valid keys here: {', '.join(names)}.")
        nested = _NESTED.get((cls, key))
        kwargs[key] = _build(nested, value, f"{where}.{key}" if where else key) if nested else value
    return cls(**kwargs)


_NESTED = {(RunConfig, "data"): DataConfig, (RunConfig, "strategy"): StrategyConfig,
           (StrategyConfig, "lora"): LoraSettings}


def config_from_dict(values: dict) -> RunConfig:
    cfg = _build(RunConfig, values or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"Override '{item}' has no '='.", "Write overrides as --set key.sub=value, "
                          "for example --set training.num_train_epochs=3.")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"Override '{item}' has no key before the '='.", "Write overrides as --set key.sub=value, "
                          "for example --set training.num_train_epochs=3.")
    return keys, value


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """Apply `a.b=c` strings to a nested dict; values are YAML scalars (null, 3, 1e-4, true, [a, b])."""
    for item in overrides or []:
        keys, value = parse_override(item)
        node = values
        for depth, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                where = ".".join(keys[:depth + 1])
                raise ConfigError(f"Override '{item}': '{where}' is a value ({node!r}), not a section with keys.",
                                  f"Set it directly with --set {where}=..., or check the key's spelling.")
        node[keys[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"Config file '{p}' does not exist.",
                              "Check the path; example configs are in examples/configs/.")
        try:
            values = yaml_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"Config file '{p}' is not valid YAML{where}: {what}.",
                              "Fix the indentation or quoting at the position shown.") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"Config file '{p}' must contain a mapping (key: value lines).",
                              "See examples/configs/ for the layout.")
    return config_from_dict(apply_overrides(values, overrides))


SECRET_WORDS = ("token", "password", "secret", "api_key")


def public_dict(cfg: RunConfig) -> dict:
    """The config without secrets (hub tokens never reach run.yaml, model cards or zips)."""
    values = config_to_dict(cfg)
    values["training"] = {k: v for k, v in values["training"].items()
                          if not any(w in k.lower() for w in SECRET_WORDS)}
    return values


def dump_config(cfg: RunConfig, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(public_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------
# validation


def _training_arg_names(task: str = "classification") -> set[str]:
    """The `training:` keys a task's arguments class takes (preference: TRL's DPOConfig, a
    TrainingArguments with beta, precompute_ref_log_probs, ...)."""
    if task == "preference":
        from trl import DPOConfig

        return {f.name for f in dataclasses.fields(DPOConfig)}
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def validate(cfg: RunConfig) -> RunConfig:
    if cfg.task not in TASKS:
        raise ConfigError(f"Unknown task '{cfg.task}'.{_closest(str(cfg.task), TASKS)}",
                          f"Use one of: {', '.join(TASKS)}.")
    if not isinstance(cfg.model, str) or not cfg.model.strip():
        raise ConfigError("No model given.", "Set model: to bundled:minilm-l6, bundled:smollm2-135m, "
                          "a hub id or a local model directory.")
    s = cfg.strategy
    if s.name not in STRATEGIES:
        raise ConfigError(f"Unknown strategy '{s.name}'.{_closest(str(s.name), STRATEGIES)}",
                          f"Use one of: {', '.join(STRATEGIES)}.")
    if not (s.frozen_layers == "all" or (_is_int(s.frozen_layers) and s.frozen_layers >= 0)):
        raise ConfigError(f"strategy.frozen_layers must be 'all' or a whole number >= 0, got {s.frozen_layers!r}.",
                          "Use all (only the new head trains) or N (embeddings + first N blocks frozen).")
    if s.cache_features not in ("auto", True, False):
        raise ConfigError(f"strategy.cache_features must be auto, true or false, got {s.cache_features!r}.",
                          "Use auto unless you are measuring its effect.")
    lora = s.lora
    if not _is_int(lora.r) or lora.r <= 0:
        raise ConfigError(f"strategy.lora.r must be a positive whole number, got {lora.r!r}.", "Typical: 8 or 16.")
    if not _is_number(lora.alpha) or lora.alpha <= 0:
        raise ConfigError(f"strategy.lora.alpha must be positive, got {lora.alpha!r}.", "Typical: 2 x r.")
    if not _is_number(lora.dropout) or not 0 <= lora.dropout < 1:
        raise ConfigError(f"strategy.lora.dropout must be in [0, 1), got {lora.dropout!r}.", "Typical: 0.05.")
    targets = lora.target_modules
    if not (isinstance(targets, str) and targets.strip()) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"strategy.lora.target_modules must be auto, all-linear or a list of module names, "
                          f"got {targets!r}.", "For example: target_modules: [q_proj, v_proj], or auto.")
    d = cfg.data
    if d.template not in TEMPLATES:
        raise ConfigError(f"Unknown data.template '{d.template}'.{_closest(str(d.template), TEMPLATES)}",
                          f"Use one of: {', '.join(TEMPLATES)}.")
    if not _is_number(d.val_size) or not 0 < d.val_size < 1:
        raise ConfigError(f"data.val_size must be a fraction between 0 and 1, got {d.val_size!r}.",
                          "Typical: 0.2 (20% of the rows are held out for validation).")
    if not _is_int(d.max_length) or d.max_length < 16:
        raise ConfigError(f"data.max_length must be a whole number >= 16, got {d.max_length!r}.",
                          "Typical: 128 to 512 tokens.")
    if cfg.training is None:
        cfg.training = {}          # `training:` with nothing under it is YAML null: no overrides
    if not isinstance(cfg.training, dict):
        raise ConfigError("'training' must be a mapping of TrainingArguments fields.",
                          "For example: training: {num_train_epochs: 3, learning_rate: 2e-5}.")
    for key, value in list(cfg.training.items()):
        # YAML 1.1 reads a bare `no` as False: `eval_strategy: no` means the string "no".
        if key.endswith("_strategy") and value is False:
            cfg.training[key] = "no"
    valid = _training_arg_names(cfg.task) | set(EXTRA_TRAINING_KEYS)
    renamed = {"evaluation_strategy": "eval_strategy", "warmup_ratio": "warmup_steps",
               "group_by_length": "train_sampling_strategy", "tokenizer": "processing_class"}
    for key in cfg.training:
        if key not in valid:
            hint = (f" transformers 5 renamed it to '{renamed[key]}'." if key in renamed
                    else _closest(key, valid))
            raise ConfigError(f"Unknown training option 'training.{key}'.{hint}",
                              "training: accepts any transformers.TrainingArguments field plus "
                              "early_stopping_patience.")
    _validate_training_values(cfg.training)
    if not _is_int(cfg.seed):
        raise ConfigError(f"seed must be a whole number, got {cfg.seed!r}.", "For example: seed: 42.")
    return cfg


# training: values TrainingArguments would accept but that fail (or silently do nothing) later.
# key -> (kind, minimum, strict, example); kind "int" = whole number, "number" = int or float.
_TRAINING_RANGES = {
    "learning_rate": ("number", 0, True, None),                # the defaults: _learning_rate_hint()
    "num_train_epochs": ("number", 0, True, None),             # the defaults: _epochs_hint()
    "per_device_train_batch_size": ("int", 1, False, "Typical: 8 to 32."),
    "per_device_eval_batch_size": ("int", 1, False, "Typical: 32."),
    "gradient_accumulation_steps": ("int", 1, False, "Typical: 1 to 8."),
    "weight_decay": ("number", 0, False, "Typical: 0.01."),
    "warmup_steps": ("number", 0, False, "A float below 1 is a ratio (0.1), a whole number a step count."),
    "max_grad_norm": ("number", 0, False, "Typical: 1.0."),
    "logging_steps": ("number", 0, True, "Typical: 10."),
    "eval_steps": ("number", 0, True, "Typical: 50."),
    "save_steps": ("number", 0, True, "Typical: 50."),
    "max_steps": ("int", None, False, "A positive step count, or -1 to train num_train_epochs."),
    "save_total_limit": ("int", 0, False, "Typical: 2."),
    "early_stopping_patience": ("int", 0, False, "Typical: 2 evaluations without improvement; 0 turns it off."),
}


def _short(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def _learning_rate_hint() -> str:
    """The learning rates a run uses by default (default_learning_rate), so the advice never drifts."""
    lr = default_learning_rate
    return (f"The defaults: full {_short(lr('classification', 'encoder', 'full'))} (encoder), "
            f"{_short(lr('instruction', 'causal', 'full'))} (instruction); "
            f"frozen head {_short(lr('classification', 'encoder', 'frozen'))} (encoder); "
            f"LoRA {_short(lr('classification', 'encoder', 'lora'))} (encoder), "
            f"{_short(lr('instruction', 'causal', 'lora'))} (causal LM).")


def _epochs_hint() -> str:
    cls = training_defaults("classification", "encoder", "full", 100, cuda=False)["num_train_epochs"]
    ins = training_defaults("instruction", "causal", "full", 100, cuda=False)["num_train_epochs"]
    return f"The defaults: {cls} (classification, with early stopping), {ins} (instruction)."


def _validate_training_values(training: dict) -> None:
    hints = {"learning_rate": _learning_rate_hint, "num_train_epochs": _epochs_hint}
    for key, (kind, minimum, strict, example) in _TRAINING_RANGES.items():
        example = example or hints[key]()
        value = training.get(key)
        if value is None:
            continue
        if key == "num_train_epochs" and _is_int(training.get("max_steps")) and training["max_steps"] > 0:
            continue          # max_steps decides the length; epochs are ignored
        ok = _is_int(value) if kind == "int" else _is_number(value)
        if ok and minimum is not None:
            ok = value > minimum if strict else value >= minimum
        if not ok:
            if kind == "int":
                what = "a whole number" + (f" >= {minimum}" if minimum is not None else "")
            else:
                what = "a positive number" if strict else f"a number >= {minimum}"
            raise ConfigError(f"training.{key} must be {what}, got {value!r}.", example)


# ---------------------------------------------------------------------------------------------
# defaults: the article's best practices, per task, model kind and strategy

# The article's cheat sheet: the amount of data decides the strategy (an LLM takes LoRA at any size).
FREEZE_BELOW = 500            # fewer rows: freeze the backbone, full fine-tuning overfits
FULL_UP_TO = 5000             # up to here: full fine-tuning; above, any strategy has the data it needs
STRATEGY_CHEAT_SHEET = ("Cheat sheet: under 500 rows → freeze the backbone; 500-5,000 rows → full fine-tuning; "
                        "LoRA when full fine-tuning overfits, and for LLMs (1-2% of the weights train, less "
                        "forgetting).")


def recommended_strategy(n_rows: int, model_kind: str = "encoder", strong: str = "") -> tuple[str, str]:
    """The cheat sheet's strategy for `n_rows` rows of data, and why, as a clause ("with 160 rows the cheat
    sheet says freeze the backbone (full fine-tuning overfits)"). `strong` wraps the advice ("**" in
    markdown)."""
    s = strong
    if model_kind == "causal":
        return "lora", f"for an LLM the article recommends {s}LoRA{s}: 1-2% of the weights train and it forgets less"
    if n_rows < FREEZE_BELOW:
        return "frozen", (f"with {n_rows} rows the cheat sheet says {s}freeze the backbone{s} "
                          "(full fine-tuning overfits)")
    if n_rows <= FULL_UP_TO:
        return "full", f"with {n_rows} rows the cheat sheet says {s}full fine-tuning{s} (LoRA if it overfits)"
    return "full", f"with {n_rows} rows {s}full fine-tuning{s} pays off; LoRA is cheaper on big models"


def uses_mean_pooling_head(task: str, strategy: str, frozen_layers: Any, model_kind: str) -> bool:
    """A head-only classification run on an encoder trains heads.MeanPoolingForSequenceClassification (a
    linear head on mean-pooled states) instead of the model's own pooler head; a causal LM keeps its
    score head. Its saved model needs `import finetune_core.heads` to load."""
    return (task == "classification" and strategy == "frozen" and frozen_layers == "all"
            and model_kind == "encoder")



def half_precision_key() -> str:
    """bf16 where the GPU does it natively (Ampere and later), else fp16. `including_emulation=False`:
    torch's default also says yes on older GPUs that only emulate bf16, slowly."""
    import torch

    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def merge_training(defaults: dict, given: dict) -> dict:
    """`training:` over the defaults. A user's fp16 or bf16 set to true replaces our half-precision
    choice, so `fp16: true` on a bf16 GPU means fp16, not "At most one of fp16 and bf16"; `fp16: false`
    alone keeps our bf16 (it says "not fp16", not "float32")."""
    values = dict(defaults)
    if any(given.get(k) for k in ("fp16", "bf16")):
        values.pop("fp16", None)
        values.pop("bf16", None)
    values.update(given)
    return values


def default_learning_rate(task: str, model_kind: str, strategy: str, frozen_layers: Any = "all") -> float:
    """The article's table, adjusted where measurement on 60-150 rows said otherwise (see README)."""
    if task == "preference" and strategy != "lora":
        # DPO moves every weight it trains away from the reference; full and partly frozen runs take the
        # small rates usual for DPO (not measured here: LoRA is the default and the measured one).
        return 5e-6
    if strategy == "lora":
        return 2e-4 if model_kind == "causal" else 1e-3   # a small encoder's LoRA needs more
    if strategy == "frozen" and frozen_layers == "all":
        if task == "classification" and model_kind == "encoder":
            # The mean-pooling head (LayerNorm + linear, heads.py) within 10 epochs: measured on
            # examples/data/domains.csv with MiniLM, accuracy 60 rows / 100 rows (mean of 3-4 seeds):
            # 1e-3 0.81 / -, 2e-3 0.83 / 0.95, 3e-3 0.83 / 0.99, 5e-3 0.92 / 0.99 (160 rows: 1e-3 0.97,
            # 2e-3 and up 1.00). The article's 1e-3 stalls early on small data and early stopping ends it.
            return 5e-3
        return 1e-3 if task == "classification" else 1e-4  # head only
    if model_kind == "causal":
        if task == "instruction" and strategy == "frozen":
            # Partly frozen (the last blocks learn): fewer weights move, so the article's ceiling for GPT
            # models. SmolLM2, last 6 of 30 blocks, 2 epochs on the support replies: validation loss
            # 2.64 -> 2.56 at 1e-5, -> 2.41 at 5e-5, general-text perplexity 31.2 -> 31.0 / 30.9 (no forgetting).
            return 5e-5
        return 1e-5 if task == "instruction" else 2e-5
    return 5e-5                                            # BERT-style full / partly frozen


def preference_defaults(n_train: int) -> dict:
    """DPOConfig values of a preference run, measured on the bundled SmolLM2 on 2 CPU cores with
    examples/data/preference_pairs.jsonl (82 training / 21 held-out pairs; README, Preference tuning):
    LoRA at 2e-4 for 2 epochs takes the held-out DPO loss from ln 2 = 0.69 to 0.01 (5e-5: 0.41). The
    reference log-probabilities are computed once before training instead of at every step (TRL's
    default, a reference pass every step, took 5-7x the time of instruction tuning on the same rows),
    one pair per forward pass with 4 accumulated per optimizer step (4 pairs a step, as batch 4).
    Measured in float32 (1 epoch, against LoRA instruction tuning's 41 s and 1.76 GB, which has
    activation checkpointing): without activation checkpointing the loop took 93-102 s at a 2.08-2.12 GB
    peak, with it 121 s at 1.67 GB; reference batches of 4 pairs made the reference pass no faster
    (50 s vs 48 s) and the peak 270 MB higher."""
    return {"num_train_epochs": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
            "per_device_eval_batch_size": 1, "beta": 0.1, "precompute_ref_log_probs": True,
            "precompute_ref_batch_size": 1, "activation_checkpointing": False,
            # TRL's datasets have no `input_ids` column for transformers' length grouping
            "train_sampling_strategy": "random",
            "logging_steps": max(1, min(10, -(-n_train // 4) // 4))}


def training_defaults(task: str, model_kind: str, strategy: str, n_train: int,
                      frozen_layers: Any = "all", cuda: bool | None = None) -> dict:
    """TrainingArguments values a run uses unless `training:` says otherwise."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    classification = task == "classification"
    # Instruction batches: 4 on CPU, the article's effective batch (1 x accumulation 4). Length-grouped
    # batches of 4 pad half as much as batches of 8 (48 Self-Instruct rows: 5.9% vs 11.1% of positions),
    # train ~12% faster here, and reached a lower validation loss in `make bench` (3.91 vs 4.10).
    # A GPU is not compute-bound at this size, so it takes 8.
    batch = 16 if classification else (8 if cuda else 4)
    epochs = 10 if classification else 3     # issue 2: a good model within 10 epochs on 60-150 rows
    steps_per_epoch = max(1, -(-n_train // batch))
    args = {
        "num_train_epochs": epochs,
        "per_device_train_batch_size": batch,
        # Instruction: the loss probe's batch (tasks/instruction.PROBE_BATCH), so the Trainer's last
        # evaluation is the final validation loss itself and is not computed twice.
        "per_device_eval_batch_size": 32 if classification else 8,
        "learning_rate": default_learning_rate(task, model_kind, strategy, frozen_layers),
        "weight_decay": 0.01,
        "warmup_steps": 0.1,                 # a float below 1 is a ratio in transformers 5
        "lr_scheduler_type": "cosine",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "logging_strategy": "steps",
        "logging_steps": max(1, min(10, steps_per_epoch // 4)),
        # The first loss point right after step 1: on a CPU an instruction step takes ~2 s, so waiting
        # for logging_steps would leave the live chart empty for ~10 s (issue 5: first event < 3 s).
        "logging_first_step": True,
        "load_best_model_at_end": True,
        # classification: weighted F1, ties broken on the validation loss (evaluation.SELECTION_METRIC)
        "metric_for_best_model": "f1_then_loss" if classification else "eval_loss",
        "greater_is_better": classification,
        "save_total_limit": 2,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "group_by_length",
        # Recomputation costs ~25% time, so it is off, except for LoRA on a causal LM on CPU: there the
        # saved activations (plus LoRA's dropout copies of each layer input) outweigh the optimizer state
        # LoRA saves, and without it LoRA peaks *above* full fine-tuning. Same results: checkpointing
        # recomputes exactly. The reentrant variant: with glibc's heap, the non-reentrant one leaves the
        # heap ~1 GB larger (SmolLM2, batch 8 x 256 tokens, peak RSS: full 6.4 GB; LoRA without
        # checkpointing 7.5 GB, non-reentrant 3.8 GB, reentrant 2.8 GB, at the same speed). Measured again
        # with wide batches in passes of <= 768 tokens (trainer.CPU_MICRO_BATCH_TOKENS): LoRA at batch 8
        # peaks at 3.7 GB without checkpointing (full: 3.9-4.3 GB), 2.0 GB with it; its loop 40 s vs 50 s.
        "activation_checkpointing": strategy == "lora" and model_kind == "causal" and not cuda,
        "early_stopping_patience": 2,
    }
    if task == "preference":
        args.update(preference_defaults(n_train))
    if args["activation_checkpointing"]:
        args["activation_checkpointing_kwargs"] = {"use_reentrant": True}
    if cuda:
        args[half_precision_key()] = True
    else:
        args["use_cpu"] = True               # never half precision on CPU: bf16 is ~400x slower there
    return args
