"""Save / load through DeepSpeed, in the upstream Megatron-DeepSpeed layout.

    <save>/latest                               DeepSpeed: "global_step<N>"
    <save>/latest_checkpointed_iteration.txt    Megatron: "<N>"
    <save>/global_step<N>/mp_rank_00_model_states.pt + *_optim_states.pt (ZeRO shards)
    <save>/global_step<N>/megatron_args.json    (ours: the model arguments, checked before loading)
    <save>/global_step<N>_universal/ + latest_universal   (tools/convert_checkpoint/ds_to_universal.py)

The client state holds the arguments, iteration, consumed samples and tokens, RNG states, the LR
scheduler state and `universal_checkpoint_info`, so `ds_to_universal` needs no
`--inject_missing_state`.

Saves are atomic: DeepSpeed writes `global_step<N>.partial/`, and only after every rank is done
rank 0 renames it to `global_step<N>/` and then replaces `latest` and
`latest_checkpointed_iteration.txt` (write to a temporary file + `os.replace`). A crash at any
moment leaves `latest` pointing at the previous complete checkpoint. `--keep-last-n` prunes older
`global_step<N>` directories after the commit, never the one `latest` names. A write that fails
on any rank (disk full...) removes the partial directory and raises `CheckpointSaveError` on every
rank, with `latest` untouched (megatron/checkpoint/io.py; the run then stops with exit status 4).

Fixes of upstream: `--no-load-optim`, `--no-load-lr-state` and `--no-load-rng` work under
DeepSpeed; `--finetune` also resets the optimizer state under `--universal-checkpoint` (DeepSpeed
restores the moments and the step count from a universal checkpoint even for a module-only load);
the scheduler's LR is re-applied after a load (a universal load copies the saved param-group LR
into the optimizer); architecture mismatches are reported all at once, by name, before
DeepSpeed reads any tensor.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron.config import Config, ModelConfig, RuntimeConfig, saved_args
from megatron.checkpoint import io as checkpoint_io
from megatron.checkpoint import manifest as checkpoint_manifest
from megatron.checkpoint.checks import (  # noqa: F401  (the checks before loading; imported from here too)
    ARGS_FILE, ARCH_FIELDS, CONVERTER, architecture_mismatches, check_architecture, check_checkpoint_files,
    conversion_command, load_problems, newest_intact_tag, read_saved_args, saved_zero_stage, verify_before_load)
from megatron.deepspeed_compat.engine import without_optimizer_shards
from megatron.checkpoint.manifest import LATEST, LATEST_UNIVERSAL, TAG_RE, checkpoint_tags, read_tag  # noqa: F401
from megatron.errors import ArgumentError
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_rng_tracker
from megatron.observability.numerics import injected_fault

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"


@dataclass
class LoadedState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    consumed_train_tokens: int = 0
    path: str | None = None


# ----------------------------------------------------------------------------- small helpers
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _accelerators() -> list[tuple[str, object]]:
    """(name, module) of the accelerators present, whose generators draw dropout masks (CUDA: Polaris, XPU: Aurora)."""
    return [(n, getattr(torch, n)) for n in ("cuda", "xpu") if hasattr(torch, n) and getattr(torch, n).is_available()]


def _rng_state() -> dict:
    state = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()}
    for name, accelerator in _accelerators():
        state[name] = accelerator.get_rng_state()
    state["tp_tracker"] = get_rng_tracker().get_states()  # per-TP-rank dropout stream (one file per TP rank)
    if ps.get_sequence_parallel_world_size() > 1:  # one file for the SP group: every SP rank's stream in it
        state["sp_trackers"] = [None] * ps.get_sequence_parallel_world_size()
        dist.all_gather_object(state["sp_trackers"], state["tp_tracker"], group=ps.get_sequence_parallel_group())
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    for name, accelerator in _accelerators():
        if name in state:
            accelerator.set_rng_state(state[name])
    sp = ps.get_sequence_parallel_world_size()
    if sp > 1:  # Ulysses: this SP rank's stream; a checkpoint of another SP size keeps the fresh per-rank seeds
        if len(state.get("sp_trackers") or ()) == sp:
            get_rng_tracker().set_states(state["sp_trackers"][ps.get_sequence_parallel_rank()])
    elif state.get("tp_tracker"):
        get_rng_tracker().set_states(state["tp_tracker"])


def write_atomic(path: str, text: str) -> None:
    """Replace `path` by a file holding `text`; readers see the old or the new file, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def universal_checkpoint_info(model: ModelConfig, runtime: RuntimeConfig) -> dict:
    """What DeepSpeed's ds_to_universal needs to merge parameters across TP ranks (keys of
    DeepSpeed's checkpoint constants; patterns are `re.match`ed against full parameter names, and
    the converter's strict mode wants every pattern to match some parameter)."""
    vocab = [r"language_model\.embedding\.word_embeddings\.weight$"]
    if model.untie_embeddings_and_output_weights:
        vocab.append(r"language_model\.output_layer\.weight$")
    info = {
        "universal_checkpoint_version": 0.4,
        "original_vocab_size": runtime.vocab_size_orig,
        "padded_vocab_size": runtime.padded_vocab_size,
        "vocabulary_parameter_patterns": vocab,
        "tp_replicated_parameter_patterns": [r".*layernorm\.weight$"],
        "parameter_with_row_parallelism_patterns": [r".*self_attention\.dense\.weight$",
                                                    r".*mlp\.dense_4h_to_h\.weight$"],
    }
    if model.swiglu:
        info["parameter_with_2_sub_params_cat_dim_0"] = [r".*mlp\.dense_h_to_4h\.weight$"]
    return info


