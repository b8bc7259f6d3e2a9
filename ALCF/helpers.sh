#!/usr/bin/env bash
# Functions of the training launcher (train_alcf.sh). Sourcing this file only defines them;
# `alcf_main "$@"` does the work:
#
#   1. read the environment (upstream names and their aliases), apply the demo / machine /
#      model-preset defaults, and check everything (one "ERROR: ..." line per problem, exit 2,
#      before anything is installed, built or written);
#   2. assemble the trainer command as a bash array (never flattened: arguments that contain
#      spaces stay one argument; the user's own arguments come last, so they override every
#      launcher default, argparse keeping the last occurrence);
#   3. DRY_RUN=1: print the DeepSpeed config (built from that command by megatron/deepspeed_config.py)
#      and the command, and stop. Otherwise set up Python (ALCF/env.sh), build the demo
#      data if needed, write the config, the .env dump and the run directories, and launch
#      (mpiexec under PBS, srun under SLURM, python / torchrun / mpiexec on a workstation),
#      tee-ing everything to the run's output.log. The exit status is the trainer's.
#
# Variables (default in brackets; "machine" = per-machine table, "preset" = MODEL_ARCH):
#   model      MODEL_ARCH [7B; demo in the demo] (tiny 7M demo 30M 2B 7B 33B 70B llama3-3B
#              smollm3-3B phi4-mini; any other name is a custom shape and needs all six of
#              HEADS NLAYERS HIDDEN NUM_KV_HEAD FFN_HIDDEN_SIZE SEQ, else it is refused), HEADS|NHEADS, NLAYERS|NUM_LAYERS, HIDDEN, NUM_KV_HEAD,
#              FFN_HIDDEN_SIZE, SEQ|SEQ_LEN [preset], ROPE_THETA [50000], INIT_METHOD_STD
#              [sqrt(2/(5*HIDDEN))], NO_LLAMA, NO_FLASH_ATTN
#   parallel   TP [machine, 1], PP [1], SP [1], ZERO_STAGE [1], CPU_OPTIMIZER,
#              ZERO_HPZ_PARTITION_SIZE [1], USE_ACTIVATION_CHECKPOINTING, ACT_CKPT_NUM_LAYERS [1]
#   batch      MICRO_BATCH [machine, 1], GRAD_ACC_STEPS [machine, 1], GLOBAL_BATCH
#              [WORLD_SIZE*MB*GAS/(TP*PP*SP)], TRAIN_TOKENS [4673780159710 if no TRAIN_ITERS],
#              TRAIN_ITERS|TRAIN_ITER [TRAIN_TOKENS/SEQ/GLOBAL_BATCH]
#   optimizer  OPT|OPTIMIZER|OPTIM [adamw], LR [0.0002], MIN_LR, LR_DECAY_STYLE [cosine],
#              LR_WARMUP_FRAC|LR_WARMUP_FRACTION [0.05], LR_DECAY_ITERS, WEIGHT_DECAY [0.1],
#              ADAM_BETA1 [0.9], ADAM_BETA2 [0.95], ADAM_EPS [0.00001], CLIP_GRAD [1.0],
#              DTYPE [machine; bf16 with an accelerator or a CPU with native bf16, else fp32],
#              GRAD_ACCUM_DTYPE [fp32; bf16/fp16: 16-bit gradients], OVERRIDE_CKPT_OPT_PARAM
#   logging    LOG_INTERVAL [1], EVAL_INTERVAL [100], EVAL_ITERS [20], SAVE_INTERVAL [50],
#              TIMING_LOG_LEVEL [1], NO_TENSORBOARD, FLOPS_PROFILER, COMMS_LOGGER [false];
#              read by the trainer: TORCH_PROFILER_ENABLE (1: torch profiler over the whole run,
#              2: over --profile_steps), WANDB_DISABLED / WANDB_MODE=disabled (no W&B)
#   data       DATA_FILE_LIST [demo list outside a job], TRAIN_SPLIT/VAL_SPLIT/TEST_SPLIT
#              [990/10/0], TOKENIZER_TYPE [HFTokenizer], TOKENIZER_MODEL [google/gemma-7B, or a
#              tokenizer.model next to the list], DEMO_DATA_DIR [WORKING_DIR/.cache/demo-data],
#              VOCAB_FILE, MERGE_FILE [DATA_PARENT (the list's directory)/gpt2-vocab.json,
#              gpt2-merges.txt; GPT2 tokenizers only]
#   MuP        MUP_BASE_WIDTH [unset: off], DEPTH_BASE [unset: off], DEPTH_ALPHA [1.0]
#   paths      WORKING_DIR [PBS_O_WORKDIR, SLURM_SUBMIT_DIR, the repo], CKPT_DIR
#              [checkpoints/<run name>], LOAD, SAVE [CKPT_DIR], EXEC [pretrain_gpt.py], VENV_DIR
#   launch     NPROC [accelerators or 1], LAUNCHER|LAUNCH_WITH [torchrun; LAUNCH_WITH=MPICH is mpiexec],
#              HOSTFILE|PBS_NODEFILE, NGPU_PER_HOST|GPUS_PER_NODE (ranks per node), WORLD_SIZE,
#              CPU_BIND, MPIEXEC, MASTER_ADDR [127.0.0.1], MASTER_PORT [a free port], OMP_NUM_THREADS,
#              BE|CCL|NCCL (backend), DRY_RUN, DEBUG, ALCF_HOSTNAME (host name used for machine
#              detection and the log directory), ALCF_CPUINFO [/proc/cpuinfo: the CPU flags that
#              choose DTYPE on a CPU], CHECK_ARGS [1: run pretrain_gpt.py --check-args
#              (flags, tokenizer, data files) before anything is written; 0: skip]

ALCF_REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Aurora / Sunspot: one rank per GPU tile (12 per node), 3 cores each, skipping the cores
# reserved for the system on each socket.
ALCF_AURORA_CPU_BIND="list:2-4:10-12:18-20:26-28:34-36:42-44:54-56:62-64:70-72:78-80:86-88:94-96"

_alcf_info() { printf '[train_alcf] %s\n' "$*" >&2; }
_alcf_warn() { printf '[train_alcf] WARNING: %s\n' "$*" >&2; }
_alcf_err() { ALCF_ERRORS+=("$*"); }

# ----------------------------------------------------------------------------------------------
# small checks and conversions
# ----------------------------------------------------------------------------------------------
_alcf_is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
_alcf_is_float() { [[ "$1" =~ ^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]]; }

