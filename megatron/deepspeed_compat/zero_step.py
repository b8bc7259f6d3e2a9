"""bf16 ZeRO-1/2: DeepSpeed's optimizer step with its fp32 gradient partition made and stepped a chunk at a time.

DeepSpeed's `DeepSpeedZeroOptimizer.step` (stages 1 and 2, no offload) flattens the rank's bf16 gradient
partition into one new tensor, converts that to an fp32 copy, then unscales/clips it and steps the fp32
master partition once: while the optimizer states are live, a bf16 and an fp32 copy of the partition
(6 bytes per parameter of the partition; bench/memory.py's 134M model at DP = 2: 0.375 GiB above the
states, the ZeRO-1/2 peak). `step_zero12_in_chunks` does the same step (overflow check, norm, loss scale,
clipping factor, the bf16 partitions' copy-back and all-gather, this one in bucket-sized shards) but fills one fp32 buffer of
`chunk_elements` straight from the gradients the partition is made of, and steps the matching slice of the
master partition, whose optimizer state is handed to the optimizer as the same slices: each element sees
the same operations, the same bits (tests/test_zero_step.py, against DeepSpeed's step with clipping active).
Only for torch's Adam/AdamW (every state per element, or the shared step counter, which each chunk starts
from the same value) and chunks a multiple of 4096 elements (torch's fused CPU kernel vectorizes from each
slice's start: an unaligned start rounds the second moment differently, measured); any other optimizer,
offload, DeepSpeed's ZenFlow / torch-autocast scaler / Muon / pre-flattened (DeepCompile) partitions, MoE
groups and fp16/fp32 keep DeepSpeed's step; a step with an overflow or non-finite norm is DeepSpeed's own.
"""
from __future__ import annotations

ZERO12_STEP_CHUNK = 1 << 24  # elements of fp32 gradient made at a time (64 MiB)
ALIGN = 4096


def _eligible(opt) -> bool:
    import torch  # noqa: PLC0415

    return (type(opt).__name__ == "DeepSpeedZeroOptimizer" and opt.dtype == torch.bfloat16
            and not opt.cpu_offload and not getattr(opt, "zenflow", False)
            and getattr(opt, "torch_autocast_gradscaler", None) is None
            and type(opt.optimizer) in (torch.optim.Adam, torch.optim.AdamW)
            and not getattr(opt, "has_moe_layers", False))


def _fill(buf, pieces, start: int) -> None:
    """buf = the flat concatenation of `pieces` (zero past their end), elements [start, start + len(buf))."""
    end, offset = start + buf.numel(), 0
    covered = 0
    for piece in pieces:
        n = piece.numel()
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            buf.narrow(0, lo - start, hi - lo).copy_(piece.reshape(-1).narrow(0, lo - offset, hi - lo))
            covered = hi - start
        offset += n
        if offset >= end:
            break
    if covered < buf.numel():  # the last partition's alignment padding
        buf.narrow(0, covered, buf.numel() - covered).zero_()


def _step_slices(inner, index: int, master, grad_of, size: int, chunk: int) -> None:
    """Step `master` (1-D, in `inner.param_groups[index]`) with torch optimizer `inner`, `chunk` elements at
    a time: `grad_of(start, n)` gives the fp32 gradient of elements [start, start + n). The state of `master` is handed over as slices."""
    import torch  # noqa: PLC0415

    groups = inner.param_groups
    full = inner.state.get(master) or None
    fresh, shared = {}, {}
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        view = master.detach().narrow(0, start, n)
        view.grad = grad_of(start, n)
        if full is not None:
            inner.state[view] = {k: (v.narrow(0, start, n) if torch.is_tensor(v) and v.shape == master.shape
                                     else v.clone() if torch.is_tensor(v) else v) for k, v in full.items()}
        inner.param_groups = [dict(groups[index], params=[view])]
        try:
            inner.step()
        finally:
            inner.param_groups = groups
            state = inner.state.pop(view, {})
            view.grad = None
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == view.shape and v.dim() > 0:
                if full is None:  # the first step: the optimizer made this slice's state
                    fresh.setdefault(k, torch.empty_like(master, dtype=v.dtype)).narrow(0, start, n).copy_(v)
            else:
                shared[k] = v  # the step counter: every slice started from the same value
    if full is not None:
        for k, v in shared.items():
            if torch.is_tensor(full.get(k)):
                full[k].copy_(v)
            else:
                full[k] = v
    elif fresh or shared:
        inner.state[master] = {**fresh, **shared}


