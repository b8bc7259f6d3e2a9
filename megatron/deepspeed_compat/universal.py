"""DeepSpeed's checkpoint internals: the universal-checkpoint converter as
tools/convert_checkpoint/ds_to_universal.py uses it, the ZeRO fp32 merger, the pipeline topology,
the classes its checkpoints pickle.

`deepspeed.checkpoint.ds_to_universal` is a script: its public entry point (`main(args)`) converts
ZeRO-1/2 checkpoints of DeepSpeed's own layout only. Our converter also handles ZeRO stage 0, ZeRO-3
with every optimizer state, and the vocabulary padding, so it calls the script's helpers, several of
them private (leading underscore), and replaces four of them while `main` runs. `converter()` is the one place that imports the module, and
`HELPERS` lists what is called with the parameters it is called with; tests/test_deepspeed_compat.py
checks every entry, so a DeepSpeed release that renames or re-signs one fails there.
"""
from __future__ import annotations

# helper -> its leading parameters as our converter passes them
HELPERS = {
    "dump_param_fragment": ["dir", "tp_index", "dp_index", "state_name", "state_flat_tensor", "param_name",
                            "offset", "numel"],
    "_shape_numel": ["shape"],
    "_zero_partitioned_param_info": ["unpartitioned_numel", "world_size"],
    "_merge_zero_shards": ["param_base_path", "state", "tp_degree"],
    "_save_checkpoint": ["file_path", "chkpt_sd"],
    "_merge_tp_slice_files": ["args", "uc_info", "tp_degree", "slice_shapes", "temp_dir"],
    # replaced for the duration of one conversion (module attributes `main` looks up when it runs)
    "extract_zero_shards": ["dir", "ds_checkpoint", "indices_3D"],
    "extract_zero_shards_stage3": ["optim_files_grid", "param_shapes_grid", "dp_degree", "temp_dir", "indices",
                                   "exclude_param_names"],
    "merge_tp_slices": ["uc_info", "dir", "slice_dir", "tp_degree", "name_and_shapes"],
    "merge_zero3_slices": ["dp_degree", "dir", "slice_dir", "name"],
    "main": ["args"],
}
# checkpoint keys (constants re-exported by the script from deepspeed.checkpoint.constants)
KEYS = ("PARAM_SHAPES", "OPTIMIZER_STATE_DICT", "PARAM_SLICE_MAPPINGS", "UNIVERSAL_CHECKPOINT_INFO",
        "PIPELINE_REPLICATED_PARAMETER_PATTERNS", "BASE_OPTIMIZER_STATE", "SINGLE_PARTITION_OF_FP32_GROUPS",
        "VOCAB_TENSOR", "PARAM")


def converter():
    """The `deepspeed.checkpoint.ds_to_universal` module (helpers listed in `HELPERS`, keys in `KEYS`)."""
    import deepspeed.checkpoint.ds_to_universal as ds  # noqa: PLC0415

    return ds


def fp32_state_dict_from_zero(tag_dir: str) -> dict:
    """The fp32 master weights of a ZeRO 1/2/3 checkpoint directory, merged by DeepSpeed's
    `zero_to_fp32` (it reads the shards with ``torch.load(weights_only=False)``: check the files'
    pickles first, megatron/checkpoint/io.py)."""
    import os  # noqa: PLC0415

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))


def pipeline_topology(pp: int, tp: int, dp: int):
    """DeepSpeed's pipe/data/model topology object (not exported by `deepspeed.pipe`)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # noqa: PLC0415

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


def checkpoint_pickle_types() -> list:
    """DeepSpeed's classes that its ZeRO optimizer shards pickle (the restricted loader's allowlist)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
