"""pretrain(): set-up, then the train / evaluate loop under DeepSpeed.

Read it top to bottom: `pretrain` builds everything (in the order the checks need: arguments
were validated before this runs), then `train` runs iterations. Logging, checkpointing and
evaluation are small components the loop calls, not branches spread through it.
"""
from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

from megatron.checkpoint import checkpointing
from megatron.config import Config, DataConfig
from megatron.arguments import auto_compile
from megatron.core import parallel_state
from megatron.deepspeed_config import build_ds_config, zero3_fetch_by_layer
from megatron.core import sequence_parallel as ulysses
from megatron.data.gpt_dataset import document_attention_mask, reset_position_ids
from megatron.data.loading import build_datasets, build_loader
from megatron.resilience.exits import ExitConditions
from megatron.resilience.preflight import check_memory
from megatron.initialize import initialize_megatron
from megatron.tokenizer import run_tokenizer
from megatron.model import GPTConfig, GPTModel
from megatron.model.gpt import TransformerLayer
from megatron import deepspeed_compat as ds_compat
from megatron.optimizer import OptimizerHooks, deepspeed_initialize_kwargs
from megatron.optimizer.partition import attach_layouts
from megatron.lr_finder import active_lr_finder, build_lr_scheduler
from megatron.model.mup import model_fields as mup_model_fields
from megatron.observability.numerics import NumericalFaultError, NumericsGuard
from megatron.core import pipeline_schedule as pipeline
from megatron.schedules import scheduler_increment
from megatron.observability.config_table import print_config
from megatron.observability.profiling import Profiler
from megatron.observability.timers import Timers
from megatron.observability.training_log import TrainLogger

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- builders
def build_tokenizer_and_vocab(args):
    """The tokenizer (for the vocabulary size and EOD id); sets the vocabulary sizes on `args`."""
    tok, args.padded_vocab_size = run_tokenizer(Config.from_args(args))
    args.vocab_size_orig = tok.vocab_size
    return tok


def model_config(config: Config) -> GPTConfig:
    """The model's shape and initialization (megatron/model) from the configuration."""
    model = config.model
    return GPTConfig(
        vocab_size=config.runtime.padded_vocab_size,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        max_position_embeddings=model.max_position_embeddings,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        swiglu=model.swiglu,
        use_rotary_position_embeddings=model.use_rotary_position_embeddings,
        rope_theta=model.rope_theta,
        rotary_percent=model.rotary_percent,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        word_embedding_init_std=model.word_embedding_init_std if model.adjust_word_embedding_init else None,
        init_method_xavier_uniform=model.init_method_xavier_uniform,
        sequence_parallel=config.parallel.sequence_parallel,
        recompute_granularity=config.training.recompute_granularity,
        recompute_num_layers=config.runtime.recompute_num_layers,
        **mup_model_fields(model),  # MuP / CompleteP multipliers (neutral when off)
    )


# ----------------------------------------------------------------------------- one step
def get_batch(batch: dict, data: DataConfig, eod: int | None, device):
    text = torch.as_tensor(batch["text"]).long().to(device, non_blocking=True)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones_like(tokens, dtype=torch.float32)
    if data.eod_mask_loss and eod is not None:
        loss_mask[tokens == eod] = 0.0
    return tokens, labels, loss_mask


def forward_loss(engine, batch: dict, data: DataConfig, eod, device) -> torch.Tensor:
    tokens, labels, mask = get_batch(batch, data, eod, device)
    position_ids = reset_position_ids(tokens, eod) if data.reset_position_ids and eod is not None else None
    extra = {}
    if data.reset_attention_mask and eod is not None:  # causal within each document
        extra["attention_mask"] = document_attention_mask(tokens, eod)
    # Ulysses SP > 1: this rank's slice of the sequence; the loss is the whole sequence's masked mean
    tokens, labels, mask, position_ids = (ulysses.shard(t) for t in (tokens, labels, mask, position_ids))
    losses = engine(tokens, position_ids=position_ids, labels=labels, **extra)
    return ulysses.whole_sequence_loss(losses, mask)


