"""Optimizer registry: one name -> one builder, registered next to its implementation.

Adding an optimizer is one decorated function in the module of its family (plus its test in
``tests/test_optimizer_<family>.py`` and a row in ``ALCF/notes/optimizers.md``):

    @register_optimizer("myopt", help="one line shown in --help")
    def _build_myopt(groups, config: Config):
        return MyOpt(groups, lr=config.schedule.lr, beta=config.optimizer.myopt_beta, ...)

A builder receives parameter groups (from `get_param_groups`, or the entry's own `groups`
function) and the run's `Config` (megatron/config/: the optimizer section, the learning rate of the
schedule section, the precision and ZeRO stage, ...), and returns either a `torch.optim.Optimizer` (handed to
`deepspeed.initialize(optimizer=...)`) or a `DeepSpeedOptimizer` (one of DeepSpeed's own
optimizers plus the DS config entries it needs, e.g. ds.adamw, ds.onebitlamb). An entry's `check(config)` lists start-up
problems (a missing package, a ZeRO stage it cannot run under); `megatron.arguments` reports them
before anything expensive starts, so a bad name never turns into a TypeError mid-run.

`--optimizer` choices and its --help text are generated from this registry.
"""
from __future__ import annotations

import contextlib
import importlib.util
import pkgutil
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from megatron.config import Config, RuntimeConfig

log = logging.getLogger(__name__)

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]


@dataclass
class DeepSpeedOptimizer:
    """Builder result for an optimizer DeepSpeed builds itself from an ``"optimizer"`` block of its
    config (ds.adamw, and optimizers that need the engine, e.g. OneBitLamb): `config` is that block,
    `param_groups` go to ``deepspeed.initialize`` as ``model_parameters``, `ds_config` entries
    override the rest of the DS config."""
    config: dict
    param_groups: list[dict]
    ds_config: dict = field(default_factory=dict)


