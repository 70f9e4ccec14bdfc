"""GGUF + Ollama Modelfile export (finetune_core.gguf_export, finetune_core.ollama) on tiny random llamas.

    pytest -q tests/test_gguf_export.py

The round trip reads the GGUF back with transformers' own GGUF loader (`gguf_file=`), an implementation
independent of our writer: names, Q/K order, tied embeddings, hyperparameters and the tokenizer must all
be right for the answers to match. Reading a file with SmolLM2's 49k-token vocabulary takes transformers
~20 s, so the file is read once per module.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4,"]


def _gguf_bytes_hold(path: Path, text: str) -> bool:
    return text.encode() in path.read_bytes()


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory, tiny_llama_dir):
    from finetune_core.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("gguf-out")
    return export_gguf(tiny_llama_dir, out, "tiny-llama", quant="f16",
                       base_model="HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def read_back(f16_export):
    """(model, tokenizer) as transformers loads them from the GGUF alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = f16_export.gguf_path.parent, f16_export.gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_f16_gguf_read_back_by_transformers_answers_like_the_original(tiny_llama_dir, smol_tokenizer, read_back):
    """Teacher-forced on the original's greedy continuation, the GGUF model's logits stay within f16
    rounding of the original's, and it picks the same next token wherever the original's choice is
    clear. A random 32-wide model has near-ties (top-2 logits 1e-3 apart) that f16 rounding may flip,
    so exact token equality is asserted only where the margin exceeds twice the largest logit error."""
    import torch
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    gguf_model, _ = read_back
    assert gguf_model.config.tie_word_embeddings
    assert sum(p.numel() for p in gguf_model.parameters()) == sum(p.numel() for p in original.parameters())
    clear_positions = 0
    for prompt in PROMPTS:
        enc = smol_tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            seq = original.generate(**enc, max_new_tokens=12, do_sample=False,
                                    pad_token_id=smol_tokenizer.pad_token_id)
            ours, theirs = original(seq).logits[0], gguf_model(seq).logits[0]
        error = (ours - theirs).abs().max().item()
        assert error < 2e-3, f"logits differ by {error} on {prompt!r}"
        top2 = ours.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * error
        assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
        clear_positions += int(clear.sum())
    assert clear_positions >= len(PROMPTS) * 6, "too few clear greedy choices to compare"


def test_tokenizer_read_back_from_the_gguf_encodes_like_the_original(smol_tokenizer, read_back):
    _, gguf_tokenizer = read_back
    chat = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi there, 42 times?"}],
                                              tokenize=False, add_generation_prompt=True)
    texts = [*PROMPTS, chat, "naïve café 😀 — ünïcödé\n\n\ttabs  and   spaces", "<|endoftext|>x<|im_end|>",
             "123456 7.5%"]
    for text in texts:
        assert gguf_tokenizer(text)["input_ids"] == smol_tokenizer(text)["input_ids"], text
    assert gguf_tokenizer.chat_template == smol_tokenizer.chat_template
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(gguf_tokenizer, attr) == getattr(smol_tokenizer, attr), attr


def test_modelfile_has_relative_from_chatml_template_stops_and_no_local_path(f16_export, tiny_llama_dir):
    from finetune_core.ollama import CHATML_OLLAMA_TEMPLATE

    text = f16_export.modelfile_path.read_text(encoding="utf-8")
    assert f16_export.modelfile_path == f16_export.gguf_path.parent / "Modelfile"
    lines = text.splitlines()
    assert "FROM ./tiny-llama.gguf" in lines
    assert f'TEMPLATE """{CHATML_OLLAMA_TEMPLATE}"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
    assert "PARAMETER num_ctx 256" in lines          # the tiny model's context, below Ollama's 4096
    local = [str(Path(tiny_llama_dir).resolve()), str(f16_export.gguf_path.parent.resolve()), "gguf-tokenizer-",
             str(Path.home()) + "/"]
    for path in local:
        assert path not in text
        assert not _gguf_bytes_hold(f16_export.gguf_path, path), path
    assert _gguf_bytes_hold(f16_export.gguf_path, "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not list(f16_export.gguf_path.parent.glob(".*tmp*"))      # no temporary file left behind


def test_chatml_template_matches_the_jinja_template_it_replaces(smol_tokenizer):
    """The Go template's Python twin renders exactly what SmolLM2's Jinja template renders."""
    from finetune_core.ollama import chat_format, render_chat

    fmt = chat_format(smol_tokenizer)
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "Another\none?"}]
    for messages in (conversation, [{"role": "system", "content": "Be terse."}, *conversation]):
        jinja = smol_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(messages, fmt.system) == jinja


