"""Training throughput: our trainer vs a plain PyTorch loop around transformers' Llama.

    python bench/train_throughput.py                 # ~25M-parameter model, seq 512, fp32 and bf16
    python bench/train_throughput.py --compile       # ours with --compile (torch.compile)
    python bench/train_throughput.py --small         # tiny model (CI): seconds
    python bench/train_throughput.py --profile       # also top-10 ops of each side's step (torch.profiler)
    python bench/train_throughput.py --kernel-ab --dtypes bf16   # CPU time with each eager kernel off/on

"ours" is the `pretrain_gpt.py` code path, in this process as rank 0 of 1: the arguments parsed
and validated by `megatron.arguments`, the data pipeline (.bin/.idx corpus, blended dataset,
sampler, DataLoader), `GPTModel`, the optimizer registry and LR scheduler under
`deepspeed.initialize` with `build_ds_config`, and `megatron.training.train_step` per iteration.

"hf" is what a user would write instead: `transformers.LlamaForCausalLM` (sdpa attention) with
the same architecture and the same initial weights, `torch.optim.AdamW` with its defaults,
gradient clipping at the same norm, the same batches from a DataLoader over the same dataset,
and `torch.autocast(bfloat16)` for bf16.

Both are timed alternately, step by step (see bench/common.py), and compared by the median of
the per-round ratios ("ours/hf"); "best/best" is the ratio of the fastest iterations, which a
loaded machine disturbs least (load only ever adds time). "data wait" is the share of our
iteration time spent waiting for the next batch (the trainer's batch-generator timer). MFU = model FLOPs per iteration (Megatron's formula,
`megatron.observability.mfu.flops_per_iteration`) / step time / the matmul peak measured between rounds.
Final line: `ratio fp32=<ours/hf tokens/s> bf16=<...> mfu_fp32=<ours MFU, a fraction> mfu_bf16=<...>`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (Interleaved, machine_line, matmul_peak_tflops, median, print_table,  # noqa: E402
                          single_rank_env, write_corpus)

# ≈25M parameters: 6 layers x 3.2M + 2 x 6144 x 512 embeddings (untied).
DEFAULT_MODEL = dict(layers=6, hidden=512, heads=8, kv_heads=8, ffn=1408, vocab=6144, seq=512, mbs=2)
SMALL_MODEL = dict(layers=2, hidden=128, heads=4, kv_heads=4, ffn=384, vocab=1024, seq=128, mbs=4)


def trainer_flags(m: dict, data_list: str, iters: int, dtype: str, zero: int, extra: list[str]) -> list[str]:
    flags = [
        "--num-layers", str(m["layers"]), "--hidden-size", str(m["hidden"]),
        "--num-attention-heads", str(m["heads"]), "--num-key-value-heads", str(m["kv_heads"]),
        "--ffn-hidden-size", str(m["ffn"]), "--seq-length", str(m["seq"]),
        "--max-position-embeddings", str(m["seq"]), "--swiglu", "--normalization", "rmsnorm",
        "--disable-bias-linear", "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        # NullTokenizer: eod = vocab-1; vocab is a multiple of 128, so no padding
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(m["vocab"]),
        "--micro-batch-size", str(m["mbs"]), "--global-batch-size", str(m["mbs"]),
        "--train-iters", str(iters), "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "0", "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-eps", "1e-8",
        "--data-file-list", data_list, "--split", "100,0,0", "--eval-iters", "0", "--eval-interval", "1000000",
        "--log-interval", "1000000", "--zero-stage", str(zero), "--num-workers", "0",
    ]
    if dtype == "bf16":
        flags.append("--bf16")
    return flags + extra


@dataclass
class Ours:
    """Our trainer, one iteration per call."""
    args: argparse.Namespace
    config: object  # megatron.config.Config of `args`, with --compile's decision
    engine: object
    data_iter: object
    timers: object
    eod: int
    device: object
    hf_state: dict
    losses: list = field(default_factory=list)

    @classmethod
    def build(cls, flags: list[str]) -> "Ours":
        import torch

        from megatron.arguments import parse_args
        from megatron.config import Config
        from megatron.initialize import initialize_megatron
        from megatron.model.hf_convert import to_hf_state_dict
        from megatron.observability.timers import Timers
        from megatron import training

        args = parse_args(flags)
        initialize_megatron(args)
        tokenizer = training.build_tokenizer_and_vocab(args)
        train_ds, _, _ = training.build_datasets(Config.from_args(args))
        hf_state: dict = {}

        def before_engine(model):  # the initial weights, for the HF model (DeepSpeed may cast them)
            hf_state.update({k: v.detach().clone().float() for k, v in
                             to_hf_state_dict(model, model.config).items()})

        model, engine = training.setup_model_and_optimizer(args, before_engine=before_engine)
        del model
        loader = training.build_loader(train_ds, Config.from_args(args), consumed_samples=0)
        timers = Timers(log_level=2)  # batch-generator timer: the data wait (no sync cost on CPU)
        torch.manual_seed(0)
        return cls(args, Config.from_args(args), engine, iter(loader), timers, tokenizer.eod, engine.device, hf_state)

    def step(self) -> None:
        from megatron.training import train_step

        self.losses.append(train_step(self.engine, self.data_iter, self.config, self.eod, self.device, self.timers))


@dataclass
class HFLoop:
    """A plain PyTorch loop around transformers.LlamaForCausalLM, one iteration per call."""
    model: object
    optimizer: object
    data_iter: object
    bf16: bool
    clip: float
    losses: list = field(default_factory=list)

    @classmethod
    def build(cls, ours: Ours) -> "HFLoop":
        import torch
        from transformers import LlamaForCausalLM

        from megatron.model.hf_convert import hf_config
        from megatron.config import Config
        from megatron.training import build_datasets, build_loader, model_config

        a = ours.args
        model = LlamaForCausalLM(hf_config(model_config(ours.config), attn_implementation="sdpa"))
        model.load_state_dict(ours.hf_state, strict=False)  # rotary inv_freq is a non-persistent buffer
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps,
                                weight_decay=a.weight_decay)
        config = Config.from_args(a)
        train_ds, _, _ = build_datasets(config)
        loader = build_loader(train_ds, config, consumed_samples=0)
        return cls(model, opt, iter(loader), a.bf16, a.clip_grad)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        text = torch.as_tensor(next(self.data_iter)["text"]).long()
        x, y = text[:, :-1], text[:, 1:]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            logits = self.model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_steps(step, steps: int = 2, top: int = 10) -> dict:
    """torch.profiler over `steps` calls of `step`: the `top` ops by self CPU time with their share of
    the profiled time, and the share of the matrix-multiplication ops (MATMUL_OPS, the flash
    attention kernels included: they are the attention's matmuls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)
    return {"step_ms": total / 1e3 / steps,
            "top": [(e.key, e.self_cpu_time_total / 1e3 / steps, e.self_cpu_time_total / total, e.count // steps)
                    for e in rows[:top]],
            "matmul_share": sum(e.self_cpu_time_total for e in rows if e.key in MATMUL_OPS) / total}


def print_profile(name: str, prof: dict) -> None:
    print_table(f"profile {name}: top ops by self CPU time ({prof['step_ms']:.0f} ms of op time per step; "
                f"matmul ops {prof['matmul_share'] * 100:.1f} % of it, running the model's FLOPs at "
                f"{prof['matmul_rate_of_peak'] * 100:.0f} % of the matmul peak)", ["op", "ms/step", "share", "calls/step"],
                [[k, f"{ms:.1f}", f"{share * 100:.1f}%", str(n)] for k, ms, share, n in prof["top"]])


def plain_kernels(step) -> None:
    """One step of our trainer with the fused eager kernels off (megatron/model/rotary.py,
    fused_cross_entropy.py, fused_norm.py, fused_swiglu.py, attention_cpu.py's causal query blocks):
    the model code as it was before them, same engine and weights."""
    from megatron.model import attention_cpu, fused_cross_entropy, fused_norm, fused_swiglu, rotary

    saved = (rotary.use_fused, fused_cross_entropy.use_fused, fused_norm.use_fused, fused_swiglu.use_fused,
             attention_cpu.CAUSAL_BLOCKS)
    rotary.use_fused = fused_norm.use_fused = fused_swiglu.use_fused = lambda: False
    fused_cross_entropy.use_fused = lambda x: False
    attention_cpu.CAUSAL_BLOCKS = 1
    try:
        step()
    finally:
        (rotary.use_fused, fused_cross_entropy.use_fused, fused_norm.use_fused, fused_swiglu.use_fused,
         attention_cpu.CAUSAL_BLOCKS) = saved


def kernel_sides(ours: "Ours") -> dict:
    """Our step with the eager kernels of rounds three and four (megatron/model/fused_norm.py's RMSNorm,
    fused_swiglu.py's SwiGLU, attention_cpu.py's causal query blocks) all off ("none"), one at a
    time, and all on ("all")."""
    from megatron.model import attention_cpu, fused_norm, fused_swiglu

    blocks = attention_cpu.CAUSAL_BLOCKS

    def side(norm: bool, swiglu: bool, causal_blocks: int):
        def step() -> None:
            saved = fused_norm.use_fused, fused_swiglu.use_fused, attention_cpu.CAUSAL_BLOCKS
            fused_norm.use_fused, fused_swiglu.use_fused = (lambda: norm), (lambda: swiglu)
            attention_cpu.CAUSAL_BLOCKS = causal_blocks
            try:
                ours.step()
            finally:
                fused_norm.use_fused, fused_swiglu.use_fused, attention_cpu.CAUSAL_BLOCKS = saved
        return step

    return {"none": side(False, False, 1), "rmsnorm": side(True, False, 1), "swiglu": side(False, True, 1),
            "causal blocks": side(False, False, blocks), "all": side(True, True, blocks)}


def kernel_ab(m: dict, dtype: str, *, rounds: int, warmup: int, zero: int, extra: list[str], workdir: str) -> dict:
    """One thread, process CPU time per step of our trainer (`kernel_sides`), sides alternated:
    a loaded machine disturbs CPU time much less than wall time. Ratio: median over rounds of
    none's time / the side's time."""
    import torch

    n_sides = 5  # kernel_sides
    iters = (warmup + rounds) * n_sides + 2
    data_list = write_corpus(os.path.join(workdir, f"ab-{dtype}"), (iters + 1) * m["mbs"] * (m["seq"] + 1) * 2,
                             m["vocab"])
    ours = Ours.build(trainer_flags(m, data_list, iters, dtype, zero, extra))
    torch.set_num_threads(1)
    bench = Interleaved(kernel_sides(ours))
    bench.run(rounds, warmup=warmup)
    rows = [[name, f"{median(cpu):.3f}", f"{bench.ratio(name, 'none', cpu=True):.3f}"] for name, cpu in bench.cpu.items()]
    print_table(f"kernel A/B, {dtype}, one thread: process CPU seconds per step, medians of {rounds} interleaved rounds",
                ["kernels on", "CPU s/step", "none/this"], rows)
    return {"dtype": dtype, "cpu": bench.cpu, "ratios": {n: bench.ratio(n, "none", cpu=True) for n in bench.cpu}}


def compare(m: dict, dtype: str, *, rounds: int, warmup: int, zero: int, extra: list[str], workdir: str,
            peak_every: int = 2, profile: bool = False, plain: bool = False) -> dict:
    """Interleaved ours vs hf for one dtype; returns the measured numbers."""
    from megatron.config import Config
    from megatron.observability.mfu import flops_per_iteration

    iters = (warmup + rounds) * (2 if plain else 1) + 6  # "plain" steps draw from our data iterator too; + profiled steps
    n_tokens = (iters + 1) * m["mbs"] * (m["seq"] + 1) * 2
    data_list = write_corpus(os.path.join(workdir, f"data-{dtype}"), n_tokens, m["vocab"])
    ours = Ours.build(trainer_flags(m, data_list, iters, dtype, zero, extra))
    hf = HFLoop.build(ours)
    peaks: list[float] = []
    count = [0]

    def between() -> None:  # the peak, measured under the same load as the steps
        count[0] += 1
        if count[0] % peak_every == 1 or peak_every == 1:
            peaks.append(matmul_peak_tflops(dtype, seconds=0.2))

    sides = {"ours": ours.step, "hf": hf.step}
    if plain:
        sides["plain"] = lambda: plain_kernels(ours.step)
    bench = Interleaved(sides)
    bench.run(0, warmup=warmup)
    ours.timers.elapsed("batch-generator")  # reset: the data wait of the timed iterations only
    bench.run(rounds, warmup=0, between=between)
    data_wait = ours.timers.elapsed("batch-generator")
    a = ours.args
    tokens = a.global_batch_size * a.seq_length
    flops = flops_per_iteration(Config.from_args(a))
    peak = median(peaks)
    t_ours, t_hf = bench.median("ours"), bench.median("hf")
    first_loss = (float(ours.losses[0]), float(hf.losses[0]))
    profiles = {}
    if profile:  # after the timed rounds: the profiler's overhead does not touch the ratios
        profiles = {name: profile_steps(step) for name, step in sides.items()}
        peak_now = matmul_peak_tflops(dtype, seconds=0.2)  # under the profiled steps' load
        for name, prof in profiles.items():
            # the model's FLOPs over the time in matmul ops: how close the matmuls themselves run to the peak
            prof["matmul_rate_of_peak"] = (flops / (prof["matmul_share"] * prof["step_ms"] / 1e3)
                                           / 1e12 / peak_now)
            print_profile(f"{name} {dtype}", prof)
    return {
        "dtype": dtype, "tokens_per_iter": tokens, "flops_per_iter": flops, "peak_tflops": peak,
        "ours_s": t_ours, "hf_s": t_hf, "ours_tok_s": tokens / t_ours, "hf_tok_s": tokens / t_hf,
        "ours_mfu": flops / t_ours / 1e12 / peak, "hf_mfu": flops / t_hf / 1e12 / peak,
        "ratio": bench.ratio("ours", "hf"), "best_ratio": min(bench.samples["hf"]) / min(bench.samples["ours"]),
        "plain_ratio": bench.ratio("ours", "plain") if plain else None,
        "plain_mfu": flops / bench.median("plain") / 1e12 / peak if plain else None,
        "data_wait_frac": data_wait / max(sum(bench.samples["ours"]), 1e-9),
        "first_loss": first_loss, "rounds": rounds, "zero_stage_run": a.zero_stage,
        "samples": {k: [round(x, 4) for x in v] for k, v in bench.samples.items()}, "profiles": profiles,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model (2 layers, hidden 128, seq 128)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--rounds", type=int, default=8, help="timed iterations of each side")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each side first")
    p.add_argument("--zero-stage", type=int, default=1, help="our trainer's ZeRO stage (the launcher's default: 1; "
                   "with one replica the trainer runs 1 and 2 as stage 0)")
    p.add_argument("--keep-zero-stage", action="store_true", help="run ZeRO-1/2 as asked (the trainer's "
                   "--keep-zero-stage): DeepSpeed's ZeRO optimizer with one replica")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 512; 128 with --small)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="ours with --compile")
    p.add_argument("--profile", action="store_true", help="after the timed rounds, profile 2 steps of each side "
                   "(torch.profiler): top 10 ops by self CPU time, share of the step, matmul share")
    p.add_argument("--plain", action="store_true", help="also time our trainer with the fused eager kernels off "
                   "(QKV + RoPE, output layer + loss, RMSNorm, SwiGLU, causal attention blocks): column 'ours/plain'")
    p.add_argument("--kernel-ab", action="store_true", help="instead of the HF comparison: one thread, process CPU "
                   "time of our step with the RMSNorm / SwiGLU / causal-block kernels off, one at a time, all on")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--extra", default="", help="extra trainer flags for ours, space separated")
    opts = p.parse_args(argv)

    single_rank_env()
    import torch

    m = dict(SMALL_MODEL if opts.small else DEFAULT_MODEL)
    if opts.seq:
        m["seq"] = opts.seq
    if opts.micro_batch:
        m["mbs"] = opts.micro_batch
    extra = opts.extra.split() + (["--compile"] if opts.compile else []) + (
        ["--keep-zero-stage"] if opts.keep_zero_stage else [])
    print(f"# train_throughput: {machine_line()}", flush=True)
    results = []
    if opts.kernel_ab:
        with tempfile.TemporaryDirectory() as workdir:
            return [kernel_ab(m, dtype, rounds=opts.rounds, warmup=opts.warmup, zero=opts.zero_stage, extra=extra,
                              workdir=workdir) for dtype in opts.dtypes.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        for dtype in opts.dtypes.split(","):
            results.append(compare(m, dtype, rounds=opts.rounds, warmup=opts.warmup, zero=opts.zero_stage,
                                   extra=extra, workdir=workdir, profile=opts.profile, plain=opts.plain))
            torch.manual_seed(0)
    n_params = None
    try:
        from megatron.model import GPTConfig

        n_params = GPTConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], num_layers=m["layers"],
                             num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                             ffn_hidden_size=m["ffn"], max_position_embeddings=m["seq"]).num_parameters()
    except Exception:  # noqa: BLE001
        pass
    rows = []
    for r in results:
        rows.append([r["dtype"], f"{r['hf_tok_s']:.0f}", f"{r['ours_tok_s']:.0f}", f"{r['ratio']:.3f}",
                     f"{r['best_ratio']:.3f}",
                     f"{r['hf_mfu'] * 100:.1f}%", f"{r['ours_mfu'] * 100:.1f}%", f"{r['peak_tflops'] * 1e3:.0f}",
                     f"{r['data_wait_frac'] * 100:.2f}%", f"{r['first_loss'][0]:.4f}/{r['first_loss'][1]:.4f}"]
                    + ([f"{r['plain_ratio']:.3f}", f"{r['plain_mfu'] * 100:.1f}%"] if opts.plain else []))
    title = (f"train_throughput: {(n_params or 0) / 1e6:.1f}M params, {m['layers']} layers, hidden {m['hidden']}, "
             f"seq {m['seq']}, micro batch {m['mbs']}, ZeRO {opts.zero_stage}"
             f"{'' if results[0]['zero_stage_run'] == opts.zero_stage else ' (runs as 0: one replica)'}"
             f"{', --compile' if opts.compile else ''}; "
             f"medians of {opts.rounds} interleaved iterations")
    print_table(title, ["dtype", "hf tok/s", "ours tok/s", "ours/hf", "best/best", "hf MFU", "ours MFU", "peak GFLOP/s",
                        "ours data wait", "loss@1 ours/hf"] + (["ours/plain", "plain MFU"] if opts.plain else []), rows)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    print("ratio " + " ".join(f"{r['dtype']}={r['ratio']:.3f}" for r in results) + " "
          + " ".join(f"mfu_{r['dtype']}={r['ours_mfu']:.4f}" for r in results), flush=True)
    return results


if __name__ == "__main__":
    main()
