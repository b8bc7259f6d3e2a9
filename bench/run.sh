#!/usr/bin/env bash
# Run the benchmarks one after the other (they must not share the cores), then print ONE table:
# every ratio against its target (bench/targets.py), status ok / BELOW / ABOVE / FAILED.
# Exit status 1 if a benchmark failed or printed no value (after the table).
#
#   bash bench/run.sh                 # all but memory.py, default sizes (about 17 minutes on 2 quiet CPU cores)
#   QUICK=1 bash bench/run.sh         # small models, fewer rounds, no --compile run: <= 5 minutes
#   MEMORY=1 bash bench/run.sh        # also bench/memory.py (about 12 minutes; QUICK=1: ZeRO-0 and -3 only)
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
: > "${OUT}/manifest.tsv"

# run name | script | flags (the run names are the ones bench/targets.py's TARGETS use)
if [[ "${QUICK:-0}" == 1 ]]; then
    benches=(
        "train_throughput|train_throughput|--small --rounds 4 --warmup 1"
        "zero_tax|zero_tax|--small --rounds 3 --warmup 1"
        "scaling|scaling|--rounds 1 --iters 4"
        "checkpoint_io|checkpoint_io|--small --rounds 2"
        "startup|startup|--rounds 1 --data-wait-iters 0"
        "data_index|data_index|--files 200 --samples 2000000 --rounds 1"
        "preprocess|preprocess|--repeat 2"
    )
    printf 'train_throughput_compile\tskip\tQUICK: compiling takes minutes\n' >> "${OUT}/manifest.tsv"
    MEM_FLAGS="--configs z0,z3"
else
    benches=(
        "train_throughput|train_throughput|--rounds 8 --warmup 2"
        "train_throughput_compile|train_throughput|--rounds 6 --warmup 3 --compile"
        "zero_tax|zero_tax|--rounds 8 --warmup 2"
        "scaling|scaling|--rounds 2 --iters 10"
        "checkpoint_io|checkpoint_io|--rounds 3"
        "startup|startup|--rounds 3"
        "data_index|data_index|"
        "preprocess|preprocess|"
    )
    MEM_FLAGS=""
fi
if [[ "${MEMORY:-0}" == 1 ]]; then
    benches+=("memory|memory|${MEM_FLAGS}")
else
    printf 'memory\tskip\tMEMORY=1 runs it\n' >> "${OUT}/manifest.tsv"
fi

for entry in "${benches[@]}"; do
    IFS='|' read -r name script flags <<< "$entry"
    log="${OUT}/${name}.txt"
    printf '=== %s: bench/%s.py %s\n' "$name" "$script" "${flags:-(defaults)}"
    start=$SECONDS
    set +e
    # DeepSpeed's log lines ("[...") go to the log file only
    # shellcheck disable=SC2086  # flags are words
    "$PY" "${ROOT}/bench/${script}.py" $flags < /dev/null 2>&1 | tee "$log" | grep -v '^\['
    rc=${PIPESTATUS[0]}
    set -e
    printf '=== %s: exit %d, %d s\n' "$name" "$rc" $((SECONDS - start))
    printf '%s\t%d\t%s\n' "$name" "$rc" "$log" >> "${OUT}/manifest.tsv"
done

printf '\n=== summary (%s; full outputs in %s)\n' "$(uptime | sed 's/.*load/load/')" "$OUT"
[[ "${QUICK:-0}" == 1 ]] && echo "QUICK: small models and few rounds; the targets are for the full sizes"
exec "$PY" "${ROOT}/bench/targets.py" "$OUT"
