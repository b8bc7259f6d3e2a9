"""Explicit (unfused) attention for bfloat16 on CPU, where it beats the fused kernel.

Why (measured on a 2-core CPU, torch 2.13, causal, forward + backward): at [batch 2, heads 8,
seq 512, head dim 64] `F.scaled_dot_product_attention` in bf16 (its CPU flash kernel) took ~20 ms
and this path 8-18 ms (the spread is glibc's allocator: whether the s x s tensors come back as fresh
pages); in the whole bf16 GPTModel of the trainer's benchmark (6 layers, hidden 512, those attention
shapes) a forward + backward took 0.78-0.82x the time it takes with sdpa (also with 2 of 8 kv heads).
The path is one bf16 `baddbmm` for the scores with the additive mask fused in, a softmax computed
in float32 and rounded once to bf16, one bf16 `bmm` with v: what Megatron's unfused bf16 attention
and HF's eager attention do. Its max abs error against a float64 reference is ~0.015 vs the flash
kernel's ~0.009, both bf16-level. In float32 it gains nothing, and for large score tensors the
flash kernel wins (2**24 elements: even; 2**25: 1.3x slower), so `Attention.core_attention` takes
this path only for bf16 on CPU within `MAX_SCORE_ELEMENTS` (`use_explicit`) and
`F.scaled_dot_product_attention` everywhere else.

Causal masks without dropout (the default training case) skip the masked half: the queries are cut
into `causal_blocks` blocks (4 of 128 rows at seq 512) and block i computes scores, softmax and
both matmuls only against keys [0, end of block i), (k + 1) / 2k of the s x s work (`_BlockCausal`,
whose backward adds each block's k and v gradients into the last block's). The forward is the same
per-row arithmetic on a shorter row (the skipped probabilities are exact zeros); the k/v gradients
are rounded to bf16 once per block they are summed over. One thread, bench model (6 layers,
[2, 8, 512, 64]): 5-8 % less process CPU time per bf16 training step (runs at different loads,
bench/README.md); 4 blocks beat 2 and 8 (64-row blocks).

Semantics equal `F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
dropout_p=dropout, enable_gqa=True, scale=scale)`: query head i uses kv head i // (heads / kv heads),
the causal mask is top-left aligned, rows with nothing to attend to give zeros.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# Cap on b * heads * s_q * s_k. The path materializes all heads' scores: bf16 scores and bf16
# probabilities (16 MB each at 2**23; backward keeps the probabilities: 16 MB per layer, plus the
# dropout mask). Past ~2**23 elements the tensors exceed glibc's dynamic mmap threshold (32 MB), every
# step pays fresh page faults for them, and the fused kernel (O(s) memory) was measured as fast or
# faster (model-level: 2**23 -> 0.88x the sdpa time, 2**24 -> 1.0x, 2**25 -> 1.33x). Tests lower it.
MAX_SCORE_ELEMENTS = 2**23
CAUSAL_BLOCKS = 4  # query blocks of the causal path (`causal_blocks`); 1 turns the split off
MIN_BLOCK_ROWS = 128


def use_explicit(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when `attention` is the faster choice: bf16 on CPU and b*heads*s_q*s_k within the cap."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return False
    b, h, s_q, _ = q.shape
    return b * h * s_q * k.shape[-2] <= MAX_SCORE_ELEMENTS


def causal_blocks(s_q: int, s_k: int) -> int:
    """Query blocks of the causal path: block i of B rows attends keys [0, (i + 1) B) only, skipping
    the fully masked score tiles right of it (with k blocks the scores, softmax and both matmuls do
    (k + 1) / 2k of the full s x s work). 1 (no split) for short or uneven sequences."""
    if s_q != s_k:
        return 1
    for k in range(CAUSAL_BLOCKS, 1, -1):
        if s_q % k == 0 and s_q // k >= MIN_BLOCK_ROWS:
            return k
    return 1


class _BlockCausal(torch.autograd.Function):
    """Causal attention on [n, s, d] q/k/v, query block by query block (see `causal_blocks`). Every
    matmul writes a fresh contiguous tensor (an in-place matmul into a slice would go through a
    contiguous copy of it and back); the backward adds each block's k and v gradients into the
    rows it covers of the last block's (which covers every key)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: int, scale: float) -> torch.Tensor:
        n, s, d = q.shape
        rows = s // blocks
        full = _causal_bias(s, s, q.device, q.dtype)
        probs, outs = [], []
        for i in range(blocks):
            lo, hi = i * rows, (i + 1) * rows  # queries [lo, hi) see keys [0, hi)
            scores = torch.baddbmm(q.new_empty(n, rows, hi), q[:, lo:hi], k[:, :hi].transpose(1, 2), beta=0.0,
                                   alpha=scale)
            scores[:, :, lo:].add_(full[lo:hi, lo:hi])  # the mask: only the diagonal tile has masked entries
            probs.append(torch.softmax(scores, dim=-1))
            outs.append(torch.bmm(probs[-1], v[:, :hi]))
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale = scale
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, *probs = ctx.saved_tensors
        blocks, scale = len(probs), ctx.scale
        rows = q.shape[1] // blocks
        dq, dk, dv = [None] * blocks, None, None
        for i in reversed(range(blocks)):  # the last block first: its k and v gradients cover every key
            lo, hi = i * rows, (i + 1) * rows
            p, g = probs[i], grad_out[:, lo:hi]
            dv_i = torch.bmm(p.transpose(1, 2), g)
            ds = torch.ops.aten._softmax_backward_data(torch.bmm(g, v[:, :hi].transpose(1, 2)), p, -1, p.dtype)
            dq[i] = torch.baddbmm(p.new_empty(p.shape[0], rows, q.shape[2]), ds, k[:, :hi], beta=0.0, alpha=scale)
            dk_i = torch.baddbmm(p.new_empty(p.shape[0], hi, q.shape[2]), ds.transpose(1, 2), q[:, lo:hi], beta=0.0,
                                 alpha=scale)
            if dk is None:
                dk, dv = dk_i, dv_i
            else:
                dk[:, :hi].add_(dk_i)
                dv[:, :hi].add_(dv_i)
        return torch.cat(dq, dim=1), dk, dv, None, None


