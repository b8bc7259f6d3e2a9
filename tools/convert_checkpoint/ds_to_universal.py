#!/usr/bin/env python
"""Convert a DeepSpeed ZeRO checkpoint (global_step<N>/) into a universal checkpoint that loads
at any data-parallel size and across ZeRO stages 1 <-> 2 (`--universal-checkpoint`).

Same command line as DeepSpeed's converter (and upstream's ALCF/ds_to_universal.py):

    python tools/convert_checkpoint/ds_to_universal.py \\
        --input_folder  CKPT/global_step<N> --output_folder CKPT/global_step<N>_universal

ZeRO stage 0 checkpoints (also what a run with one data-parallel replica writes) convert too:
their optimizer state sits in the model-states files, and `_convert_stage0` writes the same atoms
from it (DeepSpeed's converter has no stage 0 path). For ZeRO 1/2/3 checkpoints it runs
DeepSpeed's `ds_to_universal.main` (through megatron/deepspeed_compat/universal.py) with three changes:

1. **Large-DP padding fix** (DeepSpeed PR 7426 / upstream ALCF note): ZeRO shards are read with
   `strip_tensor_paddings=False`. The fragment offsets already exclude the padding, so nothing is
   lost; stripping first fails with `narrow(): length must be non-negative` whenever a group's
   padding is larger than one rank's partition (DP=768 for the AuroraGPT-7B checkpoint; at
   DP=2 with a 1-element parameter group).
2. **Every optimizer state, not only Adam's**: DeepSpeed's extractor reads `exp_avg`, `exp_avg_sq`
   (and `step`) by name and fails with KeyError for any other optimizer. Here every per-element
   state tensor of the flat ZeRO group is extracted and merged under its own name (SGD/Muon
   `momentum_buffer`, Lion `exp_avg`, Adafactor-style factors are not per-element and are refused
   with a message). DeepSpeed's universal loader already restores any `<state>.pt` it finds.
   Checkpoints of DeepSpeed's ZeRO-1/2 Muon (used here before our Muon ran under ZeRO) keep the
   momentum per whole parameter (concatenated over the parameters a rank's partition touches), not
   per partition element: it is re-laid out per element here, which is the layout our Muon keeps.
   Scalar states other than `step` cannot be represented by DeepSpeed's loader: refused by name.
3. **Vocabulary padding kept by default**: DeepSpeed strips the padded rows of the embedding and
   output layer and refills them with zeros at load, which changes the logits of a resumed run.
   Here the rows are kept and a converted checkpoint continues exactly, at the same or another TP
   size whose padded vocabulary is the same (or larger: DeepSpeed's loader appends zero rows).
   `--strip_vocab_padding` restores DeepSpeed's behaviour (needed only to load at a TP size whose
   padded vocabulary is smaller).

`latest_universal` is written atomically in the parent of --output_folder (as DeepSpeed does).
Usable as a module: `convert(input_folder, output_folder, ...)`.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from types import SimpleNamespace

log = logging.getLogger("ds_to_universal")

ADAM_STATES = ("exp_avg", "exp_avg_sq")


class ConversionError(RuntimeError):
    """The checkpoint cannot be converted; the message says why and what to do."""


def _checkpoint_io():
    """megatron.checkpoint.io (the project next to this tool when it is not installed)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.append(root)
    from megatron.checkpoint import io as checkpoint_io  # noqa: PLC0415

    return checkpoint_io


def torch_load(path: str, map_location=None):
    """torch.load(weights_only=True) with the checkpoint allowlist: a foreign pickle is refused
    before it runs. (DeepSpeed's own merge steps, called below, read the slices this tool wrote
    itself with weights_only=False.)"""
    return _checkpoint_io().torch_load(path, map_location=map_location)


def _flat_states(group_state: dict, needed: int, where: str) -> tuple[dict, dict]:
    """Split one flat ZeRO group's optimizer state into per-element tensors and scalars (step).

    `needed` is the end of the last parameter fragment in this rank's partition: a per-element
    state is a 1-D tensor at least that long (it may carry alignment padding beyond it)."""
    import torch  # noqa: PLC0415

    flat, scalars = {}, {}
    for name, value in group_state.items():
        if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= needed:
            flat[name] = value
        elif name == "step" and (not torch.is_tensor(value) or value.numel() == 1):
            scalars[name] = value
        elif torch.is_tensor(value) and value.numel() > 1:
            raise ConversionError(f"{where}: optimizer state {name!r} has shape {tuple(value.shape)}, not one value "
                                  f"per parameter element ({needed}); it cannot be split into universal atoms")
        else:
            raise ConversionError(f"{where}: scalar optimizer state {name!r} is not supported by DeepSpeed's "
                                  "universal loader (only 'step' is); load with --no-load-optim instead")
    return flat, scalars


