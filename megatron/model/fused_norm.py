"""RMSNorm as a single autograd function: the same arithmetic as the plain module code
(`RMSNorm.forward` in megatron/model/gpt.py), rounding for rounding, in fewer passes.

RMSNorm (float32 compute, cast back to the input dtype before the weight, as HF Llama):

    y = (x32 * rstd).to(dtype),  rstd = rsqrt(mean(x32^2) + eps),  out = weight * y

The plain code's autograd keeps a float32 copy of x and runs ~14 passes over [tokens, h] in the
backward (float copies, an expanded division, `pow(1)`, a multiply by 2, ...). Here the forward
keeps x (in its own dtype), the float32 rstd [tokens, 1] and y; the backward evaluates the same
expressions autograd does, with the per-row factors folded on [tokens, 1] tensors before they
meet the [tokens, h] ones and x converted to float32 once per pass (bf16 -> float32 is exact; a bf16
operand of a float32 product is converted by torch into a temporary copy on CPU, once per product):

    gy   = grad * weight                      (rounded to y's dtype, as the engine does)
    gw   = sum over tokens of grad * y
    c    = ((-0.5 * sum(gy * x32)) * rstd^3) / h * 2       per row, float32
    gx   = (gy * rstd + c * x32).to(dtype)

`c * x32` equals the plain `(expand(g) / h) * (2 * x32)` exactly (scaling by 2 is exact), so the
gradients are bit-identical to the plain module's in float32 and bf16 (tests/test_fused_kernels.py).

Measured (bench/README.md): 0-1 % less CPU time per bf16 step of the benchmark model, not slower
in fp32, and no float32 copy of each norm's input kept for the backward; with the one conversion of x
per pass (round four, an AMX CPU) a bf16 forward + backward of [2, 512, 512] takes 4.1 instead of
5.4 ms at one thread. SwiGLU has a function of the same kind (megatron/model/fused_swiglu.py).
"""

from __future__ import annotations

import torch


def use_fused() -> bool:
    """Outside torch.compile (inductor fuses the plain code itself)."""
    return not torch.compiler.is_compiling()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = torch.mul(x32, rstd, out=torch.empty_like(x))  # rounded once to x's dtype
        ctx.save_for_backward(x, weight, rstd, y)
        return weight * y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd, y = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * y).sum_to_size(weight.shape)
        if ctx.needs_input_grad[0]:
            # the plain path's gradient of x32 * rstd: rounded to y's dtype (the engine casts a
            # gradient to its input's dtype; a no-op unless the weight is float32 and x is not)
            g32 = (grad * weight).to(y.dtype).float()  # a new tensor: scaled in place below
            x32 = x.float()
            # per row: rsqrt's backward (-0.5 * g * rstd^3), mean's (/ h), pow(2)'s (* 2)
            c = (-0.5 * (g32 * x32).sum_to_size(rstd.shape)) * rstd.pow(3) / x.shape[-1] * 2
            grad_x = torch.add(g32.mul_(rstd), c * x32, out=torch.empty_like(x))  # rounded once to x's dtype
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x in float32 * rsqrt(mean(x^2) + eps)).to(x.dtype), over the last dim."""
    return _RMSNorm.apply(x, weight, eps)
