#!/usr/bin/env bash
# The project's test command (README): sets up the Python environment if needed (ALCF/env.sh),
# then runs the whole suite with pytest. Extra arguments go to pytest (e.g. -k launcher, -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
# shellcheck source=../ALCF/env.sh
source "${ROOT}/ALCF/env.sh"
setup_python_env
# torch on one thread in every test process and every trainer a test starts (TEST_THREADS to change it): the
# tiny models gain nothing from more, and OpenMP threads sharing a core with another process spin-wait
# (several times the CPU time on a loaded machine). Tests that need another count set their own.
export OMP_NUM_THREADS="${TEST_THREADS:-1}"
# Two pytest workers (pytest-xdist): most of a trainer test's time is single-threaded start-up (imports,
# DeepSpeed's set-up), so two at once use both cores. A file's tests stay on one worker (--dist loadfile),
# so module-scoped set-ups run once. TEST_WORKERS=0 runs everything in one process.
WORKERS=(-n "${TEST_WORKERS:-2}" --dist loadfile)
[[ "${TEST_WORKERS:-2}" == 0 ]] && WORKERS=()
exec "${PYTHON}" -m pytest -q -p no:cacheprovider --durations=15 "${WORKERS[@]}" tests "$@"
