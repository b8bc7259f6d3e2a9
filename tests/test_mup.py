"""MuP / CompleteP: multiplier table (hand-computed), parameter groups, init stds, forward multipliers
(checked against direct computations), argument checks."""
from __future__ import annotations

import math

import pytest
import torch

from megatron.model import GPTConfig, GPTModel
from megatron.model.mup import Parametrization, param_role, parametrize_param_groups
from megatron.optimizer import get_param_groups
from megatron.config import Config, default_args


def test_multiplier_table_hand_computed():
    p = Parametrization(mup=True, width_mult=4.0, depth=True, depth_mult=2.0, depth_alpha=0.5)
    h = p.multipliers("hidden")
    assert h.lr == pytest.approx(2 ** -0.5 / 4) and h.wd == pytest.approx(4.0)
    assert h.eps == pytest.approx(2 ** -0.5 / 4)
    v = p.multipliers("layer_vector")
    assert (v.lr, v.eps) == (pytest.approx(2 ** -0.5), pytest.approx(2 ** -0.5 / 4))
    for role in ("embedding", "output", "final_vector"):
        m = p.multipliers(role)
        assert (m.lr, m.wd, m.eps) == (1.0, 1.0, pytest.approx(0.25))
    assert p.residual_multiplier == pytest.approx(2 ** -0.5)
    assert p.output_multiplier == pytest.approx(0.25) and p.attention_scale(32) == pytest.approx(1 / 32)
    cp = Parametrization(depth=True, depth_mult=4.0, depth_alpha=1.0)  # CompleteP alone: no LR change
    assert cp.multipliers("hidden").lr == pytest.approx(1.0) and cp.residual_multiplier == pytest.approx(0.25)
    assert cp.multipliers("hidden").eps == pytest.approx(0.25) and cp.attention_scale(32) is None
    # Muon hidden matrices: RMS-matched muon scales by m_N^-1/2, Keller-scaled muonclip not at all
    assert p.multipliers("hidden", muon=True, optimizer="muon").lr == pytest.approx(2 ** -0.5 / 2)
    assert p.multipliers("hidden", muon=True, optimizer="muonclip").lr == pytest.approx(2 ** -0.5)
    off = Parametrization()
    assert not off.enabled and off.multipliers("hidden") == off.multipliers("embedding")


def tiny(**kw) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                              ffn_hidden_size=64, max_position_embeddings=16, **kw))


def mup_args(**kw):
    base = dict(enable_mup=True, mup_base_width=8, mup_width_multiplier=None, mup_input_alpha=1.0,
                mup_output_alpha=1.0, mup_attn_alpha=1.0, enable_depth_scale=True, depth_base=1,
                depth_multiplier=None, depth_alpha=1.0, hidden_size=32, num_layers=2, num_attention_heads=4,
                kv_channels=None, adam_eps=1e-8, optimizer="adamw", init_method_xavier_uniform=False)
    base.update(kw)
    return Config.from_args(default_args(**base))


def test_param_groups_split_by_role():
    model = tiny()
    named = list(model.named_parameters())
    groups = parametrize_param_groups(get_param_groups(named), named, mup_args().model, mup_args().optimizer)  # m_N = 4, m_L = 2
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for _, p in named) and len(ids) == len(set(ids))
    role = {id(p): param_role(n, p.ndim) for n, p in named}
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay.embedding", "decay.output", "decay.hidden", "no_decay.layer_vector",
                            "no_decay.final_vector"}
    hid = by_name["decay.hidden"]
    assert all(role[id(p)] == "hidden" for p in hid["params"]) and len(hid["params"]) == 8  # 4 matrices x 2 layers
    assert hid["lr_mult"] == pytest.approx(0.25) and hid["wd_mult"] == pytest.approx(4.0)
    assert hid["eps"] == pytest.approx(1e-8 / 4 / 2)
    assert by_name["no_decay.layer_vector"]["wd_mult"] == 0.0  # norms keep no weight decay
    assert by_name["decay.embedding"]["lr_mult"] == 1.0 and by_name["decay.output"]["eps"] == pytest.approx(2.5e-9)
    off = mup_args(enable_mup=False, enable_depth_scale=False, mup_base_width=None, depth_base=None)
    plain = get_param_groups(named)
    assert parametrize_param_groups(plain, named, off.model, off.optimizer) is plain


def test_init_stds():
    sigma, m = 0.02, 4.0
    model = GPTModel(GPTConfig(vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=4,
                               ffn_hidden_size=512, init_method_std=sigma, init_width_multiplier=m,
                               residual_init_layers=8))
    sd = dict(model.named_parameters())
    layer = "language_model.encoder.layers.0."
    assert sd[layer + "self_attention.query_key_value.weight"].std().item() == pytest.approx(sigma / 2, rel=0.02)
    assert sd[layer + "mlp.dense_h_to_4h.weight"].std().item() == pytest.approx(sigma / 2, rel=0.02)
    assert sd[layer + "mlp.dense_4h_to_h.weight"].std().item() == pytest.approx(sigma / 2 / 4, rel=0.02)  # /sqrt(2*8)
    assert sd["language_model.output_layer.weight"].std().item() == pytest.approx(sigma, rel=0.02)
    assert sd["language_model.embedding.word_embeddings.weight"].std().item() == pytest.approx(sigma, rel=0.02)


def test_forward_multipliers_against_direct_computation():
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = tiny()
    with torch.no_grad():
        base = ref(tokens)
        # an explicit 1/sqrt(d) scale is the default
        same = tiny(attention_scale=1 / math.sqrt(8))
        same.load_state_dict(ref.state_dict())
        torch.testing.assert_close(same(tokens), base)
        # the output multiplier scales the logits (no bias in the head)
        half = tiny(output_multiplier=0.5)
        half.load_state_dict(ref.state_dict())
        torch.testing.assert_close(half(tokens), 0.5 * base)
        # residual multiplier 0: the layers contribute nothing -> head(final_norm(embedding))
        zero = tiny(residual_multiplier=0.0, embedding_multiplier=3.0)
        zero.load_state_dict(ref.state_dict())
        lm = zero.language_model
        direct = lm.output_layer(lm.encoder.final_layernorm(3.0 * lm.embedding.word_embeddings(tokens)))
        torch.testing.assert_close(zero(tokens), direct)
        # a 1/d scale changes the attention (d = 8): differs from the default
        scaled = tiny(attention_scale=1 / 8)
        scaled.load_state_dict(ref.state_dict())
        assert not torch.allclose(scaled(tokens), base)


def test_problems():
    ok = mup_args()
    assert ok.model.mup_problems() == []
    cases = [
        (dict(mup_base_width=None), "--enable-mup needs --mup-base-width"),
        (dict(mup_width_multiplier=2.0), "either --mup-base-width or --mup-width-multiplier"),
        (dict(enable_mup=False), "no effect without --enable-mup"),
        (dict(depth_base=None), "--enable-depth-scale needs --depth-base"),
        (dict(depth_alpha=1.5), "--depth-alpha must be in [0, 1]"),
        (dict(enable_depth_scale=False), "no effect without --enable-depth-scale"),
        (dict(init_method_xavier_uniform=True), "drop --init-method-xavier-uniform"),
    ]
    for kw, msg in cases:
        errs = mup_args(**kw).model.mup_problems()
        assert any(msg in e for e in errs), (kw, errs)


def test_from_parsed_arguments(tmp_path):
    from distributed import TINY_MODEL
    from megatron.arguments import ArgumentError, parse_args
    from megatron.model.mup import model_fields

    lst = tmp_path / "l.txt"
    lst.write_text("1.0 /x/y c\n")
    common = TINY_MODEL + ["--data-file-list", str(lst), "--train-iters", "2", "--lr", "1e-3"]
    a = parse_args(common + ["--enable-mup", "--mup-base-width", "16", "--enable-depth-scale", "--depth-base", "1",
                             "--mup-output-alpha", "2"], env={})
    f = model_fields(Config.from_args(a).model)  # hidden 64 / 16 = 4, layers 2 / 1 = 2, head dim 16
    assert f["output_multiplier"] == pytest.approx(0.5) and f["attention_scale"] == pytest.approx(1 / 16)
    assert f["residual_multiplier"] == pytest.approx(0.5) and f["init_width_multiplier"] == pytest.approx(4.0)
    assert f["residual_init_layers"] == 1
    with pytest.raises(ArgumentError, match="--enable-mup needs --mup-base-width"):
        parse_args(common + ["--enable-mup"], env={})
