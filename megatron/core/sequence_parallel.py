"""Ulysses sequence parallelism (DeepSpeed-Ulysses): `--ds-sequence-parallel-size N` (launcher `SP=N`).

The N ranks of a sequence-parallel (SP) group read the same samples (the sampler is keyed by the
data-parallel rank) and each keeps N-th of every sequence: SP rank r holds the tokens
[r * s/N, (r + 1) * s/N). Everything in a layer is per token except attention, where DeepSpeed's
`DistributedAttention` exchanges q, k, v with an all-to-all, [b, s/N, heads, d] -> [b, s, heads/N, d],
runs the ordinary causal attention over the whole sequence on heads/N heads, and exchanges the
result back. Hence heads and KV heads must divide by N (a rank keeps whole KV groups with their
query heads) and so must the sequence length.

* Positions: the model gives each shard its global positions (rank r: r * s/N + 0, 1, ...), for RoPE
  (applied to q and k before the exchange) and for learned position embeddings alike.
* Loss: the masked mean over the whole sequence. Each rank computes the masked sum of its tokens;
  sums and mask counts are all-reduced over the SP group. The value every SP rank reports is the
  full-sequence loss (the SP = 1 loss); its gradient is that of the rank's share (local sum / total
  count), and DeepSpeed sums gradients over the SP group (it reduces over the mpu's
  sequence+data-parallel group and divides by its size / N = the data-parallel size), which gives
  the gradient of the full loss.
* Data parallelism is over world / (TP * PP * SP) ranks.

ZeRO-3 works with two corrections of DeepSpeed 0.19.8 (megatron/deepspeed_compat/engine.py): its
parameters are partitioned over the sequence+data-parallel group (DeepSpeed used the data-parallel
group, so no gradient was summed over the SP ranks), and its reduce-scatter sums over the SP ranks
(it averaged over them).

Not combined (refused by `ulysses_problems`): TP > 1, PP > 1 (DeepSpeed's pipeline engine reduces
over the data-parallel group only), --compile, and the optimizers that replay micro-batches through
the model after a step (sophiag, muonclip).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron.config import Config
from megatron.core import parallel_state as ps

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
REPLAYING_OPTIMIZERS = ("sophiag", "muonclip")  # run extra forwards on whole micro-batches after a step


def world_size() -> int:
    return ps.get_sequence_parallel_world_size()


def rank() -> int:
    return ps.get_sequence_parallel_rank()


def ulysses_problems(config: Config) -> list[str]:
    """One line per problem with `--ds-sequence-parallel-size` (nothing to check at SP = 1)."""
    sp = config.parallel.ds_sequence_parallel_size
    if not sp or sp <= 1:
        return []
    errs: list[str] = []
    heads = config.model.num_attention_heads
    kv = config.model.num_key_value_heads or heads
    if heads and heads % sp:
        errs.append(f"--num-attention-heads ({heads}) must be divisible by --ds-sequence-parallel-size ({sp}) "
                    "(Ulysses gives each SP rank heads/SP heads); change SP or HEADS")
    if kv and kv % sp:
        errs.append(f"--num-key-value-heads ({kv}) must be divisible by --ds-sequence-parallel-size ({sp}) "
                    "(each SP rank keeps whole KV groups); change SP or NUM_KV_HEAD")
    seq = config.model.seq_length
    if seq and seq % sp:
        errs.append(f"--seq-length ({seq}) must be divisible by --ds-sequence-parallel-size ({sp}) "
                    "(each SP rank holds seq/SP tokens); change SEQ or SP")
    if config.parallel.tensor_model_parallel_size > 1:
        errs.append(f"Ulysses sequence parallelism (SP={sp}) together with tensor parallelism "
                    f"(TP={config.parallel.tensor_model_parallel_size}) is not supported yet; use TP=1 or SP=1")
    if config.parallel.pipeline_model_parallel_size > 1:
        errs.append(f"Ulysses sequence parallelism (SP={sp}) together with pipeline parallelism "
                    f"(PP={config.parallel.pipeline_model_parallel_size}) is not supported yet; use PP=1 or SP=1")
    if config.training.compile:
        errs.append(f"--compile is not supported with Ulysses sequence parallelism (SP={sp}) yet (its all-to-all "
                    "is an autograd function over a process group); drop --compile or use SP=1")
    name = config.optimizer.optimizer
    if name in REPLAYING_OPTIMIZERS:
        errs.append(f"--optimizer {name} is not supported with Ulysses sequence parallelism (SP={sp}) "
                    "yet (it replays whole micro-batches through the model); use another optimizer or SP=1")
    return errs


def shard(x: torch.Tensor | None, dim: int = 1) -> torch.Tensor | None:
    """This SP rank's contiguous slice of `x` along the sequence dimension `dim` (x itself at SP = 1)."""
    n = world_size()
    if x is None or n == 1:
        return x
    s = x.shape[dim]
    if s % n:
        raise ValueError(f"sequence length {s} is not divisible by the sequence-parallel size {n}")
    return x.narrow(dim, rank() * (s // n), s // n).contiguous()


def shard_position_ids(local_len: int, device) -> torch.Tensor | None:
    """Global positions [local_len] of this rank's shard; None at SP = 1 (positions 0..s-1)."""
    if world_size() == 1:
        return None
    return torch.arange(rank() * local_len, (rank() + 1) * local_len, device=device)


def whole_sequence_loss(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of per-token `losses` [b, s/SP] over the whole sequences of the SP group.

    The value is the full-sequence loss on every SP rank; the gradient is that of this rank's
    share (its masked sum / the group's mask count), so the SP-sum of gradients is the full gradient."""
    local = (losses.float() * mask).sum()
    count = mask.sum()
    if world_size() == 1:
        return local / count.clamp(min=1.0)
    totals = torch.stack([local.detach(), count.detach().to(local.dtype)])
    dist.all_reduce(totals, group=ps.get_sequence_parallel_group())
    denominator = totals[1].clamp(min=1.0)
    share = local / denominator
    return share + (totals[0] / denominator - share.detach())


class UlyssesAttention(nn.Module):
    """`attend(q, k, v)` (tensors [b, heads, s, d], causal over s) run over the whole sequence of the
    SP group: takes this rank's [b, heads, s/SP, d] and returns [b, heads, s/SP, d]. The exchange is
    DeepSpeed's `DistributedAttention` (batch-first layout: scatter heads, gather sequence)."""

    def __init__(self, attend: Attend, group) -> None:
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention  # noqa: PLC0415  (heavy; only when SP > 1)

        def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # [b, s, heads/SP, d] in and out (DistributedAttention's layout); attend wants [b, heads, s, d]
            out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        self.exchange = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)
        return out.transpose(1, 2)


def ulysses_attention(attend: Attend, num_heads: int, num_kv_heads: int) -> UlyssesAttention | None:
    """The Ulysses wrapper of `attend` for a layer with these (this TP rank's) head counts; None at SP = 1."""
    n = world_size()
    if n == 1:
        return None
    if num_heads % n or num_kv_heads % n:
        raise ValueError(f"attention heads ({num_heads}) and KV heads ({num_kv_heads}) must be divisible by the "
                         f"sequence-parallel size ({n})")
    return UlyssesAttention(attend, ps.get_sequence_parallel_group())
