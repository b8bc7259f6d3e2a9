"""Output layer + cross-entropy in one autograd function, for bf16 (one tensor-parallel rank).

The plain path (`head(x)` then `F.cross_entropy(logits.float(), ...)`) keeps three [tokens, V]
tensors for the backward (bf16 logits, their float32 copy, float32 log-probabilities) and runs
a float32 fill + scatter + log-softmax backward + cast back to bf16 on them. Here the forward
writes the logits into one bf16 buffer with a single matmul, then walks it in row chunks (1 MiB
of float32 each, so no float32 [tokens, V] tensor exists): in float32 it computes each row's log-sum-exp, the loss, and the
gradient of the loss with respect to the logits, softmax - one-hot, which it writes back over
the logits in bf16. The backward is two matmuls with that buffer, the per-token output
gradient g applied on the [tokens, hidden] side:

    dL/dx = g * (G @ W)        dL/dW = G^T @ (g * x)        with G = softmax(logits) - onehot(labels)

The math equals the plain path's up to where the bf16 rounding happens: the plain path rounds
g * G to bf16, this one rounds G and then g * x (or g * (G @ W)); when g is a power of two (a
mean over 2^k tokens, as in the trainer's benchmark) the two are the same numbers. The loss
itself is float32 from bf16 logits, as before. Memory: one bf16 [tokens, V] buffer instead of
the three tensors above.

Semantics equal `vocab_parallel_cross_entropy(x @ W.T, labels)` at TP = 1: per-token float32
loss shaped like `labels`, label -100 gives loss 0 and no gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# float32 elements per row chunk: 1 MiB, within a core's L2 on the AMX CPU (2 MiB): the bench model's loss
# forward + backward 40.5 -> 34.7 ms at one thread against 4 MiB chunks (2 MiB: 44-49 ms; 256-512 KiB as 1 MiB)
CHUNK_ELEMENTS = 2**18


def use_fused(x: torch.Tensor) -> bool:
    """bf16 on CPU, outside torch.compile (inductor fuses the plain path itself)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.compiler.is_compiling()


class _OutputCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = labels.reshape(-1)
        valid = y != IGNORE_INDEX
        y = torch.where(valid, y, 0).unsqueeze(1)
        grad_logits = torch.mm(x2, weight.t())  # [n, V] bf16: the logits, overwritten with G chunk by chunk
        n, vocab = grad_logits.shape
        loss = torch.empty(n, dtype=torch.float32, device=x.device)
        rows = max(1, CHUNK_ELEMENTS // vocab)
        minus_one = torch.full((rows, 1), -1.0, device=x.device)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            yc = y[start:end]
            logprobs = torch.log_softmax(grad_logits[start:end].float(), dim=-1)
            torch.neg(logprobs.gather(1, yc), out=loss[start:end].unsqueeze(1))
            probs = logprobs.exp_()
            probs.scatter_add_(1, yc, minus_one[:end - start])
            grad_logits[start:end].copy_(probs)
        if not bool(valid.all()):
            loss.masked_fill_(~valid, 0.0)
            grad_logits.masked_fill_(~valid.unsqueeze(1), 0)
        ctx.save_for_backward(x2, weight, grad_logits)
        ctx.x_shape = x.shape
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x2, weight, grad_logits = ctx.saved_tensors
        g = grad_loss.reshape(-1, 1).float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_logits, weight).mul(g).to(x2.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad_logits.t(), x2.mul(g).to(x2.dtype))
        return grad_x, grad_w, None


def output_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token float32 loss [*labels.shape] of logits x @ weight.T (x [..., h], weight [V, h])."""
    return _OutputCrossEntropy.apply(x, weight, labels)