def _param_shapes(ds, ds_checkpoint, pp_index: int, tp_index: int) -> list:
    """The model-states file's per-group {name: shape}, in the order of ZeRO's flat groups."""
    files = sorted(ds_checkpoint.mp_rank_files)  # mp_rank_XX, XX = pp_rank * TP + tp_rank
    path = files[pp_index * ds_checkpoint.tp_degree + tp_index] if len(files) > 1 else files[0]
    return torch_load(path, map_location="cpu")[ds.PARAM_SHAPES]


def muon_momentum_as_partition(momentum, fp32_partition, slices: dict, shapes: dict, dp_index: int, where: str):
    """DeepSpeed's ZeRO-1/2 Muon keeps, per rank, the momentum of every parameter its partition
    touches, WHOLE and concatenated (Newton-Schulz needs the full matrix), not one value per
    partition element. Return it in the partition's layout (this rank's fragment of each
    parameter at the fragment's offset), as every other per-element state is laid out."""
    import math  # noqa: PLC0415

    import torch  # noqa: PLC0415

    size = fp32_partition.numel()
    part_start = dp_index * size
    out = torch.zeros(size, dtype=momentum.dtype)
    offset, cursor = 0, 0  # offset: start of the parameter in the whole flat group
    for name, shape in shapes.items():
        numel = math.prod(shape)
        frag = slices.get(name)
        if frag is not None:
            if frag.start != max(0, offset - part_start):
                raise ConversionError(f"{where}: {name} is not where the flat ZeRO layout puts it; cannot convert "
                                      "the Muon momentum of this checkpoint")
            inner = max(0, part_start - offset)  # first element of the parameter in this partition
            out[frag.start:frag.start + frag.numel] = momentum[cursor + inner:cursor + inner + frag.numel]
            cursor += numel
        offset += numel
    if cursor != momentum.numel():
        raise ConversionError(f"{where}: Muon momentum holds {momentum.numel()} values, the parameters of the "
                              f"partition {cursor}; cannot convert it")
    return out


def _patched_extract_zero_shards(ds, rename, dir, ds_checkpoint, indices_3D):  # noqa: A002
    """ds.extract_zero_shards with strip_tensor_paddings=False and every state name; the atoms are
    named `rename(name)` (pipeline checkpoints: the GPTModel name), and a tied parameter (the
    pipeline's tied embedding, replicated on the last stage) is taken from the first stage only."""
    pp_index, tp_index, dp_index = indices_3D
    sd = ds_checkpoint.get_zero_checkpoint_state(pp_index=pp_index, tp_index=tp_index, dp_index=dp_index,
                                                 strip_tensor_paddings=False)
    optim_sd = sd[ds.OPTIMIZER_STATE_DICT]
    param_slice_mappings = optim_sd[ds.PARAM_SLICE_MAPPINGS]
    uc_info = ds_checkpoint.get_checkpoint_info(ds.UNIVERSAL_CHECKPOINT_INFO)
    pipeline_replicated = uc_info.get(ds.PIPELINE_REPLICATED_PARAMETER_PATTERNS, [])
    state_groups = optim_sd[ds.BASE_OPTIMIZER_STATE]["state"]
    base_groups = optim_sd[ds.BASE_OPTIMIZER_STATE].get("param_groups", [])
    fp32_groups = optim_sd[ds.SINGLE_PARTITION_OF_FP32_GROUPS]
    param_shapes = None
    for gid in range(len(fp32_groups)):
        fp32 = fp32_groups[gid]
        where = f"dp rank {dp_index}, parameter group {gid}"
        needed = max((f.start + f.numel for f in param_slice_mappings[gid].values()), default=0)
        group_state = dict(state_groups.get(gid, {}))
        if gid < len(base_groups) and base_groups[gid].get("use_muon") and "momentum_buffer" in group_state:
            if param_shapes is None:
                param_shapes = _param_shapes(ds, ds_checkpoint, pp_index, tp_index)
            group_state["momentum_buffer"] = muon_momentum_as_partition(
                group_state["momentum_buffer"], fp32, param_slice_mappings[gid], param_shapes[gid], dp_index, where)
        flat, scalars = _flat_states(group_state, needed, where)
        states = {"fp32": fp32, **flat, **scalars}
        for name, frag in param_slice_mappings[gid].items():
            replicated = name.startswith("tied_modules.") or any(re.match(p, name) for p in pipeline_replicated)
            if pp_index > 0 and replicated:
                continue
            for key, value in states.items():
                ds.dump_param_fragment(dir, tp_index, dp_index, key, value, rename(name), frag.start, frag.numel)