def _json_safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def model_args_record(config: Config) -> dict:
    """The model arguments written next to a checkpoint (ARGS_FILE), checked before loading it."""
    fields = ARCH_FIELDS + ("padded_vocab_size", "vocab_size_orig", "seq_length", "max_position_embeddings",
                            "layernorm_epsilon", "rope_theta", "rotary_percent", "tokenizer_type",
                            "tokenizer_model", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
                            "pipeline_model_parallel_size", "zero_stage", "world_size", "data_parallel_size",
                            "optimizer", "params_dtype", "init_method_std")
    flat = vars(config.to_args())
    return {k: _json_safe(flat[k]) for k in fields}


# ----------------------------------------------------------------------------- save
def commit(save_dir: str, partial: str, tag: str, iteration: int) -> None:
    """Rank 0, after every rank finished writing `partial`: make it `tag` and point `latest` at it."""
    final, part = os.path.join(save_dir, tag), os.path.join(save_dir, partial)
    old = None
    if os.path.exists(final):  # re-saving the same iteration: move the old copy aside first
        old = f"{final}.old.{os.getpid()}"
        os.rename(final, old)
    os.rename(part, final)
    write_atomic(os.path.join(save_dir, LATEST), tag)
    write_atomic(os.path.join(save_dir, TRACKER_FILE), str(iteration))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prune(save_dir: str, keep_last_n: int | None) -> list[str]:
    """Delete stale partial saves and all but the newest `keep_last_n` checkpoints (never the one
    `latest` names). Returns the deleted directory names."""
    deleted = []
    for path in glob.glob(os.path.join(save_dir, "global_step*" + PARTIAL_SUFFIX)):
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(os.path.basename(path))
    if not keep_last_n:
        return deleted
    protect = read_tag(save_dir)
    tags = [name for _, name in checkpoint_tags(save_dir)]
    for name in tags[:-keep_last_n] if keep_last_n < len(tags) else []:
        if name != protect:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            deleted.append(name)
    return deleted