# Integer spellings accepted for counts: 123, 22e9, 4.5e12 (only when the result is whole).
# Sets _ALCF_INT to the plain decimal integer, or returns 1. (No subshells: DRY_RUN stays fast.)
_alcf_to_int() {
    local v="$1"
    _ALCF_INT=""
    if [[ "$v" =~ ^[0-9]+$ ]]; then
        v="${v#"${v%%[!0]*}"}"; _ALCF_INT="${v:-0}"; return 0
    fi
    if [[ "$v" =~ ^([0-9]*)\.?([0-9]*)[eE]\+?([0-9]+)$ ]]; then
        local ip="${BASH_REMATCH[1]}" fp="${BASH_REMATCH[2]}" ex=$((10#${BASH_REMATCH[3]}))
        [[ -n "$ip$fp" ]] || return 1
        (( ${#fp} <= ex && ex <= 18 )) || return 1
        local digits="${ip}${fp}" zeros=$((ex - ${#fp}))
        while (( zeros-- > 0 )); do digits+="0"; done
        digits="${digits#"${digits%%[!0]*}"}"
        (( ${#digits} <= 18 )) || return 1
        _ALCF_INT="${digits:-0}"; return 0
    fi
    return 1
}

# _alcf_check_posint VAR [hint]: VAR must hold a positive integer; normalizes it in place.
_alcf_check_posint() {
    local name="$1" val="${!1:-}"
    if ! _alcf_to_int "$val" || (( _ALCF_INT <= 0 )); then
        _alcf_err "${name}='${val}' is not a positive integer; set ${name} to a whole number >= 1${2:+ ($2)}"
        return 1
    fi
    printf -v "$name" '%s' "$_ALCF_INT"
}

_alcf_check_uint() {
    local name="$1" val="${!1:-}"
    if ! _alcf_to_int "$val"; then
        _alcf_err "${name}='${val}' is not a non-negative integer; set ${name} to a whole number >= 0${2:+ ($2)}"
        return 1
    fi
    printf -v "$name" '%s' "$_ALCF_INT"
}

_alcf_check_float() {
    local name="$1" val="${!1:-}"
    if ! _alcf_is_float "$val"; then
        _alcf_err "${name}='${val}' is not a number; set ${name} to a decimal number such as ${2:-0.0002}"
        return 1
    fi
}

# One token for display, appended to _ALCF_Q: as is when it is shell-safe, else single-quoted.
_alcf_quote() {
    _ALCF_Q+="${_ALCF_Q:+ }"
    if [[ "$1" =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then _ALCF_Q+="$1"
    else _ALCF_Q+="'${1//\'/\'\\\'\'}'"; fi
}

# VAR canonical, ALIAS the other spelling: conflicting values are an error; the alias fills in.
_alcf_alias() {
    local canon="$1" alias="$2" a="${!1:-}" b="${!2:-}"
    if [[ -n "$a" && -n "$b" && "$a" != "$b" ]]; then
        _alcf_err "${canon}=${a} and ${alias}=${b} disagree (two spellings of one setting); set only one of them"
    elif [[ -z "$a" && -n "$b" ]]; then
        printf -v "$canon" '%s' "$b"
    fi
}

# _alcf_default VAR VALUE: set VAR only if the user left it unset or empty.
_alcf_default() { [[ -n "${!1:-}" ]] || printf -v "$1" '%s' "$2"; }

# _alcf_force VAR VALUE: a preset value that cannot be overridden (upstream behaviour); say so.
_alcf_force() {
    if [[ -n "${!1:-}" && "${!1}" != "$2" ]]; then
        _alcf_warn "MODEL_ARCH=${MODEL_ARCH} fixes $1=$2 (ignoring $1=${!1})"
    fi
    printf -v "$1" '%s' "$2"
}

# ----------------------------------------------------------------------------------------------
# machine and job
# ----------------------------------------------------------------------------------------------
# Machine name from the host name, as ezpz does. ALCF_HOSTNAME overrides the host name (tests).
alcf_machine_name() {
    local h="${1:-${ALCF_HOSTNAME:-$(hostname 2>/dev/null || uname -n)}}"
    case "$h" in
        x4*|aurora*) echo aurora ;;
        x1*|uan*) echo sunspot ;;
        x3*) if [[ "${PBS_O_HOST:-}" == sirius* ]]; then echo sirius; else echo polaris; fi ;;
        sophia*) echo sophia ;;
        nid*|login*) echo perlmutter ;;
        *) echo generic ;;
    esac
}

# Number of accelerators on this node (0 on a CPU-only machine).
alcf_count_accelerators() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" || n=0
    fi
    if (( n == 0 )) && command -v xpu-smi >/dev/null 2>&1 && compgen -G '/dev/dri/renderD*' >/dev/null; then
        case "${MACHINE:-}" in
            aurora|sunspot) n=12 ;;   # 6 GPUs x 2 tiles, FLAT mode
            *) n="$(compgen -G '/dev/dri/renderD*' | wc -l)" ;;
        esac
    fi
    echo "$n"
}

# Cores this process may use (GNU nproc would report OMP_NUM_THREADS instead when it is set).
alcf_num_cores() {
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1
}

# Aurora gradient-accumulation default from the node count (upstream table).
alcf_aurora_grad_acc_steps() {
    local n="$1"
    if (( n >= 256 )); then echo 1
    elif (( n >= 128 )); then echo 2
    elif (( n >= 33 )); then echo 4
    elif (( n >= 16 )); then echo 8
    else echo 16; fi
}

# Polaris micro-batch default from the node count (upstream table).
alcf_polaris_micro_batch() {
    local n="$1"
    if (( n >= 8 )); then echo 4
    elif (( n >= 3 )); then echo 2
    else echo 1; fi
}

# MASTER_PORT for a one-node run: a free port below the system's ephemeral range (megatron/launch_env.py
# free_port: one the system picks from that range can be taken by an outgoing connection before the store binds it).
alcf_free_port() {
    python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); from megatron.launch_env import free_port; print(free_port())' \
        "$ALCF_REPO_DIR" 2>/dev/null || echo $((29500 + ($$ % 1000)))
}

# Where PBS/SLURM/workstation runs start from; sets JOB_TYPE, HOSTFILE, NHOSTS, NGPU_PER_HOST,
# WORLD_SIZE, NPROC_LOCAL (processes on this node).
_alcf_detect_job() {
    ACCEL_COUNT="$(alcf_count_accelerators)"
    if [[ -n "${HOSTFILE:-}" || -n "${PBS_NODEFILE:-}" ]]; then
        JOB_TYPE=pbs
        HOSTFILE="${HOSTFILE:-${PBS_NODEFILE}}"
        if [[ ! -r "$HOSTFILE" ]]; then
            _alcf_err "HOSTFILE/PBS_NODEFILE='${HOSTFILE}' is not a readable file; point HOSTFILE at the job's node list"
            NHOSTS=1
        else
            NHOSTS="$(grep -c '[^[:space:]]' "$HOSTFILE")" || NHOSTS=0
            (( NHOSTS > 0 )) || { _alcf_err "HOSTFILE='${HOSTFILE}' lists no hosts; point HOSTFILE at the job's node list"; NHOSTS=1; }
        fi
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        JOB_TYPE=slurm
        NHOSTS="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
    else
        JOB_TYPE=local
        NHOSTS=1
    fi
    if [[ -z "${NGPU_PER_HOST:-}" ]]; then
        case "$MACHINE" in
            aurora|sunspot) NGPU_PER_HOST=12 ;;
            *) if [[ "$JOB_TYPE" == slurm && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then NGPU_PER_HOST="$SLURM_GPUS_ON_NODE"
               elif (( ACCEL_COUNT > 0 )); then NGPU_PER_HOST="$ACCEL_COUNT"
               else NGPU_PER_HOST=1; fi ;;
        esac
        _ALCF_NGPU_FROM_ENV=0
    else
        _ALCF_NGPU_FROM_ENV=1
    fi
    _alcf_check_posint NGPU_PER_HOST || NGPU_PER_HOST=1
    _alcf_check_posint NHOSTS || NHOSTS=1
    if [[ "$JOB_TYPE" == local ]]; then
        # Outside a scheduler: NPROC processes here (default: one per accelerator, else 1).
        if [[ -z "${NPROC:-}" ]]; then
            if [[ -n "${WORLD_SIZE:-}" ]]; then NPROC="$WORLD_SIZE"
            elif (( _ALCF_NGPU_FROM_ENV || ACCEL_COUNT > 0 )); then NPROC="$NGPU_PER_HOST"
            else NPROC=1; fi
        fi
        _alcf_check_posint NPROC "number of local processes" || NPROC=1
        WORLD_SIZE="$NPROC"
        NPROC_LOCAL="$NPROC"
    else
        [[ -n "${NPROC:-}" ]] && _alcf_warn "NPROC is ignored inside a ${JOB_TYPE} job (WORLD_SIZE = NHOSTS x NGPU_PER_HOST)"
        _alcf_default WORLD_SIZE "$((NHOSTS * NGPU_PER_HOST))"
        _alcf_check_posint WORLD_SIZE || WORLD_SIZE=1
        NPROC_LOCAL="$NGPU_PER_HOST"
        (( NPROC_LOCAL > WORLD_SIZE )) && NPROC_LOCAL="$WORLD_SIZE"
    fi
}

# ----------------------------------------------------------------------------------------------
# model presets (MODEL_ARCH)
# ----------------------------------------------------------------------------------------------
ALCF_PRESETS="tiny 7M demo 30M 2B 7B 33B 70B llama3-3B smollm3-3B phi4-mini"

_alcf_apply_preset() {
    case "$MODEL_ARCH" in
        2B|AuroraGPT-2B|AuroraGPT_2B|Aurora-GPT-2B|AuroraGPT2B|Aurora_GPT_2B|aurora-gpt-2b|aurora_gpt_2b)
            MODEL_ARCH=AuroraGPT-2B
            _alcf_force HEADS 16; _alcf_force NLAYERS 12; _alcf_force HIDDEN 2048
            _alcf_force NUM_KV_HEAD 4; _alcf_force FFN_HIDDEN_SIZE 11008; _alcf_force SEQ 8192 ;;
        llama3-3B|llama-3B)
            _alcf_force HEADS 24; _alcf_default NLAYERS 28; _alcf_force HIDDEN 3072
            _alcf_force NUM_KV_HEAD 8; _alcf_force FFN_HIDDEN_SIZE 8192; _alcf_force SEQ 8192
            MODEL_ARCH="llama3-3B-nLayers${NLAYERS}" ;;
        smollm3-3B|smollm3_3B)
            _alcf_force HEADS 16; _alcf_default NLAYERS 24; _alcf_force HIDDEN 2048
            _alcf_force NUM_KV_HEAD 4; _alcf_force FFN_HIDDEN_SIZE 11008; _alcf_force SEQ 8192
            MODEL_ARCH="smollm3-nLayers${NLAYERS}" ;;
        phi4-mini|phi4_mini)
            _alcf_force HEADS 32; _alcf_default NLAYERS 24; _alcf_force HIDDEN 3072
            _alcf_force NUM_KV_HEAD 8; _alcf_force FFN_HIDDEN_SIZE 8192; _alcf_force SEQ 8192
            MODEL_ARCH="phi4-mini-nLayers${NLAYERS}" ;;
        70B)
            MODEL_ARCH=AuroraGPT-70B
            _alcf_force HEADS 64; _alcf_force NLAYERS 80; _alcf_force HIDDEN 8192
            _alcf_force NUM_KV_HEAD 8; _alcf_force FFN_HIDDEN_SIZE 28672; _alcf_force SEQ 8192 ;;
        33B|llama-3.2-33B|llama-3.2-33b)
            MODEL_ARCH=AuroraGPT-33B
            _alcf_force HEADS 78; _alcf_force NLAYERS 78; _alcf_force HIDDEN 8268
            _alcf_force NUM_KV_HEAD 6; _alcf_force FFN_HIDDEN_SIZE 11076; _alcf_force SEQ 4096
            _alcf_force TP 6; _alcf_force ZERO_STAGE 2; _alcf_force GRAD_ACC_STEPS 1; _alcf_force MICRO_BATCH 1 ;;
        # Small presets that train on a CPU (all values overridable).
        tiny)
            _alcf_default HEADS 4; _alcf_default NLAYERS 2; _alcf_default HIDDEN 64
            _alcf_default NUM_KV_HEAD 2; _alcf_default FFN_HIDDEN_SIZE 192; _alcf_default SEQ 64 ;;
        7M)
            _alcf_default HEADS 4; _alcf_default NLAYERS 4; _alcf_default HIDDEN 256
            _alcf_default NUM_KV_HEAD 2; _alcf_default FFN_HIDDEN_SIZE 704; _alcf_default SEQ 256 ;;
        demo)  # the demo's model: 3.9M parameters, 0.8M of them in the 2 layers (ALCF/notes/launcher.md)
            _alcf_default HEADS 4; _alcf_default NLAYERS 2; _alcf_default HIDDEN 192
            _alcf_default NUM_KV_HEAD 2; _alcf_default FFN_HIDDEN_SIZE 512; _alcf_default SEQ 256 ;;
        30M)
            _alcf_default HEADS 8; _alcf_default NLAYERS 6; _alcf_default HIDDEN 512
            _alcf_default NUM_KV_HEAD 4; _alcf_default FFN_HIDDEN_SIZE 1408; _alcf_default SEQ 512 ;;
        7B|AuroraGPT-7B|aurora-gpt-7b|llama-3.1-7B|llama-3.1-7b|llama-3.2-7B|llama-3.2-7b)
            MODEL_ARCH=AuroraGPT-7B
            _alcf_default HEADS 32; _alcf_default NLAYERS 32; _alcf_default HIDDEN 4096
            _alcf_default NUM_KV_HEAD 8; _alcf_default FFN_HIDDEN_SIZE 11008; _alcf_default SEQ 4096 ;;
        *)
            # Any other name is a custom shape (the name becomes the run-name prefix) when every
            # shape variable is given; otherwise it is a typo of a preset (upstream would silently
            # train the 7B preset, which on a small machine runs out of memory minutes later).
            local v missing=()
            for v in HEADS NLAYERS HIDDEN NUM_KV_HEAD FFN_HIDDEN_SIZE SEQ; do
                [[ -n "${!v:-}" ]] || missing+=("$v")
            done
            if (( ${#missing[@]} )); then
                _ALCF_SHAPE_MISSING=" ${missing[*]} "
                _alcf_err "unknown MODEL_ARCH='${MODEL_ARCH}'; use a preset (${ALCF_PRESETS}), or for a custom shape also set ${missing[*]}"
            elif [[ ! "$MODEL_ARCH" =~ ^[A-Za-z0-9._+-]+$ ]]; then
                _alcf_err "MODEL_ARCH='${MODEL_ARCH}' cannot name a run (letters, digits, . _ + - only); rename the custom shape"
            fi ;;
    esac
}

# ----------------------------------------------------------------------------------------------
# settings: env -> validated variables, one step per function, in this order (each step reads what
# the ones before it set; problems are collected in ALCF_ERRORS, none stops the others)
# ----------------------------------------------------------------------------------------------
alcf_setup_params() {
    ALCF_ERRORS=()
    _ALCF_SHAPE_MISSING=""
    ORIG_PWD="${ORIG_PWD:-$PWD}"
    _alcf_read_spellings        # aliases (SEQ_LEN, LAUNCH_WITH, ...), OPT, the user's own tokenizer
    _alcf_detect_machine        # WORKING_DIR, MACHINE, HOSTNAME_SHORT
    _alcf_detect_job            # PBS / SLURM / local: NHOSTS, NGPU_PER_HOST, WORLD_SIZE, NPROC_LOCAL
    _alcf_demo_defaults         # no data list outside a job: the Shakespeare demo
    _alcf_machine_defaults      # backend, precision, batch tables, flash attention per machine
    _alcf_default MODEL_ARCH 7B
    _alcf_apply_preset          # model shape (MODEL_ARCH)
    _alcf_generic_defaults      # everything still unset: upstream's values
    _alcf_cpu_dtype             # DTYPE on a CPU: bf16 where the CPU has native bf16, else fp32
    _alcf_check_values          # numbers are numbers, choices are known (sets _ALCF_OK_INTS)
    _alcf_resolve_data_list     # DATA_FILE_LIST found and made absolute
    _alcf_resolve_tokenizer     # explicit, else a tokenizer.model next to the list
    _alcf_parallel_layout       # DP = WORLD_SIZE / (TP*PP*SP); head counts divide
    _alcf_batch_and_iters       # GLOBAL_BATCH = MB*GAS*DP; TRAIN_TOKENS -> TRAIN_ITERS
    _alcf_model_derived         # INIT_STD, MAX_POS
    _alcf_run_paths             # run name, checkpoints, caches, DeepSpeed config path
    _alcf_threads               # OMP_NUM_THREADS
}

# Alternative spellings of one setting, the launcher name, the optimizer and the user's own tokenizer.
_alcf_read_spellings() {
    # two spellings of one setting (the documented one and the one upstream actually reads)
    _alcf_alias SEQ SEQ_LEN
    _alcf_alias LR_WARMUP_FRAC LR_WARMUP_FRACTION
    _alcf_alias TRAIN_ITERS TRAIN_ITER
    _alcf_alias HEADS NHEADS
    _alcf_alias NLAYERS NUM_LAYERS
    _alcf_alias NGPU_PER_HOST GPUS_PER_NODE
    # LAUNCH_WITH (upstream: MPICH or deepspeed) names the launcher too
    case "${LAUNCH_WITH:-}" in
        "") ;;
        MPICH|mpich|mpiexec) LAUNCH_WITH=mpiexec ;;
        torchrun) ;;
        deepspeed) _alcf_err "LAUNCH_WITH=deepspeed is not supported (the deepspeed launcher); use LAUNCH_WITH=MPICH (mpiexec) or LAUNCHER=torchrun"; LAUNCH_WITH="" ;;
        *) _alcf_err "LAUNCH_WITH='${LAUNCH_WITH}' is unknown; set LAUNCH_WITH=MPICH (mpiexec) or torchrun (or use LAUNCHER)"; LAUNCH_WITH="" ;;
    esac
    _alcf_alias LAUNCHER LAUNCH_WITH
    OPT="${OPT:-${OPTIMIZER:-${OPTIM:-}}}"
    _ALCF_USER_TOKENIZER_TYPE="${TOKENIZER_TYPE:-}"
    _ALCF_USER_TOKENIZER_MODEL="${TOKENIZER_MODEL:-}"
}

