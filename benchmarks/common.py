"""Shared helpers for the benchmarks: paths, machine description, matmul peak, results, timing.

Every benchmark runs both sides of its comparison in one process run, back to back, and reports the
ratio: this machine's cores are often shared, so absolute seconds drift between runs while ratios of
back-to-back measurements stay meaningful.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SMOLLM2 = "bundled:smollm2-135m"
MINILM = "bundled:minilm-l6"


def quiet_env() -> None:
    """Offline, quiet libraries; set before transformers is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def datasets_dir() -> Path:
    """`../shared/datasets` relative to the repository root (env FINETUNE_DATASETS overrides)."""
    env = os.environ.get("FINETUNE_DATASETS")
    return Path(env) if env else (REPO.parent / "shared" / "datasets").resolve()


def self_instruct_rows() -> list[dict]:
    path = datasets_dir() / "self_instruct_seed_tasks.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the benchmarks need ../shared/datasets next to the repo "
                                "(or FINETUNE_DATASETS pointing at it).")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    import torch
    import transformers

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gb = psutil.virtual_memory().total / 2**30
    except Exception:  # noqa: BLE001
        physical, mem_gb = None, None
    flags = cpu_flags()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return {"cpu": cpu_model(), "physical_cores": physical, "logical_cpus": os.cpu_count(), "simd": simd,
            "memory_gb": round(mem_gb, 1) if mem_gb else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def matmul_peak(seconds: float = 2.0, n: int = 2048) -> float:
    """Best fp32 matmul GFLOP/s over `seconds` of n x n products with torch's current thread count.

    The best single product is taken (not the mean) so a moment when another process held a core
    does not lower the peak we compare against: MFU against it is conservative.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t
        best = max(best, 2 * n ** 3 / dt / 1e9)
    return round(best, 1)


@contextmanager
def timed(store: dict, key: str):
    t = time.perf_counter()
    yield
    store[key] = time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# results


def results_path(name: str, quick: bool, out_dir: Path | None = None) -> Path:
    folder = Path(out_dir) if out_dir else RESULTS
    return folder / (f"{name}.quick.json" if quick else f"{name}.json")


def write_result(name: str, result: dict, quick: bool, out_dir: Path | None = None) -> Path:
    path = results_path(name, quick, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "quick": quick, "machine": machine_info(), **result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for one benchmark's runs (trained models: ~0.5 GB each), removed when the
    process exits; FINETUNE_BENCH_KEEP=1 keeps it for inspection."""
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix=f"bench_{prefix}_"))
    if os.environ.get("FINETUNE_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def python() -> str:
    return sys.executable


def run_json_subprocess(module: str, args: list[str], timeout: float = 900, env: dict | None = None) -> dict:
    """Run `python -m module args...` from the repo root; its last stdout line is a JSON object."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([python(), "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"
