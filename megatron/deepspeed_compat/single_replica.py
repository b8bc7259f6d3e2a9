"""ZeRO-1/2 at one data-parallel replica: the gradient partition kept from step to step (fp32 ZeRO-1/2,
bf16 ZeRO-2). The other single-replica changes are in `engine`; each function here replaces two of
the optimizer's methods together.
"""
from __future__ import annotations


def reuse_single_replica_gradient_partition(engine) -> bool:
    """fp32 ZeRO-1/2 over one data-parallel replica: at each gradient-accumulation boundary DeepSpeed's
    optimizer lists the accumulated gradients (`get_flat_partition`) and its `step` flattens them
    (`torch.cat`) into a new fp32 tensor of the whole model, the gradient of its flat master. That
    tensor is allocated afresh every step, and first touching 100 MB of new pages costs most of the
    flatten (bench/zero_tax.py's model, one thread: 60 ms of a 2 s step; the same copy into memory
    already touched, 11 ms).

    Here one flat gradient partition per group is allocated once and kept: the first backward epilogue
    of an accumulation window (ZeRO-1 runs it at the boundary only, ZeRO-2 after every backward)
    copies each gradient into its place in it (where DeepSpeed keeps a reference
    to the gradient tensor itself; a parameter without a gradient gets zeros, as DeepSpeed's), the
    later backwards add into it exactly as DeepSpeed adds into what it kept, and at the boundary the
    partition is handed to `step` as DeepSpeed's pre-flattened gradient partition
    (`GradPartitionBufferGroup`: `step` then uses it as the master's gradient instead of flattening).
    The same elements in the same order with the same additions: the same bits (tests/test_deepspeed_compat.py).
    Only where DeepSpeed's partition is every parameter whole, in order, with padding only at the end:
    one replica, fp32 weights and gradients, no offload, no contiguous or overlapped gradient buckets,
    no Muon group, no pipeline engine. True when installed."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from deepspeed.runtime.zero.stage_1_and_2 import GradPartitionBufferGroup  # noqa: PLC0415

    opt = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() not in (1, 2) or getattr(engine, "pipeline_parallelism", True) \
            or not hasattr(opt, "get_all_grad_tensors") or not hasattr(opt, "_get_preflattened_grad_partition"):
        return False
    groups = getattr(opt, "real_dp_process_group", None) or []
    if not groups or any(dist.get_world_size(group=g) != 1 for g in groups) or opt.cpu_offload \
            or opt.contiguous_gradients or opt.overlap_comm or opt.dtype != torch.float32 \
            or opt.gradient_accumulation_dtype != torch.float32:
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


def add_single_replica_gradients_to_fp32_partition(engine) -> bool:
    """bf16 ZeRO-1/2 with fp32 gradient accumulation over one data-parallel replica, where DeepSpeed's
    ZeRO optimizer keeps an fp32 gradient partition ("compact" buffer: bf16 ZeRO-2; bf16 ZeRO-1 is
    `BF16_Optimizer`). For every bucket of gradients its backward hooks flatten the bf16 gradients,
    convert them to the communication dtype, divide by the group size 1, all-reduce them over the
    group of one, add each into its place in the fp32 partition and copy it back into the bf16
    gradient (`_buffered_reduce_fallback_preserving_fp32`); and the partition is a new zero-filled
    fp32 tensor of the whole model every step (`_build_compact_grad_partition_buffer`). Here each
    gradient is added into its place directly (bf16 -> fp32 and the division by 1 are exact, the
    all-reduce over one rank returns its input: the same sums), and the partition is allocated once
    and zeroed at each step. Kept as DeepSpeed does it: several replicas, a communication dtype that
    is neither fp32 nor the gradients' (a rounding step), overlapping or contiguous buckets, offload,
    fp16, the pipeline engine. True when installed."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    opt = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() not in (1, 2) or getattr(engine, "pipeline_parallelism", True) \
            or not hasattr(opt, "_buffered_reduce_fallback_preserving_fp32"):
        return False
    groups = getattr(opt, "real_dp_process_group", None) or []
    if not groups or any(dist.get_world_size(group=g) != 1 for g in groups) or opt.cpu_offload \
            or opt.contiguous_gradients or opt.overlap_comm or opt.sequence_parallel_size != 1 \
            or opt.dtype != torch.bfloat16 or not all(opt._use_compact_grad_partition_buffer(i) for i in range(len(groups))):
        return False
    reduce_fallback, build = opt._buffered_reduce_fallback_preserving_fp32, opt._build_compact_grad_partition_buffer
    kept = {}

    def add_to_partition(grads, grad_params, communication_data_type, elements_per_buffer):
        if any(communication_data_type not in (torch.float32, g.dtype) for g in grads):
            return reduce_fallback(grads, grad_params, communication_data_type, elements_per_buffer)
        for grad, (group_idx, _, param_id) in zip(grads, grad_params):
            if param_id not in opt.grad_start_offset[group_idx][0]:  # (partition 0: the only one)
                continue
            source_offset = int(opt.grad_start_offset[group_idx][0][param_id])
            dest_offset = int(opt.grad_partition_insertion_offset[group_idx][0][param_id])
            num_elements = int(min(grad.numel() - source_offset, opt.partition_size[group_idx] - dest_offset))
            output = opt._get_compact_grad_partition_slice(group_idx, 0, param_id, num_elements)
            opt._add_to_grad_partition_buffer(output, grad.view(-1).narrow(0, source_offset, num_elements))
        return None

    def reused_partition(group_idx):
        if group_idx not in kept:
            kept[group_idx] = build(group_idx)
        else:
            kept[group_idx].flat_partition.zero_()
        return kept[group_idx]

    opt._buffered_reduce_fallback_preserving_fp32 = add_to_partition  # instance attributes
    opt._build_compact_grad_partition_buffer = reused_partition
    return True
