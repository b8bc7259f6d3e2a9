"""RMSNorm and SwiGLU as single autograd functions: the same arithmetic as the plain module code
(`RMSNorm.forward`, `MLP.forward` in megatron/model/gpt.py), rounding for rounding, in fewer passes.

RMSNorm (float32 compute, cast back to the input dtype before the weight, as HF Llama):

    y = (x32 * rstd).to(dtype),  rstd = rsqrt(mean(x32^2) + eps),  out = weight * y

The plain code's autograd keeps a float32 copy of x and runs ~14 passes over [tokens, h] in the
backward (float copies, an expanded division, `pow(1)`, a multiply by 2, ...). Here the forward
keeps x (in its own dtype), the float32 rstd [tokens, 1] and y; the backward evaluates the same
expressions autograd does, with the per-row factors folded on [tokens, 1] tensors before they
meet the [tokens, h] ones and bf16 operands promoted inside the float32 kernels (bf16 -> float32
is exact):

    gy   = grad * weight                      (in the input dtype, as the plain path rounds it)
    gw   = sum over tokens of grad * y
    c    = ((-0.5 * sum(gy * x32)) * rstd^3) / h * 2       per row, float32
    gx   = (gy * rstd + c * x32).to(dtype)

`c * x32` equals the plain `(expand(g) / h) * (2 * x32)` exactly (scaling by 2 is exact), so the
gradients are bit-identical to the plain module's in float32 and bf16 (tests/test_fused_kernels.py).

SwiGLU on the fused [gate; up] projection output z [..., 2f]: out = silu(gate) * up. The plain
code's backward runs two products, a separate `silu_backward` and a `cat` of the two halves into
the gradient of z; here the backward writes both halves straight into one [..., 2f] buffer
(`up`-half: grad * silu(gate); gate-half: silu_backward(grad * up, gate)): the same kernels on the
same operands, so bit-identical too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_fused() -> bool:
    """Outside torch.compile (inductor fuses the plain code itself)."""
    return not torch.compiler.is_compiling()


def use_fused_norm() -> bool:  # separate switches, so the benchmark can time each kernel alone
    return use_fused()


def use_fused_swiglu() -> bool:
    return use_fused()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = torch.mul(x, rstd, out=torch.empty_like(x))  # computed in float32, rounded once to x's dtype
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
            g32 = (grad * weight).to(y.dtype).float()
            # per row: rsqrt's backward (-0.5 * g * rstd^3), mean's (/ h), pow(2)'s (* 2)
            c = (-0.5 * (g32 * x).sum_to_size(rstd.shape)) * rstd.pow(3) / x.shape[-1] * 2
            grad_x = torch.add(g32 * rstd, c * x, out=torch.empty_like(x))  # rounded once to x's dtype
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x in float32 * rsqrt(mean(x^2) + eps)).to(x.dtype), over the last dim."""
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        gate, up = z.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, act = ctx.saved_tensors
        f = gate.shape[-1]
        grad_z = grad.new_empty(*grad.shape[:-1], 2 * f)
        torch.mul(grad, act, out=grad_z[..., f:])
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_z[..., :f])
        return grad_z


def swiglu(z: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of z = [gate; up] on the last dim."""
    return _SwiGLU.apply(z)
