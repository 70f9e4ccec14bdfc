"""The training loop's parts: FinetuneTrainer, its length-grouped sampler, and the events callback.

    trainer = FinetuneTrainer(model=model, args=args, train_dataset=ds, callbacks=[EventsCallback(writer)])
    trainer.response_only = response_only_ok(model)     # causal LM: project only response positions
    trainer.train()

torch and transformers load at the top: only a training process imports this module (train.py and
the task pipelines). The app never does; tests/test_headless.py keeps it that way.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import EvalLoopOutput

from .evaluation import causal_mask_needed, lm_head_parts, response_loss_sum
from .events import EventWriter, rank0_decides
from .malloc import release_free_memory


# On a CPU, a training batch of more padded tokens than this runs as several forward/backward passes
# (FinetuneTrainer.training_step, micro_batches): the activations kept for backward scale with the
# tokens of one pass, and on a CPU smaller passes cost nothing. Measured with SmolLM2 (`make bench`):
# full fine-tuning at batch 8 peaked at 5,480 MB in one pass and 3,942-4,253 MB in passes of <= 768
# tokens, its loop 44 s -> 36-39 s; LoRA 3,151 -> 2,083-2,135 MB at the same speed; the batch-4 run of
# time_to_result -0.2 to -0.4 GB, its loop within the noise; the same validation loss to every printed
# digit. Forward+backward of one batch, split vs whole: 4x256 tokens 0.83x the time, 4x224 1.05x,
# 4x1024 0.92x; a budget of 512 splits 4x160 batches too, 1.12x. On a GPU a batch stays whole: its
# throughput grows with the batch.
CPU_MICRO_BATCH_TOKENS = 768


class LengthGroupedBatches(torch.utils.data.Sampler):
    """`group_by_length` that still groups on small datasets.

    transformers sorts by length inside "megabatches" of min(50, n // (4 x batch)) batches: below
    ~200 rows a megabatch is a single batch, so nothing is grouped and dynamic padding still pads
    ~45% of every batch (48 Self-Instruct rows, batch 8). Here a megabatch is 50 batches whatever
    the data size: rows are shuffled, sorted by length within each megabatch, cut into batches
    (one optimizer step's rows each), and the batches are shuffled (a partial one stays last).
    Same rows per epoch, same batch size, batches in random order; only which rows share a batch
    changes. (transformers also moves the longest batch first; we do not: the first step runs at
    learning rate 0 under warmup, and that would always be the batch with the most response tokens.)
    """

    def __init__(self, lengths, group: int, megabatch_mult: int = 50):
        self.lengths = [int(x) for x in lengths]
        self.group = max(1, int(group))
        self.megabatch = self.group * megabatch_mult

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        n, g = len(self.lengths), self.group
        perm = torch.randperm(n).tolist()      # global torch RNG, as transformers' own sampler uses
        groups = []
        for s in range(0, n, self.megabatch):
            chunk = sorted(perm[s:s + self.megabatch], key=lambda i: -self.lengths[i])  # stable: ties random
            groups += [chunk[j:j + g] for j in range(0, len(chunk), g)]
        tail = [groups.pop()] if groups and len(groups[-1]) < g else []
        groups = [groups[k] for k in torch.randperm(len(groups)).tolist()]
        return iter([i for grp in groups + tail for i in grp])


class SkipsFinalCheckpoint:
    """Mixin for a Trainer class (first in its bases) of a run that saves model/ itself after training:
    no checkpoint at the last step of a finished run (last_checkpoint_redundant), and what is known of
    the weights the model holds once train() returns (weights_step, logged_eval_of_weights)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_final_checkpoint = False
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, EventsCallback):
                cb.skips_last_checkpoint = True     # its events say so (no "saving a checkpoint" at the end)

    def _save_checkpoint(self, model, trial):
        """Every checkpoint but the last one of a finished run (last_checkpoint_redundant)."""
        state = self.state
        stopped = any(getattr(cb, "stopped_by_user", False) for cb in self.callback_handler.callbacks)
        if not last_checkpoint_redundant(state, stopped):
            return super()._save_checkpoint(model, trial)
        self.skipped_final_checkpoint = True
        if state.best_global_step == state.global_step:
            # The best model is the one in memory: nothing to load back at the end (_load_best_model).
            state.best_model_checkpoint = None

    def weights_step(self) -> int:
        """The step whose weights the model holds after train(): the best checkpoint's when it was loaded
        back at the end, else the last step."""
        state = self.state
        if self.args.load_best_model_at_end and state.best_model_checkpoint is not None and state.best_global_step:
            return int(state.best_global_step)
        return int(state.global_step)

    def logged_eval_of_weights(self) -> dict | None:
        """The evaluation the Trainer logged on the weights the model holds now (weights_step: the last
        epoch's, the best checkpoint's, or step 0's before any step), or None when it did not evaluate them."""
        step = self.weights_step()
        for entry in reversed(self.state.log_history):
            if entry.get("step") == step and "eval_loss" in entry:
                return entry
        return None


class FinetuneTrainer(SkipsFinalCheckpoint, Trainer):
    """Trainer whose causal-LM loss projects only response positions through the LM head, whose
    evaluation loss is the mean over response tokens, and which writes no checkpoint at the end of a
    finished run.

    The vocabulary projection is ~20% of SmolLM2's FLOPs; prompt and padding positions have label
    -100 and contribute nothing to the loss, so we skip computing their logits. The training loss is
    identical to the model's own (same tokens, same normalisation). The evaluation loss is the mean
    over every response token of the validation rows (evaluation.token_loss, what the run reports),
    not a mean of per-batch means, so the last evaluation is the final model's validation loss.
    """

    response_only = False
    prompt_kv = None      # a prompt_kv.PromptKV the evaluation at the last step fills (the run's answers reuse it)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)   # our EventsCallback reports progress instead
        # padded tokens per forward/backward pass (training_step); None: every batch in one pass
        self.micro_batch_tokens = CPU_MICRO_BATCH_TOKENS if self.args.device.type == "cpu" else None
        self.token_mean_steps: set[int] = set()    # steps this process evaluated with the response-token mean

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A batch wider than micro_batch_tokens (rows x its longest row) runs as several forward and
        backward passes over groups of its rows, each padded to its own longest row; the gradients add up
        to the whole batch's (the loss of every part is divided by the whole step's response-token count)."""
        parts = micro_batches(inputs, self.micro_batch_tokens) if self._splits_exactly(num_items_in_batch) else None
        if not parts:
            return super().training_step(model, inputs, num_items_in_batch)
        return sum(super(FinetuneTrainer, self).training_step(model, part, num_items_in_batch) for part in parts)

    def _splits_exactly(self, num_items_in_batch) -> bool:
        # Each part's loss must be its share of the step's loss: the response-only loss divided by the
        # step's token count, which training_step then does not rescale.
        return bool(self.micro_batch_tokens) and self.response_only and num_items_in_batch is not None and \
            self.model_accepts_loss_kwargs and self.compute_loss_func is None

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            return LengthGroupedBatches(sampler.lengths, sampler.batch_size)
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        # Evaluation stays in dataset order (transformers groups it by length too), so row i of the
        # predictions is row i of the validation data: error analysis depends on it.
        return torch.utils.data.SequentialSampler(eval_dataset) if eval_dataset is not None else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.response_only or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # accelerate applies bf16/fp16 autocast by wrapping model.forward; calling the body and the
        # head directly bypasses that wrapper, so enter the same autocast here (a no-op in float32).
        with self.accelerator.autocast():
            loss_sum, count = response_loss_sum(model, inputs, lm_head_parts(model))
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            loss = loss_sum / num_items_in_batch
        else:
            loss = loss_sum / max(count, 1)
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        if not (self.response_only and loss_only):
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        model = self.model
        model.eval()
        parts = lm_head_parts(model)
        capture = self.prompt_kv if self.prompt_kv is not None and last_step(self.state) else None
        if capture is not None:
            capture.clear()
            capture.step = self.state.global_step
        total, count, rows = 0.0, 0, 0
        with torch.no_grad(), self.accelerator.autocast():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                loss_sum, n = response_loss_sum(model, batch, parts, capture)
                total += loss_sum.item()
                count += n
                rows += int(batch["input_ids"].shape[0])
        self.token_mean_steps.add(self.state.global_step)
        loss = total / count if count else float("nan")
        return EvalLoopOutput(predictions=None, label_ids=None, metrics={f"{metric_key_prefix}_loss": loss},
                              num_samples=rows)

    def eval_loss_of_weights(self) -> float | None:
        """The validation loss the Trainer measured on the weights the model holds now (weights_step), as
        the response-token mean; None when it did not measure them."""
        if self.weights_step() not in self.token_mean_steps:
            return None
        logged = self.logged_eval_of_weights()
        return float(logged["eval_loss"]) if logged is not None else None


def micro_batches(inputs: dict, budget: int | None) -> list[dict] | None:
    """A right-padded causal-LM batch cut into groups of rows, longest first, each at most `budget`
    padded tokens (a row longer than that alone) and trimmed to its own longest row; None when the
    batch fits in one part or is not a plain right-padded {input_ids, attention_mask, labels} batch."""
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if not budget or mask is None or set(inputs) != {"input_ids", "attention_mask", "labels"} or \
            ids.shape[0] * ids.shape[1] <= budget or causal_mask_needed(mask) is not None:
        return None
    lengths = mask.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = [[]]
    for i in order:
        if groups[-1] and (len(groups[-1]) + 1) * lengths[groups[-1][0]] > budget:
            groups.append([])
        groups[-1].append(i)
    if len(groups) == 1:
        return None
    out = []
    for rows in groups:
        index = torch.tensor(rows, device=ids.device)
        width = max(1, int(lengths[rows[0]]))
        out.append({k: v.index_select(0, index)[:, :width] for k, v in inputs.items()})
    return out


def last_step(state) -> bool:
    """Training has reached its planned last step."""
    return bool(state.max_steps) and state.global_step >= state.max_steps


def last_checkpoint_redundant(state, stopped_by_user: bool) -> bool:
    """The checkpoint at the last step of a finished run is never written: train() saves model/ right
    after training and deletes checkpoints/ once the run is done, so those weights (and Adam's state,
    twice their size) would be written only to be deleted. A run stopped by the user keeps its
    checkpoint, to resume from it."""
    return last_step(state) and not stopped_by_user


def release_training_state(trainer: Trainer) -> None:
    """Drop a finished trainer's optimizer and scheduler (Adam keeps two copies of every trainable weight)
    and, on glibc, hand the freed heap back to the kernel: the heap keeps training's freed memory for reuse
    (runtime.set_cpu_threads), and without this a model loaded after training would stack on top of it."""
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()       # the accelerator holds its own references to both
    gc.collect()
    release_free_memory()


def response_only_ok(model) -> bool:
    """The response-only loss needs a plain LM head and no DDP wrapper (DDP must see the full forward)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    return lm_head_parts(model) is not None


