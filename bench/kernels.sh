#!/usr/bin/env bash
# Shardline's kernel bench and PyTorch's (CPU) in one go, then one table.
# Env: THREADS (torch threads, default all cores), SHARDLINE_ARGS, PEER_ARGS (extra flags), OUT.
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
run_shardline kernels ${SHARDLINE_ARGS:-}
echo "== torch_kernels.py" >&2
# shellcheck disable=SC2086
"$PY" bench/peers/torch_kernels.py --threads "${THREADS:-$(nproc)}" ${PEER_ARGS:-} --json "$OUT/kernels-torch.jsonl"
compare kernels