def save_checkpoint(engine, config: Config, iteration: int, consumed_train_samples: int, consumed_train_tokens: int,
                    consumed_valid_samples: int = 0) -> str:
    """Save on every rank (DeepSpeed writes the ZeRO shards) to --save; returns the checkpoint directory."""
    ckpt, rank, save = config.checkpoint, int(config.runtime.rank or 0), config.checkpoint.save
    tag = f"global_step{iteration}"
    partial = tag + PARTIAL_SUFFIX
    if rank == 0:
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(os.path.join(save, partial), ignore_errors=True)
    _barrier()
    scheduler = getattr(engine, "lr_scheduler", None)
    client_state = {
        "args": saved_args(config.to_args()),  # the upstream flat namespace, as upstream stores it
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_train_samples": consumed_train_samples,
        "consumed_valid_samples": consumed_valid_samples,
        "tokens": consumed_train_tokens,
        "universal_checkpoint_info": universal_checkpoint_info(config.model, config.runtime),
        # a copy DeepSpeed hands back even for module-only loads (CPT cooldown check)
        "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    if not ckpt.no_save_rng:
        client_state["rng_state"] = _rng_state()
    if getattr(engine, "optimizer_param_names", None):  # what tools/convert_checkpoint needs at ZeRO stage 0
        client_state["optimizer_param_names"] = engine.optimizer_param_names
    # a failed write (disk full...) is recorded, not raised, so every rank finishes DeepSpeed's collectives
    guard = checkpoint_io.guard_engine(engine, ckpt)
    if guard is not None:
        guard.start_save(inject_enospc=injected_fault(iteration, rank) == "enospc")
    failure = None
    skip_optim = bool(ckpt.no_save_optim) and hasattr(engine, "save_zero_checkpoint")
    try:
        with without_optimizer_shards(engine, skip=skip_optim):
            engine.save_checkpoint(save, tag=partial, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=False)
    except OSError as e:  # a file DeepSpeed writes itself (its zero_to_fp32.py copy)
        failure = f"{e.filename or save}: [Errno {e.errno}] {e.strerror}"
    failure = failure or (guard.failure if guard is not None else None)
    part_dir = os.path.join(save, partial)
    entries = _gather_manifest_entries(guard, part_dir, rank, failure)  # collective
    if rank == 0 and failure is None:
        record = model_args_record(config)
        record.update(iteration=iteration, optimizer_states_saved=not skip_optim)
        if config.parallel.zero_stage == 3:  # the optimizer state's layout: a plain resume must use the same
            record["zero3_sub_group_size"] = int(engine.optimizer.sub_group_size)
        try:
            with open(os.path.join(part_dir, ARGS_FILE), "w") as f:
                json.dump(record, f, indent=1)
            # after every rank's files and ARGS_FILE: what no rank claimed is hashed here
            checkpoint_manifest.write_manifest(part_dir, entries, guard.algorithm if guard else
                                               checkpoint_manifest.default_algorithm(), tag, iteration)
        except OSError as e:
            failure = f"{e.filename or part_dir}: [Errno {e.errno}] {e.strerror}" if e.errno else str(e)
    _raise_if_save_failed(save, rank, tag, failure)  # collective: instead of a barrier
    if rank == 0:
        try:
            commit(save, partial, tag, iteration)
        except OSError as e:
            failure = f"{e.filename or save}: [Errno {e.errno}] {e.strerror}"
        else:
            deleted = prune(save, ckpt.keep_last_n)
            if deleted:
                log.info("--keep-last-n %s: deleted %s", ckpt.keep_last_n, ", ".join(deleted))
    _raise_if_save_failed(save, rank, tag, failure)
    return os.path.join(save, tag)


def _gather_manifest_entries(guard, part_dir: str, rank: int, failure: str | None) -> dict:
    """Rank 0 gets every rank's {file: manifest entry} of this save (the others get {})."""
    mine = {}
    if guard is not None and failure is None:
        try:
            mine = guard.manifest_entries(part_dir, rank)
        except OSError:  # a file gone already: rank 0 lists the directory and finds out
            mine = {}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if rank == 0 else {}


def _raise_if_save_failed(save: str, rank: int, tag: str, failure: str | None) -> None:
    """Collective: if any rank's write failed, rank 0 removes the partial directory and every rank
    raises the same one-line CheckpointSaveError (the run stops: see ALCF/notes/reliability.md)."""
    failures = [failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    bad = [(r, f) for r, f in enumerate(failures) if f]
    if not bad:
        return
    partial = os.path.join(save, tag + PARTIAL_SUFFIX)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    bad_rank, reason = bad[0]
    where = f"rank {bad_rank}: " if len(failures) > 1 else ""
    full = " (disk full)" if checkpoint_io.is_disk_full(reason) else ""
    latest = read_tag(save)
    raise checkpoint_io.CheckpointSaveError(
        f"saving checkpoint {tag} to {save} failed{full}: {where}{reason}; 'latest' still names "
        f"{latest or 'no checkpoint'}"
        f"{'' if os.path.exists(partial) else f' and the incomplete {tag + PARTIAL_SUFFIX} was removed'}; "
        f"free space (or point --save elsewhere) and resume with --load")


# ----------------------------------------------------------------------------- CPT helpers
def cooldown_warning(scheduler_state: dict | None) -> str | None:
    """A message when the checkpoint was saved inside a constant+cooldown schedule's cooldown (or
    with LR below its max for the constant style): phase-2 CPT must start from a checkpoint at LR_max."""
    from megatron.schedules import SPEC_KEYS, ScheduleSpec, lr_at, normalize_state  # noqa: PLC0415

    if not scheduler_state:
        return None
    sd = normalize_state(scheduler_state)
    if sd.get("lr_decay_style") != "constant" or sd.get("num_steps") is None:
        return None
    try:
        spec = ScheduleSpec(**{field: sd[key] for key, field in SPEC_KEYS.items() if key in sd},
                            unit=sd.get("unit", "samples"))
    except (TypeError, ValueError):
        return None
    lr = lr_at(spec, int(sd["num_steps"]))
    if spec.constant_plus_cooldown_steps > 0 and lr < spec.max_lr and int(sd["num_steps"]) > spec.warmup_steps:
        return (f"the loaded checkpoint is already in its cooldown (LR {lr:.3e} < LR_max {spec.max_lr:.3e} at "
                f"{sd['num_steps']} {spec.unit}): phase-2 CPT needs a checkpoint at LR=LR_max BEFORE cooling down "
                "(ALCF/notes/cpt.md); load an earlier checkpoint with --load-tag, or rewarm on purpose")
    return None


def reset_optimizer_state(engine) -> None:
    """Zero every optimizer state tensor in place (and the step counts): the same as a fresh
    optimizer for Adam/AdamW/SGD, and it keeps DeepSpeed's references to those tensors valid."""
    opt = getattr(engine, "optimizer", None)
    base = getattr(opt, "optimizer", opt)
    if base is None or not hasattr(base, "state"):
        return
    for state in base.state.values():
        for key, value in list(state.items()):
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0


# ----------------------------------------------------------------------------- load
def check_universal_atoms(tag_dir: str) -> None:
    """DeepSpeed's universal loader reads `zero/<param>/<state>.pt` with torch.load(weights_only=False):
    vet every one of their pickles against the checkpoint allowlist first (only the pickles are
    read, ~1 ms a file). Raises CheckpointLoadRefused naming the file."""
    for root, _dirs, files in os.walk(os.path.join(tag_dir, "zero")):
        for name in sorted(files):
            if name.endswith(".pt"):
                checkpoint_io.check_pickle_globals(os.path.join(root, name))


def load_checkpoint(engine, config: Config) -> LoadedState:
    """Load `--load` into the engine. Returns the iteration and data position to resume from."""
    ckpt = config.checkpoint
    if not ckpt.load:
        return LoadedState()
    errs = load_problems(config)
    if errs:
        raise ArgumentError("\n".join(errs))
    errs, changes = check_checkpoint_files(ckpt)  # (again: the files may have changed since the start-up checks)
    if errs:
        raise ArgumentError("\n".join(errs))
    if changes:  # --fallback-to-intact-checkpoint: another tag
        config = config.replace(**changes)
        ckpt = config.checkpoint
    load, rank, universal = ckpt.load, int(config.runtime.rank or 0), bool(ckpt.universal_checkpoint)
    tag = ckpt.load_tag or read_tag(load, universal)
    if tag is None:
        if rank == 0:
            log.warning("no checkpoint found in %s; starting from scratch", load)
        return LoadedState()
    if ckpt.verify_checkpoint and not universal:
        changes = verify_before_load(config, tag)
        if changes:
            config = config.replace(**changes)
            tag = changes["load_tag"]
    if rank == 0:
        fallback = config.runtime.checkpoint_fallback
        if fallback:
            log.warning("--fallback-to-intact-checkpoint: %s", fallback)
            print(f"WARNING: --fallback-to-intact-checkpoint: {fallback}", flush=True)
        if not universal and not checkpoint_manifest.has_manifest(os.path.join(load, tag)):
            log.info("checkpoint %s/%s has no manifest (written before manifests existed): its files are not "
                     "verified", load, tag)
    saved = read_saved_args(os.path.join(load, tag))
    if saved:
        check_architecture(saved, config, universal=universal)
        if not saved.get("optimizer_states_saved", True) and not (ckpt.finetune or ckpt.no_load_optim):
            raise ArgumentError(f"checkpoint {load}/{tag} was saved with --no-save-optim: add --no-load-optim "
                                "(or --finetune) to load it")

    module_only = bool(ckpt.finetune)
    guard = checkpoint_io.guard_engine(engine, ckpt)  # DeepSpeed reads our files with torch.load(weights_only=True)
    try:
        if universal and not ckpt.unsafe_checkpoint_load:  # DeepSpeed reads the atoms with weights_only=False
            check_universal_atoms(os.path.join(load, tag))
        path, client = engine.load_checkpoint(
            load, tag=tag,
            load_module_only=module_only,
            load_optimizer_states=not (module_only or ckpt.no_load_optim),
            load_lr_scheduler_states=not (module_only or ckpt.no_load_lr_state),
        )
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            raise ArgumentError(f"checkpoint {load}/{tag} does not match the model arguments (use the same "
                                f"MODEL_ARCH/flags): {' '.join(first[:3])[:600]}") from None
        raise
    except checkpoint_io.CheckpointLoadRefused as e:  # a pickle that could run code
        raise ArgumentError(str(e)) from None
    finally:
        if guard is not None:
            guard.end_load()
    if path is None:
        raise ArgumentError(f"DeepSpeed could not load checkpoint {tag} from {load}")
    client = client or {}
    stored = client.get("args") or {}  # the upstream namespace the checkpoint stores
    if not saved and not ckpt.finetune:
        check_architecture(stored, config, universal=universal)

    if module_only and universal:
        # DeepSpeed restores the optimizer moments and step from the universal atoms even for a
        # module-only load: reset them, as --finetune promises.
        reset_optimizer_state(engine)
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and hasattr(scheduler, "step"):
        scheduler.step(0)  # write the schedule's LR/WD back (a universal load copies the saved ones)

    if ckpt.finetune or ckpt.reset_iteration:
        engine.global_steps = 0
        engine.global_samples = 0
        sched = config.schedule
        if ckpt.finetune and rank == 0:
            warning = cooldown_warning(client.get("opt_param_scheduler"))
            if warning and sched.lr_warmup_fraction in (None, 0.0) and not sched.lr_warmup_iters \
                    and not sched.lr_warmup_samples:
                log.warning("%s", warning)
                print(f"WARNING: {warning}", flush=True)
        log.info("loaded weights from %s (%s: iteration, optimizer, scheduler and data restart)", path,
                 "--finetune" if ckpt.finetune else "--reset-iteration")
        return LoadedState(path=path)
    if "rng_state" in client and not ckpt.no_load_rng:
        _set_rng_state(client["rng_state"])
    it = int(client.get("iteration", 0))
    state = LoadedState(
        iteration=it,
        consumed_train_samples=int(client.get("consumed_train_samples", it * config.training.global_batch_size)),
        consumed_valid_samples=int(client.get("consumed_valid_samples", 0)),
        consumed_train_tokens=int(client.get("tokens", 0)),
        path=path,
    )
    log.info("resumed from %s at iteration %d (%d samples consumed)", path, it, state.consumed_train_samples)
    return state
