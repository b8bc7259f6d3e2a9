"""The configuration: one frozen, typed tree of sections, each with its defaults and its `validate()`.

    Config
      model      ModelConfig       shape, initialization, MuP / CompleteP
      precision  PrecisionConfig   fp16 / bf16, loss scaling
      training   TrainingConfig    batch sizes, run length, evaluation, exits, recompute, compile
      optimizer  OptimizerConfig   --optimizer and each family's flags
      schedule   ScheduleConfig    learning rate, warmup / decay / cooldown, LR finder
      data       DataConfig        data files, loader, tokenizer
      checkpoint CheckpointConfig  save / load / resume
      parallel   ParallelConfig    TP / PP / SP, ZeRO, backend, DeepSpeed's flags
      logging    LoggingConfig     log line, TensorBoard, W&B, profiling
      runtime    RuntimeConfig     derived and process values (rank, padded vocabulary, ...): no flag

Field names are the upstream `args` attribute names, unique over the tree, so the flat upstream
namespace (what `megatron/arguments.py` parses, what checkpoints store) and the tree convert both
ways: `Config.from_args(namespace)`, `config.to_args()`. The defaults live here only: the parser takes
them from `Config.defaults()`.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from megatron.config.base import Section
from megatron.config.io import CheckpointConfig, DataConfig, LoggingConfig
from megatron.config.model import ModelConfig, PrecisionConfig
from megatron.config.parallel import ParallelConfig
from megatron.config.runtime import NOT_SAVED, RuntimeConfig
from megatron.config.training import OptimizerConfig, ScheduleConfig, TrainingConfig

__all__ = ["Config", "ModelConfig", "PrecisionConfig", "TrainingConfig", "OptimizerConfig", "ScheduleConfig",
           "DataConfig", "CheckpointConfig", "ParallelConfig", "LoggingConfig", "RuntimeConfig", "Section",
           "default_args", "saved_args"]


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        return {f.name: f.default_factory for f in dataclasses.fields(cls)}

    @classmethod
    def section_of(cls) -> dict[str, str]:
        """Field name -> the section holding it."""
        return {name: sec for sec, kind in cls.sections().items() for name in kind.field_names()}

    @classmethod
    def defaults(cls, runtime: bool = False) -> dict:
        """Every field's default, flat (the parser's defaults); with `runtime`, the runtime ones too."""
        return {k: v for sec, kind in cls.sections().items() if runtime or sec != "runtime"
                for k, v in kind.defaults().items()}

    @classmethod
    def from_args(cls, args) -> Config:
        """The tree of a flat upstream namespace (or dict); refuses attributes no section declares."""
        values = dict(vars(args) if not isinstance(args, dict) else args)
        where = cls.section_of()
        unknown = sorted(set(values) - set(where))
        if unknown:
            raise TypeError(f"undeclared configuration field(s) {', '.join(unknown)}: declare them in megatron/config/")
        parts: dict[str, dict] = {sec: {} for sec in cls.sections()}
        for k, v in values.items():
            parts[where[k]][k] = v
        return cls(**{sec: kind(**parts[sec]) for sec, kind in cls.sections().items()})

    @classmethod
    def from_saved(cls, values: dict) -> Config:
        """The tree of a checkpoint's stored arguments: the fields it declares (an upstream checkpoint
        also stores flags this framework does not have), the defaults for the ones it lacks."""
        where = cls.section_of()
        return cls.from_args({k: v for k, v in values.items() if k in where})

    def to_args(self) -> argparse.Namespace:
        """The flat upstream namespace (`args`) of this tree."""
        return argparse.Namespace(**{k: v for sec in self.sections() for k, v in vars(getattr(self, sec)).items()})

    def replace(self, **changes) -> Config:
        """A copy with some fields (flat names) changed."""
        return Config.from_args({**vars(self.to_args()), **changes})

    def validate(self) -> list[str]:
        """Every problem of every section, then those between sections: one line each naming the fix."""
        errs = [e for sec in self.sections() for e in getattr(self, sec).validate()]
        stage, pp = self.parallel.zero_stage, self.parallel.pipeline_model_parallel_size
        sp = self.parallel.ds_sequence_parallel_size
        if self.checkpoint.no_save_optim and stage == 3:
            errs.append("--no-save-optim cannot be used with --zero-stage 3 (ZeRO-3 keeps the weights in the "
                        "optimizer shards)")
        if self.data.reset_attention_mask and (pp > 1 or sp > 1):
            errs.append("--reset-attention-mask is not supported with pipeline (PP > 1) or Ulysses (SP > 1) "
                        "parallelism yet; drop it or use PP = SP = 1")
        if self.logging.log_params_norm and pp > 1 and not self.model.untie_embeddings_and_output_weights:
            errs.append("--log-params-norm with pipeline parallelism needs --untie-embeddings-and-output-weights "
                        "(the tied embedding is held by the first and the last stage); add it or drop "
                        "--log-params-norm")
        if self.logging.log_num_zeros_in_grad and pp > 1:
            errs.append("--log-num-zeros-in-grad is not supported with pipeline parallelism (PP > 1) yet; drop the "
                        "flag")
        if self.optimizer.cpu_optimizer and stage == 0:
            errs.append("--cpu-optimizer offloads the optimizer with ZeRO: use --zero-stage 1, 2 or 3, or drop the "
                        "flag")
        return errs


def default_args(**overrides) -> argparse.Namespace:
    """The upstream namespace of every default (runtime ones included), with `overrides` (field names);
    an unknown name is refused. For tests and tools that build a configuration without a command line."""
    return Config.from_args({**Config.defaults(runtime=True), **overrides}).to_args()


def saved_args(args) -> dict:
    """What a checkpoint stores of `args`: every field but the process-only ones (megatron/config/runtime.py)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SAVED and not k.startswith("_")}
