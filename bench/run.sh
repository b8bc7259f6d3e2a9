#!/usr/bin/env bash
# Run every benchmark, one after the other (they must not share the cores), and collect each
# one's final ratio line in a summary. About 15 minutes on 2 CPU cores; QUICK=1 for a few minutes.
#
#   bash bench/run.sh                 # all, default sizes
#   QUICK=1 bash bench/run.sh         # smaller models / fewer rounds
#   BENCH_OUT=dir bash bench/run.sh   # keep each benchmark's full output in dir (default: a temp dir)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "${ROOT}/.venv/bin/python" ]]; then PY="${ROOT}/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$("$PY" -c 'import sys; print(sys.prefix)')/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
OUT="${BENCH_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

if [[ "${QUICK:-0}" == 1 ]]; then
    TT=(--small --rounds 8 --warmup 3); TTC=(--small --rounds 8 --warmup 3 --dtypes fp32); SC=(--rounds 1 --iters 6)
    CK=(--small --rounds 2); ST=(--rounds 1)
else
    TT=(--rounds 8 --warmup 2); TTC=(--rounds 6 --warmup 3); SC=(--rounds 2 --iters 10)
    CK=(--rounds 3); ST=(--rounds 3)
fi

benches=(
    "train_throughput|${TT[*]}"
    "train_throughput --compile|${TTC[*]} --compile"
    "scaling|${SC[*]}"
    "checkpoint_io|${CK[*]}"
    "startup|${ST[*]}"
)
[[ -f "${ROOT}/bench/data_index.py" ]] && benches+=("data_index|")
[[ -f "${ROOT}/bench/preprocess.py" ]] && benches+=("preprocess|")

summary=()
for entry in "${benches[@]}"; do
    name="${entry%%|*}"; flags="${entry#*|}"
    script="${name%% *}"
    log="${OUT}/${name// /_}.txt"
    printf '=== %s (%s)\n' "$name" "${flags:-defaults}"
    start=$SECONDS
    # shellcheck disable=SC2086  # flags are words
    if "$PY" "${ROOT}/bench/${script}.py" $flags 2>&1 | grep -v '^\[' | tee "$log"; then
        summary+=("$(printf '%-28s %s  (%ds)' "$name" "$(tail -n 1 "$log")" $((SECONDS - start)))")
    else
        summary+=("$(printf '%-28s FAILED (see %s)' "$name" "$log")")
    fi
done
printf '\n=== summary (full outputs in %s)\n' "$OUT"
printf '%s\n' "${summary[@]}"