def test_untranslatable_chat_template_is_refused_with_a_message(smol_tokenizer):
    from finetune_core.ollama import GgufExportError, chat_format

    llama2_style = copy.deepcopy(smol_tokenizer)
    llama2_style.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                                  "[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{% endif %}"
                                  "{% endfor %}")
    with pytest.raises(GgufExportError, match="only ChatML"):
        chat_format(llama2_style)
    no_template = copy.deepcopy(smol_tokenizer)
    no_template.chat_template = None
    with pytest.raises(GgufExportError, match="no chat template"):
        chat_format(no_template)


def test_q8_0_file_is_about_half_the_f16_file(tmp_path, smol_tokenizer):
    """A 256-wide llama: its 12.6M embedding values outweigh the ~2 MB of vocabulary metadata."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_core.gguf_export import export_gguf_from_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    f16 = export_gguf_from_model(model, smol_tokenizer, tmp_path, "wide-f16", quant="f16", modelfile=False)
    q8 = export_gguf_from_model(model, smol_tokenizer, tmp_path, "wide-q8_0", quant="q8_0", modelfile=False)
    assert f16.modelfile_path is None and not (tmp_path / "Modelfile").exists()
    assert 0.45 <= q8.size_bytes / f16.size_bytes <= 0.6, (q8.size_bytes, f16.size_bytes)
    assert f16.size_bytes == f16.gguf_path.stat().st_size


def test_unsupported_architecture_gets_a_clear_error_and_writes_nothing(tmp_path, tiny_gpt2_dir):
    from finetune_core.errors import FinetuneError
    from finetune_core.gguf_export import export_gguf

    with pytest.raises(FinetuneError, match="GPT2LMHeadModel architecture") as err:
        export_gguf(tiny_gpt2_dir, tmp_path / "out", "gpt2")
    assert "LlamaForCausalLM" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_quant_and_name_are_refused(tmp_path, tiny_llama_dir):
    from finetune_core.gguf_export import GgufExportError, export_gguf

    with pytest.raises(GgufExportError, match="f32, f16, q8_0"):
        export_gguf(tiny_llama_dir, tmp_path, "x", quant="q4_k")
    with pytest.raises(GgufExportError, match="cannot be a GGUF file name"):
        export_gguf(tiny_llama_dir, tmp_path, "../escape")
    with pytest.raises(GgufExportError, match="not a public Hub id"):
        export_gguf(tiny_llama_dir, tmp_path, "x", base_model=str(tmp_path))
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_llama_dir) / name, weights_only / name)
    with pytest.raises(GgufExportError, match="no tokenizer files"):
        export_gguf(weights_only, tmp_path / "out", "x")
    assert not list(tmp_path.glob("*.gguf"))


def test_lora_adapter_is_merged_in_memory_and_a_bare_adapter_folder_is_refused(tmp_path, tiny_llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune_core.gguf_export import GgufExportError, export_gguf, merge_lora_adapter

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    # init_lora_weights=False: a non-zero update, so merging visibly changes the weights
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    merged, tokenizer = merge_lora_adapter(tmp_path / "adapter", base_model_dir=tiny_llama_dir)
    assert type(merged).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    with pytest.raises(GgufExportError, match="LoRA adapter"):
        export_gguf(tmp_path / "adapter", tmp_path / "out", "adapter")


def test_pre_tokenizer_names_follow_the_split_rule():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from finetune_core.gguf_export import GgufExportError, _pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert _pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert _pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    qwen2 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated"},
        dict(byte_level, use_regex=False)]}
    assert _pre_tokenizer_name(json.loads(json.dumps({"pre_tokenizer": qwen2}))) == "qwen2"
    with pytest.raises(GgufExportError, match="Metaspace"):
        _pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}})


# ---------------------------------------------------------------------------------------------
# runs: the Alpaca prompt format, the CLI, and a real SmolLM2 LoRA run


def test_alpaca_templates_render_the_prompts_alpaca_runs_train_on(smol_tokenizer):
    """Ollama's template (Python twin render_alpaca) and the GGUF's Jinja template both give
    data.render_prompt(..., "alpaca") for a turn with and without a system prompt."""
    from finetune_core.data import render_prompt
    from finetune_core.ollama import ALPACA_JINJA_TEMPLATE, alpaca_format, render_alpaca

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = ALPACA_JINJA_TEMPLATE
    for messages in ([{"role": "user", "content": "Say hi.\nTwice."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]):
        expected = render_prompt(messages, "alpaca", smol_tokenizer)
        assert render_alpaca(messages) == expected
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    fmt = alpaca_format(smol_tokenizer)
    assert fmt.stop == ("### Instruction:", smol_tokenizer.eos_token) and fmt.system is None


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory, tiny_llama_dir):
    """A finished full instruction run of the tiny llama trained on Alpaca prompts (conftest helper)."""
    from conftest import owned_instruction_run

    runs = owned_instruction_run(tmp_path_factory.mktemp("alpaca"), "alpaca-run", "someone", tiny_llama_dir, "alpaca")
    return runs / "alpaca-run"


def test_cli_writes_a_gguf_per_quant_with_an_alpaca_modelfile_for_an_alpaca_run(alpaca_run, capsys):
    from finetune_core.cli import main
    from finetune_core.ollama import ALPACA_JINJA_TEMPLATE, ALPACA_OLLAMA_TEMPLATE

    for quant in ("f16", "q8_0"):
        assert main(["export", str(alpaca_run), "--gguf", "--quant", quant]) == 0
    printed = capsys.readouterr().out
    export = alpaca_run / "export"
    assert sorted(p.name for p in export.iterdir()) == ["alpaca-run-f16.Modelfile", "alpaca-run-f16.gguf",
                                                      "alpaca-run-q8_0.Modelfile", "alpaca-run-q8_0.gguf"]
    assert "ollama create alpaca-run-q8_0 -f alpaca-run-q8_0.Modelfile" in printed
    assert "llama-cli -m alpaca-run-q8_0.gguf --jinja -cnv" in printed and "zip" not in printed
    modelfile = (export / "alpaca-run-q8_0.Modelfile").read_text()
    assert "FROM ./alpaca-run-q8_0.gguf" in modelfile and f'TEMPLATE """{ALPACA_OLLAMA_TEMPLATE}"""' in modelfile
    assert 'PARAMETER stop "### Instruction:"' in modelfile and "<|im_start|>" not in modelfile
    assert _gguf_bytes_hold(export / "alpaca-run-f16.gguf", ALPACA_JINJA_TEMPLATE)


def test_gguf_of_a_classifier_is_refused_with_a_message(tmp_path, capsys):
    import yaml

    from finetune_core.cli import main

    run = tmp_path / "cls"
    (run / "model").mkdir(parents=True)
    (run / "run.yaml").write_text(yaml.safe_dump({"task": "classification", "model": "bundled:minilm-l6"}))
    assert main(["export", str(run), "--gguf"]) == 2
    assert "GGUF export is for chat models" in capsys.readouterr().err
    assert not (run / "export").exists()


@pytest.mark.slow
def test_smollm2_lora_run_gguf_holds_the_merged_weights_and_answers_alike(smollm2_lora_run):
    """The run's GGUF (f16, adapter merged first) read back by transformers holds exactly the merged
    model's weights rounded to f16 (norms stay float32), and gives the same greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_core.export import export_gguf_for_run
    from finetune_core.gguf_export import merge_lora_adapter
    from finetune_core.models import adapter_base

    run = smollm2_lora_run[0]
    result = export_gguf_for_run(run, "f16")
    assert result.gguf_path == run / "export" / f"{run.name}-f16.gguf"
    modelfile = result.modelfile_path.read_text()
    assert f"FROM ./{run.name}-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert _gguf_bytes_hold(result.gguf_path, "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct")
    merged, tokenizer = merge_lora_adapter(run / "model", base_model_dir=adapter_base(run / "model"))
    with torch.no_grad():
        for p in merged.parameters():
            if p.ndim >= 2:
                p.copy_(p.half().float())
    merged.eval()
    gguf_model = AutoModelForCausalLM.from_pretrained(result.gguf_path.parent, gguf_file=result.gguf_path.name,
                                                      dtype=torch.float32).eval()
    theirs = gguf_model.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    prompts = [json.loads(line)["prompt"] for line in (run / "generations.jsonl").read_text().splitlines()[:2]]
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            assert torch.equal(gguf_model.generate(**enc, **kwargs), merged.generate(**enc, **kwargs)), prompt
