"""What a run prints and writes: the per-iteration console line, the timers block, validation
lines, TensorBoard scalars, W&B, `metrics.jsonl` and the end-of-run summary table.

One object, `TrainLogger`, that the loop calls once per iteration (`train`), once per evaluation
(`validation`) and once at the end (`finish`). Every rank calls it (the timers block, the
per-corpus counts, the memory maximum and the optimizer-state statistics are collectives);
rank 0 prints and writes.

Console line (rank 0, every `--log-interval` iterations and at the last one): upstream's fields
in upstream's order (upstream-spec §11.1) followed by `MFU` and `ETA`:

    iteration / train-iters | consumed_samples | consumed_tokens | elapsed_time_per_iteration_ms |
    learning_rate | global_batch_size | lm loss | loss_scale | grad_norm | actual_seqlen |
    number_of_skipped_iterations | number_of_nan_iterations | samples_per_second |
    tokens_per_gpu_per_second_tgs | TFLOPs | MFU | ETA

* elapsed per iteration = wall time since the previous line, minus evaluation and checkpoint
  time, divided by the iterations in the interval (so throughput is the training throughput);
* samples/s = GBS / elapsed; tgs = samples/s · seq / world size;
* TFLOPs = `megatron.observability.mfu.flops_per_iteration` / elapsed / 1e12 / world size (per device);
* MFU = TFLOPs / the device's peak (`--peak-tflops`, a table, or a matmul measured at start-up);
* ETA = iterations left × elapsed per iteration;
* num_zeros / params_norm (after grad_norm, with --log-num-zeros-in-grad / --log-params-norm):
  megatron/observability/weight_stats.py;
* lm loss = mean over the interval's iterations with a finite loss; NaN/inf iterations are
  counted in number_of_nan_iterations; skipped = optimizer steps DeepSpeed skipped in the interval.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from megatron.config import Config
from megatron.fp16 import loss_scale as fp16_loss_scale
from megatron.observability.mfu import PeakFlops, flops_per_iteration, resolve_peak
from megatron.core.parallel_state import all_reduce_values
from megatron.observability.stats import (  # noqa: F401  (format_duration, memory_stats: exported)
    _data_parallel_group, _human_seconds, _zero_partition_group, format_duration, memory_stats)
from megatron.observability.timers import Timers

log = logging.getLogger(__name__)

# Timers shown in the block, with their `--timing-log-level`.
TIMER_LEVELS = {"forward-backward": 1, "optimizer": 1, "batch-generator": 2, "forward-compute": 2,
                "backward-compute": 2}
# Level-0 timers whose time is kept out of the training throughput.
EXCLUDED_TIMERS = ("evaluate", "save-checkpoint")

DUMP_TOKENS_ITERATIONS = 10  # DUMP_TOKENS prints the batches of this many iterations

__all__ = ["TrainLogger", "flops_per_iteration", "format_duration", "memory_stats", "TIMER_LEVELS"]


def _fmt_tflops(x: float) -> str:
    return f"{x:.4g}"


def _model_numel(engine) -> int:
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in engine.module.parameters())


@dataclass
class RunTotals:
    """Accumulated over the run, for the summary."""
    start_wall: float = field(default_factory=time.perf_counter)
    train_seconds: float = 0.0
    iterations: int = 0
    start_iteration: int | None = None
    start_tokens: int | None = None
    last_loss: float | None = None
    last_val_loss: float | None = None
    excluded: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainLogger:
    """Console line (rank 0), timers, TensorBoard scalars, W&B, metrics.jsonl and the summary."""
    config: Config
    writer: object = None
    metrics: object = None
    wandb_run: object = None
    timers: Timers = field(default_factory=Timers)
    peak: PeakFlops | None = None
    corpus_names: list[str] = field(default_factory=list)
    window: list = field(default_factory=list)
    last_time: float = field(default_factory=time.perf_counter)
    last_skipped: int = 0
    corpus_interval: list[float] = field(default_factory=list)
    corpus_total: list[float] = field(default_factory=list)
    model_numel: int | None = None
    zeros: dict = field(default_factory=dict)  # --log-num-zeros-in-grad: the last count (weight_stats)
    dump_tokens: bool = False  # DUMP_TOKENS (upstream's debug variable): print the first iterations' tokens
    totals: RunTotals = field(default_factory=RunTotals)
    _wandb_pending: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(cls, config: Config, corpus_names: Iterable[str] | None = None, resumed: bool = False,
               skipped_steps: int = 0) -> "TrainLogger":
        """Open the sinks (rank 0) and find the device's peak FLOPS (all ranks, once).
        `resumed`: append to an existing metrics.jsonl; a run that starts from iteration 0 replaces it.
        `skipped_steps`: the engine's skipped-step count at the start (restored from a checkpoint)."""
        writer = metrics = run = None
        if config.runtime.rank == 0:
            if config.logging.tensorboard_dir:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                writer = SummaryWriter(log_dir=config.logging.tensorboard_dir,
                                       max_queue=config.logging.tensorboard_queue_size)
                flat = vars(config.to_args())  # the upstream argument names, as before
                writer.add_text("args", "\n".join(f"    {k} = {v}" for k, v in sorted(flat.items())), 0)
            if config.logging.metrics_file:
                os.makedirs(os.path.dirname(os.path.abspath(config.logging.metrics_file)), exist_ok=True)
                metrics = open(config.logging.metrics_file, "a" if resumed else "w", buffering=1)
            from megatron.observability.wandb_utils import init_wandb  # noqa: PLC0415

            run = init_wandb(config)
        runtime = config.runtime
        peak = resolve_peak(config.logging.peak_tflops, runtime.device_type, runtime.params_dtype,
                            reduce_mean=lambda x: all_reduce_values([x])[0] / max(runtime.world_size, 1))
        if config.runtime.rank == 0:
            print(f"> MFU is measured against {peak.tflops:.4g} TFLOPS per device ({peak.source}); "
                  "set --peak-tflops to use another peak", flush=True)
        names = list(corpus_names or [])
        timers = Timers(log_level=config.logging.timing_log_level, log_option=config.logging.timing_log_option)
        dump = os.environ.get("DUMP_TOKENS", "").strip().lower() not in ("", "0", "false", "no", "off")
        return cls(config, writer, metrics, run, timers, peak, names, last_skipped=skipped_steps,
                   corpus_interval=[0.0] * len(names), corpus_total=[0.0] * len(names), dump_tokens=dump)

    def is_report(self, iteration: int) -> bool:
        """Iterations that print a line: every --log-interval and the last one."""
        return iteration % self.config.logging.log_interval == 0 or iteration == self.config.training.train_iters

    def watch(self, engine) -> None:
        """Hook what must be read inside the step (--log-num-zeros-in-grad: the gradient before the update)."""
        if self.config.logging.log_num_zeros_in_grad:
            from megatron.observability.weight_stats import watch_zeros_in_grad  # noqa: PLC0415

            self.zeros = watch_zeros_in_grad(engine, self.is_report)

    def count_corpora(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Wrap the training data iterator: count the samples each corpus contributes; with DUMP_TOKENS,
        rank 0 prints the first 10 samples of each micro-batch of the run's first 10 iterations (as upstream)."""
        per_iteration = max(int(self.config.runtime.num_micro_batches or 1), 1)
        for k, batch in enumerate(batches):
            if self.dump_tokens and self.config.runtime.rank == 0 and k < DUMP_TOKENS_ITERATIONS * per_iteration:
                rows = torch.as_tensor(batch["text"])[:10].tolist()
                print(f" DUMP_TOKENS iteration {k // per_iteration + 1} of this run, micro-batch "
                      f"{k % per_iteration + 1}: text[:10] = {rows}", flush=True)
            idx = batch.get("dataset_idx") if isinstance(batch, dict) else None
            if idx is not None and self.corpus_names:
                for d, n in zip(*torch.as_tensor(idx).long().flatten().unique(return_counts=True)):
                    self.corpus_interval[int(d)] += float(n)
            yield batch

    # ------------------------------------------------------------------ sinks
    def _scalar(self, key: str, value: float | None, step: int, wandb: bool = True) -> None:
        if value is None or not math.isfinite(value):
            return
        if self.writer:
            self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None and wandb:
            self._wandb_pending.setdefault(step, {})[key] = value

    def _flush_wandb(self) -> None:
        if self.wandb_run is None:
            return
        for step in sorted(self._wandb_pending):
            try:
                self.wandb_run.log(self._wandb_pending[step], step=step)
            except Exception as e:  # noqa: BLE001
                log.warning("W&B log failed: %s", e)
        self._wandb_pending.clear()

    def _record(self, record: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ per iteration
    def _total_iters(self) -> int:
        cfg = self.config
        total = cfg.training.train_iters
        if cfg.training.train_tokens:
            per_iteration = cfg.training.global_batch_size * cfg.model.seq_length
            total = min(total, math.ceil(cfg.training.train_tokens / per_iteration))
        return total

    def train(self, iteration: int, loss: torch.Tensor, engine, consumed_samples: int, consumed_tokens: int) -> None:
        """Called after every iteration (on every rank); reports every `--log-interval` iterations."""
        cfg = self.config
        if self.totals.start_iteration is None:
            self.totals.start_iteration = iteration - 1
            self.totals.start_tokens = consumed_tokens - cfg.training.global_batch_size * cfg.model.seq_length
        self.window.append(loss.detach())
        if not self.is_report(iteration):
            return
        losses = torch.stack(self.window).float().tolist()  # one host sync per log interval
        first_iter = iteration - len(losses) + 1
        self.window.clear()
        now = time.perf_counter()
        excluded = {n: self.timers.elapsed(n) for n in EXCLUDED_TIMERS}
        for n, t in excluded.items():
            self.totals.excluded[n] = self.totals.excluded.get(n, 0.0) + t
        interval = max(now - self.last_time - sum(excluded.values()), 1e-9)
        self.last_time = now
        n_iters = len(losses)
        elapsed = interval / n_iters
        self.totals.train_seconds += interval
        self.totals.iterations += n_iters

        finite = [x for x in losses if math.isfinite(x)]
        n_nan = n_iters - len(finite)
        loss_avg = sum(finite) / len(finite) if finite else float("nan")
        self.totals.last_loss = loss_avg
        skipped_total = int(getattr(engine, "skipped_steps", 0) or 0)
        n_skipped, self.last_skipped = skipped_total - self.last_skipped, skipped_total
        lr = float(engine.lr_scheduler.get_lr()) if engine.lr_scheduler is not None else float("nan")
        gn = engine.get_global_grad_norm()
        grad_norm = float(gn) if gn is not None else float("nan")
        loss_scale = fp16_loss_scale(engine)  # 1.0 without fp16
        samples_s = cfg.training.global_batch_size / elapsed
        tokens_s = samples_s * cfg.model.seq_length
        tgs = tokens_s / cfg.runtime.world_size
        tflops = flops_per_iteration(cfg) / elapsed / 1e12 / cfg.runtime.world_size
        mfu = self.peak.mfu(tflops) if self.peak else float("nan")
        eta = max(self._total_iters() - iteration, 0) * elapsed

        # collectives (every rank, same order)
        timer_block, timer_ms = "", {}
        if cfg.logging.timing_log_level > 0:
            timer_block, timer_ms = self.timers.log_block(list(TIMER_LEVELS), normalizer=n_iters)
        corpus = all_reduce_values(self.corpus_interval, group=_data_parallel_group()) if self.corpus_names else []
        self.corpus_total = [t + c for t, c in zip(self.corpus_total, corpus)]
        self.corpus_interval = [0.0] * len(self.corpus_names)
        mem = memory_stats(cfg.runtime.device_type)
        mem = dict(zip(mem, all_reduce_values(list(mem.values()), op=dist.ReduceOp.MAX if dist.is_initialized() else None)))
        extra = {}  # optional fields of the line, upstream's names
        if self.zeros.get("iteration") == iteration:
            extra["num_zeros"] = self.zeros["num_zeros"]
        if cfg.logging.log_params_norm:
            from megatron.observability.weight_stats import params_norm  # noqa: PLC0415

            extra["params_norm"] = params_norm(engine.module)
        opt_stats = {}
        if cfg.logging.log_optimizer_states_to_tensorboard:
            from megatron.observability.optimizer_stats import optimizer_state_stats  # noqa: PLC0415

            if self.model_numel is None:
                self.model_numel = _model_numel(engine)
            opt_stats = optimizer_state_stats(engine.optimizer, self.model_numel, group=_zero_partition_group())

        if cfg.runtime.rank == 0:
            print(f" iteration={iteration:8d}/{cfg.training.train_iters:8d} | "
                  f"consumed_samples={consumed_samples:12d} | consumed_tokens={consumed_tokens:14d} | "
                  f"elapsed_time_per_iteration_ms={elapsed * 1e3:.1f} | learning_rate={lr:.6e} | "
                  f"global_batch_size={cfg.training.global_batch_size:5d} | lm loss={loss_avg:.6f} | "
                  f"loss_scale={loss_scale:.1f} | grad_norm={grad_norm:.6f} | "
                  + "".join(f"{k}={v} | " if isinstance(v, int) else f"{k}={v:.6f} | " for k, v in extra.items())
                  + f"actual_seqlen={cfg.model.seq_length:5d} | "
                  f"number_of_skipped_iterations={n_skipped:3d} | number_of_nan_iterations={n_nan:3d} | "
                  f"samples_per_second={samples_s:.3f} | tokens_per_gpu_per_second_tgs={tgs:.3f} | "
                  f"TFLOPs={_fmt_tflops(tflops)} | MFU={mfu * 100:.2f}% | ETA={format_duration(eta)} |", flush=True)
            if len(self.corpus_names) > 1:
                print("   samples per corpus (interval/total): " + ", ".join(
                    f"{n}={int(c)}/{int(t)}" for n, c, t in zip(self.corpus_names, corpus, self.corpus_total)),
                    flush=True)
            if timer_block:
                print(timer_block, flush=True)

        # TensorBoard / W&B: the per-iteration loss every --tensorboard-log-interval, the rest per report
        tb_every = max(int(cfg.logging.tensorboard_log_interval or 1), 1)
        gbs_tokens = cfg.training.global_batch_size * cfg.model.seq_length
        for k, x in enumerate(losses):
            it = first_iter + k
            if it % tb_every == 0 or it == iteration:
                self._scalar("lm-loss-training/lm loss", x, it)
                self._scalar("lm-loss-training/lm loss vs samples", x, consumed_samples - (iteration - it) *
                             cfg.training.global_batch_size, wandb=False)
                self._scalar("lm-loss-training/lm loss vs tokens", x, consumed_tokens - (iteration - it) * gbs_tokens,
                             wandb=False)
        if cfg.logging.log_learning_rate_to_tensorboard:
            self._scalar("learning-rate/learning-rate", lr, iteration)
            self._scalar("learning-rate/learning-rate vs tokens", lr, consumed_tokens, wandb=False)
        if cfg.logging.log_loss_scale_to_tensorboard:
            self._scalar("loss/loss_scale", loss_scale, iteration)
        if cfg.logging.log_batch_size_to_tensorboard:
            self._scalar("training/batch-size", cfg.training.global_batch_size, iteration)
        if cfg.logging.log_world_size_to_tensorboard:
            self._scalar("training/world-size", cfg.runtime.world_size, iteration)
        scalars = {
            "training/grad-norm": grad_norm,
            "training/consumed_samples": consumed_samples,
            "training/consumed_tokens": consumed_tokens,
            "training/skipped_iterations": n_skipped,
            "training/nan_iterations": n_nan,
            "throughput/elapsed_ms_per_iteration": elapsed * 1e3,
            "throughput/samples_per_sec": samples_s,
            "throughput/tokens_per_sec": tokens_s,
            "throughput/tokens_per_gpu_per_sec": tgs,
            "throughput/tflops": tflops,
            "throughput/mfu": mfu,
            "throughput/eta_hours": eta / 3600,
        }
        if cfg.logging.log_memory_to_tensorboard:
            scalars.update({f"memory/{k}": v for k, v in mem.items()})
        if "num_zeros" in extra:
            scalars["training/num-zeros"] = extra["num_zeros"]
        if "params_norm" in extra:
            scalars["training/params-norm"] = extra["params_norm"]
        scalars.update({f"optimizer/{k}": v for k, v in opt_stats.items()})
        scalars.update({f"corpus/{n}": t for n, t in zip(self.corpus_names, self.corpus_total)})
        if cfg.logging.log_timers_to_tensorboard:
            scalars.update({f"timers/{k}": v for k, v in timer_ms.items()})
            scalars.update({f"timers/{k}": v * 1e3 for k, v in excluded.items() if v > 0})
        for k, v in scalars.items():
            self._scalar(k, v, iteration)
        self._flush_wandb()
        self._record({
            "iteration": iteration, "lm_loss": loss_avg, "losses": losses, "lr": lr, "grad_norm": grad_norm,
            "loss_scale": loss_scale, **extra, "consumed_samples": consumed_samples, "consumed_tokens": consumed_tokens,
            "ms_per_iter": elapsed * 1e3, "samples_per_sec": samples_s, "tokens_per_sec": tokens_s,
            "tokens_per_gpu_per_sec": tgs, "tflops": tflops, "mfu": mfu, "eta_seconds": eta,
            "skipped_iterations": n_skipped, "skipped_iterations_total": skipped_total, "nan_iterations": n_nan, "memory": mem, "optimizer": opt_stats,
            "timers_ms": timer_ms, "excluded_seconds": excluded,
            "corpus_samples": dict(zip(self.corpus_names, self.corpus_total)),
            "time": time.time(),
        })

    # ------------------------------------------------------------------ evaluation
    def validation(self, iteration: int, loss: float, consumed_tokens: int, consumed_samples: int | None = None) -> None:
        ppl = math.exp(min(20.0, loss))
        self.totals.last_val_loss = loss
        if self.config.runtime.rank == 0:
            line = f" validation loss at iteration {iteration} | lm loss value={loss:.6E} | lm loss PPL={ppl:.6E} | "
            print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)
        if consumed_samples is None:
            consumed_samples = consumed_tokens // self.config.model.seq_length
        self._scalar("lm-loss-validation/lm loss validation", loss, iteration)
        self._scalar("lm-loss-validation/lm loss validation vs samples", loss, consumed_samples, wandb=False)
        self._scalar("lm-loss-validation/lm loss validation vs tokens", loss, consumed_tokens, wandb=False)
        if self.config.logging.log_validation_ppl_to_tensorboard:
            self._scalar("lm-loss-validation/lm loss validation ppl", ppl, iteration)
            self._scalar("lm-loss-validation/lm loss validation ppl vs tokens", ppl, consumed_tokens, wandb=False)
        self._flush_wandb()
        self._record({"iteration": iteration, "val_loss": loss, "val_ppl": ppl, "consumed_tokens": consumed_tokens,
                      "time": time.time()})

    # ------------------------------------------------------------------ end of run
    def summary_rows(self, iteration: int, consumed_tokens: int, checkpoint: str | None) -> list[tuple[str, str]]:
        cfg, t = self.config, self.totals
        for n in EXCLUDED_TIMERS:  # evaluation / checkpoints after the last report
            t.excluded[n] = t.excluded.get(n, 0.0) + self.timers.elapsed(n)
        run_tokens = consumed_tokens - (t.start_tokens if t.start_tokens is not None else consumed_tokens)
        wall = time.perf_counter() - t.start_wall
        tok_s = run_tokens / t.train_seconds if t.train_seconds > 0 else float("nan")
        per_iteration = flops_per_iteration(cfg)
        tflops = (per_iteration * t.iterations / t.train_seconds / 1e12 / cfg.runtime.world_size
                  if t.train_seconds > 0 else float("nan"))
        mfu = self.peak.mfu(tflops) if self.peak else float("nan")
        val = t.last_val_loss
        rows = [
            ("iterations", f"{iteration} (this run: {t.iterations})"),
            ("tokens", f"{consumed_tokens:,} (this run: {run_tokens:,})"),
            ("time", f"{_human_seconds(wall)} wall: {_human_seconds(t.train_seconds)} training, "
                     f"{_human_seconds(t.excluded.get('evaluate', 0.0))} evaluation, "
                     f"{_human_seconds(t.excluded.get('save-checkpoint', 0.0))} checkpoints"),
            ("mean tokens/s", f"{tok_s:,.1f} ({tok_s / cfg.runtime.world_size:,.1f} per device)"),
            ("precision", "bf16" if cfg.precision.bf16 else "fp16" if cfg.precision.fp16 else "fp32"),
            ("mean TFLOPS/device", _fmt_tflops(tflops)),
            ("model compute", f"{per_iteration * t.iterations / 1e12:.4g} TFLOP ({t.iterations} iterations x "
                              f"{per_iteration / 1e9:.4g} GFLOP)"),
            ("MFU", f"{mfu * 100:.2f}% of {self.peak.tflops:.4g} TFLOPS ({self.peak.source})" if self.peak else "n/a"),
            ("final train loss", f"{t.last_loss:.4f}" if t.last_loss is not None else "n/a"),
            ("final val loss (PPL)", f"{val:.4f} ({math.exp(min(20.0, val)):.2f})" if val is not None else "n/a"),
            ("checkpoint", checkpoint or "none (no --save)"),
            ("tensorboard", cfg.logging.tensorboard_dir or "off"),
            ("metrics", cfg.logging.metrics_file or "off"),
        ]
        return rows

    def finish(self, iteration: int, consumed_tokens: int, checkpoint: str | None) -> dict:
        """Print the summary table (rank 0), record it in metrics.jsonl, close every sink."""
        rows = self.summary_rows(iteration, consumed_tokens, checkpoint)
        if self.config.runtime.rank == 0:
            kw, vw = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
            rule = "+" + "-" * (kw + 2) + "+" + "-" * (vw + 2) + "+"
            title = "| " + "run summary".ljust(kw + vw + 3) + " |"
            print("\n".join([rule, title, rule, *(f"| {k.ljust(kw)} | {v.ljust(vw)} |" for k, v in rows), rule]),
                  flush=True)
        summary = dict(rows)
        self._record({"summary": summary, "time": time.time()})
        self.close()
        return summary

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)
            self.wandb_run = None
