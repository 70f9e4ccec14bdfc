"""A mean-pooling classification head for sentence encoders, used by the frozen (head-only) strategy.

all-MiniLM-L6-v2 was trained to make the *mean* of its token states a good sentence vector; its
CLS/pooler path was never trained for that. With the encoder frozen, a linear head on mean-pooled
states is far more accurate than BERT's standard pooler head (see README, "Frozen head"), so
head-only runs on encoders use this class.

This file is also the code such a model ships with: finetune_core.portable copies it, as
`modeling_finetune_lab.py`, next to the saved weights and points config.json's `auto_map` at it, so

    pipeline("text-classification", model="path/to/model", trust_remote_code=True)

loads the model on any machine with torch and transformers, without FineTune Lab. It must therefore
import nothing but torch and transformers. Importing it registers the classes with the Auto classes,
which is how this project's own loaders find them (no remote code needed). Plain
`import finetune_core` does not import it: that would load torch and transformers, and the package's
import stays light for the app (tests/test_headless.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingConfig(PretrainedConfig):
    model_type = "finetune_lab_mean_pooling"

    def __init__(self, encoder: dict | None = None, classifier_dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder or {}
        self.classifier_dropout = classifier_dropout

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.get("hidden_size", 0))


def mean_pooling_config(encoder_config, num_labels: int, id2label: dict | None = None,
                        dropout: float = 0.1) -> MeanPoolingConfig:
    """The config of a mean-pooling classifier around `encoder_config` (used by train and the UI's counter)."""
    enc = encoder_config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "id2label", "label2id"):
        enc.pop(key, None)
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    return MeanPoolingConfig(encoder=enc, classifier_dropout=dropout, num_labels=num_labels, id2label=id2label,
                             label2id={v: int(k) for k, v in id2label.items()})


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    config_class = MeanPoolingConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True

    def __init__(self, config: MeanPoolingConfig):
        super().__init__(config)
        enc_cfg = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(enc_cfg)
        if hasattr(self.encoder, "pooler"):
            self.encoder.pooler = None     # unused: we pool ourselves
        # LayerNorm first: mean-pooled states have a small norm, and a linear layer on them learns
        # slowly at head-only learning rates (1e-3); normalised features converge in a few epochs.
        self.norm = nn.LayerNorm(enc_cfg.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(enc_cfg.hidden_size, config.num_labels)
        self.post_init()

    @classmethod
    def from_encoder(cls, encoder_path: str, num_labels: int, id2label: dict, dropout: float = 0.1):
        encoder = AutoModel.from_pretrained(encoder_path, dtype=torch.float32)
        model = cls(mean_pooling_config(encoder.config, num_labels, id2label, dropout))
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
        model.encoder.load_state_dict(state, strict=False)
        return model

    def features(self, input_ids=None, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """The frozen part's output: one mean-pooled vector per text (what cache_features stores)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.encoder.parameters()):
            self.encoder.eval()   # a frozen encoder is a fixed feature extractor: no dropout noise
        return self

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(features)))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **_):
        logits = self.head(self.features(input_ids, attention_mask, token_type_ids))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class CachedFeatureHead(nn.Module):
    """Trains only `model.head` on stored features; shares the head's weights with `model`."""

    def __init__(self, model: MeanPoolingForSequenceClassification):
        super().__init__()
        self.norm = model.norm
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(self, features=None, labels=None, length=None, **_):
        # `length` is named so the Trainer keeps that column for its length-grouped sampler.
        logits = self.classifier(self.dropout(self.norm(features)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MeanPoolingConfig.model_type, MeanPoolingConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPoolingConfig, MeanPoolingForSequenceClassification,
                                            exist_ok=True)