def pipe_sample(batch: dict, data: DataConfig, eod, device) -> tuple:
    """A micro-batch as DeepSpeed's pipeline engine takes it: (inputs, labels); the first stage
    reads (tokens[, position_ids]), the last (labels, loss_mask) for the same masked-mean loss."""
    tokens, labels, mask = get_batch(batch, data, eod, device)
    position_ids = reset_position_ids(tokens, eod) if data.reset_position_ids and eod is not None else None
    return (tokens if position_ids is None else (tokens, position_ids)), (labels, mask)


def dp_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the data-parallel group (values already averaged locally)."""
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    return values


class StepRunner:
    """What the loop calls for one iteration (`train`: every micro-batch's forward and backward,
    then one optimizer step) and for an evaluation, the same whether or not pipeline parallelism is
    on: `step_runner(...)` returns the micro-batch loop below or the pipeline engine's schedule."""

    def __init__(self, engine, config: Config, eod, device):
        self.engine, self.config, self.eod, self.device = engine, config, eod, device
        self.increment = scheduler_increment(self.config)  # LR-schedule units per iteration

    def train(self, data_iter, iteration: int = 0, timers: Timers | None = None, seen: list | None = None,
              guard: NumericsGuard | None = None) -> torch.Tensor:
        """One iteration; returns its loss (mean over micro-batches and data-parallel ranks). The
        micro-batches are appended to `seen` (for optimizer hooks that replay them); `guard` skips
        the optimizer step of an iteration with a non-finite loss or gradient."""
        raise NotImplementedError

    def evaluate(self, valid_dataset) -> float:
        """Mean LM loss over the first eval_iters global batches of the validation set (the same
        samples every time, so successive evaluations are comparable)."""
        raise NotImplementedError


