"""The model card's loading snippet matches the model that was saved."""

from finetune_core.cards import render_model_card
from finetune_core.config import config_from_dict


def _card(kind: str, strategy: dict) -> str:
    cfg = config_from_dict({"task": "classification", "strategy": strategy})
    return render_model_card(cfg, {"model_kind": kind, "accuracy": 0.9, "f1_weighted": 0.9})


def test_mean_pooling_import_only_when_that_head_is_used():
    assert "import finetune_core.heads" in _card("encoder", {"name": "frozen", "frozen_layers": "all"})
    # a causal LM's head-only run keeps its own score head; a partly frozen encoder keeps BERT's head
    assert "import finetune_core.heads" not in _card("causal", {"name": "frozen", "frozen_layers": "all"})
    assert "import finetune_core.heads" not in _card("encoder", {"name": "frozen", "frozen_layers": 1})
    assert "import finetune_core.heads" not in _card("encoder", {"name": "full"})
    assert 'pipeline("text-classification"' in _card("causal", {"name": "frozen", "frozen_layers": "all"})
