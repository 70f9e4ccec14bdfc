"""Run the same data with several strategies and compare them: the article's Level-2 exercise.

    python -m finetune_core compare examples/configs/classification_lora.yaml --strategies full,frozen,lora
    result = compare("cfg.yaml", ["full", "frozen", "lora"], ["training.max_steps=20"])
    result["markdown"]        # table + plain-language reading; also in <output_dir>/comparison.md
    result["rows"]            # one dict per strategy; also in <output_dir>/comparison.json

Each strategy trains in its own process (`python -m finetune_core train`), one after the other, into
`<output_dir>/<strategy>/`, so each run's `peak_rss_mb` is that strategy's own and its timings are not
disturbed by another run. Every run uses the same data, split and seed. What differs, besides the
strategy, is said in the notes of comparison.md:

- learning rate: a strategy other than the config's own uses its default learning rate
  (`config.default_learning_rate`), because a rate tuned for one strategy is wrong for another
  (LoRA and a frozen head want ~20x the rate of full fine-tuning). A rate given with `--set` applies to all.
- frozen on an instruction or preference task: `frozen_layers: all` leaves nothing to train on a causal
  LM (there is no new head), so the comparison freezes the embeddings and all but the last two blocks.

Writing a file named `STOP` into `<output_dir>/` stops the running strategy (it is evaluated as it is)
and skips the ones not started yet.

The pieces are reusable by a caller that runs the strategies some other way (the app's job queue):
`plan_runs` gives one validated config per strategy, `strategy_row` turns a finished run's
metrics.json into its table row, `render_markdown` writes the table and its reading.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import yaml

from . import rundir
from .config import (GENERATIVE_TASKS, STRATEGIES, RunConfig, _closest, apply_overrides, config_from_dict,
                     config_to_dict, default_learning_rate, load_config, parse_override, yaml_load)
from .errors import ConfigError, FinetuneError
from .events import make_event, read_events
from .jobs import start_worker
from .models import resolve_model
from .procs import end_worker

KEEP_TRAINABLE_BLOCKS = 2        # frozen on an instruction task: the last 2 blocks learn
NAMES = {"full": "Full fine-tuning", "frozen": "Frozen backbone", "lora": "LoRA"}
POLL_SECONDS = 0.5
FORGETTING_NA = "n/a (classification)"   # compare rows and comparison.md for classifiers


# ---------------------------------------------------------------------------------------------
# per-strategy configs


def _raw_values(config) -> dict:
    """The config as a plain dict, before overrides (a YAML path, a dict or a RunConfig)."""
    if isinstance(config, RunConfig):
        return config_to_dict(config)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    try:
        values = yaml_load(Path(config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        values = None
    if not isinstance(values, dict):
        load_config(config)     # raises the same message as `train` for a missing or malformed file
    return values


def parse_strategies(strategies) -> list[str]:
    if strategies is None:
        return list(STRATEGIES)
    if isinstance(strategies, str):
        strategies = strategies.split(",")
    out: list[str] = []
    for s in strategies:
        s = str(s).strip().lower()
        if not s:
            continue
        if s not in STRATEGIES:
            raise ConfigError(f"Unknown strategy '{s}' in --strategies.{_closest(s, STRATEGIES)}",
                              f"Use a comma-separated list of: {', '.join(STRATEGIES)}.")
        if s not in out:
            out.append(s)
    if not out:
        raise ConfigError("No strategy to compare.", "Pass --strategies full,frozen,lora (or a subset).")
    return out


def _num_blocks(model_id: str) -> int:
    from transformers import AutoConfig     # deferred: `import finetune_core.compare` stays light

    cfg = AutoConfig.from_pretrained(resolve_model(model_id))
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ConfigError(f"Could not read the number of layers of '{model_id}' to freeze all but the last ones.",
                      "Set strategy.frozen_layers to a number with --set strategy.frozen_layers=N.")


def plan_runs(config, strategies, overrides: list[str] | None = None) -> tuple[dict, list[dict], list[str]]:
    """(resolved base config dict, one {strategy, values, ...} per strategy, notes for the reader)."""
    raw = _raw_values(config)
    base = config_to_dict(config_from_dict(apply_overrides(copy.deepcopy(raw), overrides)))
    own = base["strategy"]["name"]
    out_dir = Path(base["output_dir"])
    override_keys = {".".join(parse_override(o)[0]) for o in overrides or []}
    lr_from_set = "training.learning_rate" in override_keys
    file_lr = (raw.get("training") or {}).get("learning_rate")
    notes: list[str] = []
    plans = []
    for s in parse_strategies(strategies):
        values = copy.deepcopy(raw)
        dropped_lr = False
        if s != own and file_lr is not None and isinstance(values.get("training"), dict):
            values["training"].pop("learning_rate", None)
            dropped_lr = True
        values = apply_overrides(values, overrides)
        values.setdefault("strategy", {})
        if not isinstance(values["strategy"], dict):
            values["strategy"] = {}
        values["strategy"]["name"] = s
        if s != "frozen" and values["strategy"].get("cache_features") is True:
            values["strategy"]["cache_features"] = "auto"     # only meaningful (and valid) for frozen
        values["output_dir"] = str(out_dir / s)
        values["resume"] = False
        frozen_note = None
        frozen_all = values["strategy"].get("frozen_layers", "all") == "all"
        if s == "frozen" and base["task"] in GENERATIVE_TASKS and frozen_all:
            n = _num_blocks(base["model"])
            k = max(0, n - KEEP_TRAINABLE_BLOCKS)
            values["strategy"]["frozen_layers"] = k
            frozen_note = (f"frozen: the config says `frozen_layers: all`, which leaves nothing to train on a "
                           f"language model (it has no new head), so this comparison froze the embeddings and "
                           f"the first {k} of {n} blocks; the last {n - k} learn.")
            notes.append(frozen_note)
        cfg = config_from_dict(values)          # validate every run before any of them starts
        plans.append({"strategy": s, "values": config_to_dict(cfg), "dropped_learning_rate": dropped_lr,
                      "frozen_note": frozen_note})
    dropped = [p["strategy"] for p in plans if p["dropped_learning_rate"]]
    if dropped:
        notes.insert(0, f"learning rate: the config's `training.learning_rate: {file_lr}` is tuned for `{own}`; "
                        f"{', '.join(f'`{d}`' for d in dropped)} used {'its' if len(dropped) == 1 else 'their'} "
                        "own default learning rate instead (shown in the table).")
    if lr_from_set:
        notes.insert(0, "learning rate: `--set training.learning_rate` applies to every strategy, as given.")
    if base["task"] == "classification" and any(p["strategy"] == "frozen" and
                                                p["values"]["strategy"]["frozen_layers"] == "all" for p in plans):
        frozen_plan = next(p for p in plans if p["strategy"] == "frozen")
        cached = frozen_plan["values"]["strategy"]["cache_features"] is not False
        notes.append("frozen: only the new classification head trains (`frozen_layers: all`)" +
                     ("; the encoder's outputs are computed once and reused every epoch, which is why it is so fast."
                      if cached else "."))
    return base, plans, notes


# ---------------------------------------------------------------------------------------------
# running


def _emit(echo, message: str, **fields) -> None:
    if echo:
        echo(make_event("info", message=message, **fields))


def _last_error(log_path: Path) -> str:
    """The worker's own error message (its last "Error:" line), else the log's last line."""
    if not log_path.exists():
        return "the training process failed before writing a log"
    lines = [ln.strip() for ln in rundir.tail_lines(log_path, 200) if not ln.startswith("$ ")]
    for ln in reversed(lines):
        if ln.startswith("Error:"):
            return ln[len("Error:"):].strip()
    return lines[-1] if lines else "the training process exited without a message"


def _run_one(plan: dict, echo, stop_path: Path) -> tuple[dict | None, float, str | None, bool]:
    """Train one strategy in a child process: (metrics or None, wall seconds, error, stopped)."""
    run_dir = Path(plan["values"]["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.metrics_path(run_dir).unlink(missing_ok=True)
    rundir.clear_stop(run_dir)
    cfg_path = run_dir / rundir.COMPARE_INPUT_FILE
    rundir.atomic_write_text(cfg_path, yaml.safe_dump(plan["values"], sort_keys=False))
    events_path = rundir.events_path(run_dir)
    offset = events_path.stat().st_size if events_path.exists() else 0
    log_path = run_dir / rundir.COMPARE_LOG_FILE
    stopped = False
    t0 = time.time()
    # plain python, never FINETUNE_LAUNCHER: each strategy's peak memory is its own process's
    proc = start_worker(cfg_path, log_path, use_launcher=False, truncate_log=True)
    try:
        while True:
            code = proc.poll()
            events, offset = read_events(events_path, offset)
            if echo:
                for ev in events:
                    echo(ev)
            if code is not None:
                break
            if not stopped and stop_path.exists():
                stopped = True
                rundir.request_stop(run_dir, "stop requested by compare")
            time.sleep(POLL_SECONDS)
    finally:
        end_worker(proc, grace=30.0)       # compare itself was interrupted: do not leave a trainer behind
    wall = time.time() - t0
    if proc.returncode != 0:
        return None, wall, _last_error(log_path), stopped
    metrics = rundir.read_metrics(run_dir)
    if not metrics:
        return None, wall, "the run finished but wrote no metrics.json", stopped
    return metrics, wall, None, stopped or bool(metrics.get("stopped_by_user"))


def strategy_row(plan: dict, task: str, metrics: dict | None, wall: float, error: str | None,
                 stopped: bool) -> dict:
    """The comparison table's row for one strategy's run (`plan` from plan_runs; metrics None when
    the run failed)."""
    s = plan["strategy"]
    values = plan["values"]
    row = {"strategy": s, "name": NAMES[s], "status": "failed" if error else ("stopped" if stopped else "ok"),
           "error": error, "output_dir": values["output_dir"], "wall_seconds": round(wall, 2),
           "frozen_layers": values["strategy"]["frozen_layers"] if s == "frozen" else None,
           "main_metric": "f1_weighted" if task == "classification" else "eval_loss",
           "higher_is_better": task == "classification"}
    if metrics is None:
        return row
    lr = values["training"].get("learning_rate")
    lr_source = "config"
    if lr is None:
        lr = default_learning_rate(task, metrics.get("model_kind", "encoder"), s, values["strategy"]["frozen_layers"])
        lr_source = "default"
    total = metrics.get("total_params") or 0
    row.update({
        "learning_rate": lr, "learning_rate_source": lr_source,
        "train_seconds": metrics.get("train_seconds"), "total_seconds": metrics.get("total_seconds"),
        "trainable_params": metrics.get("trainable_params"), "total_params": total,
        "trainable_percent": 100.0 * (metrics.get("trainable_params") or 0) / total if total else None,
        "peak_rss_mb": metrics.get("peak_rss_mb"), "global_step": metrics.get("global_step"),
        "max_steps": metrics.get("max_steps"), "epochs_completed": metrics.get("epochs_completed"),
        "stopped_early": metrics.get("stopped_early"), "val_samples": metrics.get("val_samples"),
        "device": metrics.get("device"),
    })
    if task == "classification":
        before = metrics.get("before_finetuning") or {}
        row.update({"main_metric_value": metrics.get("f1_weighted"), "main_metric_before": before.get("f1_weighted"),
                    "accuracy": metrics.get("accuracy"), "f1_weighted": metrics.get("f1_weighted"),
                    "f1_macro": metrics.get("f1_macro"), "accuracy_before": before.get("accuracy"),
                    "baselines": metrics.get("baselines"),
                    # the forgetting probe is a language model's perplexity on general text: an encoder
                    # with a classification head has none, so say so instead of leaving a blank
                    "forgetting_change": None, "forgetting_verdict": FORGETTING_NA})
    else:
        row.update({"main_metric_value": metrics.get("eval_loss"), "main_metric_before": metrics.get("eval_loss_before"),
                    "eval_loss": metrics.get("eval_loss"), "perplexity": metrics.get("perplexity"),
                    "perplexity_before": metrics.get("perplexity_before"),
                    "rougeL": metrics.get("rougeL"), "rougeL_before": metrics.get("rougeL_before"),
                    "general_perplexity_before": metrics.get("general_perplexity_before"),
                    "general_perplexity": metrics.get("general_perplexity"),
                    "forgetting_change": metrics.get("general_perplexity_change"),
                    "forgetting_verdict": metrics.get("forgetting_verdict")})
    return row


def compare(config, strategies=None, overrides: list[str] | None = None, echo=None) -> dict:
    """Train each strategy on the same data; write comparison.json and comparison.md; return
    {"rows", "markdown", "path" (comparison.json), "markdown_path", "output_dir", "notes"}."""
    base, plans, notes = plan_runs(config, strategies, overrides)
    out_dir = Path(base["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stop_path = rundir.stop_path(out_dir)
    rundir.clear_stop(out_dir)
    task = base["task"]
    rows = []
    for i, plan in enumerate(plans, 1):
        if stop_path.exists():
            skipped = strategy_row(plan, task, None, 0.0, "skipped: stop requested", True)
            rows.append(skipped | {"status": "skipped"})
            continue
        _emit(echo, f"[compare {i}/{len(plans)}] {NAMES[plan['strategy']]} -> {plan['values']['output_dir']}/",
              strategy=plan["strategy"], index=i, total=len(plans))
        metrics, wall, error, stopped = _run_one(plan, echo, stop_path)
        row = strategy_row(plan, task, metrics, wall, error, stopped)
        rows.append(row)
        if error:
            _emit(echo, f"[compare] {plan['strategy']} failed: {error}", strategy=plan["strategy"])
    if not any(r["status"] in ("ok", "stopped") for r in rows):
        errors = "; ".join(f"{r['strategy']}: {r['error']}" for r in rows)
        raise FinetuneError(f"Every strategy of the comparison failed ({errors}).",
                            f"Fix the first problem named, or run `python -m finetune_core train` with one "
                            f"strategy to see it alone. Logs: {out_dir}/<strategy>/compare.log.")
    source = str(config) if isinstance(config, (str, Path)) else None
    markdown = render_markdown(rows, task, base, notes, source)
    summary = {"config": source, "task": task, "model": base["model"], "seed": base["seed"],
               "data": {k: base["data"].get(k) for k in ("train", "validation", "val_size")},
               "overrides": list(overrides or []), "strategies": [p["strategy"] for p in plans],
               "notes": notes, "rows": rows, "created": time.time()}
    json_path = out_dir / rundir.COMPARISON_JSON
    md_path = out_dir / rundir.COMPARISON_MD
    rundir.write_json(json_path, summary)
    rundir.atomic_write_text(md_path, markdown)
    return {"rows": rows, "markdown": markdown, "path": str(json_path), "markdown_path": str(md_path),
            "output_dir": str(out_dir), "notes": notes}


# ---------------------------------------------------------------------------------------------
# markdown


def fmt_num(v, fmt: str = "{:.3f}") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "–" if v is None else str(v)
    return "–" if math.isnan(v) else fmt.format(v)


def fmt_params(n) -> str:
    if n is None:
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(int(n))


def fmt_pct(p) -> str:
    if p is None:
        return "–"
    if p >= 99.95:
        return "100%"
    return f"{p:.2f}%" if p >= 0.01 else f"{p:.3f}%"


def variant(row: dict) -> str:
    """What a frozen row froze, for its label: " (head only)" or " (N layers)"; "" for the others."""
    if row["strategy"] != "frozen":
        return ""
    layers = row.get("frozen_layers")
    return " (head only)" if layers in (None, "all") else f" ({layers} layers)"


def _secs(x) -> str:
    return fmt_num(x, "{:.1f}" if x is not None and float(x) < 100 else "{:.0f}")


def _signed_pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.1%}"


def render_markdown(rows: list[dict], task: str, base: dict, notes: list[str], source: str | None = None,
                    with_table: bool = True) -> str:
    """comparison.md: the table, the baselines, the reading and the notes. with_table=False leaves the
    title and the table out (the app shows its own table next to it)."""
    cls = task == "classification"
    metric = "F1 (weighted)" if cls else "validation loss"
    lines = ["# Strategy comparison", ""]
    ok = [r for r in rows if r.get("main_metric_value") is not None]
    n_val = next((r.get("val_samples") for r in ok if r.get("val_samples")), None)
    lines.append(f"{'`' + source + '`, ' if source else ''}task **{task}**, model `{base['model']}`, "
                 f"{n_val if n_val is not None else '?'} validation rows; every strategy trained on the same data, "
                 f"split and seed ({base['seed']}), one after the other, each in its own process.")
    lines.append("")
    if cls:
        head = ["strategy", f"{metric} before → after", "accuracy", "train s", "run s", "steps", "trainable params",
                "peak memory (MB)", "learning rate"]
    else:
        head = ["strategy", f"{metric} before → after", "ROUGE-L before → after", "train s", "run s", "steps",
                "trainable params", "peak memory (MB)", "forgetting (general-text perplexity)", "learning rate"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        if r.get("main_metric_value") is None:
            cells = [f"**{r['strategy']}**", f"{r['status']}: {r.get('error') or ''}".strip()] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
            continue
        name = r["strategy"] + variant(r)
        if r["status"] == "stopped":
            name += " — stopped"
        lr = fmt_num(r.get("learning_rate"), "{:.0e}") + \
            (" (default)" if r.get("learning_rate_source") == "default" else "")
        params = f"{fmt_params(r.get('trainable_params'))} ({fmt_pct(r.get('trainable_percent'))})"
        cells = [f"**{name}**", f"{fmt_num(r.get('main_metric_before'))} → **{fmt_num(r['main_metric_value'])}**"]
        if cls:
            cells.append(fmt_num(r.get("accuracy")))
        else:
            cells.append(f"{fmt_num(r.get('rougeL_before'))} → {fmt_num(r.get('rougeL'))}")
        steps = f"{r.get('global_step', '?')}/{r.get('max_steps', '?')}"
        if r.get("stopped_early") and r["status"] != "stopped":
            steps += " (early stop)"
        cells += [fmt_num(r.get("train_seconds"), "{:.1f}"), fmt_num(r.get("total_seconds"), "{:.1f}"), steps, params,
                  fmt_num(r.get("peak_rss_mb"), "{:.0f}")]
        if not cls:
            cells.append(f"{_signed_pct(r.get('forgetting_change'))} ({_verdict_short(r.get('forgetting_verdict'))})")
        cells.append(lr)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if cls:
        bl = next((r.get("baselines") for r in ok if r.get("baselines")), None)
        if bl:
            lines.append(f"Baselines on the same split: majority class F1 {fmt_num(bl['majority']['f1_weighted'])}, "
                         f"TF-IDF + logistic regression F1 {fmt_num(bl['tfidf_logreg']['f1_weighted'])} "
                         f"(accuracy {fmt_num(bl['tfidf_logreg']['accuracy'])}).")
            lines.append("")
    lines.append("## Reading")
    lines.append("")
    lines += [f"- {s}" for s in reading(rows, task, n_val)]
    lines.append("")
    lines.append("## Notes")
    lines.append("")
    all_notes = list(notes) + [
        "train s is the time inside `Trainer.train()` (evaluation during training included); run s adds loading "
        "the data and model, evaluating before training and (frozen) computing the cached features; peak memory is the peak resident memory of that strategy's own process"
        + (" (CPU RAM, not GPU memory)" if any(r.get("device") == "cuda" for r in ok) else "") + ".",
        "one run per strategy with one seed: with " + (f"{n_val}" if n_val else "few") +
        " validation rows, differences of a few points are within noise (one row = "
        + (f"{1 / n_val:.1%}" if n_val else "a large share") + " of accuracy)."
        if cls else "one run per strategy with one seed: small differences in loss are within noise.",
    ] + ([f"forgetting: {FORGETTING_NA}; the general-text perplexity probe needs a language model, so it "
          "runs for instruction tuning only."] if cls else [])
    lines += [f"- {n}" for n in all_notes]
    lines.append("")
    if not with_table:
        lines = [ln for ln in lines[2:] if not ln.startswith("|")]
    return "\n".join(lines)


def _verdict_short(verdict: str | None) -> str:
    if not verdict:
        return "not measured"
    return verdict.split(":")[0].split(" (")[0]


def reading(rows: list[dict], task: str, n_val: int | None = None) -> list[str]:
    """Plain-language sentences: what each strategy reached, at what cost, and which to pick."""
    cls = task == "classification"
    ok = [r for r in rows if r.get("main_metric_value") is not None]
    out: list[str] = []
    if not ok:
        return ["No strategy finished, so there is nothing to compare."]
    label = "F1" if cls else "a validation loss of"
    full = next((r for r in ok if r["strategy"] == "full"), None)
    for r in ok:
        v = fmt_num(r["main_metric_value"])
        before = r.get("main_metric_before")
        share = ("all" if (r.get("trainable_percent") or 0) >= 99.95 else fmt_pct(r.get("trainable_percent"))) + \
            " of the parameters"
        secs = _secs(r.get("train_seconds"))
        extra = []
        if r["strategy"] == "full":
            sentence = f"{r['name']} reached {label} {v} training all {fmt_params(r.get('total_params'))} parameters " \
                       f"in {secs} s"
        else:
            sentence = f"{r['name']} reached {label} {v} with {share} in {secs} s"
            extra.append(f"{fmt_params(r.get('trainable_params'))} trainable")
        if full is not None and r is not full and full.get("train_seconds") and r.get("train_seconds"):
            ratio = full["train_seconds"] / max(r["train_seconds"], 1e-9)
            extra.append(f"{ratio:.1f}x faster than full" if ratio >= 1.1 else
                         f"{1 / ratio:.1f}x slower than full" if ratio <= 0.9 else "about as fast as full")
        if before is not None:
            extra.append(f"before fine-tuning: {fmt_num(before)}")
        if extra:
            sentence += f" ({'; '.join(extra)})"
        if not cls and r.get("forgetting_change") is not None:
            sentence += f"; general-text perplexity {_signed_pct(r['forgetting_change'])}: " \
                        f"{_verdict_short(r.get('forgetting_verdict'))}"
        if r["status"] == "stopped":
            sentence += " — stopped before the end, so this is not its final result"
        out.append(sentence + ".")
    if len(ok) > 1:
        key = (lambda r: r["main_metric_value"]) if cls else (lambda r: -r["main_metric_value"])
        best = max(ok, key=key)
        fastest = min(ok, key=lambda r: r.get("train_seconds") or float("inf"))
        worst = min(ok, key=key)
        gap = abs(best["main_metric_value"] - worst["main_metric_value"])
        fast = f"{fastest['name']} ({_secs(fastest.get('train_seconds'))} s)"
        noise = max(0.02, 1.5 / n_val) if n_val else 0.02      # ~one validation row either way
        if cls and gap <= noise:
            k = max(1, round(gap * n_val)) if n_val else 0
            rows_note = f", about {k} validation row{'s' if k > 1 else ''} of {n_val}" if n_val and gap else ""
            msg = f"Every strategy is within {gap:.3f} F1 of the best ({best['name']}, " \
                  f"{fmt_num(best['main_metric_value'])}{rows_note}): that is within noise, so pick the cheapest; " \
                  f"the fastest was {fast}."
        else:
            msg = f"Best {('F1' if cls else 'validation loss')}: {best['name']} " \
                  f"({fmt_num(best['main_metric_value'])}); fastest: {fast}."
            if fastest is not best:
                msg += f" Whether {best['name']}'s edge is worth its extra time depends on how much it matters to you."
        out.append(msg)
    if cls:
        bl = next((r.get("baselines") for r in ok if r.get("baselines")), None)
        if bl:
            tfidf = bl["tfidf_logreg"]["f1_weighted"]
            below = [r["name"] for r in ok if r["main_metric_value"] < tfidf]
            if below:
                out.append(f"TF-IDF + logistic regression reached F1 {fmt_num(tfidf)} on the same split: "
                           f"{', '.join(below)} did not beat it — train longer, or ask whether a transformer is "
                           "needed.")
            else:
                out.append(f"Every strategy beat the TF-IDF + logistic regression baseline (F1 {fmt_num(tfidf)}).")
    else:
        forgot = [r["name"] for r in ok if (r.get("forgetting_verdict") or "").startswith("noticeable")]
        if forgot:
            out.append(f"{', '.join(forgot)} lost general language ability (perplexity on general text rose by more "
                       "than 10%): lower the learning rate, freeze early layers or use LoRA.")
    return out
