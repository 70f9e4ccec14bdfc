"""The preference task: direct preference optimisation (DPO) on TRL's DPOTrainer and DPOConfig.

    python -m finetune_core train examples/configs/preference_lora.yaml
    python -m finetune_core audit examples/data/preference_pairs.jsonl --task preference

Data: one pair per row, `prompt` / `chosen` / `rejected` (TRL's names; data.preference_columns), as
text or as conversational messages. The prompt is sent as a user message through the model's chat
template, as the Chat tab sends it. TRL does the rest: the DPO loss, the reference model and the
preference collator. The reference is the model as loaded: with LoRA the base with the adapter off,
and with precompute_ref_log_probs (our default) its log-probabilities are computed once before
training, so no second copy of the model is held for any strategy. Those log-probabilities, and the
step-0 evaluation (where the policy is the reference), depend only on the model as loaded, the pairs
and the settings: they are kept in the base-model cache (PreferenceTrainer, step0_evaluation), so a
second run on the same pairs starts training within seconds.

metrics.json: on the held-out pairs, before and after training, `eval_loss(_before)` (the DPO loss,
ln 2 = 0.693 before training), `reward_accuracy(_before)` (the share of pairs where the chosen answer
gains more log-probability over the reference than the rejected one; TRL counts a tie as a miss, so it
is 0 before training) and `reward_margin(_before)` (the mean of that gain's difference, times beta);
the forgetting probe (general-English perplexity) as for instruction runs; generations.jsonl has the
held-out prompts answered before and after, with ROUGE-L against the chosen answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import pandas as pd
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from .. import data as D
from .. import evaluation, rundir
from ..audit import audit_run
from ..basecache import (BaseCache, digest, entry_key, general_text_key, read_general_perplexity,
                         write_general_perplexity)
from ..config import RunConfig
from ..errors import ConfigError, FinetuneError
from ..generate import GENERATION_BATCH, generate_batch, write_generations
from ..models import load_model as load_pretrained
from ..trainer import SkipsFinalCheckpoint, release_training_state
from ..training_args import resolve_training_args
from . import RunContext, as_dataset
from .instruction import MAX_NEW_TOKENS, Answers, adapter_merged, base_weights

MAIN_METRIC = "eval_loss"
HELDOUT_PROMPTS = 20            # held-out prompts answered before and after training
# TRL's eval metric -> ours (metrics.json, with _before for the model as loaded)
REPORTED = {"eval_loss": "eval_loss", "eval_rewards/accuracies": "reward_accuracy",
            "eval_rewards/margins": "reward_margin", "eval_rewards/chosen": "reward_chosen",
            "eval_rewards/rejected": "reward_rejected"}


@dataclass
class PreferenceData:
    """The split pairs of a preference run, as (prompt, chosen, rejected) texts."""
    train_frame: pd.DataFrame
    val_frame: pd.DataFrame
    template: str                       # "chat" or "alpaca", resolved for this tokenizer
    train_pairs: list[tuple[str, str, str]]
    val_pairs: list[tuple[str, str, str]]
    dropped_reasons: dict[str, int]

    @property
    def n_train(self) -> int:
        return len(self.train_pairs)

    @property
    def dropped_rows(self) -> int:
        return sum(self.dropped_reasons.values())


def check_model(cfg: RunConfig, kind: str) -> None:
    if kind != "causal":
        raise ConfigError(f"The model '{cfg.model}' is an encoder; preference tuning needs a model that generates "
                          "text.", "Use a causal LM such as bundled:smollm2-135m.")


# ---------------------------------------------------------------------------------------------
# prepare


def _usable(pairs: list[tuple[str, str, str]], reasons: dict) -> list[tuple[str, str, str]]:
    """The pairs DPO can learn from: no empty side, and a chosen answer that differs from the rejected."""
    kept = []
    for prompt, chosen, rejected in pairs:
        if not (prompt and chosen and rejected):
            reasons["empty_side"] += 1
        elif chosen == rejected:
            reasons["identical_answers"] += 1
        else:
            kept.append((prompt, chosen, rejected))
    return kept


def prepare(run: RunContext, frames: D.Frames) -> PreferenceData:
    from ..audit import preference_rows

    cfg = run.cfg
    train_df, val_df = frames.train, frames.validation
    if val_df is None:
        train_df, val_df = D.split_frame(train_df, cfg.data.val_size, cfg.seed)
    reasons = {"empty_side": 0, "identical_answers": 0}
    train = _usable(preference_rows(train_df, frames.columns), reasons)
    val = _usable(preference_rows(val_df, frames.columns), reasons)
    if not train:
        raise FinetuneError("No usable training pair: every pair has an empty prompt, chosen or rejected answer, "
                            "or the same answer on both sides.",
                            "Give each row a prompt, a better (chosen) and a worse (rejected) answer.")
    if not val:
        raise FinetuneError("No usable held-out pair to measure the run on.",
                            "Add pairs (at least 5 rows, so that val_size leaves one out), or give a validation "
                            "file with data.validation.")
    data = PreferenceData(train_frame=train_df, val_frame=val_df,
                          template=D.resolve_template(cfg.data.template, run.tokenizer),
                          train_pairs=train, val_pairs=val, dropped_reasons=reasons)
    if data.dropped_rows:
        run.writer.info(f"{data.dropped_rows} pairs dropped: {reasons['empty_side']} with an empty side, "
                        f"{reasons['identical_answers']} with the same chosen and rejected answer.")
    return data


def audit(run: RunContext, frames: D.Frames, data: PreferenceData) -> dict:
    return audit_run(run.cfg, run.tokenizer, frames, data.train_frame, data.val_frame, frames.columns)


def load_model(run: RunContext, data: PreferenceData):
    return load_pretrained(run.model_path, "instruction", run.model_kind)


def training_arguments(run: RunContext, data: PreferenceData, notes: list[str]):
    cfg = run.cfg
    extra = {} if "max_length" in cfg.training else {"max_length": cfg.data.max_length}
    args, patience = resolve_training_args(cfg, run.model_kind, data.n_train, rundir.checkpoints_dir(run.out), notes,
                                           extra=extra, args_class=DPOConfig)
    if cfg.strategy.name != "lora" and not args.precompute_ref_log_probs:
        notes.append(f"{cfg.strategy.name} preference tuning with precompute_ref_log_probs off: TRL keeps a second "
                     "copy of the model as the reference, twice the weights' memory. Turn it on (the default) to "
                     "compute the reference once before training instead.")
    return args, patience


# ---------------------------------------------------------------------------------------------
# datasets and trainer


def prompt_text(prompt: str, data: PreferenceData, tokenizer) -> str:
    """The prompt as the model sees it before an answer (chat template, else the Alpaca format)."""
    return D.render_prompt([{"role": "user", "content": prompt}], data.template, tokenizer)


def pairs_dataset(pairs: list[tuple[str, str, str]], data: PreferenceData, tokenizer):
    """TRL's format: conversational with a chat template (TRL applies it), else plain text ending in EOS."""
    if data.template == "chat":
        return as_dataset({"prompt": [[{"role": "user", "content": p}] for p, _, _ in pairs],
                           "chosen": [[{"role": "assistant", "content": c}] for _, c, _ in pairs],
                           "rejected": [[{"role": "assistant", "content": r}] for _, _, r in pairs]})
    eos = tokenizer.eos_token or ""
    return as_dataset({"prompt": [prompt_text(p, data, tokenizer) for p, _, _ in pairs],
                       "chosen": [c + eos for _, c, _ in pairs], "rejected": [r + eos for _, _, r in pairs]})


