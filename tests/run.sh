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
exec "${PYTHON}" -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
