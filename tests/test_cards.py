"""The model card: Hub front matter read back by huggingface_hub, a loading snippet that matches the
model that was saved, and no path of this machine anywhere in it.

ModelCard.validate() asks the Hub (network), so the card is parsed locally: ModelCard(text).data.
"""

import pytest
import yaml
from huggingface_hub import ModelCard

from finetune_core.cards import render_model_card
from finetune_core.config import config_from_dict

CLS_METRICS = {"model_kind": "encoder", "accuracy": 0.9, "f1_weighted": 0.85, "f1_macro": 0.8,
               "baselines": {"majority": {"accuracy": 0.25, "f1_weighted": 0.1}}}
INSTR_METRICS = {"model_kind": "causal", "eval_loss": 1.25, "eval_loss_before": 2.0, "perplexity": 3.49,
                 "rougeL": 0.31, "template": "chat"}


def _cfg(task="classification", strategy=None, model="bundled:minilm-l6", **data):
    return config_from_dict({"task": task, "model": model, "strategy": strategy or {"name": "lora"},
                             "data": {"train": "/home/someone/secret-project/train.csv", **data},
                             "output_dir": "/srv/finetune/runs/my-run"})


def _card(kind: str, strategy: dict) -> str:
    cfg = config_from_dict({"task": "classification", "strategy": strategy})
    return render_model_card(cfg, {"model_kind": kind, "accuracy": 0.9, "f1_weighted": 0.9})


def test_mean_pooling_head_ships_its_code_and_the_snippet_trusts_it():
    card = _card("encoder", {"name": "frozen", "frozen_layers": "all"})
    assert "trust_remote_code=True" in card and "modeling_finetune_lab.py" in card
    assert "import finetune_core" not in card
    # a causal LM's head-only run keeps its own score head; a partly frozen encoder keeps BERT's head
    for kind, strategy in (("causal", {"name": "frozen", "frozen_layers": "all"}),
                           ("encoder", {"name": "frozen", "frozen_layers": 1}), ("encoder", {"name": "full"})):
        card = _card(kind, strategy)
        assert "trust_remote_code" not in card and 'pipeline("text-classification"' in card


def test_lora_classifier_card_is_a_peft_adapter_of_the_public_base():
    card = ModelCard(render_model_card(_cfg(), CLS_METRICS))
    data = card.data.to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-classification"
    assert data["license"] == "apache-2.0"
    assert {"finetune-lab", "lora", "base_model:adapter:sentence-transformers/all-MiniLM-L6-v2"} <= set(data["tags"])
    results = card.data.eval_results
    assert card.data.model_name == "my-run"
    assert {(r.metric_type, r.metric_config, r.metric_value) for r in results} == \
        {("accuracy", None, 0.9), ("f1", "weighted", 0.85), ("f1", "macro", 0.8)}
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results} == {("text-classification", "csv",
                                                                                   "validation")}
    assert results[0].dataset_name == "train.csv (held-out 0.2 split)"
    assert "merged export" in card.text


def test_merged_and_full_cards_are_plain_transformers_models():
    merged = ModelCard(render_model_card(_cfg(), CLS_METRICS, merged=True)).data.to_dict()
    assert merged["library_name"] == "transformers" and "lora-merged" in merged["tags"]
    assert not any(t.startswith("base_model:adapter:") for t in merged["tags"])
    full = ModelCard(render_model_card(_cfg(strategy={"name": "frozen", "frozen_layers": "all"}), CLS_METRICS))
    assert full.data.library_name == "transformers" and "custom_code" in full.data.tags


def test_instruction_card_names_smollm2_says_its_weights_differ_and_lists_its_metrics():
    text = render_model_card(_cfg("instruction", model="bundled:smollm2-135m", validation="/data/val.jsonl"),
                             INSTR_METRICS)
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "peft"
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == \
        {("loss", 1.25), ("perplexity", 3.49), ("rouge", 0.31)}
    assert {r.dataset_name for r in card.data.eval_results} == {"val.jsonl"}
    assert {r.dataset_type for r in card.data.eval_results} == {"json"}
    assert "de-quantized from a 4-bit GGUF (Q4_1)" in card.text
    assert 'pipeline("text-generation"' in card.text


def test_card_holds_no_path_of_this_machine():
    for model in ("bundled:minilm-l6", "/home/someone/models/my-bert"):
        text = render_model_card(_cfg(model=model, validation="/home/someone/val.csv"), CLS_METRICS)
        assert "/home/someone" not in text and "/srv/finetune" not in text
        config = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
        assert config["data"]["train"] == "train.csv" and config["data"]["validation"] == "val.csv"
        assert config["output_dir"] == "my-run"
    card = ModelCard(render_model_card(_cfg(model="/home/someone/models/my-bert"), CLS_METRICS))
    assert card.data.base_model is None and card.data.license is None        # nothing public to name
    assert "a local model folder, `my-bert`, not on the Hub" in card.text
    hub = ModelCard(render_model_card(_cfg(model="distilbert-base-uncased"), CLS_METRICS))
    assert hub.data.base_model == "distilbert-base-uncased"


@pytest.mark.parametrize("metrics", [{}, {"model_kind": "encoder"}])
def test_a_card_before_evaluation_has_no_model_index(metrics):
    card = ModelCard(render_model_card(_cfg(), metrics))
    assert card.data.eval_results is None and "model-index" not in card.content
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
