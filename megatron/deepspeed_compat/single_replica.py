"""fp32 ZeRO-1/2 at one data-parallel replica: the gradient partition kept from step to step.

(The other single-replica changes are in `engine`; this one is a module of its own because it
replaces two of the optimizer's methods together.)
"""
from __future__ import annotations


def reuse_single_replica_gradient_partition(engine) -> bool:
    """fp32 ZeRO-1/2 over one data-parallel replica: at each gradient-accumulation boundary DeepSpeed's
    optimizer lists the accumulated gradients (`get_flat_partition`) and its `step` flattens them
    (`torch.cat`) into a new fp32 tensor of the whole model, the gradient of its flat master. That
    tensor is allocated afresh every step, and first touching 100 MB of new pages costs most of the
    flatten (bench/zero_tax.py's model, one thread: 60 ms of a 2 s step; the same copy into memory
    already touched, 11 ms).

    Here one flat gradient partition per group is allocated once and kept: the first backward of an
    accumulation window copies each gradient into its place in it (where DeepSpeed keeps a reference
    to the gradient tensor itself; a parameter without a gradient gets zeros, as DeepSpeed's), the
    later backwards add into it exactly as DeepSpeed adds into what it kept, and at the boundary the
    partition is handed to `step` as DeepSpeed's pre-flattened gradient partition
    (`GradPartitionBufferGroup`: `step` then uses it as the master's gradient instead of flattening).
    The same elements in the same order with the same additions: the same bits (tests/test_deepspeed_compat.py).
    Only where DeepSpeed's partition is every parameter whole, in order, with padding only at the end:
    one replica, fp32 weights and gradients, no offload, no contiguous gradient buckets, no Muon
    group, no pipeline engine. True when installed."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from deepspeed.runtime.zero.stage_1_and_2 import GradPartitionBufferGroup  # noqa: PLC0415

    opt = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() not in (1, 2) or getattr(engine, "pipeline_parallelism", True) \
            or not hasattr(opt, "get_all_grad_tensors") or not hasattr(opt, "_get_preflattened_grad_partition"):
        return False
    groups = getattr(opt, "real_dp_process_group", None) or []
    if not groups or any(dist.get_world_size(group=g) != 1 for g in groups) or opt.cpu_offload \
            or opt.contiguous_gradients or opt.dtype != torch.float32 or opt.gradient_accumulation_dtype != torch.float32:
        return False
    for i, params in enumerate(opt.params_in_partition):
        if (opt.params_not_in_partition[i] or opt.first_offset[i] != 0 or any(opt.round_robin_bit16_padding[i])
                or opt._is_muon_group(params) or opt._use_compact_grad_partition_buffer(i)
                or sum(p.numel() for p in params) > int(opt.partition_size[i])):
            return False
    get_all_grad_tensors, get_flat_partition = opt.get_all_grad_tensors, opt.get_flat_partition
    partitions: dict[int, GradPartitionBufferGroup] = {}  # group -> [one view per parameter, padding], flat

    def partition(i):
        if i not in partitions:  # at the first backward (the engine's memory estimate comes before)
            size = int(opt.partition_size[i])
            flat = torch.empty(size, dtype=torch.float32, device=opt.bit16_groups_flat[i].device)
            views, offset = [], 0
            for p in opt.params_in_partition[i]:
                views.append(flat.narrow(0, offset, p.numel()).view(p.shape))
                offset += p.numel()
            if offset < size:  # DeepSpeed pads the last partition with zeros
                pad = flat.narrow(0, offset, size - offset).zero_()
                pad._zero_padding = True
                views.append(pad)
            partitions[i] = GradPartitionBufferGroup(views, flat)
        return partitions[i]

    def group_of(tensor_list):
        return next((i for i, params in enumerate(opt.params_in_partition) if params is tensor_list), None)

    def first_grad_tensors(tensor_list, dtype):
        i = group_of(tensor_list)
        if i is None or opt.all_grad_tensors.get(i) is not None:  # a later backward: DeepSpeed adds these
            return get_all_grad_tensors(tensor_list, dtype)
        views = partition(i)[:len(tensor_list)]
        for view, p in zip(views, tensor_list):
            grad = opt.get_param_gradient_attribute(p)
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad)
        return views

    def flat_partition(tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                       return_tensor_list=False):
        i = param_group_idx
        kept = partitions.get(i)
        held = opt.all_grad_tensors.get(i)
        if not return_tensor_list or kept is None or tensor_list is not opt.params_in_partition[i] or held is None \
                or len(held) != len(tensor_list) or any(a is not b for a, b in zip(held, kept)):
            return get_flat_partition(tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                                      return_tensor_list)
        return kept

    opt.get_all_grad_tensors, opt.get_flat_partition = first_grad_tensors, flat_partition  # instance attributes
    return True
