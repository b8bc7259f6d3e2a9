"""Megatron's tensor-parallel layers: column- and row-parallel linears, vocab-parallel embedding.

With one TP rank each layer is exactly `nn.Linear` / `nn.Embedding` (same parameter shapes and
names, same forward arithmetic, same random draws at construction), so a TP=1 model is the
plain model. With TP = t:

* ColumnParallelLinear(in, out): weight [out/t, in]: output features split across ranks.
  `stride=2` splits each half of a fused [a; b] weight separately (SwiGLU's [gate; up]: rank r
  holds [gate_r; up_r], so `chunk(2)` of its output still gives its gate and up parts).
* RowParallelLinear(in, out): weight [out, in/t]: input features split; the partial outputs are
  summed over the TP group (all-reduce, or reduce-scatter along the sequence under sequence
  parallelism); the bias is replicated and added after the sum.
* VocabParallelEmbedding(V, h): weight [V/t, h]: rank r holds rows [r V/t, (r+1) V/t); tokens of
  other ranks give zeros, and the all-reduce assembles the embedding.

Split parameters carry `tensor_model_parallel=True`, `partition_dim` and `partition_stride`
(DeepSpeed's gradient clipping counts every other parameter once per TP group). Every layer can
be initialized from the full-size tensor (`init_partitioned`), so a model initializes to the
same weights whatever its TP size.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import mappings


def set_tensor_model_parallel_attributes(param: torch.Tensor, partition_dim: int, stride: int = 1) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def is_partitioned(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and ps.get_tensor_model_parallel_world_size() > 1


def full_shape(param: torch.Tensor) -> torch.Size:
    """Shape of the whole (unsplit) parameter."""
    if not is_partitioned(param):
        return param.shape
    shape = list(param.shape)
    shape[param.partition_dim] *= ps.get_tensor_model_parallel_world_size()
    return torch.Size(shape)


def shard(full: torch.Tensor, partition_dim: int, stride: int = 1, rank: int | None = None,
          world: int | None = None) -> torch.Tensor:
    """This rank's piece of `full`: each of the `stride` sub-blocks along `partition_dim` is cut
    in `world` contiguous pieces; the rank takes piece `rank` of each sub-block."""
    world = ps.get_tensor_model_parallel_world_size() if world is None else world
    rank = ps.get_tensor_model_parallel_rank() if rank is None else rank
    if world == 1:
        return full
    if full.shape[partition_dim] % (world * stride):
        raise ValueError(f"dimension {partition_dim} of size {full.shape[partition_dim]} is not divisible by "
                         f"TP size x stride = {world} x {stride}")
    blocks = full.chunk(stride, dim=partition_dim)
    return torch.cat([b.chunk(world, dim=partition_dim)[rank] for b in blocks], dim=partition_dim).contiguous()


def unshard(pieces: list[torch.Tensor], partition_dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's piece (in TP rank order)."""
    if len(pieces) == 1:
        return pieces[0]
    sub = [p.chunk(stride, dim=partition_dim) for p in pieces]
    return torch.cat([torch.cat([s[i] for s in sub], dim=partition_dim) for i in range(stride)], dim=partition_dim)


