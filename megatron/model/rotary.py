"""QKV split + rotary embedding in one autograd function: q, k, v come out as contiguous
[b, heads, s, d] tensors, ready for the attention's batched matmuls.

The plain path (`Attention.forward` without this) slices q/k/v out of the fused QKV output,
rotates q and k with `apply_rotary` (chunk, neg, cat, two products, a sum: each a pass over the
tensor, and autograd keeps the pieces), transposes them to [b, heads, s, d] and leaves the
attention to copy them into contiguous tensors; its backward fills a zero QKV gradient and adds
q, k and v's gradients into it. Here the forward writes each rotated half straight into a
contiguous [b, heads, s, d] buffer, and the backward writes the inverse rotation of q and k's
gradients and v's gradient straight into the QKV gradient: no zero-fill, no concatenation, no
saved activations (only the cos/sin tables).

The arithmetic is the plain path's, rounding for rounding (the test checks bit equality in bf16
and float32): forward, with x = [x1, x2] split at r/2 and cos/sin rounded to x's dtype,

    out1 = x1*cos1 - x2*sin1        out2 = x2*cos2 + x1*sin2        (each product rounded, then the sum)

backward, with g = [g1, g2]:  dx1 = g1*cos1 + g2*sin2,  dx2 = g2*cos2 - g1*sin1; dims past the
rotary ones (--rotary-percent < 1) pass through.
"""

from __future__ import annotations

import torch


def use_fused() -> bool:
    """Outside torch.compile (inductor fuses the plain path itself)."""
    return not torch.compiler.is_compiling()


def _rotate(dst: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """dst[..., :r] = rotation of x[..., :r] (r = cos.shape[-1]); inverse: the transposed rotation.
    dst[..., r:] = x[..., r:]. x may be any strided view of dst's shape."""
    r = cos.shape[-1]
    h = r // 2
    x1, x2 = x[..., :h], x[..., h:r]
    c1, c2, s1, s2 = cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
    o1, o2 = dst[..., :h], dst[..., h:r]
    if inverse:  # dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1
        torch.mul(x1, c1, out=o1)
        o1.add_(x2 * s2)
        torch.mul(x2, c2, out=o2)
        o2.sub_(x1 * s1)
    else:  # out1 = x1*c1 - x2*s1, out2 = x2*c2 + x1*s2
        torch.mul(x1, c1, out=o1)
        o1.sub_(x2 * s1)
        torch.mul(x2, c2, out=o2)
        o2.add_(x1 * s2)
    if x.shape[-1] > r:
        dst[..., r:].copy_(x[..., r:])


class _QKVRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_kv: int, group: int, d: int, cos: torch.Tensor, sin: torch.Tensor):
        b, s, _ = qkv.shape
        heads = n_kv * group
        # [b, n_kv, g + 2, s, d] view of the group-major fused layout (see megatron/model/gpt.py)
        parts = qkv.view(b, s, n_kv, group + 2, d).permute(0, 2, 3, 1, 4)
        q = qkv.new_empty(b, n_kv, group, s, d)
        k = qkv.new_empty(b, n_kv, 1, s, d)
        _rotate(q, parts[:, :, :group], cos, sin, inverse=False)
        _rotate(k, parts[:, :, group:group + 1], cos, sin, inverse=False)
        v = parts[:, :, group + 1].contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.dims = (n_kv, group, d)
        return q.view(b, heads, s, d), k.view(b, n_kv, s, d), v

    @staticmethod
    def backward(ctx, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        n_kv, group, d = ctx.dims
        b, _, s, _ = gq.shape
        grad = gq.new_empty(b, s, n_kv, group + 2, d)
        parts = grad.permute(0, 2, 3, 1, 4)  # [b, n_kv, g + 2, s, d] view of the gradient
        _rotate(parts[:, :, :group], gq.view(b, n_kv, group, s, d), cos, sin, inverse=True)
        _rotate(parts[:, :, group:group + 1], gk.view(b, n_kv, 1, s, d), cos, sin, inverse=True)
        parts[:, :, group + 1].copy_(gv.view(b, n_kv, s, d))
        return grad.view(b, s, -1), None, None, None, None, None


def qkv_rotary(qkv: torch.Tensor, n_kv: int, group: int, d: int, cos: torch.Tensor, sin: torch.Tensor):
    """qkv [b, s, n_kv * (group + 2) * d] (group-major) -> q [b, n_kv*group, s, d], k and v
    [b, n_kv, s, d], contiguous, q and k rotated. cos/sin as `RotaryEmbedding` returns them:
    [s, 1, r] or [b, s, 1, r]."""
    dt = qkv.dtype
    # to [s, r] or [b, 1, 1, s, r]: broadcast over [b, n_kv, heads per group, s, r]
    cos, sin = (t.to(dt).squeeze(-2) for t in (cos, sin))
    if cos.dim() == 3:  # per-sample positions
        cos, sin = cos[:, None, None], sin[:, None, None]
    return _QKVRotary.apply(qkv, n_kv, group, d, cos, sin)
