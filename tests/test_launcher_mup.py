"""Launcher: MUP_BASE_WIDTH / DEPTH_BASE / DEPTH_ALPHA become the MuP / CompleteP flags (DRY_RUN=1),
and the flags they produce are accepted by the trainer's argument parser with the intended multipliers."""
from __future__ import annotations

import pytest

from test_launcher import base_env, dry  # noqa: F401  (helpers of the launcher tests)


@pytest.fixture
def env(tmp_path):
    lst = tmp_path / "lists" / "books.txt"
    lst.parent.mkdir()
    lst.write_text("1.0 /data/books/books-0000_text_document books\n")
    return base_env(WORKING_DIR=str(tmp_path), DATA_FILE_LIST=str(lst))


def test_no_mup_flags_by_default(env):
    d = dry(env)
    assert not d.has("--enable-mup") and not d.has("--enable-depth-scale")
    assert not d.has("--mup-base-width") and not d.has("--depth-base")


def test_mup_base_width_and_depth_base(env):
    d = dry({**env, "MUP_BASE_WIDTH": "256", "DEPTH_BASE": "4"})
    assert d.has("--enable-mup") and d.last("--mup-base-width") == "256"
    assert d.has("--enable-depth-scale") and d.last("--depth-base") == "4"
    assert float(d.last("--depth-alpha")) == 1.0
    d2 = dry({**env, "DEPTH_BASE": "2", "DEPTH_ALPHA": "0.5"})
    assert float(d2.last("--depth-alpha")) == 0.5 and not d2.has("--enable-mup")


def test_launcher_flags_give_the_intended_multipliers(env):
    """The emitted flags parse, and the 7B preset (hidden 4096, 32 layers) gets m_N = 16, m_L = 8."""
    from megatron.arguments import build_parser
    from megatron.config import Config
    from megatron.model.mup import Parametrization

    d = dry({**env, "MUP_BASE_WIDTH": "256", "DEPTH_BASE": "4"})
    flags = []
    for f, v in d.flags:
        if f in ("--enable-mup", "--mup-base-width", "--enable-depth-scale", "--depth-base", "--depth-alpha",
                 "--hidden-size", "--num-layers"):
            flags += [f] if v is None else [f, v]
    args = build_parser().parse_known_args(flags)[0]
    par = Parametrization.from_config(Config.from_args(args).model)
    assert int(d.last("--hidden-size")) == 4096 and int(d.last("--num-layers")) == 32
    assert par.mup and par.width_mult == pytest.approx(16.0)
    assert par.depth and par.depth_mult == pytest.approx(8.0)
    assert par.residual_multiplier == pytest.approx(1 / 8)
    assert par.output_multiplier == pytest.approx(1 / 16)
