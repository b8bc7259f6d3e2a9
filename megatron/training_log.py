"""Training logs: the per-iteration console line (upstream-spec §11.1 fields), validation lines,
TensorBoard scalars and a JSONL metrics file. Rank 0 writes; values are already reduced."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch


def flops_per_iteration(args) -> float:
    """Megatron-LM's model FLOPs of one iteration (forward + backward), upstream-spec §11.1."""
    b, s, L, h = args.global_batch_size, args.seq_length, args.num_layers, args.hidden_size
    f, V = args.ffn_hidden_size, args.padded_vocab_size
    gated = 1.5 if args.swiglu else 1.0
    return 12 * b * s * L * h * h * (1 + (f / h) * gated + args.num_key_value_heads / args.num_attention_heads
                                     + s / h + V / (2 * L * h))


@dataclass
class TrainLogger:
    """Console line (rank 0), TensorBoard scalars and a JSONL metrics file."""
    args: object
    writer: object = None
    metrics: object = None
    window: list = field(default_factory=list)
    last_time: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, args) -> "TrainLogger":
        writer = metrics = None
        if args.rank == 0:
            if args.tensorboard_dir:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
            if args.metrics_file:
                os.makedirs(os.path.dirname(os.path.abspath(args.metrics_file)), exist_ok=True)
                metrics = open(args.metrics_file, "a", buffering=1)
        return cls(args, writer, metrics)

    def _emit(self, record: dict, scalars: dict, step: int) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
        if self.writer:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def train(self, iteration: int, loss: torch.Tensor, engine, consumed_samples: int, consumed_tokens: int) -> None:
        self.window.append(loss)
        a = self.args
        if iteration % a.log_interval and iteration != a.train_iters:
            return
        losses = torch.stack(self.window).float().tolist()  # one host sync per log interval
        self.window.clear()
        now = time.perf_counter()
        elapsed = (now - self.last_time) / len(losses)
        self.last_time = now
        lr = engine.lr_scheduler.get_lr()
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        loss_avg = sum(losses) / len(losses)
        samples_s = a.global_batch_size / elapsed
        tgs = samples_s * a.seq_length / a.world_size
        tflops = flops_per_iteration(a) / elapsed / 1e12 / a.world_size
        if a.rank == 0:
            print(f" iteration={iteration:8d}/{a.train_iters:8d} | consumed_samples={consumed_samples:12d} | "
                  f"consumed_tokens={consumed_tokens:14d} | elapsed_time_per_iteration_ms={elapsed * 1e3:.1f} | "
                  f"learning_rate={lr:.6e} | global_batch_size={a.global_batch_size:5d} | lm loss={loss_avg:.6f} | "
                  f"loss_scale=1.0 | grad_norm={grad_norm:.3f} | actual_seqlen={a.seq_length:5d} | "
                  f"number_of_skipped_iterations={engine.skipped_steps:3d} | number_of_nan_iterations=  0 | "
                  f"samples_per_second={samples_s:.3f} | tokens_per_gpu_per_second_tgs={tgs:.3f} | "
                  f"TFLOPs={tflops:.2f} |", flush=True)
        self._emit({"iteration": iteration, "lm_loss": loss_avg, "losses": losses, "lr": lr,
                    "grad_norm": grad_norm, "consumed_samples": consumed_samples,
                    "consumed_tokens": consumed_tokens, "ms_per_iter": elapsed * 1e3,
                    "tokens_per_sec": samples_s * a.seq_length},
                   {"lm-loss-training/lm loss": loss_avg, "learning-rate/learning-rate": lr,
                    "training/grad-norm": grad_norm, "throughput/tokens_per_sec": samples_s * a.seq_length,
                    "throughput/tflops": tflops}, iteration)
        if self.writer:
            self.writer.add_scalar("lm-loss-training/lm loss vs tokens", loss_avg, consumed_tokens)

    def validation(self, iteration: int, loss: float, consumed_tokens: int) -> None:
        ppl = math.exp(min(20.0, loss))
        if self.args.rank == 0:
            line = f" validation loss at iteration {iteration} | lm loss value={loss:.6E} | lm loss PPL={ppl:.6E} | "
            print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)
        self._emit({"iteration": iteration, "val_loss": loss, "val_ppl": ppl, "consumed_tokens": consumed_tokens},
                   {"lm-loss-validation/lm loss validation": loss, "lm-loss-validation/lm loss validation ppl": ppl},
                   iteration)
        if self.writer:
            self.writer.add_scalar("lm-loss-validation/lm loss validation vs tokens", loss, consumed_tokens)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.metrics:
            self.metrics.close()
