#!/usr/bin/env bash
# The project's test command (README): sets up the Python environment if needed (ALCF/env.sh),
# then runs the whole suite with pytest. Extra arguments go to pytest (e.g. -k launcher, -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
# shellcheck source=../ALCF/env.sh
source "${ROOT}/ALCF/env.sh"
setup_python_env
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# Two pytest workers (pytest-xdist): most of a trainer test's time is single-threaded start-up (imports,
# DeepSpeed's set-up), so two at once use both cores. A file's tests stay on one worker (--dist loadfile),
# so module-scoped set-ups run once. TEST_WORKERS=0 runs everything in one process.
WORKERS=(-n "${TEST_WORKERS:-2}" --dist loadfile)
[[ "${TEST_WORKERS:-2}" == 0 ]] && WORKERS=()
exec "${PYTHON}" -m pytest -q -p no:cacheprovider --durations=15 "${WORKERS[@]}" tests "$@"
