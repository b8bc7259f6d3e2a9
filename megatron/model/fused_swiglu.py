"""SwiGLU as one autograd function: silu(gate) * up on the fused [gate; up] projection output, whose
backward writes both halves of the gradient into one [.., 2f] tensor.

The plain code (`MLP.forward`: `x.chunk(2)`, `F.silu(gate) * up`) keeps the same tensors for the
backward (x, holding gate and up, and silu(gate)) and computes the same products, but autograd then
concatenates the two half gradients into the input's gradient, one more pass over [tokens, 2f]. Here
`silu_backward` and the product write straight into the halves of one buffer. Same operations,
rounding for rounding: output and gradient bit-identical to the plain code (fp32 and bf16,
tests/test_fused_kernels.py).

Measured (bench/README.md, "bf16 round four"): forward + backward of [2, 512, 2 x 1408] in bf16 at one
thread 7.2 -> 6.4 ms (an AMX CPU; a first version measured neutral on a CPU without AMX, round three).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_fused() -> bool:
    """Outside torch.compile (inductor fuses the plain code itself)."""
    return not torch.compiler.is_compiling()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(x, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, act = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        torch.mul(grad, act, out=grad_up)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :f]) * x[..., f:] for x [..., 2f]."""
    return _SwiGLU.apply(x)