def gather_full(param: torch.Tensor, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The whole of `tensor` (default: the parameter itself; pass e.g. `param.grad`), laid out
    as `param` is, all-gathered over the TP group. Replicated parameters are returned as they are."""
    local = (param if tensor is None else tensor).detach()
    if not is_partitioned(param):
        return local
    world = ps.get_tensor_model_parallel_world_size()
    local = local.contiguous()
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local, group=ps.get_tensor_model_parallel_group())
    return unshard(pieces, param.partition_dim, param.partition_stride)


@torch.no_grad()
def init_partitioned(param: torch.Tensor, fill: Callable[..., object], *args, **kwargs) -> None:
    """Initialize `param` with `fill(tensor, *args, **kwargs)` (an in-place init such as
    `nn.init.normal_`) applied to the full-size tensor, then keep this rank's shard: the same
    random draws as on one rank."""
    if not is_partitioned(param):
        fill(param, *args, **kwargs)
        return
    full = torch.empty(full_shape(param), dtype=param.dtype, device=param.device)
    fill(full, *args, **kwargs)
    param.copy_(shard(full, param.partition_dim, param.partition_stride))


def _check_divisible(size: int, world: int, stride: int, what: str) -> None:
    if size % (world * stride):
        raise ValueError(f"{what} ({size}) must be divisible by the tensor-parallel size"
                         + (f" x {stride}" if stride > 1 else "") + f" ({world})")


class _ParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, partition_dim: int, stride: int) -> None:
        super().__init__()
        world = ps.get_tensor_model_parallel_world_size()
        self.in_features, self.out_features, self.world = in_features, out_features, world
        split = out_features if partition_dim == 0 else in_features
        _check_divisible(split, world, stride, "output features" if partition_dim == 0 else "input features")
        shape = [out_features, in_features]
        shape[partition_dim] //= world
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features // world if partition_dim == 0 else out_features)) \
            if bias else None
        if world > 1:
            set_tensor_model_parallel_attributes(self.weight, partition_dim, stride)
            if bias and partition_dim == 0:
                set_tensor_model_parallel_attributes(self.bias, 0, stride)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialization of the full-size layer (so the generator advances as on one rank)."""
        init_partitioned(self.weight, nn.init.kaiming_uniform_, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            init_partitioned(self.bias, nn.init.uniform_, -bound, bound)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tp={self.world}")


class ColumnParallelLinear(_ParallelLinear):
    """y = x A^T + b with A split by rows (output features). The input is the full activation
    (or, with `sequence_parallel`, this rank's sequence shard, all-gathered here); the output is
    this rank's slice of features, or the whole output with `gather_output`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, gather_output: bool = False,
                 sequence_parallel: bool = False, stride: int = 1) -> None:
        super().__init__(in_features, out_features, bias, partition_dim=0, stride=stride)
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.linear(x, self.weight, self.bias)
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x)
        else:
            x = mappings.copy_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight, self.bias)
        return mappings.gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """y = x A^T + b with A split by columns (input features); the input is already split by
    features (the output of a column-parallel layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 sequence_parallel: bool = False) -> None:
        super().__init__(in_features, out_features, bias, partition_dim=1, stride=1)
        self.sequence_parallel = sequence_parallel
        if self.bias is not None and sequence_parallel and self.world > 1:
            self.bias.sequence_parallel = True  # added on a sequence shard: gradient summed over TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; forward returns the full embedding on every rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        world = ps.get_tensor_model_parallel_world_size()
        _check_divisible(num_embeddings, world, 1, "padded vocabulary size")
        self.num_embeddings, self.embedding_dim, self.world = num_embeddings, embedding_dim, world
        self.per_rank = num_embeddings // world
        self.vocab_start = ps.get_tensor_model_parallel_rank() * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim))
        if world > 1:
            set_tensor_model_parallel_attributes(self.weight, 0, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_partitioned(self.weight, nn.init.normal_)  # nn.Embedding's initialization

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_start + self.per_rank)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.reduce_from_tensor_model_parallel_region(x)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.world}"


def parallel_lm_logits(x: torch.Tensor, word_embeddings_weight: torch.Tensor,
                       sequence_parallel: bool = False) -> torch.Tensor:
    """Logits of the tied LM head: this rank's vocabulary slice, [b, s, V/t]."""
    if ps.get_tensor_model_parallel_world_size() > 1:
        if sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x)
        else:
            x = mappings.copy_to_tensor_model_parallel_region(x)
    return F.linear(x, word_embeddings_weight)


def register_sequence_parallel_grad_hooks(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Under sequence parallelism, replicated parameters applied to a sequence shard (norms,
    row-parallel biases) get only that shard's gradient: sum it over the TP group, inside
    autograd (before DeepSpeed reduces gradients over data parallelism). Parameters whose name
    ends with one of `skip` see the whole sequence and are left alone. Returns the number of
    hooked parameters."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    n = 0
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False) or name.endswith(skip):
            continue
        p.sequence_parallel = True
        p.register_hook(mappings.all_reduce_gradient_hook)
        n += 1
    return n