def _patched_extract_zero_shards_stage3(ds, optim_files_grid, param_shapes_grid, dp_degree, temp_dir, indices,
                                        exclude_param_names=None):
    """ds.extract_zero_shards_stage3 with every state name."""
    tp_index, dp_index = indices
    exclude_param_names = exclude_param_names or set()
    state_dict = torch_load(optim_files_grid[tp_index][dp_index], map_location="cpu")
    optim_sd = state_dict[ds.OPTIMIZER_STATE_DICT]
    partition_groups = optim_sd.get("ds_zero_partition_groups") or []
    param_shapes = param_shapes_grid[tp_index]
    for idx, sub_group_shape in enumerate(param_shapes):
        fp32 = optim_sd["fp32_flat_groups"][idx]
        flat, scalars = _flat_states(optim_sd["optimizer_state_dict"]["state"].get(idx, {}), 0,
                                     f"dp rank {dp_index}, sub-group {idx}")
        states = {"fp32": fp32, **flat, **scalars}
        meta = partition_groups[idx] if idx < len(partition_groups) else {}
        count, prank = meta.get("partition_count", dp_degree), meta.get("partition_rank", dp_index)
        offset = 0
        for name, shape in sub_group_shape.items():
            numel = ds._shape_numel(shape)
            part_numel, _ = ds._zero_partitioned_param_info(numel, count)
            free = max(0, min(part_numel, numel - prank * part_numel))
            if name not in exclude_param_names:
                for key, value in states.items():
                    ds.dump_param_fragment(temp_dir, tp_index, dp_index, key, value, name, offset, free)
            offset += part_numel


def _state_names(slice_dir: str, name: str) -> list[str]:
    names = set()
    base = os.path.join(slice_dir, name)
    for tp in os.listdir(base) if os.path.isdir(base) else []:
        for f in os.listdir(os.path.join(base, tp)):
            names.add(f.rsplit(".", 1)[0])
    return sorted(names)


def _merge_extra_states(ds, uc_info, dir, slice_dir, tp_degree, name_and_shapes, keep_vocab_padding):  # noqa: A002
    """Merge states DeepSpeed's merge does not know (TP = 1: concatenate DP fragments, reshape like
    the parameter, copy fp32.pt's metadata)."""
    name, per_tp_shapes = name_and_shapes
    extra = [s for s in _state_names(slice_dir, name) if s not in ("fp32", "step") + ADAM_STATES]
    if not extra:
        return
    if tp_degree != 1:
        raise ConversionError(f"{name}: optimizer states {extra} can only be converted from TP=1 checkpoints")
    ref = torch_load(os.path.join(dir, name, "fp32.pt"))
    for state in extra:
        slices = ds._merge_zero_shards(os.path.join(slice_dir, name), state, 1, per_tp_shapes)
        param = slices[0]  # already in the parameter's shape (per_tp_shapes)
        if ref.get(ds.VOCAB_TENSOR):
            param = param[: uc_info["original_vocab_size"]]
        param = param.reshape(ref[ds.PARAM].shape)
        out = {k: v for k, v in ref.items() if k != ds.PARAM}
        out[ds.PARAM] = param
        ds._save_checkpoint(os.path.join(dir, name, f"{state}.pt"), out)


def _patched_merge_tp_slices(ds, original, keep_vocab_padding, uc_info, dir, slice_dir, tp_degree,  # noqa: A002
                             name_and_shapes):
    name = name_and_shapes[0]
    states = _state_names(slice_dir, name)
    missing = [s for s in ADAM_STATES if s not in states]
    if keep_vocab_padding and uc_info.get("padded_vocab_size"):
        uc_info = {**uc_info, "original_vocab_size": uc_info["padded_vocab_size"]}
    if missing and "fp32" in states:
        # DeepSpeed's merge insists on Adam's two moments: give it empty stand-ins, then drop them.
        _merge_without_adam(ds, original, uc_info, dir, slice_dir, tp_degree, name_and_shapes, missing)
        unmatched = set()
    else:
        unmatched = original(uc_info, dir, slice_dir, tp_degree, name_and_shapes)
    _merge_extra_states(ds, uc_info, dir, slice_dir, tp_degree, name_and_shapes, keep_vocab_padding)
    return unmatched


