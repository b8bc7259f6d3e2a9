#!/usr/bin/env bash
# Train a Llama-style GPT with DeepSpeed: environment variables -> trainer flags -> launch.
#
#   bash train_alcf.sh                                   # the demo (Shakespeare, small model)
#   DATA_FILE_LIST=path/to/list.txt OPT=muon bash train_alcf.sh [extra trainer flags...]
#   DRY_RUN=1 bash train_alcf.sh                         # print the config and command only
#
# Extra arguments go to pretrain_gpt.py after every launcher default, so they win.
# The functions (and the list of variables) are in ALCF/helpers.sh.
# shellcheck source=ALCF/helpers.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ALCF/helpers.sh"
alcf_main "$@"
exit $?