Built = "torch.optim.Optimizer | DeepSpeedOptimizer"
Builder = Callable[[list[dict], Config], Any]
Check = Callable[[Config], list[str]]
GroupFn = Callable[[NamedParams, Config], list[dict]]


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    build: Builder
    help: str
    check: Check | None = None
    groups: GroupFn | None = None
    # optimizer state kept per parameter, in fp32 copies of the parameter (Adam: exp_avg + exp_avg_sq = 2);
    # the memory preflight (megatron/resilience/preflight.py) counts 4 bytes x this per parameter
    state_copies: float = 2.0


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register_optimizer(name: str, *, help: str = "", check: Check | None = None,
                       groups: GroupFn | None = None, state_copies: float = 2.0) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(param_groups, config)` under `name`.

    `check(config) -> [problem lines]` runs in `validate_args`; `groups(named_params, config)` replaces
    the default `get_param_groups` for this entry; `state_copies`: optimizer state per parameter in
    fp32 copies of it (Adam 2; an upper bound where it depends on the model), for the memory preflight.
    """

    def deco(builder: Builder) -> Builder:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is registered twice")
        OPTIMIZERS[name] = OptimizerEntry(name, builder, help, check, groups, state_copies)
        return builder

    return deco


# --help order of the family modules; a new module in this package is found on its own (listed after these)
FAMILIES = ("basic", "fallbacks", "lamb", "schedulefree", "sophia", "adopt", "muon", "lion", "ademamix", "galore")


def _family_modules() -> list[str]:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [f for f in FAMILIES if f in found] + [m for m in found if m not in FAMILIES]


def _load_families() -> None:
    """Import every module of this package (each family registers its names). Cheap: heavy imports are lazy."""
    for family in _family_modules():
        importlib.import_module(f"{__name__}.{family}")


def _entries() -> list[OptimizerEntry]:
    """Every entry, by family (FAMILIES order), then in registration order within the family."""
    _load_families()
    rank = {f"{__name__}.{family}": i for i, family in enumerate(_family_modules())}
    order = list(OPTIMIZERS)
    return sorted(OPTIMIZERS.values(),
                  key=lambda e: (rank.get(getattr(e.build, "__module__", ""), len(rank)), order.index(e.name)))


def optimizer_names() -> list[str]:
    return [e.name for e in _entries()]


def optimizer_help() -> str:
    return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in _entries())


def get_entry(name: str) -> OptimizerEntry:
    _load_families()
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(optimizer_names())}") from None


def optimizer_problems(config: Config) -> list[str]:
    """Start-up problems of `--optimizer` on this machine (one line each, naming the fix)."""
    try:
        entry = get_entry(config.optimizer.optimizer)
    except ValueError as e:
        return [str(e)]
    return list(entry.check(config)) if entry.check else []


# ----------------------------------------------------------------------------- helpers for entries
def have_module(name: str) -> bool:
    """True if `name` is importable (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def needs_module(module: str, install: str, what: str) -> Check:
    """A `check` that refuses when `module` is not importable, naming the pip line to run."""

    def check(config: Config) -> list[str]:
        if have_module(module):
            return []
        return [f"--optimizer {config.optimizer.optimizer} needs {what} (python module {module!r}, not installed): "
                f"{install}"]

    return check


_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


# ----------------------------------------------------------------------------- parameter groups
def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Megatron's rule: 1-D tensors (norm weights) and biases get no weight decay."""
    return p.ndim < 2 or name.endswith(".bias")


def get_param_groups(named_params: NamedParams, lr_mult: float = 1.0) -> list[dict]:
    """Split parameters into a weight-decay group and a no-weight-decay group.

    Each group carries `name`, `wd_mult` (0 or 1) and `lr_mult`, which the scheduler multiplies
    into ``lr`` / ``weight_decay`` every step.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "wd_mult": 1.0, "lr_mult": lr_mult, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "wd_mult": 0.0, "lr_mult": lr_mult, "name": "no_decay"})
    return groups


def build_optimizer(model: torch.nn.Module, config: Config):
    """Build what `--optimizer` names for `model`: a torch optimizer or a `DeepSpeedOptimizer`."""
    entry = get_entry(config.optimizer.optimizer)
    named = list(model.named_parameters())
    groups = entry.groups(named, config) if entry.groups else get_param_groups(named)
    from megatron.model.mup import parametrize_param_groups  # noqa: PLC0415

    # MuP/CompleteP lr/wd/eps multipliers (no-op when off)
    groups = parametrize_param_groups(groups, named, config.model, config.optimizer)
    for g in groups:  # the scheduler sets the real values before the first step
        g["lr"] = config.schedule.lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = config.optimizer.weight_decay * g.get("wd_mult", 1.0)
    return entry.build(groups, config)


def deepspeed_initialize_kwargs(model: torch.nn.Module, config: Config, ds_config: dict,
                                scheduler_factory: Callable[[Any], Any]) -> dict:
    """Keyword arguments for ``deepspeed.initialize(model=model, **kwargs)``: the optimizer, the
    DS config (with the entries a `DeepSpeedOptimizer` asks for) and the LR scheduler (built by
    `scheduler_factory(optimizer)`, so per-group multipliers are honoured)."""
    built = build_optimizer(model, config)
    if not isinstance(built, DeepSpeedOptimizer):
        return {"optimizer": built, "config": ds_config, "lr_scheduler": scheduler_factory(built)}
    cfg = {**ds_config, **built.ds_config}
    # DeepSpeed builds it: the scheduler is built on what it built (a callable lr_scheduler). A DS config
    # file's block of the same type (the launcher's; another type is refused by validate_args) keeps its
    # other settings (e.g. torch_adam); the flags give the hyper-parameters.
    ours, theirs = built.config.get("params", {}), (ds_config.get("optimizer") or {}).get("params") or {}
    params = {**ours, **theirs, **{k: ours[k] for k in ("lr", "betas", "eps", "weight_decay") if k in ours}}
    return {"model_parameters": built.param_groups, "config": {**cfg, "optimizer": {**built.config, "params": params}},
            "lr_scheduler": scheduler_factory}


# ----------------------------------------------------------------------------- loop hooks
def client_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer whose `step` DeepSpeed calls (under ZeRO, the one inside its wrapper)."""
    return getattr(engine, "basic_optimizer", None) or engine.optimizer


@dataclass
class OptimizerHooks:
    """What some optimizers need from the loop, one call per hook:

    * ``with hooks.eval_weights():`` around evaluation and checkpoint saves: schedule-free
      optimizers switch to their averaged weights (``optimizer.eval()``) and back.
    * ``hooks.after_step(iteration, replay)`` after each iteration: SophiaG refreshes its
      Hessian estimate every k steps from an extra forward/backward with sampled labels
      (`replay` yields the iteration's micro-batches as (tokens, loss_mask)); MuonClip rescales
      W_q / W_k of heads whose max QK logit exceeded ``--muonclip-t``.
    """
    engine: Any
    runtime: RuntimeConfig

    def __post_init__(self) -> None:
        from megatron.deepspeed_compat.partitions import model_sync  # noqa: PLC0415

        # under ZeRO / DeepSpeed's bf16 optimizer a swap changes the fp32 masters: copy them to the model
        self._sync = model_sync(getattr(self.engine, "optimizer", None)) or (lambda: None)
        # A checkpoint is saved with the averaged (eval) weights: a schedule-free optimizer loaded
        # from one starts in eval mode and must go back to its training point before stepping.
        opt = self.optimizer
        if getattr(opt, "qk_clip", None) is not None:  # MuonClip records each forward's max logits
            opt.qk_clip.attach(self.engine.module)
        groups = getattr(opt, "param_groups", [])
        if callable(getattr(opt, "train", None)) and groups and groups[0].get("train_mode") is False:
            opt.train()
            self._sync()

    @property
    def optimizer(self):
        return client_optimizer(self.engine)

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        opt = self.optimizer
        switch = callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))
        if switch:
            opt.eval()
            self._sync()
        try:
            yield
        finally:
            if switch:
                opt.train()
                self._sync()

    def after_step(self, iteration: int, replay: Callable[[], Iterable]) -> dict:
        """Returns metrics to log (may be empty)."""
        opt = self.optimizer
        out: dict = {}
        fn = getattr(opt, "after_step", None)
        if callable(fn):
            out.update(fn(iteration, self.engine.module, replay) or {})
        if out and int(self.runtime.rank or 0) == 0:
            log.info("iteration %d optimizer: %s", iteration,
                     ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
        return out