def _merge_without_adam(ds, original, uc_info, dir, slice_dir, tp_degree, name_and_shapes, missing):  # noqa: A002
    name = name_and_shapes[0]
    base = os.path.join(slice_dir, name)
    made = []
    for tp in os.listdir(base):
        for f in os.listdir(os.path.join(base, tp)):
            if f.startswith("fp32."):
                for state in missing:
                    dst = os.path.join(base, tp, state + f[len("fp32"):])
                    shutil.copyfile(os.path.join(base, tp, f), dst)
                    made.append(dst)
    original(uc_info, dir, slice_dir, tp_degree, name_and_shapes)
    for state in missing:
        path = os.path.join(dir, name, f"{state}.pt")
        if os.path.exists(path):
            os.remove(path)
    for path in made:
        os.remove(path)


def _patched_merge_zero3_slices(ds, dp_degree, dir, slice_dir, name):  # noqa: A002
    for state in _state_names(slice_dir, name):
        if state == "step":  # as DeepSpeed: the step lives in zero/optimizer_state.pt
            continue
        slices = ds._merge_zero_shards(os.path.join(slice_dir, name), state, 1)
        ds._save_checkpoint(os.path.join(dir, name, f"{state}.pt"), slices[0])


def _stage0_model_states(input_folder: str, model_files: list[str]) -> list[dict]:
    """The model-states files of a checkpoint without ZeRO shards (ZeRO stage 0: the optimizer state
    is inside them), one per TP rank; refused with the reason when they cannot be converted."""
    if not model_files:
        raise ConversionError(f"{input_folder} holds no mp_rank_XX_model_states.pt: not a DeepSpeed checkpoint")
    states = [torch_load(os.path.join(input_folder, f), map_location="cpu") for f in model_files]
    for f, sd in zip(model_files, states):
        if not sd.get("optimizer"):
            raise ConversionError(f"{input_folder}/{f} holds no optimizer state (saved with --no-save-optim): it "
                                  "cannot be converted; load it with --finetune at the same world size instead")
        if not sd.get("optimizer_param_names"):
            raise ConversionError(f"{input_folder}/{f} is a ZeRO stage 0 checkpoint without the parameter names "
                                  "of its optimizer groups (written by an older version): it cannot be converted; "
                                  "load it with --finetune, or resume it at the same world size and save again")
    return states


def _convert_stage0(ds, args, model_states: list[dict]) -> None:
    """ZeRO stage 0 checkpoint -> universal checkpoint. Stage 0 keeps the whole optimizer state in
    each TP rank's model-states file (a torch optimizer state dict; under bf16 DeepSpeed's wrapper
    adds the fp32 master weights); the trainer records the parameter names of each optimizer group
    (`optimizer_param_names`). Each parameter's fp32 value and per-element states are written as
    one data-parallel fragment, then merged across TP ranks by the same step as ZeRO checkpoints."""
    import torch  # noqa: PLC0415

    temp_dir = os.path.join(args.output_folder, "tmp")
    tp_degree = len(model_states)
    shapes: dict[str, list] = {}
    for tp_index, sd in enumerate(model_states):
        opt = sd["optimizer"]
        inner = opt.get("optimizer_state_dict", opt)  # bf16: DeepSpeed's wrapper around the torch optimizer
        masters = opt.get("fp32_groups")
        module = sd["module"]
        for gid, (group, names) in enumerate(zip(inner["param_groups"], sd["optimizer_param_names"])):
            if len(group["params"]) != len(names):
                raise ConversionError(f"TP rank {tp_index}, optimizer group {gid}: {len(group['params'])} parameters "
                                      f"but {len(names)} recorded names")
            for j, (index, name) in enumerate(zip(group["params"], names)):
                value = masters[gid][j] if masters is not None else module[name]
                shapes.setdefault(name, [None] * tp_degree)[tp_index] = value.shape
                where = f"TP rank {tp_index}, {name}"
                state = {k: v.reshape(-1) if torch.is_tensor(v) and v.numel() == value.numel() else v
                         for k, v in inner["state"].get(index, {}).items()}
                flat, scalars = _flat_states(state, value.numel(), where)
                states = {"fp32": value.detach().float().reshape(-1), **flat, **scalars}
                for key, tensor in states.items():
                    ds.dump_param_fragment(temp_dir, tp_index, 0, key, tensor, name, 0, value.numel())
    uc_info = model_states[0][ds.UNIVERSAL_CHECKPOINT_INFO]
    ds._merge_tp_slice_files(args, uc_info, tp_degree, shapes, temp_dir)
    first = model_states[0]
    opt = first["optimizer"]
    _write_global_optimizer_state(first, opt.get("optimizer_state_dict", opt)["param_groups"], args.output_folder)
    if not args.keep_temp_folder:
        shutil.rmtree(temp_dir, ignore_errors=True)
    for tp_index, sd in enumerate(model_states):  # the model files, without the optimizer state now in zero/
        out = {k: v for k, v in sd.items() if k != "optimizer"}
        torch.save(out, os.path.join(args.output_folder, f"mp_rank_{tp_index:02d}_model_states.pt"))