# Where the run lives (WORKING_DIR) and on which machine (MACHINE, HOSTNAME_SHORT).
_alcf_detect_machine() {
    # the job's submit directory, else the repository
    WORKING_DIR="${WORKING_DIR:-${PBS_O_WORKDIR:-${SLURM_SUBMIT_DIR:-${ALCF_REPO_DIR}}}}"
    if [[ ! -d "$WORKING_DIR" ]]; then
        _alcf_err "WORKING_DIR='${WORKING_DIR}' is not a directory; set WORKING_DIR (or PBS_O_WORKDIR) to an existing directory"
        WORKING_DIR="$ALCF_REPO_DIR"
    fi
    WORKING_DIR="$(cd "$WORKING_DIR" && pwd)"

    MACHINE="$(alcf_machine_name)"
    HOSTNAME_SHORT="${ALCF_HOSTNAME:-$(hostname 2>/dev/null || uname -n)}"
    HOSTNAME_SHORT="${HOSTNAME_SHORT%%.*}"
}

# Demo mode: no data list and no scheduler job -> the Shakespeare demo on this machine.
_alcf_demo_defaults() {
    DEMO=0
    if [[ -z "${DATA_FILE_LIST:-}" && "$JOB_TYPE" == local ]]; then
        DEMO=1
        DEMO_DATA_DIR="${DEMO_DATA_DIR:-${WORKING_DIR}/.cache/demo-data}"
        [[ "$DEMO_DATA_DIR" == /* ]] || DEMO_DATA_DIR="${WORKING_DIR}/${DEMO_DATA_DIR}"
        # ---- demo defaults: applied only to what you did not set; tune them here ---------------
        # 13.7 TFLOP of model compute, validation loss 5.19 +- 0.01 over three seeds (ALCF/notes/launcher.md)
        _alcf_default MODEL_ARCH demo
        [[ -n "${TRAIN_TOKENS:-}" ]] || _alcf_default TRAIN_ITERS 580
        _alcf_default MICRO_BATCH 6
        _alcf_default GRAD_ACC_STEPS 1
        _alcf_default LR 0.002
        _alcf_default LR_WARMUP_FRAC 0.05
        _alcf_default MIN_LR 0.0001
        _alcf_default EVAL_INTERVAL 100
        _alcf_default EVAL_ITERS 13
        _alcf_default SAVE_INTERVAL 200
        _alcf_default LOG_INTERVAL 10
        _alcf_default ZERO_STAGE 1
        DEMO_EXTRA_ARGS=(--eval-on-start)
        # -----------------------------------------------------------------------------------------
        DATA_FILE_LIST="${DEMO_DATA_DIR}/shakespeare.txt"
    else
        DEMO_EXTRA_ARGS=()
    fi
}

# Per-machine defaults (upstream setParams); an unknown machine gets generic ones.
_alcf_machine_defaults() {
    FLASH_FLAG=""
    if [[ -n "${DTYPE:-}" ]]; then DTYPE_WHY="set by DTYPE"; else DTYPE_WHY="${MACHINE}'s default"; fi
    case "$MACHINE" in
        aurora|sunspot)
            _alcf_default BE "${CCL:-ccl}"; _alcf_default DTYPE bf16
            _alcf_default GRAD_ACC_STEPS "$(alcf_aurora_grad_acc_steps "$NHOSTS")"
            FLASH_FLAG=--use-flash-attn-builder ;;
        polaris|sirius)
            _alcf_default BE "${NCCL:-nccl}"; _alcf_default DTYPE fp16; _alcf_default GRAD_ACC_STEPS 8  # as upstream
            _alcf_default MICRO_BATCH "$(alcf_polaris_micro_batch "$NHOSTS")"
            FLASH_FLAG=--use-flash-attn-v2 ;;
        sophia)
            _alcf_default BE "${NCCL:-nccl}"; _alcf_default DTYPE bf16; _alcf_default GRAD_ACC_STEPS 8
            FLASH_FLAG=--use-flash-attn-v2 ;;
        perlmutter)
            _alcf_default BE "${NCCL:-nccl}"; _alcf_default DTYPE bf16; _alcf_default TP 2
            FLASH_FLAG=--use-flash-attn-v2 ;;
        *)
            # The Python side picks the backend from the hardware unless one is asked for.
            _alcf_default BE "${CCL:-${NCCL:-}}"
            # on a CPU, DTYPE is chosen once the ZeRO stage and batch are known (_alcf_cpu_dtype)
            if (( ACCEL_COUNT > 0 )) && [[ -z "${DTYPE:-}" ]]; then DTYPE=bf16; DTYPE_WHY="an accelerator is present"; fi ;;
    esac
    [[ -n "${NO_FLASH_ATTN:-}" ]] && FLASH_FLAG=""
}

# The CPU feature that makes bf16 native (AMX or AVX512-BF16 on x86, BF16 on Arm), printed; fails when
# there is none. ALCF_CPUINFO replaces /proc/cpuinfo (tests).
_alcf_cpu_bf16_feature() {
    local info="${ALCF_CPUINFO:-/proc/cpuinfo}" f
    [[ -r "$info" ]] || return 1
    for f in amx_bf16 avx512_bf16 bf16; do
        if grep -qE "^(flags|Features)[[:space:]]*:(.*[[:space:]])?${f}([[:space:]]|$)" "$info"; then
            printf '%s' "$f"; return 0
        fi
    done
    return 1
}

# DTYPE for a run on CPUs (no accelerator) that did not set it: bf16 where the CPU multiplies bf16
# natively (2.1x fp32's speed for the demo's step on AVX512-BF16: ALCF/notes/launcher.md), fp32 elsewhere (bf16 is
# emulated there, slower than fp32), and fp32 where bf16 would be refused (ZeRO stage 0 without
# pipeline parallelism, with several replicas or micro-batches: megatron/arguments.py; the launcher
# refuses a GLOBAL_BATCH other than MB*GAS*DP, so GAS is the micro-batch count). DTYPE_WHY says which rule chose it.
_alcf_cpu_dtype() {
    [[ -n "${DTYPE:-}" ]] && return 0
    local feature replicas=1
    if [[ "$WORLD_SIZE" =~ ^[0-9]+$ && "$TP" =~ ^[1-9][0-9]*$ && "$PP" =~ ^[1-9][0-9]*$ ]]; then
        replicas=$(( WORLD_SIZE / (TP * PP) ))
    fi
    if ! feature="$(_alcf_cpu_bf16_feature)"; then
        DTYPE=fp32
        DTYPE_WHY="automatic: this CPU has no native bf16 (no amx_bf16/avx512_bf16/bf16 flag), where fp32 is faster; DTYPE=bf16 to force bf16"
    elif [[ "$ZERO_STAGE" == 0 && "$PP" == 1 ]] && [[ "${GRAD_ACC_STEPS}" != 1 || "$replicas" != 1 ]]; then
        DTYPE=fp32
        DTYPE_WHY="automatic: this CPU has native bf16 (${feature}), but bf16 at ZERO_STAGE=0 needs one replica and one micro-batch per step; ZERO_STAGE=1 and DTYPE=bf16 for bf16"
    else
        DTYPE=bf16
        DTYPE_WHY="automatic: this CPU has native bf16 (${feature}), faster than fp32; DTYPE=fp32 to force fp32"
    fi
}

# Generic defaults (upstream values) for whatever the user, the demo, the machine and the preset left unset.
_alcf_generic_defaults() {
    _alcf_default TP 1
    _alcf_default PP 1
    _alcf_default SP 1
    _alcf_default MICRO_BATCH 1
    _alcf_default GRAD_ACC_STEPS 1
    _alcf_default OPT adamw
    _alcf_default LR 0.0002
    _alcf_default LR_DECAY_STYLE cosine
    _alcf_default LR_WARMUP_FRAC 0.05
    _alcf_default WEIGHT_DECAY 0.1
    _alcf_default ADAM_BETA1 0.9
    _alcf_default ADAM_BETA2 0.95
    _alcf_default ADAM_EPS 0.00001
    _alcf_default CLIP_GRAD 1.0
    _alcf_default ZERO_STAGE 1
    _alcf_default TIMING_LOG_LEVEL 1
    _alcf_default LOG_INTERVAL 1
    _alcf_default EVAL_INTERVAL 100
    _alcf_default EVAL_ITERS 20
    _alcf_default SAVE_INTERVAL 50
    _alcf_default TRAIN_SPLIT 990
    _alcf_default VAL_SPLIT 10
    _alcf_default TEST_SPLIT 0
    _alcf_default ROPE_THETA 50000
    _alcf_default ACT_CKPT_NUM_LAYERS 1
    _alcf_default ZERO_HPZ_PARTITION_SIZE 1
    _alcf_default COMMS_LOGGER false
    _alcf_default LAUNCHER torchrun
    EXEC="${EXEC:-${ALCF_REPO_DIR}/pretrain_gpt.py}"
}

# Checks (no arithmetic on a value before it is known to be a number). _ALCF_OK_INTS=0 when a count
# the arithmetic needs is missing or not a positive integer.
_alcf_check_values() {
    local v
    for v in LR WEIGHT_DECAY ADAM_BETA1 ADAM_BETA2 ADAM_EPS CLIP_GRAD; do _alcf_check_float "$v"; done
    [[ -n "${MIN_LR:-}" ]] && _alcf_check_float MIN_LR 0.00002
    [[ -n "${INIT_METHOD_STD:-}" ]] && _alcf_check_float INIT_METHOD_STD 0.02
    if _alcf_check_float LR_WARMUP_FRAC 0.05; then
        awk -v x="$LR_WARMUP_FRAC" 'BEGIN { exit !(x + 0 >= 0 && x + 0 <= 1) }' \
            || _alcf_err "LR_WARMUP_FRAC=${LR_WARMUP_FRAC} is not a fraction in [0, 1]; set LR_WARMUP_FRAC (or LR_WARMUP_FRACTION) to e.g. 0.05"
    fi
    _ALCF_OK_INTS=1
    for v in MICRO_BATCH GRAD_ACC_STEPS SEQ TP PP SP HEADS NLAYERS HIDDEN NUM_KV_HEAD FFN_HIDDEN_SIZE; do
        # (a shape variable the unknown-MODEL_ARCH error already names is not reported twice)
        [[ "${_ALCF_SHAPE_MISSING:-}" == *" $v "* ]] && { _ALCF_OK_INTS=0; continue; }
        _alcf_check_posint "$v" || _ALCF_OK_INTS=0
    done
    for v in EVAL_INTERVAL EVAL_ITERS SAVE_INTERVAL LOG_INTERVAL ACT_CKPT_NUM_LAYERS ZERO_HPZ_PARTITION_SIZE; do
        _alcf_check_posint "$v"
    done
    for v in TRAIN_SPLIT VAL_SPLIT TEST_SPLIT ROPE_THETA TIMING_LOG_LEVEL; do _alcf_check_uint "$v"; done
    [[ -n "${TRAIN_ITERS:-}" ]] && { _alcf_check_posint TRAIN_ITERS || _ALCF_OK_INTS=0; }
    [[ -n "${TRAIN_TOKENS:-}" ]] && { _alcf_check_posint TRAIN_TOKENS "e.g. TRAIN_TOKENS=22000000000 or 22e9" || _ALCF_OK_INTS=0; }
    [[ -n "${GLOBAL_BATCH:-}" ]] && { _alcf_check_posint GLOBAL_BATCH || _ALCF_OK_INTS=0; }
    [[ -n "${LR_DECAY_ITERS:-}" ]] && _alcf_check_posint LR_DECAY_ITERS
    if ! [[ "$ZERO_STAGE" =~ ^[0-3]$ ]]; then
        _alcf_err "ZERO_STAGE='${ZERO_STAGE}' is not a ZeRO stage; set ZERO_STAGE to 0, 1, 2 or 3"
    fi
    case "$DTYPE" in
        bf16|fp16|fp32) ;;
        *) _alcf_err "DTYPE='${DTYPE}' is not supported; set DTYPE to bf16, fp16 or fp32" ;;
    esac
    case "$LAUNCHER" in
        torchrun|mpiexec) ;;
        *) _alcf_err "LAUNCHER='${LAUNCHER}' is unknown; set LAUNCHER to torchrun or mpiexec" ;;
    esac
    [[ -f "$EXEC" ]] || _alcf_err "EXEC='${EXEC}' does not exist; set EXEC to the training script (default pretrain_gpt.py)"
}

# Data list: relative paths are tried from where you ran the script, then WORKING_DIR, repo.
_alcf_resolve_data_list() {
    if (( ! DEMO )); then
        if [[ -z "${DATA_FILE_LIST:-}" ]]; then
            DATA_FILE_LIST="${WORKING_DIR}/ALCF/data-lists/${MACHINE}/dolma.txt"
            _ALCF_DFL_DEFAULTED=1
        fi
        local cand found=""
        if [[ "$DATA_FILE_LIST" == /* ]]; then
            [[ -f "$DATA_FILE_LIST" ]] && found="$DATA_FILE_LIST"
        else
            for cand in "$ORIG_PWD" "$WORKING_DIR" "$ALCF_REPO_DIR"; do
                if [[ -f "$cand/$DATA_FILE_LIST" ]]; then found="$cand/$DATA_FILE_LIST"; break; fi
            done
        fi
        if [[ -z "$found" ]]; then
            if [[ -n "${_ALCF_DFL_DEFAULTED:-}" ]]; then
                _alcf_err "DATA_FILE_LIST is not set and the default ${DATA_FILE_LIST} does not exist; set DATA_FILE_LIST=path/to/list.txt (lines 'weight prefix corpus', see ALCF/data-lists/README.md)"
            else
                _alcf_err "DATA_FILE_LIST='${DATA_FILE_LIST}' does not exist; set DATA_FILE_LIST to an existing data list (lines 'weight prefix corpus', see ALCF/data-lists/README.md)"
            fi
        else
            DATA_FILE_LIST="$(cd "$(dirname "$found")" && pwd)/$(basename "$found")"
        fi
    fi
    DFL_STEM="${DATA_FILE_LIST##*/}"; DFL_STEM="${DFL_STEM%.txt}"
}

# Tokenizer: explicit settings, else a tokenizer.model shipped next to the data list.
_alcf_resolve_tokenizer() {
    TOKENIZER_SOURCE="default"
    if [[ -z "${TOKENIZER_MODEL:-}" && "${TOKENIZER_TYPE:-}" != [gG][pP][tT]* ]]; then
        local side="${DATA_FILE_LIST%/*}/tokenizer.model"
        if (( DEMO )) || [[ -f "$side" ]]; then
            TOKENIZER_MODEL="$side"
            TOKENIZER_TYPE="${TOKENIZER_TYPE:-SentencePieceTokenizer}"
            TOKENIZER_SOURCE="sidecar"
        fi
    fi
    _alcf_default TOKENIZER_TYPE HFTokenizer
    _alcf_default TOKENIZER_MODEL google/gemma-7B
}

# Parallel layout (only on validated integers): DP, and the head counts that TP and GQA need.
_alcf_parallel_layout() {
    DP=1
    (( _ALCF_OK_INTS )) || return 0
    local mp=$((TP * PP * SP))
    if (( WORLD_SIZE % mp != 0 )); then
        _alcf_err "WORLD_SIZE=${WORLD_SIZE} is not divisible by TP*PP*SP=${TP}*${PP}*${SP}=${mp}; change TP/PP/SP or the number of processes (NPROC, NGPU_PER_HOST)"
    else
        DP=$((WORLD_SIZE / mp))
    fi
    if (( NUM_KV_HEAD > 0 && HEADS % NUM_KV_HEAD != 0 )); then
        _alcf_err "NUM_KV_HEAD=${NUM_KV_HEAD} does not divide HEADS=${HEADS}; set NUM_KV_HEAD to a divisor of HEADS"
    fi
    if (( HIDDEN % HEADS != 0 )); then
        _alcf_err "HIDDEN=${HIDDEN} is not divisible by HEADS=${HEADS}; set HIDDEN to a multiple of HEADS"
    fi
}

# Batch arithmetic (only on validated integers): GLOBAL_BATCH = MB * GAS * DP, and the iterations.
_alcf_batch_and_iters() {
    (( _ALCF_OK_INTS )) || return 0
    local gbs_max=$((WORLD_SIZE * MICRO_BATCH * GRAD_ACC_STEPS / (TP * PP * SP)))
    if [[ -n "${GLOBAL_BATCH:-}" ]]; then
        if (( GLOBAL_BATCH != MICRO_BATCH * GRAD_ACC_STEPS * DP )); then
            local fix="unset GLOBAL_BATCH"
            if (( GLOBAL_BATCH % (MICRO_BATCH * DP) == 0 )); then
                fix="set GRAD_ACC_STEPS=$((GLOBAL_BATCH / (MICRO_BATCH * DP))) or unset GLOBAL_BATCH"
            fi
            _alcf_err "GLOBAL_BATCH=${GLOBAL_BATCH} != MICRO_BATCH*GRAD_ACC_STEPS*DP = ${MICRO_BATCH}*${GRAD_ACC_STEPS}*${DP} = $((MICRO_BATCH * GRAD_ACC_STEPS * DP)); ${fix}"
        fi
    else
        GLOBAL_BATCH="$gbs_max"
    fi
    # Tokens -> iterations (integer division at each step, as upstream).
    if [[ -n "${TRAIN_TOKENS:-}" ]]; then
        [[ -n "${TRAIN_ITERS:-}" ]] && _alcf_warn "TRAIN_TOKENS=${TRAIN_TOKENS} is set: it decides the iterations (TRAIN_ITERS=${TRAIN_ITERS} ignored)"
        TRAIN_ITERS=$((TRAIN_TOKENS / SEQ / GLOBAL_BATCH))
    elif [[ -z "${TRAIN_ITERS:-}" ]]; then
        TRAIN_TOKENS=4673780159710
        TRAIN_ITERS=$((TRAIN_TOKENS / SEQ / GLOBAL_BATCH))
    fi
    if (( GLOBAL_BATCH > 0 && TRAIN_ITERS <= 0 )); then
        _alcf_err "TRAIN_TOKENS=${TRAIN_TOKENS} gives TRAIN_ITERS=0 with SEQ=${SEQ} and GLOBAL_BATCH=${GLOBAL_BATCH} (one step is $((SEQ * GLOBAL_BATCH)) tokens); raise TRAIN_TOKENS or set TRAIN_ITERS instead"
    fi
}

# Model values derived from the shape: the init std and the position table.
_alcf_model_derived() {
    if [[ -n "${INIT_METHOD_STD:-}" ]]; then
        INIT_STD="$INIT_METHOD_STD"
    elif _alcf_is_uint "${HIDDEN:-x}" && (( HIDDEN > 0 )); then
        # sqrt(2 / (5 * hidden)), in full double precision (upstream truncated it with bc).
        INIT_STD="$(awk -v h="$HIDDEN" 'BEGIN { printf "%.10g", sqrt(2 / (5 * h)) }')"
    fi
    MAX_POS=$(( ${SEQ:-0} * 16 )) 2>/dev/null || MAX_POS=0
}

# The run's name and where its files go (relative to WORKING_DIR).
_alcf_run_paths() {
    alcf_run_name
    CKPT_DIR="${CKPT_DIR:-checkpoints/${RUN_NAME}}"
    # Resume from the run's own directory by default (upstream); the demo starts fresh each time
    # unless LOAD is given, so a second `bash train_alcf.sh` trains again instead of finding step 400.
    if (( DEMO )); then LOAD="${LOAD:-}"; else LOAD="${LOAD:-${CKPT_DIR}}"; fi
    SAVE="${SAVE:-${CKPT_DIR}}"
    DATA_CACHE_PATH="${CKPT_DIR}/.cache/${DFL_STEM}/index-cache"
    TB_DIR="${CKPT_DIR}/tensorboard"
    DS_CONFIG="ds-configs/ds_stage${ZERO_STAGE}_mb${MICRO_BATCH}_gb${GLOBAL_BATCH}_pp${PP}_${DTYPE}.json"
}

# Threads per process: the cores of this node shared by its processes.
_alcf_threads() {
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        local cores; cores="$(alcf_num_cores)"
        OMP_NUM_THREADS=$(( cores / NPROC_LOCAL ))
        (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    fi
}

# Run / checkpoint name (upstream get_output_prefix, current format).
alcf_run_name() {
    local name="${MODEL_ARCH}-ws${WORLD_SIZE}-ds-stage${ZERO_STAGE}-nl${NLAYERS}-hs${HIDDEN}-mb${MICRO_BATCH}"
    name+="-seq${SEQ}-gb${GLOBAL_BATCH}-sp${SP}-pp${PP}-tp${TP}-${DTYPE}-opt${OPT}-lr${LR}-lwf${LR_WARMUP_FRAC}"
    local ntok=0
    _alcf_is_uint "${TRAIN_TOKENS:-x}" && ntok=$((TRAIN_TOKENS / 1000000000))
    name+="_ntok${ntok}B"
    [[ -n "$_ALCF_USER_TOKENIZER_TYPE" ]] && name+="_tok${_ALCF_USER_TOKENIZER_TYPE//Tokenizer/}"
    [[ -n "$_ALCF_USER_TOKENIZER_MODEL" ]] && name+="_tm${_ALCF_USER_TOKENIZER_MODEL//\//_}"
    [[ -n "${LR_DECAY_ITERS:-}" ]] && name+="_ldi${LR_DECAY_ITERS}"
    [[ -n "$FLASH_FLAG" ]] && name+="_flash"
    RUN_NAME="$name"
}

# ----------------------------------------------------------------------------------------------
# DeepSpeed config
# ----------------------------------------------------------------------------------------------
# megatron/deepspeed_config.py builds it (launch_config) from the launcher's trainer flags (TRAIN_ARGS;
# the user's own arguments are the trainer's to apply) and what only the launcher knows; it imports no
# torch, so any python >= 3.10 runs it, before the environment is set up (DRY_RUN).
# alcf_ds_config [--write PATH]: the JSON on stdout, or written to PATH.
alcf_ds_config() {
    local -a opts=(--gradient-accumulation-steps "$GRAD_ACC_STEPS" --accelerators "$ACCEL_COUNT"
        --zero-hpz-partition-size "$ZERO_HPZ_PARTITION_SIZE")
    [[ "${COMMS_LOGGER}" =~ ^(1|true|yes)$ ]] && opts+=(--comms-logger)
    [[ "${FLOPS_PROFILER:-0}" =~ ^(1|true|yes)$ ]] && opts+=(--flops-profiler)
    [[ -n "${CPU_OPTIMIZER:-}" ]] && opts+=(--cpu-optimizer)
    local py; py="$(_alcf_expected_python)"
    [[ -x "$py" ]] || command -v "$py" >/dev/null 2>&1 || py=python3
    # the repository first on sys.path (as for pretrain_gpt.py): a megatron/ in WORKING_DIR must not win
    "$py" -c 'import sys; sys.path.insert(0, sys.argv[1]); from megatron.deepspeed_config import main; sys.exit(main(sys.argv[2:]))' \
        "$ALCF_REPO_DIR" "$@" "${opts[@]}" "${TRAIN_ARGS[@]}" \
        || { printf 'ERROR: %s could not build the DeepSpeed config (megatron/deepspeed_config.py, see above); it needs Python >= 3.10: activate your environment or set PYTHON\n' "$py" >&2; return 1; }
}

# ----------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------
# TRAIN_ARGS: the trainer's flags in upstream order; the user's own arguments are appended last.
alcf_build_train_args() {
    TRAIN_ARGS=()
    [[ -n "${OVERRIDE_CKPT_OPT_PARAM:-}" ]] || TRAIN_ARGS+=(--use-checkpoint-opt_param-scheduler)
    TRAIN_ARGS+=(--lr "$LR" --lr-decay-style "$LR_DECAY_STYLE" --lr-warmup-fraction "$LR_WARMUP_FRAC")
    [[ -n "${LR_DECAY_ITERS:-}" ]] && TRAIN_ARGS+=(--lr-decay-iters "$LR_DECAY_ITERS")
    [[ -n "${MIN_LR:-}" ]] && TRAIN_ARGS+=(--min-lr "$MIN_LR")
    if [[ -z "${NO_LLAMA:-}" ]]; then
        TRAIN_ARGS+=(--swiglu --hidden-dropout 0 --attention-dropout 0 --normalization rmsnorm
            --disable-bias-linear --no-query-key-layer-scaling --use-rotary-position-embeddings
            --untie-embeddings-and-output-weights
            --num-key-value-heads "$NUM_KV_HEAD" --ffn-hidden-size "$FFN_HIDDEN_SIZE")
    fi
    [[ -n "$FLASH_FLAG" ]] && TRAIN_ARGS+=("$FLASH_FLAG")
    if [[ "$TOKENIZER_TYPE" == [gG][pP][tT]* ]]; then
        local parent="${DATA_PARENT:-$(dirname "$DATA_FILE_LIST")}"
        TRAIN_ARGS+=(--tokenizer-type GPT2BPETokenizer
            --vocab-file "${VOCAB_FILE:-${parent}/gpt2-vocab.json}"
            --merge-file "${MERGE_FILE:-${parent}/gpt2-merges.txt}")
    else
        TRAIN_ARGS+=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
    fi
    if [[ -z "${NO_TENSORBOARD:-}" ]]; then
        TRAIN_ARGS+=(--log-timers-to-tensorboard --log-optimizer-states-to-tensorboard --tensorboard-dir "$TB_DIR")
    fi
    TRAIN_ARGS+=(--deepspeed)
    [[ "$PP" == 1 ]] && TRAIN_ARGS+=(--no-pipeline-parallel)
    TRAIN_ARGS+=("--deepspeed_config=${DS_CONFIG}" "--zero-stage=${ZERO_STAGE}")
    if [[ "${USE_ACTIVATION_CHECKPOINTING:-}" =~ ^(1|true|True|TRUE|yes)$ ]]; then
        TRAIN_ARGS+=(--deepspeed-activation-checkpointing --checkpoint-activations
            "--checkpoint-num-layers=${ACT_CKPT_NUM_LAYERS}")
    fi
    [[ "$DTYPE" != fp32 ]] && TRAIN_ARGS+=("--${DTYPE}")
    # MuP / CompleteP (ALCF/notes/mup.md): the width / number of layers the hyper-parameters were tuned at
    [[ -n "${MUP_BASE_WIDTH:-}" ]] && TRAIN_ARGS+=(--enable-mup "--mup-base-width=${MUP_BASE_WIDTH}")
    [[ -n "${DEPTH_BASE:-}" ]] && TRAIN_ARGS+=(--enable-depth-scale "--depth-base=${DEPTH_BASE}"
        "--depth-alpha=${DEPTH_ALPHA:-1.0}")
    # fp32 gradient accumulation and reduction (as upstream; the trainer's default), or GRAD_ACCUM_DTYPE's
    if [[ -n "${GRAD_ACCUM_DTYPE:-}" && "${GRAD_ACCUM_DTYPE}" != fp32 ]]; then
        TRAIN_ARGS+=("--grad-accum-dtype=${GRAD_ACCUM_DTYPE}")
    else
        TRAIN_ARGS+=(--accumulate-allreduce-grads-in-fp32)
    fi
    TRAIN_ARGS+=(
        --adjust-word-embedding-init
        "--adam-beta1=${ADAM_BETA1}"
        "--adam-beta2=${ADAM_BETA2}"
        "--adam-eps=${ADAM_EPS}"
        "--clip-grad=${CLIP_GRAD}"
        "--data-cache-path=${DATA_CACHE_PATH}"
        "--data-file-list=${DATA_FILE_LIST}")
    [[ -n "${BE:-}" ]] && TRAIN_ARGS+=("--distributed-backend=${BE}")
    TRAIN_ARGS+=(
        "--ds-sequence-parallel-size=${SP}"
        "--eval-interval=${EVAL_INTERVAL}"
        "--eval-iters=${EVAL_ITERS}"
        "--global-batch-size=${GLOBAL_BATCH}"
        "--hidden-size=${HIDDEN}"
        "--init-method-std=${INIT_STD}"
        "--log-interval=${LOG_INTERVAL}"
        ${LOAD:+"--load=${LOAD}"}
        "--max-position-embeddings=${MAX_POS}"
        "--micro-batch-size=${MICRO_BATCH}"
        --no-bias-gelu-fusion
        --no-bias-dropout-fusion
        --no-masked-softmax-fusion
        --no-gradient-accumulation-fusion
        "--num-layers=${NLAYERS}"
        "--num-attention-heads=${HEADS}"
        "--optimizer=${OPT}"
        "--pipeline-model-parallel-size=${PP}"
        "--rotary-position-embeddings-theta=${ROPE_THETA}"
        "--save=${SAVE}"
        "--seq-length=${SEQ}"
        "--split=${TRAIN_SPLIT},${VAL_SPLIT},${TEST_SPLIT}"
        --shuffle-sample-in-corpus
        "--save-interval=${SAVE_INTERVAL}"
        "--train-iters=${TRAIN_ITERS}"
        "--tensor-model-parallel-size=${TP}"
        "--timing-log-level=${TIMING_LOG_LEVEL}"
        "--weight-decay=${WEIGHT_DECAY}"
        --word-embedding-init-std=0.632455532)
    TRAIN_ARGS+=("${DEMO_EXTRA_ARGS[@]}")
}

# The python the run uses: after setup_python_env its PYTHON; before (DRY_RUN) the one it will
# pick: an active environment's (PYTHON or python3), else ${VENV_DIR:-<repo>/.venv}/bin/python.
_alcf_expected_python() {
    if [[ -n "${_ALCF_ENV_READY:-}" ]]; then echo "$PYTHON"
    elif [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then echo "${PYTHON:-$(command -v python3 || echo python3)}"
    else echo "${VENV_DIR:-${ALCF_REPO_DIR}/.venv}/bin/python"; fi
}

# LAUNCH_CMD: launcher + python + script. LAUNCH_GROUPS: how many words each printed line holds.
_alcf_lp() { LAUNCH_CMD+=("$@"); LAUNCH_GROUPS+=("$#"); }

alcf_build_launcher() {
    local py; py="$(_alcf_expected_python)"
    LAUNCH_CMD=(); LAUNCH_GROUPS=(); LAUNCH_ENV=("OMP_NUM_THREADS=${OMP_NUM_THREADS}")
    case "$JOB_TYPE" in
        pbs)
            _alcf_lp "${_ALCF_MPIEXEC:-mpiexec}"; _alcf_lp --envall
            _alcf_lp -n "$WORLD_SIZE"; _alcf_lp -ppn "$NGPU_PER_HOST"; _alcf_lp --hostfile "$HOSTFILE"
            if _alcf_mpiexec_is_hydra "${_ALCF_MPIEXEC:-mpiexec}"; then
                # MPICH's own mpiexec (hydra, e.g. the pip one): -bind-to instead of PALS' --cpu-bind
                case "${CPU_BIND:-depth}" in
                    none) ;;
                    depth) _alcf_lp -bind-to "core:$(_alcf_bind_depth)" ;;
                    *) _alcf_lp -bind-to "$CPU_BIND" ;;
                esac
            elif [[ -n "${CPU_BIND:-}" ]]; then
                if [[ "$CPU_BIND" == depth ]]; then _alcf_lp --cpu-bind=depth; _alcf_lp -d "$(_alcf_bind_depth)"
                else _alcf_lp "--cpu-bind=${CPU_BIND}"; fi
            elif [[ "$MACHINE" == aurora || "$MACHINE" == sunspot ]]; then
                _alcf_lp "--cpu-bind=${ALCF_AURORA_CPU_BIND}"
            else
                _alcf_lp --cpu-bind=depth; _alcf_lp -d "$(_alcf_bind_depth)"
            fi
            _alcf_lp "$py" ;;
        slurm)
            _alcf_lp srun; _alcf_lp -u; _alcf_lp -N "$NHOSTS"; _alcf_lp -n "$WORLD_SIZE"
            _alcf_lp "$py" ;;
        local)
            if (( NPROC_LOCAL <= 1 )); then
                _alcf_lp "$py"
            elif [[ "$LAUNCHER" == mpiexec ]]; then
                local mpx; mpx="$(dirname "$py")/mpiexec"
                if [[ ! -x "$mpx" && -z "${_ALCF_DRY:-}" ]]; then mpx="$(command -v mpiexec || echo mpiexec)"; fi
                _alcf_lp "$mpx"; _alcf_lp -n "$NPROC_LOCAL"; _alcf_lp "$py"
                LAUNCH_ENV+=("MASTER_ADDR=127.0.0.1" "MASTER_PORT=${MASTER_PORT}")
            else
                _alcf_lp "$py"; _alcf_lp -m torch.distributed.run; _alcf_lp --nproc_per_node "$NPROC_LOCAL"
                _alcf_lp --master_addr 127.0.0.1; _alcf_lp --master_port "$MASTER_PORT"
            fi ;;
    esac
    _alcf_lp "$EXEC"
}

