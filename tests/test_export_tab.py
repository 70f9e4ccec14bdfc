"""The Export tab's handlers with the app's context: GGUF, predictions for a file, the zip of a LoRA
classifier (merged by default), and how the page wires them (tiny models, a few seconds)."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest

from conftest import FAST_TRAINING, class_rows, owned_instruction_run, write_csv
from finetune_core.ui import export_tab

OWNER = "a" * 32
OTHER = "b" * 32


def upd(value, key):
    assert isinstance(value, dict) and value.get("__type__") == "update", value
    return value.get(key)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    """An app over a runs folder holding a chat run (tiny llama, Alpaca prompts) and a LoRA classifier
    (tiny BERT), both trained by OWNER's session."""
    from finetune_core.config import config_from_dict
    from finetune_core.jobs import JobManager, owner_key
    from finetune_core.train import train
    from finetune_core.ui import build_app

    root = tmp_path_factory.mktemp("export-tab")
    runs = owned_instruction_run(root, "chatrun", OWNER, tiny_llama_dir, "chat")
    train(config_from_dict({"task": "classification", "model": tiny_bert_dir, "strategy": {"name": "lora"},
                            "data": {"train": write_csv(root / "cls.csv", class_rows(8)), "max_length": 32},
                            "training": FAST_TRAINING, "output_dir": str(runs / "lorarun"), "seed": 1}))
    (runs / "lorarun" / "job.json").write_text(json.dumps({"run_id": "lorarun", "owner": owner_key(OWNER),
                                                           "status": "finished", "name": "cls"}))
    manager = JobManager(runs, poll_interval=0.2)
    demo = build_app(manager)
    yield demo, demo.ft_context, runs
    demo.close()
    manager.shutdown()


def test_gguf_is_offered_for_chat_runs_and_a_lora_classifier_zips_merged(app):
    demo, ctx, _ = app
    chat = export_tab.show(ctx, "chatrun", "model", OWNER, None)
    assert upd(chat[4], "interactive") is True and chat[6] == ""
    cls = export_tab.show(ctx, "lorarun", "merged", OWNER, None)
    assert upd(cls[4], "interactive") is False and "pick an instruction run" in cls[6]
    assert upd(cls[2], "interactive") is True                          # a LoRA run: Merge applies
    assert 'pipeline("text-classification"' in cls[1] and "peft" not in cls[1]
    assert export_tab.pick_run(ctx, "lorarun", OWNER, None) == "merged"
    assert export_tab.pick_run(ctx, "chatrun", OWNER, None) == "model"


def test_build_gguf_serves_the_file_and_its_modelfile_and_leaves_the_run_folder_alone(app):
    demo, ctx, runs = app
    files, note = export_tab.build_gguf(ctx, "chatrun", "q8_0", OTHER, None)   # reading a run: any session
    assert sorted(f.rsplit("/", 1)[1] for f in files) == ["chatrun-q8_0.Modelfile", "chatrun-q8_0.gguf"]
    assert "ollama create chatrun-q8_0 -f chatrun-q8_0.Modelfile" in note and "ollama run chatrun-q8_0" in note
    assert "llama-cli -m chatrun-q8_0.gguf --jinja -cnv" in note and str(ctx.tmp) not in note
    assert not (runs / "chatrun" / "export").exists()
    with pytest.raises(Exception, match="GGUF export is for chat models"):
        export_tab.build_gguf(ctx, "lorarun", "f16", OWNER, None)


def test_merged_zip_of_a_lora_classifier_merges_for_its_owner_only(app):
    demo, ctx, runs = app
    with pytest.raises(Exception, match="only the session that trained it"):
        export_tab.build_zip(ctx, "lorarun", OTHER, "merged", None)
    path, snippet = export_tab.build_zip(ctx, "lorarun", OWNER, "merged", None)
    names = {n.split("/", 1)[1] for n in zipfile.ZipFile(path).namelist()}
    assert "model.safetensors" in names and "adapter_config.json" not in names
    assert (runs / "lorarun" / "model" / "merged").is_dir()
    assert 'pipeline("text-classification", model="merged-loraru")' in snippet     # the zip's top folder


def test_predict_file_reports_progress_and_serves_a_csv(app, tmp_path):
    demo, ctx, _ = app
    data = write_csv(tmp_path / "new texts.csv", [{"text": t} for t in ("goal match", "=1+1 oven", "api code")])
    calls = []
    path, summary = export_tab.predict_file(ctx, data, "lorarun", OTHER, None,
                                            lambda *a, **k: calls.append((a, k)))
    assert path.endswith("predictions-new_texts.csv")
    out = pd.read_csv(path)
    assert out["text"].tolist()[1] == "'=1+1 oven" and set(out["predicted_label"]) <= {"food", "sport", "tech"}
    assert "3 rows (labels and class probabilities)" in summary and "`text`" in summary
    assert calls[0][1]["desc"] == "Loading the model" and calls[-1][0][0] == (3, 3)
    with pytest.raises(Exception, match="No file was uploaded"):
        export_tab.predict_file(ctx, None, "lorarun", OWNER, None, lambda *a, **k: None)
    with pytest.raises(Exception, match="is empty"):
        (tmp_path / "empty.csv").write_text("")
        export_tab.predict_file(ctx, str(tmp_path / "empty.csv"), "lorarun", OWNER, None, lambda *a, **k: None)


def test_the_page_wires_gguf_and_predict_file(app):
    demo, _, _ = app
    fns = {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}
    predict = fns["predict_file"]
    assert predict.api_name == "predict_file"
    assert [getattr(c, "elem_id", None) for c in predict.inputs][:1] == ["bp-file"]
    assert [getattr(c, "elem_id", None) for c in predict.outputs] == ["bp-out", "bp-md"]
    gguf = fns["build_gguf"]
    assert [getattr(c, "elem_id", None) for c in gguf.outputs] == ["gguf-files", "gguf-md"]