class EventsCallback(TrainerCallback):
    """Turns Trainer callbacks into events (events.jsonl), with an ETA from the measured step rate, and
    ends training at the next step end once `stop_file` exists."""

    def __init__(self, writer: EventWriter, stop_file: str | Path | None = None):
        self.writer = writer
        self.stop_file = Path(stop_file) if stop_file else None
        self.t0 = None
        self.first_step = 0
        self.stopped_by_user = False
        self.finishing = False
        self.skips_last_checkpoint = False     # FinetuneTrainer writes no checkpoint at a finished run's end

    def _eta(self, state) -> float | None:
        done = state.global_step - self.first_step
        if not self.t0 or done <= 0 or not state.max_steps:
            return None
        rate = (time.time() - self.t0) / done
        return max(0.0, rate * (state.max_steps - state.global_step))

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()
        self.first_step = state.global_step
        self.writer.start(state.global_step, state.max_steps, state.epoch, args.num_train_epochs)

    def _finishing(self, state, message: str) -> None:
        # Tells the job manager the Trainer honoured the stop (or is done): from here on, saving and
        # evaluating may take minutes, and a hard kill would lose the model.
        if not self.finishing:
            self.finishing = True
            self.writer.phase("saving", message, step=state.global_step, max_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        # A stop request (file written by the app or by compare) ends training at this step; the
        # Trainer then saves a checkpoint and train() saves and evaluates the model as it is. Rank 0
        # alone looks at the file and every rank follows its decision (see rank0_decides).
        requested = self.stop_file is not None and state.is_world_process_zero and self.stop_file.exists()
        if rank0_decides(requested):
            self.stopped_by_user = True
            control.should_training_stop = True
            control.should_save = True
            self._finishing(state, f"Stop received: training ends at step {state.global_step} of "
                                   f"{state.max_steps}; saving a checkpoint, then the model, then evaluating.")
        else:
            self._maybe_evaluating(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._maybe_evaluating(state, control)   # eval/save "epoch": the flow callback decides here

    def _maybe_evaluating(self, state, control) -> None:
        # The default flow callback (it runs before this one) has decided to evaluate and/or save now.
        # Tell the job manager: a Stop pressed during a long evaluation or checkpoint write must not
        # hard-kill the worker mid-save (it gets finish_timeout until the next save/eval/log event).
        save = control.should_save and not (self.skips_last_checkpoint and
                                            last_checkpoint_redundant(state, self.stopped_by_user))
        if self.finishing or not (control.should_evaluate or save):
            return
        what = " and ".join(w for w, on in (("evaluating", control.should_evaluate),
                                             ("saving a checkpoint", save)) if on)
        self.writer.phase("checkpoint", f"Step {state.global_step}: {what}.", step=state.global_step,
                          max_steps=state.max_steps, evaluate=bool(control.should_evaluate), save=bool(save))

    def on_train_end(self, args, state, control, **kwargs):
        self._finishing(state, f"Training ended at step {state.global_step} of {state.max_steps}; "
                               "saving and evaluating the model.")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        common = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                  "eta_seconds": self._eta(state)}
        if any(k.startswith("eval_") for k in logs):
            metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k not in common}
            self.writer.eval(**common, **metrics)
        elif "loss" in logs:
            self.writer.log(**common, loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                            grad_norm=logs.get("grad_norm"))

    def on_save(self, args, state, control, **kwargs):
        if self.skips_last_checkpoint and last_checkpoint_redundant(state, self.stopped_by_user):
            return      # not written (FinetuneTrainer._save_checkpoint)
        self.writer.save(state.global_step, state.max_steps, state.epoch)
