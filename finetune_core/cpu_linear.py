"""oneDNN's linear for decoding steps on an x86 CPU (forward passes of a few rows, no gradient): answers, chat.

    from finetune_core import cpu_linear
    cpu_linear.apply(model)     # returns how many nn.Linear modules changed; 0 where it does not apply

On a CPU, torch's `nn.Linear` multiplies with MKL's sgemm, which streams a weight matrix slowly when the
input has few rows: decoding one token of SmolLM2 for 1-20 rows reads each weight at 7-11 GB/s where a
plain sum over memory runs at 31 GB/s (2 cores, AMD EPYC). oneDNN's linear, the kernel torch's inductor
calls for float32 linears on a CPU (`torch.ops.mkldnn._linear_pointwise`), takes the same float32 weight
as it is (no copy, nothing to refresh after a weight changes) and was faster for every SmolLM2 shape
measured, cold weights, 2 threads: 2.0x at 1 row and 1.2x at 20 for the 576x1536 MLP projections,
1.03-1.1x at 350-776 rows, and 2.2x / 1.9x / 1.2x at 1 / 20 / 350 rows for the 49k-vocabulary head.
Whole decoding steps: 63 -> 48 ms for one row (chat), 133 -> 103 ms for 20 rows; the 20 held-out
answers of an instruction run, each prompt prefilled, 12.8 -> 10.1 s with the same answers (interleaved,
three rounds).

Only products of at most MAX_ROWS rows take it (a decoding step: chat, answers, predictions). oneDNN
builds and caches a kernel for every row count it sees, ~0.6 MB each for a 576x1536 product, kept by
the process: 400 row counts through four SmolLM2 shapes left the heap 0.8 GB larger, and an instruction
run whose evaluations and prompt prefills went through it too peaked ~100 MB higher after training.
Wider products gain less (3-15% for the layers at 128-776 rows), so they keep torch's path and the
kernels are at most 32 row counts per product shape.

The results are the same products summed in another order (float rounding, ~1e-6 relative). The op has
no autograd formula, so a module takes it only while gradients are off (`torch.no_grad`, inference
mode): training's forward and backward keep torch's own path. Only exact float32 `nn.Linear` modules on
the CPU change (LoRA's wrapped base layers included, as PEFT calls them); where the op is missing (another
CPU architecture, a torch without oneDNN or that renamed this private op) nothing changes.
"""

from __future__ import annotations

import platform
import types
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def available() -> bool:
    """oneDNN's linear runs here and gives torch's result on a small product (checked once)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
            return bool(torch.allclose(_onednn(x, w, b), F.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# Rows (tokens) a product may have to take oneDNN's linear: a decoding step has one per answer being
# written (20 at most for the held-out answers, 16 for predictions, 1 in chat).
MAX_ROWS = 32


def _onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _forward(self, x):
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or \
            self.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or \
            x.numel() > MAX_ROWS * x.shape[-1]:
        return F.linear(x, self.weight, self.bias)
    return _onednn(x, self.weight, self.bias)


def apply(model) -> int:
    """Give every float32 `nn.Linear` of `model` on the CPU oneDNN's linear for its forward passes of at
    most MAX_ROWS rows without gradients; returns how many changed (0 where oneDNN's linear is not
    available). The change lives on the module instances (not in state_dict or the saved config): a saved
    or exported model is unaffected."""
    if not available():
        return 0
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is torch.nn.Linear and weight is not None and weight.dtype == torch.float32 and \
                weight.device.type == "cpu" and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed
