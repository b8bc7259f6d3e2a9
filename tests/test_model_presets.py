"""Parameter counts of the MODEL_ARCH presets (upstream-spec §2.3, read from ALCF/helpers.sh):
GPTConfig.num_parameters() equals a closed-form count written out here, the small presets'
instantiated models agree, and the formula reproduces published counts of Llama models."""
from __future__ import annotations

import os
import subprocess

import pytest

from megatron.model import GPTConfig, GPTModel
from megatron.tokenizer import pad_vocab_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["7B", "2B", "llama3-3B", "smollm3-3B", "phi4-mini", "33B", "70B", "tiny", "7M", "30M"]
LLAMA2_VOCAB = 32000  # the tokenizer of the ALCF runs


def preset(name: str) -> dict[str, int]:
    """HEADS NLAYERS HIDDEN NUM_KV_HEAD FFN_HIDDEN_SIZE (and TP) as the launcher sets them."""
    script = (f"source ALCF/helpers.sh >/dev/null 2>&1; MODEL_ARCH={name}; _alcf_apply_preset >/dev/null 2>&1; "
              'echo "$HEADS $NLAYERS $HIDDEN $NUM_KV_HEAD $FFN_HIDDEN_SIZE ${TP:-1}"')
    env = {k: v for k, v in os.environ.items() if k not in ("HEADS", "NHEADS", "NLAYERS", "NUM_LAYERS", "HIDDEN",
                                                            "NUM_KV_HEAD", "FFN_HIDDEN_SIZE", "TP", "MODEL_ARCH")}
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    heads, layers, hidden, kv, ffn, tp = (int(x) for x in out.stdout.split())
    return {"heads": heads, "layers": layers, "hidden": hidden, "kv": kv, "ffn": ffn, "tp": tp}


def closed_form(h: int, L: int, heads: int, kv: int, f: int, V: int, tied: bool = False) -> int:
    """Llama block without biases: 2 RMSNorms, QKV (heads + 2 kv) x d, output, SwiGLU (3 h f)."""
    d = h // heads
    per_layer = 2 * h + h * (heads + 2 * kv) * d + heads * d * h + 3 * h * f
    return L * per_layer + h + V * h * (1 if tied else 2)


def llama_config(h, L, heads, kv, f, V, tied=False) -> GPTConfig:
    return GPTConfig(vocab_size=V, hidden_size=h, num_layers=L, num_attention_heads=heads, num_key_value_heads=kv,
                     ffn_hidden_size=f, untie_embeddings_and_output_weights=not tied)


EXPECTED = {  # hand-computed totals with vocabulary 32000 (e.g. 7M: 4 x 737,792 + 256 + 2 x 32000 x 256)
    "7B": 5_933_109_248, "2B": 1_068_550_144, "tiny": 4_194_624, "7M": 19_335_424,
}


@pytest.fixture(scope="module")
def presets() -> dict[str, dict[str, int]]:
    return {name: preset(name) for name in PRESETS}


def test_presets_match_spec_table(presets):
    assert presets["7B"] == {"heads": 32, "layers": 32, "hidden": 4096, "kv": 8, "ffn": 11008, "tp": 1}
    assert presets["70B"] == {"heads": 64, "layers": 80, "hidden": 8192, "kv": 8, "ffn": 28672, "tp": 1}
    assert presets["33B"] == {"heads": 78, "layers": 78, "hidden": 8268, "kv": 6, "ffn": 11076, "tp": 6}
    assert presets["llama3-3B"]["layers"] == 28 and presets["smollm3-3B"]["layers"] == 24


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count(presets, name):
    p = presets[name]
    vocab = pad_vocab_size(LLAMA2_VOCAB, 128, p["tp"])
    cfg = llama_config(p["hidden"], p["layers"], p["heads"], p["kv"], p["ffn"], vocab)
    want = closed_form(p["hidden"], p["layers"], p["heads"], p["kv"], p["ffn"], vocab)
    assert cfg.num_parameters() == want
    if name in EXPECTED:
        assert want == EXPECTED[name]
    # the TP split of the preset is possible (whole KV groups per rank)
    assert p["heads"] % p["tp"] == 0 and p["kv"] % p["tp"] == 0 and p["ffn"] % p["tp"] == 0
    if p["hidden"] <= 512:  # small presets: count the real model's parameters too
        assert GPTModel(cfg).num_parameters() == want


@pytest.mark.parametrize("h,L,heads,kv,f,V,tied,published", [
    (4096, 32, 32, 32, 11008, 32000, False, 6_738_415_616),   # Llama-2-7B
    (4096, 32, 32, 8, 14336, 128256, False, 8_030_261_248),   # Llama-3-8B
    (3072, 28, 24, 8, 8192, 128256, True, 3_212_749_824),     # Llama-3.2-3B (tied embeddings)
])
def test_formula_reproduces_published_counts(h, L, heads, kv, f, V, tied, published):
    assert closed_form(h, L, heads, kv, f, V, tied) == published
    assert llama_config(h, L, heads, kv, f, V, tied).num_parameters() == published
