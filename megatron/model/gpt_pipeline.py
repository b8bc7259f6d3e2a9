"""The GPT model cut into pipeline stages for DeepSpeed's pipeline engine (PP > 1).

The stages are made of the very modules of `megatron.model.gpt.GPTModel`: every rank first
builds and initializes the whole `GPTModel` (same seed -> same weights as the PP = 1 model, bit
for bit), then `GPTPipelineModule` keeps the pieces of its own stage and drops the rest. The
layer sequence that DeepSpeed partitions is

    EmbeddingPipe, TransformerLayerPipe x num_layers, FinalPipe               (untied)
    EmbeddingPipe*, TransformerLayerPipe x num_layers, FinalNormPipe, EmbeddingPipe* (tied)

(* one tied module, `TiedLayerSpec("embed")`: the last stage holds a copy of the word
embeddings for the LM head; DeepSpeed broadcasts it from the first stage at start and after a
load, and sums the two gradients before the optimizer step). Transformer layers are spread
evenly over the stages (`partition_method="type:TransformerLayerPipe"`), the embedding goes
with the first and the head with the last.

Between stages flows the hidden state [b, s, h] (a sequence shard of it under Megatron
sequence parallelism), plus the position ids when `--reset-position-ids` gives them (RoPE and
learned positions need them on every stage). The last stage outputs this TP rank's logits;
`PipelineLoss` turns them into the same masked-mean LM loss as the PP = 1 trainer.

Checkpoints are DeepSpeed's pipeline layout: `layer_XX-model_YY-model_states.pt` per layer
(`XX` = position in the sequence above, `YY` = TP rank) plus `mp_rank_ZZ_model_states.pt`
(client state) per stage. `gpt_state_dict()` maps this stage's parameters back to the
`GPTModel` names (`language_model.encoder.layers.{i}....`).

Host memory: during start-up each rank holds the whole model once (it is initialized whole so
the weights do not depend on the number of stages); the other stages' layers are freed as soon
as the pipeline module is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatron.core import tensor_parallel as tp
from megatron.model.gpt import GPTConfig, GPTModel

PARTITION_METHOD = "type:TransformerLayerPipe"
TIED_KEY = "embed"


def _split(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, position_ids or None) from what flows between stages."""
    if isinstance(inputs, (tuple, list)):
        return inputs[0], (inputs[1] if len(inputs) > 1 else None)
    return inputs, None


def _join(x: torch.Tensor, position_ids: torch.Tensor | None):
    return x if position_ids is None else (x, position_ids)


class _Parts:
    """The pieces of a fully built GPTModel that the pipeline layers are made of. LayerSpecs refer
    to it by key; it is emptied once the stage is built, so other stages' layers are freed."""

    def __init__(self, model: GPTModel) -> None:
        lm = model.language_model
        self.items: dict[str, Any] = {"embedding": lm.embedding, "rotary": lm.rotary_pos_emb,
                                      "final_layernorm": lm.encoder.final_layernorm,
                                      "output_layer": getattr(lm, "output_layer", None)}
        for i, layer in enumerate(lm.encoder.layers):
            self.items[f"layer{i}"] = layer

    def __getitem__(self, key: str):
        return self.items[key]

    def clear(self) -> None:
        self.items.clear()

    def __repr__(self) -> str:  # LayerSpec prints its arguments
        return "parts"


class EmbeddingPipe(nn.Module):
    """Stage 0: tokens (or (tokens, position_ids)) -> hidden states. Also the tied LM head."""
    gpt_prefixes = {"embedding.": "language_model.embedding."}

    def __init__(self, parts: _Parts) -> None:
        super().__init__()
        self.embedding = parts["embedding"]

    def forward(self, inputs):
        tokens, position_ids = _split(inputs)
        return _join(self.embedding(tokens, position_ids), position_ids)


