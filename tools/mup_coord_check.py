#!/usr/bin/env python
"""Coordinate check for MuP (width) and CompleteP (depth).

Trains the real GPTModel (Llama-style: RMSNorm, SwiGLU, RoPE) at several widths (and depths) for a
few AdamW steps on a fixed synthetic batch stream, then measures the RMS of the activations of every
layer. Under a correct parametrization these curves are flat in width (MuP) and depth (CompleteP);
under the standard parametrization (SP) they grow with width (and with depth). Writes a PNG with
one panel per comparison and prints the table:

    python tools/mup_coord_check.py --widths 64 128 256 512 --depths 2 4 8 --out coord_check.png

Width sweeps keep 4 heads (the head dimension grows with the width, so the 1/d attention scale is
exercised) and ffn = 8/3 x width; the base width is the smallest width. Depth sweeps use the MuP
model at `--depth-width` and compare residual branches without and with the (L / L_base)^-alpha
multiplier, L_base being the smallest depth. See ALCF/notes/mup.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.config import ModelConfig, OptimizerConfig  # noqa: E402
from megatron.model import GPTConfig, GPTModel  # noqa: E402
from megatron.model.mup import Parametrization, parametrize_param_groups  # noqa: E402
from megatron.optimizer import get_param_groups  # noqa: E402


@dataclass
class CoordCheckSettings:
    steps: int = 3
    lr: float = 1e-2
    batch: int = 4
    seq: int = 32
    vocab: int = 64  # tokens must repeat within a batch (see width_sweep)
    heads: int = 4
    num_layers: int = 2  # width sweeps
    init_std: float = 0.02
    depth_alpha: float = 1.0
    seed: int = 1234


@dataclass
class Sweep:
    """RMS of each tracked activation (key) at each size, for one parametrization."""
    label: str
    sizes: list[int]
    rms: dict[str, list[float]] = field(default_factory=dict)

    def spread(self, key: str) -> float:
        """max / min over the sizes of one activation's RMS."""
        v = self.rms[key]
        return max(v) / min(v)

    def max_spread(self) -> float:
        return max(self.spread(k) for k in self.rms)


def _batches(s: CoordCheckSettings, n: int) -> list[torch.Tensor]:
    """Fixed token batches with learnable structure (arithmetic runs), identical for every model size."""
    g = torch.Generator().manual_seed(s.seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, s.vocab, (s.batch, 1), generator=g)
        stride = torch.randint(1, 4, (s.batch, 1), generator=g)
        out.append((start + stride * torch.arange(s.seq + 1)) % s.vocab)
    return out


def _sections(width: int, depth: int, par: Parametrization) -> tuple[ModelConfig, OptimizerConfig]:
    """The configuration sections `parametrize_param_groups` reads."""
    model = ModelConfig(hidden_size=width, num_layers=depth, enable_mup=par.mup, mup_width_multiplier=par.width_mult,
                        mup_input_alpha=par.input_alpha, mup_output_alpha=par.output_alpha,
                        mup_attn_alpha=par.attn_alpha, enable_depth_scale=par.depth,
                        depth_multiplier=par.depth_mult, depth_alpha=par.depth_alpha)
    return model, OptimizerConfig(adam_eps=1e-8, optimizer="adamw")


