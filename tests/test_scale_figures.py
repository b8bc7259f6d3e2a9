"""tools/scale_figures.py (ALCF/notes/scale.md): the batch arithmetic and parameter count of the golden
256-node Aurora launch, and the checkpoint byte formula, against values worked out by hand."""
from __future__ import annotations

import pytest
from distributed import ROOT

from megatron.config import Config
from tools import scale_figures as sf


def test_checkpoint_bytes_by_stage():
    p, d = 1000, 4
    assert sf.checkpoint_bytes(p, 0, d, half=True) == {"model": 14000, "shard": 0.0, "total": 14000, "largest": 14000}
    assert sf.checkpoint_bytes(p, 0, d, half=False) == {"model": 12000, "shard": 0.0, "total": 12000, "largest": 12000}
    for stage in (1, 2):  # bf16 module on rank 0, every rank (master + 2 moments) / D
        assert sf.checkpoint_bytes(p, stage, d, half=True) == {"model": 2000, "shard": 3000, "total": 14000,
                                                               "largest": 5000}
    assert sf.checkpoint_bytes(p, 3, d, half=True) == {"model": 0.0, "shard": 3000, "total": 12000, "largest": 3000}


def test_golden_aurora_256_nodes(tmp_path, monkeypatch):
    text = open(f"{ROOT}/tests/assets/launch/aurora-256nodes.txt").read().replace("<TMP>", str(tmp_path))
    (tmp_path / "wd" / "lists").mkdir(parents=True)
    (tmp_path / "wd" / "lists" / "dolma.txt").write_text("1.0 /data/dolma/dolma-0000_text_document dolma\n")
    monkeypatch.chdir(tmp_path)
    args, world = sf.trainer_args(text)
    assert world == 3072 and args.data_parallel_size == 3072 and args.num_micro_batches == 1
    assert args.global_batch_size == 3072 and args.train_iters == 4_673_780_159_710 // 4096 // 3072
    # 32 x (QKV 4096 x (32 + 2 x 8) x 128 + O 4096^2 + SwiGLU 3 x 4096 x 11008 + 2 norms) + embedding and head + norm
    layer = 4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert sf.full_parameters(Config.from_args(args), 256_000) == 32 * layer + 2 * 256_000 * 4096 + 4096 == 7_768_117_248


@pytest.mark.parametrize("missing", ["--vocab-size", "output"])
def test_cli_needs_its_inputs(missing, tmp_path, capsys):
    argv = [] if missing == "output" else [str(tmp_path / "dry-run.txt")]
    with pytest.raises(SystemExit) as e:
        sf.main(argv)
    assert e.value.code == 2 and "give DRY_RUN_OUTPUT and --vocab-size" in capsys.readouterr().err
