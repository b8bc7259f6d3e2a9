"""GPTModel: parity with HF LlamaForCausalLM, init statistics, config checks, names."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from megatron.model import GPTConfig, GPTModel
from megatron.model.gpt import apply_rotary
from megatron.model.hf_convert import from_hf_state_dict, hf_config, to_hf_state_dict

VOCAB, SEQ, BATCH = 256, 16, 2
TOL = 1e-5


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
              num_key_value_heads=2, ffn_hidden_size=160, rope_theta=50000.0,
              max_position_embeddings=64, layernorm_epsilon=1e-5, init_method_std=0.05)
    kw.update(overrides)
    return GPTConfig(**kw)


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Make norms/biases non-trivial so that a swapped mapping cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))


def make_pair(cfg: GPTConfig, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    ours = GPTModel(cfg)
    perturb(ours, seed)
    hf = transformers.LlamaForCausalLM(hf_config(cfg, attn_implementation=attn))
    hf.load_state_dict(to_hf_state_dict(ours, cfg), strict=True)
    return ours.eval(), hf.eval()


def tokens(seed: int = 1, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def shifted_labels(tok: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(tok, -100)
    labels[:, :-1] = tok[:, 1:]
    return labels


# ---------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("kv_heads,bias,attn", [(2, False, "eager"), (1, False, "sdpa"),
                                                (4, False, "eager"), (2, True, "eager")])
def test_logits_and_loss_match_hf(kv_heads, bias, attn):
    cfg = tiny_config(num_key_value_heads=kv_heads, add_bias_linear=bias)
    ours, hf = make_pair(cfg, attn)
    tok = tokens()
    with torch.no_grad():
        logits = ours(tok)
        ref = hf(input_ids=tok, labels=tok)
        loss = ours(tok, labels=shifted_labels(tok))
    assert logits.shape == (BATCH, SEQ, VOCAB) and logits.dtype == torch.float32
    assert logits.std() > 0.1  # logits are not trivially small
    assert (logits - ref.logits).abs().max().item() < TOL
    assert loss.shape == (BATCH, SEQ) and loss.dtype == torch.float32
    assert (loss[:, -1] == 0).all()  # label -100 -> 0
    assert abs(loss[:, :-1].mean().item() - ref.loss.item()) < TOL


def test_hf_to_ours():
    cfg = tiny_config()
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(hf_config(cfg, attn_implementation="eager")).eval()
    perturb(hf, 3)
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    tok = tokens(2)
    with torch.no_grad():
        assert (ours(tok) - hf(tok).logits).abs().max().item() < TOL
    # round trip is exact
    back = to_hf_state_dict(ours, cfg)
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_gradients_match_hf():
    cfg = tiny_config()
    ours, hf = make_pair(cfg)
    tok = tokens(4)
    ours(tok, labels=shifted_labels(tok))[:, :-1].mean().backward()
    hf(input_ids=tok, labels=tok).loss.backward()
    ours_grads = to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, cfg)
    hf_grads = dict(hf.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        g = hf_grads[name].grad
        assert g.abs().max() > 1e-4
        assert (ours_grads[name] - g).abs().max().item() < TOL, name


def test_tied_embeddings_match_hf():
    cfg = tiny_config(untie_embeddings_and_output_weights=False)
    ours, hf = make_pair(cfg)
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert "language_model.output_layer.weight" not in ours.state_dict()
    tok = tokens(5)
    with torch.no_grad():
        assert (ours(tok) - hf(tok).logits).abs().max().item() < TOL


def test_position_ids_match_hf():
    ours, hf = make_pair(tiny_config())
    tok = tokens(6)
    pos = torch.arange(SEQ).expand(BATCH, SEQ) + torch.tensor([[0], [7]])
    with torch.no_grad():
        assert torch.equal(ours(tok), ours(tok, position_ids=torch.arange(SEQ)))
        diff = (ours(tok, position_ids=pos) - hf(tok, position_ids=pos).logits).abs().max()
    assert diff.item() < TOL


def test_llama_incompatible_configs_rejected():
    for kw in (dict(normalization="layernorm"), dict(swiglu=False), dict(rotary_percent=0.5),
               dict(use_rotary_position_embeddings=False)):
        with pytest.raises(ValueError, match="not representable"):
            hf_config(tiny_config(**kw))


def test_module_prefix_accepted():
    cfg = tiny_config(num_layers=1)
    model = GPTModel(cfg)
    plain = to_hf_state_dict(model, cfg)
    prefixed = to_hf_state_dict({"module." + k: v for k, v in model.state_dict().items()}, cfg)
    assert plain.keys() == prefixed.keys()
    assert all(torch.equal(plain[k], prefixed[k]) for k in plain)


# ---------------------------------------------------------------- RoPE


def manual_rope(x: torch.Tensor, rot: int, theta: float) -> torch.Tensor:
    """x [s, d]: rotate pairs (j, j + rot/2), j < rot/2, by angle pos * theta^(-2j/rot)."""
    out = x.clone()
    half = rot // 2
    for pos in range(x.shape[0]):
        for j in range(half):
            a = pos * theta ** (-2 * j / rot)
            x1, x2 = x[pos, j].item(), x[pos, j + half].item()
            out[pos, j] = x1 * math.cos(a) - x2 * math.sin(a)
            out[pos, j + half] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def test_rotary_percent_half_against_hand_computed_attention():
    cfg = tiny_config(num_layers=1, rotary_percent=0.5)  # d_head 16 -> 8 rotated dims
    assert cfg.rotary_dim == 8
    model = GPTModel(cfg).eval()
    lm = model.language_model
    attn = lm.encoder.layers[0].self_attention
    s, d, g = 6, cfg.kv_channels, 2
    x = torch.randn(1, s, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = attn(x, lm.rotary_pos_emb(s, None))[0]
        w = attn.query_key_value.weight.view(cfg.num_key_value_heads, g + 2, d, -1)
        heads = []
        for h in range(cfg.num_attention_heads):
            kv, j = divmod(h, g)
            q = manual_rope(x[0] @ w[kv, j].T, 8, cfg.rope_theta)
            k = manual_rope(x[0] @ w[kv, g].T, 8, cfg.rope_theta)
            v = x[0] @ w[kv, g + 1].T
            scores = (q @ k.T) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        want = torch.cat(heads, dim=-1) @ attn.dense.weight.T
    assert (got - want).abs().max().item() < TOL
    # the unrotated half passes through unchanged
    q = torch.randn(1, s, 2, d)
    cos, sin = lm.rotary_pos_emb(s, None)
    assert torch.equal(apply_rotary(q, cos, sin)[..., 8:], q[..., 8:])


def test_rope_tables_are_float32_non_persistent_buffers():
    model = GPTModel(tiny_config())
    rope = model.language_model.rotary_pos_emb
    assert rope.cos.shape == (64, 16) and rope.cos.dtype == torch.float32
    assert not any("rotary" in k for k in model.state_dict())
    pos = 5
    assert abs(rope.cos[pos, 1].item() - math.cos(pos * 50000.0 ** (-2 / 16))) < 1e-6


# ---------------------------------------------------------------- init


def test_init_statistics():
    std, L = 0.02, 4
    cfg = tiny_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=8,
                      ffn_hidden_size=512, num_layers=L, init_method_std=std,
                      word_embedding_init_std=0.632455532, add_bias_linear=True)
    sd = GPTModel(cfg).state_dict()
    layer = "language_model.encoder.layers.1."

    def rel(name, target):
        return abs(sd[name].std().item() / target - 1)

    assert rel(layer + "self_attention.query_key_value.weight", std) < 0.05
    assert rel(layer + "mlp.dense_h_to_4h.weight", std) < 0.05
    assert rel("language_model.output_layer.weight", std) < 0.05
    assert rel(layer + "self_attention.dense.weight", std / math.sqrt(2 * L)) < 0.05
    assert rel(layer + "mlp.dense_4h_to_h.weight", std / math.sqrt(2 * L)) < 0.05
    assert rel("language_model.embedding.word_embeddings.weight", 0.632455532) < 0.05
    assert abs(sd[layer + "mlp.dense_h_to_4h.weight"].mean().item()) < 1e-3
    assert torch.equal(sd[layer + "input_layernorm.weight"], torch.ones(256))
    assert torch.equal(sd[layer + "self_attention.dense.bias"], torch.zeros(256))

    unscaled = GPTModel(GPTConfig(**{**cfg.__dict__, "apply_residual_scaled_init": False,
                                     "word_embedding_init_std": None})).state_dict()
    for name in (layer + "mlp.dense_4h_to_h.weight",
                 "language_model.embedding.word_embeddings.weight"):
        assert abs(unscaled[name].std().item() / std - 1) < 0.05


def test_xavier_init():
    cfg = tiny_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=8,
                      ffn_hidden_size=512, init_method_xavier_uniform=True, init_method_std=0.01)
    sd = GPTModel(cfg).state_dict()
    w = sd["language_model.encoder.layers.0.mlp.dense_4h_to_h.weight"]  # [256, 512]
    assert abs(w.std().item() / math.sqrt(2 / (256 + 512)) - 1) < 0.05
    bound = math.sqrt(6 / (256 + 512))
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound
    emb = sd["language_model.embedding.word_embeddings.weight"]
    assert abs(emb.std().item() / 0.01 - 1) < 0.05  # embeddings stay normal


def test_init_weights_seed_is_deterministic_and_private():
    model = GPTModel(tiny_config(num_layers=1))
    rng = torch.get_rng_state()
    model.init_weights(seed=7)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(torch.get_rng_state(), rng)
    model.init_weights(seed=7)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    model.init_weights(seed=8)
    name = "language_model.encoder.layers.0.self_attention.query_key_value.weight"
    assert not torch.equal(first[name], model.state_dict()[name])


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kw,match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "divisible by num_key_value_heads"),
    (dict(hidden_size=66, num_attention_heads=4), "hidden_size .* divisible"),
    (dict(rotary_percent=0.0), "rotary_percent"),
    (dict(rotary_percent=1.5), "rotary_percent"),
    (dict(rotary_percent=0.2), "even"),
    (dict(normalization="batchnorm"), "normalization"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(num_layers=0), "num_layers"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_config_defaults():
    c = GPTConfig(vocab_size=32000, hidden_size=4096, num_layers=2, num_attention_heads=32)
    assert (c.num_key_value_heads, c.kv_channels, c.ffn_hidden_size) == (32, 128, 10880)
    assert GPTConfig(vocab_size=8, hidden_size=64, num_layers=1, num_attention_heads=4,
                     swiglu=False).ffn_hidden_size == 256
    c = tiny_config(hidden_size=66, num_attention_heads=4, num_key_value_heads=4, kv_channels=16)
    assert GPTModel(c)(tokens(seq=4)).shape == (BATCH, 4, VOCAB)


# ---------------------------------------------------------------- behaviour


VARIANTS = [
    {},
    dict(untie_embeddings_and_output_weights=False),
    dict(normalization="layernorm", swiglu=False, add_bias_linear=True,
         use_rotary_position_embeddings=False),
    dict(kv_channels=8, num_key_value_heads=1, rotary_percent=0.5),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_causal(kw):
    model = GPTModel(tiny_config(**kw)).eval()
    tok = tokens(7)
    t = 7
    changed = tok.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tok), model(changed)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max().item() < 1e-6
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max().item() > 1e-4


@pytest.mark.parametrize("kw", VARIANTS + [dict(recompute_granularity="selective"),
                                        dict(recompute_granularity="full", recompute_num_layers=1)])
def test_document_attention_mask_equals_separate_documents(kw):
    """--reset-attention-mask with --reset-position-ids: each packed document gives the logits it
    has alone; and gradients flow through the recompute paths with the mask."""
    from megatron.data.gpt_dataset import document_attention_mask, reset_position_ids

    model = GPTModel(tiny_config(**kw))
    perturb(model)
    eod = VOCAB - 1
    a, b = tokens(3, batch=1, seq=6) % eod, tokens(4, batch=1, seq=9) % eod
    a[0, -1] = eod  # document a ends with its EOD token, which belongs to it
    packed = torch.cat([a, b], dim=1)
    mask, pos = document_attention_mask(packed, eod), reset_position_ids(packed, eod)
    assert pos[0].tolist() == list(range(6)) + list(range(9))
    out = model(packed, position_ids=pos, attention_mask=mask)
    with torch.no_grad():
        alone_a, alone_b = model(a), model(b)
        plain = model(packed, position_ids=pos)  # causal only: b sees a
    assert (out[:, :6] - alone_a).abs().max().item() < TOL
    assert (out[:, 6:] - alone_b).abs().max().item() < TOL
    assert (plain[:, 6:] - alone_b).abs().max().item() > 1e-3
    out.square().mean().backward()  # the mask is passed through (selective / full) recompute
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kw", VARIANTS)
def test_parameter_count(kw):
    cfg = tiny_config(**kw)
    model = GPTModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == cfg.num_parameters() == total
    emb = cfg.vocab_size * cfg.hidden_size * (2 if cfg.untie_embeddings_and_output_weights else 1)
    if not cfg.use_rotary_position_embeddings:
        emb += cfg.max_position_embeddings * cfg.hidden_size
    assert model.num_parameters(exclude_embeddings=True) == cfg.num_parameters(True) == total - emb


def test_dropout_only_in_training():
    model = GPTModel(tiny_config(hidden_dropout=0.1, attention_dropout=0.1))
    tok = tokens(8)
    with torch.no_grad():
        assert not torch.equal(model.train()(tok), model(tok))
        assert torch.equal(model.eval()(tok), model(tok))


def test_sequence_longer_than_max_positions_rejected():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        GPTModel(tiny_config(max_position_embeddings=8))(tokens(seq=9))


LAYER_NAMES = {
    "language_model.encoder.layers.0.input_layernorm.weight",
    "language_model.encoder.layers.0.self_attention.query_key_value.weight",
    "language_model.encoder.layers.0.self_attention.dense.weight",
    "language_model.encoder.layers.0.post_attention_layernorm.weight",
    "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight",
    "language_model.encoder.layers.0.mlp.dense_4h_to_h.weight",
    "language_model.encoder.final_layernorm.weight",
}


def test_parameter_names():
    cfg = tiny_config(num_layers=1)
    sd = GPTModel(cfg).state_dict()
    assert set(sd) == LAYER_NAMES | {"language_model.embedding.word_embeddings.weight",
                                     "language_model.output_layer.weight"}
    h, d, f = 64, 16, 160
    assert sd["language_model.encoder.layers.0.self_attention.query_key_value.weight"].shape == (
        (4 + 2 * 2) * d, h)
    assert sd["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape == (2 * f, h)

    tied = GPTModel(tiny_config(num_layers=1, untie_embeddings_and_output_weights=False))
    assert set(tied.state_dict()) == LAYER_NAMES | {
        "language_model.embedding.word_embeddings.weight"}

    gpt2ish = GPTModel(tiny_config(num_layers=1, use_rotary_position_embeddings=False,
                                   normalization="layernorm", add_bias_linear=True))
    biases = {n.replace(".weight", ".bias") for n in LAYER_NAMES}
    assert set(gpt2ish.state_dict()) == LAYER_NAMES | biases | {
        "language_model.embedding.word_embeddings.weight",
        "language_model.embedding.position_embeddings.weight",
        "language_model.output_layer.weight"}


def test_trainer_forward_loss_applies_reset_flags():
    """training.forward_loss passes --reset-attention-mask / --reset-position-ids to the model."""
    from megatron.config import DataConfig

    from megatron.data.gpt_dataset import document_attention_mask, reset_position_ids
    from megatron.training import forward_loss

    model = GPTModel(tiny_config())
    perturb(model)
    eod = VOCAB - 1
    text = tokens(5, batch=2, seq=SEQ + 1) % eod
    text[0, 5] = text[1, 9] = eod
    x, y = text[:, :-1], text[:, 1:]

    def loss(reset_mask: bool, reset_pos: bool) -> float:
        data = DataConfig(eod_mask_loss=False, reset_position_ids=reset_pos, reset_attention_mask=reset_mask)
        with torch.no_grad():
            return float(forward_loss(model, {"text": text}, data, eod, torch.device("cpu")))

    with torch.no_grad():
        want = model(x, position_ids=reset_position_ids(x, eod), labels=y,
                     attention_mask=document_attention_mask(x, eod)).mean()
        plain = model(x, labels=y).mean()
    assert abs(loss(True, True) - float(want)) < 1e-6
    assert abs(loss(False, False) - float(plain)) < 1e-6
    assert abs(loss(True, True) - loss(False, False)) > 1e-4