def train_and_measure(width: int, depth: int, par: Parametrization, s: CoordCheckSettings) -> dict[str, float]:
    """Train `s.steps` AdamW steps, then return the RMS of each layer's activations on a held-out batch.

    Keys: ``embedding``, ``layer{i}.attn`` / ``layer{i}.mlp`` (branch outputs before the residual
    multiplier), ``layer{i}`` (residual stream after layer i), ``logits``.
    """
    torch.manual_seed(s.seed)
    cfg = GPTConfig(vocab_size=s.vocab, hidden_size=width, num_layers=depth, num_attention_heads=s.heads,
                    ffn_hidden_size=(8 * width) // 3, max_position_embeddings=s.seq, init_method_std=s.init_std,
                    **par.model_fields(depth, width // s.heads))
    model = GPTModel(cfg)
    named = list(model.named_parameters())
    groups = parametrize_param_groups(get_param_groups(named), named, *_sections(width, depth, par))
    for g in groups:
        g["lr"] = s.lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = 0.0
    opt = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    data = _batches(s, s.steps + 1)
    model.train()
    for batch in data[: s.steps]:
        loss = model(batch[:, :-1], labels=batch[:, 1:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    acts: dict[str, float] = {}

    def hook(key: str):
        def fn(_module, _inputs, output):
            acts[key] = output.detach().float().pow(2).mean().sqrt().item()
        return fn

    lm = model.language_model
    handles = [lm.embedding.register_forward_hook(hook("embedding"))]
    for i, layer in enumerate(lm.encoder.layers):
        handles.append(layer.self_attention.register_forward_hook(hook(f"layer{i}.attn")))
        handles.append(layer.mlp.register_forward_hook(hook(f"layer{i}.mlp")))
        handles.append(layer.register_forward_hook(hook(f"layer{i}")))
    model.eval()
    with torch.no_grad():
        logits = model(data[-1][:, :-1])
    for h in handles:
        h.remove()
    acts["logits"] = logits.float().pow(2).mean().sqrt().item()
    return acts


def width_sweep(widths: list[int], mup: bool, s: CoordCheckSettings) -> Sweep:
    base = min(widths)
    sweep = Sweep("MuP" if mup else "SP", list(widths))
    for w in widths:
        par = Parametrization(mup=mup, width_mult=w / base)
        for k, v in train_and_measure(w, s.num_layers, par, s).items():
            sweep.rms.setdefault(k, []).append(v)
    return sweep


def _depth_keys(acts: dict[str, float], depth: int) -> dict[str, float]:
    """Names at equal relative depth (CompleteP compares layer l of L with layer 2l of 2L): the layer
    ending the first half, the last layer, the embedding and the logits."""
    out = {"embedding": acts["embedding"], "logits": acts["logits"]}
    for name, i in (("mid", depth // 2 - 1), ("last", depth - 1)):
        for suffix in ("", ".attn", ".mlp"):
            out[f"{name}_layer{suffix}"] = acts[f"layer{i}{suffix}"]
    return out


def depth_sweep(depths: list[int], width: int, complete_p: bool, s: CoordCheckSettings) -> Sweep:
    """MuP model of `width` (its own base) at each depth, with or without CompleteP depth scaling."""
    base = min(depths)
    sweep = Sweep("CompleteP" if complete_p else "no depth scaling", list(depths))
    for d in depths:
        par = Parametrization(mup=True, width_mult=1.0, depth=complete_p, depth_mult=d / base,
                              depth_alpha=s.depth_alpha, depth_base=base)
        for k, v in _depth_keys(train_and_measure(width, d, par, s), d).items():
            sweep.rms.setdefault(k, []).append(v)
    return sweep


def plot(panels: list[tuple[str, Sweep]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(5.0 * len(panels), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    shared_y = (min(min(v) for _, sw in panels for v in sw.rms.values()),
                max(max(v) for _, sw in panels for v in sw.rms.values()))
    for ax, (xlabel, sw) in zip(axes, panels):
        for key, vals in sw.rms.items():
            ax.plot(sw.sizes, vals, marker="o", markersize=3, linewidth=1, label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(shared_y[0] / 1.5, shared_y[1] * 1.5)
        ax.set_xticks(sw.sizes, [str(x) for x in sw.sizes])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("activation RMS after training steps")
        ax.set_title(f"{sw.label} (max spread {sw.max_spread():.1f}x)")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8], help="empty: no depth check")
    p.add_argument("--depth-width", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--depth-alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="mup_coord_check.png", help="PNG path")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    s = CoordCheckSettings(steps=a.steps, lr=a.lr, depth_alpha=a.depth_alpha, seed=a.seed)
    panels = [("width", width_sweep(a.widths, False, s)), ("width", width_sweep(a.widths, True, s))]
    if a.depths:
        panels += [("depth (layers)", depth_sweep(a.depths, a.depth_width, False, s)),
                   ("depth (layers)", depth_sweep(a.depths, a.depth_width, True, s))]
    for _, sw in panels:
        print(f"{sw.label}: sizes {sw.sizes}, max spread {sw.max_spread():.2f}x")
        for k, v in sw.rms.items():
            print(f"  {k:>18s} " + " ".join(f"{x:9.4f}" for x in v) + f"   spread {sw.spread(k):.2f}x")
    plot(panels, a.out)
    print(f"wrote {a.out}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({sw.label: {"sizes": sw.sizes, "rms": sw.rms} for _, sw in panels}, f, indent=1)
    bad = [sw.label for _, sw in panels if sw.label in ("MuP", "CompleteP") and not sw.max_spread() < 2.0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