def _reported(scores: dict, suffix: str) -> dict:
    return {ours + suffix: float(scores[theirs]) for theirs, ours in REPORTED.items() if theirs in scores}


def heldout(data: PreferenceData, tokenizer) -> tuple[list[str], list[str]]:
    pairs = data.val_pairs[:HELDOUT_PROMPTS]
    return [prompt_text(p, data, tokenizer) for p, _, _ in pairs], [c for _, c, _ in pairs]


# What TRL's reference pass reads besides the weights and the tokenized pairs (DPOConfig fields).
REFERENCE_SETTINGS = ("max_length", "truncation_mode", "padding_free", "pad_to_multiple_of", "ld_alpha", "bf16",
                      "fp16", "tf32", "use_liger_kernel")
PAIR_COLUMNS = {"prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"}
# Every DPOConfig field of TRL's own (not TrainingArguments'): the step-0 evaluation's numbers may depend
# on any of the loss's (beta, loss_type, label_smoothing, rpo_alpha, ...); keying on all is the safe side.
DPO_SETTINGS = tuple(f.name for f in dataclasses.fields(DPOConfig)
                     if f.name not in {g.name for g in dataclasses.fields(TrainingArguments)})


def reference_logps_key(model_path: str, dataset, args, collator, batch_size: int) -> str | None:
    """The base-model cache key of TRL's reference log-probabilities of `dataset` (tokenized pairs):
    the weights (basecache.entry_key), the token ids, the collator's and the reference pass's settings,
    TRL's version. None for pairs with more than text (images, tools): those are not cached."""
    import trl

    if not set(dataset.column_names) <= PAIR_COLUMNS or not {"prompt_ids", "chosen_ids",
                                                            "rejected_ids"} <= set(dataset.column_names):
        return None
    plain = (bool, int, float, str, type(None))
    return entry_key(model_path, {
        "dpo_reference_logps": digest([list(dataset["prompt_ids"]), list(dataset["chosen_ids"]),
                                       list(dataset["rejected_ids"])]),
        "trl": trl.__version__, "batch_size": int(batch_size),
        "settings": {name: getattr(args, name, None) for name in REFERENCE_SETTINGS},
        "collator": [type(collator).__name__,
                     {k: v for k, v in sorted(vars(collator).items()) if isinstance(v, plain)}]})


