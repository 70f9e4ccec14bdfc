"""Portable exports: a bundled base is named by its public Hub id, no exported file names a path of this
machine, and every exported model loads with plain `transformers.pipeline()` where FineTune Lab is not.

The receiving machine is simulated by one subprocess per task, run with `python -I` from a temporary
folder (no PYTHONPATH, no user site, not the repository: `import finetune_core` fails there), offline,
with HF_HOME pointing at a Hugging Face cache that holds only the public base models: the bundled files
laid out as huggingface_hub's cache under their public repository ids.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import FAST_TRAINING, REPO, class_rows, write_csv
from finetune_core import export, models, portable

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
TEXT_SUFFIXES = (".json", ".md", ".py", ".txt", ".jinja", ".yaml", "Modelfile")

RECEIVER = r'''
import json, sys
try:
    import finetune_core  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("finetune_core is importable here: this check would prove nothing")
from transformers import pipeline

out = {}
for case in json.loads(sys.argv[1]):
    pipe = pipeline(case["task"], model=case["folder"], trust_remote_code=case["trust_remote_code"], device="cpu")
    if case["task"] == "text-classification":
        out[case["name"]] = [{r["label"]: r["score"] for r in row} for row in pipe(case["inputs"], top_k=None)]
    else:
        out[case["name"]] = [pipe(p, max_new_tokens=case["max_new_tokens"], do_sample=False,
                                  return_full_text=False)[0]["generated_text"] for p in case["inputs"]]
print("RESULT " + json.dumps(out))
'''


# ---------------------------------------------------------------------------------------------
# helpers: a machine without this project


def public_hub_cache(hub: Path, repos: dict[str, str]) -> None:
    """`repos` ({public id: local folder}) as a Hugging Face hub cache: models--ORG--NAME/snapshots/<hash>/
    (links to the files) and refs/main naming that snapshot, so from_pretrained(id) resolves offline."""
    for repo_id, folder in repos.items():
        repo = hub / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / SNAPSHOT
        for path in Path(folder).rglob("*"):
            if path.is_file():
                target = snapshot / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(SNAPSHOT)


def run_receiver(home: Path, cases: list[dict]) -> dict:
    """Run RECEIVER in a fresh, isolated interpreter in `home` with only the public base models cached."""
    public_hub_cache(home / "hf" / "hub",
                     {models.BUNDLED[b]["hub_id"]: models.resolve_model(b) for b in models.BUNDLED})
    script = home / "receiver.py"
    script.write_text(RECEIVER)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "HF_HOME": str(home / "hf"),
           "HF_HUB_CACHE": str(home / "hf" / "hub"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-I", str(script), json.dumps(cases)], cwd=home, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def local_roots(*extra) -> set[str]:
    """Folders of this machine that must never appear in an exported file."""
    import site

    roots = {str(Path.home()), sys.prefix, str(REPO), tempfile.gettempdir(), str(models.model_cache_dir()),
             os.environ["FINETUNE_HOME"], *site.getsitepackages(), *map(str, extra)}
    return {r.rstrip("/") for r in roots if r and r != "/"}


def assert_no_local_path(name: str, data: bytes, roots: set[str]) -> None:
    text = data.decode("utf-8", errors="replace")
    leaked = [r for r in roots if r in text]
    assert not leaked, f"{name} names {leaked}"


def unzip_checked(zip_path: Path, dest: Path, roots: set[str]) -> Path:
    """Unzip into dest after checking every text file in it; returns the archive's top folder."""
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if name.endswith(TEXT_SUFFIXES):
                assert_no_local_path(name, zf.read(name), roots)
        zf.extractall(dest)
        top = {n.split("/")[0] for n in zf.namelist()}
    assert len(top) == 1
    return dest / top.pop()


def validation_probs(run: Path) -> tuple[list[str], list[dict]]:
    """The run's own predictions.csv: validation texts and their class probabilities."""
    frame = pd.read_csv(run / "predictions.csv")
    labels = [c[2:] for c in frame.columns if c.startswith("p_")]
    return frame["text"].tolist(), [{label: row[f"p_{label}"] for label in labels} for _, row in frame.iterrows()]


