"""`python -m finetune_core` as a user runs it: bad input gives one paragraph (problem + fix), exit code
2 and no traceback; --debug shows the traceback; models, audit and a tiny train run work."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, REPO, class_rows, instruction_rows, write_csv, write_jsonl


def cli(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finetune_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_config(path: Path, **values) -> str:
    values.setdefault("output_dir", str(path.parent / "run"))
    values.setdefault("training", {"max_steps": 1, "eval_strategy": "no", "save_strategy": "no"})
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


# Each case: (name, function(tmp dir, tiny model dir) -> CLI args, fragments of the problem, fragments of the fix)
def _data_case(make_file, **data):
    def build(tmp: Path, model: str):
        train = make_file(tmp)
        return ["train", write_config(tmp / "c.yaml", task="classification", model=model,
                                      data={"train": str(train), **data})]
    return build


def _empty(tmp):
    (tmp / "empty.csv").write_bytes(b"")
    return tmp / "empty.csv"


def _xlsx(tmp):
    (tmp / "data.xlsx").write_bytes(b"PK\x03\x04 not really excel")
    return tmp / "data.xlsx"


def _bad_jsonl(tmp):
    (tmp / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": oops}\n',
                                   encoding="utf-8")
    return tmp / "bad.jsonl"


def _one_class(tmp):
    return write_csv(tmp / "one.csv", [{"text": f"text {i}", "label": "spam"} for i in range(10)])


def _no_labels(tmp):
    return write_csv(tmp / "nolabels.csv", [{"text": f"text {i}", "label": ""} for i in range(10)])


def _good(tmp):
    return write_csv(tmp / "good.csv", class_rows(4))


def _model_case(model_ref):
    def build(tmp: Path, model: str):
        (tmp / "not_a_model").mkdir(exist_ok=True)
        (tmp / "not_a_model" / "notes.txt").write_text("hello", encoding="utf-8")
        ref = model_ref.format(tmp=tmp)
        return ["train", write_config(tmp / "c.yaml", task="classification", model=ref,
                                      data={"train": str(_good(tmp))})]
    return build


def _config_case(**values):
    def build(tmp: Path, model: str):
        return ["train", write_config(tmp / "c.yaml", **{"model": model, "data": {"train": str(_good(tmp))},
                                                         **values})]
    return build


def _frozen_all_instruction(tmp: Path, model: str):
    data = write_jsonl(tmp / "i.jsonl", instruction_rows(6))
    return ["train", write_config(tmp / "c.yaml", task="instruction", model=TINY["llama"],
                                  data={"train": data}, strategy={"name": "frozen", "frozen_layers": "all"})]


def _override(tmp: Path, model: str):
    return ["train", write_config(tmp / "c.yaml", model=model, data={"train": str(_good(tmp))}),
            "--set", "training.learning_rat=1e-4"]


BAD_INPUTS = {
    "missing file": (_data_case(lambda t: t / "nope.csv"), ["nope.csv", "does not exist"], ["Check the path"]),
    "unsupported extension": (_data_case(_xlsx), ["data.xlsx", "unsupported extension '.xlsx'"], [".csv", ".jsonl"]),
    "empty file": (_data_case(_empty), ["empty.csv", "empty"], ["Upload a file with a header row"]),
    "missing column": (_data_case(_good, text_column="body"),
                       ["Column 'body'", "Columns found: text, label"], ["data.text_column"]),
    "single class": (_data_case(_one_class), ["only one class ('spam')"], ["Add examples of the other classes"]),
    "labels missing": (_data_case(_no_labels), ["empty label in column 'label'"], ["Fill in the labels"]),
    "bad json line": (_data_case(_bad_jsonl), ["bad.jsonl' line 3 is not valid JSON"], ["Fix or delete line 3"]),
    "unknown hub model": (_model_case("no-such-model-xyz"), ["'no-such-model-xyz'", "cannot be reached"],
                          ["bundled:minilm-l6"]),
    "unknown bundled model": (_model_case("bundled:gpt-17"), ["Unknown bundled model 'bundled:gpt-17'"],
                              ["bundled:minilm-l6, bundled:smollm2-135m"]),
    "not a model directory": (_model_case("{tmp}/not_a_model"), ["not a model directory (no config.json"],
                              ["Point to the folder that holds config.json"]),
    "model path is a file": (_model_case("{tmp}/not_a_model/notes.txt"), ["does not exist or is not a folder"],
                             ["contains config.json"]),
    "unknown config key": (_config_case(modle="x"), ["Unknown config key 'modle'. Did you mean 'model'?"],
                           ["Valid keys here"]),
    "unknown override key": (_override, ["training.learning_rat", "Did you mean 'learning_rate'?"],
                             ["TrainingArguments"]),
    "bad strategy": (_config_case(strategy={"name": "lorra"}), ["Unknown strategy 'lorra'. Did you mean 'lora'?"],
                     ["full, frozen, lora"]),
    "frozen all for instruction": (_frozen_all_instruction, ["no new head", "nothing would learn"],
                                   ["frozen_layers to a number below 2"]),
    "bad lora target_modules": (_config_case(strategy={"name": "lora", "lora": {"target_modules": ["query", "q_proj"]}}),
                                ["target_modules: 'q_proj' matches no layer of this bert model",
                                 "Its linear layers are: classifier, dense, key, query, value."],
                                ["target_modules: auto"]),
    "missing config": (lambda tmp, model: ["train", str(tmp / "missing.yaml")], ["missing.yaml' does not exist"],
                       ["examples/configs"]),
}


TINY: dict = {}


# Two cases run as real `python -m finetune_core` processes (exit code and stderr end to end, as
# tests/test_bad_inputs_cli.py does for five more); the others call cli.main() in this process, which
# prints the same paragraph and returns the same code in milliseconds instead of a process start each.
REAL_PROCESS = ("missing file", "unknown override key")


@pytest.fixture(scope="module")
def real_process_results(tmp_path_factory, tiny_bert_dir, tiny_llama_dir):
    TINY["llama"] = tiny_llama_dir
    jobs = {}
    for name in REAL_PROCESS:
        tmp = tmp_path_factory.mktemp(name.replace(" ", "_"))
        jobs[name] = (BAD_INPUTS[name][0](tmp, tiny_bert_dir), tmp)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(cli, *args, cwd=tmp) for name, (args, tmp) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_paragraph_exit_2_no_traceback(name, request, tmp_path, tiny_bert_dir, tiny_llama_dir,
                                                         capsys, monkeypatch):
    build, problem, fix = BAD_INPUTS[name]
    if name in REAL_PROCESS:
        res = request.getfixturevalue("real_process_results")[name]
        rc, out, err = res.returncode, res.stdout, res.stderr
    else:
        from finetune_core.cli import main

        TINY["llama"] = tiny_llama_dir
        monkeypatch.chdir(tmp_path)
        args = build(tmp_path, tiny_bert_dir)
        capsys.readouterr()
        rc = main(list(args))
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, err
    message = errors[0]
    for fragment in problem + fix:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # the fix follows the problem in the same paragraph
    assert message.index(problem[0]) < message.index(fix[0])


def test_debug_shows_the_traceback(tmp_path, tiny_bert_dir):
    cfg = write_config(tmp_path / "c.yaml", model=tiny_bert_dir, data={"train": str(tmp_path / "nope.csv")})
    res = cli("--debug", "train", cfg, cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "DataError" in res.stderr
    assert "Error: The data file" in res.stderr


def test_models_lists_both_bundled_ids(tmp_path):
    res = cli("models", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    for model_id in ("bundled:minilm-l6", "bundled:smollm2-135m"):
        assert rows[model_id]["available_offline"] is True
    assert rows["bundled:minilm-l6"]["kind"] == "encoder" and rows["bundled:smollm2-135m"]["kind"] == "causal"
    text = cli("models", cwd=tmp_path)
    assert text.returncode == 0 and "bundled:minilm-l6" in text.stdout and "bundled:smollm2-135m" in text.stdout


def test_audit_json_on_example_data(tmp_path):
    res = cli("audit", str(EXAMPLES / "domains.csv"), "--task", "classification", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["n_rows"] == 160 and report["task"] == "classification"
    assert report["class_distribution"] == {"finance": 40, "legal": 40, "medical": 40, "technology": 40}
    assert isinstance(report["warnings"], list)
    bad = cli("audit", str(tmp_path / "nope.csv"), "--task", "classification", "--json", cwd=tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_train_runs_from_the_cli_on_a_latin1_file(tmp_path, tiny_bert_dir):
    """A tiny run end to end: Latin-1 data, YAML config, --set overrides parsed as YAML scalars."""
    rows = class_rows(5)
    rows[0]["text"] = "crème brûlée au café"
    data = tmp_path / "latin1.csv"
    data.write_bytes("text,label\n".encode() + "".join(f"{r['text']},{r['label']}\n" for r in rows).encode("latin-1"))
    cfg = write_config(tmp_path / "c.yaml", model=tiny_bert_dir, data={"train": str(data)}, strategy={"name": "lora"})
    res = cli("train", cfg, "--set", "strategy.name=full", "--set", "training.learning_rate=1e-3",
              "--set", "training.max_steps=2", "--set", "data.validation=null", "--set", "data.max_length=32",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Trainable: " in res.stdout and "(100.00%)" in res.stdout
    assert "Results (validation):" in res.stdout and "accuracy" in res.stdout
    run_yaml = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert run_yaml["strategy"]["name"] == "full" and run_yaml["training"]["learning_rate"] == 1e-3
    assert run_yaml["training"]["max_steps"] == 2 and run_yaml["data"]["max_length"] == 32
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["strategy"] == "full"
    assert metrics["total_seconds"] >= metrics["train_seconds"] > 0
    last = res.stdout.strip().splitlines()[-1]
    assert f"train_seconds {metrics['train_seconds']:.1f} (training loop)" in last
    assert f"total_seconds {metrics['total_seconds']:.1f} (whole run)" in last
    # `train` restarted itself with glibc's huge-page heap only if asked to and supported (malloc.py)
    from finetune_core.malloc import with_hugepages

    assert metrics["hugepage_heap"] is ("GLIBC_TUNABLES" in with_hugepages(
        {"FINETUNE_HUGEPAGES": os.environ.get("FINETUNE_HUGEPAGES", "")}))