# Is this mpiexec MPICH's hydra (not Cray PALS / Open MPI)? Its --version says HYDRA. (Read whole, not piped
# into `grep -q`: grep exits at the first line, the rest of mpiexec's output then meets a closed pipe, and under
# alcf_main's pipefail that SIGPIPE made the answer "no" now and then: PALS' --cpu-bind given to MPICH.)
_alcf_mpiexec_is_hydra() {
    [[ -x "$1" || -n "$(command -v "$1" 2>/dev/null)" ]] || return 1
    local version; version="$("$1" --version 2>/dev/null)"
    [[ "$version" == *HYDRA* ]]
}

# cores per rank for --cpu-bind=depth: (cores / 2) / ranks per node, at least 1
_alcf_bind_depth() {
    local c; c="$(alcf_num_cores)"
    local d=$(( c / 2 / NGPU_PER_HOST ))
    (( d >= 1 )) || d=1
    echo "$d"
}

# Print the command one flag per line (flag and value together), as a pasteable shell command.
alcf_print_command() {
    local -a words lines=()
    local i=0 g k
    for g in "${LAUNCH_GROUPS[@]}"; do
        _ALCF_Q=""
        for (( k = 0; k < g; k++ )); do _alcf_quote "${LAUNCH_CMD[i]}"; i=$((i + 1)); done
        lines+=("$_ALCF_Q")
    done
    words=("${TRAIN_ARGS[@]}" "${USER_ARGS[@]}")
    i=0
    while (( i < ${#words[@]} )); do
        _ALCF_Q=""; _alcf_quote "${words[i]}"
        if [[ "${words[i]}" == -* && "${words[i]}" != *=* ]] && (( i + 1 < ${#words[@]} )) \
            && [[ "${words[i+1]}" != --* ]]; then
            _alcf_quote "${words[i+1]}"; i=$((i + 1))
        fi
        lines+=("$_ALCF_Q"); i=$((i + 1))
    done
    local n=${#lines[@]}
    for (( k = 0; k < n; k++ )); do
        if (( k == 0 )); then printf '%s' "${lines[k]}"; else printf '  %s' "${lines[k]}"; fi
        if (( k < n - 1 )); then printf ' \\\n'; else printf '\n'; fi
    done
}

# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------
alcf_print_summary() {
    local row
    printf '%s\n' "+--------------------------------------------------------------------------------"
    for row in \
        "machine|${MACHINE} (host ${HOSTNAME_SHORT}, job ${JOB_TYPE})" \
        "hosts x procs|${NHOSTS} x ${NPROC_LOCAL} = world size ${WORLD_SIZE}" \
        "TP / PP / SP / DP|${TP} / ${PP} / ${SP} / ${DP}" \
        "MB / GAS / GBS|${MICRO_BATCH} / ${GRAD_ACC_STEPS} / ${GLOBAL_BATCH}" \
        "model|${MODEL_ARCH}: ${NLAYERS} layers, hidden ${HIDDEN}, ${HEADS} heads (${NUM_KV_HEAD} kv), ffn ${FFN_HIDDEN_SIZE}" \
        "SEQ|${SEQ}" \
        "TRAIN_ITERS|${TRAIN_ITERS}" \
        "tokens/step|$((GLOBAL_BATCH * SEQ))" \
        "optimizer / lr|${OPT} / ${LR} (${LR_DECAY_STYLE}, warmup ${LR_WARMUP_FRAC})" \
        "dtype / ZeRO|${DTYPE} / ${ZERO_STAGE}" \
        "dtype chosen by|${DTYPE_WHY}" \
        "data list|${DATA_FILE_LIST}" \
        "run dir|${CKPT_DIR}" \
        "log file|${OUTPUT_LOG}"; do
        printf '| %-18s %s\n' "${row%%|*}" "${row#*|}"
    done
    printf '%s\n' "+--------------------------------------------------------------------------------"
}

# `bash train_alcf.sh --help`: usage and every environment variable with its default (the
# "Variables" block at the top of this file, which tests/test_launcher_help.py keeps complete).
alcf_help() {
    cat <<'EOF'
Usage: [VAR=value ...] bash train_alcf.sh [extra pretrain_gpt.py flags...]

  bash train_alcf.sh                               the demo (Shakespeare, small model, CPU-friendly)
  DATA_FILE_LIST=list.txt OPT=muon bash train_alcf.sh
  DRY_RUN=1 bash train_alcf.sh                     print the DeepSpeed config and the command only

Extra flags go to the trainer after the launcher's own, so they win (python pretrain_gpt.py --help
lists them). What a run prints and writes: ALCF/notes/observability.md.

Environment variables [default] (no brackets: unset, the feature is off):
EOF
    sed -n '/^# Variables/,/^[^#]/{/^# Variables/d;/^[^#]/d;s/^# \{0,1\}//;p}' "${ALCF_REPO_DIR}/ALCF/helpers.sh"
}

alcf_main() {
    set -o pipefail
    case "${1:-}" in -h|--help) alcf_help; return 0 ;; esac
    [[ -n "${DEBUG:-}" ]] && set -x
    ORIG_PWD="$PWD"
    USER_ARGS=("$@")
    # The system mpiexec (e.g. PALS on Aurora), before a venv's bin can shadow it on PATH.
    _ALCF_MPIEXEC="${MPIEXEC:-$(command -v mpiexec 2>/dev/null || echo mpiexec)}"
    [[ "${DRY_RUN:-0}" =~ ^(1|true|yes)$ ]] && _ALCF_DRY=1 || _ALCF_DRY=""

    alcf_setup_params
    if (( ${#ALCF_ERRORS[@]} )); then
        local e
        for e in "${ALCF_ERRORS[@]}"; do printf 'ERROR: %s\n' "$e" >&2; done
        printf '[train_alcf] %d problem(s) found; nothing was started.\n' "${#ALCF_ERRORS[@]}" >&2
        return 2
    fi
    cd "$WORKING_DIR" || return 2

    if [[ "$JOB_TYPE" == local && "$NPROC_LOCAL" -gt 1 ]]; then
        MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
        MASTER_PORT="${MASTER_PORT:-$(alcf_free_port)}"
    fi
    (( DEMO )) && _alcf_info "demo run (Shakespeare, ${MODEL_ARCH} model, ${TRAIN_ITERS} iterations); to train on your own data: DATA_FILE_LIST=path/to/list.txt bash train_alcf.sh (format: ALCF/data-lists/README.md)"
    [[ "$TOKENIZER_SOURCE" == sidecar ]] && _alcf_info "tokenizer: ${TOKENIZER_MODEL} (shipped next to the data list; set TOKENIZER_MODEL to use another)"
    alcf_build_train_args

    if [[ -n "$_ALCF_DRY" ]]; then
        alcf_build_launcher
        printf '# DRY_RUN=1: nothing was set up, written or started.\n'
        printf '# machine %s (host %s), job %s, world size %s = %s host(s) x %s process(es)\n' \
            "$MACHINE" "$HOSTNAME_SHORT" "$JOB_TYPE" "$WORLD_SIZE" "$NHOSTS" "$NPROC_LOCAL"
        (( DEMO )) && printf '# demo data list: %s (built by tools/build_demo_data.py on a real run)\n' "$DATA_FILE_LIST"
        printf '# run name: %s\n' "$RUN_NAME"
        printf '# precision: %s (%s)\n' "$DTYPE" "$DTYPE_WHY"
        printf '# DeepSpeed config %s:\n' "$DS_CONFIG"
        alcf_ds_config || return 1
        printf '# environment: %s\n' "${LAUNCH_ENV[*]}"
        printf '# command:\n'
        alcf_print_command
        return 0
    fi

    # ---- the real thing -------------------------------------------------------------------------
    export OMP_NUM_THREADS PYTHONUNBUFFERED=1
    [[ -n "${MASTER_PORT:-}" ]] && export MASTER_ADDR MASTER_PORT
    # shellcheck source=ALCF/env.sh
    source "${ALCF_REPO_DIR}/ALCF/env.sh" || { printf 'ERROR: could not read ALCF/env.sh\n' >&2; return 1; }
    setup_python_env || { printf 'ERROR: Python environment set-up failed (see above); fix it, or set VENV_DIR / activate an environment\n' >&2; return 1; }
    _ALCF_ENV_READY=1

    if (( DEMO )); then
        _alcf_info "building the demo data in ${DEMO_DATA_DIR} (cached)"
        "$PYTHON" "${ALCF_REPO_DIR}/tools/build_demo_data.py" --output-dir "$DEMO_DATA_DIR" \
            || { printf 'ERROR: building the demo data failed (see above)\n' >&2; return 1; }
        [[ -f "$DATA_FILE_LIST" ]] || { printf 'ERROR: the demo data list %s was not created\n' "$DATA_FILE_LIST" >&2; return 1; }
    fi
    alcf_build_launcher

    # The trainer's own checks (flags, tokenizer, data files, --load/--save) before anything is written
    # (pretrain_gpt.py --check-args; CHECK_ARGS=0 skips them; a custom EXEC is not asked).
    if [[ "${CHECK_ARGS:-1}" != 0 && "$EXEC" -ef "${ALCF_REPO_DIR}/pretrain_gpt.py" ]]; then
        WORLD_SIZE="$WORLD_SIZE" LOCAL_WORLD_SIZE="$NPROC_LOCAL" "$PYTHON" "$EXEC" "${TRAIN_ARGS[@]}" "${USER_ARGS[@]}" --check-args \
            || { printf '[train_alcf] the trainer refused the configuration (see ERROR lines above); nothing was started.\n' >&2; return 2; }
    fi

    local stamp; stamp="$(date +%Y%m%d-%H%M%S)"
    LOG_DIR="logs/${RUN_NAME}/${stamp}_${WORLD_SIZE}_${HOSTNAME_SHORT}"
    OUTPUT_LOG="${LOG_DIR}/output.log"
    mkdir -p "$(dirname "$DS_CONFIG")" "$CKPT_DIR" "$LOG_DIR" "$DATA_CACHE_PATH" "$TB_DIR" \
        || { printf 'ERROR: could not create the run directories under %s\n' "$WORKING_DIR" >&2; return 1; }
    alcf_ds_config --write "$DS_CONFIG" || return 1
    printenv | grep -v '^LS_COLORS=' > "${CKPT_DIR}/.env"
    printf '%s\n' "${WORKING_DIR}/${OUTPUT_LOG}" >> logs/latest

    {
        alcf_print_summary
        printf 'environment: %s\n' "${LAUNCH_ENV[*]}"
        printf 'command:\n'
        alcf_print_command
    } | tee -a "$OUTPUT_LOG"

    local rc
    "${LAUNCH_CMD[@]}" "${TRAIN_ARGS[@]}" "${USER_ARGS[@]}" 2>&1 | tee -a "$OUTPUT_LOG"
    rc=${PIPESTATUS[0]}
    (( rc != 0 )) && _alcf_oom_note "$rc"

    {
        printf '[train_alcf] finished with exit status %s\n' "$rc"
        printf '[train_alcf]   precision:       %s (%s)\n' "$DTYPE" "$DTYPE_WHY"
        printf '[train_alcf]   log file:        %s\n' "${WORKING_DIR}/${OUTPUT_LOG}"
        printf '[train_alcf]   checkpoints:     %s\n' "$(_alcf_abs "$SAVE")"
        printf '[train_alcf]   tensorboard:     %s\n' "$(_alcf_abs "$TB_DIR")"
        printf '[train_alcf]   DeepSpeed config: %s\n' "${WORKING_DIR}/${DS_CONFIG}"
    } | tee -a "$OUTPUT_LOG"
    return "$rc"
}

# After a failed run: a rank killed by signal 9 (the kernel's out-of-memory killer, usually) is said
# in one line, with the trainer's memory estimate from the log.
_alcf_oom_note() {
    local rc="$1" est
    if (( rc == 137 )) || grep -qE 'Signal 9 \(SIGKILL\)|exitcode *: -9|Killed \(signal 9\)' "$OUTPUT_LOG" 2>/dev/null; then
        est="$(grep -o 'memory estimate: .*' "$OUTPUT_LOG" | tail -n 1)"
        printf '[train_alcf] a rank was killed by signal 9 (SIGKILL), most likely out of memory (the kernel OOM killer; check dmesg); %s\n' \
            "${est:-no memory estimate was logged}" | tee -a "$OUTPUT_LOG"
    fi
}

_alcf_abs() { if [[ "$1" == /* ]]; then echo "$1"; else echo "${WORKING_DIR}/$1"; fi; }

# convert_ckpt_to_universal <ckpt_dir> [extra converter args]: convert the checkpoint named by
# <ckpt_dir>/latest_checkpointed_iteration.txt into <ckpt_dir>/global_step<N>_universal and point
# <ckpt_dir>/latest_universal at it (then train with LOAD=<ckpt_dir> ... --universal-checkpoint).
convert_ckpt_to_universal() {
    local ckpt_dir="${1:-}"
    if [[ -z "$ckpt_dir" || ! -f "${ckpt_dir}/latest_checkpointed_iteration.txt" ]]; then
        printf 'ERROR: usage: convert_ckpt_to_universal <ckpt_dir> (a directory holding latest_checkpointed_iteration.txt)\n' >&2
        return 2
    fi
    shift
    local gs
    gs="$(<"${ckpt_dir}/latest_checkpointed_iteration.txt")"
    printf 'global step: %s\n' "$gs"
    "${PYTHON:-python3}" "${ALCF_REPO_DIR}/tools/convert_checkpoint/ds_to_universal.py" \
        --input_folder "${ckpt_dir}/global_step${gs}" --output_folder "${ckpt_dir}/global_step${gs}_universal" "$@"
}