# ---------------------------------------------------------------------------------------------
# names and files (no model runs)


def test_bundled_licenses_are_the_ones_their_files_declare():
    import yaml

    minilm = Path(models.resolve_model("bundled:minilm-l6")) / "README.md"
    front = yaml.safe_load(minilm.read_text(encoding="utf-8").split("---")[1])
    assert models.BUNDLED["bundled:minilm-l6"]["license"] == front["license"] == "apache-2.0"
    info = models.BUNDLED["bundled:smollm2-135m"]
    with open(models._package_dir(info["package"]) / info["gguf"], "rb") as f:
        header = f.read(1 << 16)    # the metadata comes first (gguf.GGUFReader takes ~4 s: it maps every tensor)
    key = header.index(b"general.license")
    # key, then the value's type (uint32 STRING = 8), its length (uint64) and its bytes
    value = header[key + len(b"general.license") + 4:][:8 + 10]
    assert info["license"] == value[8:].decode() == "apache-2.0" and int.from_bytes(value[:8], "little") == 10


def test_public_ids_name_bundled_models_and_resolve_back_to_them_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))      # the public repos are not cached
    minilm = models.resolve_model("bundled:minilm-l6")
    for ref in ("bundled:minilm-l6", "sentence-transformers/all-MiniLM-L6-v2", minilm, minilm + "/"):
        assert models.bundled_id(ref) == "bundled:minilm-l6"
        assert models.public_model_id(ref) == "sentence-transformers/all-MiniLM-L6-v2"
    assert models.resolve_model("sentence-transformers/all-MiniLM-L6-v2") == minilm
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == models.resolve_model("bundled:smollm2-135m")
    assert models.public_model_id("distilbert-base-uncased") == "distilbert-base-uncased"
    assert models.public_model_id(str(tmp_path)) is None and models.bundled_id(str(tmp_path)) is None
    assert portable.export_base_name(str(tmp_path / "my-bert")) == "my-bert"


def test_portable_json_names_the_public_base_and_drops_this_machines_paths():
    adapter = portable.portable_json("adapter_config.json", {"base_model_name_or_path": "/venv/x", "r": 8}, "a/b")
    assert adapter == {"base_model_name_or_path": "a/b", "r": 8}
    config = portable.portable_json("config.json", {"_name_or_path": "/x", "model_type": "bert"}, None)
    assert config == {"model_type": "bert"}
    head = portable.portable_json("config.json", {"model_type": portable.MEAN_POOLING_TYPE,
                                                  "encoder": {"_name_or_path": "/x", "hidden_size": 4}}, None)
    assert head["auto_map"] == portable.AUTO_MAP and head["encoder"] == {"hidden_size": 4}
    tok = portable.portable_json("tokenizer_config.json", {"is_local": True, "local_files_only": True,
                                                           "model_max_length": 512}, None)
    assert tok == {"model_max_length": 512}