class PreferenceTrainer(SkipsFinalCheckpoint, DPOTrainer):
    """TRL's DPOTrainer whose reference log-probabilities (precompute_ref_log_probs) come from the
    base-model cache when an earlier run computed them on the same base model, pairs and settings, and
    go there when computed. The reference is the model as loaded in every strategy (LoRA: a fresh
    adapter, whose B = 0 adds exact zeros), so they depend on nothing else: a second run on the same
    pairs (another beta, learning rate or strategy) starts training without its reference pass (SmolLM2,
    the 103 example pairs: ~50 s). No checkpoint at the last step of a finished run, as for the other tasks."""

    def __init__(self, *args, reference_cache: BaseCache | None = None, model_path: str = "", main: bool = True,
                 **kwargs):
        self.reference_cache, self.reference_model_path, self.writes_cache = reference_cache, model_path, main
        self.reference_keys: dict[str, str | None] = {}  # dataset name ("train", "eval") -> its cache key
        self.reference_reads: dict[str, bool] = {}      # dataset name with a key -> read from the cache
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)   # our EventsCallback prints each log line already

    def _precompute_ref_logps(self, dataset, name, batch_size):
        cache = self.reference_cache
        key = None
        if cache is not None and not cache.disabled:
            key = reference_logps_key(self.reference_model_path, dataset, self.args, self.data_collator, batch_size)
        self.reference_keys[name] = key
        entry = cache.read(key) if key is not None else None
        chosen, rejected = (entry or {}).get("chosen"), (entry or {}).get("rejected")
        if _logps_for(chosen, rejected, len(dataset)):
            from datasets import Value

            self.reference_reads[name] = True
            return (dataset.add_column("ref_chosen_logps", chosen, feature=Value("float32"))
                    .add_column("ref_rejected_logps", rejected, feature=Value("float32")))
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if key is not None:
            self.reference_reads[name] = False
            if self.writes_cache:
                cache.write(key, {"what": f"DPO reference log-probabilities ({name} pairs)",
                                  "chosen": [float(v) for v in dataset["ref_chosen_logps"]],
                                  "rejected": [float(v) for v in dataset["ref_rejected_logps"]]})
        return dataset


def _logps_for(chosen, rejected, n: int) -> bool:
    """Two lists of n finite numbers (a cache entry that can stand for a reference pass over n pairs)."""
    return all(isinstance(side, list) and len(side) == n and
               all(isinstance(v, (int, float)) and math.isfinite(v) for v in side) for side in (chosen, rejected))