def _all_gather_in_shards(opt) -> None:
    """The updated bf16 partitions gathered into every rank's flat bf16 groups, `allgather_bucket_size` elements
    per call. DeepSpeed's `all_gather_dp_groups` makes one `all_gather_into_tensor` per group, for which gloo
    allocates a flat output of the group's full size (the whole bf16 model: 0.25 GiB on bench/memory.py's
    model, the ZeRO-1/2 peak once the gradient copies are gone) and copies it into place; in shards of the
    bucket size the temporary is one bucket. The same elements land in the same places."""
    import torch.distributed as dist  # noqa: PLC0415

    for parts, group in zip(opt.parallel_partitioned_bit16_groups, opt.real_dp_process_group):
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        if world == 1:
            continue
        size, shard = parts[rank].numel(), max(1, int(opt.allgather_bucket_size) // world)
        assert all(p.numel() == size for p in parts), [p.numel() for p in parts]
        for start in range(0, size, shard):
            n = min(shard, size - start)
            dist.all_gather([p.narrow(0, start, n) for p in parts], parts[rank].narrow(0, start, n), group=group)


def step_zero12_in_chunks(engine, chunk_elements: int | None = None) -> bool:
    """Install the chunked step on a bf16 ZeRO-1/2 engine's optimizer (module docstring). True when installed."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from deepspeed.runtime.zero import stage_1_and_2 as z12  # noqa: PLC0415

    opt = getattr(engine, "optimizer", None)
    if not _eligible(opt):
        return False
    chunk = max(ALIGN, (chunk_elements or ZERO12_STEP_CHUNK) // ALIGN * ALIGN)
    original = opt.step

    def step(closure=None):
        if any(opt._get_preflattened_grad_partition(i) is not None for i in range(len(opt.bit16_groups))):
            return original(closure)
        opt.micro_step_id = z12.INITIAL_MICRO_STEP_ID
        if not opt.compute_grad_norm:
            opt._global_grad_norm = None
        opt.overflow = False
        if opt.check_grad_overflow:
            opt.check_overflow(partition_gradients=opt.partition_gradients)
        norm = None
        if opt.compute_grad_norm and not opt.overflow:
            norm = opt.scaled_global_norm()
            opt.overflow = bool(opt.check_grad_overflow and z12.is_invalid_grad_norm(norm))
        if opt.overflow:  # DeepSpeed's own step: it finds the same overflow and skips (gradients freed)
            return original(closure)
        prev_scale = opt.loss_scale
        opt._update_scale(False)
        opt._commit_muon_momentum()
        if norm is not None:
            opt._global_grad_norm = norm / prev_scale
        inner = opt.optimizer
        opt.timers(z12.OPTIMIZER_STEP_TIMER).start()
        for i in range(len(opt.bit16_groups)):
            partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
            opt.free_grad_in_param_list(opt.params_not_in_partition[i])
            pieces, master = opt.averaged_gradients[i], opt.single_partition_of_fp32_groups[i]
            size = int(opt.partition_size[i])
            assert master.dim() == 1 and master.numel() == size, (master.shape, size)
            buf = torch.empty(min(chunk, size), dtype=master.dtype, device=master.device)

            def grad_of(start, n, _buf=buf, _pieces=pieces):
                g = _buf.narrow(0, 0, n)
                _fill(g, _pieces, start)
                opt.unscale_and_clip_grads([g], norm)
                return g

            _step_slices(inner, i, master, grad_of, size, chunk)
            del buf, grad_of
            opt.free_grad_in_param_list(opt.params_in_partition[i])
            opt._release_preflattened_grad_buffers(i)
            opt.averaged_gradients[i] = None
            opt.all_grad_tensors[i] = None
            opt.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(master.data)
        opt._lazy_init_hp_params_optimizer_state()
        opt.timers(z12.OPTIMIZER_STEP_TIMER).stop()
        opt.timers(z12.OPTIMIZER_ALLGATHER_TIMER).start()
        _all_gather_in_shards(opt)
        opt.timers(z12.OPTIMIZER_ALLGATHER_TIMER).stop()
        for i in range(len(opt.bit16_groups)):
            opt._update_model_bit16_weights(i)
        opt.timers.log(z12.OPTIMIZER_TIMERS)

    opt.step = step  # instance attribute: the engine calls self.optimizer.step()
    return True
