"""FineTune Lab engine: fine-tune classifiers and instruction models with full / frozen / LoRA.

    from finetune_core import load_config, train
    metrics = train(load_config("examples/configs/classification_lora.yaml"))

Headless: nothing here imports gradio (the app lives in finetune_core/ui/).
"""

from .config import RunConfig, config_from_dict, dump_config, load_config, training_defaults
from .errors import ConfigError, DataError, FinetuneError, ModelError

__all__ = ["RunConfig", "load_config", "config_from_dict", "dump_config", "training_defaults", "train",
           "audit_file", "FinetuneError", "ConfigError", "DataError", "ModelError", "list_models"]


def __getattr__(name):
    # Heavy modules (torch, transformers) load on first use so `import finetune_core` stays fast.
    if name == "train":
        from .train import train

        return train
    if name == "audit_file":
        from .audit import audit_file

        return audit_file
    if name == "list_models":
        from .models import list_models

        return list_models
    raise AttributeError(name)