class MicroBatchRunner(StepRunner):
    """PP = 1: the micro-batches one after the other through `engine`, then `engine.step`."""

    def train(self, data_iter, iteration=0, timers=None, seen=None, guard=None) -> torch.Tensor:
        engine, config, timers = self.engine, self.config, timers or Timers()
        losses = []
        for _ in range(config.runtime.num_micro_batches):
            with timers("batch-generator", level=2):
                batch = next(data_iter)
            if seen is not None:
                seen.append(batch)
            with timers("forward-backward", level=1):
                with timers("forward-compute", level=2):
                    loss = forward_loss(engine, batch, config.data, self.eod, self.device)
                    if guard is not None:
                        loss = guard.inject(iteration, loss)  # test-only fault injection (MEGATRON_TEST_FAULTS)
                with timers("backward-compute", level=2):
                    engine.backward(loss)
            with timers("optimizer", level=1):
                step = lambda: engine.step(lr_kwargs={"increment": self.increment})  # noqa: E731
                if guard is not None:  # skips the update of an iteration with a non-finite loss or gradient
                    guard.step(engine, loss, step)
                else:
                    step()
            losses.append(loss.detach())
        return dp_mean(torch.stack(losses).mean())

    @torch.no_grad()
    def evaluate(self, valid_dataset) -> float:
        engine, config = self.engine, self.config
        loader = build_loader(valid_dataset, self.config, consumed_samples=0, workers=False)
        engine.eval()
        total, n = torch.zeros((), device=self.device), 0
        it = iter(loader)
        for _ in range(config.training.eval_iters * config.runtime.num_micro_batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            total += forward_loss(engine, batch, config.data, self.eod, self.device)
            n += 1
        engine.train()
        return float(dp_mean(total / max(n, 1)))


class PipelineRunner(StepRunner):
    """PP > 1: DeepSpeed's 1F1B schedule runs the micro-batches and the step (core/pipeline_schedule.py)."""

    def _sample(self, batch):
        return pipe_sample(batch, self.config.data, self.eod, self.device)

    def train(self, data_iter, iteration=0, timers=None, seen=None, guard=None) -> torch.Tensor:
        with (timers or Timers())("forward-backward", level=1):
            return pipeline.train_batch(self.engine, data_iter, self._sample, guard, iteration)

    def evaluate(self, valid_dataset) -> float:
        loader = build_loader(valid_dataset, self.config, consumed_samples=0, workers=False)
        return pipeline.evaluate(self.engine, loader, self.config.training, self.config.runtime, self._sample)


def step_runner(engine, config: Config, eod, device) -> StepRunner:
    return (PipelineRunner if pipeline.is_pipeline(engine) else MicroBatchRunner)(engine, config, eod, device)


def train_step(engine, data_iter, config: Config, eod, device, timers: Timers | None = None,
               seen: list | None = None, guard: NumericsGuard | None = None, iteration: int = 0) -> torch.Tensor:
    """One iteration of `engine` (tests and benchmarks): `StepRunner.train`."""
    return step_runner(engine, config, eod, device).train(data_iter, iteration, timers, seen, guard)


def replay_batches(batches: list, config: Config, eod, device) -> list:
    """(tokens, loss_mask) of the given micro-batches, for OptimizerHooks.after_step."""
    return [(tokens, mask) for tokens, _labels, mask in (get_batch(b, config.data, eod, device) for b in batches)]


def keep_compile_cache() -> str:
    """Inductor's cache (compiled kernels, FX graph and autograd caches) kept between runs: in the
    Python environment (next to DeepSpeed's torch_extensions) unless TORCHINDUCTOR_CACHE_DIR is set
    or the environment is read-only (then torch's default in the temp directory). Returns the dir."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(sys.prefix, "torchinductor_cache")
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # noqa: PLC0415

    return cache_dir()


def compile_report() -> str:
    """Seconds torch.compile has spent so far (forward and backward graphs, wall time) and the cache use."""
    from torch._dynamo.utils import calculate_time_spent, counters  # noqa: PLC0415

    seconds = calculate_time_spent().get("total_wall_time", 0.0)
    ind = counters["inductor"]
    return (f"{seconds:.1f} s compiling (inductor FX graph cache: {ind['fxgraph_cache_hit']} hit(s), "
            f"{ind['fxgraph_cache_miss']} miss(es); cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')})")


def setup_model_and_optimizer(args, before_engine=None):
    """GPTModel -> optimizer and LR scheduler -> `deepspeed.initialize`; returns (model, engine).
    `before_engine(model)` (optional) sees the freshly initialized model (benchmarks copy its weights)."""
    import deepspeed  # noqa: PLC0415  (after initialize_megatron: it picks DeepSpeed's accelerator)

    if args.fp16:
        ds_compat.allow_fp16_on_cpu()

    if args.compile is None:  # neither --compile nor --no-compile: the measured rule (megatron/arguments.py)
        args.compile, args.compile_reason = auto_compile(args)
    else:
        args.compile_reason = "on (--compile)" if args.compile else "off (--no-compile)"
    if args.rank == 0:
        print(f"> torch.compile: {args.compile_reason}", flush=True)
    config = Config.from_args(args)  # the arguments are final here
    par, prec = config.parallel, config.precision
    if par.pipeline_model_parallel_size > 1:  # this rank's stage, cut from the same GPTModel
        return pipeline.setup_pipeline_engine(config, model_config(config), build_ds_config(config),
                                              lambda optimizer: build_lr_scheduler(optimizer, config), before_engine)
    model = GPTModel(model_config(config))
    if before_engine is not None:
        before_engine(model)
    if config.training.compile:  # in place, so parameter and checkpoint names do not change
        keep_compile_cache()
        model.compile()
    # the optimizer is a client one or DeepSpeed's own (e.g. its ZeRO Muon): megatron/optimizer decides
    # mpu: ZeRO works over the data-parallel group, clipping and checkpoints know the TP ranks
    kwargs = deepspeed_initialize_kwargs(model, config, build_ds_config(config),
                                         lambda optimizer: build_lr_scheduler(optimizer, config))
    # saved with checkpoints: a ZeRO stage 0 checkpoint's optimizer state is indexed by position only
    names = {id(p): n for n, p in model.named_parameters()}
    groups = kwargs["optimizer"].param_groups if "optimizer" in kwargs else kwargs["model_parameters"]
    param_names = [[names[id(p)] for p in g["params"]] for g in groups]  # before ZeRO swaps in its partitions
    if par.zero_stage == 3 and par.ds_sequence_parallel_size > 1:  # the group ZeRO-3 reduces over
        dtype = torch.bfloat16 if prec.bf16 else torch.float16 if prec.fp16 else torch.float32
        ds_compat.partition_zero3_over_sequence_data_parallel(model, kwargs["config"], dtype,
                                                              parallel_state.DeepSpeedMPU())
    if zero3_fetch_by_layer(config, kwargs["config"]["zero_optimization"]):  # the model stays gathered anyway
        ds_compat.fetch_zero3_by_module_type(model, [TransformerLayer])  # one fetch per layer, not per module
    with ds_compat.no_initial_zero_step():  # stage-0 bf16/fp16: no zero-gradient step (and its memory) at build
        engine, _, _, _ = deepspeed.initialize(model=model, mpu=parallel_state.DeepSpeedMPU(), **kwargs)
    if par.zero_stage == 3 and par.ds_sequence_parallel_size > 1:
        ds_compat.sum_zero3_scatter_over_sequence_parallel(engine, par.ds_sequence_parallel_size)
    engine.optimizer_param_names = param_names
    # DeepSpeed behaviours changed on this engine, each explained in megatron/deepspeed_compat
    if prec.fp16:
        ds_compat.defer_loss_scale_growth(engine.optimizer)  # grow the loss scale after the step, not before
    ds_compat.skip_single_replica_allreduce(engine)  # one replica, stage 0 or bf16 ZeRO-1: no all-reduce over one
    ds_compat.copy_first_bf16_gradient(engine)  # bf16 ZeRO-1 at one replica: no fill + add of its fp32 gradients
    ds_compat.exact_grad_norm(engine)  # the fp64 gradient norm at every stage and precision
    ds_compat.skip_single_replica_reduction(engine)  # ZeRO-1/2 at one replica: no all-reduce over a group of one
    ds_compat.share_single_replica_master_weights(engine)  # fp32 ZeRO-1/2 at one replica: weights are the master
    ds_compat.reuse_single_replica_gradient_partition(engine)  # fp32 ZeRO-1/2 at one replica: no new flat gradient per step
    ds_compat.add_single_replica_gradients_to_fp32_partition(engine)  # bf16 ZeRO-2 at one replica: no reduction
    attach_layouts(engine)  # per-tensor optimizers see whole tensors through ZeRO's partitions
    if par.zero_stage == 0 and prec.bf16:
        ds_compat.skip_bf16_overflow_scan(engine)
    ds_compat.step_stage0_in_chunks(engine)  # bf16 stage 0: no fp32 copy of all gradients at once in the step
    ds_compat.step_zero12_in_chunks(engine)  # bf16 ZeRO-1/2: no bf16 + fp32 copy of the gradient partition either
    return model, engine


# ----------------------------------------------------------------------------- main entry
def pretrain(args) -> dict:
    """Train as configured by the validated `args`; returns a summary dict."""
    initialize_megatron(args)  # before DeepSpeed is imported: it picks DeepSpeed's accelerator
    from megatron.resilience.allocator import allocator_setting  # noqa: PLC0415

    args.malloc_setting = allocator_setting(args.allocator, args.malloc_mmap_threshold)  # before anything allocates
    tokenizer = build_tokenizer_and_vocab(args)
    config = Config.from_args(args)  # with the rank and the vocabulary (--compile is decided with the model)
    # the estimate vs the device / host memory, before any model or data is built; kept on `args` for
    # pretrain_gpt.py's out-of-memory message
    args.memory_estimate = check_memory(config)
    train_ds, valid_ds, _test_ds = build_datasets(config)

    model, engine = setup_model_and_optimizer(args)
    device = engine.device
    # the resolved configuration, each value's source, and warnings for suspicious settings; the parameters
    # of the whole model (a TP rank holds 1/TP of the matrices)
    config = Config.from_args(args)  # setup_model_and_optimizer decided --compile (a field checkpoints store)
    print_config(config, model.config.num_parameters())

    state = checkpointing.load_checkpoint(engine, config)
    summary = train(config, engine, train_ds, valid_ds, tokenizer.eod, device, state)
    if dist.is_initialized():
        dist.barrier()
        # tear the communicators down before the interpreter exits: left to process exit, gloo's
        # threads were occasionally destroyed while running ("terminate called without an active exception")
        dist.destroy_process_group()
    return summary


def train(config: Config, engine, train_ds, valid_ds, eod, device, state: checkpointing.LoadedState) -> dict:
    training, ckpt, runtime = config.training, config.checkpoint, config.runtime
    iteration, samples, tokens = state.iteration, state.consumed_train_samples, state.consumed_train_tokens
    # the loader's worker processes are forked here, before the logger starts its threads (forking a
    # process that runs other Python threads can deadlock the child: see data/loading.py)
    batches_in = None if training.skip_train else iter(build_loader(train_ds, config, samples,
                                                                config.data.dataloader_type))
    logger = TrainLogger.create(config, corpus_names=getattr(train_ds, "corpus_names", None), resumed=iteration > 0,
                                skipped_steps=int(getattr(engine, "skipped_steps", 0) or 0))
    timers = logger.timers
    profiler = Profiler.create(config.logging, config.runtime)  # --profile pt|pt-full over --profile_steps
    exits = ExitConditions(config.training)
    guard = NumericsGuard.create(config)  # NaN/Inf loss or grads -> step skipped; --max-skipped-iterations; spikes
    summary = {"start_iteration": iteration, "initial_val_loss": None, "final_val_loss": None, "checkpoint": None}
    hooks = OptimizerHooks(engine, config.runtime)  # schedule-free eval weights, Sophia Hessian, MuonClip
    runner = step_runner(engine, config, eod, device)  # one iteration, with or without pipeline parallelism
    finder = active_lr_finder(engine)  # --lr-finder: the LR range test is the engine's scheduler

    validated: dict[int, float] = {}  # iteration -> validation loss (the same weights are not evaluated twice)

    def validate() -> float | None:
        if valid_ds is None or training.eval_iters == 0:
            return None
        if iteration not in validated:
            with timers("evaluate", level=0), hooks.eval_weights():
                validated[iteration] = runner.evaluate(valid_ds)
            logger.validation(iteration, validated[iteration], tokens, samples)
        return validated[iteration]

    def save() -> None:
        if ckpt.save:
            with timers("save-checkpoint", level=0), hooks.eval_weights():
                summary["checkpoint"] = checkpointing.save_checkpoint(engine, config, iteration, samples, tokens)

    if training.eval_on_start and iteration == 0:
        summary["initial_val_loss"] = validate()

    data_iter = None if training.skip_train else guard.wrap_data(  # --skip-train: a finished run's data is used up
        logger.count_corpora(batches_in), iteration, runtime.num_micro_batches)
    engine.train()
    logger.watch(engine)  # --log-num-zeros-in-grad reads the gradient inside the step
    last_saved = iteration
    while (not training.skip_train and iteration < training.train_iters  # --skip-train: only the evaluation below
           and not (training.train_tokens and tokens >= training.train_tokens)):
        batches: list = []
        profiler.step(iteration + 1)
        loss = runner.train(data_iter, iteration + 1, timers, seen=batches, guard=guard)
        iteration += 1
        hooks.after_step(iteration, lambda: replay_batches(batches, config, eod, device))
        samples += training.global_batch_size
        tokens += training.global_batch_size * config.model.seq_length
        logger.train(iteration, loss, engine, samples, tokens)
        if training.compile and iteration == state.iteration + 1 and runtime.rank == 0:  # the first step compiled
            print(f"> torch.compile: {compile_report()}", flush=True)
        if guard.end_iteration(iteration, float(loss), runtime.rank):  # --max-skipped-iterations in a row
            save()  # the weights are those of the last good step
            raise NumericalFaultError(
                f"{guard.skipped_in_a_row} iterations in a row (up to {iteration}) had a non-finite loss or "
                f"gradient; checkpoint of the last good state saved to {ckpt.save} (lower --lr, check the data, "
                "or raise --max-skipped-iterations)" if ckpt.save else
                f"{guard.skipped_in_a_row} iterations in a row (up to {iteration}) had a non-finite loss or "
                "gradient (no --save: nothing saved); lower --lr or check the data")
        if finder and finder.record(iteration, loss):
            break
        if training.eval_interval and iteration % training.eval_interval == 0 and iteration != training.train_iters:
            validate()
        if ckpt.save and ckpt.save_interval and iteration % ckpt.save_interval == 0:
            save()
            last_saved = iteration
        reason = exits.reason(iteration)
        if reason:
            if runtime.rank == 0:
                print(f"> exiting at iteration {iteration} ({reason})", flush=True)
            break

    if finder:
        summary["lr_finder"] = finder.finish()
    summary["final_val_loss"] = validate()
    if iteration != last_saved:
        save()
    profiler.close()
    summary.update(iteration=iteration, consumed_samples=samples, consumed_tokens=tokens)
    summary["table"] = logger.finish(iteration, tokens, summary["checkpoint"])
    return summary
