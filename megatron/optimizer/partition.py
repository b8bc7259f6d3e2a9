"""Whole-tensor views of what DeepSpeed hands an optimizer.

Under ZeRO 1/2/3 (and DeepSpeed's bf16/fp16 optimizers at stage 0) a client optimizer does not
see the model's tensors: each parameter group is one flat fp32 tensor ("partition") holding this
rank's slice of the group's parameters laid end to end. Elementwise optimizers (Adam, Lion, ...)
do not care. Optimizers whose math is per tensor do: LAMB's trust ratio ||w||/||u||, Muon's
Newton-Schulz orthogonalization, MuonClip's per-head rescale, SophiaG's Hessian refresh,
schedule-free's swap of the model's weights. Upstream ran them on the flat partition: different
math, silently.

A `Layout` says which pieces ("fragments") of which whole tensors a flat tensor holds, and over
which process group the other pieces live. With it an optimizer computes per-tensor norms (local
partial sums of squares, one all-reduce, accumulated in fp64), gathers whole tensors (each rank
writes its fragments into a zero buffer, one all-reduce) and writes whole-tensor results back to
its fragments. A real, unpartitioned parameter is `Layout.whole(p)`: one fragment, no group, no
communication, the same code path.

`attach_layouts(engine)` builds the layouts from the DeepSpeed optimizer the engine wraps (read
through megatron/deepspeed_compat/partitions.py) and gives the client optimizer `layouts` and `sync_model_weights` (push the fp32
masters back into the model's weights after an in-place change such as a schedule-free swap).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron.deepspeed_compat.partitions import model_sync, partition_maps


@dataclass(frozen=True)
class Fragment:
    index: int         # which tensor of the layout
    tensor_start: int  # first element of the fragment in the flattened whole tensor
    local_start: int   # first element of the fragment in the flat tensor the optimizer holds
    numel: int


@dataclass
class Layout:
    params: list            # the model parameters (whole tensors), in layout order
    shapes: list            # their whole shapes
    fragments: list         # Fragment per locally held piece
    group: Any = None       # process group holding the other pieces (None: everything is local)
    _index: dict = field(default_factory=dict, repr=False)

    @classmethod
    def whole(cls, p: torch.Tensor) -> "Layout":
        return cls([p], [p.shape], [Fragment(0, 0, 0, p.numel())])

    @property
    def distributed(self) -> bool:
        return self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, group=self.group)
        return t

    def sq_norms(self, x: torch.Tensor) -> torch.Tensor:
        """Squared L2 norm of each whole tensor (fp64), from the fragments of `x` (shaped like the
        flat tensor) summed over the group."""
        flat = x.reshape(-1)
        out = torch.zeros(len(self.params), dtype=torch.float64, device=x.device)
        for f in self.fragments:
            piece = flat[f.local_start:f.local_start + f.numel]
            out[f.index] += torch.linalg.vector_norm(piece, dtype=torch.float64) ** 2
        return self._reduce(out)

    def per_element(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like `like` holding, at each element, `values[i]` of its whole tensor i
        (0 on padding that belongs to no tensor)."""
        out = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
        for f in self.fragments:
            out[f.local_start:f.local_start + f.numel] = values[f.index]
        return out.view_as(like)

    def gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The whole tensors (fp32) whose fragments `x` holds, assembled over the group."""
        if not self.distributed and len(self.fragments) == 1 and x.numel() == self.fragments[0].numel:
            return [x.reshape(self.shapes[0]).float()]
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        buf = torch.zeros(offsets[-1], dtype=torch.float32, device=x.device)
        flat = x.reshape(-1)
        for f in self.fragments:
            start = offsets[f.index] + f.tensor_start
            buf[start:start + f.numel] = flat[f.local_start:f.local_start + f.numel]
        self._reduce(buf)
        return [buf[offsets[i]:offsets[i + 1]].view(self.shapes[i]) for i in range(len(sizes))]

    def scatter(self, wholes: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """This rank's fragments of the whole tensors `wholes`, laid out like `like` (0 on padding)."""
        if len(self.fragments) == 1 and like.numel() == self.fragments[0].numel and not self.distributed:
            return wholes[0].reshape(like.shape).to(like.dtype)
        out = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
        for f in self.fragments:
            piece = wholes[f.index].reshape(-1)[f.tensor_start:f.tensor_start + f.numel]
            out[f.local_start:f.local_start + f.numel] = piece
        return out.view_as(like)

    def fragment_of(self, param: torch.Tensor) -> Fragment | None:
        """The local fragment of model parameter `param` (None if this rank holds none of it)."""
        if not self._index:
            self._index.update({id(p): i for i, p in enumerate(self.params)})
        i = self._index.get(id(param))
        return next((f for f in self.fragments if f.index == i), None) if i is not None else None


class PartitionedWeights:
    """What a per-tensor optimizer mixes in: `layout(p)` for each of its parameters (the flat
    partition DeepSpeed gave it, or a real tensor) and `sync_model_weights()`."""

    layouts: dict[int, Layout] | None = None
    _sync: Callable[[], None] | None = None

    def layout(self, p: torch.Tensor) -> Layout:
        lay = (self.layouts or {}).get(id(p))
        return lay if lay is not None else Layout.whole(p)

    def sync_model_weights(self) -> None:
        """After changing the optimizer's (master) weights in place, make the model's weights equal."""
        if self._sync is not None:
            self._sync()

    def model_params(self) -> list[torch.Tensor]:
        """The model's parameters this optimizer updates (whole tensors), in layout order."""
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                out.extend(self.layout(p).params)
        return out

    @torch.no_grad()
    def scale_model_param(self, param: torch.Tensor, factor: torch.Tensor) -> None:
        """param *= factor (broadcast to param's shape) in the model's weights and in the master
        fragment this optimizer holds, so the two stay equal. Where the master is the weights' own
        buffer (fp32 ZeRO-1/2 at one replica: deepspeed_compat.share_single_replica_master_weights),
        the weight is scaled once, through the master."""
        scaled_in_master = False
        for g in self.param_groups:
            for flat in g["params"]:
                lay = self.layout(flat)
                if flat is param or lay.params == [flat]:
                    continue
                f = lay.fragment_of(param)
                if f is None:
                    continue
                full = factor.expand(param.shape).reshape(-1).to(flat.dtype)
                flat.view(-1)[f.local_start:f.local_start + f.numel].mul_(full[f.tensor_start:f.tensor_start + f.numel])
                scaled_in_master |= flat.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        if not scaled_in_master:
            param.mul_(factor.to(param.dtype))


def attach_layouts(engine) -> None:
    """Give the engine's client optimizer, if it is a `PartitionedWeights`, its layouts."""
    zero = getattr(engine, "optimizer", None)
    client = getattr(engine, "basic_optimizer", None) or zero
    if not isinstance(client, PartitionedWeights):
        client = getattr(zero, "optimizer", None)
    if not isinstance(client, PartitionedWeights):
        return
    client.layouts, client._sync = layouts_of(zero) if zero is not client else ({}, None)


def layouts_of(zero) -> tuple[dict[int, Layout], Callable[[], None] | None]:
    """({id(flat tensor): Layout}, sync) for the DeepSpeed optimizer `zero` (an engine's
    `.optimizer`), from DeepSpeed's partition bookkeeping; ({}, None) when the client optimizer holds
    the model's tensors itself."""
    maps = partition_maps(zero)
    if not maps:
        return {}, None
    return ({key: Layout(m.params, m.shapes, [Fragment(*f) for f in m.fragments], m.group) for key, m in maps.items()},
            model_sync(zero))
