"""The model card (`model/README.md`): Hub metadata, metrics, how to load the model, the training config.

    render_model_card(cfg, metrics)                  # the run's model/ folder (train() writes it)
    render_model_card(cfg, metrics, merged=True)     # a merged LoRA model: a plain transformers model

The card starts with the YAML front matter the Hugging Face Hub reads (huggingface_hub.ModelCardData):
`base_model` (a public Hub id, never a path of this machine), `library_name` (peft for an adapter, else
transformers), `pipeline_tag`, `license` (the bundled base's), `tags` and `model-index` with the
validation metrics, so a pushed model shows its widget, base-model link and results.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import public_dict, uses_mean_pooling_head
from .models import BUNDLED, bundled_id, public_model_id
from .portable import MODEL_CODE_FILE, export_base_name

PIPELINE_TAGS = {"classification": "text-classification", "instruction": "text-generation",
                 "preference": "text-generation"}
TASK_NAMES = {"classification": "Text Classification", "instruction": "Text Generation",
              "preference": "Text Generation"}
# (metrics.json key, model-index metric type, display name, metric config)
CLASSIFICATION_RESULTS = (("accuracy", "accuracy", "Accuracy", None),
                          ("f1_weighted", "f1", "F1 (weighted)", "weighted"), ("f1_macro", "f1", "F1 (macro)", "macro"))
INSTRUCTION_RESULTS = (("eval_loss", "loss", "Validation loss", None), ("perplexity", "perplexity", "Perplexity", None),
                       ("rougeL", "rouge", "ROUGE-L (held-out answers)", "rougeL"))
PREFERENCE_RESULTS = (("eval_loss", "loss", "DPO loss (held-out pairs)", None),
                      ("reward_accuracy", "accuracy", "Reward accuracy (held-out pairs)", None),
                      ("reward_margin", "reward_margin", "Reward margin (held-out pairs)", None))
DATASET_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def usage_snippet(task: str, strategy: str, model_dir: str = "path/to/model", mean_pooling: bool = False) -> str:
    """Loading code for a saved model folder. strategy="lora": the adapter itself; pass "full" for a merged one."""
    if strategy == "lora" and task == "classification":
        return ("# A LoRA adapter: the merged export (a plain model) loads with pipeline(). The adapter itself:\n"
                "from peft import AutoPeftModelForSequenceClassification\n"
                "from transformers import AutoConfig, AutoTokenizer\n\n"
                f"labels = AutoConfig.from_pretrained(\"{model_dir}\").id2label   # this run's label names\n"
                "model = AutoPeftModelForSequenceClassification.from_pretrained(\n"
                f"    \"{model_dir}\", num_labels=len(labels), id2label=labels)\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{model_dir}\")\n")
    if task == "classification":
        if mean_pooling:
            return ("from transformers import pipeline\n\n"
                    f"# trust_remote_code runs {MODEL_CODE_FILE} from the folder: the mean-pooling head (torch only)\n"
                    f"classify = pipeline(\"text-classification\", model=\"{model_dir}\", trust_remote_code=True)\n"
                    "print(classify(\"Your text here\", top_k=None))\n")
        return ("from transformers import pipeline\n\n"
                f"classify = pipeline(\"text-classification\", model=\"{model_dir}\")\n"
                "print(classify(\"Your text here\", top_k=None))\n")
    pre = "# A LoRA adapter: pip install peft; transformers downloads the base model it names\n" \
        if strategy == "lora" else ""
    return (f"{pre}from transformers import pipeline\n\n"
            f"generate = pipeline(\"text-generation\", model=\"{model_dir}\")\n"
            "messages = [{\"role\": \"user\", \"content\": \"Your prompt\"}]\n"
            "print(generate(messages, max_new_tokens=100)[0][\"generated_text\"][-1][\"content\"])\n")


def _dataset(cfg) -> tuple[str, str]:
    """(name, type) of the data the metrics were measured on: a file name, never its path."""
    source = cfg.data.validation or cfg.data.train or "data"
    name = Path(str(source)).name
    if not cfg.data.validation:
        name = f"{name} (held-out {cfg.data.val_size:g} split)"
    return name, DATASET_TYPES.get(Path(str(source)).suffix.lower(), "custom")


def _eval_results(cfg, metrics: dict) -> list:
    from huggingface_hub import EvalResult     # deferred: only a card needs it

    rows = {"classification": CLASSIFICATION_RESULTS, "preference": PREFERENCE_RESULTS}.get(cfg.task,
                                                                                        INSTRUCTION_RESULTS)
    name, kind = _dataset(cfg)
    return [EvalResult(task_type=PIPELINE_TAGS[cfg.task], task_name=TASK_NAMES[cfg.task], dataset_type=kind,
                       dataset_name=name, dataset_split="validation", metric_type=metric,
                       metric_value=round(float(metrics[key]), 4), metric_name=label, metric_config=config)
            for key, metric, label, config in rows if isinstance(metrics.get(key), (int, float))]


def card_metadata(cfg, metrics: dict, merged: bool = False, mean_pooling: bool = False):
    """The card's front matter as a huggingface_hub.ModelCardData."""
    from huggingface_hub import ModelCardData

    bid = bundled_id(cfg.model)
    public = public_model_id(cfg.model)
    adapter = cfg.strategy.name == "lora" and not merged
    tags = ["finetune-lab", PIPELINE_TAGS[cfg.task], cfg.strategy.name if not merged else "lora-merged"]
    if adapter and public:
        tags.append(f"base_model:adapter:{public}")
    if mean_pooling:
        tags += ["mean-pooling", "custom_code"]
    results = _eval_results(cfg, metrics)
    return ModelCardData(base_model=public, library_name="peft" if adapter else "transformers",
                         license=BUNDLED[bid]["license"] if bid else None, pipeline_tag=PIPELINE_TAGS[cfg.task],
                         tags=tags, model_name=Path(cfg.output_dir).name if results else None,
                         eval_results=results or None)