def _write_global_optimizer_state(model_states: dict, param_groups: list, output_folder: str) -> None:
    """zero/optimizer_state.pt as DeepSpeed's ZeRO-1/2 universal loader reads it (version, groups, clipping)."""
    import torch  # noqa: PLC0415

    global_state = {"ds_version": model_states.get("ds_version"), "param_groups": param_groups,
                    "dynamic_loss_scale": False, "overflow": False,
                    "clip_grad": float((model_states.get("args") or {}).get("clip_grad") or 0.0)}
    os.makedirs(os.path.join(output_folder, "zero"), exist_ok=True)
    torch.save(global_state, os.path.join(output_folder, "zero", "optimizer_state.pt"))


def _write_zero3_model_states(ds, zero3_model_file: str, output_folder: str) -> None:
    """Make DeepSpeed's conversion of a ZeRO-3 checkpoint loadable at ZeRO 1/2. Its model-states files
    hold empty placeholders for the partitioned parameters and the converter writes no
    mp_rank_00_model_states.pt, which the universal loader reads first (client state, then the module):
    write it from rank 0's file with the module rebuilt from the merged fp32 atoms. Its atoms are flat
    tensors without the step: rewrite them as the shaped {param: ...} files (and step.pt) of ZeRO 1/2
    conversions. Stage 3 atoms keep every vocabulary row (no stripping)."""
    import torch  # noqa: PLC0415

    sd = torch_load(zero3_model_file, map_location="cpu")
    shapes = {k: v for group in sd.get("param_shapes") or [] for k, v in group.items()}
    # DeepSpeed's stage 3 converter copies rank 0's whole optimizer partition there, without ds_version
    state_file = os.path.join(output_folder, "zero", "optimizer_state.pt")
    rank0 = torch_load(state_file, map_location="cpu")
    steps = {float(s["step"]): s["step"] for s in rank0["optimizer_state_dict"]["state"].values() if "step" in s}
    if len(steps) > 1:
        raise ConversionError(f"{zero3_model_file}: optimizer groups at different steps {sorted(steps)}")
    steps = list(steps.values())
    module = {}
    for name, placeholder in sd["module"].items():
        atom_dir = os.path.join(output_folder, "zero", name)
        if name not in shapes or not os.path.isdir(atom_dir):
            module[name] = placeholder  # a buffer or non-partitioned tensor: saved whole
            continue
        shape = tuple(shapes[name])
        for f in os.listdir(atom_dir):  # stage 3 atoms are flat tensors; the ZeRO-1/2 loader reads shaped dicts
            value = torch_load(os.path.join(atom_dir, f), map_location="cpu")
            if torch.is_tensor(value):
                torch.save({ds.PARAM: value.reshape(shape)}, os.path.join(atom_dir, f))
        for step in steps:
            torch.save(step, os.path.join(atom_dir, "step.pt"))
        fp32 = torch_load(os.path.join(atom_dir, "fp32.pt"), map_location="cpu")[ds.PARAM]
        module[name] = fp32.to(placeholder.dtype)
    out = {k: v for k, v in sd.items() if k not in ("module", "optimizer")}
    out["module"] = module
    torch.save(out, os.path.join(output_folder, "mp_rank_00_model_states.pt"))
    _write_global_optimizer_state(sd, rank0["param_groups"], output_folder)