def test_the_shipped_head_is_heads_py_and_imports_only_torch_and_transformers():
    code = portable.head_code()
    assert code.endswith((REPO / "finetune_core" / "heads.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would need this project"
            imported.add(node.module.split(".")[0])
    assert imported == {"__future__", "torch", "transformers"}
    for name in portable.AUTO_MAP.values():
        module, cls = name.split(".")
        assert module + ".py" == portable.MODEL_CODE_FILE and f"class {cls}(" in code


# ---------------------------------------------------------------------------------------------
# real runs: their folders, zips, and a machine without this project


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_bert_dir) -> dict:
    """Full and frozen-N classifiers of a tiny BERT: plain models that need no base to load."""
    from finetune_core.config import config_from_dict
    from finetune_core.train import train

    root = tmp_path_factory.mktemp("tiny-portable")
    data = write_csv(root / "train.csv", class_rows(8))
    runs = {}
    for name, strategy in (("full", {"name": "full"}), ("frozen_1", {"name": "frozen", "frozen_layers": 1})):
        train(config_from_dict({"task": "classification", "model": tiny_bert_dir, "strategy": strategy,
                                "data": {"train": data, "max_length": 32}, "training": FAST_TRAINING,
                                "output_dir": str(root / name), "seed": 1}))
        runs[name] = root / name
    return runs


@pytest.mark.slow
def test_bundled_runs_name_their_base_by_public_id_and_still_load_here(minilm_runs, smollm2_lora_run, monkeypatch):
    from finetune_core.generate import load_for_inference, predict_proba

    smollm2_run = smollm2_lora_run[0]
    roots = local_roots(*minilm_runs.values(), smollm2_run)
    for run, base in ((minilm_runs["lora"], "sentence-transformers/all-MiniLM-L6-v2"),
                      (smollm2_run, "HuggingFaceTB/SmolLM2-135M-Instruct")):
        adapter = json.loads((run / "model" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == base
        assert models.model_kind(str(run / "model")) == ("encoder" if "MiniLM" in base else "causal")
    for run in (*minilm_runs.values(), smollm2_run):
        for path in (run / "model").iterdir():
            if path.name.endswith(TEXT_SUFFIXES):
                assert_no_local_path(str(path), path.read_bytes(), roots)
    assert (minilm_runs["frozen_all"] / "model" / portable.MODEL_CODE_FILE).is_file()
    # this project's loaders map the public id back to the bundled copy: same answers as in training
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer, info = load_for_inference(str(minilm_runs["lora"] / "model"))
    texts, expected = validation_probs(minilm_runs["lora"])
    for text, want in zip(texts, expected):
        assert predict_proba(model, tokenizer, text, max_length=32) == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_a_zip_of_every_classification_strategy_loads_with_pipeline_without_this_project(tmp_path, minilm_runs,
                                                                                          tiny_runs):
    """full and frozen-N (tiny BERT), LoRA (its merged zip, the default) and frozen head-only (the
    mean-pooling head's code travels in the zip) give the run's own validation probabilities."""
    runs = {**tiny_runs, **minilm_runs}
    roots = local_roots(*runs.values())
    home = tmp_path / "elsewhere"
    home.mkdir()
    cases, expected = [], {}
    for name, run in runs.items():
        folder = unzip_checked(export.zip_model(run), home, roots)
        assert folder.name == f"{name}-{'merged' if name == 'lora' else 'model'}"
        texts, expected[name] = validation_probs(run)
        cases.append({"name": name, "task": "text-classification", "folder": folder.name, "inputs": texts,
                      "trust_remote_code": name == "frozen_all"})
    assert (home / "frozen_all-model" / portable.MODEL_CODE_FILE).is_file()
    got = run_receiver(home, cases)
    for name in runs:
        assert len(got[name]) == len(expected[name]) > 0
        for row, want in zip(got[name], expected[name]):
            assert row == pytest.approx(want, abs=1e-4), name


@pytest.mark.slow
def test_an_instruction_adapter_zip_answers_like_the_app_without_this_project(tmp_path, smollm2_lora_run):
    """The SmolLM2 LoRA adapter names HuggingFaceTB/SmolLM2-135M-Instruct: transformers finds it in the
    receiver's cache, applies the adapter (peft) and answers greedily as this project does."""
    from finetune_core.generate import generate_batch, load_for_inference

    run = smollm2_lora_run[0]
    home = tmp_path / "elsewhere"
    home.mkdir()
    folder = unzip_checked(export.zip_model(run), home, local_roots(run))
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    prompts = [json.loads(line)["prompt"] for line in (run / "generations.jsonl").read_text().splitlines()[:2]]
    got = run_receiver(home, [{"name": "chat", "task": "text-generation", "folder": folder.name, "inputs": prompts,
                               "max_new_tokens": 12, "trust_remote_code": False}])
    model, tokenizer, info = load_for_inference(str(run / "model"))
    ours = generate_batch(model, tokenizer, prompts, info["template"], max_new_tokens=12, batch_size=1)
    assert [text.strip() for text in got["chat"]] == ours
