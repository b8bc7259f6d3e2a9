"""Autograd functions that move activations between the ranks of a tensor-parallel group.

Each is a pair (forward collective, backward collective) as in Megatron:

    copy_to_tensor_model_parallel_region        identity   / all-reduce
    reduce_from_tensor_model_parallel_region    all-reduce / identity
    scatter_to_tensor_model_parallel_region     split last dim / all-gather last dim
    gather_from_tensor_model_parallel_region    all-gather last dim / split last dim
    scatter_to_sequence_parallel_region         split seq dim / all-gather seq dim
    gather_from_sequence_parallel_region        all-gather seq dim / reduce-scatter seq dim
    reduce_scatter_to_sequence_parallel_region  reduce-scatter seq dim / all-gather seq dim

Tensors are [batch, seq, ...] here, so the sequence dimension is 1 (Megatron's is 0). With one
TP rank every function returns its input unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

SEQ_DIM = 1


def _world() -> int:
    return ps.get_tensor_model_parallel_world_size()


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _world() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    return x


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = _world()
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the TP size {world}")
    return x.chunk(world, dim=dim)[ps.get_tensor_model_parallel_rank()].contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = _world()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = _world()
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the TP size {world}")
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((front.shape[0] // world, *front.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, front, group=ps.get_tensor_model_parallel_group())
    return out.movedim(0, dim)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1)


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        # The consumer is a TP-split computation (column-parallel linear): each rank holds a
        # partial gradient of the full sequence, so the gradients are summed and scattered.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter(g, SEQ_DIM), None
        return _split(g, SEQ_DIM), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToRegion.apply(x) if _world() > 1 else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromRegion.apply(x) if _world() > 1 else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToRegion.apply(x) if _world() > 1 else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _GatherFromRegion.apply(x) if _world() > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToSequence.apply(x) if _world() > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    return _GatherFromSequence.apply(x, tensor_parallel_output_grad) if _world() > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceScatterToSequence.apply(x) if _world() > 1 else x


def all_reduce_gradient_hook(grad: torch.Tensor) -> torch.Tensor:
    """Tensor hook summing a parameter's gradient over the TP group (parameters that are
    replicated across TP ranks but see only a sequence shard under sequence parallelism)."""
    return _all_reduce(grad.clone())
