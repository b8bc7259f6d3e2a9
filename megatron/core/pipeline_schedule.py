"""Pipeline parallelism (PP > 1) in the trainer: DeepSpeed's pipeline engine runs the 1F1B
schedule over the stages of `megatron.model.gpt_pipeline`.

What the loop sees (megatron/training.py calls these):

* `setup_pipeline_engine`: whole GPTModel (same init as PP = 1) -> this rank's stage ->
  `deepspeed.initialize` (DeepSpeed takes its process groups from the pipeline module's grid,
  whose rank layout equals megatron.core.parallel_state's: it refuses an `mpu` with a pipeline).
* `train_batch`: one iteration = `engine.train_batch(...)` (all micro-batches, the gradient
  reductions and the optimizer step). The returned loss is the masked-mean LM loss averaged over
  micro-batches and data-parallel ranks, broadcast from the last stage to every stage.
* `evaluate`: `engine.eval_batch` over `--eval-iters` global batches.

The engine's optimizer-step instruction carries no LR arguments: `_bind_optimizer_step` makes it
advance the LR schedule by `scheduler_increment(config)` (samples, or tokens) as the PP = 1 loop's
`engine.step(lr_kwargs=...)` does, and routes it through the `NumericsGuard`, so an iteration
with a non-finite loss or gradient is skipped here too.

`pipeline_problems(config)` lists the combinations refused at start-up (see ALCF/notes/parallelism.md).
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable, Iterator

import torch

from megatron.config import Config, RuntimeConfig, TrainingConfig

log = logging.getLogger(__name__)

# optimizers whose after-step hook replays the iteration's micro-batches through the whole model
_REPLAY_OPTIMIZERS = ("sophiag", "muonclip")


def pipeline_problems(config: Config) -> list[str]:
    """One line per configuration that cannot run with --pipeline-model-parallel-size > 1."""
    pp = config.parallel.pipeline_model_parallel_size or 1
    if pp <= 1:
        return []
    errs = []
    why = "with pipeline parallelism (PP > 1)"
    training, stage = config.training, config.parallel.zero_stage
    if stage in (2, 3):
        errs.append(f"--zero-stage {stage} cannot be used {why}: DeepSpeed's pipeline engine supports "
                    "ZeRO 0 and 1 only; set ZERO_STAGE=1 (or PP=1)")
    if config.parallel.no_pipeline_parallel:
        errs.append(f"--no-pipeline-parallel contradicts --pipeline-model-parallel-size {pp}; drop one of them")
    if (config.parallel.ds_sequence_parallel_size or 1) > 1:
        errs.append(f"Ulysses sequence parallelism (--ds-sequence-parallel-size > 1) is not supported {why}; "
                    "set SP=1 or PP=1")
    if config.model.num_layers and config.model.num_layers < pp:
        errs.append(f"--num-layers ({config.model.num_layers}) must be >= --pipeline-model-parallel-size ({pp}) "
                    "(each stage holds whole transformer layers)")
    if config.optimizer.optimizer in _REPLAY_OPTIMIZERS:
        errs.append(f"--optimizer {config.optimizer.optimizer} is not supported {why}: its after-step hook replays "
                    "the micro-batches through the whole model on one rank; use PP=1 or another optimizer")
    if config.schedule.lr_finder:
        errs.append(f"--lr-finder is not supported {why}; run the LR range test with PP=1")
    if config.checkpoint.universal_checkpoint:
        errs.append(f"--universal-checkpoint is not supported {why}: a universal checkpoint (converted from any "
                    "TP/PP/DP layout) loads at PP=1 only (DeepSpeed's universal loader fills the ZeRO-1/2 optimizer "
                    "of a PP=1 engine); load it with PP=1, or resume the PP checkpoint as is")
    if training.compile:
        errs.append(f"--compile is not supported {why}; drop --compile")
    recompute = training.checkpoint_activations or training.deepspeed_activation_checkpointing \
        or training.recompute_granularity == "full"
    if recompute and (training.checkpoint_num_layers or 1) > 1:
        errs.append(f"--checkpoint-num-layers > 1 is not supported {why} (each layer is recomputed on its own); "
                    "use --checkpoint-num-layers 1")
    return errs


def is_pipeline(engine) -> bool:
    """True for DeepSpeed's PipelineEngine (PP > 1)."""
    return hasattr(engine, "train_batch") and hasattr(engine, "is_last_stage")


