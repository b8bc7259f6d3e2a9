"""Start-up checks that read files (tokenizer, data list, `.bin`/`.idx` headers, token ids vs the
vocabulary), run before anything is written or started.

`pretrain_gpt.py --check-args` runs `parse_args` (the configuration checks of
megatron/arguments.py, including `--load` and `--save`) and then `preflight_problems`, prints one
``ERROR:`` line per problem and exits 2, or prints ``OK`` and exits 0. No process group, no
DeepSpeed, no index building: the launcher (ALCF/helpers.sh) runs it before it creates the run's
directories, so a bad data file or tokenizer path leaves nothing behind.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from megatron.config import Config, DataConfig, ModelConfig, ParallelConfig, RuntimeConfig
from megatron.errors import ArgumentError
from megatron.data.data_list import DataListError, DataSource, parse_data_file_list, validate_sources

log = logging.getLogger(__name__)


def tokenizer_vocab(config: Config) -> tuple[int | None, list[str]]:
    """(padded vocabulary size or None, problems) of the configured tokenizer."""
    from megatron.tokenizer import run_tokenizer  # noqa: PLC0415

    data = config.data
    try:
        return run_tokenizer(config)[1], []
    except ArgumentError as e:  # no tokenizer at all
        return None, [str(e)]
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # sentencepiece raises RuntimeError on a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        ttype = data.tokenizer_type or "NullTokenizer"
        return None, [f"tokenizer {ttype} ({data.tokenizer_model}): {first}; check TOKENIZER_MODEL / --tokenizer-model"]


def data_sources(data: DataConfig) -> list[DataSource]:
    """The datasets of --data-file-list or --data-path (DataListError if the list is unusable)."""
    if data.data_file_list:
        return parse_data_file_list(data.data_file_list)
    dp = data.data_path
    if len(dp) % 2 and len(dp) > 1:
        raise DataListError(f"--data-path: expected 'prefix' or 'weight prefix weight prefix ...', got {' '.join(dp)!r}")
    try:
        pairs = [(1.0, dp[0])] if len(dp) == 1 else [(float(dp[i]), dp[i + 1]) for i in range(0, len(dp), 2)]
    except ValueError:
        raise DataListError(f"--data-path: weights must be numbers, got {' '.join(dp)!r}") from None
    return [DataSource(w, p[:-4] if p.endswith(".bin") else p, os.path.basename(p)) for w, p in pairs]


def data_problems(data: DataConfig, vocab_size: int | None) -> list[str]:
    """Unreadable list, missing files, bad `.idx`/`.bin` (magic, version, truncation), token ids >= vocab."""
    from megatron.data.blendable_dataset import check_data_vocab  # noqa: PLC0415
    from megatron.data.indexed_dataset import IndexedDataset  # noqa: PLC0415

    try:
        sources = data_sources(data)
        validate_sources(sources)
    except DataListError as e:
        return [str(e)]
    errs = []
    prefixes = list(dict.fromkeys(s.prefix for s in sources))
    for prefix in prefixes:
        try:
            IndexedDataset(prefix)
        except (ValueError, OSError) as e:
            errs.append(f"{e} (rebuild it with tools/preprocess_data.py, or remove it from the data list)")
    if not errs and vocab_size:
        try:
            check_data_vocab(prefixes, vocab_size)
        except ValueError as e:
            errs.append(str(e))
    return errs


def preflight_problems(config: Config) -> list[str]:
    """Every problem found by reading the tokenizer and the data (after `parse_args` succeeded)."""
    vocab, errs = tokenizer_vocab(config)
    errs += data_problems(config.data, vocab)
    mem_errs, warnings, _est = memory_problems(config, vocab)
    for w in warnings:
        print(f"WARNING: {w}", flush=True)
    return errs + mem_errs


# ----------------------------------------------------------------------------- memory
GIB = 2**30
RUNTIME_BYTES = int(0.3 * GIB)  # a rank's Python + torch + DeepSpeed + process group before any model (measured 0.26 GiB)
NEAR_FRACTION = 0.85  # above this share of the limit: a warning
OOM_EXIT_CODE = 6
FIXES = "ZeRO-3, activation recompute, a smaller micro-batch, more ranks, a smaller model"


@dataclass
class MemoryEstimate:
    """Peak bytes per rank, by part (see `estimate_memory`)."""
    weights: float
    grads: float
    optimizer: float  # optimizer states + fp32 master copies
    activations: float
    runtime: float = RUNTIME_BYTES
    notes: str = ""

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.runtime

    def describe(self) -> str:
        return (f"{self.total / GIB:.2f} GiB per rank (weights {self.weights / GIB:.2f}, gradients "
                f"{self.grads / GIB:.2f}, optimizer {self.optimizer / GIB:.2f}, activations "
                f"{self.activations / GIB:.2f}, runtime {self.runtime / GIB:.2f}; {self.notes})")


def parameters_per_rank(model: ModelConfig, parallel: ParallelConfig, vocab: int) -> int:
    """Parameters one rank holds (TP splits matrices and the vocabulary, PP the layers; the first
    pipeline stage, which also holds the embedding, is the largest)."""
    h, tp = model.hidden_size, parallel.tensor_model_parallel_size
    heads, kv = model.num_attention_heads, model.num_key_value_heads or model.num_attention_heads
    d = model.kv_channels or h // heads
    ffn = model.ffn_hidden_size
    bias = bool(model.add_bias_linear)
    attn = h * (heads + 2 * kv) * d + heads * d * h + (bias * ((heads + 2 * kv) * d + h))
    mlp = h * ffn * (3 if model.swiglu else 2) + bias * (ffn * (2 if model.swiglu else 1) + h)
    norms = 2 * h * (2 if model.normalization == "layernorm" else 1)  # LayerNorm: weight and bias
    layers = -(-model.num_layers // parallel.pipeline_model_parallel_size)
    embed = vocab * h * (2 if model.untie_embeddings_and_output_weights else 1)
    if not model.use_rotary_position_embeddings:
        embed += model.max_position_embeddings * h * tp  # replicated, not split
    return int(layers * ((attn + mlp) / tp + norms) + embed / tp + h)


def on_cpu() -> bool:
    import torch  # noqa: PLC0415

    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def _half(config: Config) -> bool:
    return bool(config.precision.bf16 or config.precision.fp16)


def activation_bytes(config: Config, vocab: int, cpu: bool = True) -> float:
    """Activations one micro-batch keeps for the backward (summed over the layers of a pipeline stage,
    times the micro-batches 1F1B keeps in flight), plus the logits and the loss's float32 copies."""
    model, par = config.model, config.parallel
    e = 2 if _half(config) else 4
    tp, sp, pp = par.tensor_model_parallel_size, par.ds_sequence_parallel_size, par.pipeline_model_parallel_size
    s, b = model.seq_length // sp, config.training.micro_batch_size
    t = s * b  # tokens of one micro-batch on this rank
    h, ffn = model.hidden_size, model.ffn_hidden_size
    heads, kv = model.num_attention_heads, model.num_key_value_heads or model.num_attention_heads
    d = model.kv_channels or h // heads
    seq_par = tp if par.sequence_parallel else 1
    # per layer: norm inputs/outputs and residuals (h-wide, split by sequence parallelism), q/k/v and
    # rotated q/k, the attention output (split by TP), the MLP's gate/up/act/product (split by TP)
    per_layer = t * (5 * h / seq_par + (2 * heads + 3 * kv) * d / tp + h / tp + ffn * (4 if model.swiglu else 2) / tp)
    if _half(config) and cpu:  # explicit attention keeps the s x s probabilities
        per_layer += b * (heads / tp) * s * s * sp  # (Ulysses: whole sequence, heads / SP)
    layers = -(-model.num_layers // pp)
    full = config.training.recompute_granularity == "full"
    stored = layers * t * h / seq_par + per_layer if full else layers * per_layer  # full: layer inputs + one layer
    in_flight = min(pp, config.runtime.num_micro_batches) if pp > 1 else 1
    logits = t * vocab / tp * (e + 3 * 4)  # logits, their float32 copy, log-softmax and its gradient
    return stored * e * in_flight + logits


def estimate_memory(config: Config, vocab: int, optimizer_copies: float | None = None, cpu: bool | None = None
                    ) -> MemoryEstimate:
    """Peak memory of one rank: weights, gradients, optimizer state and fp32 masters by ZeRO stage and
    precision, activations by micro-batch, sequence, recompute and TP/SP/PP, plus the runtime."""
    if optimizer_copies is None:
        from megatron.optimizer import get_entry  # noqa: PLC0415

        optimizer_copies = get_entry(config.optimizer.optimizer).state_copies
    p = parameters_per_rank(config.model, config.parallel, vocab)
    half = _half(config)
    w = 2 if half else 4
    stage = config.parallel.zero_stage
    dp = max(1, config.runtime.data_parallel_size * config.parallel.ds_sequence_parallel_size)  # ZeRO: DP x SP
    states = optimizer_copies * 4 * p
    # float32 master weights: bf16 always; fp32 at ZeRO 1-3 too (ZeRO keeps a float32 copy of its partition)
    master = 4 * p if (half or stage > 0) else 0
    # the float32 gradient partition the optimizer steps on: with bf16 weights, and at ZeRO-3 (at ZeRO-1/2
    # in fp32 the gradients are moved into it, not copied: measured, bench/memory_preflight.py)
    fp32_grads = 4 * p if (half or stage == 3) else 0
    part = dp if stage >= 1 else 1
    weights = w * p / (dp if stage == 3 else 1)
    if stage == 3:  # the layers being computed are gathered whole, up to stage3_max_live_parameters (1e9)
        weights += w * min(p, 1e9)
    grads = w * p / (dp if stage >= 2 else 1)
    optimizer = (states + master + fp32_grads) / part
    prec, training = config.precision, config.training
    notes = (f"{p / 1e6:.0f}M parameters per rank, {'bf16' if prec.bf16 else 'fp16' if prec.fp16 else 'fp32'}, "
             f"ZeRO-{stage} over {dp} rank(s), {config.optimizer.optimizer} ({optimizer_copies:g} state copies), "
             f"micro-batch {training.micro_batch_size} x {config.model.seq_length} tokens, recompute "
             f"{training.recompute_granularity or 'off'}")
    cpu = on_cpu() if cpu is None else cpu
    return MemoryEstimate(weights, grads, optimizer, activation_bytes(config, vocab, cpu), notes=notes)


def process_rss() -> int:
    """Resident memory of this process now (bytes; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def local_ranks(env=os.environ, world_size: int = 1) -> int:
    """Ranks sharing this node's memory (host RAM on CPU)."""
    for var in ("LOCAL_WORLD_SIZE", "PALS_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                "SLURM_NTASKS_PER_NODE"):
        if env.get(var, "").isdigit() and int(env[var]) > 0:
            return int(env[var])
    return max(1, world_size)


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_memory_limit(runtime: RuntimeConfig, env=os.environ) -> tuple[int | None, str]:
    """(bytes one rank may use, where the number comes from). Accelerators: the free memory of this
    rank's device (torch.cuda / torch.xpu mem_get_info); CPU: host MemAvailable / ranks on the node."""
    import torch  # noqa: PLC0415

    local = int(env.get("LOCAL_RANK") or 0)
    for name in ("cuda", "xpu"):
        mod = getattr(torch, name, None)
        if mod is not None and mod.is_available() and hasattr(mod, "mem_get_info"):
            free, _total = mod.mem_get_info(local % max(1, mod.device_count()))
            return int(free), f"free memory of {name}:{local % max(1, mod.device_count())}"
    avail = meminfo_available()
    if avail is None:
        return None, "unknown"
    n = local_ranks(env, runtime.world_size)
    return avail // n, f"host MemAvailable {avail / GIB:.1f} GiB / {n} rank(s) on this node"


def _fixes(config: Config, vocab: int, limit: float, copies: float) -> list[str]:
    """The cheapest changes that bring the estimate under the limit, in the order users try them."""
    tried = []

    def fits(label: str, **changes) -> None:
        est = estimate_memory(config.replace(**changes), vocab, copies)
        if est.total <= limit:
            tried.append(f"{label} ({est.total / GIB:.1f} GiB)")

    par, training, dp = config.parallel, config.training, config.runtime.data_parallel_size
    if par.zero_stage < 3 and par.pipeline_model_parallel_size == 1:
        fits("ZERO_STAGE=3 (--zero-stage 3)", zero_stage=3)
    if training.recompute_granularity != "full":
        fits("USE_ACTIVATION_CHECKPOINTING=1 (--recompute-granularity full)", recompute_granularity="full")
    if training.micro_batch_size > 1:
        fits("MICRO_BATCH=1 (--micro-batch-size 1, GRAD_ACC_STEPS up to keep the global batch)", micro_batch_size=1)
    for k in (2, 4, 8):
        fits(f"{k}x the ranks on more nodes (data parallel {dp * k}) with ZeRO-3",
             data_parallel_size=dp * k, zero_stage=3)
        if len(tried) and tried[-1].startswith(f"{k}x"):
            break
    return tried or ["a smaller model (MODEL_ARCH / --num-layers / --hidden-size)"]


def memory_problems(config: Config, vocab: int | None, env=os.environ, limit: tuple[int | None, str] | None = None
                    ) -> tuple[list[str], list[str], MemoryEstimate | None]:
    """(problems, warnings, estimate) of the memory check; ([], [], None) when it cannot be made."""
    if vocab is None or config.training.skip_memory_check:
        return [], [], None
    from megatron.optimizer import get_entry  # noqa: PLC0415

    try:
        copies = get_entry(config.optimizer.optimizer).state_copies
    except ValueError:
        return [], [], None
    est = estimate_memory(config, vocab, copies)
    cap, source = limit or device_memory_limit(config.runtime, env)
    if cap is None:
        return [], [], est
    if est.total > cap:
        fixes = "; ".join(_fixes(config, vocab, cap, copies))
        return [f"not enough memory: the estimate is {est.describe()}, above the {cap / GIB:.1f} GiB available "
                f"({source}); cheapest fixes: {fixes}; or --skip-memory-check to try anyway"], [], est
    if est.total > NEAR_FRACTION * cap:
        return [], [f"memory is tight: the estimate is {est.total / GIB:.1f} GiB per rank, "
                    f"{100 * est.total / cap:.0f}% of the {cap / GIB:.1f} GiB available ({source})"], est
    return [], [], est


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: torch.OutOfMemoryError (CUDA), XPU's and the CPU allocator's RuntimeError."""
    import torch  # noqa: PLC0415

    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(e)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def oom_message(e: BaseException, rank: int, estimate: str | None) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    est = f"the memory estimate was {estimate}" if estimate else "no memory estimate was made"
    return (f"rank {rank} ran out of memory ({first}); {est}; cheapest fixes: {FIXES} "
            "(ALCF/notes/reliability.md, 'Memory')")


def check_memory(config: Config) -> str | None:
    """Refuse (ArgumentError) a configuration whose memory estimate exceeds what this rank has; warn
    near it. Returns the estimate's description (None if none was made), which the caller keeps as
    `memory_estimate` for the out-of-memory message."""
    import torch.distributed as dist  # noqa: PLC0415  (this module stays light for --check-args)

    from megatron.core.parallel_state import all_reduce_values  # noqa: PLC0415

    rank = config.runtime.rank
    problems, warnings, est = memory_problems(config, config.runtime.padded_vocab_size)
    if dist.is_initialized():  # one rank short of memory stops them all
        (refused,) = all_reduce_values([float(bool(problems))], op=dist.ReduceOp.MAX)
        if refused and not problems:
            problems = ["another rank has not enough memory for this configuration (see rank 0's line, or "
                        "MEGATRON_LOG_ALL_RANKS=1)"]
    if est and rank == 0:
        log.info("memory estimate: %s; this process uses %.2f GiB now", est.describe(), process_rss() / 2**30)
    for w in warnings:
        if rank == 0:
            log.warning("%s", w)
            print(f"WARNING: {w}", flush=True)
    if problems:
        raise ArgumentError("\n".join(problems))
    return est.describe() if est else None
