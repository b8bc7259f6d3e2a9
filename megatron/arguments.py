"""Command-line arguments: the upstream Megatron-DeepSpeed flag spellings -> one validated config.

Every flag the ALCF launcher emits, and the ones its users pass by hand, are accepted with the
upstream spelling (dashes and underscores mixed as upstream: `--lr_constant_plus_cooldown`,
`--override-opt_param-scheduler`, `--deepspeed_config`, ...). Flags that upstream accepts but
this code cannot honour yet are refused by `validate_args` with a message, never ignored
silently; flags that only select CUDA kernel fusions are accepted and have no effect (the
fused paths do not exist here; `scaled_dot_product_attention` picks the kernel).

`parse_args(argv)` returns an `argparse.Namespace` with upstream attribute names (the
"config"); `validate_args` fills derived values (data-parallel size, number of micro-batches,
padded vocabulary...) and raises `ArgumentError` listing every problem at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from megatron.config import Config, RuntimeConfig
from megatron.errors import ArgumentError  # noqa: F401  (raised here; imported from here by callers)
from megatron.fp16 import add_arguments as fp16_arguments, fp16_problems
from megatron.optimizer import optimizer_help, optimizer_names, optimizer_problems
from megatron.schedules import LR_SCHEDULES, build_schedule_spec
from megatron.lr_finder import configure_lr_finder
from megatron.core.parallel_config import derived_parallel_fields, parallel_problems
from megatron.core.pipeline_schedule import pipeline_problems
from megatron.core.sequence_parallel import ulysses_problems
from megatron.launch_env import world_size_from_env

FLASH_ATTN_FLAGS = ("use_flash_attn_v1", "use_flash_attn_v2", "use_flash_attn_triton", "use_flash_attn_builder")

# Upstream flags accepted for command-line compatibility but refused when given, because what they
# promise cannot happen here: one entry per flag, `dest -> the one-line message naming the fix`.
# tests/test_flag_audit.py runs each through validate_args and asserts its message.
REFUSED_FLAGS = {
    "DDP_impl": "--DDP-impl: DeepSpeed is the data-parallel engine here (no Megatron or torch DDP); drop the flag",
    "cpu_torch_adam": "--cpu_torch_adam: the optimizer is chosen by --optimizer (torch AdamW: --optimizer adamw; "
                      "offloaded to the CPU: CPU_OPTIMIZER=1 / --cpu-optimizer); drop the flag",
    "ds_fused_adam": "--ds_fused_adam: for DeepSpeed's own Adam use --optimizer ds.adamw (OPT=ds.adamw); drop the flag",
    "mmap_warmup": "--mmap-warmup: not supported (the .bin/.idx files are memory-mapped and paged in on demand); "
                   "drop the flag",
    "data_parallel_random_init": "--data-parallel-random-init: DeepSpeed broadcasts rank 0's weights to every "
                                 "data-parallel replica when it starts, so a per-replica initialization cannot "
                                 "survive; drop the flag",
    "no_initialization": "--no-initialization: not supported (the weights are always initialized, then replaced "
                         "by --load); drop the flag",
    "openai_gelu": "--openai-gelu: the tanh-approximated GELU is not implemented (GELU is the exact erf form; "
                   "Llama models use --swiglu); drop the flag",
    "embedding_weights_in_fp32": "--embedding-weights-in-fp32: not supported (embeddings are in the training "
                                 "dtype); drop the flag",
    "attention_softmax_in_fp32": "--attention-softmax-in-fp32: not selectable here "
                                 "(scaled_dot_product_attention picks the softmax precision); drop the flag",
}


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def _int_like(v: str) -> int:
    """Integer that also accepts '1.0' / '1e9' forms the launcher or users write."""
    f = float(v)
    if f != int(f):
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    return int(f)


def build_parser() -> argparse.ArgumentParser:
    """Every upstream flag spelling -> its config field (the dest); the defaults come from megatron/config/."""
    p = argparse.ArgumentParser(
        description="Pretrain a Llama-style GPT with DeepSpeed (Megatron-DeepSpeed compatible flags).",
        allow_abbrev=False,
    )
    _model_args(p)
    _init_args(p)
    _mup_args(p)
    _training_args(p)
    _optimizer_args(p)
    _lr_args(p)
    _checkpoint_args(p)
    _data_args(p)
    _parallel_args(p)
    _logging_args(p)
    p.set_defaults(**Config.defaults())  # the one source of defaults: the config's dataclasses
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int, help="default: swiglu int(8h/3/64)*64, else 4h")
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-key-value-heads", type=int, help="GQA; default = heads")
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--use-rotary-position-embeddings", action="store_true")
    g.add_argument("--rotary-position-embeddings-theta", dest="rope_theta", type=float)
    g.add_argument("--rotary-percent", type=float)
    g.add_argument("--no-position-embedding", dest="add_position_embedding", action="store_false",
                   help="no learned absolute positions (what --use-rotary-position-embeddings already gives here)")
    g.add_argument("--normalization", choices=["layernorm", "rmsnorm"])
    g.add_argument("--layernorm-epsilon", type=float)
    g.add_argument("--apply-layernorm-1p", action="store_true")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--squared-relu", action="store_true")
    g.add_argument("--openai-gelu", action="store_true", help="refused: GELU is the exact erf form")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--embedding-weights-in-fp32", action="store_true", help="refused")
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--hidden-dropout", type=float)
    g.add_argument("--no-query-key-layer-scaling", dest="apply_query_key_layer_scaling", action="store_false",
                   help="accepted; attention scaling is always 1/sqrt(d_head) (what this flag selects upstream)")
    g.add_argument("--attention-softmax-in-fp32", action="store_true", help="refused: sdpa picks the precision")
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--fp16", action="store_true",
                   help="fp16 weights under DeepSpeed's fp16 optimizer with loss scaling (megatron/fp16.py)")
    g.add_argument("--bf16", action="store_true")
    fp16_arguments(g)  # --loss-scale, --initial-loss-scale, --min-loss-scale, --loss-scale-window, --hysteresis
    g.add_argument("--use-flash-attn", "--use-flash-attn-v1", dest="use_flash_attn_v1", action="store_true")
    g.add_argument("--use-flash-attn-v2", action="store_true")
    g.add_argument("--use-flash-attn-triton", action="store_true")
    g.add_argument("--use-flash-attn-builder", action="store_true")
    # CUDA fusion switches of upstream: accepted so launcher command lines work unchanged.
    for flag in ("--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
                 "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"):
        g.add_argument(flag, action="store_true", help="accepted; no fused kernels on this path")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="always on here: bf16/fp16 gradients are averaged across ranks and accumulated over "
                        "micro-batches in fp32")
    g.add_argument("--grad-accum-dtype", choices=("fp32", "bf16", "fp16"),
                   help="dtype bf16/fp16 runs keep, accumulate and average the gradients in: fp32 (the default, "
                        "Megatron's --accumulate-allreduce-grads-in-fp32) or the weights' 16-bit dtype (2 bytes "
                        "per parameter less, the ZeRO paper's count; sums rounded to 16 bits; ALCF/notes/performance.md)")


def _init_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("initialization")
    g.add_argument("--seed", type=int)
    g.add_argument("--data-parallel-random-init", action="store_true",
                   help="refused: DeepSpeed broadcasts rank 0's weights")
    g.add_argument("--init-method-std", type=float)
    g.add_argument("--adjust-word-embedding-init", action="store_true",
                   help="initialize word embeddings with --word-embedding-init-std (really applied here)")
    g.add_argument("--word-embedding-init-std", type=float)
    g.add_argument("--init-method-xavier-uniform", action="store_true")
    g.add_argument("--no-initialization", action="store_true", help="refused (see --help of validate_args)")


def _mup_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MuP / CompleteP (megatron/model/mup.py, ALCF/notes/mup.md)")
    g.add_argument("--enable-mup", action="store_true", help="maximal update parametrization (width transfer)")
    g.add_argument("--mup-base-width", type=int,
                   help="hidden size the hyper-parameters were tuned at (width multiplier = hidden / this)")
    g.add_argument("--mup-width-multiplier", "--mup-hidden-weights-scale", dest="mup_width_multiplier", type=float,
                   help="the width multiplier itself (instead of --mup-base-width)")
    g.add_argument("--mup-input-alpha", type=float, help="embedding output multiplier")
    g.add_argument("--mup-output-alpha", type=float, help="logits multiplier (divided by the width mult.)")
    g.add_argument("--mup-attn-alpha", type=float, help="attention scale = this / head dim")
    g.add_argument("--enable-depth-scale", action="store_true", help="CompleteP depth parametrization")
    g.add_argument("--depth-base", type=int,
                   help="number of layers the hyper-parameters were tuned at (depth multiplier = layers / this)")
    g.add_argument("--depth-multiplier", type=float, help="the depth multiplier itself")
    g.add_argument("--depth-alpha", type=float,
                   help="residual branches x (layers / base)^-alpha; 1 = CompleteP, 0.5 = Yang et al.")


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--train-iters", type=_int_like)
    g.add_argument("--train-samples", type=_int_like)
    g.add_argument("--train-tokens", type=_int_like, help="also stop once this many tokens are consumed")
    g.add_argument("--eval-interval", type=int)
    g.add_argument("--eval-iters", type=int)
    g.add_argument("--eval-on-start", action="store_true", help="evaluate once before the first step")
    g.add_argument("--skip-train", action="store_true",
                   help="no training iteration: load (--load), evaluate on the validation set once and exit")
    g.add_argument("--exit-interval", type=int)
    g.add_argument("--exit-duration-in-mins", type=float)
    g.add_argument("--exit-signal-handler", action="store_true")
    g.add_argument("--kill-switch-file", type=str)
    # numerical faults (megatron/observability/numerics.py)
    g.add_argument("--max-skipped-iterations", type=int,
                   help="abort after this many iterations in a row were skipped for a NaN/Inf loss or grad norm, "
                        "saving a checkpoint of the last good state first (default: never abort)")
    g.add_argument("--loss-spike-factor", type=float,
                   help="log a warning when a loss exceeds this factor x its recent running mean (0: off)")
    g.add_argument("--check-args", action="store_true",
                   help="validate the flags, the tokenizer and the data files (headers, token ids vs vocabulary), "
                        "print OK or one ERROR line per problem, and exit (0 or 2) without starting anything")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the memory estimate (weights, gradients, optimizer state, activations per "
                        "rank) exceeds what the device or host has (ALCF/notes/reliability.md)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="activation checkpointing: recompute whole layers in the backward (= --recompute-granularity full)")
    g.add_argument("--checkpoint-num-layers", type=int, help="layers per checkpointed chunk")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="accepted with --checkpoint-activations (same torch.utils.checkpoint); alone it implies it")
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="full: recompute whole layers; selective: recompute only the attention core")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor) before DeepSpeed wraps it; the first steps are slow "
                        "while it compiles (needs a C++ compiler on CPU; not with ZeRO-3 or activation recompute). "
                        "Default: on for CPU runs whose model compute (iterations x model FLOPs) is at least "
                        "AUTO_COMPILE_MIN_TFLOP, where compiling pays for itself (ALCF/notes/performance.md)")
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="never torch.compile the model (eager), whatever the run's size")
    g.add_argument("--allocator", choices=["glibc", "mimalloc"],
                   help="the C allocator: glibc (the default) or mimalloc, which returns freed memory to the system "
                        "itself (ZeRO-3: less resident memory and CPU per step); pretrain_gpt.py re-executes itself "
                        "with it preloaded. Needs pip install cmeel-mimalloc (ALCF/notes/performance.md)")
    g.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                   help="glibc malloc serves allocations of at least BYTES with their own mappings, returned to the "
                        "system when freed (mallopt M_MMAP_THRESHOLD): freed gradients and activations do not stay "
                        "resident. 0: glibc's default, whose threshold rises to 32 MiB and keeps them. "
                        "Refused with MALLOC_MMAP_THRESHOLD_ also set (ALCF/notes/performance.md)")


def _optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=optimizer_names(), metavar="NAME",
                   help=f"one of: {optimizer_help()}")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--start-weight-decay", type=float)
    g.add_argument("--end-weight-decay", type=float)
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-grad", type=float)
    g.add_argument("--adam-beta1", type=float)
    g.add_argument("--adam-beta2", type=float)
    g.add_argument("--adam-eps", type=float)
    g.add_argument("--sgd-momentum", type=float)
    g.add_argument("--cpu-optimizer", action="store_true",
                   help="ZeRO optimizer offload to the CPU (offload_optimizer in the DeepSpeed config; ZeRO 1-3)")
    g.add_argument("--cpu_torch_adam", action="store_true", help="refused: use --optimizer adamw")
    g.add_argument("--ds_fused_adam", action="store_true", help="refused: use --optimizer ds.adamw")
    # per-optimizer flags (ALCF/notes/optimizers.md); `type=bool` upstream flags take true/false here
    g.add_argument("--sophiag-beta1", type=float)
    g.add_argument("--sophiag-beta2", type=float)
    g.add_argument("--sophiag-rho", type=float)
    g.add_argument("--sophiag-hessian-interval", type=int,
                   help="SophiaG: refresh the Hessian estimate every N iterations (extra forward/backward)")
    g.add_argument("--dshampooadamw-max-preconditioner-dim", type=int)
    g.add_argument("--dshampooadamw-precondition-freq", type=int)
    g.add_argument("--dshampooadamw-use-decoupled-weight-decay", type=_str2bool, metavar="BOOL")
    g.add_argument("--dshampooadamw-eps", type=float)
    g.add_argument("--muon-momentum", type=float)
    g.add_argument("--muon-nesterov", type=_str2bool, metavar="BOOL")
    g.add_argument("--muon-ns-steps", type=int,
                   help="Newton-Schulz steps (upstream default 6; 5 here, the value DeepSpeed's ZeRO Muon fixes)")
    g.add_argument("--muonadamw-beta1", type=float)
    g.add_argument("--muonadamw-beta2", type=float)
    g.add_argument("--muonadamw-eps", type=float)
    g.add_argument("--muonclip-t", type=float, help="MuonClip: max QK logit per head")
    g.add_argument("--muonclip-alpha", type=float, help="MuonClip: W_q takes eta^alpha, W_k the rest")
    g.add_argument("--schedulefree-for-each", action="store_true")
    g.add_argument("--ademamix-beta3", type=float)
    g.add_argument("--ademamix-alpha", type=float)
    g.add_argument("--ademamix-warmup-iters", type=int,
                   help="AdEMAMix alpha/beta3 warmup length in optimizer steps (default: none)")


def _lr_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--lr-decay-style", choices=list(LR_SCHEDULES),
                   help="LR schedule after warmup (registry: megatron/schedules/styles.py): "
                   + "; ".join(f"{name}: {style.description}" for name, style in LR_SCHEDULES.items()))
    g.add_argument("--lr-decay-iters", type=_int_like)
    g.add_argument("--lr-decay-samples", type=_int_like)
    g.add_argument("--lr-decay-tokens", type=_int_like)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-warmup-iters", type=_int_like)
    g.add_argument("--lr-warmup-samples", type=_int_like)
    g.add_argument("--lr-warmup-tokens", type=_int_like)
    g.add_argument("--lr-constant-tokens", type=_int_like)
    g.add_argument("--lr-constant-fraction", type=float)
    g.add_argument("--lr-cooldown-tokens", type=_int_like)
    g.add_argument("--lr-cooldown-fraction", type=float)
    g.add_argument("--constant-lr", type=float)
    g.add_argument("--timescale", type=float)
    g.add_argument("--lr_constant_plus_cooldown", action="store_true")
    g.add_argument("--lr_constant_plus_cooldown_frac", type=float)
    g.add_argument("--lr-cooldown-iters", type=_int_like,
                   help="constant+cooldown: cool down over the last N iterations")
    g.add_argument("--lr-cooldown-start-iter", type=_int_like,
                   help="constant+cooldown: start the cooldown at this iteration")
    g.add_argument("--lr-wsd-decay-iters", type=_int_like)
    g.add_argument("--lr-wsd-decay-samples", type=_int_like)
    g.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "1-sqrt", "minus_sqrt"])
    g.add_argument("--lr-finder", action="store_true",
                   help="LR range test instead of training: geometric LR sweep, smoothed loss, suggested LR; writes "
                        "{save}/lr_finder/lr_finder_data.csv/.npz and lr_finder.png, no checkpoint "
                        "(ALCF/notes/lr_finder.md)")
    g.add_argument("--lr-finder-min", type=float, help="first LR of the sweep")
    g.add_argument("--lr-finder-max", type=float, help="last LR of the sweep")
    g.add_argument("--lr-finder-fraction", type=float,
                   help="sweep length as a fraction of --train-iters (upstream used 0.1)")
    g.add_argument("--lr-finder-stop-factor", type=float,
                   help="stop when the smoothed loss exceeds this x its best value")
    g.add_argument("--lr-finder-beta", type=float, help="loss smoothing (EMA) factor")
    g.add_argument("--override-opt_param-scheduler", action="store_true")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true")
    g.add_argument("--warmup", type=int, help="deprecated; use --lr-warmup-*")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", type=str)
    g.add_argument("--save-interval", type=int)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--load", type=str)
    g.add_argument("--load-tag", type=str)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-load-lr-state", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model-shape arguments (layers, hidden size, heads, FFN, sequence length...) from "
                        "the checkpoint --load resumes, instead of the command line")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--universal-checkpoint", action="store_true")
    g.add_argument("--reset-iteration", action="store_true")
    g.add_argument("--keep-last-n", type=int, metavar="N",
                   help="keep only the newest N global_step<N> checkpoints under --save (never the one 'latest' "
                        "names); default: keep all")
    g.add_argument("--unsafe-checkpoint-load", action="store_true",
                   help="load checkpoint files with full pickle (torch.load weights_only=False) instead of the "
                        "tensor-only loader with an allowlist; only for files you trust (it can run their code)")
    g.add_argument("--verify-checkpoint", action="store_true",
                   help="before loading, check every file's checksum against the checkpoint's manifest (reads "
                        "every file once more); sizes are always checked")
    g.add_argument("--fallback-to-intact-checkpoint", action="store_true",
                   help="if the checkpoint to load is damaged (manifest check), load the newest intact "
                        "global_step<N> instead, with a warning; default: refuse and name it")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*")
    g.add_argument("--data-file-list", type=str)
    g.add_argument("--shuffle-sample-in-corpus", action="store_true")
    g.add_argument("--blend-sample-in-corpus", action="store_true")
    g.add_argument("--split", type=str)
    g.add_argument("--data-cache-path", type=str)
    g.add_argument("--data-impl", choices=["mmap", "infer"])
    g.add_argument("--mmap-warmup", action="store_true", help="refused: pages are read on demand")
    g.add_argument("--num-workers", type=int)
    g.add_argument("--dataloader-type", choices=["single", "cyclic"],
                   help="single: samples in order, each once; cyclic: a new random order of the whole training "
                        "set every epoch (upstream's random sampler; megatron/data/samplers.py)")
    g.add_argument("--tokenizer-type",
                   choices=["BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
                            "GPTSentencePieceTokenizer", "HFTokenizer", "NullTokenizer", "Llama2Tokenizer"])
    g.add_argument("--tokenizer-model", type=str)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--vocab-file", type=str)
    g.add_argument("--merge-file", type=str)
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="document-causal attention: no token attends across an end-of-document token")


def _parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int,
                   help="Megatron tensor parallelism (heads, KV heads and FFN size must divide by it)")
    g.add_argument("--pipeline-model-parallel-size", type=int,
                   help="pipeline stages (DeepSpeed's pipeline engine, 1F1B; ZeRO 0/1 only; ALCF/notes/parallelism.md)")
    g.add_argument("--ds-sequence-parallel-size", type=int,
                   help="DeepSpeed-Ulysses sequence parallelism: each of SP ranks holds seq/SP tokens of the same "
                        "samples; attention all-to-alls to heads/SP heads over the whole sequence (heads, KV heads "
                        "and seq length divisible by SP)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron sequence parallelism: norms and dropout on sequence shards (TP > 1; off at TP = 1)")
    g.add_argument("--no-pipeline-parallel", action="store_true")
    g.add_argument("--zero-stage", type=_int_like,
                   help="ZeRO stage; with one data-parallel replica stages 1 and 2 run as stage 0 (nothing to "
                        "partition) unless --keep-zero-stage")
    g.add_argument("--keep-zero-stage", action="store_true",
                   help="run --zero-stage 1/2 as asked even with one data-parallel replica")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo", "ccl", "xccl", "hccl"],
                   help="default: chosen from the hardware (xccl/ccl on XPU, nccl on CUDA, gloo on CPU)")
    g.add_argument("--distributed-timeout-minutes", type=float,
                   help="a collective that waits longer than this (a rank died or hangs) fails, and the run "
                        "stops with one ERROR line naming the unresponsive rank(s) (fractions allowed: 0.1 = 6 s)")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int)
    g.add_argument("--DDP-impl", choices=["local", "torch"], help="refused: DeepSpeed is the engine")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="ZeRO: overlap the gradient reduction with the backward (DeepSpeed overlap_comm; "
                        "default: the DeepSpeed config's value)")
    g.add_argument("--ddp-bucket-size", type=_int_like,
                   help="ZeRO: elements per gradient-reduction and parameter all-gather bucket (DeepSpeed "
                        "reduce_bucket_size / allgather_bucket_size; default: the DeepSpeed config's value)")
    # DeepSpeed's own config arguments (deepspeed.add_config_arguments), declared here so --help is fast.
    g.add_argument("--deepspeed", action="store_true")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", type=str)
    g.add_argument("--deepspeed_mpi", action="store_true")


def _logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int)
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2])
    g.add_argument("--timing-log-option", choices=["max", "minmax", "all"])
    g.add_argument("--tensorboard-dir", type=str)
    g.add_argument("--tensorboard-log-interval", type=int)
    g.add_argument("--tensorboard-queue-size", type=int)
    for flag in ("--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
                 "--log-optimizer-states-to-tensorboard", "--log-world-size-to-tensorboard"):
        g.add_argument(flag, action="store_true")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="also write the validation perplexity (exp of the loss) to TensorBoard")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="write the memory counters (max over ranks) to TensorBoard (metrics.jsonl always has them)")
    g.add_argument("--log-params-norm", action="store_true",
                   help="params_norm= in the log line: L2 norm of all weights after the step, each element once "
                        "over TP/PP/ZeRO-3 ranks (fp64 sums)")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="num_zeros= in the log line: zero elements of the reduced gradient before the step")
    g.add_argument("--no-log-learnig-rate-to-tensorboard", dest="log_learning_rate_to_tensorboard", action="store_false")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard", action="store_false")
    g.add_argument("--wandb-project", type=str)
    g.add_argument("--wandb-exp-name", type=str)
    g.add_argument("--wandb-save-dir", type=str)
    g.add_argument("--metrics-file", type=str,
                   help="append one JSON line per logged iteration/evaluation (default: <save>/metrics.jsonl)")
    # observability (ALCF/notes/observability.md)
    g.add_argument("--peak-tflops", type=float,
                   help="peak TFLOPS of one device for MFU (default: known accelerator table, else a matmul "
                        "benchmark measured at start-up)")
    g.add_argument("--profile", choices=["pt", "pt-full"],
                   help="torch profiler over --profile_steps; writes a Chrome trace per profiled rank to --trace-dir")
    g.add_argument("--profile_steps", "--profile-steps", dest="profile_steps", type=str,
                   help="first,last iteration to profile (inclusive)")
    g.add_argument("--profile-ranks", type=int, nargs="+", help="ranks that profile")
    g.add_argument("--trace-dir", type=str, help="where profiler traces go")
    g.add_argument("--flops-profiler-step", type=int,
                   help="run DeepSpeed's flops profiler at this optimizer step (rank 0); report in <trace-dir>")


def parse_args(argv: Sequence[str] | None = None, env: dict | None = None) -> argparse.Namespace:
    """Parse (argparse keeps the last occurrence of a flag, so later flags win) and validate."""
    runtime = argparse.Namespace(**RuntimeConfig.defaults())  # declared before the code that sets them runs
    args = build_parser().parse_args(argv, namespace=runtime)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the start-up table shows which flags were given
    validate_args(args, env=os.environ if env is None else env)
    return args


def _problems(args: argparse.Namespace, world_size: int) -> list[str]:
    """Every configuration problem, as one line each naming the fix: the config's own checks
    (megatron/config/, each section's next to its fields), then those that need the file system, the
    world size or another package's knowledge."""
    config = Config.from_args(args)
    errs = config.validate()
    from megatron.data.gpt_dataset import get_split_bounds  # noqa: PLC0415
    try:
        get_split_bounds(args.split, 1)
    except ValueError as e:
        errs.append(f"{e} (SPLIT / --split)")
    if args.save:
        errs.extend(save_dir_problems(args.save))
    errs.extend(compile_problems(args))  # --compile where it cannot work

    tp, pp, sp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.ds_sequence_parallel_size
    model_parallel = tp * pp * sp
    if model_parallel > 0 and world_size % model_parallel:
        errs.append(f"world size {world_size} is not divisible by TP*PP*SP = {tp}*{pp}*{sp} = {model_parallel}; "
                    "change TP/PP/SP or the number of processes")
    elif model_parallel > 0 and args.global_batch_size is not None and args.micro_batch_size:
        dp = world_size // model_parallel
        if args.global_batch_size % (args.micro_batch_size * dp):
            errs.append(f"--global-batch-size ({args.global_batch_size}) must be a multiple of micro-batch-size x "
                        f"data-parallel size = {args.micro_batch_size} x {dp}; set GLOBAL_BATCH accordingly or "
                        "change MICRO_BATCH")

    errs.extend(optimizer_problems(config))  # missing package, unsupported ZeRO stage (megatron/optimizer)
    errs.extend(ds_optimizer_block_problems(args))  # a DeepSpeed config "optimizer" block DeepSpeed would ignore
    errs.extend(parallel_problems(config))  # TP divisibility, sequence parallel, recompute (megatron/core/parallel_config.py)
    errs.extend(pipeline_problems(config))  # PP > 1: ZeRO 0/1 only, refused combinations (megatron/core/pipeline_schedule.py)
    errs.extend(ulysses_problems(config))  # Ulysses SP: heads / seq divisible by SP (core/sequence_parallel.py)
    errs.extend(fp16_problems(config))  # loss-scaling flags and the fp16 block (megatron/fp16.py)
    errs.extend(grad_accum_dtype_problems(args))  # --grad-accum-dtype where DeepSpeed would keep fp32 gradients

    for dest, message in REFUSED_FLAGS.items():  # upstream flags whose promise cannot be kept here
        if vars(args)[dest] not in (None, False):
            errs.append(message)
    return errs


def save_dir_problems(save: str) -> list[str]:
    """--save must be (or be creatable in) a writable directory: refused now, not at the first save."""
    path = os.path.abspath(save)
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor is where the directory gets created
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return [f"--save {save}: {probe} is a file, not a directory; point SAVE / CKPT_DIR / --save elsewhere"]
    read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    if read_only or not os.access(probe, os.W_OK | os.X_OK):
        return [f"--save {save}: {probe} is not writable{' (read-only file system)' if read_only else ''}; "
                "fix its permissions or point SAVE / CKPT_DIR / --save to a writable directory"]
    return []


def compile_problems(args: argparse.Namespace) -> list[str]:
    """--compile is refused where it does not work (yet), one line each naming the fix."""
    if not args.compile:  # None (automatic) or False (--no-compile)
        return []
    import shutil  # noqa: PLC0415

    import torch  # noqa: PLC0415

    errs = []
    if args.zero_stage == 3:
        errs.append("--compile is not supported with ZeRO-3 (its parameter-gathering hooks run inside the "
                    "model's forward); use --zero-stage 1 or 2, or drop --compile")
    if args.recompute_granularity or args.checkpoint_activations:
        errs.append("--compile is not supported with activation recompute yet; drop --compile or the recompute flags")
    if args.pipeline_model_parallel_size > 1:
        errs.append("--compile is not supported with pipeline parallelism (the stages are not compiled); "
                    "drop --compile or use --pipeline-model-parallel-size 1")
    accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if not accelerator and not shutil.which(os.environ.get("CXX") or "g++"):
        errs.append("--compile on CPU needs a C++ compiler for inductor (g++, or set CXX); install one or drop --compile")
    return errs


# Automatic --compile (neither --compile nor --no-compile given): on for CPU runs whose model compute,
# train_iters x model FLOPs per iteration (megatron/observability/mfu.py), is at least this many TFLOP. Measured on
# 2 AVX512-BF16 cores with the 25.6M-parameter benchmark model (157 GFLOP per iteration): compiling
# saves ~12 % of a bf16 step and ~5 % of an fp32 one, and a cold compile (empty inductor cache) costs
# 60-280 s depending on the load; 500 TFLOP is ~3,200 such iterations, where the saving (bf16 ~100 s,
# fp32 ~150 s on an idle machine) covers a cold compile. Test and demo runs are far below it.
AUTO_COMPILE_MIN_TFLOP = 500.0


def auto_compile(args: argparse.Namespace) -> tuple[bool, str]:
    """Whether to compile when neither --compile nor --no-compile was given, and why (for the log).
    Needs the padded vocabulary (after the tokenizer is built). Off where --compile would be refused,
    and where it was not measured: accelerators, fp16, tensor/sequence parallelism."""
    import torch  # noqa: PLC0415

    from megatron.observability.mfu import flops_per_iteration  # noqa: PLC0415

    why_not = []
    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        why_not.append("an accelerator (the rule was measured on CPU)")
    if args.fp16:
        why_not.append("fp16")
    if args.tensor_model_parallel_size > 1 or args.ds_sequence_parallel_size > 1:
        why_not.append("tensor/sequence parallelism")
    if compile_problems(argparse.Namespace(**{**vars(args), "compile": True})):
        why_not.append("a setting --compile does not support")
    if why_not:
        return False, f"off (automatic: {', '.join(why_not)}; --compile to ask for it)"
    tflop = flops_per_iteration(Config.from_args(args)) * args.train_iters / 1e12
    if tflop < AUTO_COMPILE_MIN_TFLOP:
        return False, (f"off (automatic: the run's model compute {tflop:.3g} TFLOP < {AUTO_COMPILE_MIN_TFLOP:g}, "
                       "too short to pay for compiling; --compile to force it)")
    return True, (f"on (automatic: the run's model compute {tflop:.3g} TFLOP >= {AUTO_COMPILE_MIN_TFLOP:g}; "
                  "--no-compile to turn it off)")


def grad_accum_dtype_problems(args: argparse.Namespace) -> list[str]:
    """16-bit gradients (--grad-accum-dtype bf16/fp16) where DeepSpeed would keep fp32 ones anyway:
    with pipeline parallelism (its bf16 optimizer there is `BF16_Optimizer`, fp32 gradient copies) and
    with optimizer offload (ZeRO-Offload accumulates the gradients in fp32 on the CPU)."""
    if args.grad_accum_dtype == "fp32":
        return []
    where = [why for why, hit in (
        ("pipeline parallelism (PP > 1: DeepSpeed's pipeline engine keeps fp32 gradient copies)",
         args.pipeline_model_parallel_size > 1),
        ("optimizer offload (--cpu-optimizer / offload_* in the DeepSpeed config: ZeRO-Offload accumulates "
         "the gradients in fp32)", args.cpu_optimizer or _zero_offload(args.deepspeed_config))) if hit]
    return [f"--grad-accum-dtype {args.grad_accum_dtype} with {why}: the gradients would not be kept in "
            f"{args.grad_accum_dtype}; use --grad-accum-dtype fp32 (the default) or drop that setting"
            for why in where]


def _zero_offload(ds_config_path: str | None) -> bool:
    """True when the DeepSpeed config file offloads the optimizer or the parameters."""
    if not ds_config_path or not os.path.isfile(ds_config_path):
        return False
    try:
        with open(ds_config_path) as f:
            zero = json.load(f).get("zero_optimization") or {}
    except (OSError, ValueError, AttributeError):
        return False  # an unreadable config is reported where it is read (build_ds_config)
    return any(str((zero.get(k) or {}).get("device", "none")).lower() not in ("none", "")
               for k in ("offload_optimizer", "offload_param"))


def single_replica_zero_stage(args: argparse.Namespace) -> None:
    """ZeRO-1/2 with one data-parallel replica partitions nothing, yet DeepSpeed's ZeRO optimizer
    still flattens the gradients into its partition every step: it was 8 % of a step on
    bench/train_throughput.py's model (ZeRO-1 0.935x the HF loop's tokens/s, stage 0 1.02x); with
    megatron/deepspeed_compat's single-replica changes ZeRO-1 / stage 0 is 0.987 in bf16 and
    0.988-1.000 in fp32 (bench/zero_tax.py, bench/README.md). Such runs still use stage 0 (the same
    update, fp32 and bf16; its checkpoints convert to universal as ZeRO ones do): one rule for both
    precisions, no `BF16_Optimizer` fp32 gradient copy in bf16, and the checkpoint layout single-replica
    runs had; the start-up table shows it, and `args.zero_stage_requested` keeps what was asked.

    Kept as asked: --keep-zero-stage, PP > 1, a universal load (DeepSpeed loads those into its ZeRO
    optimizer), bf16 with gradient
    accumulation (DeepSpeed's stage 0 would accumulate the micro-batches' gradients in bf16, ZeRO in
    fp32), fp16 (refused at stage 0: megatron/fp16.py), optimizer or parameter offload (--cpu-optimizer,
    `offload_*` in the DeepSpeed config: ZeRO's), and a resume of a checkpoint written at stage 1 or 2
    (its optimizer state is in ZeRO's files)."""
    if args.zero_stage not in (1, 2) or args.keep_zero_stage or args.universal_checkpoint:
        return
    if args.data_parallel_size * args.ds_sequence_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
        return
    if args.bf16 and args.num_micro_batches > 1:
        return
    if args.fp16:  # DeepSpeed's stage 0 fp16 optimizer is broken (megatron/fp16.py)
        return
    if args.cpu_optimizer or _zero_offload(args.deepspeed_config):  # offloading needs ZeRO's optimizer
        return
    from megatron.checkpoint.checkpointing import saved_zero_stage  # noqa: PLC0415

    if saved_zero_stage(Config.from_args(args).checkpoint) not in (None, 0):
        return
    args.zero_stage_requested, args.zero_stage = args.zero_stage, 0


# Environment variables of upstream's Python side that cannot be honoured: `name -> message`
# (tests/test_flag_audit.py). TORCH_PROFILER_ENABLE, WANDB_DISABLED and DUMP_TOKENS are honoured.
REFUSED_ENV = {
    "DUMP_SKIPPED_ITERS": "DUMP_SKIPPED_ITERS: not supported (it prints the batches of upstream's "
                          "--train-range-to-skip, which does not exist here); unset DUMP_SKIPPED_ITERS",
    "PYINSTRUMENT_PROFILER": "PYINSTRUMENT_PROFILER: not supported; unset it and use TORCH_PROFILER_ENABLE=1 "
                             "(or --profile pt)",
}
_OFF = ("", "0", "false", "no", "off")


def env_problems(env) -> list[str]:
    errs = [msg for name, msg in REFUSED_ENV.items() if env.get(name, "").strip().lower() not in _OFF]
    tpe = env.get("TORCH_PROFILER_ENABLE", "").strip()
    if tpe not in ("", "0", "1", "2"):
        errs.append(f"TORCH_PROFILER_ENABLE={tpe!r}: use 1 (profile the whole run), 2 (the --profile_steps "
                    "window) or 0")
    return errs


def apply_profiler_env(args: argparse.Namespace, env) -> None:
    """TORCH_PROFILER_ENABLE (upstream): 1 = torch profiler over the whole run, 2 = over --profile_steps;
    the same profiler as --profile pt, which wins when given."""
    tpe = env.get("TORCH_PROFILER_ENABLE", "").strip()
    if tpe in ("1", "2") and args.profile is None:
        args.profile = "pt"
        if tpe == "1":
            args.profile_steps = f"1,{args.train_iters}"


# Model-shape arguments --use-checkpoint-args takes from the checkpoint (upstream's list, as recorded here).
CHECKPOINT_MODEL_ARGS = ("seq_length", "max_position_embeddings", "layernorm_epsilon", "rope_theta", "rotary_percent",
                         "make_vocab_size_divisible_by")


def apply_checkpoint_args(args: argparse.Namespace) -> list[str]:
    """--use-checkpoint-args: set the model-shape arguments to those saved with the checkpoint --load
    resumes (they replace the command line's). Returns problems."""
    if not (args.use_checkpoint_args and args.load):
        return []
    from megatron.checkpoint.checkpointing import ARCH_FIELDS, read_saved_args, read_tag  # noqa: PLC0415

    tag = (args.load_tag or read_tag(args.load, bool(args.universal_checkpoint))) if os.path.isdir(args.load) else None
    saved = read_saved_args(os.path.join(args.load, tag)) if tag else None
    if not saved:
        return [f"--use-checkpoint-args: no checkpoint with saved arguments in {args.load} (tag {tag}); check "
                "LOAD / --load, or drop the flag and give the model flags"]
    args.checkpoint_args_used = {}
    for k in ARCH_FIELDS + CHECKPOINT_MODEL_ARGS:
        if saved.get(k) is not None:
            if vars(args)[k] != saved[k]:
                args.checkpoint_args_used[k] = saved[k]
            setattr(args, k, saved[k])
    return []


# Registry names that DeepSpeed builds from an "optimizer" block of the DeepSpeed config -> that block's type.
DS_BLOCK_TYPES = {"ds.adamw": "adamw", "ds.onebitlamb": "onebitlamb"}


def ds_optimizer_block_problems(args: argparse.Namespace) -> list[str]:
    """An "optimizer" block in the DeepSpeed config must be the one --optimizer builds: DeepSpeed silently
    ignores the block when given a client optimizer (every other registry name)."""
    path = args.deepspeed_config
    if not path or not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            block = json.load(f).get("optimizer")
    except (OSError, ValueError, AttributeError):
        return []  # an unreadable config is reported where it is read
    if not block:
        return []
    kind = str(block.get("type", "")).lower()
    want = DS_BLOCK_TYPES.get(args.optimizer)
    if want == kind:
        return []
    alt = [n for n, t in DS_BLOCK_TYPES.items() if t == kind]
    fix = f"use --optimizer {alt[0]} (OPT={alt[0]}) or remove the block" if alt else "remove the block"
    builds = f"builds DeepSpeed's {want}" if want else "builds its own optimizer and DeepSpeed would ignore the block"
    return [f"--deepspeed_config {path} has an \"optimizer\" block of type {block.get('type')!r}, but --optimizer "
            f"{args.optimizer} {builds}: {fix}"]


def validate_args(args: argparse.Namespace, env=os.environ) -> argparse.Namespace:
    """Check the configuration and fill derived fields. Raises ArgumentError listing all problems."""
    world_size = world_size_from_env(env)  # the launcher's own count (megatron/launch_env.py)
    args.world_size = world_size
    errs = apply_checkpoint_args(args) + env_problems(env) + _problems(args, world_size)
    if errs:
        raise ArgumentError("\n".join(errs))

    mp = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.ds_sequence_parallel_size
    args.data_parallel_size = world_size // mp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    replicas = args.data_parallel_size * args.ds_sequence_parallel_size
    if args.bf16 and args.zero_stage == 0 and args.pipeline_model_parallel_size == 1 and (
            replicas > 1 or args.num_micro_batches > 1) and args.grad_accum_dtype == "fp32":
        raise ArgumentError(
            f"--bf16 at --zero-stage 0 with {replicas} data-parallel replica(s) and {args.num_micro_batches} "
            "micro-batch(es) per step: DeepSpeed's stage 0 bf16 optimizer sums the gradients of micro-batches and "
            "ranks in bf16 (3 significant digits); use --zero-stage 1 (fp32 gradient accumulation, the launcher's "
            "default), or --grad-accum-dtype bf16 if 16-bit sums are what you want")
    if args.train_iters is None:
        args.train_iters = args.train_samples // args.global_batch_size
    apply_profiler_env(args, env)
    from megatron.resilience.allocator import allocator_problems  # noqa: PLC0415

    problems = allocator_problems(args.allocator, args.malloc_mmap_threshold, bool(args.check_args))
    if problems:
        raise ArgumentError("\n".join(problems))
    if args.malloc_mmap_threshold and env.get("MALLOC_MMAP_THRESHOLD_"):  # glibc read the variable at start
        raise ArgumentError(
            f"--malloc-mmap-threshold {args.malloc_mmap_threshold} with MALLOC_MMAP_THRESHOLD_="
            f"{env['MALLOC_MMAP_THRESHOLD_']} in the environment, which glibc already applied: keep one of the two")
    if args.num_key_value_heads is None:
        args.num_key_value_heads = args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = (int(8 * args.hidden_size / 3 / 64) * 64) if args.swiglu else 4 * args.hidden_size
    args.use_flash_attn = any(vars(args)[f] for f in FLASH_ATTN_FLAGS)
    # sequence parallel off at TP=1; recompute granularity / chunk
    vars(args).update(derived_parallel_fields(Config.from_args(args)))
    if args.weight_decay_incr_style == "constant":
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    elif args.start_weight_decay is None or args.end_weight_decay is None:
        raise ArgumentError("--start-weight-decay and --end-weight-decay are required when "
                            f"--weight-decay-incr-style is {args.weight_decay_incr_style}")
    args.params_dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    if args.lr_finder:  # outputs to {save}/lr_finder/, no checkpoint, no evaluation
        errs, changes = configure_lr_finder(Config.from_args(args))
        if errs:
            raise ArgumentError("\n".join(errs))
        vars(args).update(changes)
    if args.save is not None and args.save_interval is None:
        args.save_interval = args.train_iters  # save at the end only
    if args.metrics_file is None and args.save is not None:
        args.metrics_file = os.path.join(args.save, "metrics.jsonl")
    if args.tensorboard_dir is None and args.save is not None:
        args.tensorboard_dir = os.path.join(args.save, "tensorboard")
    try:  # the LR schedule is checked now, not after DeepSpeed has started
        build_schedule_spec(Config.from_args(args))
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    from megatron.checkpoint.checkpointing import check_checkpoint_files, load_problems  # noqa: PLC0415  (before DeepSpeed)

    # sizes vs the manifest; may pick the intact tag (--fallback-to-intact-checkpoint: load_tag, checkpoint_fallback)
    load_errs, changes = check_checkpoint_files(Config.from_args(args).checkpoint)
    if load_errs:
        raise ArgumentError("\n".join(load_errs))
    vars(args).update(changes)
    single_replica_zero_stage(args)
    load_errs = load_problems(Config.from_args(args))
    if load_errs:
        raise ArgumentError("\n".join(load_errs))
    return args