def _portable_config(cfg) -> dict:
    """The training config as the card shows it: file and folder names, no paths of this machine."""
    values = public_dict(cfg)
    for key in ("train", "validation"):
        if values["data"].get(key):
            values["data"][key] = Path(str(values["data"][key])).name
    values["output_dir"] = Path(cfg.output_dir).name
    if not bundled_id(cfg.model) and not public_model_id(cfg.model):
        values["model"] = export_base_name(cfg.model)      # a local folder: its name only
    return values


def _base_lines(cfg, merged: bool, mean_pooling: bool) -> list[str]:
    bid = bundled_id(cfg.model)
    public = public_model_id(cfg.model)
    where = f"[{public}](https://huggingface.co/{public})" if public else \
        f"a local model folder, `{export_base_name(cfg.model)}`, not on the Hub"
    lines = [f"Base model: {where}."]
    if bid and not BUNDLED[bid]["same_weights"]:
        lines.append("Trained on SmolLM2-135M-Instruct de-quantized from a 4-bit GGUF (Q4_1), not the original bf16 "
                     "release: that base is close to, not identical with, the Hub's weights.")
    if cfg.strategy.name == "lora" and not merged:
        lines.append("This folder holds a LoRA adapter: loading it fetches the base model named above. The merged "
                     "export (`python -m finetune_core export RUN --merge --zip`, or the app's Export tab) folds "
                     "the adapter into the trained weights: a plain model that depends on nothing else.")
    elif merged:
        lines.append("The LoRA adapter is merged into the base weights it was trained on: a plain transformers "
                     "model that loads without peft and without the base model.")
    if mean_pooling:
        lines.append(f"The classifier is a mean-pooling head on the encoder: its code ships in `{MODEL_CODE_FILE}` "
                     "(it imports only torch and transformers), so loading needs `trust_remote_code=True`. "
                     "Read the file first, as with any custom code.")
    return lines


def _metric_lines(task: str, metrics: dict) -> list[str]:
    lines = ["## Results on the validation split", "", "| metric | value |", "|---|---|"]
    if task == "classification":
        keys = ["accuracy", "f1_weighted", "f1_macro"]
    elif task == "preference":
        keys = ["eval_loss_before", "eval_loss", "reward_accuracy_before", "reward_accuracy", "reward_margin_before",
                "reward_margin", "general_perplexity_before", "general_perplexity", "forgetting_verdict", "rougeL"]
    else:
        keys = ["eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "general_perplexity_before",
                "general_perplexity", "forgetting_verdict", "rougeL"]
    keys += ["trainable_params", "total_params", "train_seconds", "train_samples", "stopped_early"]
    lines += [f"| {k} | {_fmt(metrics[k])} |" for k in keys if k in metrics]
    if task == "classification" and "baselines" in metrics:
        lines += ["", "Baselines on the same split:", "", "| model | accuracy | f1_weighted |", "|---|---|---|"]
        for name, row in metrics["baselines"].items():
            lines.append(f"| {name} | {row['accuracy']:.4f} | {row['f1_weighted']:.4f} |")
        lines.append(f"| fine-tuned | {metrics.get('accuracy', 0):.4f} | {metrics.get('f1_weighted', 0):.4f} |")
    return lines


def render_model_card(cfg, metrics: dict, merged: bool = False, model_dir: str = "path/to/model") -> str:
    """The card of a saved model folder. merged=True: the LoRA adapter folded into its base (plain model)."""
    task, strategy = cfg.task, cfg.strategy.name
    mean_pooling = uses_mean_pooling_head(task, strategy, cfg.strategy.frozen_layers, metrics.get("model_kind"))
    meta = card_metadata(cfg, metrics, merged, mean_pooling)
    shown = "merged LoRA" if merged else strategy
    lines = ["---", meta.to_yaml().rstrip(), "---", "",
             f"# {Path(cfg.output_dir).name}: fine-tuned with FineTune Lab ({task}, {shown})", ""]
    lines += _base_lines(cfg, merged, mean_pooling) + [""]
    lines += _metric_lines(task, metrics)
    lines += ["", "## Usage", "", "```python",
              usage_snippet(task, "full" if merged else strategy, model_dir, mean_pooling).rstrip(), "```", "",
              "## Training config", "", "```yaml",
              yaml.safe_dump(_portable_config(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
