"""Export: the zip holds weights, tokenizer and card and nothing secret; LoRA merge; Hub push without leaks."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from finetune_core import export
from finetune_core.errors import FinetuneError

TOKEN = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7"


def fake_run(tmp_path, name="run1"):
    run = tmp_path / name
    model = run / "model"
    (model / "merged").mkdir(parents=True)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.txt", "README.md"):
        (model / f).write_text("{}" if f.endswith(".json") else "x")
    (model / "training_args.bin").write_bytes(b"pickle")          # pickles never leave
    (model / "optimizer.pt").write_bytes(b"state")
    (model / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (model / "hub_token.txt").write_text(TOKEN)
    (model / "generation_config.json").write_text(json.dumps({"note": TOKEN}))   # a token inside an allowed file
    (model / "merged" / "model.safetensors").write_text("m")
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-1" / "model.safetensors").write_text("c")
    (run / "run.yaml").write_text(yaml.safe_dump({"task": "classification", "strategy": {"name": "full"}}))
    return run


def test_zip_contains_model_files_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = fake_run(tmp_path)
    path = export.zip_model(run)
    assert path == run / "export" / "run1-model.zip"
    with zipfile.ZipFile(path) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
        blob = b"".join(zf.read(n) for n in zf.namelist())
    assert names == {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "vocab.txt", "README.md"}
    assert TOKEN.encode() not in blob
    with zipfile.ZipFile(export.zip_model(run, dest=tmp_path / "out.zip", include_merged=True)) as zf:
        assert "run1-model/merged/model.safetensors" in zf.namelist()


def test_zip_needs_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="no saved model"):
        export.zip_model(tmp_path / "empty")


def test_merge_refuses_a_full_model(tmp_path):
    with pytest.raises(FinetuneError, match="no LoRA adapter"):
        export.merge_lora(fake_run(tmp_path))


def test_push_offline_and_token_never_in_messages(tmp_path, monkeypatch):
    run = fake_run(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinetuneError, match="offline"):
        export.push_to_hub(run, "me/model", token=TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(FinetuneError, match="No Hugging Face token"):
        export.push_to_hub(run, "me/model")
    with pytest.raises(FinetuneError, match="not a Hub repository id"):
        export.push_to_hub(run, "../x", token=TOKEN)

    import huggingface_hub

    calls = {}

    class FailingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kw):
            raise RuntimeError(f"401 Unauthorized for token {TOKEN}")

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    with pytest.raises(FinetuneError) as err:
        export.push_to_hub(run, "me/model", token=TOKEN)
    assert TOKEN not in str(err.value) and "***" in str(err.value) and calls["token"] == TOKEN

    class OkApi(FailingApi):
        def create_repo(self, repo_id, **kw):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, allow_patterns, **kw):
            calls["files"] = sorted(allow_patterns)

    def files_with_token():
        return {p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()}

    before = files_with_token()
    monkeypatch.setattr(huggingface_hub, "HfApi", OkApi)
    assert export.push_to_hub(run, "me/model", token=TOKEN) == "https://huggingface.co/me/model"
    assert ".env" not in calls["files"] and "training_args.bin" not in calls["files"]
    assert "generation_config.json" not in calls["files"] and "model.safetensors" in calls["files"]
    assert files_with_token() == before          # the token was written nowhere


@pytest.mark.slow
def test_merge_lora_gives_a_plain_model_with_the_same_outputs(tmp_path, tiny_bert_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune_core.config import LoraSettings, StrategyConfig
    from finetune_core.strategies import apply_strategy

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2,
                                                              id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model = apply_strategy(base, StrategyConfig(name="lora", lora=LoraSettings(r=4, alpha=8)), "classification")
    for name, p in model.named_parameters():          # make the adapter non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    run = tmp_path / "lora-run"
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    model.get_base_model().config.save_pretrained(run / "model")
    (run / "run.yaml").write_text(yaml.safe_dump({"task": "classification", "strategy": {"name": "lora"}}))
    enc = tok("a small test sentence", return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits

    merged = export.merge_lora(run)
    assert merged == run / "model" / "merged"
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, expected, atol=1e-4)
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    snippet = export.usage_snippet_for_run(run)
    assert "AutoPeftModelForSequenceClassification" in snippet


def test_cli_zips_a_lora_classifier_merged_by_default_and_its_adapter_without_local_paths(tmp_path, tiny_bert_dir,
                                                                                          capsys):
    """A LoRA classifier's default zip is its merged model (a plain model); --adapter zips the adapter,
    whose base, a local folder here, is named by the folder's name only."""
    from conftest import FAST_TRAINING, class_rows, write_csv
    from finetune_core.cli import main
    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    run = tmp_path / "lora-run"
    train(config_from_dict({"task": "classification", "model": tiny_bert_dir, "strategy": {"name": "lora"},
                            "data": {"train": write_csv(tmp_path / "t.csv", class_rows(8)), "max_length": 32},
                            "training": FAST_TRAINING, "output_dir": str(run), "seed": 1}))
    assert main(["export", str(run)]) == 0
    assert "zip of the merged model written to" in capsys.readouterr().out
    with zipfile.ZipFile(run / "export" / "lora-run-merged.zip") as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
        card = zf.read("lora-run-merged/README.md").decode()
    assert "model.safetensors" in names and "adapter_config.json" not in names
    assert "library_name: transformers" in card and 'model="lora-run-merged"' in card
    assert main(["export", str(run), "--zip", "--adapter"]) == 0
    with zipfile.ZipFile(run / "export" / "lora-run-model.zip") as zf:
        adapter = json.loads(zf.read("lora-run-model/adapter_config.json"))
        texts = b"".join(zf.read(n) for n in zf.namelist() if n.endswith((".json", ".md")))
    assert adapter["base_model_name_or_path"] == Path(tiny_bert_dir).name
    for local in (str(tmp_path), str(Path(tiny_bert_dir).parent)):
        assert local.encode() not in texts
    # the run's own folder keeps the path of its local base: this machine is the only one that has it
    saved = json.loads((run / "model" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == tiny_bert_dir
