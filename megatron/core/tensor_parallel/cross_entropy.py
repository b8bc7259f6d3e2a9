"""Cross-entropy over vocabulary-parallel logits, computed without gathering the vocabulary.

Each rank holds logits [..., V/t] for its vocabulary slice. The loss of a token is
log(sum_v exp(z_v - m)) - (z_target - m), with m the global max (all-reduce MAX), the sum of
exponentials and the target logit assembled with all-reduce SUM. Computed in float32; label
`ignore_index` gives loss 0 and no gradient (as `F.cross_entropy(reduction="none")`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state as ps


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        group = ps.get_tensor_model_parallel_group()
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)

        per_rank = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * per_rank
        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=group)

        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ignored = target == ignore_index
        loss = (sum_exp.log() - predicted).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local_target, ignored = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token float32 loss, shaped like `labels`, from logits [..., V/t] (t = TP size).
    With one TP rank this is `F.cross_entropy(..., reduction="none")`."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none",
                               ignore_index=ignore_index)
        return loss.view_as(labels)
    return _VocabParallelCrossEntropy.apply(logits.float(), labels, ignore_index)