@functools.lru_cache(maxsize=4)
def _causal_bias(s_q: int, s_k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[s_q, s_k] additive mask, 0 where key j <= query i, else the dtype's lowest finite value
    (finite so a row never becomes NaN); built on first use, shared by all layers."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor even if first built in inference mode
        bias = torch.full((s_q, s_k), torch.finfo(dtype).min, device=device, dtype=dtype)
        return bias.triu_(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """q [b, heads, s_q, d], k/v [b, kv_heads, s_k, d] -> [b, heads, s_q, d].

    `mask` (bool, broadcastable to [b, heads, s_q, s_k], True = may attend) replaces the causal
    mask; `scale` None -> 1/sqrt(d); `dropout` > 0 drops probabilities (the caller picks the RNG).
    """
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    g = h // h_kv
    if g > 1:  # query head i uses kv head i // g (copies k and v: small next to the scores)
        k = k.unsqueeze(2).expand(b, h_kv, g, s_k, d).reshape(b, h, s_k, d)
        v = v.unsqueeze(2).expand(b, h_kv, g, s_k, d).reshape(b, h, s_k, d)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n = b * h
    blocks = causal_blocks(s_q, s_k) if mask is None and dropout == 0 else 1
    if blocks > 1:
        return _BlockCausal.apply(q.reshape(n, s_q, d), k.reshape(n, s_k, d), v.reshape(n, s_k, d), blocks,
                                  scale).view(b, h, s_q, d)
    if mask is None:
        bias = _causal_bias(s_q, s_k, q.device, q.dtype).expand(n, s_q, s_k)
    else:
        bias = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill_(~mask, torch.finfo(q.dtype).min)
        bias = bias.expand(b, h, s_q, s_k).reshape(n, s_q, s_k)
    scores = torch.baddbmm(bias, q.reshape(n, s_q, d), k.reshape(n, s_k, d).transpose(1, 2), alpha=scale)
    # bf16 in and out, computed in float32 inside the CPU kernel: the same probabilities as
    # softmax(dtype=float32).to(bf16), without two float32 s x s tensors (and backward keeps bf16 ones)
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, dropout, training=True)
    out = torch.bmm(probs, v.reshape(n, s_k, d)).view(b, h, s_q, d)
    if mask is not None:  # a row that may attend nothing: zeros, as the fused kernel (not a uniform average)
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out