def pipeline_ds_config(ds_config: dict) -> dict:
    """The DS config for the pipeline engine: activations are sent whole between stages (not
    partitioned over the TP ranks, which is wrong when they differ, as under sequence parallelism)."""
    pipe = {**ds_config.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return {**ds_config, "pipeline": pipe}


def setup_pipeline_engine(config: Config, model_config, ds_config: dict, scheduler_factory: Callable[[Any], Any],
                          before_engine: Callable | None = None):
    """(pipeline module, engine) of this rank's stage; `model_config` is the GPTConfig of the whole model."""
    import deepspeed  # noqa: PLC0415

    from megatron.core import parallel_state  # noqa: PLC0415
    from megatron.model import GPTModel  # noqa: PLC0415
    from megatron.model.gpt_pipeline import PipelineLoss, build_pipeline_module, pipeline_topology  # noqa: PLC0415
    from megatron.optimizer import deepspeed_initialize_kwargs  # noqa: PLC0415

    state = parallel_state.get_state()
    model = GPTModel(model_config)  # the whole model on every rank: the same weights as at PP = 1
    if before_engine is not None:
        before_engine(model)
    pipe = build_pipeline_module(model, pipeline_topology(state.pp, state.tp, state.dp), PipelineLoss())
    del model  # only this stage's layers stay referenced
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, **deepspeed_initialize_kwargs(pipe, config, pipeline_ds_config(ds_config), scheduler_factory))
    _bind_optimizer_step(engine, config)
    return pipe, engine


def _bind_optimizer_step(engine, config: Config) -> None:
    """Give the pipe schedule's optimizer step the LR increment and the NumericsGuard."""
    from megatron.schedules import scheduler_increment  # noqa: PLC0415

    from megatron.deepspeed_compat.engine import wrap_model_step  # noqa: PLC0415

    increment = scheduler_increment(config)

    def make_step(take_model_step):
        def step(lr_kwargs=None):
            do = lambda: take_model_step(lr_kwargs or {"increment": increment})  # noqa: E731
            guard = engine.module.loss_fn.guard
            if guard is None:
                return do()
            last = engine.is_last_stage() and engine.total_loss is not None
            loss = engine.total_loss.detach().float() if last else torch.zeros((), device=engine.device)
            guard.step(engine, loss, do)  # all ranks agree: skipped everywhere or nowhere
        return step

    wrap_model_step(engine, make_step)


def train_batch(engine, data_iter: Iterator, to_sample: Callable[[Any], tuple], guard=None,
                iteration: int = 0) -> torch.Tensor:
    """One iteration through the pipeline; returns the iteration's mean loss (same on every rank).
    `to_sample(batch)` turns a loader batch into the engine's ((tokens[, position_ids]), (labels, loss_mask))."""
    loss_fn = engine.module.loss_fn
    loss_fn.guard, loss_fn.iteration = guard, iteration
    try:
        loss = engine.train_batch(data_iter=map(to_sample, data_iter))
    finally:
        loss_fn.guard = None
    return loss.detach().float().reshape(())


@torch.no_grad()
def evaluate(engine, loader: Iterable, training: TrainingConfig, runtime: RuntimeConfig,
             to_sample: Callable[[Any], tuple]) -> float:
    """Mean LM loss over the first `eval_iters` global batches of `loader` (as the PP = 1 evaluate)."""
    it = iter(loader)
    total, n = 0.0, 0
    for _ in range(training.eval_iters):
        batches = list(itertools.islice(it, runtime.num_micro_batches))
        if len(batches) < runtime.num_micro_batches:
            break
        loss = engine.eval_batch(iter([to_sample(b) for b in batches]), num_micro_batches=len(batches))
        total += float(loss)
        n += 1
    engine.train()
    return total / max(n, 1)