def _pipeline_renamer(input_folder: str, model_files: list[str]):
    """For a pipeline-parallel checkpoint (layer_XX files): (renamer pipeline name -> GPTModel name,
    saved args). The universal checkpoint is laid out as a PP = 1 one (GPTModel names), so it loads
    at PP = 1 at any TP / DP size and ZeRO stage 1 or 2."""
    args = torch_load(os.path.join(input_folder, model_files[0]), map_location="cpu").get("args") or {}
    if not args.get("num_layers"):
        raise ConversionError(f"{input_folder} is a pipeline-parallel checkpoint without this trainer's 'args' "
                              "client state: its layers cannot be named; resume it with the same PP size")
    from megatron.model.gpt_pipeline import gpt_param_name  # noqa: PLC0415  (the project is on sys.path now)

    num_layers, untied = int(args["num_layers"]), bool(args.get("untie_embeddings_and_output_weights"))
    return (lambda name: gpt_param_name(name, num_layers, untied)), args


def _write_pipeline_model_states(input_folder: str, output_folder: str, model_files: list[str], args: dict,
                                 rename) -> None:
    """Replace the per-stage model-states files DeepSpeed copied (mp_rank_ZZ, ZZ = stage * TP + tp rank;
    their `module` is None: a pipeline keeps its weights in layer_XX files) by one file per TP rank, as a
    PP = 1 checkpoint has: stage 0's client state, the module read from the layer files under GPTModel
    names, the parameter shapes of every stage per optimizer group."""
    import torch  # noqa: PLC0415

    from megatron.model.gpt_pipeline import read_pipeline_checkpoint  # noqa: PLC0415

    tp = int(args.get("tensor_model_parallel_size") or 1)
    if len(model_files) % tp:
        raise ConversionError(f"{input_folder}: {len(model_files)} model-states files for TP={tp}")
    for f in model_files:
        os.remove(os.path.join(output_folder, f))
    num_layers, untied = int(args["num_layers"]), bool(args.get("untie_embeddings_and_output_weights"))
    for tp_rank in range(tp):
        stages = [torch_load(os.path.join(input_folder, f), map_location="cpu") for f in model_files[tp_rank::tp]]
        groups: list[dict] = []
        for stage in stages:
            for gid, group in enumerate(stage.get("param_shapes") or []):
                while len(groups) <= gid:
                    groups.append({})
                groups[gid].update({rename(k): v for k, v in group.items()})
        out = dict(stages[0])
        out["module"] = read_pipeline_checkpoint(input_folder, num_layers, untied, tp_rank=tp_rank)
        out["param_shapes"] = groups
        out["mp_world_size"] = tp
        out["checkpoint_parallel_dimensions"] = {"pp_degree": 1, "tp_degree": tp}
        torch.save(out, os.path.join(output_folder, f"mp_rank_{tp_rank:02d}_model_states.pt"))


