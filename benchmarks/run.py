"""`make bench`: run the benchmarks, write benchmarks/results/NAME.json, refresh the results table in README.md and
benchmarks/README.md.

    python -m benchmarks.run                      # everything (~25 minutes on 2 CPU cores)
    python -m benchmarks.run --quick              # short versions (results/NAME.quick.json, README untouched)
    python -m benchmarks.run --only instruction   # one (or a comma-separated list)
    python -m benchmarks.run --table              # only rebuild the README table from results/*.json

Each benchmark runs in its own process (one's memory and threads never affect the next), and inside it
both sides of every comparison run back to back and are reported as a ratio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

from . import common as C

BENCHMARKS = ["instruction", "time_to_result", "preference", "loss_head", "ideas", "cached_features", "memory",
              "app_latency", "estimate"]
READMES = [C.REPO / "benchmarks" / "README.md", C.REPO / "README.md"]   # both carry the results block
START, END = "<!-- results:start -->", "<!-- results:end -->"


def run_one(name: str, quick: bool, out_dir: Path | None, compile: bool = False) -> dict:
    module = importlib.import_module(f"benchmarks.{name}")
    kwargs = {"quick": quick, "out_dir": out_dir}
    if name == "ideas":
        kwargs["compile"] = compile
    return module.run(**kwargs)


def table(results: dict[str, dict]) -> str:
    lines = ["| benchmark | measurement | result | target | met |", "|---|---|---|---|---|"]
    for name in BENCHMARKS:
        r = results.get(name)
        if not r:
            continue
        for row in r.get("summary", []):
            met = {True: "yes", False: "**no**", None: ""}[row.get("met")]
            lines.append(f"| {name} | {row['what']} | {row['value']} | {row.get('target', '')} | {met} |")
    return "\n".join(lines)


def _machine(m: dict) -> str:
    return (f"{m['cpu']} ({m['simd']}), {m['physical_cores']} physical cores / {m['logical_cpus']} "
            f"logical, {m['memory_gb']} GB RAM; torch {m['torch']}, transformers {m['transformers']}, "
            f"Python {m['python']}, {m['torch_threads']} torch threads, float32")


def machine_line(results: dict[str, dict]) -> str:
    """The machine(s) the saved results come from; results refreshed on another machine say which."""
    names = [n for n in BENCHMARKS if n in results]
    if not names:
        return ""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_machine(results[n]["machine"]), []).append(n)
    parts = []
    for desc, members in groups.items():
        dates = sorted(results[n]["machine"]["date"] for n in members)
        who = "" if len(groups) == 1 else f" ({', '.join(members)})"
        parts.append(f"{desc}{who}. Measured {dates[0]} to {dates[-1]}")
    label = "Machine" if len(groups) == 1 else "Machines"
    return (f"{label}: " + "; ".join(parts) + "; other jobs shared the cores (1-minute load average at the "
            f"start: {', '.join(str(round(results[n]['machine']['load_average'][0], 1)) for n in names)}).")


def load_results(quick: bool = False) -> dict[str, dict]:
    out = {}
    for name in BENCHMARKS:
        path = C.results_path(name, quick)
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def update_readme(results: dict[str, dict]) -> None:
    """Rewrite the block between the results markers in each README that has them."""
    if not results:
        return
    block = f"{START}\n{machine_line(results)}\n\n{table(results)}\n{END}"
    for readme in READMES:
        if not readme.exists():
            continue
        text = readme.read_text(encoding="utf-8")
        if START not in text or END not in text:
            continue
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        readme.write_text(head + block + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="short versions; results go to NAME.quick.json")
    p.add_argument("--compile", action="store_true", help="ideas: also measure torch.compile (slow to compile)")
    p.add_argument("--table", action="store_true", help="only rebuild the README table from saved results")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",")] if a.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if not a.table:
        # Training in a benchmark gets the same heap as `python -m finetune_core train` (both sides).
        from finetune_core.malloc import restart_with_hugepages

        restart_with_hugepages()
    if a.table:
        update_readme(load_results())
        print(table(load_results(a.quick)))
        return 0
    if a.in_process or len(names) == 1:
        for name in names:
            run_one(name, a.quick, None, a.compile)
    else:
        failed = []
        for name in names:
            t = time.time()
            print(f"=== {name} ===", flush=True)
            cmd = [C.python(), "-m", "benchmarks.run", "--only", name] + (["--quick"] if a.quick else []) \
                + (["--compile"] if a.compile else [])
            rc = subprocess.call(cmd, cwd=C.REPO)
            print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t:.0f}s ===",
                  flush=True)
            if rc:
                failed.append(name)
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
    results = load_results(a.quick)
    if not a.quick:
        update_readme(results)
    print(table({n: r for n, r in results.items() if n in names}))
    return 0 if a.in_process or len(names) == 1 or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
