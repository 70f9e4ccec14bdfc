"""Command line: the same engine the app uses.

    python -m finetune_core train CONFIG.yaml [--set key.sub=value ...]
    python -m finetune_core audit DATA_FILE --task classification|instruction|preference [--set ...] [--json]
    python -m finetune_core models [--prepare] [--json]
    python -m finetune_core compare CONFIG.yaml --strategies full,frozen,lora
    python -m finetune_core estimate CONFIG.yaml [--set ...] [--json]
    python -m finetune_core export RUN_DIR [--merge] [--zip] [--adapter] [--gguf [--quant f16|q8_0]]
    python -m finetune_core predict RUN_DIR DATA_FILE [--out OUT.csv] [--max-new-tokens N]
    python -m finetune_core pairs RUN_DIR [--out pairs.jsonl]

Bad input prints one paragraph naming the problem and the fix and exits with code 2 (--debug shows
the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings

from .compare import compare
from .config import TASKS, DataConfig, apply_overrides, config_from_dict, load_config
from .errors import FinetuneError
from .events import format_event, is_main_process
from .export import GGUF_QUANTS, export_gguf_for_run, gguf_commands, merge_lora, merged_by_default, zip_model
from .models import list_models, prepare_smollm2
from .pairs import write_pairs


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A terminal user reads our progress lines; the libraries' advice on their own APIs is for us
    # (the test suite shows those warnings).
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging   # deferred: `models --json` needs no transformers

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def print_event(event: dict) -> None:
    """One line per event on stdout (events.format_event); an error is printed once, by main()."""
    if event.get("type") == "error":
        return
    line = format_event(event)
    if line:
        print(line, flush=True)


def cmd_train(args) -> int:
    from .train import train      # deferred: loads torch and transformers

    cfg = load_config(args.config, args.set)
    metrics = train(cfg, echo=print_event)
    if not is_main_process():
        return 0      # under torchrun/accelerate, rank 0 alone reports
    keys = ("accuracy", "f1_weighted", "f1_macro") if cfg.task == "classification" else \
        ("eval_loss_before", "eval_loss", "perplexity", "general_perplexity_before", "general_perplexity", "rougeL")
    print("\nResults (validation):")
    for k in keys:
        if metrics.get(k) is not None:
            print(f"  {k:28s} {metrics[k]:.4f}")
    if cfg.task == "classification":
        for name, row in metrics["baselines"].items():
            print(f"  baseline {name:19s} accuracy {row['accuracy']:.4f}  f1_weighted {row['f1_weighted']:.4f}")
    else:
        print(f"  forgetting: {metrics.get('forgetting_verdict')}")
    total = metrics.get("total_seconds")
    whole = f"   total_seconds {total:.1f} (whole run)" if isinstance(total, (int, float)) else ""
    print(f"  train_seconds {metrics['train_seconds']:.1f} (training loop){whole}   outputs in {cfg.output_dir}/")
    return 0


def cmd_audit(args) -> int:
    from .audit import audit_file, format_audit     # deferred: pandas

    values = apply_overrides({"task": args.task, "data": {"train": args.file}}, args.set)
    cfg = config_from_dict(values)
    model = args.model if args.model else None
    report = audit_file(args.file, cfg.task, data_cfg=cfg.data if isinstance(cfg.data, DataConfig) else None,
                        model=False if args.no_tokenizer else model, max_length=cfg.data.max_length)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "token_lengths"}, indent=2, default=str))
    else:
        print(format_audit(report))
    return 0


def cmd_models(args) -> int:
    if args.prepare:
        path = prepare_smollm2()
        print(f"bundled:smollm2-135m ready (float32, de-quantized from 4-bit GGUF) at {path}")
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':38s} {'kind':8s} {'params':7s} {'offline':8s} suits")
    for r in rows:
        print(f"{r['id']:38s} {r['kind']:8s} {r['params']:7s} {'yes' if r['available_offline'] else 'no':8s} "
              f"{r['suits']}")
        print(f"{'':38s} {r['description']}")
    return 0


def cmd_compare(args) -> int:
    result = compare(args.config, [s.strip() for s in args.strategies.split(",") if s.strip()], args.set,
                     echo=print_event)
    print(result["markdown"])
    return 0


def cmd_estimate(args) -> int:
    from .estimate import describe, estimate     # deferred: loads torch and transformers

    result = estimate(load_config(args.config, args.set))
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return 0


def cmd_export(args) -> int:
    """--merge writes model/merged/; --zip (the default action) zips the model as trained, or the merged
    one (after --merge, and by default for a LoRA classifier, unless --adapter); --gguf writes a GGUF and
    an Ollama Modelfile."""
    if args.merge:
        print(f"merged model written to {merge_lora(args.run_dir)}")
    if args.zip or not (args.merge or args.gguf):
        merged = False if args.adapter else (True if args.merge else None)
        what = "merged model" if merged or (merged is None and merged_by_default(args.run_dir)) else "model"
        print(f"zip of the {what} written to {zip_model(args.run_dir, merged=merged)}")
    if args.gguf:
        result = export_gguf_for_run(args.run_dir, args.quant)
        print(f"GGUF ({result.quant}, {result.size_bytes / 1e6:.0f} MB) written to {result.gguf_path}")
        if result.modelfile_path is not None:
            print(f"Ollama Modelfile written to {result.modelfile_path}")
        print("Run it with:\n  " + gguf_commands(result).replace("\n", "\n  "))
    return 0


def cmd_pairs(args) -> int:
    path, stats = write_pairs(args.run_dir, args.out)
    print(f"{stats['pairs']} preference pairs ({stats['ties']} ties skipped, {stats['single']} prompts with one "
          f"rated answer) written to {path}")
    print(f"Train on them: python -m finetune_core train examples/configs/preference_lora.yaml "
          f"--set data.train={path}")
    return 0


def cmd_predict(args) -> int:
    from .batch_predict import predict_file   # deferred: pandas, then torch when the model loads

    def progress(done: int, total: int) -> None:
        print(f"\r  {done}/{total} rows", end="", flush=True)

    result = predict_file(args.run_dir, args.file, out=args.out, progress=progress,
                          max_new_tokens=args.max_new_tokens)
    print()
    blank = f" ({result.blank_rows} without text, left blank)" if result.blank_rows else ""
    print(f"{result.rows} rows predicted{blank} from column(s) {', '.join(result.source_columns)}: {result.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune_core", description="FineTune Lab engine")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. seed=1")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("audit", help="check a data file before training")
    p.add_argument("file")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--model", help="tokenizer to count tokens with (default: the bundled model for the task)")
    p.add_argument("--no-tokenizer", action="store_true", help="skip token counts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("models", help="list models available offline")
    p.add_argument("--prepare", action="store_true", help="convert the bundled SmolLM2 GGUF once")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("compare", help="run full, frozen and lora on the same data")
    p.add_argument("config")
    p.add_argument("--strategies", default="full,frozen,lora")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("estimate", help="predict a run's training time and peak memory (times a few real steps)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. seed=1")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("export", help="zip a run's model, merge its LoRA adapter, or write a GGUF for llama.cpp/Ollama")
    p.add_argument("run_dir")
    p.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the base: model/merged/")
    p.add_argument("--zip", action="store_true", help="zip the model (the default action)")
    p.add_argument("--adapter", action="store_true", help="zip a LoRA classifier's adapter, not its merged model")
    p.add_argument("--gguf", action="store_true", help="write export/RUN-QUANT.gguf and its Ollama Modelfile")
    p.add_argument("--quant", default="f16", choices=list(GGUF_QUANTS), help="GGUF weights (default f16)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="run a trained model over a CSV/JSONL/Parquet file")
    p.add_argument("run_dir")
    p.add_argument("file")
    p.add_argument("--out", help="the CSV to write (default RUN_DIR/export/predictions-FILE.csv)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="instruction runs: answer length")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("pairs", help="turn a run's ratings into preference pairs for task: preference")
    p.add_argument("run_dir")
    p.add_argument("--out", help="the JSONL to write (default RUN_DIR/pairs.jsonl)")
    p.set_defaults(func=cmd_pairs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except FinetuneError as exc:
        if debug:
            traceback.print_exc()
        print(f"Error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: no raw traceback for users
        if debug:
            traceback.print_exc()
        print(f"Error: unexpected {type(exc).__name__}: {exc}. Run again with --debug for the traceback, "
              "and report it if the input looks right.", file=sys.stderr)
        return 1
