"""The launcher's PBS path for real: a faked one-node PBS job (nodefile = localhost) runs
`mpiexec --envall -n 2 -ppn 2 --hostfile <nodefile> -bind-to core:1 python pretrain_gpt.py ...` with
MPICH's mpiexec from the `mpi` extra, trains 5 steps, then a second launch resumes to step 8."""
from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest

from test_end_to_end import assert_clean, metrics_of, run_launcher

pytestmark = pytest.mark.slow

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def test_pbs_mpiexec_two_ranks_train_and_resume(demo_data, tmp_path):
    assert os.access(MPIEXEC, os.X_OK), "MPICH's mpiexec is missing: pip install -e '.[mpi]'"
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\n")
    job = {"DATA_FILE_LIST": demo_data, "MODEL_ARCH": "tiny", "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "1.fake",
           "NGPU_PER_HOST": "2", "MPIEXEC": MPIEXEC, "SAVE_INTERVAL": "5", "EVAL_ITERS": "1", "LOG_INTERVAL": "1"}
    fail_fast = ("--distributed-timeout-minutes", "2")  # a hung rank fails the test in minutes, not ten
    first = run_launcher(tmp_path, {**job, "TRAIN_ITERS": "5"}, *fail_fast)
    assert_clean(first)
    cmd = first.stdout[first.stdout.index("command:"):]
    for part in (f"{MPIEXEC} \\", "--envall", "-n 2", "-ppn 2", f"--hostfile {nodefile}", "-bind-to core:1"):
        assert part in cmd, part
    train, _ = metrics_of(tmp_path)
    assert sorted(train) == [1, 2, 3, 4, 5]
    assert train[5]["consumed_samples"] == 5 * 2  # world 2 x MB 1 x GAS 1
    (ckpt,) = glob.glob(os.path.join(str(tmp_path), "checkpoints", "tiny-ws2-*"))
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "5"
    loss5 = train[5]["lm_loss"]

    second = run_launcher(tmp_path, {**job, "TRAIN_ITERS": "8"}, *fail_fast)  # LOAD defaults to the run's own directory
    assert_clean(second)
    train, _ = metrics_of(tmp_path)
    assert sorted(train) == list(range(1, 9))  # 6..8 appended after the resumed step 5
    assert train[5]["lm_loss"] == loss5
    assert train[6]["consumed_samples"] == 12 and train[8]["consumed_samples"] == 16
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "8"
    logs = glob.glob(os.path.join(str(tmp_path), "logs", "tiny-ws2-*", "*_2_*", "output.log"))
    assert len(logs) == 2
    shutil.rmtree(ckpt)