def build_trainer(run: RunContext, model, data: PreferenceData, args, callbacks, metrics: dict):
    """PreferenceTrainer (TRL's DPOTrainer), then the model as loaded measured on the held-out pairs (the
    "before" side). Adds `reference_cache` to metrics: hit (every reference pass read from the cache) |
    partial | miss | off (no reference pass before training, pairs with more than text, several
    processes, or a FINETUNE_HOME that cannot be written)."""
    tokenizer = run.tokenizer
    run.writer.info(f"Preparing {data.n_train} training and {len(data.val_pairs)} held-out pairs"
                    + (" and the reference log-probabilities (once, before training) ..."
                       if args.precompute_ref_log_probs else " ..."))
    # One process only: with several, a rank that found an entry would skip the collective operations of
    # a reference pass or an evaluation another rank runs (an entry written between their reads).
    cache = BaseCache(run.writer) if args.world_size == 1 else None
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=pairs_dataset(data.train_pairs, data, tokenizer),
                                eval_dataset=pairs_dataset(data.val_pairs, data, tokenizer), processing_class=tokenizer,
                                callbacks=callbacks, reference_cache=cache, model_path=run.model_path, main=run.main)
    reads = list(trainer.reference_reads.values())
    metrics["reference_cache"] = ("off" if cache is None or cache.disabled or not reads else
                                  "hit" if all(reads) else "partial" if any(reads) else "miss")
    if any(reads):
        run.writer.info("Reference log-probabilities read from the cache (same base model, pairs and settings as "
                        "an earlier run): no reference pass.", cached=True)
    if "ref" in getattr(model, "peft_config", {}):
        # TRL copies a LoRA model's adapter as its reference; ours is freshly initialised (the base model
        # itself), so the adapter switched off is the same reference, and model/ gets no `ref` adapter.
        model.delete_adapter("ref")
    # The step-0 point of the reward charts. The rest of the "before" side (general text, answers) is
    # measured after training (measure_base_model): training starts ~10 s sooner.
    metrics.update(_reported(step0_evaluation(run, trainer, cache), "_before"))
    return trainer


# What an evaluation reports about its own speed: not kept in the cache.
TIMING_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time")


def step0_evaluation(run: RunContext, trainer: PreferenceTrainer, cache: BaseCache | None) -> dict:
    """trainer.evaluate() of the model as loaded on the held-out pairs: the "before" numbers and the
    step-0 point of the reward charts. The policy is the reference there, so the numbers depend on the
    base model, the held-out pairs (the key of their reference pass) and the DPO settings alone: read
    from the base-model cache when an earlier run made them (and logged as evaluate() logs them: the
    same eval event at step 0), else measured and stored."""
    reference = trainer.reference_keys.get("eval")
    key = None
    if cache is not None and reference is not None:
        args = trainer.args
        settings = {name: getattr(args, name) for name in DPO_SETTINGS if hasattr(args, name)}
        key = digest({"dpo_step0_evaluation": reference, "eval_batch_size": args.per_device_eval_batch_size,
                      "prediction_loss_only": args.prediction_loss_only,
                      "settings": json.loads(json.dumps(settings, sort_keys=True, default=str))})
    entry = cache.read(key) if cache is not None else None
    logged = (entry or {}).get("metrics")
    if isinstance(logged, dict) and isinstance(logged.get("eval_loss"), (int, float)) and \
            all(isinstance(v, (int, float)) for v in logged.values()):
        run.writer.info("The model before training on the held-out pairs: DPO loss and reward accuracy read from "
                        "the cache (same base model, pairs and DPO settings as an earlier run).", cached=True)
        trainer.log(dict(logged))
        return logged
    run.writer.info("Measuring the model before training: DPO loss and reward accuracy on the held-out pairs ...")
    scores = trainer.evaluate()
    if cache is not None and key is not None and run.main:
        cache.write(key, {"what": "DPO evaluation of the model as loaded (step 0)",
                          "metrics": {k: float(v) for k, v in scores.items() if k.startswith("eval_") and
                                      k not in TIMING_METRICS and isinstance(v, (int, float)) and math.isfinite(v)}})
    return scores


# ---------------------------------------------------------------------------------------------
# evaluate and outputs