class TransformerLayerPipe(nn.Module):
    """One transformer layer; computes its own RoPE tables slice (cheap indexing)."""

    def __init__(self, parts: _Parts, index: int, config: GPTConfig) -> None:
        super().__init__()
        self.layer = parts[f"layer{index}"]
        self.rotary = parts["rotary"]  # no parameters; its cos/sin buffers are not saved
        self.sequence_parallel = config.sequence_parallel and tp.world_size() > 1
        self.recompute = config.recompute_granularity == "full"
        self.gpt_prefixes = {"layer.": f"language_model.encoder.layers.{index}."}

    def forward(self, inputs):
        x, position_ids = _split(inputs)
        rope = None
        if self.rotary is not None:  # the full sequence length (x is a sequence shard under SP)
            seq = x.shape[1] * (tp.world_size() if self.sequence_parallel else 1)
            rope = self.rotary(seq, position_ids)
        if self.recompute and torch.is_grad_enabled():
            x = tp.checkpoint(self.layer, x, rope)
        else:
            x = self.layer(x, rope)
        return _join(x, position_ids)


class FinalNormPipe(nn.Module):
    """Last stage: final norm and the MuP output multiplier (before a tied LM head)."""
    gpt_prefixes = {"final_layernorm.": "language_model.encoder.final_layernorm."}

    def __init__(self, parts: _Parts, config: GPTConfig) -> None:
        super().__init__()
        self.final_layernorm = parts["final_layernorm"]
        self.output_multiplier = config.output_multiplier

    def forward(self, inputs):
        x = self.final_layernorm(_split(inputs)[0])
        return x * self.output_multiplier if self.output_multiplier != 1.0 else x


class FinalPipe(FinalNormPipe):
    """Last stage, untied: final norm, output multiplier, LM head -> this TP rank's logits."""
    gpt_prefixes = {**FinalNormPipe.gpt_prefixes, "output_layer.": "language_model.output_layer."}

    def __init__(self, parts: _Parts, config: GPTConfig) -> None:
        super().__init__(parts, config)
        self.output_layer = parts["output_layer"]

    def forward(self, inputs):
        return self.output_layer(super().forward(inputs))


