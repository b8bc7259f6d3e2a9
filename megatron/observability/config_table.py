"""The resolved configuration, printed once at start-up as a table, with where each value came from.

Sources: `flag` (on the command line), `env NAME` (the launcher turned the environment variable
NAME, which the user set, into the flag: the launcher does not export its own defaults, so a
variable present in the trainer's environment with the same value was set by the user),
`default` (nothing set it) or `derived` (computed from other values). Warnings follow the
table for settings that are legal but probably not what the user meant.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

from megatron.config import Config

ZERO3_KEYS = ("sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
              "stage3_prefetch_bucket_size")

# dest -> the launcher's environment variables that set it (upstream-spec §2.4/§2.5; aliases included)
ENV_FOR_DEST: dict[str, tuple[str, ...]] = {
    "lr": ("LR",), "min_lr": ("MIN_LR",), "lr_decay_style": ("LR_DECAY_STYLE",),
    "lr_warmup_fraction": ("LR_WARMUP_FRAC", "LR_WARMUP_FRACTION"), "lr_decay_iters": ("LR_DECAY_ITERS",),
    "optimizer": ("OPT", "OPTIMIZER", "OPTIM"), "weight_decay": ("WEIGHT_DECAY",), "adam_beta1": ("ADAM_BETA1",),
    "adam_beta2": ("ADAM_BETA2",), "adam_eps": ("ADAM_EPS",), "clip_grad": ("CLIP_GRAD",),
    "seq_length": ("SEQ", "SEQ_LEN"), "num_attention_heads": ("HEADS", "NHEADS"),
    "num_layers": ("NLAYERS", "NUM_LAYERS"), "hidden_size": ("HIDDEN",), "num_key_value_heads": ("NUM_KV_HEAD",),
    "ffn_hidden_size": ("FFN_HIDDEN_SIZE",), "rope_theta": ("ROPE_THETA",), "init_method_std": ("INIT_METHOD_STD",),
    "tensor_model_parallel_size": ("TP",), "pipeline_model_parallel_size": ("PP",),
    "ds_sequence_parallel_size": ("SP",), "zero_stage": ("ZERO_STAGE",), "micro_batch_size": ("MICRO_BATCH",),
    "global_batch_size": ("GLOBAL_BATCH",), "train_iters": ("TRAIN_ITERS", "TRAIN_ITER", "TRAIN_TOKENS"),
    "log_interval": ("LOG_INTERVAL",), "eval_interval": ("EVAL_INTERVAL",), "eval_iters": ("EVAL_ITERS",),
    "save_interval": ("SAVE_INTERVAL",), "timing_log_level": ("TIMING_LOG_LEVEL",),
    "data_file_list": ("DATA_FILE_LIST",), "tokenizer_type": ("TOKENIZER_TYPE",),
    "tokenizer_model": ("TOKENIZER_MODEL",), "grad_accum_dtype": ("GRAD_ACCUM_DTYPE",), "load": ("LOAD",), "save": ("SAVE", "CKPT_DIR"),
}
DERIVED = {"data_parallel_size", "num_micro_batches", "padded_vocab_size", "world_size"}
TINY_TOKENS_PER_STEP = 8192


def _known(value):
    """A value set at start-up, or '?' where the table is printed before it is known."""
    return "?" if value is None else value


def flag_dests(argv: list[str], parser: argparse.ArgumentParser) -> set[str]:
    """The argparse destinations that `argv` sets."""
    out = set()
    for tok in argv:
        if tok.startswith("-"):
            action = parser._option_string_actions.get(tok.split("=", 1)[0])  # noqa: SLF001
            if action is not None:
                out.add(action.dest)
    return out


def _same(env_value: str, value) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(env_value), float(value), rel_tol=1e-9)
        except ValueError:
            return False
    return str(env_value) == str(value) or os.path.abspath(env_value) == os.path.abspath(str(value))


def source_of(dest: str, value, flags: set[str], env) -> str:
    if dest in DERIVED:
        return "derived"
    for name in ENV_FOR_DEST.get(dest, ()):
        v = env.get(name)
        if v and (name == "TRAIN_TOKENS" or _same(v, value)):
            return f"env {name}"
    if dest in flags:
        return "flag"
    return "default"


@dataclass
class Row:
    section: str
    name: str
    value: str
    source: str


def config_rows(config: Config, num_params: int | None, parser: argparse.ArgumentParser | None = None,
                env=os.environ) -> list[Row]:
    """The table's rows, by upstream argument name. `config.runtime.argv` (kept by parse_args) tells which
    flags were given."""
    if parser is None:
        from megatron.arguments import build_parser  # noqa: PLC0415

        parser = build_parser()
    flags = flag_dests(list(config.runtime.argv or []), parser)
    rows: list[Row] = []
    flat = vars(config.to_args())

    def add(section: str, name: str, dest: str | None, text=None) -> None:
        value = flat[dest] if dest else None
        rows.append(Row(section, name, str(value if text is None else text),
                        source_of(dest, value, flags, env) if dest else "derived"))

    tokens_per_step = config.training.global_batch_size * config.model.seq_length
    if num_params is not None:
        add("model", "parameters", None, f"{num_params / 1e6:,.2f}M")
    add("model", "layers", "num_layers")
    add("model", "hidden size", "hidden_size")
    add("model", "attention heads", "num_attention_heads")
    add("model", "key-value heads", "num_key_value_heads")
    add("model", "ffn hidden size", "ffn_hidden_size")
    add("model", "sequence length", "seq_length")
    add("model", "vocabulary (padded)", "padded_vocab_size",
        f"{_known(config.runtime.padded_vocab_size)} (tokenizer {_known(config.runtime.vocab_size_orig)})")
    add("model", "dtype", "fp16" if config.precision.fp16 else "bf16", config.runtime.params_dtype)
    if config.precision.bf16 or config.precision.fp16:
        grads = config.precision.grad_accum_dtype
        add("model", "gradients kept in", "grad_accum_dtype", f"{grads} (accumulated and averaged across ranks in "
            f"{grads}" + ("; --grad-accum-dtype for 16-bit)" if grads == "fp32" else ", 2 bytes/parameter)"))
    if config.precision.fp16:
        from megatron.fp16 import describe  # noqa: PLC0415

        add("model", "loss scaling", None, describe(config))  # flags > the DeepSpeed config > its defaults
    add("parallel", "world size", "world_size")
    add("parallel", "TP / PP / SP", "tensor_model_parallel_size",
        f"{flat['tensor_model_parallel_size']} / {flat['pipeline_model_parallel_size']} / "
        f"{flat['ds_sequence_parallel_size']}")
    add("parallel", "data parallel", "data_parallel_size")
    asked = config.runtime.zero_stage_requested
    add("parallel", "ZeRO stage", "zero_stage",
        None if asked is None else f"0 (asked {asked}: one data-parallel replica, nothing to partition)")
    if config.parallel.zero_stage == 3:
        from megatron.checkpoint.checks import saved_sub_group_size  # noqa: PLC0415
        from megatron.deepspeed_config import build_ds_config, zero3_fetch_by_layer, zero3_memory_settings  # noqa: PLC0415

        chosen, used = zero3_memory_settings(config), build_ds_config(config)["zero_optimization"]
        resumed = saved_sub_group_size(config.checkpoint)

        def source(k):
            if chosen.get(k) != used[k]:
                return " (the DeepSpeed config)"
            return " (the checkpoint's)" if k == "sub_group_size" and resumed is not None else ""

        text = ", ".join(f"{k} {used[k]:.3g}{source(k)}" for k in ZERO3_KEYS if k in used)
        add("parallel", "ZeRO-3 memory", None, (text or "DeepSpeed's defaults") +
            ("; by model size: an eighth of the parameters (DeepSpeed's defaults 1e9, 1e9, 1e9, 5e7)"
             if "stage3_max_live_parameters" in chosen else ""))
        add("parallel", "ZeRO-3 fetch", None,
            "a transformer layer at a time (the model fits the live and reuse limits: it stays gathered)"
            if zero3_fetch_by_layer(config, used) else "a module at a time (DeepSpeed's; the live limit releases)")
    add("parallel", "C allocator", "malloc_mmap_threshold",
        config.runtime.malloc_setting or f"mmap threshold {flat['malloc_mmap_threshold']} bytes")
    add("batch", "micro batch", "micro_batch_size")
    add("batch", "gradient accumulation", "num_micro_batches")
    add("batch", "global batch", "global_batch_size",
        f"{flat['global_batch_size']} = {flat['micro_batch_size']} x {flat['num_micro_batches']} x "
        f"{flat['data_parallel_size']}")
    add("batch", "tokens per step", None, f"{tokens_per_step:,}")
    add("schedule", "train iterations", "train_iters")
    add("schedule", "train tokens", None, f"{config.training.train_iters * tokens_per_step:,}")
    add("schedule", "optimizer", "optimizer")
    add("schedule", "learning rate", "lr")
    add("schedule", "min learning rate", "min_lr")
    add("schedule", "LR schedule", "lr_decay_style")
    if config.schedule.lr_warmup_fraction is not None:
        add("schedule", "warmup fraction", "lr_warmup_fraction")
    else:
        add("schedule", "warmup iterations", "lr_warmup_iters")
    add("schedule", "weight decay", "weight_decay")
    add("schedule", "gradient clipping", "clip_grad")
    add("data", "data list", "data_file_list" if config.data.data_file_list else "data_path")
    add("data", "split", "split")
    add("data", "tokenizer", "tokenizer_type")
    add("output", "save", "save")
    add("output", "load", "load")
    add("output", "log interval", "log_interval")
    add("output", "eval interval / iters", "eval_interval", f"{flat['eval_interval']} / {flat['eval_iters']}")
    add("output", "tensorboard", "tensorboard_dir")
    add("output", "metrics", "metrics_file")
    return rows


def warmup_iterations(config: Config) -> float:
    """Warmup length in iterations (the fraction applies to the decay span, as in the scheduler)."""
    sched, gbs = config.schedule, config.training.global_batch_size
    if sched.lr_warmup_fraction is not None:
        return sched.lr_warmup_fraction * (sched.lr_decay_iters or config.training.train_iters)
    if sched.lr_warmup_samples:
        return sched.lr_warmup_samples / gbs
    if sched.lr_warmup_tokens:
        return sched.lr_warmup_tokens / (gbs * config.model.seq_length)
    return float(sched.lr_warmup_iters or 0)


def config_warnings(config: Config) -> list[str]:
    """Legal settings that are probably mistakes, one line each naming the fix."""
    out = []
    training, seq = config.training, config.model.seq_length
    iters, decay_iters, log_interval = training.train_iters, config.schedule.lr_decay_iters, config.logging.log_interval
    w = warmup_iterations(config)
    if w >= iters:
        out.append(f"the LR warmup ({w:g} iterations) is not shorter than the run ({iters} iterations): "
                   "the LR never reaches --lr; shorten the warmup (LR_WARMUP_FRAC / --lr-warmup-iters)")
    tokens = training.global_batch_size * seq
    if tokens < TINY_TOKENS_PER_STEP:
        out.append(f"{tokens:,} tokens per optimizer step (GBS {training.global_batch_size} x seq {seq}) is "
                   "tiny for pretraining (usually 0.5M-4M): fine for a smoke test; raise GLOBAL_BATCH otherwise")
    if log_interval > iters:
        out.append(f"--log-interval ({log_interval}) > --train-iters ({iters}): only the last "
                   "iteration is logged; lower LOG_INTERVAL")
    if decay_iters and decay_iters < iters:
        out.append(f"--lr-decay-iters ({decay_iters}) < --train-iters ({iters}): the last "
                   f"{iters - decay_iters} iterations run at the final LR")
    if training.eval_iters and training.eval_interval and training.eval_interval > iters:
        out.append(f"--eval-interval ({training.eval_interval}) > --train-iters ({iters}): validation runs "
                   "only at the end")
    return out


def format_table(rows: list[Row]) -> str:
    w1 = max(len(f"{r.section}: {r.name}") for r in rows)
    w2 = max(len(r.value) for r in rows)
    lines = [f"{'setting'.ljust(w1)}  {'value'.ljust(w2)}  source", "-" * (w1 + w2 + 10)]
    lines += [f"{(r.section + ': ' + r.name).ljust(w1)}  {r.value.ljust(w2)}  {r.source}" for r in rows]
    return "\n".join(lines)


def print_config(config: Config, num_params: int | None = None) -> None:
    """Rank 0: the table and the warnings (stdout, once)."""
    if config.runtime.rank != 0:
        return
    print("> configuration:\n" + format_table(config_rows(config, num_params)), flush=True)
    for w in config_warnings(config):
        print(f"WARNING: {w}", flush=True)
