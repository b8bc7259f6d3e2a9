"""Save / load through DeepSpeed, in the upstream Megatron-DeepSpeed layout.

    <save>/latest                               DeepSpeed: "global_step<N>"
    <save>/latest_checkpointed_iteration.txt    Megatron: "<N>"
    <save>/global_step<N>/mp_rank_00_model_states.pt + *_optim_states.pt (ZeRO shards)

The client state holds the arguments, iteration, consumed samples and tokens, RNG states and
`universal_checkpoint_info`, so `ds_to_universal` needs no `--inject_missing_state`. The LR
scheduler state is saved by DeepSpeed itself (`lr_scheduler`).

Fixes of upstream: `--no-load-optim`, `--no-load-lr-state` and `--no-load-rng` work under
DeepSpeed; architecture mismatches are reported all at once, by name.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron.arguments import ArgumentError

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"
ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "ffn_hidden_size",
               "padded_vocab_size", "swiglu", "normalization", "untie_embeddings_and_output_weights")


@dataclass
class LoadedState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    consumed_train_tokens: int = 0
    path: str | None = None


def _rng_state() -> dict:
    state = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def universal_checkpoint_info(args) -> dict:
    """What DeepSpeed's ds_to_universal needs to merge parameters (TP = 1 here: nothing to merge)."""
    return {
        "universal_checkpoint_version": 0.4,
        "original_vocab_size": args.vocab_size_orig,
        "padded_vocab_size": args.padded_vocab_size,
        "vocabulary_parameter_patterns": ["word_embeddings.weight", "output_layer.weight"],
        "tp_replicated_parameter_patterns": [r".*layernorm\.weight$"],
        "row_parallel_parameter_patterns": ["self_attention.dense.weight", "mlp.dense_4h_to_h.weight"],
        "swiglu_column_parallel_parameter_patterns": ["mlp.dense_h_to_4h.weight"],
    }


def save_checkpoint(engine, args, iteration: int, consumed_train_samples: int, consumed_train_tokens: int,
                    consumed_valid_samples: int = 0) -> str:
    """Save on every rank (DeepSpeed writes the ZeRO shards); returns the checkpoint directory."""
    tag = f"global_step{iteration}"
    client_state = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_train_samples": consumed_train_samples,
        "consumed_valid_samples": consumed_valid_samples,
        "tokens": consumed_train_tokens,
        "universal_checkpoint_info": universal_checkpoint_info(args),
    }
    if not args.no_save_rng:
        client_state["rng_state"] = _rng_state()
    engine.save_checkpoint(args.save, tag=tag, client_state=client_state,
                           exclude_frozen_parameters=False)
    if dist.is_initialized():
        dist.barrier()
    if args.rank == 0:
        tmp = os.path.join(args.save, TRACKER_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(args.save, TRACKER_FILE))
    return os.path.join(args.save, tag)


def _latest_tag(load_dir: str, universal: bool) -> str | None:
    name = "latest_universal" if universal else "latest"
    path = os.path.join(load_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def check_architecture(saved: dict, args) -> None:
    """Raise with every mismatch between the checkpoint's model arguments and ours."""
    bad = [f"{k}: checkpoint {saved[k]!r} vs now {getattr(args, k)!r}"
           for k in ARCH_FIELDS if k in saved and getattr(args, k, None) != saved[k]]
    if bad:
        raise ArgumentError(f"checkpoint in {args.load} does not match the model arguments "
                         f"(use the same MODEL_ARCH/flags): " + "; ".join(bad))


def load_checkpoint(engine, args) -> LoadedState:
    """Load `args.load` into the engine. Returns the iteration and data position to resume from."""
    if not args.load:
        return LoadedState()
    tag = args.load_tag or _latest_tag(args.load, args.universal_checkpoint)
    if tag is None:
        msg = f"no checkpoint found in {args.load}"
        if args.exit_on_missing_checkpoint or args.finetune:
            raise FileNotFoundError(msg + " (check LOAD / --load)")
        log.warning("%s; starting from scratch", msg)
        return LoadedState()

    module_only = args.finetune
    path, client = engine.load_checkpoint(
        args.load, tag=tag,
        load_module_only=module_only,
        load_optimizer_states=not (module_only or args.no_load_optim),
        load_lr_scheduler_states=not (module_only or args.no_load_lr_state),
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {args.load}")
    client = client or {}
    saved_args = client.get("args") or {}
    if not args.finetune and not args.universal_checkpoint:
        check_architecture(saved_args, args)
    if args.finetune or args.reset_iteration:
        engine.global_steps = 0
        engine.global_samples = 0
        log.info("loaded weights from %s (finetune: iteration, optimizer, scheduler and data restart)", path)
        return LoadedState(path=path)
    if "rng_state" in client and not args.no_load_rng:
        _set_rng_state(client["rng_state"])
    it = int(client.get("iteration", 0))
    state = LoadedState(
        iteration=it,
        consumed_train_samples=int(client.get("consumed_train_samples", it * args.global_batch_size)),
        consumed_valid_samples=int(client.get("consumed_valid_samples", 0)),
        consumed_train_tokens=int(client.get("tokens", 0)),
        path=path,
    )
    log.info("resumed from %s at iteration %d (%d samples consumed)", path, it, state.consumed_train_samples)
    return state
