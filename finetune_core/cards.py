"""The model card (`model/README.md`) written with every saved model: metrics, config, how to load it."""

from __future__ import annotations

import yaml

from .config import public_dict, uses_mean_pooling_head


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def usage_snippet(task: str, strategy: str, model_dir: str = "path/to/model", mean_pooling: bool = False) -> str:
    if strategy == "lora" and task == "classification":
        return ("from peft import AutoPeftModelForSequenceClassification\n"
                "from transformers import AutoConfig, AutoTokenizer\n\n"
                f"labels = AutoConfig.from_pretrained(\"{model_dir}\").id2label   # this run's label names\n"
                "model = AutoPeftModelForSequenceClassification.from_pretrained(\n"
                f"    \"{model_dir}\", num_labels=len(labels), id2label=labels)\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{model_dir}\")\n")
    if strategy == "lora":
        auto = "AutoPeftModelForSequenceClassification" if task == "classification" else "AutoPeftModelForCausalLM"
        return (f"from peft import {auto}\nfrom transformers import AutoTokenizer\n\n"
                f"model = {auto}.from_pretrained(\"{model_dir}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{model_dir}\")\n")
    if task == "classification":
        pre = "import finetune_core.heads  # registers the mean-pooling head used by frozen runs\n" if mean_pooling else ""
        return (f"{pre}from transformers import pipeline\n\n"
                f"classify = pipeline(\"text-classification\", model=\"{model_dir}\")\n"
                "print(classify(\"Your text here\", top_k=None))\n")
    return ("from transformers import pipeline\n\n"
            f"generate = pipeline(\"text-generation\", model=\"{model_dir}\")\n"
            "print(generate([{\"role\": \"user\", \"content\": \"Your prompt\"}], max_new_tokens=100))\n")


def render_model_card(cfg, metrics: dict) -> str:
    task, strategy = cfg.task, cfg.strategy.name
    lines = [f"# Fine-tuned with FineTune Lab: {cfg.model} ({task}, {strategy})", ""]
    if "smollm2" in cfg.model:
        lines += ["Base weights: SmolLM2-135M-Instruct de-quantized from a 4-bit GGUF (Q4_1), not the original "
                  "bf16 release.", ""]
    lines += ["## Results on the validation split", "", "| metric | value |", "|---|---|"]
    keys = ["accuracy", "f1_weighted", "f1_macro"] if task == "classification" else \
        ["eval_loss_before", "eval_loss", "perplexity_before", "perplexity", "general_perplexity_before",
         "general_perplexity", "forgetting_verdict"]
    keys += ["trainable_params", "total_params", "train_seconds", "train_samples", "stopped_early"]
    for k in keys:
        if k in metrics:
            lines.append(f"| {k} | {_fmt(metrics[k])} |")
    if task == "classification" and "baselines" in metrics:
        lines += ["", "Baselines on the same split:", "", "| model | accuracy | f1_weighted |", "|---|---|---|"]
        for name, row in metrics["baselines"].items():
            lines.append(f"| {name} | {row['accuracy']:.4f} | {row['f1_weighted']:.4f} |")
        lines.append(f"| fine-tuned | {metrics.get('accuracy', 0):.4f} | {metrics.get('f1_weighted', 0):.4f} |")
    mean_pooling = uses_mean_pooling_head(task, strategy, cfg.strategy.frozen_layers, metrics.get("model_kind"))
    lines += ["", "## Usage", "", "```python", usage_snippet(task, strategy, "path/to/model", mean_pooling).rstrip(),
              "```", "", "## Training config", "", "```yaml",
              yaml.safe_dump(public_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
