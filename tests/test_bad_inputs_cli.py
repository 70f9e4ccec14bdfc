"""Every case of tests/badinputs.py through the CLI: refused ones exit 2 with one message naming the
problem and then the fix, no traceback; handled ones (latin-1, BOM, formulas, HTML, a 50 MB file, ...)
exit 0 and read the data right.

Most cases call `finetune_core.cli.main([...])` in this process (milliseconds each); a handful run as
real `python -m finetune_core` processes to prove the exit code and the absence of a traceback end to end.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import badinputs as B
from conftest import REPO
from finetune_core.cli import main

CASES = {c.name: c for c in B.CASES}
NEEDS_LLAMA = {c.name for c in B.CASES if c.model == "tiny-llama" and c.command == "train"}
SUBPROCESS_CASES = ["xlsx renamed .csv", "JSONL with one broken line", "hub model id offline",
                    "negative learning rate", "latin-1 file"]


def test_the_generator_has_at_least_30_distinct_cases():
    assert len(CASES) == len(B.CASES) >= 30
    refused = [c for c in B.CASES if c.exit == 2]
    handled = [c for c in B.CASES if c.exit == 0]
    assert len(refused) >= 30 and len(handled) >= 6
    assert all(c.expect for c in refused) and all(c.outcome for c in handled)


@pytest.fixture
def models(request):
    out = {"tiny-bert": request.getfixturevalue("tiny_bert_dir")}
    if request.node.callspec.params.get("name") in NEEDS_LLAMA:
        out["tiny-llama"] = request.getfixturevalue("tiny_llama_dir")
    return out


def assert_in_order(text: str, fragments: list[str]) -> None:
    pos = 0
    for fragment in fragments:
        found = text.find(fragment, pos)
        assert found >= 0, f"{fragment!r} not found (in this order) in:\n{text}"
        pos = found + len(fragment)


def check_result(case: B.BadInput, tmp, rc: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err
    assert rc == case.exit, f"exit {rc}, expected {case.exit}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
    if case.exit == 2:
        if err.startswith("usage:"):                        # argparse refuses before our code runs
            assert_in_order(err, case.expect)
            return
        assert err.startswith("Error: ") and err.count("Error: ") == 1, err
        assert "unexpected" not in err, err
        assert_in_order(err, case.expect)
    else:
        assert "Error" not in err, err
        assert_in_order(out + err, case.expect)
        if case.check:
            case.check(tmp, out)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_in_process(name, tmp_path, models, capsys, monkeypatch):
    case = CASES[name]
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    argv = B.cli_args(case, tmp_path, models)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:                                # argparse
        rc = exc.code
    captured = capsys.readouterr()
    check_result(case, tmp_path, rc, captured.out, captured.err)


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory, tiny_bert_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    jobs = {}
    for name in SUBPROCESS_CASES:
        tmp = tmp_path_factory.mktemp("sub")
        argv = B.cli_args(CASES[name], tmp, {"tiny-bert": tiny_bert_dir})
        jobs[name] = (argv, tmp, {**env, **CASES[name].env})

    def run(name):
        argv, tmp, case_env = jobs[name]
        return subprocess.run([sys.executable, "-m", "finetune_core", *argv], cwd=tmp, env=case_env,
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(SUBPROCESS_CASES, pool.map(run, SUBPROCESS_CASES)))
    return {name: (results[name], jobs[name][1]) for name in SUBPROCESS_CASES}


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_as_a_real_process(name, subprocess_results):
    res, tmp = subprocess_results[name]
    check_result(CASES[name], tmp, res.returncode, res.stdout, res.stderr)