def evaluate(run: RunContext, trainer, model, data: PreferenceData, metrics: dict) -> Answers:
    release_training_state(trainer)
    # The Trainer's last evaluation scored these very weights (the last epoch's, or the best checkpoint's
    # loaded back): the same numbers again would cost a pass over the held-out pairs (~10 s for SmolLM2).
    logged = trainer.logged_eval_of_weights()
    run.writer.phase("evaluating", "Evaluating the tuned model on " + (
        "general text (the held-out pairs were scored at the last evaluation) ..." if logged is not None
        else "the held-out pairs and general text ..."))
    metrics.update(_reported(logged if logged is not None else trainer.evaluate(), ""))
    metrics["general_perplexity"] = evaluation.batches_perplexity(
        model, evaluation.general_text_batches(run.tokenizer, run.cfg.data.max_length))
    metrics["val_samples"] = len(data.val_pairs)
    metrics["template"] = data.template
    prompts, refs = heldout(data, run.tokenizer)
    after = None
    if run.main:
        run.writer.phase("generating", "Generating answers to held-out prompts after training ...", done=0,
                         total=len(prompts), unit="prompts")
        with adapter_merged(model):
            after = generate_batch(model, run.tokenizer, prompts, data.template, MAX_NEW_TOKENS)
    before = measure_base_model(run, model, data, metrics, prompts)
    metrics.update(evaluation.forgetting_report(metrics["general_perplexity_before"], metrics["general_perplexity"]))
    return Answers(prompts=prompts, references=refs, after=after, before=before)


def measure_base_model(run: RunContext, model, data: PreferenceData, metrics: dict,
                       prompts: list[str]) -> list[str] | None:
    """The model as loaded (the DPO reference), once the tuned model is saved and measured: its
    general-text perplexity (`general_perplexity_before`) and its answers to the held-out prompts (rank 0
    only), each read from the base-model cache when an earlier run measured it (the perplexity by any
    run on this model, basecache.general_text_key; the answers by a run on the same held-out prompts,
    base_answers_key), else measured and stored. Adds `base_cache` (hit | partial | miss | off). LoRA
    switches its adapter off; full and frozen runs get the loaded weights copied back in place
    (instruction.base_weights), only when something is to be measured."""
    cache = BaseCache(run.writer)
    text = evaluation.general_text_batches(run.tokenizer, run.cfg.data.max_length)
    general_key, answers_key = general_text_key(run.model_path, text), base_answers_key(run, data, prompts)
    general = read_general_perplexity(cache, general_key)
    entry = cache.read(answers_key) if run.main else None
    answers = entry.get("answers") if entry is not None else None
    if not (isinstance(answers, list) and len(answers) == len(prompts)):
        answers = None
    need_general, need_answers = general is None, run.main and answers is None
    if not (need_general or need_answers):
        run.writer.phase("baseline", "The model as loaded: general-text perplexity and answers read from the cache "
                                     "(same model, held-out prompts and settings as an earlier run).", cached=True)
    else:
        what = " and ".join(w for w, needed in (("general-text perplexity", need_general),
                                                ("answers to the held-out prompts", need_answers)) if needed)
        note = "" if need_general and need_answers else " (the rest is in the cache)"
        run.writer.phase("baseline", f"Measuring the model as loaded for comparison: {what}{note} ...", done=0)
        with base_weights(run, model) as base:
            if need_general:
                general = evaluation.batches_perplexity(base, text)
                if run.main:
                    write_general_perplexity(cache, general_key, run.cfg.model, general)
            if need_answers:
                answers = generate_batch(base, run.tokenizer, prompts, data.template, MAX_NEW_TOKENS)
                cache.write(answers_key, {"model": run.cfg.model, "answers": answers})
    metrics["general_perplexity_before"] = general
    metrics["base_cache"] = ("off" if cache.disabled else "miss" if need_general and need_answers else
                             "partial" if need_general or need_answers else "hit")
    return answers


def base_answers_key(run: RunContext, data: PreferenceData, prompts: list[str]) -> str | None:
    """The cache key of the loaded model's answers to these held-out prompts with these settings."""
    return entry_key(run.model_path, {"preference_prompts": digest(prompts), "template": data.template,
                                      "generation": {"greedy": True, "max_new_tokens": MAX_NEW_TOKENS,
                                                     "batch_size": GENERATION_BATCH, "prefill": "per row",
                                                     "cache": "static", "pad": run.tokenizer.pad_token_id}})


def write_outputs(run: RunContext, model, data: PreferenceData, metrics: dict, answers: Answers) -> None:
    """generations.jsonl: the held-out prompts answered before and after, ROUGE-L against the chosen answer."""
    write_generations(run.out, answers.prompts, answers.references, answers.after, metrics, before=answers.before)
