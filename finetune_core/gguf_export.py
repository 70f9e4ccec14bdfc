"""GGUF export for llama.cpp, Ollama and LM Studio: one `.gguf` (weights, tokenizer, chat template) + a Modelfile.

    from finetune_core.gguf_export import export_gguf, export_gguf_from_model, merge_lora_adapter

    export_gguf("runs/x/model", "runs/x/export", "x", quant="q8_0")     # a full (or merged) model folder
    model, tokenizer = merge_lora_adapter("runs/x/model", base_model_dir="/path/to/base")   # LoRA: merge in memory
    export_gguf_from_model(model, tokenizer, "runs/x/export", "x", quant="f16")

Both write `OUT/NAME.gguf` and `OUT/Modelfile` (`modelfile_name`: `FROM ./NAME.gguf`, the chat template in
Ollama's syntax, stop tokens, sampling defaults) and return a `GgufExport`. `prompt_format="alpaca"` writes
the Alpaca prompt format instead of the chat template (a run trained with data.template: alpaca). Then, in OUT:

    ollama create x -f Modelfile && ollama run x
    llama-cli -m x.gguf --jinja -cnv

`quant`: f32, f16 (half the float32 size) or q8_0 (8-bit blocks, about half of f16). Norms and other 1-D
tensors stay float32, as llama.cpp's converter keeps them. Supported: LlamaForCausalLM (SmolLM2),
MistralForCausalLM (llama.cpp runs it as llama) and Qwen2ForCausalLM, with a byte-level BPE tokenizer
whose pre-tokenizer llama.cpp knows (SmolLM, GPT-2, Qwen2); anything else is a GgufExportError that
names what is supported. The format itself (header, key/value types, tensor layout, Q8_0 blocks, the
tensor-name tables, the vocabulary readers) comes from the `gguf` package; this module decides what to
write, following llama.cpp's convert_hf_to_gguf.py. No file written here names a path of this machine.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from .models import TOKENIZER_FILES
from .ollama import ALPACA_JINJA_TEMPLATE, GgufExportError, alpaca_format, chat_format, modelfile_text

QUANT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# transformers class -> (llama.cpp architecture, whether Q/K rows need reordering for GGML's rope)
ARCHITECTURES = {"LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
                 "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
                 "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False)}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class GgufExport:
    gguf_path: Path
    modelfile_path: Path | None
    quant: str
    size_bytes: int


# ---------------------------------------------------------------------------------------------
# entry points


def export_gguf(model_dir: str | Path, out_dir: str | Path, name: str, quant: str = "f16",
                base_model: str | None = None, modelfile: bool = True, modelfile_name: str = "Modelfile",
                prompt_format: str = "chat") -> GgufExport:
    """Export a causal LM folder saved with transformers (weights + tokenizer) to OUT/NAME.gguf (+ Modelfile).

    A LoRA adapter folder is refused: merge it first (`merge_lora_adapter`, then `export_gguf_from_model`).
    `base_model` (a public Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct) is recorded in the metadata.
    """
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        raise GgufExportError(f"'{model_dir.name}' holds a LoRA adapter, not a full model, so it cannot be "
                              "written as a GGUF on its own.",
                              "Merge the adapter into its base model first (Export tab: Merge LoRA adapter), "
                              "then export the merged model.")
    _check_quant(quant)
    _check_architecture(_folder_architecture(model_dir))
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise GgufExportError(f"'{model_dir.name}' has no tokenizer files, and a GGUF must carry its tokenizer.",
                              "Save the tokenizer next to the weights (tokenizer.save_pretrained) and export again.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GgufExportError(f"The model in '{model_dir.name}' cannot be loaded: {first}",
                              "Point to a folder saved with save_pretrained (config, safetensors, tokenizer).") from exc
    return export_gguf_from_model(model, tokenizer, out_dir, name, quant, base_model, modelfile, modelfile_name,
                                  prompt_format)


def export_gguf_from_model(model, tokenizer, out_dir: str | Path, name: str, quant: str = "f16",
                           base_model: str | None = None, modelfile: bool = True, modelfile_name: str = "Modelfile",
                           prompt_format: str = "chat") -> GgufExport:
    """Export an in-memory causal LM (for instance a merged LoRA model) and its tokenizer; see export_gguf.

    prompt_format: "chat" (the tokenizer's chat template, ChatML) or "alpaca" (a model fine-tuned on
    Alpaca prompts: that format goes into the GGUF's chat template and the Modelfile).
    modelfile_name: the Modelfile's file name in out_dir (one per quantization, e.g. NAME.Modelfile).
    """
    _check_quant(quant)
    for label, value in (("GGUF", name), ("Modelfile", modelfile_name)):
        if not _NAME_RE.match(value or ""):
            raise GgufExportError(f"'{value}' cannot be a {label} file name.",
                                  "Use letters, digits, '.', '_' or '-' (for example my-run-q8_0).")
    if prompt_format not in ("chat", "alpaca"):
        raise GgufExportError(f"Unknown prompt format '{prompt_format}'.", "Use chat or alpaca.")
    if base_model is not None and not _HUB_ID_RE.match(base_model):
        raise GgufExportError(f"The base model '{base_model}' is not a public Hub id (owner/name).",
                              "Give the base model's Hub id, or leave it out; a local path is never recorded.")
    arch, reorder_qk = _check_architecture(type(model).__name__)
    alpaca = prompt_format == "alpaca"
    # refuse an untranslatable template before writing anything
    fmt = (alpaca_format(tokenizer) if alpaca else chat_format(tokenizer)) if modelfile else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.gguf"
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as tok_dir:
        trained_template = tokenizer.chat_template
        try:
            if alpaca:
                tokenizer.chat_template = ALPACA_JINJA_TEMPLATE    # what llama-cli --jinja will format with
            tokenizer.save_pretrained(tok_dir)
        finally:
            tokenizer.chat_template = trained_template
        model.config.save_pretrained(tok_dir)     # SpecialVocab falls back to config.json for token ids
        writer_path = out_dir / f".{name}.gguf.tmp{os.getpid()}"
        try:
            _write(model, tokenizer, Path(tok_dir), writer_path, name, quant, arch, reorder_qk, base_model)
            os.replace(writer_path, target)
        finally:
            writer_path.unlink(missing_ok=True)
    modelfile_path = None
    if fmt is not None:
        modelfile_path = out_dir / modelfile_name
        context = getattr(model.config, "max_position_embeddings", None)
        modelfile_path.write_text(modelfile_text(target.name, fmt, context), encoding="utf-8")
    return GgufExport(target, modelfile_path, quant, target.stat().st_size)


def merge_lora_adapter(adapter_dir: str | Path, base_model_dir: str | Path | None = None):
    """(merged model, tokenizer): a peft LoRA adapter folded into its base, in memory, float32.

    `base_model_dir` overrides the adapter's `base_model_name_or_path` (needed offline when the adapter
    names its base by a Hub id). The tokenizer comes from the adapter folder when it has one.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise GgufExportError(f"'{adapter_dir.name}' has no adapter_config.json, so it is not a LoRA adapter.",
                              "Export it directly with export_gguf.")
    base = str(base_model_dir or json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    has_tokenizer = (adapter_dir / "tokenizer.json").exists() or (adapter_dir / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# checks


def _check_quant(quant: str) -> None:
    if quant not in QUANT_TYPES:
        raise GgufExportError(f"Unknown GGUF quantization '{quant}'.", f"Use one of: {', '.join(QUANT_TYPES)}.")


def _folder_architecture(model_dir: Path) -> str:
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise GgufExportError(f"'{model_dir.name}' has no config.json, so it is not a saved model folder.",
                              "Point to the folder that holds config.json, the safetensors weights and the tokenizer.")
    archs = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or ["(none)"]
    return archs[0]


def _check_architecture(class_name: str):
    if class_name not in ARCHITECTURES:
        raise GgufExportError(f"GGUF export does not support the {class_name} architecture.",
                              f"Supported: {', '.join(ARCHITECTURES)} (causal LMs such as the bundled SmolLM2).")
    return ARCHITECTURES[class_name]


# ---------------------------------------------------------------------------------------------
# the file


def _write(model, tokenizer, tok_dir: Path, path: Path, name: str, quant: str, arch, reorder_qk: bool,
           base_model: str | None) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _add_tensors(writer, model, arch, reorder_qk, quant)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model.split("/")[1])
        writer.add_base_model_organization(0, base_model.split("/")[0])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    _add_hyperparameters(writer, config, quant)
    _add_tokenizer(writer, tokenizer, tok_dir, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer: gguf.GGUFWriter, config, quant: str) -> None:
    if getattr(config, "mlp_bias", False):
        raise GgufExportError("This model has biases in its MLP layers, which llama.cpp's llama architecture "
                              "does not load.", "Export a standard Llama/Mistral/Qwen2 model.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_rope(writer, config)
    writer.add_file_type(FILE_TYPES[quant])


def _add_rope(writer: gguf.GGUFWriter, config) -> None:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise GgufExportError(f"This model uses '{rope_type}' RoPE scaling, which this GGUF export does not write.",
                              "Export a model with default or linear RoPE (SmolLM2, Qwen2, Mistral).")


def _reorder_for_ggml_rope(weight, n_heads: int):
    """Q/K rows per head, from transformers' rotate-half order (first half, second half) to GGML's
    pairwise order (x0, y0, x1, y1, ...), which llama.cpp's llama rope expects; transformers' GGUF
    reader undoes the same permutation."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _add_tensors(writer: gguf.GGUFWriter, model, arch, reorder_qk: bool, quant: str) -> None:
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    embedding = state.get("model.embed_tokens.weight")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and embedding is not None and torch.equal(tensor, embedding):
            continue       # tied: llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GgufExportError(f"The weight '{hf_name}' has no place in llama.cpp's "
                                  f"{gguf.MODEL_ARCH_NAMES[arch]} architecture.",
                                  "Export a standard Llama/Mistral/Qwen2 model (no extra modules).")
        data = tensor.detach().to(torch.float32)
        if reorder_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _reorder_for_ggml_rope(data, n_heads)
        elif reorder_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _reorder_for_ggml_rope(data, n_kv)
        array = data.contiguous().numpy()
        # 1-D tensors and norms stay float32, as llama.cpp reads them.
        qtype = gguf.GGMLQuantizationType.F32 if array.ndim <= 1 or gguf_name.endswith("_norm.weight") \
            else QUANT_TYPES[quant]
        try:
            packed = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:    # Q8_0 needs rows that are a multiple of 32 values
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(array, qtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=qtype)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, tok_dir: Path, n_vocab: int) -> None:
    tokenizer_json = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8")) \
        if (tok_dir / "tokenizer.json").exists() else {}
    try:
        vocab = gguf.vocab.BpeVocab(tok_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise GgufExportError("GGUF export needs a byte-level BPE tokenizer (tokenizer.json, as SmolLM2, GPT-2 "
                              f"and Qwen2 have); this model's tokenizer is another kind ({exc}).",
                              "Export a SmolLM2, GPT-2-style or Qwen2 model.") from exc
    tokens = [text for text, _score, _type in vocab.all_tokens()]
    if len(tokens) > n_vocab:
        raise GgufExportError(f"The tokenizer has {len(tokens)} tokens but the model only {n_vocab} embeddings.",
                              "Resize the model's embeddings to the tokenizer (resize_token_embeddings) and save it.")
    types = _token_types(tokens, tokenizer_json.get("added_tokens") or [])
    # The embedding matrix may be padded past the tokenizer; llama.cpp wants one entry per row.
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=n_vocab)
    special.add_special_token.update(_adds_special_tokens(tokenizer))
    special.add_to_gguf(writer, quiet=True)


def _token_types(tokens: list, added_tokens: list[dict]) -> list[int]:
    """NORMAL, except the tokenizer's added tokens: CONTROL when special (or shaped <|...|>, which some
    models forget to flag), USER_DEFINED otherwise. llama.cpp matches both kinds whole in prompt text,
    so a template's <|im_start|> stays one token."""
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in added_tokens:
        token_id, content = added["id"], added["content"]
        if token_id >= len(types):
            continue
        looks_special = content.startswith("<|") and content.endswith("|>")
        types[token_id] = gguf.TokenType.CONTROL if added.get("special") or looks_special \
            else gguf.TokenType.USER_DEFINED
    return types


def _adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, read from what the tokenizer does rather than from its config."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and len(full) > len(plain) and full[0] == bos,
            "eos": eos is not None and len(full) > len(plain) and full[-1] == eos}


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (`tokenizer.ggml.pre`).

    llama.cpp's converter decides by hashing the token ids of a probe text; we read the splitting
    rule from tokenizer.json instead and name the llama.cpp pre-tokenizer that applies the same rule.
    """
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"):
        # GPT-2's split. The bundled SmolLM2 tokenizer (re-saved from its GGUF) is this case: it tokenizes
        # exactly as SmolLM's split does, since its vocabulary never joins a digit to anything.
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT \
            and not byte_level.get("use_regex", True):
        return "qwen2"
    raise GgufExportError(f"The tokenizer splits text in a way this GGUF export cannot name for llama.cpp "
                          f"(pre-tokenizer {kinds or 'none'}).",
                          "Export a model whose tokenizer is SmolLM2's, GPT-2's or Qwen2's.")