def convert(input_folder: str, output_folder: str, *, keep_temp_folder: bool = False, num_extract_workers: int = 1,
            num_merge_workers: int = 1, strict: bool = True, inject_missing_state: bool = False,
            strip_vocab_padding: bool = False) -> str:
    """Convert `input_folder` (a global_step<N> directory) into `output_folder`; returns the tag
    written to `latest_universal` next to the output folder."""
    from megatron.deepspeed_compat.universal import converter  # noqa: PLC0415  (DeepSpeed's private helpers)

    ds = converter()

    if not os.path.isdir(input_folder):
        raise ConversionError(f"--input_folder {input_folder}: no such directory")
    pipeline = bool([f for f in os.listdir(input_folder) if f.startswith("layer_") and f.endswith("model_states.pt")])
    stage0 = not [f for f in os.listdir(input_folder) if f.endswith("optim_states.pt")]
    if pipeline and stage0:
        raise ConversionError(f"{input_folder} is a pipeline-parallel checkpoint saved at ZeRO stage 0 (its optimizer "
                              "state inside the per-stage model files): universal conversion of pipeline checkpoints "
                              "needs ZeRO-1 shards; resume it with the same PP size, or train with ZERO_STAGE=1")
    zero3_models = sorted(f for f in os.listdir(input_folder)
                          if re.fullmatch(r"zero_pp_rank_0_mp_rank_\d+_model_states\.pt", f))
    if len(zero3_models) > 1:
        raise ConversionError(f"{input_folder} is a ZeRO-3 checkpoint with TP={len(zero3_models)}: universal "
                              "conversion of ZeRO-3 supports TP=1 only; resume it at the same TP size")
    model_files = sorted(f for f in os.listdir(input_folder) if re.fullmatch(r"mp_rank_\d+_model_states\.pt", f))
    for path in sorted(os.listdir(input_folder)):  # DeepSpeed reads them with weights_only=False: vet them first
        if path.endswith(".pt"):
            _checkpoint_io().check_pickle_globals(os.path.join(input_folder, path))
    stage0_files = _stage0_model_states(input_folder, model_files) if stage0 else None
    rename, saved = _pipeline_renamer(input_folder, model_files) if pipeline else ((lambda name: name), None)
    output_folder = os.path.normpath(output_folder)
    if os.path.exists(output_folder):
        shutil.rmtree(output_folder)
    keep = not strip_vocab_padding
    originals = {k: getattr(ds, k) for k in ("extract_zero_shards", "extract_zero_shards_stage3", "merge_tp_slices",
                                              "merge_zero3_slices", "_group_per_tp_shapes")}
    merge_tp, group_shapes = originals["merge_tp_slices"], originals["_group_per_tp_shapes"]
    patches = {
        "extract_zero_shards": lambda *a: _patched_extract_zero_shards(ds, rename, *a),
        "_group_per_tp_shapes": lambda *a: {rename(k): v for k, v in group_shapes(*a).items()},
        "extract_zero_shards_stage3": lambda *a, **k: _patched_extract_zero_shards_stage3(ds, *a, **k),
        "merge_tp_slices": lambda *a: _patched_merge_tp_slices(ds, merge_tp, keep, *a),
        "merge_zero3_slices": lambda *a: _patched_merge_zero3_slices(ds, *a),
    }
    if num_extract_workers > 1 or num_merge_workers > 1:
        log.info("worker processes would not see the patched functions: converting in this process")
    args = SimpleNamespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=keep_temp_folder, strict=strict,
                           inject_missing_state=inject_missing_state)
    for k, v in patches.items():
        setattr(ds, k, v)
    try:
        if stage0_files is None:
            ds.main(args)
        else:
            _convert_stage0(ds, args, stage0_files)
    finally:
        for k, v in originals.items():
            setattr(ds, k, v)
    if pipeline:
        _write_pipeline_model_states(input_folder, output_folder, model_files, saved, rename)
    if zero3_models:
        _write_zero3_model_states(ds, os.path.join(input_folder, zero3_models[0]), output_folder)
    parent, tag = os.path.split(output_folder)
    # our model-argument record travels with the checkpoint (checked before loading)
    src_args = os.path.join(input_folder, "megatron_args.json")
    if os.path.isfile(src_args):
        shutil.copyfile(src_args, os.path.join(output_folder, "megatron_args.json"))
    tmp = os.path.join(parent, f"latest_universal.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(parent, "latest_universal"))
    return tag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_folder", "--input-folder", required=True, help="CKPT/global_step<N>")
    p.add_argument("--output_folder", "--output-folder", required=True, help="CKPT/global_step<N>_universal")
    p.add_argument("--num_extract_workers", type=int, default=1, help="accepted; conversion runs in one process")
    p.add_argument("--num_merge_workers", type=int, default=1, help="accepted; conversion runs in one process")
    p.add_argument("--keep_temp_folder", action="store_true")
    p.add_argument("--no_strict", dest="strict", action="store_false")
    p.add_argument("--inject_missing_state", action="store_true",
                   help="for checkpoints written without universal_checkpoint_info (not needed for ours)")
    p.add_argument("--strip_vocab_padding", action="store_true",
                   help="drop the padded vocabulary rows as DeepSpeed does (they are re-filled with zeros at load)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tag = convert(args.input_folder, args.output_folder, keep_temp_folder=args.keep_temp_folder,
                      num_extract_workers=args.num_extract_workers, num_merge_workers=args.num_merge_workers,
                      strict=args.strict, inject_missing_state=args.inject_missing_state,
                      strip_vocab_padding=args.strip_vocab_padding)
    except (ConversionError, _checkpoint_io().CheckpointLoadRefused) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    parent = os.path.dirname(os.path.normpath(args.output_folder))
    print(f"universal checkpoint written: {args.output_folder}; {parent}/latest_universal = {tag}\n"
          f"load it with: --load {parent} --universal-checkpoint", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
