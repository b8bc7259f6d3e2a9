"""Checks of a checkpoint before it is loaded: from the file system alone, before DeepSpeed starts
(`load_problems`: the tag, the model it was written for, its ZeRO stage and PP size;
`check_checkpoint_files`: sizes against its manifest), and collective at load time
(`verify_before_load`: every checksum with --verify-checkpoint). A damaged checkpoint names the
file and the newest intact tag (or, with --fallback-to-intact-checkpoint, that tag is loaded)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch.distributed as dist

from megatron.checkpoint import manifest as checkpoint_manifest
from megatron.config import CheckpointConfig, Config
from megatron.checkpoint.manifest import LATEST, LATEST_UNIVERSAL, TAG_RE, checkpoint_tags, read_tag
from megatron.errors import ArgumentError

ARGS_FILE = "megatron_args.json"
PARTIAL_SUFFIX = ".partial"
# Model arguments a checkpoint must agree with (vocabulary handled separately: TP changes padding).
ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "ffn_hidden_size",
               "kv_channels", "swiglu", "normalization", "untie_embeddings_and_output_weights", "add_bias_linear",
               "use_rotary_position_embeddings", "add_position_embedding")
CONVERTER = "tools/convert_checkpoint/ds_to_universal.py"


def conversion_command(load_dir: str, tag: str | None) -> str:
    tag = tag or "global_step<N>"
    return (f"python {CONVERTER} --input_folder {load_dir}/{tag} --output_folder {load_dir}/{tag}_universal"
            f"  (or: source ALCF/helpers.sh && convert_ckpt_to_universal {load_dir})")


def read_saved_args(tag_dir: str) -> dict | None:
    path = os.path.join(tag_dir, ARGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _resumed_args(ckpt: CheckpointConfig) -> dict | None:
    """The saved arguments of the checkpoint a plain (not universal) `--load` would resume, if any."""
    load = ckpt.load
    if not load or ckpt.universal_checkpoint or not os.path.isdir(load):
        return None
    tag = ckpt.load_tag or read_tag(load)
    return read_saved_args(os.path.join(load, tag)) if tag else None


def saved_zero_stage(ckpt: CheckpointConfig) -> int | None:
    """The ZeRO stage of the checkpoint a plain (not universal) `--load` would resume, if known."""
    saved = _resumed_args(ckpt)
    return saved.get("zero_stage") if saved else None


DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default ZeRO-3 `sub_group_size`


def saved_sub_group_size(ckpt: CheckpointConfig) -> int | None:
    """The ZeRO-3 optimizer sub-group size of the checkpoint a plain `--load` would resume with its optimizer
    states. DeepSpeed stores ZeRO-3's optimizer state per sub-group and loads it only into the same
    sub-groups ("loaded state dict contains a parameter group that doesn't match the size of optimizer's
    group" otherwise). The size it recorded, or, for a ZeRO-3 checkpoint written before the record
    (`sub_group_size` was then DeepSpeed's default unless a DeepSpeed config set it), DeepSpeed's default.
    None when no ZeRO-3 optimizer state is to be loaded."""
    if ckpt.finetune or ckpt.no_load_optim:
        return None
    saved = _resumed_args(ckpt)
    if not saved or saved.get("zero_stage") != 3:
        return None
    return int(saved.get("zero3_sub_group_size", DEEPSPEED_SUB_GROUP_SIZE))


def _zero_layout(stage: int) -> str:
    """Which files hold the optimizer state: stage 0 the model file, 1/2 ZeRO's shards, 3 its own."""
    return {0: "model-states file", 1: "ZeRO-1/2 shards", 2: "ZeRO-1/2 shards"}.get(stage, "ZeRO-3 shards")


def architecture_mismatches(saved: dict, now: Mapping, fields=ARCH_FIELDS) -> list[str]:
    """`saved` (a checkpoint's model arguments) against `now` (this run's values by field name)."""
    return [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}"
            for k in fields if k in saved and saved[k] is not None
            and now[k] != saved[k]]


def load_problems(config: Config) -> list[str]:
    """Problems with `--load` found from the file system alone (run before DeepSpeed starts).

    A missing or empty `--load` directory is fine for a plain resume (the launcher passes
    LOAD=CKPT_DIR for a fresh run too), unless --finetune, --universal-checkpoint, --load-tag or
    --exit-on-missing-checkpoint says that a checkpoint is expected."""
    ckpt = config.checkpoint
    load = ckpt.load
    if not load:
        return []
    wanted = bool(ckpt.finetune or ckpt.universal_checkpoint or ckpt.load_tag or ckpt.exit_on_missing_checkpoint)
    if not os.path.isdir(load):
        if os.path.exists(load):
            return [f"--load {load} is a file; give the checkpoint directory (the one holding 'latest')"]
        return [f"--load {load}: no such directory (check LOAD / --load)"] if wanted else []
    errs: list[str] = []
    plain_tag = read_tag(load)
    if ckpt.universal_checkpoint:
        tag = ckpt.load_tag or read_tag(load, universal=True)
        if tag is None:
            if plain_tag is not None or checkpoint_tags(load):
                tag0 = plain_tag or checkpoint_tags(load)[-1][1]
                errs.append(f"--universal-checkpoint: {load} holds a DeepSpeed checkpoint ({tag0}) that was not "
                            f"converted (no latest_universal); convert it first: {conversion_command(load, tag0)}")
            else:
                errs.append(f"--universal-checkpoint: no checkpoint in {load} (no latest_universal); "
                            "check LOAD / --load")
            return errs
    else:
        tag = ckpt.load_tag or plain_tag
        if tag is None:
            found = checkpoint_tags(load)
            if found:
                return [f"--load {load} has checkpoints ({', '.join(n for _, n in found[-3:])}) but no 'latest' "
                        f"file: pass --load-tag {found[-1][1]} (or write that tag into {load}/latest)"]
            if read_tag(load, universal=True):
                return [f"--load {load} holds only a universal checkpoint: add --universal-checkpoint"]
            return [f"--load {load}: no checkpoint found (no 'latest' file); check LOAD / --load, or drop "
                    "--exit-on-missing-checkpoint/--finetune/--load-tag to start from scratch"] if wanted else []
    tag_dir = os.path.join(load, tag)
    if not os.path.isdir(tag_dir):
        source = "--load-tag" if ckpt.load_tag else (LATEST_UNIVERSAL if ckpt.universal_checkpoint else LATEST)
        return [f"checkpoint {tag_dir} does not exist ({source} names {tag!r}); check --load / --load-tag"]
    saved = read_saved_args(tag_dir)
    if saved:
        bad = architecture_mismatches(saved, vars(config.model))
        if bad:
            errs.append(f"checkpoint {tag_dir} was written for another model (use the same MODEL_ARCH / model "
                        "flags): " + "; ".join(bad))
        stage = saved.get("zero_stage")
        zero_stage = config.parallel.zero_stage
        if (stage is not None and not ckpt.universal_checkpoint and not ckpt.finetune and not ckpt.no_load_optim
                and _zero_layout(stage) != _zero_layout(zero_stage)):
            errs.append(f"checkpoint {tag_dir} was saved at ZeRO stage {stage} (optimizer state in the "
                        f"{_zero_layout(stage)}), this run uses stage {zero_stage}: resume with --zero-stage "
                        f"{stage}, or convert it and load with --universal-checkpoint: {conversion_command(load, tag)}")
        saved_pp, pp = saved.get("pipeline_model_parallel_size") or 1, config.parallel.pipeline_model_parallel_size or 1
        if not ckpt.universal_checkpoint and saved_pp != pp and max(saved_pp, pp) > 1:  # layer files vs one module
            errs.append(f"checkpoint {tag_dir} was saved with pipeline parallel size {saved_pp}, this run has "
                        f"{pp}: resume with PP={saved_pp} (pipeline checkpoints cannot change their PP size)")
    return errs


def _damage_message(load: str, tag: str, errs: list[str], good: str | None) -> str:
    more = f" (and {len(errs) - 1} more problem(s): python tools/verify_checkpoint.py {load} --tag {tag})" \
        if len(errs) > 1 else ""
    if good:
        fix = (f"load the newest intact checkpoint with --load-tag {good} (or add --fallback-to-intact-checkpoint), "
               "or restore the files from a copy")
    else:
        fix = f"no other intact checkpoint in {load}: restore the files from a copy, or start from scratch"
    return f"checkpoint {os.path.join(load, tag)} is damaged: {errs[0]}{more}; {fix}"


def newest_intact_tag(load: str, damaged: str, verify=None) -> str | None:
    """The newest `global_step<N>` older than `damaged` that `verify(tag_dir)` finds no problem with
    (default: sizes against its manifest; a checkpoint without a manifest counts as intact)."""
    verify = verify or checkpoint_manifest.problems
    m = TAG_RE.match(damaged)
    below = int(m.group(1)) if m else None
    for it, name in reversed(checkpoint_tags(load)):
        if name != damaged and (below is None or it < below) and not verify(os.path.join(load, name)):
            return name
    return None


def _fallback(tag: str, errs: list[str], good: str) -> dict:
    """The configuration changes that load `good` instead of the damaged `tag` (and say why at load time)."""
    return {"load_tag": good, "checkpoint_fallback": f"{tag} is damaged ({errs[0]}): loading {good} instead"}


def check_checkpoint_files(ckpt: CheckpointConfig) -> tuple[list[str], dict]:
    """Sizes (and missing / foreign files) of the checkpoint `--load` resumes, against its manifest:
    one stat per file, before DeepSpeed starts. Returns (problems, changes). A damaged checkpoint is a
    problem naming the file and the newest intact tag, or, with --fallback-to-intact-checkpoint, no
    problem and `changes` = {"load_tag": that tag, "checkpoint_fallback": why (the warning at load
    time)}, for the caller to apply (`config.replace(**changes)`); otherwise `changes` is empty."""
    load = ckpt.load
    if not load or ckpt.universal_checkpoint or not os.path.isdir(load):
        return [], {}
    tag = ckpt.load_tag or read_tag(load)
    if not tag or not os.path.isdir(os.path.join(load, tag)):
        return [], {}  # load_problems says what is missing
    errs = checkpoint_manifest.problems(os.path.join(load, tag))
    if not errs:
        return [], {}
    good = newest_intact_tag(load, tag)
    if good and ckpt.fallback_to_intact_checkpoint:
        return [], _fallback(tag, errs, good)
    return [_damage_message(load, tag, errs, good)], {}


def _verify_checksums(tag_dir: str) -> list[str]:
    """Checksums of every file of `tag_dir` (with sizes etc.), the files split over the ranks; every
    rank gets every problem. Collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return checkpoint_manifest.problems(tag_dir, checksums=True)
    try:
        manifest = checkpoint_manifest.read_manifest(tag_dir)
    except checkpoint_manifest.ManifestError:
        manifest = None
    names = sorted(manifest["files"]) if manifest else []
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = checkpoint_manifest.problems(tag_dir, checksums=True, only=set(names[rank::world]))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return list(dict.fromkeys(p for part in gathered for p in part))  # the size problems are found by all


def verify_before_load(config: Config, tag: str) -> dict:
    """--verify-checkpoint: every checksum of the checkpoint `tag` about to be loaded (collective).
    Returns the configuration changes: none when `tag` is intact; with --fallback-to-intact-checkpoint
    {"load_tag": the newest intact tag, "checkpoint_fallback": why}. Raises ArgumentError otherwise."""
    ckpt = config.checkpoint
    errs = _verify_checksums(os.path.join(ckpt.load, tag))
    if not errs:
        return {}
    good = newest_intact_tag(ckpt.load, tag, verify=_verify_checksums)
    if not (good and ckpt.fallback_to_intact_checkpoint):
        raise ArgumentError(_damage_message(ckpt.load, tag, errs, good))
    changes = _fallback(tag, errs, good)
    errs = load_problems(config.replace(**changes))  # the architecture checks, for the tag now loaded
    if errs:
        raise ArgumentError("\n".join(errs))
    return changes


def check_architecture(saved: dict, config: Config, universal: bool = False) -> None:
    """Raise with every mismatch between the checkpoint's model arguments and ours (incl. vocabulary)."""
    runtime = config.runtime
    vocab = {"vocab_size_orig": runtime.vocab_size_orig} if universal else \
        {"padded_vocab_size": runtime.padded_vocab_size}
    bad = architecture_mismatches(saved, {**vars(config.model), **vocab}, ARCH_FIELDS + tuple(vocab))
    if bad:
        raise ArgumentError(f"checkpoint in {config.checkpoint.load} does not match the model arguments "
                            f"(use the same MODEL_ARCH/flags): " + "; ".join(bad))
