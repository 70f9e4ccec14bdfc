"""Memory-lean training forward for Llama-style decoders (SmolLM2, Llama, Qwen2, Mistral): same results,
fewer activations kept for the backward pass.

    from finetune_core import lean
    lean.apply(model)           # before training; returns the number of modules it changed
    loss = lean.head_loss_sum(model.lm_head, hidden, targets)     # the LM head and its loss, in chunks

Autograd keeps, for every layer and token, each intermediate that some backward formula needs. In a
SwiGLU MLP that is the gate and up projections, silu(gate), and silu(gate) * up (the down projection's
input): four vectors of the intermediate size. `apply` makes the MLP keep only gate and up and recompute
the two others in its backward pass (elementwise, ~1% of the layer's FLOPs). An RMSNorm keeps its input
and its normalised input; here it keeps the input and one scalar per token. The forward values are the
same operations in the same order; the gradients are the same formulas, grouped differently (float
rounding; tests/test_lean.py checks both).

Measured on SmolLM2-135M, one 4x256-token batch, tensors autograd saves (weights included): 2,432 MB
standard, 1,797 MB lean (-26%; a further 120 MB went with evaluation.causal_mask_needed). The full
fine-tuning run of `make bench` (time_to_result) peaked at 4,069-4,419 MB without and 3,975-4,208 MB with
it, its validation loss equal to 7 digits (2.9527241 / 2.9527238) and its training loop as fast
within the noise (41-48 s either way): the peak is now mostly glibc's heap
(~1 GB free but resident inside it: README, time to result), not live tensors. Liger-Kernel does
the same fusions, in Triton, for CUDA only; this is plain PyTorch and runs wherever the model does.

The LM head and its cross-entropy (`head_loss_sum`, evaluation.response_loss_sum calls it) run in chunks
of rows, each chunk's gradients computed at once from its softmax (LinearCrossEntropy): the standard path
holds rows x vocabulary logits three times over (log_softmax's saved output, then two gradients of it), ~140
MB each for SmolLM2's 49k vocabulary. Measured in time_to_result's full run, two first runs each way
interleaved: peak 3,683-3,939 MB standard, 3,446-3,505 MB chunked; loop 39.5-42.0 s either way; validation
loss 2.9527238 / 2.9527187. Liger-Kernel's fused linear cross-entropy is the same idea in Triton (CUDA).

Only modules this file recognises exactly are changed (a plain bias-free `nn.Linear` down projection,
SiLU activation, float32 RMSNorm); LoRA-wrapped projections keep the standard path. In inference
(`torch.no_grad`) they run their standard forward: nothing is kept for a backward pass there. The head
loss runs in chunks there too (only the forward: no gradient), a float32 bias-free nn.Linear head only.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up), keeping gate, up and the down weight for backward (not the product)."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out):
        # Five elementwise passes over intermediate-size tensors (silu, the product, grad_up, and two for
        # grad_gate through torch's own silu_backward) instead of ten: 43 -> 24 ms a step at 4x130 tokens.
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        grad_product = F.linear(grad_out, weight.t())
        grad_weight = None
        if ctx.needs_input_grad[2]:
            product = silu * up
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
            del product
        grad_up = grad_product * silu if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_product.mul_(up), gate)   # grad_product: no longer needed
        return grad_gate, grad_up, grad_weight


class RMSNormFn(torch.autograd.Function):
    """weight * x / rms(x), keeping x and 1/rms(x) (one scalar per token) for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        normed = x * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed).reshape(-1, normed.shape[-1]).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad_out * weight
            grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x, grad_weight, None


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), in chunks of rows: the logits (rows x
    vocabulary) never exist whole. With grad, each chunk's gradients are computed in the forward pass, from
    its softmax, and the chunk is dropped; backward only scales them. Same FLOPs as the standard head and
    loss (three matmuls), so the same speed; the standard path keeps log_softmax's output for backward and
    then holds two more logits-sized tensors in it, ~140 MB each for 700 response tokens of SmolLM2's
    49k vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None              # the first chunk's product, then accumulated (no zero-filled start)
        total = hidden.new_zeros(())
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = h @ weight.t()
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight):
                continue
            grad = logits.sub_(lse[:, None]).exp_()             # softmax, in place of the logits
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1
            if need_hidden:
                torch.matmul(grad, weight, out=grad_hidden[start:start + chunk])
            if need_weight:
                grad_weight = grad.t() @ h if grad_weight is None else grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden.mul_(grad_total) if grad_hidden is not None else None,
                grad_weight.mul_(grad_total) if grad_weight is not None else None, None, None)


# Rows per chunk of LinearCrossEntropy: 256 x 49k-vocabulary logits are 50 MB. Forward+backward of 700
# SmolLM2 response positions: 0.86 s at 256 as for the standard head (0.96 s at 128, 0.88 s at 512).
HEAD_CHUNK_ROWS = 256


def head_loss_sum(head, hidden, targets):
    """sum of cross_entropy(head(hidden), targets) over rows (2-D hidden; every target a real class).
    A bias-free float32 nn.Linear head outside autocast runs LinearCrossEntropy (without grad, only its
    chunked forward); any other head the standard way."""
    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or hidden.dtype != torch.float32 or \
            weight.dtype != torch.float32 or torch.is_autocast_enabled(hidden.device.type):
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
    return LinearCrossEntropy.apply(hidden, weight, targets, HEAD_CHUNK_ROWS)


def _swiglu_ok(mlp) -> bool:
    act = getattr(mlp, "act_fn", None)
    down = getattr(mlp, "down_proj", None)
    return (type(mlp).__name__.endswith("MLP") and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")
            and type(down) is torch.nn.Linear and down.bias is None
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def _rmsnorm_ok(norm) -> bool:
    weight = getattr(norm, "weight", None)
    return (type(norm).__name__ in _RMSNORM_CLASSES and hasattr(norm, "variance_epsilon")
            and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1)


def _standard_path(x) -> bool:
    # No graph to slim without grad; under autocast (bf16/fp16 on CUDA) the Functions' own backward
    # would run outside it in mixed dtypes, and there activations are half the size anyway.
    return not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)


def _lean_mlp_forward(self, x):
    if _standard_path(x):
        return type(self).forward(self, x)
    return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


def _lean_norm_forward(self, x):
    if _standard_path(x) or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
        return type(self).forward(self, x)
    return RMSNormFn.apply(x, self.weight, self.variance_epsilon)


def apply(model) -> int:
    """Give the SwiGLU MLPs and float32 RMSNorms of `model` (a Llama-style decoder, PEFT-wrapped or not) the
    lean forward; returns how many modules changed (0 for any other architecture). The change lives on the
    module instances (not in state_dict or the saved config): a saved model is unaffected."""
    changed = 0
    for module in model.modules():
        if _swiglu_ok(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            changed += 1
        elif _rmsnorm_ok(module):
            module.forward = types.MethodType(_lean_norm_forward, module)
            changed += 1
    return changed


# RMSNorms whose forward is exactly weight * (x * rsqrt(mean(x^2) + eps)) (others, such as Gemma's
# (1 + weight) scaling, keep theirs).
_RMSNORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm"}