def _tied_logits(sequence_parallel: bool):
    def head(module: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
        return tp.parallel_lm_logits(x, module.embedding.word_embeddings.weight, sequence_parallel)
    head.__name__ = "tied_lm_head"
    return head


@dataclass
class PipelineLoss:
    """loss_fn of the pipeline module: masked mean of the per-token cross-entropy of one
    micro-batch (labels = (labels, loss_mask)), as the PP = 1 trainer's `forward_loss`.
    `guard`/`iteration` are set by the trainer for the test-only fault injection."""
    guard: Any = None
    iteration: int = 0

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        labels, mask = labels
        losses = tp.vocab_parallel_cross_entropy(logits, labels).float()
        loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
        if self.guard is not None:
            loss = self.guard.inject(self.iteration, loss)
        return loss


def layer_specs(config: GPTConfig, parts: _Parts) -> list:
    """The pipeline's layer sequence (LayerSpecs built lazily on the stage that owns them)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # noqa: PLC0415

    tied = not config.untie_embeddings_and_output_weights
    embed = (TiedLayerSpec(TIED_KEY, EmbeddingPipe, parts, tied_weight_attr="embedding.word_embeddings.weight")
             if tied else LayerSpec(EmbeddingPipe, parts))
    specs = [embed] + [LayerSpec(TransformerLayerPipe, parts, i, config) for i in range(config.num_layers)]
    if tied:
        sp = config.sequence_parallel and tp.world_size() > 1
        specs += [LayerSpec(FinalNormPipe, parts, config),
                  TiedLayerSpec(TIED_KEY, EmbeddingPipe, parts, forward_fn=_tied_logits(sp),
                                tied_weight_attr="embedding.word_embeddings.weight")]
    else:
        specs.append(LayerSpec(FinalPipe, parts, config))
    return specs


def layer_gpt_prefixes(num_layers: int, untied: bool) -> list[dict[str, str]]:
    """Per position in the layer sequence: {local prefix: GPTModel prefix} of its parameters."""
    out = [EmbeddingPipe.gpt_prefixes]
    out += [{"layer.": f"language_model.encoder.layers.{i}."} for i in range(num_layers)]
    if untied:
        return out + [FinalPipe.gpt_prefixes]
    return out + [FinalNormPipe.gpt_prefixes, EmbeddingPipe.gpt_prefixes]


def _gpt_name(name: str, prefixes: dict[str, str]) -> str:
    for local, full in prefixes.items():
        if name.startswith(local):
            return full + name[len(local):]
    raise KeyError(f"pipeline parameter {name} has no GPTModel name (prefixes {list(prefixes)})")


def gpt_param_name(pipeline_name: str, num_layers: int, untied: bool) -> str:
    """The GPTModel name of a pipeline module's parameter name as DeepSpeed records it in a
    checkpoint's ZeRO shards (`<position>.<local name>`, or `tied_modules.embed.<local name>` for
    the tied embedding), e.g. `1.layer.mlp.dense_h_to_4h.weight` ->
    `language_model.encoder.layers.0.mlp.dense_h_to_4h.weight`."""
    head, _, rest = pipeline_name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        if key != TIED_KEY:
            raise KeyError(f"pipeline parameter {pipeline_name}: unknown tied module {key!r}")
        return _gpt_name(rest, EmbeddingPipe.gpt_prefixes)
    prefixes = layer_gpt_prefixes(num_layers, untied)
    if not head.isdigit() or int(head) >= len(prefixes):
        raise KeyError(f"pipeline parameter {pipeline_name} is not at a position of the layer sequence "
                       f"({len(prefixes)} positions for {num_layers} layers)")
    return _gpt_name(rest, prefixes[int(head)])


def read_pipeline_checkpoint(tag_dir: str, num_layers: int, untied: bool, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The module weights of a pipeline checkpoint directory (`global_step<N>`), one TP rank's
    shards, under GPTModel names (`untied`: --untie-embeddings-and-output-weights)."""
    import glob  # noqa: PLC0415
    import os  # noqa: PLC0415

    out: dict[str, torch.Tensor] = {}
    for idx, prefixes in enumerate(layer_gpt_prefixes(num_layers, untied)):
        files = sorted(glob.glob(os.path.join(tag_dir, f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt")))
        for path in files:  # the tied head's copy is not saved (it is the embedding's)
            for name, t in torch.load(path, map_location="cpu", weights_only=True).items():
                out[_gpt_name(name, prefixes)] = t
    return out


def pipeline_topology(pp: int, tp_size: int, dp: int):
    """DeepSpeed topology with the rank layout of megatron.core.parallel_state:
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank (axes pipe, data, model)."""
    from megatron.deepspeed_compat.universal import pipeline_topology as topology  # noqa: PLC0415

    return topology(pp, tp_size, dp)


def build_pipeline_module(model: GPTModel, topology, loss_fn: PipelineLoss | None = None):
    """The `GPTPipelineModule` of this rank's stage, made of `model`'s modules (the class is
    defined lazily: DeepSpeed is imported only when a pipeline is built)."""
    from deepspeed.pipe import PipelineModule  # noqa: PLC0415

    class GPTPipelineModule(PipelineModule):
        def gpt_state_dict(self) -> dict[str, torch.Tensor]:
            """This stage's parameters under their GPTModel names (a tied copy maps to the
            word embeddings too)."""
            out: dict[str, torch.Tensor] = {}
            mods = [m for k, m in self._modules.items() if k != "tied_modules"]
            mods += list(self.tied_modules.values())
            for mod in mods:
                for name, p in mod.named_parameters():
                    out[_gpt_name(name, getattr(mod, "gpt_prefixes", {}))] = p
            return out

    parts = _Parts(model)
    pipe = GPTPipelineModule(layers=layer_specs(model.config, parts), topology=topology,
                             loss_fn=loss_fn or PipelineLoss(), partition_method=PARTITION_METHOD)
    parts.clear()  # the other stages' layers are no longer referenced
    pipe.config = model.config
    return pipe
